"""Figures reproduce: re-running a committed configuration reproduces its committed
metrics.jsonl to the last digit (every figure but wall-clock seconds), so a change that
moves figures is seen here, not later in a study (simulations/reproduce.toml says how to
commit new files when a change moves them on purpose).

To the last digit holds only with the packages and CPU the committed run recorded
(server.outputs.provenance), which set the float rounding: transformers 5.18.0 gives
round 1's eval loss 10.862690925598145 where 5.25.0 gives 10.862691402435303
(docs/results.md, "Claims re-run at 5 seeds"). Elsewhere, every count and byte must still
be equal and every other figure within a relative 1e-5, which such rounding stays far
inside and a change to the method does not.
"""

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.outputs import provenance

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "simulations" / "reproduce.toml"
COMMITTED = ROOT / "docs" / "results" / "reproduce"
WALL_CLOCK = {"seconds", "eval_seconds", "client_train_seconds", "fed_eval_seconds"}
ROUNDING = 1e-5  # relative, for figures computed in floating point, across package versions


def figures(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    return [{k: v for k, v in row.items() if k not in WALL_CLOCK} for row in rows]


def environment(record: dict) -> dict:
    """The package versions and CPU of a provenance record."""
    return {k: v for k, v in record.items() if k not in ("commit", "code_changed")}


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
    recorded = environment(tomllib.loads((COMMITTED / "config.toml").read_text())["provenance"])
    here = environment(provenance())
    if here == recorded:
        assert again == committed
    else:  # other packages or CPU: floating-point figures to rounding, the rest exact
        for new, old in zip(again, committed):
            for key, value in old.items():
                rounded = isinstance(value, float)
                assert new[key] == (pytest.approx(value, rel=ROUNDING) if rounded else value), (
                    new["round"], key, f"here {here}, committed {recorded}")
