"""Run ``python -m fedlora.simulate`` and measure it: wall time, peak memory, accuracy per
round, and the share of each round's wall time spent outside local training.

    python benchmarks/measure_run.py [simulate flags...]

Peak memory is the largest sum of resident memory (RSS) over the whole process tree (the
simulate process, Ray's daemons and the client actors), sampled every 0.2 s. RSS counts a
page shared by several processes (torch's libraries, mostly) once in each; the
proportional set size (PSS) splits it among them, so its sum is what the tree takes from
the machine. Both are printed, and each process's PSS at the PSS peak. The
framework overhead of a round is the round's wall time minus central evaluation minus the
clients' training time divided by the number of clients that train in parallel (the CPU
cores over ``--client-cpus`` in simulation), as a share of the round's wall time: what Flower, Ray, model
loading, data loading and (de)serialisation cost on top of the training itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import psutil

from server.outputs import read_rows


def tree_memory(process: psutil.Process) -> tuple[int, int, list[tuple[str, int]]]:
    """Resident bytes (RSS, PSS) of a process and all its descendants, summed, and each
    process's (name, PSS)."""
    rss = pss = 0
    each = []
    for p in [process, *process.children(recursive=True)]:
        try:
            memory, name = p.memory_full_info(), p.name()
        except psutil.Error:
            continue
        rss, pss = rss + memory.rss, pss + memory.pss
        each.append((name, memory.pss))
    return rss, pss, each


def main(flags: list[str]) -> None:
    name = f"measure-{int(time.time())}"
    command = [sys.executable, "-m", "fedlora.simulate", *flags, "--output", "runs",
               "--name", name]
    print("$", " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    child = subprocess.Popen(command)
    watched = psutil.Process(child.pid)
    peak = peak_pss = 0
    at_peak: list[tuple[str, int]] = []
    while child.poll() is None:
        rss, pss, each = tree_memory(watched)
        peak = max(peak, rss)
        if pss > peak_pss:
            peak_pss, at_peak = pss, each
        time.sleep(0.2)
    wall = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(child.returncode)

    rows = read_rows(Path("runs") / name)
    client_cpus = tomllib.loads((Path("runs") / name / "config.toml").read_text())["client-cpus"]
    parallel = max(1, min((os.cpu_count() or 1) // client_cpus, rows[1]["clients"]))
    print(f"\nwall time {wall:.0f} s, peak memory {peak / 2**30:.2f} GiB RSS, "
          f"{peak_pss / 2**30:.2f} GiB PSS (process tree), {parallel} clients train in parallel")
    print("at the PSS peak, MiB by process: " + ", ".join(
        f"{name} {pss / 2**20:.0f}" for name, pss in sorted(at_peak, key=lambda x: -x[1])))
    print("round  accuracy  eval_loss  round_s  eval_s  train_s(sum)  overhead")
    overheads = []
    for r in rows:
        line = f"{r['round']:>5}  {r.get('eval_accuracy', float('nan')):>8.3f}  " \
               f"{r['eval_loss']:>9.4f}  {r['seconds']:>7.1f}  {r['eval_seconds']:>6.1f}"
        if r["round"] > 0:
            training = r["client_train_seconds"] / parallel
            overhead = (r["seconds"] - r["eval_seconds"] - training) / r["seconds"]
            overheads.append(overhead)
            line += f"  {r['client_train_seconds']:>12.1f}  {overhead:>8.1%}"
        print(line)
    print(f"mean framework overhead per round: {sum(overheads) / len(overheads):.1%}")
    print(f"run folder: runs/{name}")


if __name__ == "__main__":
    main(sys.argv[1:])
