"""End to end through Flower's real simulation engine: tiny-llama, 3 clients, 2 rounds."""

import json
import subprocess
import sys
import tomllib

import pytest
import torch
from peft import PeftModel

from fedlora.config import RunConfig
from fedlora.models import load_model

ROUNDS, CLIENTS = 2, 3
KEYS = {"round", "strategy", "clients", "train_loss", "eval_loss", "eval_accuracy",
        "bytes_up", "bytes_down", "seconds"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    command = [
        sys.executable, "-m", "fedlora.simulate", "--model", "tiny-llama",
        "--num-clients", str(CLIENTS), "--rounds", str(ROUNDS), "--local-steps", "15",
        "--lr", "0.01", "--target-modules", "q_proj,v_proj,o_proj,down_proj",
        "--eval-size", "64", "--max-length", "48", "--output", str(output), "--name", "e2e",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEPRECATED" not in result.stdout + result.stderr  # run_simulation's notice is kept out
    return output / "e2e"


def test_metrics_have_one_row_per_round_with_the_contract_keys(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in rows:
        assert KEYS - {"train_loss"} <= set(row)
        assert row["strategy"] == "fedavg" and 0.0 <= row["eval_accuracy"] <= 1.0
        assert "epsilon" not in row and "delta" not in row  # no DP, no privacy claim
    assert rows[0]["clients"] == 0 and rows[0]["bytes_up"] == rows[0]["bytes_down"] == 0
    for row in rows[1:]:
        assert KEYS <= set(row)
        assert row["clients"] == CLIENTS
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert rows[-1]["cumulative_bytes_up"] == sum(r["bytes_up"] for r in rows)
    # Every client uploads the same adapter shapes: the upload is the same each round.
    assert rows[1]["bytes_up"] == rows[2]["bytes_up"]


def test_a_learnable_task_learns(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    # The random model starts at log(49152) = 10.8 nats and learns to put mass on the label
    # words. Its tied output embeddings stay frozen and small, which caps the gain near 1.3
    # nats; 2 rounds reach about 0.9.
    assert rows[1]["eval_loss"] < rows[0]["eval_loss"]
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.5


def test_config_is_saved_and_reloads(run_dir):
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    config = RunConfig.from_dict(saved)
    assert (config.model, config.num_clients, config.rounds, config.name) == (
        "tiny-llama", CLIENTS, ROUNDS, "e2e")


def test_saved_adapter_loads_with_peft_and_changes_the_output(run_dir):
    base, tokenizer = load_model("tiny-llama", torch.device("cpu"))
    ids = tokenizer("a fine film\nQuestion: which label fits this text: negative or positive?\n"
                    "Answer:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        adapted = PeftModel.from_pretrained(base, run_dir / "adapter")
        after = adapted(ids).logits
    assert (after - before).abs().max() > 1e-2


def test_report_is_a_png(run_dir):
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
