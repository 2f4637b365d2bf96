"""A federated run on the server: config -> strategy -> rounds -> outputs in runs/<name>/.

The round loop calls the strategy's Flower hooks (``configure_train`` and
``aggregate_train``) itself instead of ``Strategy.start``, so that it can show progress
while clients train, count every message's bytes, and write each round's metrics and
evaluation as soon as the round ends. Its neighbours hold the rest: server/transport.py
the messages and their bytes, server/evaluation.py the evaluation, server/outputs.py the
run folder.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from flwr.serverapp import Grid

from fedlora.config import RunConfig
from fedlora.data import server_data
from fedlora.errors import FedLoraError
from fedlora.wire import EXAMPLES_CUT, EXAMPLES_LEFT_OUT, run_record
from server.evaluation import Evaluation
from server.outputs import (METRICS_FILE, MetricsLog, load_checkpoint, make_run_dir,
                            save_checkpoint, save_outputs)
from server.preflight import preflight
from server.secure import secure_exchange
from server.transport import Tally, arrivals, traffic
from strategies import ignored_settings

log = logging.getLogger("fedlora")


def run_federation(grid: Grid, config: RunConfig, simulation: bool = False) -> Path:
    """Run ``config.rounds`` rounds of federated training; return the run folder.

    ``simulation``: every client process runs on this machine (``python -m
    fedlora.simulate``), so ``--central-eval-on auto`` means the clients' processes.
    """
    strategy, config = preflight(config)
    for setting in ignored_settings(config):
        log.warning("--strategy %s does not use %s", config.strategy, setting)
    folder = make_run_dir(config)
    data = server_data(config)
    record = run_record(config, data.label_words)  # what every message tells the clients
    evaluation = Evaluation(grid, strategy, config, record, data, simulation)
    if evaluation.federated and strategy.privacy:
        log.warning("federated evaluation releases metrics of the clients' held-out data; "
                    "epsilon covers training only, not these figures (docs/privacy.md)")
    metrics_log = MetricsLog(folder / METRICS_FILE, private=strategy.privacy is not None,
                             central=evaluation.central is not None,
                             federated=evaluation.federated,
                             labelled=data.label_words is not None,
                             validated=bool(evaluation.validation))
    start = time.perf_counter()  # round 0's seconds include the initial adapter's
    arrays = strategy.initialize(evaluation.model)
    if config.resume:
        arrays, done, unfinished = load_checkpoint(folder, strategy, metrics_log, config.rounds)
        if unfinished:  # checkpointed, then cut short: the same aggregate is scored now
            metrics_log.write(evaluated_row(unfinished, evaluation, arrays))
    else:
        arrays, row = initial_round(grid, strategy, config, record, arrays, evaluation, start)
        metrics_log.write(row)
        done = 0
    ended = f"after all {config.rounds} rounds"
    for server_round in range(done + 1, config.rounds + 1):
        if over_budget(strategy, config, server_round):
            ended = f"before round {server_round}: --dp-max-epsilon {config.dp_max_epsilon:g} reached"
            break
        arrays, row = train_round(grid, strategy, config, record, arrays, server_round, folder)
        # Checkpointed before the new aggregate leaves the server (its evaluation sends it to
        # the clients): after a crash the run resumes with this round done, so a noised
        # aggregate is drawn, released and counted once, never drawn again.
        save_checkpoint(folder, server_round, arrays, strategy, row)
        metrics_log.write(evaluated_row(row, evaluation, arrays))
    save_outputs(folder, config, strategy, arrays, evaluation, metrics_log.rows, ended)
    return folder


def initial_round(grid: Grid, strategy, config: RunConfig, record, arrays, evaluation,
                  start: float):
    """Round 0: the strategy's initialisation round, if it has one, and the evaluation of
    the model clients start from (the base model with the initial adapter: zero for LoRA,
    B R A for Fed-SB's gradient initialisation). Returns the global arrays and the row,
    whose seconds count from ``start``."""
    messages = strategy.configure_init(arrays, record, grid)
    replies = Tally()  # folded as they arrive, like a round's
    if messages and config.secure_aggregation:  # Fed-SB's sign votes, summed unseen
        summed = secure_exchange(grid, messages, strategy.secure_clip, config.round_timeout,
                                 "initialisation")
        arrays = strategy.aggregate_secure_init(summed.mean)
        replies.replies, replies.bytes, down = len(summed.nodes), summed.bytes_up, summed.bytes_down
    else:
        down = traffic(messages)
        if messages:
            arrays = strategy.aggregate_init(replies.count(arrivals(
                grid, messages, config.round_timeout, "initialisation")))
    return arrays, {
        "round": 0, "strategy": config.strategy, "clients": replies.replies,
        **evaluation(arrays, 0),
        "bytes_up": replies.bytes, "bytes_down": down,
        "seconds": time.perf_counter() - start,
    }


def train_round(grid: Grid, strategy, config: RunConfig, record, arrays, server_round: int,
                folder: Path):
    """One round: send, fold the replies as they arrive, aggregate. Returns the new global
    arrays and the round's row, whose ``evaluate`` says whether the round is evaluated
    (every ``--eval-every`` rounds and the last one, also where the DP budget ends the
    run: :func:`evaluated_row`); FedLoraError when too few replies were usable (it names
    ``folder``, where the outputs so far are)."""
    start = time.perf_counter()
    messages = list(strategy.configure_train(server_round, arrays, record, grid))
    replies = Tally()  # handed to the strategy as they arrive, counted on the way
    label = f"round {server_round}"
    if config.secure_aggregation:  # the strategy gets the sum alone
        summed = secure_exchange(grid, messages, strategy.secure_clip, config.round_timeout,
                                 label)
        new_arrays, train_metrics = strategy.aggregate_secure(server_round, messages, summed)
        replies.replies, replies.bytes = len(summed.nodes) + len(strategy.dropped), summed.bytes_up
        down = summed.bytes_down
    else:
        new_arrays, train_metrics = strategy.aggregate_train(
            server_round, replies.count(arrivals(grid, messages, config.round_timeout, label)))
        down = traffic(messages)
    if new_arrays is None:
        raise FedLoraError(
            f"round {server_round} failed: {replies.replies - len(strategy.dropped)} of "
            f"{len(messages)} clients gave a usable reply, --min-clients is "
            f"{config.min_clients}; outputs so far are in {folder}"
        )
    evaluated = (server_round % config.eval_every == 0 or server_round == config.rounds
                 or projected_over_budget(strategy, config) is not None)
    row = {
        "evaluate": evaluated,
        "round": server_round,
        "strategy": config.strategy,
        "clients": replies.replies - len(strategy.dropped),
        # sampled, but no usable reply: missing, failed or refused
        "dropped": len(messages) - replies.replies + len(strategy.dropped),
        **({"train_loss": float(train_metrics["train-loss"])} if "train-loss" in train_metrics else {}),
        "bytes_up": replies.bytes,
        "bytes_down": down,
        "client_train_seconds": float(train_metrics["train-seconds"]),
    }
    for key in ("aggregation-error", "epsilon", "delta", "secure-error-bound"):
        if key in train_metrics:
            row[key.replace("-", "_")] = float(train_metrics[key])
    if "secure-clipped" in train_metrics:
        row["secure_clipped"] = int(train_metrics["secure-clipped"])
    for key in (EXAMPLES_CUT, EXAMPLES_LEFT_OUT):  # the clients' data, fitted
        if key in train_metrics:
            row[key.replace("-", "_")] = int(train_metrics[key])
    return new_arrays, {**row, "seconds": time.perf_counter() - start}


def evaluated_row(row: dict, evaluation, arrays) -> dict:
    """A round's row as metrics.jsonl has it: with its evaluation's figures where the round
    is evaluated, in their place before the bytes, its seconds counting the evaluation."""
    row, begin = dict(row), time.perf_counter()
    figures = evaluation(arrays, row["round"]) if row.pop("evaluate") else {}
    keys = list(row)
    at = keys.index("bytes_up")
    return {**{k: row[k] for k in keys[:at]}, **figures, **{k: row[k] for k in keys[at:]},
            "seconds": row["seconds"] + time.perf_counter() - begin}


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
