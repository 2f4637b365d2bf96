"""End to end through Flower's real simulation engine: tiny-llama, 3 clients, 2 rounds."""

import importlib.metadata
import json
import platform
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedlora.config import RunConfig
from fedlora.models import load_model

ROOT = Path(__file__).resolve().parents[1]

ROUNDS, CLIENTS = 2, 3
KEYS = {"round", "strategy", "clients", "dropped", "train_loss", "eval_loss", "eval_accuracy",
        "bytes_up", "bytes_down", "seconds"}
FED_KEYS = {"fed_eval_loss", "fed_eval_accuracy", "fed_eval_accuracy_min", "fed_eval_macro_f1",
            "fed_eval_majority_accuracy", "fed_eval_clients", "fed_eval_by_client"}
POSITIVE_SHARES = (0.8, 0.5, 0.2)  # each client's own label mix


def movie_rows(count, positive_share, rng, source):
    """Rows of the packaged Rotten Tomatoes reviews, raw labels 0/1, this share positive."""
    positive = round(count * positive_share)
    picks = [*rng.choice(source[1], positive, replace=False),
             *rng.choice(source[0], count - positive, replace=False)]
    return [{"review": text, "stars": label} for text, label in picks]


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Three client files of different label mixes, a broken fourth, the server's eval file."""
    import numpy as np
    import pandas as pd

    from fedlora.data import read_frame, read_table

    folder = tmp_path_factory.mktemp("data")
    frame = read_frame("rotten-tomatoes", "--dataset")
    source = {k: list(zip(frame["text"][frame["label"] == k], frame["label"][frame["label"] == k]))
              for k in (0, 1)}
    source = {k: np.array(v, dtype=object) for k, v in source.items()}
    rng = np.random.default_rng(0)
    files = []
    for i, share in enumerate(POSITIVE_SHARES):
        path = folder / f"client{i}.jsonl"
        path.write_text("".join(json.dumps({"review": r["review"], "stars": int(r["stars"])}) + "\n"
                                for r in movie_rows(80, share, rng, source)))
        files.append(path)
    broken = folder / "client3.csv"  # a label that --label-names does not name
    broken.write_text("review,stars\nfine film,1\ndull,7\n")
    evaluation = folder / "server-eval.parquet"
    pd.DataFrame(movie_rows(64, 0.5, rng, source)).astype({"stars": int}).to_parquet(evaluation)
    assert len(read_table(evaluation)) == 64
    return files + [broken], evaluation


