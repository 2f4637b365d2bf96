"""Accuracy against epsilon, with user-level DP or DP-SGD, against the same runs without DP.

    python benchmarks/dp_sweep.py [--level user|sample] [--epsilons 1,3,8]
                                  [--strategies fedavg,ffa,fedsb] [--config simulations/dp.toml]
                                  [--seeds 0,1,2] [--name dp-sweep] [--output runs]
                                  [simulate's flags]

Runs ``--config`` for each strategy without DP and at each epsilon E: with ``--level user``
(default) ``--dp user --dp-target-epsilon E``; with ``--level sample`` DP-SGD,
``--dp sample --dp-clip 1 --dp-target-epsilon E``. Into <output>/<name>/<variant>/;
writes <output>/<name>/comparison.md, with each run's final epsilon and delta. Any other
flag is simulate's and applies to every variant. (What DP-SGD costs per step:
benchmarks/dpsgd_cost.py.) Issue 14's DP-SGD study (docs/results.md): 36 runs of 2-7
minutes on 2 cores (by machine), 2.1 hours in all; the same command resumes, and
``--seeds 0``, then ``0,1``, then ``0,1,2`` finishes one seed before the next starts:

    python benchmarks/dp_sweep.py --level sample --seeds 0,1,2 --name dp-sgd --output docs/results
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.comparison import write_comparison
from variants import run_variants

MECHANISM = {"user": ["--dp", "user"],
             "sample": ["--dp", "sample", "--dp-clip", "1.0"]}  # C bounds one example's gradient


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", choices=tuple(MECHANISM), default="user")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--strategies", default="fedavg,ffa,fedsb")  # the Fed-SB paper's private comparison
    parser.add_argument("--config", default="simulations/dp.toml")
    parser.add_argument("--name", default="dp-sweep")
    parser.add_argument("--output", default="runs")
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2: each variant once per seed")
    args, common = parser.parse_known_args()  # the rest is simulate's, for every variant

    variants = []
    for strategy in args.strategies.split(","):
        variants.append((f"{strategy}-no-dp", ["--strategy", strategy, *common]))
        for epsilon in args.epsilons.split(","):
            variants.append((f"{strategy}-{args.level}-eps{epsilon}", [
                "--strategy", strategy, *MECHANISM[args.level], "--dp-target-epsilon", epsilon,
                *common]))
    folders = run_variants(args.config, variants, args.name, args.output, args.seeds)
    print("\n" + write_comparison({v: {"": dirs} for v, dirs in folders.items()},
                                   Path(args.output) / args.name))


if __name__ == "__main__":
    main()
