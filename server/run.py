"""A federated run on the server: config -> strategy -> rounds -> outputs in runs/<name>/.

The round loop calls the strategy's Flower hooks (``configure_train`` and
``aggregate_train``) itself instead of ``Strategy.start``, so that it can show progress
while clients train, count every message's bytes, and write each round's metrics and
evaluation as soon as the round ends.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import tomli_w
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from tqdm import tqdm

from fedlora.adapters import (
    add_to_weights,
    lora_applied,
    save_adapter,
    save_base_delta,
    save_shared_tensors,
)
from fedlora.config import RunConfig
from fedlora.data import server_data
from fedlora.errors import FedLoraError
from fedlora.evaluate import Scores, score
from fedlora.models import load_model, pick_device, restored
from fedlora.study import METRICS, SUMMARY, read_rows
from strategies import build_strategy, folder_name, ignored_settings
from strategies.evaluation import example_shards
from strategies.replies import check_no_error, reply_metrics

log = logging.getLogger("fedlora")
CHECKPOINT = "checkpoint.pt"  # in the run folder: the state after the last completed round

COLUMNS = [  # (metrics key, table heading, width, format spec)
    ("round", "round", 5, "d"),
    ("train_loss", "train loss", 10, ".4f"),
    ("eval_loss", "eval loss", 9, ".4f"),  # central evaluation
    ("eval_accuracy", "accuracy", 8, ".3f"),  # these two with labels
    ("eval_macro_f1", "macro-F1", 8, ".3f"),
    ("eval_exact_match", "exact match", 11, ".3f"),  # this one without
    ("val_loss", "val loss", 9, ".4f"),  # --val-size
    ("val_accuracy", "val acc", 7, ".3f"),
    ("val_exact_match", "val exact", 9, ".3f"),
    ("fed_eval_loss", "fed loss", 9, ".4f"),  # federated evaluation
    ("fed_eval_accuracy", "fed acc", 7, ".3f"),
    ("fed_eval_accuracy_min", "fed min", 7, ".3f"),
    ("fed_eval_exact_match", "fed exact", 9, ".3f"),
    ("bytes_up", "bytes up", 13, ","),
    ("bytes_down", "bytes down", 13, ","),
    ("epsilon", "epsilon", 7, ".3g"),  # these two only with --dp
    ("delta", "delta", 7, ".0e"),
    ("seconds", "seconds", 7, ".1f"),
]


def payload_bytes(message: Message) -> int:
    """Exact serialized size of a message's content, as Flower sends it: see serialized_bytes."""
    return serialized_bytes(message.content)


