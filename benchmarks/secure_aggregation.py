"""Secure aggregation against the plain run: bytes and seconds per round, accuracy, and the
aggregate's error against the bound it reports (docs/privacy.md, "Secure aggregation").

    python benchmarks/secure_aggregation.py [--output docs/results/secure-aggregation] [simulate flags...]

Runs the job the flags give (by default the default job: SmolLM2-135M-Instruct, Rotten
Tomatoes, 4 clients, 3 rounds) twice with the same seed, plain and with
``--secure-aggregation``, and the same pair for one round. Training is deterministic given
the seed, so after one round the two global adapters differ only by SecAgg+'s
quantisation: the largest difference is printed against the round's
``secure_error_bound`` (plus fp32 rounding of the stored values). After three rounds the
difference also carries the clients' training from two slightly different starts. A run
folder that already holds a finished run is kept (the script resumes).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from server.outputs import read_rows


def run(output: Path, name: str, flags: list[str]) -> Path:
    folder = output / name
    if not (folder / "summary.json").exists():
        subprocess.run([sys.executable, "-m", "fedlora.simulate", *flags, "--output", str(output),
                        "--name", name], check=True)
    return folder


def largest_difference(a: Path, b: Path) -> tuple[float, float]:
    """max |a - b| over the global arrays of two runs' checkpoints, and max |a|."""
    x, y = (torch.load(f / "checkpoint.pt", weights_only=True)["arrays"] for f in (a, b))
    return (max((x[k] - y[k]).abs().max().item() for k in x),
            max(v.abs().max().item() for v in x.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("docs/results/secure-aggregation"))
    args, flags = parser.parse_known_args()
    summary = {}
    for rounds in (1, 3):
        pair = {}
        for secure in (False, True):
            name = f"{'secure' if secure else 'plain'}-{rounds}"
            pair[secure] = run(args.output, name, [*flags, "--rounds", str(rounds),
                                                   *(["--secure-aggregation"] if secure else [])])
        plain, secure = (read_rows(pair[s]) for s in (False, True))
        difference, largest = largest_difference(pair[True], pair[False])
        summary[f"{rounds} rounds"] = {
            "bytes_up": [[p["bytes_up"], s["bytes_up"]] for p, s in zip(plain, secure)],
            "bytes_down": [[p["bytes_down"], s["bytes_down"]] for p, s in zip(plain, secure)],
            "seconds": [[round(p["seconds"], 1), round(s["seconds"], 1)] for p, s in zip(plain, secure)],
            "final_accuracy": [plain[-1].get("eval_accuracy"), secure[-1].get("eval_accuracy")],
            "largest_difference": difference,
            "largest_value": largest,
            "secure_error_bound": [r.get("secure_error_bound") for r in secure[1:]],
            "secure_clipped": [r.get("secure_clipped") for r in secure[1:]],
        }
    print(json.dumps(summary, indent=1))
    (args.output / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
