"""LoRA adapters on a base model, through peft: attach, read, load, save.

An adapter state is a plain ``dict[str, torch.Tensor]`` keyed by peft's state-dict names
(``...q_proj.lora_A.weight``); it is what travels between server and clients.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from fedlora.aggregate import module_path
from fedlora.config import ALL_LINEAR
from fedlora.errors import FedLoraError


def attach_lora(
    model, rank: int, alpha: float, target_modules: list[str], seed: int
) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA: A Kaiming-uniform (seeded), B zero, scale alpha/rank.

    Only the LoRA tensors are trainable. Raises FedLoraError if no module matches.
    """
    # peft is given the names found, so that it adapts exactly what target_linears reports
    # (and a clear error is raised when nothing matches).
    names = sorted({path.rsplit(".", 1)[-1] for path in target_linears(model, target_modules)})
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        target_modules=names,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.simplefilter("ignore", FutureWarning)
        return get_peft_model(model, config)


@contextmanager
def lora_applied(model, state: dict[str, torch.Tensor], rank: int, alpha: float,
                 target_modules: list[str]) -> Iterator[PeftModel]:
    """``model`` with the PEFT LoRA ``state`` attached, for the duration of a ``with``;
    afterwards the model is as it was."""
    adapted = attach_lora(model, rank, alpha, target_modules, seed=0)
    try:
        load_adapter_state(adapted, state)
        yield adapted
    finally:
        adapted.unload()


def fresh_lora_state(model, rank: int, alpha: float, target_modules: list[str], seed: int):
    """The state of a fresh seeded LoRA on ``model`` (A Kaiming-uniform, B = 0), leaving
    the model as it was."""
    adapted = attach_lora(model, rank, alpha, target_modules, seed)
    state = adapter_state(adapted)
    adapted.unload()
    return state


def adapter_state(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapter's tensors, detached fp32 copies on the CPU."""
    return {
        key: value.detach().to("cpu", torch.float32).clone()
        for key, value in get_peft_model_state_dict(model).items()
    }


def load_adapter_state(
    model: PeftModel, state: dict[str, torch.Tensor], partial: bool = False
) -> None:
    """Copy ``state`` into the model's adapter; keys and shapes must match (with
    ``partial``, ``state`` may hold a subset of the keys: the rest keep their values)."""
    expected = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}
    check_adapter_state(state, expected, partial)
    set_peft_model_state_dict(model, state)


def check_adapter_state(
    state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], partial: bool = False
) -> None:
    """Raise FedLoraError unless ``state`` has the expected keys (a subset of them with
    ``partial``) and shapes, all finite floats."""
    missing = [] if partial else sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise FedLoraError(
            f"adapter keys differ: missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''}"
        )
    for key, value in state.items():
        if tuple(value.shape) != tuple(expected[key]):
            raise FedLoraError(
                f"adapter tensor {key} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[key])}"
            )
        if not value.is_floating_point():
            raise FedLoraError(f"adapter tensor {key} has dtype {value.dtype}, expected a float")
        # One reduction, no mask: a NaN or Inf anywhere makes the sum non-finite, and an
        # fp64 sum of finite floats cannot overflow.
        if not torch.isfinite(value.sum(dtype=torch.float64)):
            raise FedLoraError(f"adapter tensor {key} holds NaN or Inf")


def save_adapter(model: PeftModel, folder: str | Path) -> None:
    """Write the adapter in PEFT format: ``PeftModel.from_pretrained(base, folder)`` loads it."""
    model.save_pretrained(str(folder))


def save_shared_tensors(state: dict[str, torch.Tensor], folder: str | Path,
                        personal: tuple[str, ...]) -> None:
    """A personalised adapter's shared part: ``shared.safetensors`` (peft key names) and a
    README saying what each client keeps for itself."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "shared.safetensors"))
    (folder / "README.md").write_text(
        f"Shared part of a personalised adapter: {len(state)} tensors in shared.safetensors "
        f"(peft key names). The {', '.join(personal)} tensors stay with each client, which "
        "trained them for itself; a client's model is the base model with this shared part "
        "and its own part loaded into one LoRA. There is no single global adapter.\n"
    )


BASE_DELTA_FILE = "base_delta.safetensors"


def save_base_delta(base_delta: dict[str, torch.Tensor], folder: str | Path) -> None:
    """Next to a saved adapter, the dense change its base weights need (FedEx-LoRA): the
    global model is the base model, plus ``base_delta.safetensors`` (``<module>.weight``
    keys) added to those weights, plus the adapter (the run's model card says so)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({f"{path}.weight": value.contiguous() for path, value in base_delta.items()},
              str(folder / BASE_DELTA_FILE))


