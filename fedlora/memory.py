"""The peak memory of one training client, from the model's shapes alone: what
``python -m fedlora.plan`` reports (docs/results.md, "Planning a run").

A client process holds, at its peak (the start of a training step's backward pass):

- the runtime: Python, torch, transformers, peft and Flower, imported, and the model's
  tokenizer and config loaded (:data:`RUNTIME_BYTES`, measured on this project's machine);
- the base weights: the blocks' linear layers at the model's dtype, or as ``--quantize``
  stores them (:func:`linear_weight_bytes`); embeddings, an untied output head and the norms
  at the model's dtype, fp32 under ``--quantize`` (peft's preparation for training on a
  quantised base), which also makes the activations fp32;
- the adapter's tensors (fp32, trained or frozen), the gradients of the trained ones (fp32)
  and AdamW's two moments of each (fp32);
- what the node keeps between rounds (fp32): frozen factors (FFA, Fed-SB), FLoRA's stacks
  and FedEx-LoRA's base delta, and the fp32 copies of the adapted layers that FLoRA's
  merges and FedEx-LoRA's residuals are added to (``fedlora.adapters.add_to_weights``);
- the activations autograd keeps for the backward pass (:func:`activation_bytes`);
- on the CPU, the heap's retention: glibc's malloc keeps freed temporaries resident (its
  mmap threshold rises to the size of the tensors freed, so later ones come from a heap
  it does not return), :data:`HEAP_RETENTION` of the activations a step saves without
  checkpointing (the same temporaries pass through the heap with it: checkpointing
  recomputes them). ``MALLOC_MMAP_THRESHOLD_=131072`` in a client's environment removes
  it (measured: the forward pass's growth then equals the saved activations to the MiB).

A method with a gradient initialisation round (Fed-SB) peaks either there (a full-weight
fp32 gradient of every adapted layer) or in training, whichever is higher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from fedlora.errors import FedLoraError

# RSS of a client process with torch, transformers, peft and Flower imported and its
# model loaded, less the model's weights: 524 MiB after the imports, 65 more with the
# tokenizer, config and peft (SmolLM2 on this project's CPU machine).
RUNTIME_BYTES = 590 * 2**20
# What glibc's heap keeps resident beyond the saved activations, as a share of them:
# SmolLM2, fp32, LoRA on q and v, 512 and 1,024 tokens, one forward pass: +39 % and +41 %
# (docs/results.md, "Planning a run"; benchmarks/plan_memory.py measures whole steps).
HEAP_RETENTION = 0.4

QUANTIZE = ("none", "nf4", "int8")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
NF4_BLOCK = 64  # weights per absmax in bitsandbytes' 4-bit formats (blocksize 64)

# What each adapted module's input and output are in a Llama-family block (the names peft
# targets): which saved activations an adapter on it adds.
ATTENTION_INPUTS = ("q_proj", "k_proj", "v_proj")  # read the first norm's output
MLP_INPUTS = ("gate_proj", "up_proj")  # read the second norm's output


@dataclass(frozen=True)
class Architecture:
    """The shapes a decoder-only transformer's memory depends on.

    Attributes
    ----------
    layers, hidden, intermediate, heads, kv_heads, head_dim, vocab : int
        The config's ``num_hidden_layers``, ``hidden_size``, ``intermediate_size``,
        ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``, ``vocab_size``.
    linear_params : int
        Weights of every linear layer but the output head: what ``--quantize`` stores in
        4 or 8 bits (bitsandbytes leaves the head, the embeddings and the norms alone).
    linear_rows : int
        Their output features, summed: int8 keeps one fp32 scale per row.
    other_params : int
        Everything else (embeddings, an untied head, norms, biases), at the model's dtype.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    linear_params: int
    linear_rows: int
    other_params: int

    @classmethod
    def of(cls, model) -> Architecture:
        """The architecture of a transformers model (on the meta device: nothing is read)."""
        import torch

        config = model.config
        head = model.get_output_embeddings()
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
        linear_params = sum(m.weight.numel() for m in linears)
        heads = config.num_attention_heads
        return cls(
            layers=config.num_hidden_layers, hidden=config.hidden_size,
            intermediate=config.intermediate_size, heads=heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size, linear_params=linear_params,
            linear_rows=sum(m.out_features for m in linears),
            other_params=sum(p.numel() for p in model.parameters()) - linear_params,
        )


@dataclass(frozen=True)
class ClientMemory:
    """One training client's peak memory, in bytes, by what holds it (see the module).

    ``initialisation`` is the gradient round's full-weight gradient (Fed-SB's): it takes
    the place of the adapter, its gradients and AdamW's moments where it is larger.
    """

    runtime: int
    base_weights: int
    adapter: int
    gradients: int
    optimizer: int
    initialisation: int
    kept: int
    activations: int
    heap: int

    @property
    def total(self) -> int:
        training = max(self.adapter + self.gradients + self.optimizer, self.initialisation)
        return self.runtime + self.base_weights + training + self.kept + self.activations + self.heap

    def as_dict(self) -> dict[str, int]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "total": self.total}


def linear_weight_bytes(params: int, rows: int, dtype: str, quantize: str) -> int:
    """Bytes of ``params`` linear weights in ``rows`` output rows, stored at ``dtype`` or
    as ``quantize`` says.

    nf4: 4 bits per weight plus one fp32 absmax per block of 64 (bitsandbytes' default,
    ``BitsAndBytesConfig(bnb_4bit_use_double_quant=False)``: 0.5625 bytes per weight; double
    quantisation would store the absmax in 8 bits, 0.516). int8 (LLM.int8): one byte per
    weight plus an fp32 scale per row.
    """
    if quantize not in QUANTIZE:
        raise FedLoraError(f"unknown quantize '{quantize}'; valid choices: {', '.join(QUANTIZE)}")
    if quantize == "nf4":
        return params // 2 + 4 * math.ceil(params / NF4_BLOCK)
    if quantize == "int8":
        return params + 4 * rows
    return params * DTYPE_BYTES[dtype]