def serialized_bytes(record) -> int:
    """Exact serialized size of a Flower record (a RecordDict, ArrayRecord, ...).

    Flower stores a message as content-addressed objects (records, arrays, array chunks);
    an object that occurs twice is sent once. This is the sum of their serialized sizes,
    without the ~1 KB of message metadata.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


def run_federation(grid: Grid, config: RunConfig, simulation: bool = False) -> Path:
    """Run ``config.rounds`` rounds of federated training; return the run folder.

    ``simulation``: every client process runs on this machine (``python -m
    fedlora.simulate``), so ``--central-eval-on auto`` means the clients' processes.
    """
    strategy = build_strategy(config)
    config = evaluation_for(strategy, config)
    for setting in ignored_settings(config):
        log.warning("--strategy %s does not use %s", config.strategy, setting)
    central_on_clients = config.central_eval_on == "clients" or (
        config.central_eval_on == "auto" and simulation)
    run_dir = make_run_dir(config)
    central_examples, validation, label_words = server_data(config)
    # The server's copy of the model serves the initial adapter, the saved outputs and the
    # central evaluation; where the clients' processes evaluate, it stays on the CPU (its
    # weights are read from disk only where touched), so a GPU holds no second copy.
    device = pick_device(config.device)
    if (central_examples is None and not validation) or central_on_clients:
        device = torch.device("cpu")
    model, tokenizer = load_model(config.model, device, config.dtype)
    plan = plan_record(config, label_words)
    federated = config.evaluation_mode in ("federated", "both")
    if federated and strategy.privacy:
        log.warning("federated evaluation releases metrics of the clients' held-out data; "
                    "epsilon covers training only, not these figures (docs/privacy.md)")

    def evaluation(arrays: ArrayRecord, server_round: int) -> dict:
        """Central evaluation of the global adapter, federated evaluation, or both; and
        the validation examples' ``val_*`` metrics."""
        begin, metrics = time.perf_counter(), {}
        for examples, prefix in ((central_examples, "eval_"), (validation, "val_")):
            if not examples:
                continue
            counts = central_evaluation_on_clients(
                grid, strategy, arrays, plan, server_round, config.round_timeout,
                examples, len(label_words or []),
                lambda share: scored_here(arrays, share),
            ) if central_on_clients else scored_here(arrays, examples)
            metrics.update(counts.metrics(prefix))
        if central_examples or validation:
            metrics["eval_seconds"] = time.perf_counter() - begin
        if federated:
            metrics.update(federated_evaluation(grid, strategy, arrays, plan, server_round,
                                                config.round_timeout, len(label_words or [])))
        return metrics

    def scored_here(arrays: ArrayRecord, examples) -> Scores:
        """The counts of ``examples`` on the global model, in this process."""
        with global_adapter(arrays) as evaluated:
            return score(evaluated, tokenizer, examples, label_words,
                         batch_size=config.eval_batch_size, max_length=config.max_length,
                         device=device, max_new_tokens=config.eval_max_new_tokens)

    @contextmanager
    def global_adapter(arrays: ArrayRecord):
        """The global model: the base, plus the base delta (FedEx-LoRA), plus the adapter."""
        with restored(model):
            add_to_weights(model, strategy.kept.base_delta)
            if not arrays:  # FLoRA before its first round: the base model is the global model
                yield model
                return
            state, rank, alpha = strategy.peft_adapter(arrays)
            with lora_applied(model, state, rank, alpha, config.target_module_list) as adapted:
                yield adapted

    metrics_log = MetricsLog(run_dir / METRICS, private=strategy.privacy is not None,
                             central=central_examples is not None, federated=federated,
                             labelled=label_words is not None, validated=bool(validation))
    start = time.perf_counter()
    arrays = strategy.initialize(model)
    if config.resume:
        arrays, done = load_checkpoint(run_dir, strategy, metrics_log, config.rounds)
    else:
        init_messages = strategy.configure_init(arrays, plan, grid)
        init_replies = Tally()  # folded as they arrive, like a round's
        if init_messages:
            arrays = strategy.aggregate_init(init_replies.count(arrivals(
                grid, init_messages, config.round_timeout, "initialisation")))
        metrics_log.write({
            "round": 0, "strategy": config.strategy, "clients": init_replies.replies,
            # Round 0: the model clients start from: the base model with the initial
            # adapter (zero for LoRA; B R A for Fed-SB's gradient initialisation).
            **evaluation(arrays, 0),
            "bytes_up": init_replies.bytes, "bytes_down": traffic(init_messages),
            "seconds": time.perf_counter() - start,
        })
        done = 0
    ended = f"after all {config.rounds} rounds"
    for server_round in range(done + 1, config.rounds + 1):
        if over_budget(strategy, config, server_round):
            ended = f"before round {server_round}: --dp-max-epsilon {config.dp_max_epsilon:g} reached"
            break
        start = time.perf_counter()
        messages = list(strategy.configure_train(server_round, arrays, plan, grid))
        replies = Tally()  # handed to the strategy as they arrive, counted on the way
        new_arrays, train_metrics = strategy.aggregate_train(
            server_round, replies.count(arrivals(grid, messages, config.round_timeout,
                                                 f"round {server_round}")))
        if new_arrays is None:
            raise FedLoraError(
                f"round {server_round} failed: {replies.replies - len(strategy.dropped)} of "
                f"{len(messages)} clients gave a usable reply, --min-clients is "
                f"{config.min_clients}; outputs so far are in {run_dir}"
            )
        arrays = new_arrays
        # Every --eval-every rounds and the last one (also where the DP budget ends the run).
        evaluated = (server_round % config.eval_every == 0 or server_round == config.rounds
                     or projected_over_budget(strategy, config) is not None)
        row = {
            "round": server_round,
            "strategy": config.strategy,
            "clients": replies.replies - len(strategy.dropped),
            # sampled, but no usable reply: missing, failed or refused
            "dropped": len(messages) - replies.replies + len(strategy.dropped),
            **({"train_loss": float(train_metrics["train-loss"])} if "train-loss" in train_metrics else {}),
            **(evaluation(arrays, server_round) if evaluated else {}),
            "bytes_up": replies.bytes,
            "bytes_down": traffic(messages),
            "client_train_seconds": float(train_metrics["train-seconds"]),
        }
        for key in ("aggregation-error", "epsilon", "delta"):
            if key in train_metrics:
                row[key.replace("-", "_")] = float(train_metrics[key])
        metrics_log.write({**row, "seconds": time.perf_counter() - start})
        save_checkpoint(run_dir, server_round, arrays, strategy)
    if strategy.personal:  # no global model: the shared tensors, and what is missing
        save_shared_tensors(arrays.to_torch_state_dict(), run_dir / "adapter", strategy.personal)
    else:
        with global_adapter(arrays) as adapted:
            save_adapter(adapted, run_dir / "adapter")
        if strategy.kept.base_delta:  # the global model is not the base model plus a LoRA
            save_base_delta(strategy.kept.base_delta, run_dir / "adapter")
    from server.report import plot_report  # matplotlib: only once a report is written

    plot_report(metrics_log.rows, run_dir / "report.png")
    last = metrics_log.rows[-1]
    (run_dir / SUMMARY).write_text(json.dumps({  # written last: the run has ended
        "ended": ended, "rounds": last["round"],
        "cumulative_bytes_up": last["cumulative_bytes_up"],
        "cumulative_bytes_down": last["cumulative_bytes_down"],
        "seconds": sum(row["seconds"] for row in metrics_log.rows)}, indent=1) + "\n")
    return run_dir


