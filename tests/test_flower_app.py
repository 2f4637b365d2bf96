"""`flwr run .`: the pyproject's Flower app section runs the same ServerApp and ClientApp."""

import dataclasses
import json
import os
import subprocess
import tomllib
from pathlib import Path

import psutil

from fedlora.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_flower_run_config_lists_every_field_with_its_default():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app = pyproject["tool"]["flwr"]["app"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    # The fields' own defaults: lr's 0 means the strategy's own, which flwr run then resolves.
    assert app["config"] == {f.name.replace("_", "-"): f.default for f in dataclasses.fields(RunConfig)}


def test_flwr_run_trains_and_writes_the_outputs(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "HF_HUB_OFFLINE": "1"}
    overrides = (f'model="tiny-llama" num-clients=2 rounds=1 local-steps=2 eval-size=16 '
                 f'output="{tmp_path}" name="flwr"')
    try:
        result = subprocess.run(
            ["flwr", "run", ".", "--stream", "--run-config", overrides],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        )
    finally:
        # `flwr run` starts a local SuperLink that outlives it: stop what it started.
        for process in psutil.process_iter():
            try:
                if process.environ().get("FLWR_HOME") == str(flwr_home):
                    process.kill()
            except psutil.Error:
                pass
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "flwr" / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1]
    assert rows[1]["clients"] == 2 and rows[1]["bytes_up"] > 0
    assert (tmp_path / "flwr" / "adapter" / "adapter_config.json").is_file()
