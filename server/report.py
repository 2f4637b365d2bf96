"""report.png: a run's accuracy and loss against rounds and against upload bytes."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


QUALITY_KEYS = ("eval_accuracy", "fed_eval_accuracy", "eval_exact_match",
                "fed_eval_exact_match", "eval_loss", "fed_eval_loss")


def quality_key(rows: list[dict]) -> str:
    """The headline metric of a run: accuracy (central, else federated), else exact match,
    else the evaluation loss. The last row is always evaluated."""
    return next(k for k in QUALITY_KEYS if rows[-1].get(k) is not None)


def loss_key(rows: list[dict]) -> str:
    return "eval_loss" if rows[-1].get("eval_loss") is not None else "fed_eval_loss"


def chance(rows: list[dict], quality: str) -> float | None:
    """The accuracy of always answering the evaluation data's most common label."""
    return rows[-1].get(quality.replace("accuracy", "majority_accuracy")) if "accuracy" in quality else None


def plot_report(rows: list[dict], path: Path) -> None:
    """Three panels: quality per round, losses per round, quality per upload byte; a
    dashed line marks the majority-class accuracy."""
    quality, loss_name = quality_key(rows), loss_key(rows)
    evaluated = [r for r in rows if r.get(quality) is not None]
    figure, (acc, loss, comm) = plt.subplots(1, 3, figsize=(15, 4.2))
    where = "federated" if quality.startswith("fed_") else "central"
    acc.plot([r["round"] for r in evaluated], [r[quality] for r in evaluated], marker="o")
    acc.set(xlabel="round", ylabel=quality.replace("_", " "), title=f"{where} evaluation")
    line = chance(rows, quality)
    for axis in (acc, comm) if line is not None else ():
        axis.axhline(line, linestyle="--", color="grey", label=f"majority class {line:.3f}")
        axis.legend()
    loss.plot([r["round"] for r in evaluated], [r[loss_name] for r in evaluated], marker="o",
              label=loss_name.replace("_", " "))
    trained = [r for r in rows if r.get("train_loss") is not None]
    loss.plot([r["round"] for r in trained], [r["train_loss"] for r in trained],
              marker="s", label="train (client mean)")
    loss.set(xlabel="round", ylabel="loss", title="loss")
    loss.legend()
    comm.plot([r["cumulative_bytes_up"] / 1e6 for r in evaluated],
              [r[quality] for r in evaluated], marker="o")
    comm.set(xlabel="cumulative upload (MB)", ylabel=quality.replace("_", " "),
             title="quality per communication")
    for axis in (acc, loss, comm):
        axis.grid(alpha=0.3)
    for axis in (acc, loss):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    figure.suptitle(f"{rows[-1]['strategy']}: {len(rows) - 1} rounds")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_comparison(run_dirs: list[Path], folder: Path) -> str:
    """comparison.md (one row per run) and comparison.png (accuracy against cumulative
    upload bytes) in ``folder``; returns the table."""
    runs = {Path(d).name: [json.loads(line) for line in (Path(d) / "metrics.jsonl").open()]
            for d in run_dirs}
    first = next(iter(runs.values()))
    quality, loss_name = quality_key(first), loss_key(first)
    labelled = "accuracy" in quality  # then macro-F1 and the majority-class line too
    f1 = quality.replace("accuracy", "macro_f1")
    private = any("epsilon" in rows[-1] for rows in runs.values())
    lines = [
        f"| strategy | rounds | round-0 {quality} | final {quality} |"
        + (f" final {f1} | majority class |" if labelled else "") + f" final {loss_name} "
        "| upload bytes | download bytes | seconds |" + (" epsilon (delta) |" if private else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|---|" if labelled else "")
        + ("---|" if private else ""),
    ]
    for name, rows in runs.items():
        last = rows[-1]
        lines.append(
            f"| {name} | {last['round']} | {rows[0][quality]:.3f} | {last[quality]:.3f} "
            + (f"| {last[f1]:.3f} | {chance(rows, quality):.3f} " if labelled else "")
            + f"| {last[loss_name]:.4f} | {last['cumulative_bytes_up']:,} "
            f"| {last['cumulative_bytes_down']:,} | {sum(r['seconds'] for r in rows):.0f} |"
            + (f" {last['epsilon']:.3g} ({last['delta']:.3g}) |" if "epsilon" in last
               else " no DP |" if private else "")
        )
    table = "\n".join(lines)
    (folder / "comparison.md").write_text(table + "\n")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        # round 0 has uploaded nothing (or only an initialisation)
        trained = [r for r in rows[1:] if r.get(quality) is not None]
        axis.plot([r["cumulative_bytes_up"] for r in trained], [r[quality] for r in trained],
                  marker="o", label=name)
    line = chance(first, quality)
    if line is not None:
        axis.axhline(line, linestyle="--", color="grey", label=f"majority class {line:.3f}")
    axis.set_xscale("log")
    axis.set(xlabel="cumulative upload bytes (all clients, log scale)",
             ylabel=quality.replace("_", " "), title="quality per communication")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "comparison.png", dpi=100)
    plt.close(figure)
    return table