def apply_base_delta(model, folder: str | Path):
    """Add a saved adapter's base delta (if it has one) to ``model``'s weights; returns
    the model, ready for ``PeftModel.from_pretrained(model, folder)``."""
    from safetensors.torch import load_file

    path = Path(folder) / BASE_DELTA_FILE
    if path.is_file():
        add_to_weights(model, {key.removesuffix(".weight"): value
                               for key, value in load_file(str(path)).items()})
    return model


# ---- LoRA-SB (Fed-SB): h = W x + B R A x, only R trained ---------------------------------


class LoraSBLinear(torch.nn.Module):
    """A frozen linear layer plus B R A, with B (out x r) and A (r x in) frozen and only the
    r x r matrix R trained (LoRA-SB, scale 1).

    A, R and B are bias-free ``nn.Linear`` layers, so per-sample-gradient tools (Opacus)
    handle R like any linear layer.
    """

    def __init__(self, base: torch.nn.Linear, A: torch.Tensor, B: torch.Tensor, R: torch.Tensor):
        super().__init__()
        rank = A.shape[0]
        self.base = base
        self.lora_A = torch.nn.Linear(base.in_features, rank, bias=False)
        self.lora_R = torch.nn.Linear(rank, rank, bias=False)
        self.lora_B = torch.nn.Linear(rank, base.out_features, bias=False)
        # The factors stay fp32 even under a bf16 base model (as peft keeps LoRA weights),
        # so that R's small updates are not rounded away.
        for layer, value in ((self.lora_A, A), (self.lora_R, R), (self.lora_B, B)):
            layer.weight.data = value.to(base.weight.device, torch.float32).clone()
        self.lora_A.weight.requires_grad_(False)
        self.lora_B.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_B(self.lora_R(self.lora_A(x.to(torch.float32))))
        return self.base(x) + update.to(x.dtype)


def target_linears(model, target_modules: list[str]) -> dict[str, torch.nn.Linear]:
    """The base model's linear layers whose last name part is in ``target_modules``, by
    path; ``["all-linear"]`` is every linear layer but the output head (peft's meaning)."""
    every = target_modules == [ALL_LINEAR]
    head = model.get_output_embeddings() if every else None
    found = {
        path: module
        for path, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and (module is not head if every else path.rsplit(".", 1)[-1] in target_modules)
    }
    if not found:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)})
        raise FedLoraError(
            f"--target-modules {','.join(target_modules)} matches no module of the model; "
            f"its linear modules: {', '.join(names)}"
        )
    return found


def attach_lora_sb(model, factors: dict[str, torch.Tensor], target_modules: list[str]):
    """Replace each target linear layer of ``model`` (in place) by a LoraSBLinear.

    ``factors`` holds ``<path>.lora_A.weight``, ``<path>.lora_B.weight`` and
    ``<path>.lora_R.weight`` for every target path. Returns the model.
    """
    for path, linear in target_linears(model, target_modules).items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path)
        try:
            A, B, R = (factors[f"{path}.lora_{x}.weight"] for x in "ABR")
        except KeyError as err:
            raise FedLoraError(f"LoRA-SB factors lack {err.args[0]}") from None
        setattr(parent, name, LoraSBLinear(linear, A=A, B=B, R=R))
    return model


def lora_sb_state(model) -> dict[str, torch.Tensor]:
    """A, B and R of every LoraSBLinear of the model, as fp32 CPU copies."""
    return {
        f"{path}.lora_{x}.weight": getattr(module, f"lora_{x}").weight.detach().to("cpu", torch.float32).clone()
        for path, module in model.named_modules()
        if isinstance(module, LoraSBLinear)
        for x in "ABR"
    }


