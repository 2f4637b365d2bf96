"""python -m fedlora.plan on a model that is never loaded. (Its figures against a real
run's, to the byte, for every strategy: tests/test_comparison.py.)"""

from pathlib import Path

import pytest

from fedlora.plan import main, meta_model, plan_traffic
from conftest import parse_configs
from strategies.fedsb import FedSB

LLAMA_7B = str(Path(__file__).resolve().parents[1] / "benchmarks" / "models" / "llama-2-7b" / "config.json")


def test_a_7b_model_is_planned_from_its_config_without_its_weights(tmp_path):
    model = meta_model(LLAMA_7B, ["q_proj", "v_proj"])
    stored = sum(p.numel() for p in model.parameters() if p.device.type == "cpu")
    assert stored == 2 * 32 * 4096 * 4096  # only the adapted layers, and never filled
    assert sum(p.numel() for p in model.parameters()) > 6.7e9

    [config] = parse_configs(["--rank", "16", "--num-clients", "2", "--rounds", "2",
                              "--output", str(tmp_path), "--name", "plan"])
    config.model = LLAMA_7B
    init, first, second = plan_traffic(config, model)
    lora = 2 * 32 * (16 * 4096 + 4096 * 16) * 4  # A and B of q and v in 32 layers, fp32
    slack = 128 * 1024  # under 1 KB for each of the 128 tensors: names, shapes, headers
    assert not init.up and not init.down
    for row in (first, second):
        assert sorted(row.up) == [0, 1]
        assert all(lora < up < lora + slack for up in row.up.values())
    # Round 1 sends every A, but the 64 B = 0 (equal arrays) once: Flower sends an object
    # once per message. From round 2 on every B differs.
    once = 2 * 32 * 16 * 4096 * 4 + 4096 * 16 * 4
    assert all(once < down < once + slack for down in first.down.values())
    assert all(lora < down < lora + slack for down in second.down.values())


def test_the_plan_is_printed_per_strategy_and_round(tmp_path, capsys):
    assert main(["--model", "tiny-llama", "--strategy", "fedavg,fedsb", "--num-clients", "2",
                 "--rounds", "2", "--eval-size", "16", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.count("| round | upload per client | download per client |") == 2
    fedsb = out[out.index(f"fedsb: rank {FedSB.default_rank}"):].splitlines()
    assert fedsb[4].startswith("| init | ") and not fedsb[4].startswith("| init | - |")  # gradients
    assert fedsb[7].startswith("| total | | | ")


@pytest.mark.parametrize("flags, message", [
    (["--model", "nowhere/config.json"], "error: --model nowhere/config.json: no such file"),
    (["--model", "tiny-llama", "--target-modules", "qkv"],
     "error: --target-modules qkv matches no module of the model; its linear modules: "
     "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
])
def test_bad_plan_settings_are_one_line_errors(flags, message, capsys):
    assert main(flags) == 2
    assert capsys.readouterr().err == message + "\n"
