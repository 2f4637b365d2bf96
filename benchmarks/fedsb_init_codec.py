"""Fed-SB's gradient initialisation by each upload codec: bytes and accuracy against exact.

    python benchmarks/fedsb_init_codec.py [--codecs fp32,bf16,sign] [--output runs/fedsb-init] [simulate flags...]

One ``python -m fedlora.simulate --strategy fedsb --fedsb-init gradient
--fedsb-init-codec C`` run per codec, the rest of the settings those of
simulations/compare-iid.toml's fedsb (SmolLM2, 4 IID clients, r = 32 on q and v, 3 rounds
of 10 steps, 200 held-out reviews, seed 0) unless flags override them. Resumable: a codec
whose run folder already holds its last round is not run again. Prints (and writes
``table.md`` next to the runs) the initialisation round's upload, the round-0 accuracy (the
model right after the initialisation) and the final accuracy and loss of each.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from server.outputs import METRICS_FILE, read_rows

SETTINGS = ["--strategy", "fedsb", "--fedsb-init", "gradient", "--rank", "32",
            "--num-clients", "4", "--rounds", "3", "--local-steps", "10", "--eval-size", "200",
            "--seed", "0"]


def finished(folder: Path, rounds: int) -> bool:
    if not (folder / METRICS_FILE).is_file():
        return False
    rows = read_rows(folder)
    return bool(rows) and rows[-1]["round"] == rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codecs", default="fp32,bf16,sign")
    parser.add_argument("--output", default="runs/fedsb-init")
    args, flags = parser.parse_known_args()
    output = Path(args.output)
    command = SETTINGS + flags
    rounds = int(next(command[i + 1] for i in reversed(range(len(command))) if command[i] == "--rounds"))
    lines = ["| init codec | init-round upload (bytes) | accuracy after init | final accuracy | final eval loss |",
             "|---|---|---|---|---|"]
    for codec in args.codecs.split(","):
        folder = output / codec
        if not finished(folder, rounds):
            resume = ["--resume", str(folder)] if (folder / "checkpoint.pt").is_file() else [
                *command, "--fedsb-init-codec", codec, "--output", str(output), "--name", codec]
            print("$ python -m fedlora.simulate", " ".join(resume), flush=True)
            subprocess.run([sys.executable, "-m", "fedlora.simulate", *resume], check=True)
        rows = read_rows(folder)
        lines.append(f"| {codec} | {rows[0]['bytes_up']:,} | {rows[0]['eval_accuracy']:.3f} | "
                     f"{rows[-1]['eval_accuracy']:.3f} | {rows[-1]['eval_loss']:.4f} |")
    table = "\n".join(lines) + "\n"
    (output / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
