"""report.png: a run's accuracy and loss against rounds and against upload bytes."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def plot_report(rows: list[dict], path: Path) -> None:
    """Three panels: eval accuracy per round, losses per round, accuracy per upload byte."""
    rounds = [r["round"] for r in rows]
    figure, (acc, loss, comm) = plt.subplots(1, 3, figsize=(15, 4.2))
    has_accuracy = any(r.get("eval_accuracy") is not None for r in rows)
    quality_key = "eval_accuracy" if has_accuracy else "eval_loss"
    acc.plot(rounds, [r.get(quality_key) for r in rows], marker="o")
    acc.set(xlabel="round", ylabel=quality_key.replace("_", " "), title="central evaluation")
    loss.plot(rounds, [r["eval_loss"] for r in rows], marker="o", label="eval")
    trained = [r for r in rows if r.get("train_loss") is not None]
    loss.plot([r["round"] for r in trained], [r["train_loss"] for r in trained],
              marker="s", label="train (client mean)")
    loss.set(xlabel="round", ylabel="loss", title="loss")
    loss.legend()
    comm.plot([r["cumulative_bytes_up"] / 1e6 for r in rows],
              [r.get(quality_key) for r in rows], marker="o")
    comm.set(xlabel="cumulative upload (MB)", ylabel=quality_key.replace("_", " "),
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
    quality = "eval_accuracy" if all("eval_accuracy" in rows[-1] for rows in runs.values()) else "eval_loss"
    private = any("epsilon" in rows[-1] for rows in runs.values())
    lines = [
        f"| strategy | rounds | round-0 {quality} | final {quality} | final eval_loss "
        "| upload bytes | download bytes | seconds |" + (" epsilon (delta) |" if private else ""),
        "|---|---|---|---|---|---|---|---|" + ("---|" if private else ""),
    ]
    for name, rows in runs.items():
        last = rows[-1]
        lines.append(
            f"| {name} | {last['round']} | {rows[0][quality]:.3f} | {last[quality]:.3f} "
            f"| {last['eval_loss']:.4f} | {last['cumulative_bytes_up']:,} "
            f"| {last['cumulative_bytes_down']:,} | {sum(r['seconds'] for r in rows):.0f} |"
            + (f" {last['epsilon']:.3g} ({last['delta']:.3g}) |" if "epsilon" in last
               else " no DP |" if private else "")
        )
    table = "\n".join(lines)
    (folder / "comparison.md").write_text(table + "\n")

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, rows in runs.items():
        trained = rows[1:]  # round 0 has uploaded nothing (or only an initialisation)
        axis.plot([r["cumulative_bytes_up"] for r in trained], [r[quality] for r in trained],
                  marker="o", label=name)
    axis.set_xscale("log")
    axis.set(xlabel="cumulative upload bytes (all clients, log scale)",
             ylabel=quality.replace("_", " "), title="quality per communication")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    figure.tight_layout()
    figure.savefig(folder / "comparison.png", dpi=100)
    plt.close(figure)
    return table
