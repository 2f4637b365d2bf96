"""The strategies through Flower's simulation engine in one comparison run, with the
exactness check on: tiny-llama, 3 clients on different data, heterogeneous ranks for
flora, hetlora and flexlora."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from fedlora.adapters import apply_base_delta
from fedlora.models import load_model

EXAMPLE = "examples.trimmed_mean:TrimmedMean"  # a strategy written outside the package
STRATEGIES = ["fedavg", "ffa", "flora", "fedsb", "hetlora", "flexlora", "fedex", "fedsa", "fedsvd",
              "rolora", EXAMPLE]
FOLDERS = [s.replace(":", "-") for s in STRATEGIES]  # a folder name has no ':'
GLOBAL = [f for f in FOLDERS if f != "fedsa"]  # fedsa's adapter is personalised: no global one
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    output = tmp_path_factory.mktemp("runs")
    config = output / "compare.toml"
    config.write_text(
        f'strategy = "{",".join(STRATEGIES)}"\nmodel = "tiny-llama"\nnum-clients = 3\n'
        'rounds = 2\nlocal-steps = 4\nlr = 0.01\nrank = 4\neval-size = 32\nmax-length = 48\n'
        'target-modules = "q_proj,v_proj"\n'  # the same layers for all (Fed-SB's own: all linear)
        'partitioning = "dirichlet"\nfedsb-init-examples = 16\ncheck-exactness = true\n'
        '[flora]\nranks = "8,4,2"\n[hetlora]\nranks = "8,4,2"\n[flexlora]\nranks = "8,4,2"\n'
        '[fedsa]\ncheck-exactness = false\n'
    )
    result = subprocess.run(  # from the root, where `python -m` finds the example's module
        [sys.executable, "-m", "fedlora.simulate", "--config", str(config),
         "--output", str(output), "--name", "cmp"],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    folder = output / "cmp"
    rows = {f: [json.loads(line) for line in (folder / f / "metrics.jsonl").open()] for f in FOLDERS}
    return folder, rows, result.stdout, config


def test_the_planner_predicts_every_strategys_bytes_to_the_byte(comparison, example_strategy):
    """python -m fedlora.plan, on the meta-device model, against what the run counted:
    the initialisation and both rounds, both ways, for every strategy; the exact planner
    (the server's code on stand-in replies) and the command's, by shape alone."""
    from fedlora.plan import plan_run, plan_traffic
    from conftest import parse_configs

    folder, rows, _, config = comparison
    configs = parse_configs(["--config", str(config), "--output", str(folder.parent), "--name", "cmp"])
    for each, name in zip(configs, FOLDERS):
        counted = [(r["bytes_up"], r["bytes_down"]) for r in rows[name]]
        for planner in (plan_traffic, lambda c: plan_run(c).rounds):
            planned = planner(each)
            assert [(sum(r.up.values()), sum(r.down.values())) for r in planned] == counted, name


def test_exact_methods_are_exact_and_fedavg_is_not(comparison):
    _, rows, _, _ = comparison
    for strategy in ("ffa", "flora", "fedsb", "fedex", "fedsvd", "rolora"):
        errors = [r["aggregation_error"] for r in rows[strategy][1:]]
        assert max(errors) < 1e-5, (strategy, errors)
    assert min(r["aggregation_error"] for r in rows["fedavg"][1:]) > 1e-4
    assert min(r["aggregation_error"] for r in rows["hetlora"][1:]) > 1e-4


def test_round_0_evaluates_the_model_clients_start_from(comparison):
    _, rows, _, _ = comparison
    # FedAvg's and FFA's zero B and FLoRA's empty stack leave the base model as it is;
    # Fed-SB's gradient initialisation starts clients from W + B R A.
    base = {s: (rows[s][0]["eval_loss"], rows[s][0]["eval_accuracy"])
            for s in ("fedavg", "ffa", "flora", "hetlora", "flexlora", "fedex")}
    assert len(set(base.values())) == 1
    assert rows["fedsb"][0]["eval_loss"] != rows["fedavg"][0]["eval_loss"]


def test_communication_follows_the_methods(comparison):
    _, rows, _, _ = comparison
    up = {f: rows[f][1]["bytes_up"] for f in FOLDERS}
    assert up["fedsb"] < up["ffa"] < up["fedavg"]  # r^2 < B < A and B
    assert rows["fedsb"][0]["bytes_up"] > 0  # the gradient initialisation round is counted
    assert rows["fedsb"][1]["bytes_down"] > rows["fedsb"][2]["bytes_down"]  # B, A sent once
    assert rows["flora"][2]["bytes_down"] > rows["flora"][1]["bytes_down"]  # round 1's stack
    # Ranks 8, 4, 2 upload r_k (m + n) values per module: more than fedavg's 3 x 4, the
    # same shapes for both; after round 1 each client is sent its own rank's components.
    assert up["hetlora"] == up["flexlora"] > up["fedavg"]
    for strategy in ("hetlora", "flexlora"):
        assert rows[strategy][2]["bytes_down"] < rows[strategy][1]["bytes_down"]
    # FedEx-LoRA uploads what FedAvg does; from round 2 on it also sends each client the
    # last round's dense residual, out x in fp32 values per module (2 layers of tiny-llama:
    # q 64 x 64, v 32 x 64).
    assert up["fedex"] == up["fedavg"]
    residual_bytes = 3 * 2 * (64 * 64 + 32 * 64) * 4
    growth = {s: rows[s][2]["bytes_down"] - rows[s][1]["bytes_down"] for s in ("fedex", "fedavg")}
    extra = growth["fedex"] - growth["fedavg"]
    assert residual_bytes < extra < residual_bytes * 1.05, (extra, residual_bytes)
    # FedSA-LoRA moves A alone, both ways.
    assert up["fedsa"] < up["fedavg"] and rows["fedsa"][2]["bytes_down"] < rows["fedavg"][2]["bytes_down"]
    for folder in FOLDERS:
        assert all(r["clients"] == 3 for r in rows[folder][1:])


def test_a_strategy_written_outside_the_package_runs_in_the_comparison(comparison):
    folder, rows, _, _ = comparison
    example = rows[FOLDERS[-1]]
    assert [r["round"] for r in example] == [0, 1, 2]
    assert all(r["strategy"] == EXAMPLE for r in example)  # the name the user gave
    assert (folder / FOLDERS[-1] / "adapter" / "adapter_config.json").is_file()


def test_comparison_table_and_plot(comparison):
    folder, rows, stdout, _ = comparison
    lines = (folder / "comparison.md").read_text().splitlines()
    table = lines[:lines.index("")]  # one row per strategy, then notes
    assert [line.split("|")[1].strip() for line in table[2:]] == STRATEGIES
    headings = [h.strip() for h in table[0].split("|")]
    for line, strategy in zip(table[2:], FOLDERS):
        cells = dict(zip(headings, (c.strip() for c in line.split("|"))))
        if strategy == "fedsa":  # evaluated by its clients only: no central figures
            assert cells["final eval_accuracy"] == "-" and "fed_eval_accuracy" in rows[strategy][-1]
            continue
        assert cells["final eval_macro_f1"] == f"{rows[strategy][-1]['eval_macro_f1']:.3f}"
        assert cells["majority class"] == f"{rows[strategy][-1]['eval_majority_accuracy']:.3f}"
    assert (folder / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "| fedsb |" in stdout


def test_fedsa_saves_its_shared_a_and_says_where_b_is(comparison):
    folder, _, _, _ = comparison
    from safetensors.torch import load_file

    shared = load_file(folder / "fedsa" / "adapter" / "shared.safetensors")
    assert shared and all(k.endswith("lora_A.weight") for k in shared)
    assert "lora_B tensors stay with each client" in (folder / "fedsa" / "adapter" / "README.md").read_text()


@pytest.mark.parametrize("strategy", GLOBAL)
def test_every_exported_adapter_loads_with_peft(comparison, strategy):
    folder, _, _, _ = comparison
    base, tokenizer = load_model("tiny-llama", torch.device("cpu"))
    ids = tokenizer("a fine film\nAnswer:", return_tensors="pt").input_ids
    with torch.no_grad():
        before = base(ids).logits
        apply_base_delta(base, folder / strategy / "adapter")  # FedEx-LoRA's residuals
        after = PeftModel.from_pretrained(base, folder / strategy / "adapter")(ids).logits
    assert (after - before).abs().max() > 1e-4
    assert (folder / strategy / "adapter" / "base_delta.safetensors").is_file() == (strategy == "fedex")
