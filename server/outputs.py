"""A run's folder, ``<output>/<name>/``: what the server writes there and reads back.

- ``config.toml``: the resolved run config, written when the run starts;
- ``metrics.jsonl``: one JSON row per round, written as each round ends, with the table
  row printed for it (:class:`MetricsLog`);
- ``checkpoint.pt``: the state after the last completed round (``--resume`` continues
  from it);
- ``adapter/``, ``report.png`` and, last, ``summary.json``: how the run ended.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime
from pathlib import Path

import tomli_w
import torch
from flwr.app import ArrayRecord
from tqdm import tqdm

from fedlora.adapters import save_adapter, save_base_delta, save_shared_tensors
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from strategies import folder_name

METRICS = "metrics.jsonl"  # one JSON row per round
SUMMARY = "summary.json"  # how the run ended, written last
CHECKPOINT = "checkpoint.pt"  # the state after the last completed round

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


def run_dir(config: RunConfig) -> Path:
    """The run's folder: the ``--resume`` folder, else ``<output>/<name>``."""
    return Path(config.resume) if config.resume else Path(config.output) / config.name


def make_run_dir(config: RunConfig) -> Path:
    """Create the run's folder (named after the strategy and the time when ``--name`` is
    not given) and write the resolved config into it."""
    if not config.resume and not config.name:
        config = dataclasses.replace(config, name=default_name(config.strategy))
    folder = run_dir(config)
    if config.resume:
        if not (folder / CHECKPOINT).is_file():
            raise FedLoraError(f"--resume {folder}: no {CHECKPOINT} there, so no completed round to resume")
    else:
        check_unused(folder)
    folder.mkdir(parents=True, exist_ok=True)
    resolved = {**config.to_dict(), "name": config.name or folder.name, "resume": ""}
    (folder / "config.toml").write_text(tomli_w.dumps(resolved))
    return folder


def default_name(strategy: str) -> str:
    """A run folder's name when ``--name`` is not given: the strategy and the time."""
    return f"{folder_name(strategy)}-{datetime.now():%Y%m%d-%H%M%S}"


def check_unused(folder: Path) -> None:
    """Raise FedLoraError if ``folder`` already holds a run."""
    if (folder / METRICS).exists():
        raise FedLoraError(f"run folder {folder} already holds a run; choose another --name "
                           f"or continue it with --resume {folder}")


def read_rows(folder: Path) -> list[dict]:
    """The rows of a run folder's metrics.jsonl, round 0 first."""
    return [json.loads(line) for line in (folder / METRICS).open()]


def is_finished(folder: Path) -> bool:
    """Whether the run in ``folder`` ended: SUMMARY is the last file a run writes (and
    with config.toml and metrics.jsonl, all a committed study keeps of it)."""
    return (folder / SUMMARY).is_file()


def save_checkpoint(folder: Path, server_round: int, arrays: ArrayRecord, strategy) -> None:
    """Save what the next round needs, replacing the previous round's checkpoint whole."""
    checkpoint = {"round": server_round, "arrays": arrays.to_torch_state_dict(),
                  "strategy": strategy.state_dict()}
    partial = folder / f"{CHECKPOINT}.partial"
    torch.save(checkpoint, partial)
    partial.replace(folder / CHECKPOINT)  # atomic: a crash leaves the old one or the new one


def load_checkpoint(folder: Path, strategy, metrics_log: MetricsLog, rounds: int):
    """Restore the strategy and the metrics of the last completed round; return the global
    arrays and that round."""
    checkpoint = torch.load(folder / CHECKPOINT, weights_only=True)  # tensors and plain values
    done = checkpoint["round"]
    if done >= rounds:
        raise FedLoraError(f"--resume {folder}: all {done} rounds are done; give --rounds above "
                           f"{done} to continue")
    strategy.load_state_dict(checkpoint["strategy"])
    metrics_log.restore([row for row in read_rows(folder) if row["round"] <= done])
    tqdm.write(f"resuming {folder} after round {done}")
    return ArrayRecord(checkpoint["arrays"]), done


def save_outputs(folder: Path, strategy, arrays: ArrayRecord, global_adapter,
                 rows: list[dict], ended: str) -> None:
    """The run's adapter, report.png and, last, summary.json. ``global_adapter(arrays)``
    is the context manager that yields the global model (server.evaluation)."""
    if strategy.personal:  # no global model: the shared tensors, and what is missing
        save_shared_tensors(arrays.to_torch_state_dict(), folder / "adapter", strategy.personal)
    else:
        with global_adapter(arrays) as adapted:
            save_adapter(adapted, folder / "adapter")
        if strategy.kept.base_delta:  # the global model is not the base model plus a LoRA
            save_base_delta(strategy.kept.base_delta, folder / "adapter")
    from server.report import plot_report  # matplotlib: only once a report is written

    plot_report(rows, folder / "report.png")
    last = rows[-1]
    (folder / SUMMARY).write_text(json.dumps({  # written last: the run has ended
        "ended": ended, "rounds": last["round"],
        "cumulative_bytes_up": last["cumulative_bytes_up"],
        "cumulative_bytes_down": last["cumulative_bytes_down"],
        "seconds": sum(row["seconds"] for row in rows)}, indent=1) + "\n")


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
