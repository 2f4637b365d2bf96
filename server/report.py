"""A run's report.png: accuracy and loss against rounds and against upload bytes (a
comparison's or a study's comparison.md and .png: fedlora.comparison)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedlora.evaluate import headline_keys, headline_metric  # noqa: E402


def latest(rows: list[dict], key: str):
    """The value of ``key`` in the last row that has it (rows skipped by --eval-every, or
    a federated evaluation no client answered, have none), else None."""
    return next((r[key] for r in reversed(rows) if r.get(key) is not None), None)


def quality_key(rows: list[dict]) -> str:
    """The headline figure of a run (fedlora.evaluate.METRICS' ``headline``): accuracy
    (central, else federated), else exact match, else the evaluation loss."""
    return next((k for k, _ in headline_keys() if latest(rows, k) is not None), "eval_loss")


def bounds(quality: str) -> tuple[float, float]:
    """The range a headline figure can take (a loss has no upper bound)."""
    metric = headline_metric(quality)
    return metric.bounds if metric else (0.0, math.inf)


def loss_key(rows: list[dict]) -> str:
    return "eval_loss" if latest(rows, "eval_loss") is not None else "fed_eval_loss"


def chance(rows: list[dict], quality: str) -> float | None:
    """The chance line of a headline figure (accuracy: always answering the evaluation
    data's most common label), where its metric has one."""
    metric = headline_metric(quality)
    return latest(rows, quality.replace(metric.name, metric.chance)) if metric and metric.chance else None


def plot_report(rows: list[dict], path: Path) -> None:
    """Three panels: quality per round, losses per round, quality per upload byte; with
    ``--evaluation both``, central and federated side by side; a dashed line marks the
    majority-class accuracy."""
    quality, loss_name = quality_key(rows), loss_key(rows)
    shown = [quality]  # central, and federated when both ran
    if not quality.startswith("fed_") and latest(rows, "fed_" + quality) is not None:
        shown.append("fed_" + quality)
    figure, (acc, loss, comm) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key in shown:
        evaluated = [r for r in rows if r.get(key) is not None]
        label = ("federated " if key.startswith("fed_") else "central ") + "evaluation"
        acc.plot([r["round"] for r in evaluated], [r[key] for r in evaluated], marker="o",
                 label=label)
        comm.plot([r["cumulative_bytes_up"] / 1e6 for r in evaluated],
                  [r[key] for r in evaluated], marker="o", label=label)
    for key in dict.fromkeys([loss_name, *(["fed_eval_loss"] if len(shown) > 1 else [])]):
        evaluated = [r for r in rows if r.get(key) is not None]
        loss.plot([r["round"] for r in evaluated], [r[key] for r in evaluated], marker="o",
                  label=key.replace("_", " "))
    trained = [r for r in rows if r.get("train_loss") is not None]
    loss.plot([r["round"] for r in trained], [r["train_loss"] for r in trained],
              marker="s", label="train (client mean)")
    line = chance(rows, quality)
    whose = " (central data)" if len(shown) > 1 else ""
    for axis in (acc, comm) if line is not None else ():
        axis.axhline(line, linestyle="--", color="grey", label=f"majority class{whose} {line:.3f}")
    ylabel = quality.removeprefix("fed_").replace("_", " ")
    acc.set(xlabel="round", ylabel=ylabel, title="evaluation")
    loss.set(xlabel="round", ylabel="loss", title="loss")
    comm.set(xlabel="cumulative upload (MB)", ylabel=ylabel, title="quality per communication")
    for axis in (acc, loss, comm):
        axis.grid(alpha=0.3)
        axis.legend()
    for axis in (acc, loss):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{rows[-1]['strategy']}: {len(rows) - 1} rounds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
