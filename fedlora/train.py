"""Batches and local training (AdamW on the trainable adapter tensors); evaluation is in
fedlora.evaluate.

Sequences are left-padded so that every answer ends at the last position: the model then
computes vocabulary logits only for the last ``max answer length + 1`` positions
(``logits_to_keep``), which is where the loss and the label-word choice live. That keeps a
135M-parameter model with a 49k vocabulary cheap on a CPU.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fedlora.data import Example
from fedlora.errors import FedLoraError
from fedlora.privacy import DPSGD, make_private


@dataclass
class Batch:
    """Left-padded token ids; ``labels`` is -100 except on answer tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    answer_lengths: torch.Tensor
    keep: int  # how many final positions need logits

    def to(self, device: torch.device) -> Batch:
        tensors = {k: v.to(device) for k, v in vars(self).items() if torch.is_tensor(v)}
        return Batch(**tensors, keep=self.keep)


def make_batch(examples: list[Example], tokenizer, max_length: int) -> Batch:
    """Tokenize prompt + answer, cut the prompt from the left to fit, pad on the left.

    A non-empty answer ends with the end-of-sequence token (see :func:`answer_ids`)."""
    prompts = tokenizer([e.prompt for e in examples], add_special_tokens=True).input_ids
    rows = []
    for example, prompt in zip(examples, prompts):
        answer = answer_ids(tokenizer, example.answer)[: max_length // 2]
        prompt = prompt[-(max_length - len(answer)) :]  # keep the question at the prompt's end
        rows.append((prompt + answer, len(answer)))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (ids, answer_length) in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        attention_mask[i, width - len(ids) :] = 1
        labels[i, width - answer_length :] = torch.tensor(ids[len(ids) - answer_length :])
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    answer_lengths = torch.tensor([a for _, a in rows])
    return Batch(
        input_ids, attention_mask, position_ids, labels, answer_lengths,
        keep=int(answer_lengths.max()) + 1,
    )


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The tokens of an answer, ending with end-of-sequence: a label word is then a whole
    answer, not a prefix of a longer one ("good" of "good fun"), and greedy decoding learns
    where a response stops."""
    if not answer:
        return []
    ids = tokenizer(answer, add_special_tokens=False).input_ids
    return ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])


def forward_logits(model, fp32_head: bool = False, **inputs):
    """The model's output on ``inputs``, its logits in fp32.

    With ``fp32_head`` the output head of a bf16 (or fp16) model runs in fp32 on the final
    hidden states it receives: bf16 logits keep 8 bits of mantissa, so close label scores
    tie there and argmax picks the first label.
    """
    head = model.get_output_embeddings() if fp32_head else None
    if head is not None and head.weight.dtype == torch.float32:
        head = None  # the model's own logits are fp32 already
    head_inputs = []
    hook = None if head is None else head.register_forward_hook(
        lambda _, args, __: head_inputs.append(args[0]))
    try:
        out = model(**inputs)
    finally:
        if hook is not None:
            hook.remove()
    if head is not None:
        bias = None if head.bias is None else head.bias.float()
        out.logits = F.linear(head_inputs[-1].float(), head.weight.float(), bias)
    out.logits = out.logits.float()
    return out


def answer_logits(model, batch: Batch, fp32_head: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits that predict each answer token, and those tokens (shape: batch x keep-1);
    ``fp32_head`` as in :func:`forward_logits`."""
    out = forward_logits(
        model, fp32_head,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep,
        use_cache=False,  # one pass over whole sequences: nothing to reuse
    )
    # Position i predicts token i + 1: the kept logits but the last predict the kept
    # tokens but the first.
    return out.logits[:, :-1], batch.labels[:, -batch.keep + 1 :]


def answer_loss(model, batch: Batch, per_example: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the batch's answer tokens; with ``per_example``, the mean
    over examples of each example's mean, so that the batch loss is a mean of per-example
    losses, as per-example gradient clipping (DP-SGD) needs."""
    logits, targets = answer_logits(model, batch)
    if not per_example:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    losses = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")  # 0 at -100
    answer_tokens = (targets != -100).sum(dim=1)
    return (losses.sum(dim=1) / answer_tokens).mean()


def train_local(
    model,
    tokenizer,
    examples: list[Example],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    max_length: int,
    seed: int,
    device: torch.device,
    dpsgd: DPSGD | None = None,
    gradient_checkpointing: bool = False,
) -> dict[str, float]:
    """Train the model's trainable tensors for ``steps`` AdamW steps on ``examples``.

    Batches are drawn from seeded reshuffles of ``examples``. With ``dpsgd``, each step is
    DP-SGD through Opacus instead: each example joins the batch with probability
    ``dpsgd.sample_rate`` (Poisson sampling, which the accountant assumes), per-example
    gradients are clipped to ``dpsgd.clip`` and their sum gets N(0, (noise * clip)^2)
    before AdamW; sampling and noise come from ``dpsgd``'s own seeds, not ``seed``, which
    the server knows. With ``gradient_checkpointing``, each layer's activations are
    recomputed in the backward pass instead of kept (Hugging Face's, non-reentrant: the
    frozen base needs no input gradients), and checkpointing is switched off again after.
    Returns the mean, first and last batch loss and the seconds spent.
    """
    if not examples:
        raise FedLoraError("this client has no training examples")
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed if dpsgd is None else dpsgd.sampling_seed)
    if dpsgd is not None:
        model, optimizer = make_private(
            model, optimizer, dpsgd, round(dpsgd.sample_rate * len(examples)), device
        )
    order = torch.empty(0, dtype=torch.long)
    losses = []
    start = time.perf_counter()
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft's
    if gradient_checkpointing:
        hf_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        for _ in range(steps):
            if dpsgd is not None:
                chosen = torch.nonzero(torch.rand(len(examples), generator=generator) < dpsgd.sample_rate)
                chosen = chosen.flatten()
            else:
                while len(order) < batch_size:
                    order = torch.cat([order, torch.randperm(len(examples), generator=generator)])
                chosen, order = order[:batch_size], order[batch_size:]
            optimizer.zero_grad(set_to_none=True)
            if len(chosen) == 0:  # an empty Poisson sample: the step is the noise alone
                for parameter in parameters:
                    parameter.grad_sample = parameter.new_zeros((0, *parameter.shape))
                optimizer.step()
                continue
            batch = make_batch([examples[i] for i in chosen], tokenizer, max_length).to(device)
            with warnings.catch_warnings():  # Opacus' hooks on layers whose inputs need no grad
                warnings.filterwarnings("ignore", "Full backward hook is firing")
                loss = answer_loss(model, batch, per_example=dpsgd is not None)
                if not math.isfinite(loss.item()):
                    raise FedLoraError(f"training loss became {loss.item()}; lower --lr (now {lr})")
                loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        if dpsgd is not None:
            model.remove_hooks()
        if gradient_checkpointing:
            hf_model.gradient_checkpointing_disable()
    model.eval()
    return {
        "train_loss": sum(losses) / len(losses) if losses else math.nan,
        "first_loss": losses[0] if losses else math.nan,
        "last_loss": losses[-1] if losses else math.nan,
        "train_seconds": time.perf_counter() - start,
    }


def weight_gradients(
    model,
    tokenizer,
    examples: list[Example],
    linears: dict[str, torch.nn.Module],
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """sum over batches of d(mean batch loss)/dW for each linear layer W in ``linears``
    (by path): the full-weight gradient LoRA-SB's initialisation starts from."""
    if not examples:
        raise FedLoraError("this client has no training examples")
    weights = {path: linear.weight for path, linear in linears.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    try:
        for begin in range(0, len(examples), batch_size):
            batch = make_batch(examples[begin : begin + batch_size], tokenizer, max_length)
            answer_loss(model, batch.to(device)).backward()
        return {f"{path}.weight": w.grad.detach().to("cpu", torch.float32) for path, w in weights.items()}
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
            weight.grad = None