def plan_record(config: RunConfig, label_words: list[str] | None) -> ConfigRecord:
    """What every message tells the clients: the run config, less the server's own
    --resume path, and the label set."""
    return ConfigRecord({**{k: v for k, v in config.to_dict().items() if k != "resume"},
                         "label-words": json.dumps(label_words)})


def evaluation_for(strategy, config: RunConfig) -> RunConfig:
    """``config`` with its evaluation settled for ``strategy``: a personalised method (each
    client keeps part of the adapter) has no global model to evaluate at the server, so
    ``auto`` means federated and central evaluation is refused."""
    if not strategy.personal:
        return config
    if config.evaluation in ("central", "both"):
        raise FedLoraError(f"--evaluation {config.evaluation}: --strategy {strategy.name} keeps "
                           f"{', '.join(strategy.personal)} on each client, so only the clients "
                           "can evaluate it; use --evaluation federated")
    if config.val_size:
        raise FedLoraError(f"--val-size {config.val_size}: --strategy {strategy.name} keeps "
                           f"{', '.join(strategy.personal)} on each client, so the server has no "
                           "model to validate; drop --val-size (and --lr-grid) for it")
    return dataclasses.replace(config, evaluation="federated")


def federated_evaluation(grid: Grid, strategy, arrays: ArrayRecord, plan: ConfigRecord,
                         server_round: int, timeout: float, num_labels: int) -> dict:
    """Every client scores the global adapter on its held-out slice: the pooled
    ``fed_eval_*`` metrics, each client's, the seconds and the bytes it took."""
    begin = time.perf_counter()
    messages = strategy.configure_evaluate(server_round, arrays, plan, grid)
    replies = exchange(grid, messages, timeout, f"evaluation {server_round}")
    pooled = strategy.aggregate_evaluate(server_round, replies, num_labels)
    by_client = {client: {"examples": scores.examples, **scores.metrics("")}
                 for client, scores in strategy.evaluated_clients.items()}
    return {**dict(pooled or {}), "fed_eval_by_client": by_client,
            "fed_eval_seconds": time.perf_counter() - begin,
            "eval_bytes_up": traffic(replies), "eval_bytes_down": traffic(messages)}


