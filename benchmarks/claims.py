"""The paired differences behind docs/results.md's claims table, from the committed runs
under docs/results/ alone: for each comparison, the final accuracy (points) and eval loss
of arm A minus arm B in the same seed, their mean and 95 % confidence interval (Student's
t, n - 1 degrees of freedom: fedlora.comparison.Summary), the verdict the page's rules for
claims give, and each arm's whole-run traffic.

    python benchmarks/claims.py            # a markdown table of every comparison
    python benchmarks/claims.py --json     # the same figures as JSON

The margins were fixed before the claims were re-judged: +-2 points of accuracy, +-0.01
of eval loss (per answer token). Bytes in metrics.jsonl are all clients' totals, the
initialisation included; per client is that divided by the federation's num-clients.
The comparisons named "val:" are on the validation reviews (``--val-size``): they choose
Fed-SB's defaults. A comparison whose runs are not all committed yet (a study still
running) is listed as not run yet.
"""

from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedlora.comparison import Summary  # noqa: E402
from server.report import latest  # noqa: E402

RESULTS = ROOT / "docs" / "results"
ACCURACY_MARGIN = 2.0  # points
LOSS_MARGIN = 0.01  # eval loss per answer token
SEEDS = (0, 1, 2)
FIVE = (0, 1, 2, 3, 4)


def run_path(folder: str, seed: int) -> Path:
    return RESULTS / folder / f"seed{seed}"


def run(folder: str, seed: int, split: str = "eval") -> dict:
    """One run's final figures on ``split``: eval (the reported evaluation) or val (the
    validation reviews that choose settings, ``--val-size``)."""
    path = run_path(folder, seed)
    rows = [json.loads(line) for line in (path / "metrics.jsonl").open()]
    clients = tomllib.loads((path / "config.toml").read_text())["num-clients"]
    trained = [r for r in rows if r["round"] > 0]
    return {
        "path": str(path.relative_to(ROOT)),
        "round": rows[-1]["round"],
        "accuracy": latest(rows, f"{split}_accuracy"),
        "loss": latest(rows, f"{split}_loss"),
        "majority": latest(rows, f"{split}_majority_accuracy"),
        "up": rows[-1]["cumulative_bytes_up"],
        "down": rows[-1]["cumulative_bytes_down"],
        "init_up": rows[0]["cumulative_bytes_up"],
        "last_round_up": trained[-1]["bytes_up"],
        "last_round_clients": trained[-1]["clients"],
        "num_clients": clients,
        "dropped": sum(r.get("dropped") or 0 for r in rows),
    }


def verdict(summary: Summary, margin: float, words: tuple[str, str, str]) -> str:
    """The rule: lower / higher where the interval excludes zero; as good as where it
    lies inside +-margin; both where both hold; else inconclusive at n seeds."""
    low, high = summary.interval()
    inside = -margin <= low and high <= margin
    below, above, same = words
    if high < 0 or low > 0:
        side = below if high < 0 else above
        return f"{side}, by less than {margin:g} ({same})" if inside else side
    if inside:
        return same
    return f"inconclusive at {summary.n} seeds"


def compare(label: str, a: str, b: str | None, seeds: tuple[int, ...] = SEEDS,
            split: str = "eval") -> dict:
    """A minus B on ``split``, paired by seed; B None: A minus its own majority class."""
    arms_a = [run(a, s, split) for s in seeds]
    arms_b = [run(b, s, split) for s in seeds] if b else None
    if arms_b:
        for x, y in zip(arms_a, arms_b):
            assert x["majority"] == y["majority"], (x["path"], y["path"])  # same reviews
        acc = [100 * (x["accuracy"] - y["accuracy"]) for x, y in zip(arms_a, arms_b)]
        loss = [x["loss"] - y["loss"] for x, y in zip(arms_a, arms_b)]
    else:
        acc = [100 * (x["accuracy"] - x["majority"]) for x in arms_a]
        loss = None
    out = {"label": label, "a": a, "b": b or "majority class",
           "accuracy_points": {"per_seed": acc, **interval(Summary(acc))},
           "accuracy_verdict": verdict(Summary(acc), ACCURACY_MARGIN,
                                       ("lower", "higher", f"as accurate as (within ±{ACCURACY_MARGIN:g} points)"))}
    if loss:
        out["eval_loss"] = {"per_seed": loss, **interval(Summary(loss))}
        out["loss_verdict"] = verdict(Summary(loss), LOSS_MARGIN,
                                      ("lower", "higher", f"as low as (within ±{LOSS_MARGIN:g})"))
    for name, arms in (("A", arms_a), ("B", arms_b)):
        if arms:
            out[name] = {
                "accuracy": interval(Summary([x["accuracy"] for x in arms])),
                "loss": interval(Summary([x["loss"] for x in arms])),
                "accuracy_per_seed": [x["accuracy"] for x in arms],
                "num_clients": arms[0]["num_clients"],
                "whole_run_bytes_all_clients": Summary([x["up"] + x["down"] for x in arms]).mean,
                "whole_run_up_all_clients": Summary([x["up"] for x in arms]).mean,
                "whole_run_down_all_clients": Summary([x["down"] for x in arms]).mean,
                "whole_run_bytes_per_client": Summary([(x["up"] + x["down"]) / x["num_clients"]
                                                       for x in arms]).mean,
                "init_up_per_client": Summary([x["init_up"] / x["num_clients"] for x in arms]).mean,
                "last_round_up_per_client": Summary([x["last_round_up"] / x["last_round_clients"]
                                                     for x in arms]).mean,
                "dropped": sum(x["dropped"] for x in arms),
                "files": [x["path"] for x in arms],
            }
    return out


