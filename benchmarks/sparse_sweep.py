"""Sparse uploads against dense FedAvg: accuracy against cumulative upload bytes.

    python benchmarks/sparse_sweep.py [--densities 0.5,0.1,0.01] [--name sparse-sweep]
                                      [--baseline runs/<a fedavg run with the same training>]
                                      [--seeds 0,1,2] [simulate's flags, e.g. --rounds 15]

Runs ``simulations/sparse.toml`` once per upload density, without and with error feedback,
plus dense FedAvg with the same training (or takes an existing such run, --baseline), into
runs/<name>/<variant>/, and writes runs/<name>/comparison.md and comparison.png. Any
other flag is simulate's and applies to every variant. The 15-round study of issue 14
(docs/results.md, "Sparse uploads over 15 rounds"; about 8.5 minutes a run, 15 runs, on
2 cores; the same command resumes):

    python benchmarks/sparse_sweep.py --densities 0.1,0.05 --seeds 0,1,2 --name sparse-15 \
        --output docs/results --rounds 15 --local-steps 4 --eval-every 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedlora.comparison import write_comparison
from variants import run_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.5,0.1,0.01")
    parser.add_argument("--name", default="sparse-sweep")
    parser.add_argument("--output", default="runs")
    parser.add_argument("--baseline", help="an existing dense FedAvg run folder to compare with")
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2: each variant once per seed")
    args, common = parser.parse_known_args()  # the rest is simulate's, for every variant

    variants = [] if args.baseline else [("fedavg-dense", ["--strategy", "fedavg", *common])]
    for density in args.densities.split(","):
        variants.append((f"sparse-{density}", ["--upload-density", density, *common]))
        variants.append((f"sparse-{density}-ef", ["--upload-density", density, "--error-feedback",
                                                  *common]))
    folders = {"fedavg-dense": [Path(args.baseline)]} if args.baseline else {}
    folders |= run_variants("simulations/sparse.toml", variants, args.name, args.output, args.seeds)
    print("\n" + write_comparison({v: {"": dirs} for v, dirs in folders.items()},
                                   Path(args.output) / args.name))


if __name__ == "__main__":
    main()
