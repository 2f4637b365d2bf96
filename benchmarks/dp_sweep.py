"""Accuracy against epsilon for FedAvg and Fed-SB, with user-level DP or DP-SGD.

    python benchmarks/dp_sweep.py [--level user|sample] [--epsilons 1,3,8] [--name dp-sweep]
                                  [--seeds 0,1,2] [--output runs] [simulate's flags]

Runs ``simulations/dp.toml`` for each strategy without DP and at each epsilon E: with
``--level user`` (default) ``--dp user --dp-target-epsilon E``, plus FedAvg with DP-SGD at
the largest epsilon; with ``--level sample``, DP-SGD (``--dp sample --dp-clip 1``) at
every E, for both strategies (the Fed-SB paper's private comparison). Into
<output>/<name>/<variant>/; writes <output>/<name>/comparison.md (with each run's final
epsilon) and prints DP-SGD's client seconds per local step against FedAvg's without DP.
Any other flag is simulate's and applies to every variant. Issue 14's DP-SGD study (docs/results.md, "DP-SGD at epsilon 1, 3 and 8"; about 2 hours):

    python benchmarks/dp_sweep.py --level sample --seeds 0,1,2 --name dp-sgd --output docs/results
"""

from __future__ import annotations

import argparse
import tomllib
from pathlib import Path

from fedlora.study import read_rows
from server.report import write_comparison
from variants import run_variants


def seconds_per_step(run_dir: Path) -> float:
    """Clients' training seconds per local step, over all rounds and clients."""
    config = tomllib.loads((run_dir / "config.toml").read_text())
    rows = read_rows(run_dir)[1:]
    steps = sum(r["clients"] for r in rows) * config["local-steps"]
    return sum(r["client_train_seconds"] for r in rows) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=("user", "sample"), default="user")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--name", default="dp-sweep")
    parser.add_argument("--output", default="runs")
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2: each variant once per seed")
    args, common = parser.parse_known_args()  # the rest is simulate's, for every variant

    epsilons = args.epsilons.split(",")
    dp_sgd = ["--dp", "sample", "--dp-clip", "1.0"]  # C bounds one example's gradient
    variants = []
    for strategy in ("fedavg", "fedsb"):
        variants.append((f"{strategy}-no-dp", ["--strategy", strategy, *common]))
        for epsilon in epsilons:
            mechanism = dp_sgd if args.level == "sample" else ["--dp", "user"]
            variants.append((f"{strategy}-{args.level}-eps{epsilon}", [
                "--strategy", strategy, *mechanism, "--dp-target-epsilon", epsilon, *common]))
    if args.level == "user":
        variants.append((f"fedavg-sample-eps{epsilons[-1]}", [
            "--strategy", "fedavg", *dp_sgd, "--dp-target-epsilon", epsilons[-1], *common]))
    folders = run_variants("simulations/dp.toml", variants, args.name, args.output, args.seeds)
    print("\n" + write_comparison({v: {"": dirs} for v, dirs in folders.items()},
                                   Path(args.output) / args.name))
    private = seconds_per_step(folders[f"fedavg-sample-eps{epsilons[-1]}"][0])
    plain = seconds_per_step(folders["fedavg-no-dp"][0])
    print(f"\nclient seconds per local step: DP-SGD {private:.3f}, no DP {plain:.3f}, "
          f"ratio {private / plain:.2f}")


if __name__ == "__main__":
    main()
