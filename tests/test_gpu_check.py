"""benchmarks/gpu_check.py: one line without a GPU; every check runs (here on the CPU)."""

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def gpu_check(monkeypatch, *flags):
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *flags])
    return module.main()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check runs")
def test_without_a_gpu_it_skips_in_one_line(monkeypatch, capsys):
    assert gpu_check(monkeypatch) == 0
    assert capsys.readouterr().out == "gpu_check: skipped: torch sees no CUDA device\n"


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_every_check_runs_and_reports_on_the_cpu(monkeypatch, capsys, quantize):
    assert gpu_check(monkeypatch, "--device", "cpu", "--model", "tiny-llama", "--steps", "1",
                     "--cpu-steps", "1", "--quantize", quantize) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ", 1)[0] for line in lines] == [
        "gpu_check", "train", "evaluation", "dp-sgd", "flora", "messages"]
    merge = next(line for line in lines if line.startswith("flora merge"))
    assert float(merge.split("merged delta ")[1].split()[0]) < 1e-4  # fp32: exact to rounding
    if quantize != "none":  # the merges went into fp32 copies of the dequantised layers
        assert f"{quantize} layers on cpu, as fp32 copies" in merge
        assert f"{quantize} base" in next(line for line in lines if line.startswith("train"))