@pytest.fixture(scope="module")
def simulation(tmp_path_factory, data_files):
    files, evaluation = data_files
    output = tmp_path_factory.mktemp("runs")
    command = [
        sys.executable, "-m", "fedlora.simulate", "--model", "tiny-llama",
        "--client-data", ",".join(map(str, files)), "--eval-dataset", str(evaluation),
        "--text-column", "review", "--label-column", "stars",
        "--label-names", "0=negative,1=positive", "--evaluation", "both",
        "--client-eval-fraction", "0.25", "--eval-every", "2",
        "--rounds", str(ROUNDS), "--local-steps", "15",
        "--lr", "0.01", "--target-modules", "q_proj,v_proj,o_proj,down_proj",
        "--max-length", "48", "--output", str(output), "--name", "e2e",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "DEPRECATED" not in result.stdout + result.stderr  # run_simulation's notice is kept out
    return output / "e2e", result.stdout + result.stderr


@pytest.fixture(scope="module")
def run_dir(simulation):
    return simulation[0]


def test_metrics_have_one_row_per_round_with_the_contract_keys(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == list(range(ROUNDS + 1))
    for row in (rows[0], rows[2]):  # --eval-every 2: round 0, then every 2nd and the last
        assert KEYS - {"train_loss", "dropped"} | FED_KEYS <= set(row)  # dropped: trained rounds
        assert row["strategy"] == "fedavg" and 0.0 <= row["eval_accuracy"] <= 1.0
        assert "epsilon" not in row and "delta" not in row  # no DP, no privacy claim
    assert not {"eval_loss", "fed_eval_loss"} & set(rows[1])
    assert rows[0]["clients"] == 0 and rows[0]["bytes_up"] == rows[0]["bytes_down"] == 0
    for row in rows[1:]:
        assert KEYS - {"eval_loss", "eval_accuracy"} <= set(row)
        assert (row["clients"], row["dropped"]) == (CLIENTS, 1)  # the fourth's file is broken
        assert row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert rows[-1]["cumulative_bytes_up"] == sum(r["bytes_up"] for r in rows)
    # Every client uploads the same adapter shapes: the upload is the same each round.
    assert rows[1]["bytes_up"] == rows[2]["bytes_up"]


def test_a_learnable_task_learns(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    # The random model starts at log(49152) = 10.8 nats and learns to put mass on the label
    # words. Its tied output embeddings stay frozen and small, which caps the gain near 1.3
    # nats; 2 rounds reach about 0.9.
    assert rows[-1]["eval_loss"] < rows[0]["eval_loss"] - 0.5
    assert rows[-1]["fed_eval_loss"] < rows[0]["fed_eval_loss"] - 0.5


def test_a_broken_client_file_is_one_dropped_reply_with_its_reason(simulation):
    _, output = simulation
    assert "round 1: dropped the reply of node" in output
    assert "client3.csv: label '7' has no word in --label-names; it names: 0, 1" in output


def test_federated_evaluation_pools_the_clients_held_out_slices(run_dir, data_files):
    """Each client's figures equal the saved adapter evaluated on that client's held-out
    slice, recomputed here; the pooled figures are their example-weighted means."""
    from fedlora.data import local_examples, server_data
    from fedlora.evaluate import evaluate

    last = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()][-1]
    by_client = last["fed_eval_by_client"]
    assert sorted(by_client) == ["0", "1", "2"] and last["fed_eval_clients"] == 3
    examples = sum(c["examples"] for c in by_client.values())
    assert examples == 3 * 20  # a quarter of each client's 80
    assert last["fed_eval_accuracy"] == pytest.approx(
        sum(c["examples"] * c["accuracy"] for c in by_client.values()) / examples)
    assert last["fed_eval_accuracy_min"] == min(c["accuracy"] for c in by_client.values())
    # Majority class of the pooled slices: the mixes 0.8 / 0.5 / 0.2 pool to about half.
    assert 0.4 < last["fed_eval_majority_accuracy"] < 0.65

    saved = tomllib.loads((run_dir / "config.toml").read_text())
    config = RunConfig.from_dict({k: v for k, v in saved.items() if k != "provenance"})
    words = server_data(config).label_words
    assert words == ["negative", "positive"]
    base, tokenizer = load_model("tiny-llama", torch.device("cpu"))
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter")
    files, _ = data_files
    for i in range(CLIENTS):
        _, held_out = local_examples(config, str(files[i]), i, len(files), words)
        direct = evaluate(adapted, tokenizer, held_out, words, batch_size=32,
                          max_length=config.max_length, device=torch.device("cpu"))
        assert direct["eval_accuracy"] == by_client[str(i)]["accuracy"]
        assert direct["eval_loss"] == pytest.approx(by_client[str(i)]["loss"], rel=1e-5)


def test_config_is_saved_and_reloads(run_dir):
    saved = tomllib.loads((run_dir / "config.toml").read_text())
    saved.pop("provenance")  # the code that ran it: test_a_run_records_the_code_that_produced_it
    config = RunConfig.from_dict(saved)
    assert (config.model, config.num_clients, config.rounds, config.name) == (
        "tiny-llama", CLIENTS + 1, ROUNDS, "e2e")  # one per file, the broken one too


def test_a_run_records_the_code_that_produced_it(run_dir):
    code = tomllib.loads((run_dir / "config.toml").read_text())["provenance"]
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    changed = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "*.py",
                              "pyproject.toml"], capture_output=True, text=True, check=True).stdout
    assert code["commit"] == head and code["code_changed"] == bool(changed.strip())
    assert code["torch"] == torch.__version__ and code["flwr"] == importlib.metadata.version("flwr")
    assert code["cpu"] == f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    assert json.loads((run_dir / "summary.json").read_text())["provenance"] == code


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
