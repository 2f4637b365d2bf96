"""``python -m fedlora.plan``: the bytes every client uploads and downloads, before a run.

For each strategy asked, the planner runs the server's own code (the strategy's
configure and aggregate steps, the codecs, Flower's serialization) through the
initialisation and every round, against stand-in clients. A stand-in does not train: it
replies what a real client would, in form and size (the tensors the server expects of
it, filled with random values, encoded by the run's codec; the metrics a client reports,
with its real example count), through the ClientApp's own reply builder.

The model is built on the meta device from its config: no weights are read. The adapted
linear layers get CPU storage that is never filled or read, so their pages cost no
memory. Bytes depend on shapes, codecs and settings (the run config travels in every
message, so ``--name`` and ``--output`` count too), not on values, with one exception:
Flower sends a tensor that occurs twice in a message once. The planner's tensors repeat
where a real run's do (the zero B of a fresh LoRA), and nowhere else.

What it costs: the server's own work on the tensors, e.g. FedEx-LoRA's dense residuals
(out x in values per module) and Fed-SB's gradient round (the same, per client).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedlora.cli import build_parser as build_command_parser
from fedlora.cli import study_from_args
from fedlora.errors import FedLoraError
from fedlora.wire import reply_content, run_record, train_metrics
from server.dry_run import DryRunGrid, dry_run
from server.preflight import preflight
from server.transport import traffic


@dataclass
class RoundBytes:
    """One round's traffic: each client's bytes by partition id (0: the initialisation)."""

    round: int
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)


def meta_model(name: str, target_modules: list[str]):
    """The model of ``name`` (a packaged name, a Hugging Face folder or its config.json),
    built on the meta device; its ``target_modules`` linears get unfilled CPU weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedlora.adapters import target_linears
    from fedlora.models import resolve_model

    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FedLoraError(f"--model {name}: no such file")
        source = path
    else:
        source = resolve_model(name)
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FedLoraError(f"--model {name}: not a Hugging Face model config ({err})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    for linear in target_linears(model, target_modules).values():
        linear.weight = torch.nn.Parameter(torch.empty(linear.weight.shape), requires_grad=False)
    return model


def stand_in_reply(message, strategy, examples: dict[int, int], generator):
    """The reply a real client would send to ``message``, with random tensors: it reads
    the plan as the ClientApp does (the strategy may set the rank and codec there)."""
    from flwr.app import Message, Metadata, MetricRecord

    from client.app import client_rank
    from fedlora import wire
    from fedlora.codec import Codec, encode_payload
    from fedlora.privacy import Privacy

    node = message.metadata.dst_node_id
    partition = node - 1
    plan = wire.Plan.from_record(message.content[wire.CONFIG])
    config = plan.run
    if plan.task == "gradient":
        metrics = {wire.NUM_EXAMPLES: min(examples[partition], plan.gradient_examples)}
        shapes, codec = strategy.init_reply_shapes(), Codec.parse(str(plan.gradient_codec))
    else:
        privacy = Privacy.from_config(config)
        dpsgd = (privacy.client_dpsgd(examples[partition], plan.server_round, partition)
                 if privacy and privacy.mode == "sample" else None)
        stats = {"train_loss": 1.0 + generator.random(), "train_seconds": 1.0 + generator.random()}
        metrics = train_metrics(examples[partition], stats, client_rank(plan, {}, partition),
                                dpsgd, config.local_steps)
        shapes = strategy.expected_shapes(MetricRecord(metrics))
        codec = Codec.parse(config.upload_codec)
    tensors = {k: torch.from_numpy(generator.standard_normal(shape, dtype="float32"))
               for k, shape in shapes.items()}
    payload, header = encode_payload(tensors, codec)
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"message-{node}", group_id="", created_at=time.time(),
                        ttl=3600.0, message_type=message.metadata.message_type)
    return Message(content=reply_content(payload, header, metrics, str(partition)),
                   metadata=metadata)


