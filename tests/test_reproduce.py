"""Figures reproduce: re-running a committed configuration reproduces its committed
metrics.jsonl to the last digit (every figure but wall-clock seconds), so a change that
moves figures is seen here, not later in a study (simulations/reproduce.toml says how to
commit new files when a change moves them on purpose)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "simulations" / "reproduce.toml"
COMMITTED = ROOT / "docs" / "results" / "reproduce"
WALL_CLOCK = {"seconds", "eval_seconds", "client_train_seconds", "fed_eval_seconds"}


def figures(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def test_the_committed_run_reproduces_to_the_last_digit(tmp_path):
    # From a folder where --output docs/results names a fresh place: the run config
    # travels in every message, so its text must be the same for the bytes to be.
    result = subprocess.run([sys.executable, "-m", "fedlora.simulate", "--config", str(CONFIG)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    again = figures(tmp_path / "docs" / "results" / "reproduce")
    committed = figures(COMMITTED)
    assert [list(row) for row in again] == [list(row) for row in committed]  # keys, in order
    assert again == committed
