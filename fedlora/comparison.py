"""The comparison of a study's runs: comparison.md and comparison.png, with each figure's
mean over seeds, its standard deviation and the 95 % confidence interval of the mean
(Student's t), and for a learning-rate grid the value chosen on the validation split."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedlora.errors import FedLoraError
from fedlora.evaluate import headline_keys, headline_metric
from server.outputs import read_rows
from server.report import bounds, chance, latest, loss_key, quality_key  # and the Agg backend

import matplotlib.pyplot as plt  # noqa: E402  (after server.report chose the file backend)
from matplotlib.ticker import MaxNLocator  # noqa: E402


@dataclass
class Summary:
    """Mean, standard deviation (n - 1) and the half-width of the 95 % confidence interval
    (Student's t) of one figure over seeds."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def std(self) -> float:
        return float(np.std(self.values, ddof=1)) if self.n > 1 else math.nan

    @property
    def half_width(self) -> float:
        if self.n < 2:
            return math.nan
        from scipy.stats import t

        return float(t.ppf(0.975, self.n - 1) * self.std / math.sqrt(self.n))

    def interval(self, low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
        """The 95 % confidence interval of the mean, cut to [low, high], the figure's own
        range (accuracy's [0, 1]): the mean lies there, so the cut interval covers it as
        often as the whole one."""
        return max(low, self.mean - self.half_width), min(high, self.mean + self.half_width)


def selection_key(rows: list[dict]) -> tuple[str, bool] | None:
    """The validation figure a grid value is chosen on, and whether higher is better."""
    for key, metric in headline_keys(("val_",)):
        if latest(rows, key) is not None:
            return key, metric.higher_is_better
    return None


def choose(groups: dict[str, list[list[dict]]]) -> tuple[str, str | None]:
    """The grid value with the best mean final validation figure over its seeds (the first
    in grid order on a tie), and that figure's name; with one value, that value."""
    values = list(groups)
    if len(values) == 1:
        return values[0], None
    key, higher = selection_key(groups[values[0]][0]) or (None, True)
    if key is None:
        raise FedLoraError(f"the runs of {values[0]} have no validation figures to choose on")
    means = {v: Summary([latest(rows, key) for rows in groups[v]]).mean for v in values}
    best = max(values, key=lambda v: means[v] if higher else -means[v])
    return best, key


def write_comparison(groups: dict[str, dict[str, list[Path]]], folder: Path) -> str:
    """comparison.md and comparison.png of runs grouped by row, learning rate and seed
    (``groups[row][value]`` lists the run folders of that value's seeds; a row is a
    strategy, or a strategy at one rank of a rank grid); returns the markdown.

    Each row is shown at one value: the one with the best mean final validation figure
    over its seeds (:func:`choose`). Figures are means over seeds with their
    standard deviation and 95 % confidence interval (Student's t).
    """
    runs = {label: {value: [read_rows(Path(d)) for d in dirs] for value, dirs in values.items()}
            for label, values in groups.items()}
    first = next(iter(next(iter(runs.values())).values()))[0]
    quality, loss_name = quality_key(first), loss_key(first)
    metric = headline_metric(quality)  # its figure beside it (macro-F1) and chance line
    beside = quality.replace(metric.name, metric.beside) if metric and metric.beside else None
    majority = quality.replace(metric.name, metric.chance) if metric and metric.chance else None
    chosen = {label: choose(values) for label, values in runs.items()}
    gridded = any(len(values) > 1 or next(iter(values)) for values in runs.values())
    private = any("epsilon" in rows[-1] for values in runs.values()
                  for seeds in values.values() for rows in seeds)
    seeds = max(len(rows) for values in runs.values() for rows in values.values())

    def summary(seed_rows: list[list[dict]], key: str) -> Summary | None:
        values = [latest(rows, key) for rows in seed_rows]
        return Summary(values) if values and None not in values else None

    def cell(figure: Summary | None, spec: str) -> str:
        if figure is None:
            return "-"
        text = format(figure.mean, spec)
        return text if figure.n == 1 or figure.std == 0 else f"{text} ± {format(figure.std, spec)}"

    def interval(figure: Summary | None) -> str:
        if figure is None or figure.n < 2:
            return "-"
        low, high = figure.interval(*bounds(quality))
        return f"[{low:.3f}, {high:.3f}]"

    lines = [
        "| strategy |" + (" value |" if gridded else "") + f" seeds | rounds | final {quality} "
        f"| 95 % CI |" + (f" final {beside} |" if beside else "")
        + (" majority class |" if majority else "")
        + f" final {loss_name} | upload bytes | download bytes | seconds |"
        + (" epsilon (delta) |" if private else ""),
        "|---|" + ("---|" if gridded else "") + "---|---|---|---|"
        + "---|" * (bool(beside) + bool(majority))
        + "---|---|---|---|" + ("---|" if private else ""),
    ]
    for label, values in runs.items():
        value, _ = chosen[label]
        seed_rows = values[value]
        last = seed_rows[0][-1]
        accuracy = summary(seed_rows, quality)
        lines.append(
            f"| {label} |" + (f" {value or '-'} |" if gridded else "")
            + f" {len(seed_rows)} | {last['round']} | {cell(accuracy, '.3f')} | {interval(accuracy)} "
            + (f"| {cell(summary(seed_rows, beside), '.3f')} " if beside else "")
            + (f"| {cell(summary(seed_rows, majority), '.3f')} " if majority else "")
            + f"| {cell(summary(seed_rows, loss_name), '.4f')} "
            f"| {cell(summary(seed_rows, 'cumulative_bytes_up'), ',.0f')} "
            f"| {cell(summary(seed_rows, 'cumulative_bytes_down'), ',.0f')} "
            f"| {cell(Summary([sum(r['seconds'] for r in rows) for rows in seed_rows]), '.0f')} |"
            + (f" {cell(summary(seed_rows, 'epsilon'), '.3g')} ({last['delta']:.3g}) |"
               if "epsilon" in last else " no DP |" if private else "")
        )
    total = sum(r["seconds"] for values in runs.values() for seed_rows in values.values()
                for rows in seed_rows for r in rows)
    notes = ["", f"Final: the last evaluated round. With several seeds (up to {seeds} here), "
             "mean ± standard deviation over the seeds, and the 95 % confidence interval of the "
             "mean (Student's t, cut to the figure's range); bytes are all clients' totals, "
             "the initialisation included. "
             f"The {sum(len(s) for v in runs.values() for s in v.values())} runs took "
             + (f"{total / 3600:.1f} hours" if total >= 3600 else f"{total / 60:.1f} minutes")
             + " in all (the sum of their seconds)."]
    if gridded:
        notes[-1] += (" Each strategy's value was chosen on the validation split (--val-size), "
                      "which is disjoint from the evaluation split reported here.")
        notes += ["", "Every grid value (the final round, over seeds):", "",
                  f"| strategy | value | seeds | chosen on | final validation | final {quality} | chosen |",
                  "|---|---|---|---|---|---|---|"]
        for label, values in runs.items():
            best, key = chosen[label]
            for value, seed_rows in values.items():
                notes.append(
                    f"| {label} | {value or '-'} | {len(seed_rows)} | {key or '-'} "
                    f"| {cell(summary(seed_rows, key), '.3f') if key else '-'} "
                    f"| {cell(summary(seed_rows, quality), '.3f')} | {'yes' if value == best else ''} |")
    short = [" ".join(filter(None, [label, value, f"({len(seed_rows)} seeds)"]))
             for label, values in runs.items() for value, seed_rows in values.items()
             if any(r.get("dropped") for rows in seed_rows for r in rows)]
    if short:
        notes += ["", "Some rounds of these had fewer clients than they sampled (a reply missing, "
                  "failed or refused; the 'dropped' of metrics.jsonl): " + "; ".join(short) + "."]
    table = "\n".join(lines + notes)
    (folder / "comparison.md").write_text(table + "\n")
    plot_comparison({label: values[chosen[label][0]] for label, values in runs.items()},
                    quality, chance(first, quality), folder / "comparison.png")
    return table


def plot_comparison(runs: dict[str, list[list[dict]]], quality: str, line: float | None,
                    path: Path) -> None:
    """Mean quality against rounds and against cumulative upload, with the 95 % confidence
    band over seeds (a line alone with one seed), one curve per strategy."""
    figure, (by_round, by_upload) = plt.subplots(1, 2, figsize=(13, 4.5))
    for label, seed_rows in runs.items():
        # The rounds every seed evaluated (a DP budget may stop one seed's run earlier).
        rounds = sorted(set.intersection(*({r["round"] for r in rows if r.get(quality) is not None}
                                           for rows in seed_rows)))
        figures = [Summary([next(r[quality] for r in rows if r["round"] == t) for rows in seed_rows])
                   for t in rounds]
        upload = [float(np.mean([next(r["cumulative_bytes_up"] for r in rows if r["round"] == t)
                                 for rows in seed_rows])) for t in rounds]
        mean = np.array([f.mean for f in figures])
        low, high = np.array([f.interval(*bounds(quality)) for f in figures]).reshape(-1, 2).T
        name = label if len(seed_rows) == 1 else f"{label} ({len(seed_rows)} seeds)"
        for axis, x in ((by_round, rounds), (by_upload, upload)):
            keep = [i for i, v in enumerate(x) if axis is by_round or v > 0]  # log axis
            xs = [x[i] for i in keep]
            drawn, = axis.plot(xs, mean[keep], marker="o", label=name)
            if len(seed_rows) > 1:
                axis.fill_between(xs, low[keep], high[keep],
                                  color=drawn.get_color(), alpha=0.2)
    ylabel = quality.replace("_", " ")
    for axis in (by_round, by_upload):
        if line is not None:
            axis.axhline(line, linestyle="--", color="grey", label=f"majority class {line:.3f}")
        axis.grid(alpha=0.3, which="both")
        axis.legend()
    by_round.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_round.set(xlabel="round", ylabel=ylabel, title="mean over seeds, 95 % confidence band")
    by_upload.set_xscale("log")
    by_upload.set(xlabel="cumulative upload bytes (all clients, log scale)", ylabel=ylabel,
                  title="quality per communication")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