def interval(summary: Summary) -> dict:
    low, high = summary.interval()
    return {"mean": summary.mean, "std": summary.std, "low": low, "high": high}


TUNE = "tune-lr/{}/lr{}"
COMPARISONS = [
    # Rotten Tomatoes, 4 IID clients, q and v, 3 rounds of 10 steps, each at its chosen lr
    ("Fed-SB r32 - FedAvg r8, q/v", TUNE.format("fedsb", "0.001"), TUNE.format("fedavg", "0.003")),
    ("Fed-SB r32 random init - FedAvg r8, q/v", "tune-lr-fedsb-random/fedsb/lr0.01",
     TUNE.format("fedavg", "0.003")),
    ("Fed-SB r32 random init - gradient init, q/v", "tune-lr-fedsb-random/fedsb/lr0.01",
     TUNE.format("fedsb", "0.001")),
    ("FFA r8 - FedAvg r8, q/v", TUNE.format("ffa", "0.01"), TUNE.format("fedavg", "0.003")),
    ("FFA r8 at 3e-3 - FedAvg r8, q/v", TUNE.format("ffa", "0.003"), TUNE.format("fedavg", "0.003")),
    ("FedEx r8 - HetLoRA r8, q/v", TUNE.format("fedex", "0.003"), TUNE.format("hetlora", "0.003")),
    ("FedEx r8 - FedAvg r8, q/v", TUNE.format("fedex", "0.003"), TUNE.format("fedavg", "0.003")),
    ("sparse 0.1 - FedAvg, 3 rounds", TUNE.format("sparse", "0.003"), TUNE.format("fedavg", "0.003")),
    # FedSVD and RoLoRA (issue 34): one study at one commit, each at its tuned lr
    *[(f"{m} r8 - {o} r8, q/v", f"newer-methods/{m}", f"newer-methods/{o}")
      for m in ("fedsvd", "rolora") for o in ("fedavg", "ffa")],
    # issue 33's re-runs at 5 seeds, one commit each (docs/results.md, "Claims re-run")
    ("FFA r8 - FedAvg r8, q/v, 5 seeds", "claims-qv/ffa", "claims-qv/fedavg", FIVE),
    *[(f"{p}: Fed-SB r{r} - FedAvg r8, all linear, 5 seeds", f"claims-frontier-{p}/fedsb/rank{r}",
       f"claims-frontier-{p}/fedavg", FIVE) for p in ("iid", "dirichlet") for r in (16, 32, 64)],
    *[(f"sparse {v} + EF - dense, 15 rounds, 5 seeds", f"claims-sparse-15-{v}-ef/sparse",
       "claims-sparse-15-dense/fedavg", FIVE) for v in ("0.1", "0.05")],
    # every linear layer
    *[(f"{p}: Fed-SB r{r} - FedAvg r8, all linear", f"frontier-{p}/fedsb/rank{r}", f"frontier-{p}/fedavg")
      for p in ("iid", "dirichlet") for r in (16, 32, 64)],
    *[(f"{p}: FFA r8 - FedAvg r8, all linear", f"frontier-{p}/ffa", f"frontier-{p}/fedavg")
      for p in ("iid", "dirichlet")],
    # 8 clients of ranks 16, 16, 8, 8, 4, 4, 2, 2
    ("FLoRA alpha/r_k - FedAvg r2, 8 clients", "hetero-ranks/flora", "hetero-ranks/fedavg"),
    ("FLoRA uniform - FedAvg r2, 8 clients", "hetero-ranks-uniform/flora", "hetero-ranks/fedavg"),
    # 15 rounds of 4 steps
    *[(f"sparse {v} - dense, 15 rounds", f"sparse-15/sparse-{v}/sparse", "sparse-15/fedavg-dense/fedavg")
      for v in ("0.1", "0.1-ef", "0.05", "0.05-ef")],
    # DP-SGD, 4 clients
    *[(f"DP-SGD eps {e}: {s} - {s} no DP", f"dp-sgd/{s}-sample-eps{e}/{s}", f"dp-sgd/{s}-no-dp/{s}")
      for e in (1, 3, 8) for s in ("fedavg", "ffa", "fedsb")],
    *[(f"DP-SGD eps {e}: {s} - majority", f"dp-sgd/{s}-sample-eps{e}/{s}", None)
      for e in (1, 3, 8) for s in ("fedavg", "ffa", "fedsb")],
    *[(f"DP-SGD eps {e}: fedsb - {o}", f"dp-sgd/fedsb-{k}/fedsb", f"dp-sgd/{o}-{k}/{o}")
      for e, k in (("none", "no-dp"), (1, "sample-eps1"), (3, "sample-eps3"), (8, "sample-eps8"))
      for o in ("ffa", "fedavg")],
    # user-level DP, 1,000 clients
    *[(f"1,000 clients: user eps {e} - no DP", f"dp-federation/fedsb-user-eps{e}/fedsb",
       "dp-federation/fedsb-no-dp/fedsb") for e in (8, 3)],
    *[(f"1,000 clients: {k} - majority", f"dp-federation/fedsb-{k}/fedsb", None)
      for k in ("no-dp", "user-eps8", "user-eps3")],
]