def activation_bytes(arch: Architecture, tokens: int, keep: int, adapted: list[str],
                     rank: int, dtype: str, gradient_checkpointing: bool = False) -> int:
    """Bytes autograd keeps for the backward pass of one packed row of ``tokens`` tokens
    whose ``keep`` positions get vocabulary logits, with rank-``rank`` LoRA on the modules
    named ``adapted`` in every layer (the base frozen), on the CPU.

    Per layer and token, in values at the model's dtype (s bytes; fp32 where marked),
    h = hidden, i = intermediate, a = heads x head_dim:

    - each RMSNorm whose input needs a gradient: its input (h) and 1/rms (fp32); the first
      layer's first norm reads the embeddings, which need none;
    - the first norm's output (h) where q, k or v has an adapter, the second's where gate or
      up has one (a LoRA keeps its input x for dL/dA; a frozen linear keeps nothing of its
      input);
    - attention (SDPA's CPU kernel): q, and k, v repeated to every head (3a), its output
      (a), its log-sum-exp (heads, fp32) and the packed row's block-diagonal mask (tokens
      values: its size is tokens^2 per layer);
    - the MLP: gate, SiLU(gate) and up (3i), and their product (i) where down has an
      adapter;
    - each adapter's A x (r).

    Once per model: rotary cos and sin (2 head_dim per token), the final norm (h and fp32
    1/rms per token), the kept positions with their targets and their logits, ``keep`` x
    vocab in fp32.

    With ``gradient_checkpointing`` each layer keeps only its input (h per token) and the
    backward pass recomputes one layer at a time: the layers' inputs plus one layer's
    activations. ``tests/test_plan.py`` holds this count to the bytes autograd saves on
    tiny-llama.
    """
    s = DTYPE_BYTES[dtype]
    h, i, a = arch.hidden, arch.intermediate, arch.heads * arch.head_dim
    modules = set(adapted)
    norms = (h * s + 4)  # a norm's input, and 1/rms in fp32
    layer = (2 * norms
             + h * s * (any(m in modules for m in ATTENTION_INPUTS) + any(m in modules for m in MLP_INPUTS))
             + 4 * a * s + 4 * arch.heads + tokens * s
             + i * s * (3 + ("down_proj" in modules))
             + rank * s * len(modules)) * tokens
    # the kept positions and their targets (int64), and their logits in fp32
    model = (2 * arch.head_dim * s + norms) * tokens + 16 * keep + 4 * keep * arch.vocab
    if gradient_checkpointing:
        return arch.layers * h * s * tokens + layer + model
    return arch.layers * layer - norms * tokens + model


def client_memory(arch: Architecture, *, dtype: str, quantize: str, adapter_params: int,
                  trained_params: int, kept_params: int, adapted_params: int,
                  copies_adapted: bool, gradient_params: int, tokens: int, keep: int,
                  adapted: list[str], rank: int, gradient_checkpointing: bool,
                  cpu: bool) -> ClientMemory:
    """The peak of one training client (see the module docstring).

    Parameters
    ----------
    arch : Architecture
    dtype : str
        The base weights' dtype (float32, bfloat16).
    quantize : str
        none, nf4 or int8: how the linear weights are stored (the rest is then fp32).
    adapter_params, trained_params : int
        Values of the adapter's tensors, and of those trained (their gradients and AdamW's
        two moments); all fp32.
    kept_params : int
        Values the node keeps between rounds (frozen factors, stacks, a base delta); fp32.
    adapted_params : int
        Weights of the adapted layers.
    copies_adapted : bool
        Whether the client adds to fp32 copies of the adapted layers (FLoRA, FedEx-LoRA).
    gradient_params : int
        Values of the initialisation round's full-weight gradient (Fed-SB's), at the
        model's dtype and copied to fp32 for the reply where that differs; 0: no such
        round.
    tokens, keep, adapted, rank, gradient_checkpointing
        As :func:`activation_bytes`.
    cpu : bool
        Whether the client trains on the CPU (glibc's heap retention counts there).
    """
    if quantize != "none":
        # fedlora.models.quantized_load: peft's preparation puts all but the 4- or 8-bit
        # layers in fp32, so the activations between them are fp32 too, and Fed-SB's
        # gradient is taken on fp32 copies of the adapted layers
        dtype = "float32"
    s = DTYPE_BYTES[dtype]
    saved = activation_bytes(arch, tokens, keep, adapted, rank, dtype)  # without checkpointing
    return ClientMemory(
        runtime=RUNTIME_BYTES,
        base_weights=(linear_weight_bytes(arch.linear_params, arch.linear_rows, dtype, quantize)
                      + arch.other_params * DTYPE_BYTES[dtype]),
        adapter=4 * adapter_params,
        gradients=4 * trained_params,
        optimizer=8 * trained_params,
        initialisation=(s + 4 * (s != 4)) * gradient_params,
        kept=4 * (kept_params + adapted_params * copies_adapted),
        activations=(activation_bytes(arch, tokens, keep, adapted, rank, dtype, True)
                     if gradient_checkpointing else saved),
        heap=round(HEAP_RETENTION * saved) if cpu else 0,
    )