def plan_traffic(config, model=None) -> list[RoundBytes]:
    """The bytes of every client's messages in the initialisation (round 0) and in each
    of ``config.rounds`` rounds, from the server's own code on stand-in replies."""
    import numpy as np
    from flwr.app import ConfigRecord

    from fedlora.data import load_task, local_examples, server_data

    # A config.json is checked by meta_model: no weights are read.
    strategy, config = preflight(config, model=not config.model.endswith(".json"))
    model = model if model is not None else meta_model(config.model, config.target_module_list)
    words = server_data(config).label_words
    task = None if config.client_data else load_task(config, words)
    examples = {}  # each client's training examples: its weight, in its metrics
    for partition in range(config.num_clients):
        data_file = config.client_data_list[partition] if config.client_data else None
        train, _ = local_examples(config, data_file, partition, config.num_clients, words, task)
        examples[partition] = len(train)
    generator = np.random.default_rng(config.seed)
    grid = DryRunGrid(range(1, config.num_clients + 1))  # node n serves partition n - 1
    plan: ConfigRecord = run_record(config, words)
    rounds = []
    with dry_run():
        arrays = strategy.initialize(model)
        messages = strategy.configure_init(arrays, plan, grid)
        rounds.append(RoundBytes(0, down=sent_bytes(messages)))
        if messages:  # replies are made, counted and folded one at a time, as they arrive
            arrays = strategy.aggregate_init(counted(
                (stand_in_reply(m, strategy, examples, generator) for m in messages),
                rounds[-1]))
        for server_round in range(1, config.rounds + 1):
            messages = list(strategy.configure_train(server_round, arrays, plan, grid))
            rounds.append(RoundBytes(server_round, down=sent_bytes(messages)))
            arrays, _ = strategy.aggregate_train(server_round, counted(
                (stand_in_reply(m, strategy, examples, generator) for m in messages),
                rounds[-1]))
            if arrays is None:
                raise FedLoraError(f"round {server_round}: the server refused the stand-in "
                                   f"replies: {strategy.dropped[:1]}")
            del messages
    return rounds


def sent_bytes(messages) -> dict[int, int]:
    """Each message's bytes, by the partition id of the node it goes to."""
    return {m.metadata.dst_node_id - 1: traffic([m]) for m in messages}


def counted(replies, row: RoundBytes):
    """``replies``, each counted into ``row`` on its way to the strategy."""
    for reply in replies:
        row.up[reply.metadata.src_node_id - 1] = traffic([reply])
        yield reply
        del reply


def per_client(values: dict[int, int]) -> str:
    """One client's bytes, or the range where clients differ."""
    if not values:
        return "-"
    low, high = min(values.values()), max(values.values())
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def table(config, rounds: list[RoundBytes]) -> str:
    """The plan of one strategy as a markdown table."""
    lines = [f"{config.strategy}: rank {config.rank_list if config.ranks else config.rank}, "
             f"{config.target_modules}, upload {config.upload_codec}, download "
             f"{config.download_codec}, {config.num_clients} clients, model {config.model}", "",
             "| round | upload per client | download per client | upload, all clients "
             "| download, all clients |", "|---|---|---|---|---|"]
    for row in rounds:
        lines.append(f"| {'init' if row.round == 0 else row.round} | {per_client(row.up)} "
                     f"| {per_client(row.down)} | {sum(row.up.values()):,} | {sum(row.down.values()):,} |")
    lines.append(f"| total | | | {sum(sum(r.up.values()) for r in rounds):,} "
                 f"| {sum(sum(r.down.values()) for r in rounds):,} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """``python -m fedlora.simulate``'s flags; ``--model`` also takes a config.json."""
    return build_command_parser(
        "python -m fedlora.plan",
        "The exact bytes each client uploads and downloads per round and in the "
        "initialisation, for every strategy of --strategy, without loading the model's "
        "weights (it is built on the meta device from its config: --model NAME, FOLDER or "
        "config.json).")


def main(argv: list[str] | None = None) -> int:
    # peft looks for the model's files beside a config.json, and says it found none.
    warnings.filterwarnings("ignore", message="Could not find a config file")

    args = vars(build_parser().parse_args(argv))
    try:
        for run in study_from_args(args):
            print(f"{table(run.config, plan_traffic(run.config))}\n", flush=True)
    except FedLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
