"""Attaching, reading, loading and saving LoRA adapters on a real (tiny) HF model."""

import pytest
import torch
from peft import PeftModel

from fedlora.adapters import adapter_state, attach_lora, load_adapter_state, merge_lora, save_adapter
from fedlora.data import Example
from fedlora.errors import FedLoraError
from fedlora.models import load_model
from fedlora.train import answer_loss, make_batch

CPU = torch.device("cpu")


@pytest.fixture
def model_and_tokenizer(tiny_model_dir):
    return load_model(str(tiny_model_dir), CPU)


def test_fresh_lora_is_seeded_trains_only_adapters_and_starts_at_zero(model_and_tokenizer):
    model, _ = model_and_tokenizer
    adapted = attach_lora(model, rank=4, alpha=8, target_modules=["q_proj", "v_proj"], seed=7)
    state = adapter_state(adapted)
    assert len(state) == 2 * 2 * 2  # layers x modules x (A, B)
    trainable = {n for n, p in adapted.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    for key, value in state.items():
        if "lora_B" in key:
            assert torch.count_nonzero(value) == 0
        else:
            assert value.shape[0] == 4 and value.abs().sum() > 0

    other, _ = load_model(str(model_and_tokenizer[0].config._name_or_path), CPU)
    same_seed = adapter_state(attach_lora(other, 4, 8, ["q_proj", "v_proj"], seed=7))
    assert all(torch.equal(state[k], same_seed[k]) for k in state)


def test_load_round_trips_and_rejects_mismatches(model_and_tokenizer):
    model, _ = model_and_tokenizer
    adapted = attach_lora(model, 4, 8, ["q_proj", "v_proj"], seed=0)
    state = {k: torch.randn_like(v) for k, v in adapter_state(adapted).items()}
    load_adapter_state(adapted, state)
    assert all(torch.equal(adapter_state(adapted)[k], state[k]) for k in state)

    key = next(iter(state))
    with pytest.raises(FedLoraError, match="adapter keys differ"):
        load_adapter_state(adapted, {k: v for k, v in state.items() if k != key})
    with pytest.raises(FedLoraError, match="has shape"):
        load_adapter_state(adapted, {**state, key: torch.zeros(3, 3)})
    with pytest.raises(FedLoraError, match="NaN or Inf"):
        load_adapter_state(adapted, {**state, key: torch.full_like(state[key], float("nan"))})
    with pytest.raises(FedLoraError, match="expected a float"):
        load_adapter_state(adapted, {**state, key: state[key].long()})


def test_unknown_target_module_lists_the_model_linear_layers(model_and_tokenizer):
    model, _ = model_and_tokenizer
    with pytest.raises(FedLoraError, match="matches no module of the model; its linear modules: .*q_proj"):
        attach_lora(model, 4, 8, ["query"], seed=0)


def test_all_linear_adapts_what_peft_does_every_linear_layer_but_the_head(model_and_tokenizer,
                                                                          tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    model, _ = model_and_tokenizer
    ours = {key.rsplit(".lora_", 1)[0] for key in adapter_state(attach_lora(model, 4, 8, ["all-linear"], seed=0))}
    assert len(ours) == 2 * 7 and not any("lm_head" in path for path in ours)  # layers x q k v o gate up down
    other, _ = load_model(str(tiny_model_dir), CPU)
    peft_own = get_peft_model(other, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert ours == {key.rsplit(".lora_", 1)[0] for key in adapter_state(peft_own)}


def test_saved_adapter_loads_with_peft_and_changes_the_output(model_and_tokenizer, tmp_path, tiny_model_dir):
    model, tokenizer = model_and_tokenizer
    adapted = attach_lora(model, 4, 8, ["q_proj", "v_proj"], seed=0)
    load_adapter_state(adapted, {k: torch.randn_like(v) for k, v in adapter_state(adapted).items()})
    save_adapter(adapted, tmp_path / "adapter")

    ids = tokenizer("the movie was good", return_tensors="pt").input_ids
    base, _ = load_model(str(tiny_model_dir), CPU)
    with torch.no_grad():
        base_logits = base(ids).logits
        expected = adapted(ids).logits
        loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")(ids).logits
    torch.testing.assert_close(loaded, expected)
    assert (loaded - base_logits).abs().max() > 1e-3


def test_lora_sb_layer_computes_w_plus_b_r_a_and_trains_only_r(model_and_tokenizer):
    from fedlora.adapters import attach_lora_sb, lora_sb_state, lora_sb_to_peft

    model, tokenizer = model_and_tokenizer
    ids = tokenizer("the movie was good", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
    g = torch.Generator().manual_seed(0)
    factors = {}
    for path, module in model.named_modules():
        if path.endswith(("q_proj", "v_proj")):
            m, n = module.weight.shape
            factors.update({f"{path}.lora_A.weight": torch.randn(3, n, generator=g),
                            f"{path}.lora_B.weight": torch.randn(m, 3, generator=g),
                            f"{path}.lora_R.weight": torch.randn(3, 3, generator=g)})
    attach_lora_sb(model, factors, ["q_proj", "v_proj"])
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        k for k in factors if k.endswith("lora_R.weight")}
    state = lora_sb_state(model)
    assert all(torch.equal(state[k], factors[k]) for k in factors)
    with torch.no_grad():
        sb_logits = model(ids).logits
    assert (sb_logits - base_logits).abs().max() > 1e-3
    # The exported PEFT LoRA (B R, A, scale 1) computes the same function.
    base, _ = load_model(str(model.config._name_or_path), CPU)
    from fedlora.adapters import lora_applied

    with lora_applied(base, lora_sb_to_peft(state), 3, 3.0, ["q_proj", "v_proj"]) as peft_model:
        with torch.no_grad():
            torch.testing.assert_close(peft_model(ids).logits, sb_logits, rtol=1e-4, atol=1e-5)


def test_flora_merges_stay_exact_on_a_bf16_model(model_and_tokenizer):
    """Five rounds of stacked deltas with entries near bf16's resolution of |W| merged
    into a bf16 model: the merged weights equal the fp64 sum within fp32 rounding, and the
    model still trains a LoRA on top of them."""
    model, tokenizer = model_and_tokenizer
    model.to(torch.bfloat16)
    target = "model.layers.0.self_attn.q_proj"
    base = model.get_submodule(target).weight.detach().double().clone()
    reference = base.clone()
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        A = torch.randn(6, 32, generator=generator) * 5e-3
        B = torch.randn(32, 6, generator=generator) * 5e-3
        merge_lora(model, {f"{target}.lora_A.weight": A, f"{target}.lora_B.weight": B})
        reference += B.double() @ A.double()
    merged = model.get_submodule(target).weight.detach().double()
    # Five fp32 roundings of at most half a step (2^-24 |W|) each; bf16 would round each
    # merge to 2^-9 |W|, the size of the deltas themselves.
    assert ((merged - reference).abs() <= 6 * 2**-24 * reference.abs() + 1e-12).all()
    adapted = attach_lora(model, 4, 8, ["q_proj", "v_proj"], seed=0)
    batch = make_batch([Example("the movie was good", " positive")], tokenizer, 32)
    loss = answer_loss(adapted, batch)
    loss.backward()
    assert torch.isfinite(loss) and adapted.get_submodule(f"base_model.model.{target}").base_layer is not None
    assert all(p.grad is not None for n, p in adapted.named_parameters() if p.requires_grad)