def lora_sb_to_peft(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LoRA-SB factors as a standard PEFT LoRA state: lora_B = B R, lora_A = A (scale 1,
    so the PEFT config needs lora_alpha = r)."""
    state = {}
    for key in factors:
        if key.endswith(".lora_R.weight"):
            path = key[: -len(".lora_R.weight")]
            state[f"base_model.model.{path}.lora_A.weight"] = factors[f"{path}.lora_A.weight"]
            state[f"base_model.model.{path}.lora_B.weight"] = (
                factors[f"{path}.lora_B.weight"] @ factors[key]
            )
    return state


class Fp32Linear(torch.nn.Linear):
    """An fp32 copy of a linear layer that merged deltas go into: in a bf16 (or fp16) model,
    deltas below the model dtype's resolution (2^-9 |W| in bf16) are kept, and in a
    quantised model (``--quantize``) the copy holds the dequantised weights, which a
    4- or 8-bit layer could not take a delta into. Inputs are cast up, outputs back to the
    input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


def is_quantized(linear: torch.nn.Linear) -> bool:
    """Whether bitsandbytes holds the layer's weight in 4 or 8 bits (integer storage)."""
    return not linear.weight.is_floating_point()


def dense_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """The layer's weight as a dense fp32 tensor: dequantised from 4 or 8 bits where
    bitsandbytes stores it (exactly the weight the layer computes with)."""
    if not is_quantized(linear):
        return linear.weight.detach().float()
    from peft.utils.integrations import dequantize_bnb_weight

    return dequantize_bnb_weight(linear.weight, getattr(linear, "state", None)).float()


def fp32_linear(model, path: str) -> torch.nn.Linear:
    """The linear layer at ``path`` as an Fp32Linear: the first time, the layer is replaced
    (in place) by an fp32 copy of its (dequantised) weights, so the original weights are
    never written to (a cached base model stays as loaded: fedlora.models.borrowed_model)."""
    linear = model.get_submodule(path)
    if isinstance(linear, Fp32Linear):
        return linear
    wide = Fp32Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                      device=linear.weight.device, dtype=torch.float32)
    with torch.no_grad():
        wide.weight.copy_(dense_weight(linear))
        if linear.bias is not None:
            wide.bias.copy_(linear.bias)
    wide.requires_grad_(False)
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path), name, wide)
    return wide


def differentiable_linears(model, target_modules: list[str]) -> dict[str, torch.nn.Linear]:
    """:func:`target_linears`, a quantised one replaced by its fp32 copy
    (:func:`fp32_linear`): a 4- or 8-bit weight has no gradient, its dense copy does."""
    return {path: fp32_linear(model, path) if is_quantized(linear) else linear
            for path, linear in target_linears(model, target_modules).items()}


@torch.no_grad()
def add_to_weights(model, deltas: dict[str, torch.Tensor]) -> None:
    """W <- W + delta for every module path of ``deltas``, in fp32 copies of the layers
    (see Fp32Linear): the model's own layers are left as they were."""
    modules = dict(model.named_modules())
    for path, delta in deltas.items():
        if not isinstance(modules.get(path), torch.nn.Linear):
            raise FedLoraError(f"cannot add to {path}: the model has no such linear module")
        weight = fp32_linear(model, path).weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise FedLoraError(f"the change to {path} has shape {tuple(delta.shape)}, "
                               f"its weight {tuple(weight.shape)}")
        weight += delta.float().to(weight.device)


@torch.no_grad()
def merge_lora(model, factors: dict[str, torch.Tensor]) -> None:
    """W <- W + B @ A for every (lora_A, lora_B) pair of ``factors`` (keys as module_path
    reads them): FLoRA's merge of a round's stacked delta. The merged layers are fp32
    copies whatever the model's dtype (see Fp32Linear), so merges accumulate exactly to
    fp32 rounding on a bf16 GPU model too, and on a quantised one relative to its
    dequantised weights; every client trains on the base the server evaluates, and the
    model's own layers are left as they were."""
    device = next(model.parameters()).device  # the products on the model's device
    for key, A in factors.items():
        if key.endswith(".lora_A.weight"):
            B = factors[key.replace(".lora_A.", ".lora_B.")]
            add_to_weights(model, {module_path(key): B.float().to(device) @ A.float().to(device)})
