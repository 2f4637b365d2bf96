"""Accuracy against epsilon with user-level DP, for FedAvg and Fed-SB, and one DP-SGD run.

    python benchmarks/dp_sweep.py [--epsilons 1,3,8] [--name dp-sweep] [--seeds 0,1,2]

Runs ``simulations/dp.toml`` for each strategy without DP and with ``--dp user
--dp-target-epsilon E``, plus FedAvg with DP-SGD (``--dp sample``) at the largest epsilon,
into runs/<name>/<variant>/. Writes runs/<name>/comparison.md (with each run's final
epsilon) and prints DP-SGD's client seconds per local step against FedAvg's without DP.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path

from server.report import write_comparison
from variants import run_variants


def seconds_per_step(run_dir: Path) -> float:
    """Clients' training seconds per local step, over all rounds and clients."""
    config = tomllib.loads((run_dir / "config.toml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()][1:]
    steps = sum(r["clients"] for r in rows) * config["local-steps"]
    return sum(r["client_train_seconds"] for r in rows) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--name", default="dp-sweep")
    parser.add_argument("--output", default="runs")
    parser.add_argument("--seeds", default="", help="e.g. 0,1,2: each variant once per seed")
    args = parser.parse_args()

    epsilons = args.epsilons.split(",")
    variants = []
    for strategy in ("fedavg", "fedsb"):
        variants.append((f"{strategy}-no-dp", ["--strategy", strategy]))
        for epsilon in epsilons:
            variants.append((f"{strategy}-user-eps{epsilon}", [
                "--strategy", strategy, "--dp", "user", "--dp-target-epsilon", epsilon]))
    variants.append((f"fedavg-dpsgd-eps{epsilons[-1]}", [
        "--strategy", "fedavg", "--dp", "sample", "--dp-clip", "1.0",
        "--dp-target-epsilon", epsilons[-1]]))
    folders = run_variants("simulations/dp.toml", variants, args.name, args.output, args.seeds)
    print("\n" + write_comparison({v: {"": dirs} for v, dirs in folders.items()},
                                   Path(args.output) / args.name))
    first, *_, last = folders.values()
    private, plain = seconds_per_step(last[0]), seconds_per_step(first[0])
    print(f"\nclient seconds per local step: DP-SGD {private:.3f}, no DP {plain:.3f}, "
          f"ratio {private / plain:.2f}")


if __name__ == "__main__":
    main()
