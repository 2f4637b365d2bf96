"""How the server evaluates the global adapter each round: central evaluation (on the
server's examples, in this process or in the clients'), federated evaluation (each client
on its held-out slice), and the validation examples' ``val_*`` figures."""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from fedlora import wire
from fedlora.adapters import add_to_weights, lora_applied
from fedlora.config import RunConfig
from fedlora.data import ServerData
from fedlora.errors import FedLoraError
from fedlora.evaluate import Scores, score
from fedlora.models import load_model, pick_device, restored
from fedlora.prompts import fit_examples
from fedlora.wire import check_no_error, reply_metrics
from server.transport import exchange, traffic
from strategies.evaluation import example_shards

log = logging.getLogger("fedlora")


class Evaluation:
    """The server's model and examples, and each round's evaluation of the global adapter.

    Parameters
    ----------
    grid : Grid
        The federation (central evaluation on clients, federated evaluation).
    strategy : LoraStrategy
        The run's strategy: its PEFT adapter, its kept base delta, its evaluate messages.
    config : RunConfig
        The run's settings (evaluation mode, batch sizes, model, device).
    record : ConfigRecord
        What every message tells the clients (fedlora.wire.run_record).
    data : ServerData
        The server's examples: central evaluation, validation, the label set
        (fedlora.data.server_data).
    simulation : bool
        Every client runs on this machine, so ``--central-eval-on auto`` means the
        clients' processes.
    """

    def __init__(self, grid: Grid, strategy, config: RunConfig, record: ConfigRecord,
                 data: ServerData, simulation: bool = False) -> None:
        self.grid, self.strategy, self.config, self.record = grid, strategy, config, record
        self.on_clients = config.central_eval_on == "clients" or (
            config.central_eval_on == "auto" and simulation)
        self.central, self.validation, self.label_words = data
        self.federated = config.evaluation_mode in ("federated", "both")
        # The server's copy of the model serves the initial adapter, the saved outputs and
        # the central evaluation; where the clients' processes evaluate, it stays on the CPU
        # (its weights are read from disk only where touched), so a GPU holds no second copy.
        self.device = pick_device(config.device)
        if (self.central is None and not self.validation) or self.on_clients:
            self.device = torch.device("cpu")
        self.model, self.tokenizer = load_model(config.model, self.device, config.dtype,
                                               config.quantize)
        # Conversations that do not fit --max-length are left out here, once, so that a
        # client scores every example of its share.
        if self.central:
            self.central = fit_examples(self.central, self.tokenizer, config.max_length,
                                        "the evaluation examples", config.chat_template)[0]
        if self.validation:
            self.validation = fit_examples(self.validation, self.tokenizer, config.max_length,
                                           "the validation examples", config.chat_template)[0]

    @property
    def num_labels(self) -> int:
        return len(self.label_words or [])

    def __call__(self, arrays: ArrayRecord, server_round: int) -> dict:
        """Central evaluation of the global adapter, federated evaluation, or both; and
        the validation examples' ``val_*`` metrics."""
        begin, metrics = time.perf_counter(), {}
        for examples, prefix in ((self.central, "eval_"), (self.validation, "val_")):
            if not examples:
                continue
            counts = central_evaluation_on_clients(
                self.grid, self.strategy, arrays, self.record, server_round,
                self.config.round_timeout, examples, self.num_labels,
                lambda share: self.scored_here(arrays, share),
            ) if self.on_clients else self.scored_here(arrays, examples)
            metrics.update(counts.metrics(prefix))
        if self.central or self.validation:
            metrics["eval_seconds"] = time.perf_counter() - begin
        if self.federated:
            metrics.update(federated_evaluation(self.grid, self.strategy, arrays, self.record,
                                                server_round, self.config.round_timeout,
                                                self.num_labels))
        return metrics

    def scored_here(self, arrays: ArrayRecord, examples) -> Scores:
        """The counts of ``examples`` on the global model, in this process."""
        config = self.config
        with self.global_adapter(arrays) as evaluated:
            return score(evaluated, self.tokenizer, examples, self.label_words,
                         batch_size=config.eval_batch_size, max_length=config.max_length,
                         device=self.device, max_new_tokens=config.eval_max_new_tokens,
                         chat=config.chat_template)

    @contextmanager
    def global_adapter(self, arrays: ArrayRecord):
        """The global model: the base, plus the base delta (FedEx-LoRA), plus the adapter."""
        with restored(self.model):
            add_to_weights(self.model, self.strategy.kept.base_delta)
            if not arrays:  # FLoRA before its first round: the base model is the global model
                yield self.model
                return
            state, rank, alpha = self.strategy.peft_adapter(arrays)
            with lora_applied(self.model, state, rank, alpha,
                              self.config.target_module_list) as adapted:
                yield adapted


def federated_evaluation(grid: Grid, strategy, arrays: ArrayRecord, record: ConfigRecord,
                         server_round: int, timeout: float, num_labels: int) -> dict:
    """Every client scores the global adapter on its held-out slice: the pooled
    ``fed_eval_*`` metrics, each client's, the seconds and the bytes it took."""
    begin = time.perf_counter()
    messages = strategy.configure_evaluate(server_round, arrays, record, grid)
    replies = exchange(grid, messages, timeout, f"evaluation {server_round}")
    pooled = strategy.aggregate_evaluate(server_round, replies, num_labels)
    by_client = {client: {"examples": scores.examples, **scores.metrics("")}
                 for client, scores in strategy.evaluated_clients.items()}
    return {**dict(pooled or {}), "fed_eval_by_client": by_client,
            "fed_eval_seconds": time.perf_counter() - begin,
            "eval_bytes_up": traffic(replies), "eval_bytes_down": traffic(messages)}


def central_evaluation_on_clients(grid: Grid, strategy, arrays: ArrayRecord, record: ConfigRecord,
                                  server_round: int, timeout: float, examples: list,
                                  num_labels: int, score_here) -> Scores:
    """Central evaluation in the clients' processes, on the model each already holds (no
    copy in this one): the connected clients score shares of ``examples``; a share whose
    reply is missing or unusable is scored here instead (``score_here(share)``), so the
    figures always cover every example."""
    messages = strategy.configure_evaluate(server_round, arrays, record, grid, examples=examples)
    shares = example_shards(examples, len(messages))
    scored: dict[int, Scores] = {}
    for reply in exchange(grid, messages, timeout, f"central evaluation {server_round}"):
        try:
            check_no_error(reply)
            metrics = reply_metrics(reply)
            shard = metrics.get(wire.EVAL_SHARD)
            if not isinstance(shard, int) or not 0 <= shard < len(shares) or shard in scored:
                raise FedLoraError(f"'{wire.EVAL_SHARD}' {shard!r} names no share still unscored")
            counts = Scores.from_record(metrics, num_labels)
            if counts.examples != len(shares[shard]):
                raise FedLoraError(f"it scored {counts.examples} examples of a share of "
                                   f"{len(shares[shard])}")
            scored[shard] = counts
        except FedLoraError as err:
            log.warning("round %d central evaluation: node %d's reply is unusable (%s); its "
                        "share is scored here", server_round, reply.metadata.src_node_id, err)
    for shard, share in enumerate(shares):
        if shard not in scored:
            scored[shard] = score_here(share)
    return sum(scored.values(), Scores())
