"""python -m fedlora.plan on a model that is never loaded: the plan by shape against the
exact plan, Flower's bytes from shapes, a 7B run planned without a tensor of its size, the
memory model against autograd and by hand. (The exact plan against a real run's bytes,
to the byte, for every strategy: tests/test_comparison.py.)"""

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fedlora.errors import FedLoraError
from fedlora.memory import (HEAP_RETENTION, RUNTIME_BYTES, Architecture, activation_bytes,
                            client_memory, linear_weight_bytes)
from fedlora.models import meta_model
from fedlora.plan import main, plan_run, plan_traffic
from conftest import parse_configs
from server.transport import Shaped, array_bytes, serialized_bytes, shaped_bytes
from strategies.replies import lora_shapes

MODELS = Path(__file__).resolve().parents[1] / "benchmarks" / "models"
LLAMA_7B = str(MODELS / "llama-2-7b" / "config.json")
MISTRAL_7B = str(MODELS / "mistral-7b-v0.3" / "config.json")
# 5 clients, 2 of them sampled each round: first-time clients in every round
TINY = ["--model", "tiny-llama", "--num-clients", "5", "--fraction-train", "0.4", "--rounds", "4",
        "--eval-size", "16"]
ALL_SEVEN = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


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
    fedsb = out[out.index("fedsb: rank 32"):].splitlines()  # 64 capped at tiny-llama's k, v width
    assert fedsb[4].startswith("| init | ") and not fedsb[4].startswith("| init | - |")  # gradients
    assert fedsb[7].startswith("| total | | | ")


@pytest.mark.parametrize("flags, message", [
    (["--model", "nowhere/config.json"], "error: --model nowhere/config.json: no such file"),
    (["--model", "tiny-llama", "--target-modules", "qkv"],
     "error: --target-modules qkv matches no module of the model; its linear modules: "
     "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"),
    (["--model", "tiny-llama", "--strategy", "fedsb", "--rank", "100"],  # planned by shape too
     "error: --rank 100 exceeds the smallest adapted dimension (32); LoRA-SB needs rank <= 32"),
])
def test_bad_plan_settings_are_one_line_errors(flags, message, capsys):
    assert main(flags) == 2
    assert capsys.readouterr().err == message + "\n"


@pytest.mark.parametrize("flags", [
    ["--strategy", "fedavg,ffa,fedsb,sparse"],
    ["--strategy", "fedex,fedsa,fedsvd,rolora"],
    ["--strategy", "flora,hetlora,flexlora", "--ranks", "8,4,2"],
    # zero tensors under int8 (Fed-SB's random R = 0): equal arrays, sent once
    ["--strategy", "fedavg,fedex,fedsb", "--download-codec", "int8", "--upload-codec", "fp16",
     "--fedsb-init", "random"],
    ["--strategy", "sparse", "--upload-density", "0.05", "--download-density", "0.5",
     "--density-decay", "0.5", "--download-codec", "topk:0.5,fp16,per-tensor", "--error-feedback"],
    ["--strategy", "fedavg", "--dp", "user", "--dp-noise-seed", "1"],  # Poisson sampling
])
def test_the_plan_by_shape_is_the_exact_plan_to_the_byte(flags, tmp_path):
    """plan_run (no tensor made) against plan_traffic (the server's own code on stand-in
    replies), every client and round, both ways; the whole run's totals are their sums."""
    for config in parse_configs(TINY + flags + ["--output", str(tmp_path)]):
        exact = plan_traffic(config)
        plan = plan_run(config)
        assert [(r.round, r.up, r.down) for r in plan.rounds] == [
            (r.round, r.up, r.down) for r in exact], config.strategy
        summary = plan.summary(config)
        assert summary["upload_bytes_total"] == sum(sum(r.up.values()) for r in exact)
        assert summary["download_bytes_total"] == sum(sum(r.down.values()) for r in exact)
        if config.dp == "off":
            assert all(len(r.up) == 2 for r in exact[1:])  # --fraction-train 0.4 of 5


@pytest.mark.parametrize("dtype, shape", [
    (np.float32, (64, 4)), (np.float16, (3,)), (np.uint8, (1,)), (np.int8, (0,)),
    (np.float32, (1500, 1024)),  # 6 MB: two chunks
])
def test_a_flower_array_is_counted_from_its_shape(dtype, shape):
    values = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    assert array_bytes(Shaped(np.dtype(dtype), shape)) == serialized_bytes(Array(values))


def test_equal_arrays_and_repeated_chunks_are_counted_once_as_flower_sends_them():
    zeros = np.zeros((3_500_000,), np.float32)  # 14 MB: a chunk with the header, two equal ones
    other = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    real = RecordDict({"arrays": ArrayRecord({"a": Array(zeros), "b": Array(zeros.copy()),
                                              "c": Array(other)})})
    same = ("zero", np.dtype(np.float32).str, zeros.shape)
    shaped = {"arrays": {"a": Shaped(zeros.dtype, zeros.shape, same),
                         "b": Shaped(zeros.dtype, zeros.shape, same),
                         "c": Shaped(other.dtype, other.shape)}}
    assert shaped_bytes(shaped) == serialized_bytes(real)


