"""--quantize: the frozen base in 4 bits (nf4) or 8 bits (int8) through bitsandbytes, on
the CPU: it trains, FLoRA's merges stay exact relative to the dequantised weights, the
saved adapter loads on the unquantised model, and a wrong setting is one line."""

import importlib.util

import pytest
import torch
from conftest import train_reply
from peft import PeftModel

from fedlora.adapters import (
    Fp32Linear,
    adapter_state,
    attach_lora,
    dense_weight,
    fresh_lora_state,
    is_quantized,
    lora_applied,
    merge_lora,
    save_adapter,
    target_linears,
)
from fedlora.aggregate import delta_weights
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.models import load_model, restored
from fedlora.privacy import DPSGD
from fedlora.train import answer_logits, make_batch, train_local
from server.dry_run import DryRunGrid
from server.preflight import preflight
from strategies.flora import FLoRA
from test_train import examples

CPU = torch.device("cpu")
TARGETS = ["q_proj", "v_proj"]


def test_a_bad_value_is_one_line_naming_the_choices():
    with pytest.raises(FedLoraError, match=r"^unknown quantize 'nf8'; valid choices: none, nf4, int8$"):
        RunConfig.from_dict({"quantize": "nf8"})


def test_without_bitsandbytes_the_run_is_refused_before_it_starts(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(FedLoraError) as err:
        preflight(RunConfig.from_dict({"quantize": "nf4", "model": "tiny-llama"}), model=False)
    assert str(err.value) == "--quantize nf4 needs bitsandbytes: pip install 'fedlora[quantize]'"
    preflight(RunConfig.from_dict({"model": "tiny-llama"}), model=False)  # none needs nothing


@pytest.mark.parametrize("strategy", ["flora", "fedex"])
def test_int8_is_refused_where_clients_change_the_base(strategy):
    with pytest.raises(FedLoraError, match=f"^--strategy {strategy} adds to the base weights.*"
                                           "use --quantize nf4$"):
        preflight(RunConfig.from_dict({"strategy": strategy, "quantize": "int8"}), model=False)
    for allowed in ({"strategy": strategy, "quantize": "nf4"},
                    {"strategy": "fedavg", "quantize": "int8"}):
        preflight(RunConfig.from_dict(allowed), model=False)


def loaded(folder, quantize="none"):
    return load_model(str(folder), CPU, quantize=quantize)


def loss_drop(model, tokenizer, dpsgd=None) -> float:
    """First minus last batch loss of 12 steps of a fresh LoRA on q, v, after an
    evaluation pass (as a run evaluates round 0 first)."""
    with torch.no_grad():
        answer_logits(model.eval(), make_batch(examples(8), tokenizer, 48))
    adapted = attach_lora(model, 4, 8, TARGETS, seed=0)
    stats = train_local(adapted, tokenizer, examples(24), steps=12, batch_size=8, lr=0.02,
                        max_length=48, seed=0, device=CPU, dpsgd=dpsgd)
    adapted.unload()
    return stats["first_loss"] - stats["last_loss"]


@pytest.mark.parametrize("quantize, dp", [("nf4", False), ("int8", False), ("nf4", True)],
                         ids=["nf4", "int8", "nf4-dpsgd"])
def test_a_quantised_base_trains_as_the_full_precision_one_does(tiny_model_dir, quantize, dp):
    # After an eval-mode pass on an AVX-512 BF16 CPU, bitsandbytes would repack the 4-bit
    # weights for a kernel that passes no gradient to the layers below, and the loss would
    # barely move (models.quantized_load).
    dpsgd = DPSGD(noise=0.1, clip=1.0, sample_rate=0.4, sampling_seed=1, noise_seed=2) if dp else None
    model, tokenizer = loaded(tiny_model_dir, quantize)
    linears = target_linears(model, TARGETS)
    assert linears and all(is_quantized(linear) for linear in linears.values())
    full = loss_drop(*loaded(tiny_model_dir), dpsgd)
    assert full > 0.2
    assert loss_drop(model, tokenizer, dpsgd) > 0.7 * full


@pytest.mark.usefixtures("task_identity")  # conftest: messages need a run
def test_flora_on_nf4_is_exact_relative_to_the_dequantised_base(tiny_model_dir):
    """Two rounds of stacks of clients of ranks 4 and 2, merged by a client into its nf4
    model: the merged layers hold the dequantised weights plus the stacks, and the model
    computes what the server evaluates (the nf4 base with the stacks as a PEFT LoRA) to
    fp32 rounding, far closer than the unquantised base does."""
    model, tokenizer = loaded(tiny_model_dir, "nf4")
    strategy = FLoRA(ranks=(4, 2), rank=4, alpha=8, target_modules=tuple(TARGETS))
    arrays = strategy.initialize(model)
    generator = torch.Generator().manual_seed(0)

    def lora(r):
        return {f"base_model.model.{path}.lora_{x}.weight": 0.1 * torch.randn(shape, generator=generator)
                for path, (m, n) in strategy.module_shapes.items()
                for x, shape in (("A", (r, n)), ("B", (m, r)))}

    for server_round in (1, 2):
        strategy.configure_train(server_round, arrays, RunConfig().to_dict(), DryRunGrid([1, 2]))
        replies = [train_reply(n, lora(r), 10 * n, rank=r) for n, r in ((1, 4), (2, 2))]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    state, rank, alpha = strategy.peft_adapter(arrays)
    batch = make_batch(examples(4), tokenizer, 48)
    dequantised = {path: dense_weight(linear) for path, linear in target_linears(model, TARGETS).items()}

    with torch.no_grad(), restored(model):
        for stack in strategy.round_stacks:  # the client's base
            merge_lora(model, stack)
        for path, delta in delta_weights(state).items():
            merged = model.get_submodule(path)
            assert isinstance(merged, Fp32Linear)
            torch.testing.assert_close(merged.weight, dequantised[path] + delta.float(),
                                       rtol=1e-6, atol=1e-7)
        client, _ = answer_logits(model, batch)
    assert all(is_quantized(linear) for linear in target_linears(model, TARGETS).values())
    with torch.no_grad():
        with lora_applied(model, state, rank, alpha, TARGETS) as evaluated:  # the server's
            server, _ = answer_logits(evaluated, batch)
        full, _ = loaded(tiny_model_dir)
        with lora_applied(full, state, rank, alpha, TARGETS) as unquantised:
            unquantised_logits, _ = answer_logits(unquantised, batch)
    error = (client - server).abs().max().item()
    assert error < 1e-5 * server.abs().max().item()
    assert (unquantised_logits - server).abs().max().item() > 100 * error


def test_the_saved_adapter_loads_on_the_unquantised_model(tiny_model_dir, tmp_path):
    model, tokenizer = loaded(tiny_model_dir, "nf4")
    full, _ = loaded(tiny_model_dir)
    generator = torch.Generator().manual_seed(0)
    trained = {k: 0.1 * torch.randn(v.shape, generator=generator)
               for k, v in fresh_lora_state(full, 4, 8, TARGETS, seed=0).items()}
    with lora_applied(model, trained, 4, 8, TARGETS) as adapted:  # as server/outputs.py saves
        save_adapter(adapted, tmp_path)
    assert not any(is_quantized(linear) for linear in target_linears(full, TARGETS).values())
    batch = make_batch(examples(4), tokenizer, 48)
    with torch.no_grad():
        before, _ = answer_logits(full, batch)
        reloaded = PeftModel.from_pretrained(full, str(tmp_path))
        after, _ = answer_logits(reloaded, batch)
    state = adapter_state(reloaded)
    assert state.keys() == trained.keys()
    assert all(torch.equal(state[k], trained[k]) for k in trained)
    assert (after - before).abs().max() > 0.01  # the adapter acts