def central_evaluation_on_clients(grid: Grid, strategy, arrays: ArrayRecord, plan: ConfigRecord,
                                  server_round: int, timeout: float, examples: list,
                                  num_labels: int, score_here) -> Scores:
    """Central evaluation in the clients' processes, on the model each already holds (no
    copy in this one): the connected clients score shares of ``examples``; a share whose
    reply is missing or unusable is scored here instead (``score_here(share)``), so the
    figures always cover every example."""
    messages = strategy.configure_evaluate(server_round, arrays, plan, grid, examples=examples)
    shares = example_shards(examples, len(messages))
    scored: dict[int, Scores] = {}
    for reply in exchange(grid, messages, timeout, f"central evaluation {server_round}"):
        try:
            check_no_error(reply)
            metrics = reply_metrics(reply)
            shard = metrics.get("eval-shard")
            if not isinstance(shard, int) or not 0 <= shard < len(shares) or shard in scored:
                raise FedLoraError(f"'eval-shard' {shard!r} names no share still unscored")
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


def over_budget(strategy, config: RunConfig, server_round: int) -> bool:
    """Whether round ``server_round`` would take epsilon past ``--dp-max-epsilon``.

    Before round 1 that is a bad setting (FedLoraError: nothing could run); later the run
    stops cleanly, keeping what it produced, and says so.
    """
    projected = projected_over_budget(strategy, config)
    if projected is None:
        return False
    delta = strategy.dp.accountant.spent()[1] or strategy.privacy.delta_for(config.num_clients)
    message = (f"round {server_round} would raise epsilon to {projected:.3g} (delta {delta:.3g}), "
               f"over --dp-max-epsilon {config.dp_max_epsilon:g}")
    if server_round == 1:
        raise FedLoraError(f"{message}: the budget is spent before any round; raise "
                           "--dp-max-epsilon or --dp-noise")
    log.warning("%s: stopping after round %d", message, server_round - 1)
    return True


def projected_over_budget(strategy, config: RunConfig) -> float | None:
    """The epsilon after the next round if it exceeds ``--dp-max-epsilon``, else None
    (also without a budget, or where the next round's epsilon is unknown)."""
    if not config.dp_max_epsilon:
        return None
    projected = strategy.epsilon_after_next_round()
    return projected if projected is not None and projected > config.dp_max_epsilon else None


def traffic(messages: list[Message]) -> int:
    """Payload bytes of the messages that carry content (error replies carry none)."""
    return sum(payload_bytes(m) for m in messages if not m.has_error())