class LargestTensor(TorchDispatchMode):
    """Records the bytes of the largest tensor (not on the meta device) that any torch
    operation makes while it is active."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.largest = max(self.largest, tensor.numel() * tensor.element_size())
        return out


@pytest.mark.parametrize("strategy, flags", [
    ("fedsb", ["--rank", "200", "--target-modules", ALL_SEVEN]),  # its gradient round: 7B values a client
    ("flora", ["--rank", "32", "--target-modules", ALL_SEVEN]),  # its stacks grow every round
    ("fedex", ["--rank", "32", "--target-modules", ALL_SEVEN]),  # its dense residuals
])
def test_a_7b_run_is_planned_without_a_tensor_of_its_size(strategy, flags, tmp_path):
    [config] = parse_configs(["--strategy", strategy, "--num-clients", "20", "--fraction-train",
                              "0.1", "--rounds", "3", "--output", str(tmp_path), *flags])
    config.model = MISTRAL_7B
    mode = LargestTensor()
    tracemalloc.start()  # numpy's arrays and Python's objects
    try:
        with mode:
            plan = plan_run(config)
        python_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert mode.largest < 2**20 and python_peak < 64 * 2**20, (mode.largest, python_peak)
    summary = plan.summary(config)
    linears = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)  # out x in of the 7 modules
    if strategy == "fedsb":  # every client's gradient of every adapted weight, 1 bit a value
        assert 20 * linears / 8 < summary["init_upload_bytes"] < 20 * linears / 8 * 1.001
    if strategy == "fedex":  # round 3's second-time clients get the increment, new ones all of it
        assert summary["download_bytes_total"] > 2 * linears * 4
    assert summary["client_memory"]["base_weights"] > 7e9 * 4  # fp32 on this CPU


def test_json_prints_one_object_per_strategy_with_the_runs_totals(tmp_path, capsys):
    flags = ["--strategy", "fedavg,fedsb", "--model", "tiny-llama", "--num-clients", "3",
             "--rounds", "2", "--eval-size", "16", "--output", str(tmp_path)]
    assert main(["--json", *flags]) == 0
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["strategy"] for o in objects] == ["fedavg", "fedsb"]
    for summary, config in zip(objects, parse_configs(flags)):
        exact = plan_traffic(config)
        assert summary["upload_bytes_total"] == sum(sum(r.up.values()) for r in exact)
        assert summary["download_bytes_total"] == sum(sum(r.down.values()) for r in exact)
        assert summary["upload_bytes_per_client_round"] == max(max(r.up.values()) for r in exact[1:])
        assert summary["init_upload_bytes"] == sum(exact[0].up.values())
        assert summary["client_peak_memory_bytes"] == summary["client_memory"]["total"] == \
            summary["client_peak_memory_bytes_without_checkpointing"]
        assert (summary["client_peak_memory_bytes_with_checkpointing"]
                < summary["client_peak_memory_bytes_without_checkpointing"])


def test_linear_weights_at_each_dtype_and_quantization():
    params, rows = 64 * 128, 64  # a 128 -> 64 linear
    assert linear_weight_bytes(params, rows, "float32", "none") == 4 * 8192
    assert linear_weight_bytes(params, rows, "bfloat16", "none") == 2 * 8192
    assert linear_weight_bytes(params, rows, "bfloat16", "nf4") == 8192 // 2 + 4 * 8192 // 64
    assert linear_weight_bytes(params, rows, "bfloat16", "int8") == 8192 + 4 * 64
    with pytest.raises(FedLoraError, match="^unknown quantize 'fp8'; valid choices: none, nf4, int8$"):
        linear_weight_bytes(params, rows, "float32", "fp8")


TINY_ARCH = Architecture(layers=2, hidden=8, intermediate=16, heads=2, kv_heads=1, head_dim=4,
                         vocab=10, linear_params=1000, linear_rows=100, other_params=200)


def test_activations_of_a_tiny_config_by_hand():
    """3 tokens, 2 with logits, rank 2 on q and v, fp32 (4 bytes a value)."""
    norm = 8 * 4 + 4  # a norm's input and its fp32 1/rms
    layer = 3 * (2 * norm + 8 * 4  # both norms; the first's output (q and v read it)
                 + 4 * (2 * 4) * 4 + 2 * 4 + 3 * 4  # q, k, v, output; log-sum-exp; the mask
                 + 3 * 16 * 4 + 2 * 2 * 4)  # gate, SiLU(gate), up; A x of q and v
    whole = 3 * (2 * 4 * 4 + norm) + 2 * 16 + 2 * 10 * 4  # cos, sin, final norm; kept logits
    assert activation_bytes(TINY_ARCH, 3, 2, ["q_proj", "v_proj"], 2, "float32") == \
        2 * layer - 3 * norm + whole  # the first norm of the first layer reads the embeddings
    checkpointed = activation_bytes(TINY_ARCH, 3, 2, ["q_proj", "v_proj"], 2, "float32", True)
    assert checkpointed == 2 * 3 * 8 * 4 + layer + whole  # layer inputs, one layer recomputed


def test_client_memory_parts_by_hand():
    settings = dict(adapter_params=50, trained_params=30, kept_params=7, adapted_params=11,
                    copies_adapted=True, gradient_params=0, tokens=3, keep=2,
                    adapted=["q_proj", "v_proj"], rank=2, gradient_checkpointing=False)
    cpu = client_memory(TINY_ARCH, dtype="float32", quantize="none", cpu=True, **settings)
    activations = activation_bytes(TINY_ARCH, 3, 2, ["q_proj", "v_proj"], 2, "float32")
    assert (cpu.runtime, cpu.base_weights, cpu.adapter, cpu.gradients, cpu.optimizer, cpu.kept,
            cpu.activations) == (RUNTIME_BYTES, 1200 * 4, 200, 120, 240, (7 + 11) * 4, activations)
    assert cpu.heap == round(HEAP_RETENTION * activations)
    assert cpu.total == RUNTIME_BYTES + 4800 + 560 + 72 + activations + cpu.heap
    gpu = client_memory(TINY_ARCH, dtype="bfloat16", quantize="none", cpu=False,
                        **{**settings, "gradient_params": 100})
    assert gpu.base_weights == 1200 * 2
    assert gpu.heap == 0 and gpu.initialisation == 100 * (2 + 4)  # bf16 gradient, its fp32 copy
    assert gpu.total == RUNTIME_BYTES + 2400 + 600 + 72 + gpu.activations  # the gradient round peaks
    # on a quantised base, all but the 4-bit layers, the activations and the gradient are fp32
    nf4 = client_memory(TINY_ARCH, dtype="bfloat16", quantize="nf4", cpu=False,
                        **{**settings, "gradient_params": 100})
    assert nf4.base_weights == 500 + 4 * 16 + 200 * 4  # 4-bit linears, absmax per 64; the rest
    assert nf4.activations == activations and nf4.initialisation == 100 * 4


@pytest.mark.parametrize("targets", [ALL_SEVEN, "q_proj,v_proj"])
def test_the_activations_are_what_autograd_saves(targets):
    """The bytes a training step's forward pass saves for backward on tiny-llama (a
    packed row of 4 examples of 64 tokens, the base frozen), counted storage by storage,
    against activation_bytes."""
    from fedlora.adapters import attach_lora
    from fedlora.data import Example
    from fedlora.models import load_model
    from fedlora.train import answer_loss, make_batch

    model, tokenizer = load_model("tiny-llama", torch.device("cpu"), "float32")
    model = attach_lora(model, 8, 16.0, targets.split(","), 0)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = make_batch([Example("word " * 100, " positive", 0)] * 4, tokenizer, 64, packed=True)
    saved = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in weights:
            saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        answer_loss(model, batch)
    tokens, keep = batch.input_ids.shape[1], len(batch.keep)
    assert tokens == 4 * 64
    arch = Architecture.of(meta_model("tiny-llama"))
    # the loss's own scalar (4 bytes) is all that is left out
    assert sum(saved.values()) - activation_bytes(arch, tokens, keep, targets.split(","), 8,
                                                  "float32") == 4


def test_what_a_node_keeps_counts_in_its_memory(tmp_path):
    flags = TINY + ["--output", str(tmp_path), "--rank", "8", "--target-modules", "q_proj,v_proj"]
    configs = {c.strategy: c for c in parse_configs(flags + ["--strategy", "fedavg,ffa,flora,fedex"])}
    shapes = {"model.layers.0.self_attn.q_proj": (64, 64), "model.layers.0.self_attn.v_proj": (32, 64)}
    shapes.update({k.replace("layers.0", "layers.1"): v for k, v in shapes.items()})
    adapted = sum(o * i for o, i in shapes.values())
    lora = lora_shapes(shapes, 8)
    a_values = sum(r * i for k, (r, i) in lora.items() if "lora_A" in k)
    kept = {s: plan_run(c).memory.kept for s, c in configs.items()}
    assert kept["fedavg"] == 0
    assert kept["ffa"] == 4 * a_values  # its frozen A
    assert kept["fedex"] == 4 * 2 * adapted  # the base delta, and the fp32 copies it is added to
    stacks = 4 * 2 * sum(o * 8 + 8 * i for o, i in shapes.values())  # 4 rounds of 2 clients' rank 8
    assert kept["flora"] == 4 * (stacks + adapted)