# Fed-SB's defaults, chosen on the validation reviews (docs/results.md, "How Fed-SB's
# defaults are chosen"): its rank among 16, 32, 64, and its initialisation codec
CHOICES = [
    *[(f"val: Fed-SB r{r} - r32, all linear, IID, 5 seeds", f"claims-frontier-iid/fedsb/rank{r}",
       "claims-frontier-iid/fedsb/rank32", FIVE, "val") for r in (16, 64)],
    ("val: Fed-SB r16 - r64, all linear, IID, 5 seeds", "claims-frontier-iid/fedsb/rank16",
     "claims-frontier-iid/fedsb/rank64", FIVE, "val"),
    ("val: Fed-SB fp32 init - sign init, r32, all linear, IID", "fedsb-init-val/fedsb/rank32",
     "claims-frontier-iid/fedsb/rank32", SEEDS, "val"),
]


def missing(label: str, a: str, b: str | None, seeds: tuple[int, ...] = SEEDS,
            split: str = "eval") -> list[str]:
    """The run folders :func:`compare` (same arguments) needs that are not there (yet: a
    study still running)."""
    return [f"{arm}/seed{s}" for arm in (a, b) if arm for s in seeds
            if not (run_path(arm, s) / "metrics.jsonl").is_file()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of markdown")
    args = parser.parse_args()
    gaps = [(c, missing(*c)) for c in COMPARISONS + CHOICES]
    pending = [(c[0], files) for c, files in gaps if files]
    results = [compare(*c) for c, files in gaps if not files]
    if args.json:
        print(json.dumps({"comparisons": results, "pending": dict(pending)}, indent=1))
        return
    print("| A - B | accuracy, points: by seed, mean [95 % CI] | verdict | eval loss: "
          "mean [95 % CI] | verdict | whole-run bytes per client, A / B |")
    print("|---|---|---|---|---|---|")
    for r in results:
        a = r["accuracy_points"]
        per_seed = " / ".join(f"{v:+.1f}" for v in a["per_seed"])
        loss = (f"{r['eval_loss']['mean']:+.3f} [{r['eval_loss']['low']:+.3f}, "
                f"{r['eval_loss']['high']:+.3f}]") if "eval_loss" in r else "-"
        traffic = f"{r['A']['whole_run_bytes_per_client']:,.0f}" + (
            f" / {r['B']['whole_run_bytes_per_client']:,.0f}" if "B" in r else "")
        print(f"| {r['label']} | {per_seed}: {a['mean']:+.1f} [{a['low']:+.1f}, {a['high']:+.1f}] "
              f"| {r['accuracy_verdict']} | {loss} | {r.get('loss_verdict', '-')} | {traffic} |")
    for label, files in pending:
        print(f"| {label} | not run yet: {len(files)} runs missing, e.g. {files[0]} | | | | |")


if __name__ == "__main__":
    main()