def make_run_dir(config: RunConfig) -> Path:
    """Create runs/<name>/ (or take the ``--resume`` folder) and write the resolved config
    into it."""
    if config.resume:
        run_dir, name = Path(config.resume), config.name or Path(config.resume).name
        if not (run_dir / CHECKPOINT).is_file():
            raise FedLoraError(f"--resume {run_dir}: no {CHECKPOINT} there, so no completed round to resume")
    else:
        name = config.name or f"{folder_name(config.strategy)}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = Path(config.output) / name
        check_unused(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = {**config.to_dict(), "name": name, "resume": ""}
    (run_dir / "config.toml").write_text(tomli_w.dumps(resolved))
    return run_dir


def check_unused(run_dir: Path) -> None:
    """Raise FedLoraError if ``run_dir`` already holds a run."""
    if (run_dir / METRICS).exists():
        raise FedLoraError(f"run folder {run_dir} already holds a run; choose another --name "
                           f"or continue it with --resume {run_dir}")


def save_checkpoint(run_dir: Path, server_round: int, arrays: ArrayRecord, strategy) -> None:
    """Save what the next round needs, replacing the previous round's checkpoint whole."""
    checkpoint = {"round": server_round, "arrays": arrays.to_torch_state_dict(),
                  "strategy": strategy.state_dict()}
    partial = run_dir / f"{CHECKPOINT}.partial"
    torch.save(checkpoint, partial)
    partial.replace(run_dir / CHECKPOINT)  # atomic: a crash leaves the old one or the new one


def load_checkpoint(run_dir: Path, strategy, metrics_log: MetricsLog, rounds: int):
    """Restore the strategy and the metrics of the last completed round; return the global
    arrays and that round."""
    checkpoint = torch.load(run_dir / CHECKPOINT, weights_only=True)  # tensors and plain values
    done = checkpoint["round"]
    if done >= rounds:
        raise FedLoraError(f"--resume {run_dir}: all {done} rounds are done; give --rounds above "
                           f"{done} to continue")
    strategy.load_state_dict(checkpoint["strategy"])
    metrics_log.restore([row for row in read_rows(run_dir) if row["round"] <= done])
    tqdm.write(f"resuming {run_dir} after round {done}")
    return ArrayRecord(checkpoint["arrays"]), done


def exchange(grid: Grid, messages: list[Message], timeout: float, label: str) -> list[Message]:
    """Send ``messages``; the replies that arrive before ``timeout`` (see arrivals)."""
    return list(arrivals(grid, messages, timeout, label))


def arrivals(grid: Grid, messages: list[Message], timeout: float, label: str) -> Iterator[Message]:
    """Send ``messages`` and yield each reply as it arrives, until all are in or
    ``timeout`` passes.

    Like ``Grid.send_and_receive``, but polls every half second (sooner at first), shows
    a progress bar and keeps no reply it has handed on (a strategy that streams folds each
    one and lets it go).
    """
    if not messages:
        return
    pending = set(grid.push_messages(messages))
    total = len(pending)
    deadline = time.monotonic() + timeout
    wait = 0.01  # short exchanges (a small model's round, an evaluation) end sooner
    # disable=None: a bar on a terminal, nothing in a log file
    with tqdm(total=total, desc=label, unit="client", leave=False, disable=None) as bar:
        while pending and time.monotonic() < deadline:
            arrived = deque(grid.pull_messages(pending))
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            bar.update(len(arrived))
            while arrived:
                yield arrived.popleft()
            if pending:
                time.sleep(wait)
                wait = min(2 * wait, 0.5)
    if pending:
        log.warning("%s: %d of %d clients did not reply within %gs",
                    label, len(pending), total, timeout)


class Tally:
    """Replies passed through :meth:`count`: how many, and their payload bytes."""

    def __init__(self) -> None:
        self.replies = self.bytes = 0

    def count(self, replies: Iterable[Message]) -> Iterator[Message]:
        for reply in replies:
            self.replies += 1
            self.bytes += traffic([reply])
            yield reply
            del reply  # held no longer than the strategy holds it


class MetricsLog:
    """metrics.jsonl, one JSON object per round, and the table row printed for it."""

    def __init__(self, path: Path, private: bool = False, central: bool = True,
                 federated: bool = False, labelled: bool = True, validated: bool = False) -> None:
        self.path = path
        self.rows: list[dict] = []
        self.total_up = self.total_down = 0
        hidden = set() if private else {"epsilon", "delta"}
        if not central:
            hidden |= {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_exact_match"}
        if not federated:
            hidden |= {"fed_eval_loss", "fed_eval_accuracy", "fed_eval_accuracy_min",
                       "fed_eval_exact_match"}
        if not validated:
            hidden |= {"val_loss", "val_accuracy", "val_exact_match"}
        hidden |= ({"eval_exact_match", "fed_eval_exact_match", "val_exact_match"} if labelled
                   else {"eval_accuracy", "eval_macro_f1", "fed_eval_accuracy",
                         "fed_eval_accuracy_min", "val_accuracy"})
        self.columns = [c for c in COLUMNS if c[0] not in hidden]
        tqdm.write("  ".join(f"{heading:>{width}}" for _, heading, width, _ in self.columns))

    def restore(self, rows: list[dict]) -> None:
        """Start over from ``rows`` (a resumed run drops rounds after its checkpoint)."""
        self.path.write_text("")
        self.rows, self.total_up, self.total_down = [], 0, 0
        for row in rows:
            self.write(row)

    def write(self, row: dict) -> None:
        self.total_up += row["bytes_up"]
        self.total_down += row["bytes_down"]
        row.update(cumulative_bytes_up=self.total_up, cumulative_bytes_down=self.total_down)
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        tqdm.write("  ".join(
            f"{'-' if row.get(key) is None else format(row[key], spec):>{width}}"
            for key, _, width, spec in self.columns
        ))
