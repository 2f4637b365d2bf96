"""Sparse uploads against dense FedAvg: accuracy against cumulative upload bytes.

    python benchmarks/sparse_sweep.py [--densities 0.5,0.1,0.01] [--name sparse-sweep]
                                      [--baseline runs/<a fedavg run with the same training>]

Runs ``simulations/sparse.toml`` once per upload density, without and with error feedback,
plus dense FedAvg with the same training (or takes an existing such run, --baseline), into
runs/<name>/<variant>/, and writes runs/<name>/comparison.md and comparison.png.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from server.report import write_comparison
from variants import run_variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--densities", default="0.5,0.1,0.01")
    parser.add_argument("--name", default="sparse-sweep")
    parser.add_argument("--output", default="runs")
    parser.add_argument("--baseline", help="an existing dense FedAvg run folder to compare with")
    args = parser.parse_args()

    variants = [] if args.baseline else [("fedavg-dense", ["--strategy", "fedavg"])]
    for density in args.densities.split(","):
        variants.append((f"sparse-{density}", ["--upload-density", density]))
        variants.append((f"sparse-{density}-ef", ["--upload-density", density, "--error-feedback"]))
    run_dirs = [Path(args.baseline)] if args.baseline else []
    run_dirs += run_variants("simulations/sparse.toml", variants, args.name, args.output)
    print("\n" + write_comparison({d.name: {"": [d]} for d in run_dirs}, Path(args.output) / args.name))


if __name__ == "__main__":
    main()
