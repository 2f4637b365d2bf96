"""LoRA adapters on a base model, through peft: attach, read, load, save.

An adapter state is a plain ``dict[str, torch.Tensor]`` keyed by peft's state-dict names
(``...q_proj.lora_A.weight``); it is what travels between server and clients.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.errors import FedLoraError


def attach_lora(
    model, rank: int, alpha: float, target_modules: list[str], seed: int
) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA: A Kaiming-uniform (seeded), B zero, scale alpha/rank.

    Only the LoRA tensors are trainable. Raises FedLoraError if no module matches.
    """
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=target_modules,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
            warnings.simplefilter("ignore", FutureWarning)
            return get_peft_model(model, config)
    except ValueError as err:
        if "not found in the base model" in str(err):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
            raise FedLoraError(
                f"--target-modules {','.join(target_modules)} matches no module of the model; "
                f"its linear modules: {', '.join(names)}"
            ) from None
        raise


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors, detached fp32 copies on the CPU."""
    return {
        key: value.detach().to("cpu", torch.float32).clone()
        for key, value in get_peft_model_state_dict(model).items()
    }


def load_adapter_state(model: PeftModel, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's adapter; its keys and shapes must match exactly."""
    check_adapter_state(state, adapter_state(model))
    set_peft_model_state_dict(model, state)


def check_adapter_state(
    state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]
) -> None:
    """Raise FedLoraError unless ``state`` has the reference's keys and shapes, all finite."""
    missing = sorted(set(reference) - set(state))
    extra = sorted(set(state) - set(reference))
    if missing or extra:
        raise FedLoraError(
            f"adapter keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(reference[key].shape):
            raise FedLoraError(
                f"adapter tensor {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(reference[key].shape)}"
            )
        if not value.is_floating_point():
            raise FedLoraError(f"adapter tensor {key} has dtype {value.dtype}, expected a float")
        if not torch.isfinite(value).all():
            raise FedLoraError(f"adapter tensor {key} holds NaN or Inf")


def save_adapter(model: PeftModel, folder: str | Path) -> None:
    """Write the adapter in PEFT format: ``PeftModel.from_pretrained(base, folder)`` loads it."""
    model.save_pretrained(str(folder))
