"""Batches and local training (AdamW on the trainable adapter tensors); evaluation is in
fedlora.evaluate.

A batch has one of two layouts. Padded: one row per example, padded on the left so that
every example ends at the last position; the model then computes vocabulary logits only
from just before the earliest answer token on (``logits_to_keep``: the last ``max answer
length + 1`` positions of single-turn examples), which is where the loss and the
label-word choice live. That keeps a 135M-parameter model with a 49k
vocabulary cheap on a CPU. Packed: the examples one after another in a single row, with
no padding; training uses it wherever the model keeps packed sequences apart (see
:func:`packs_sequences`), because padding is a third of a padded batch's tokens on short
reviews. DP-SGD (one row per example, for per-example gradients) and generation need the
padded layout.
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
from fedlora.prompts import fitted


@dataclass
class Batch:
    """Token ids, and ``labels`` that are -100 except on answer tokens.

    Padded (``packed`` false): one row per example, left-padded; ``keep`` (an int) is how
    many final positions need logits (from just before a row's first answer token). Packed:
    all examples in one row, no attention mask; each example's ``position_ids`` restart at
    0, from which transformers builds a block-diagonal causal mask, so that no example sees
    another; ``keep`` (a tensor) holds the positions whose logits predict an answer token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    position_ids: torch.Tensor
    labels: torch.Tensor
    keep: int | torch.Tensor

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def answer_tokens(self) -> int:
        """How many tokens the loss covers."""
        return int((self.labels != -100).sum())

    def to(self, device: torch.device) -> Batch:
        return Batch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in vars(self).items()})


def make_batch(examples: list[Example], tokenizer, max_length: int, packed: bool = False,
               chat: bool = False) -> Batch:
    """Tokenize each example (:func:`fedlora.prompts.encode`: a plain prompt, cut from the
    left to fit, and its answer ending with end-of-sequence; or a conversation through the
    chat template, every assistant turn an answer; ``chat``: single-turn examples through
    the template too) and lay the examples out padded on the left (or ``packed``, see
    :class:`Batch`)."""
    rows = []
    for example in examples:
        encoded = fitted(example, tokenizer, max_length, chat)
        labels = [t if answer else -100 for t, answer in zip(encoded.ids, encoded.answer_mask)]
        rows.append((encoded.ids, labels))
    if packed:
        return _packed_batch(rows)
    input_ids, attention_mask, position_ids = left_padded([ids for ids, _ in rows],
                                                          tokenizer.pad_token_id)
    labels = left_padded([row_labels for _, row_labels in rows], -100)[0]
    answered = (labels != -100).any(dim=0).nonzero()
    return Batch(input_ids, attention_mask, position_ids, labels,
                 keep=labels.shape[1] - int(answered[0]) + 1 if len(answered) else 1)


def left_padded(rows: list[list[int]], pad_id: int):
    """Token rows padded on the left with ``pad_id`` to one width: (ids, attention mask,
    position ids), so that every row ends at the last position."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask, (mask.cumsum(dim=1) - 1).clamp(min=0)


def _packed_batch(rows: list[tuple[list[int], list[int]]]) -> Batch:
    ids, positions, labels = [], [], []
    for row, row_labels in rows:
        ids += row
        positions += range(len(row))
        labels += row_labels
    labels, positions = torch.tensor([labels]), torch.tensor([positions])
    # Position i predicts token i + 1, so the logits needed are those just before each
    # answer token, within the same example.
    keep = torch.nonzero((labels[0, 1:] != -100) & (positions[0, 1:] != 0)).flatten()
    return Batch(torch.tensor([ids]), None, positions, labels, keep=keep)


def packs_sequences(model) -> bool:
    """Whether ``model`` keeps the examples of a packed batch apart.

    transformers' models that build their masks with ``masking_utils`` read packed
    sequences from position ids that restart; a model that does not would let each example
    attend to the ones before it, silently. Checked once per model class and attention
    implementation: the logits of a 4-token sequence after a 3-token one, packed, must be
    those of the sequence alone, far closer to them than the same 7 tokens run as one
    sequence are (which is what a model blind to packing computes).
    """
    model = transformers_model(model)
    key = (type(model), getattr(model.config, "_attn_implementation", None))
    if key not in _PACKING:
        vocab = model.config.vocab_size
        device = next(model.parameters()).device
        ids = torch.tensor([[11, 12, 13, 14, 15, 16, 17]], device=device) % vocab
        def logits(input_ids, positions):  # noqa: E306
            out = model(input_ids=input_ids, position_ids=torch.tensor([positions], device=device),
                        attention_mask=None, use_cache=False)
            return out.logits[0, -4:].float()
        training = model.training
        model.eval()  # no dropout
        with torch.no_grad():
            alone = logits(ids[:, 3:], [0, 1, 2, 3])
            packed = (logits(ids, [0, 1, 2, 0, 1, 2, 3]) - alone).abs().max()
            joined = (logits(ids, [0, 1, 2, 3, 4, 5, 6]) - alone).abs().max()
        model.train(training)
        _PACKING[key] = bool(packed <= 0.01 * joined)
    return _PACKING[key]


_PACKING: dict[tuple, bool] = {}  # packs_sequences' answers, a cache


def transformers_model(model):
    """The transformers model inside peft's wrapper (or ``model`` itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


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
    """Logits that predict answer tokens, and those tokens (-100 where a padded batch's
    shorter answers leave a kept position unused); ``fp32_head`` as in
    :func:`forward_logits`."""
    out = forward_logits(
        model, fp32_head,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        logits_to_keep=batch.keep,
        use_cache=False,  # one pass over whole sequences: nothing to reuse
    )
    if batch.packed:
        return out.logits, batch.labels[:, batch.keep + 1]
    # Position i predicts token i + 1: the kept logits but the last predict the kept
    # tokens but the first.
    return out.logits[:, :-1], batch.labels[:, -batch.keep + 1 :]


def check_finite(loss: torch.Tensor, lr: float) -> None:
    """Raise FedLoraError if training diverged."""
    if not math.isfinite(loss.item()):
        raise FedLoraError(f"training loss became {loss.item()}; lower --lr (now {lr})")


def answer_loss(model, batch: Batch, per_example: bool = False,
                reduction: str = "mean") -> torch.Tensor:
    """Mean cross-entropy over the batch's answer tokens (``reduction="sum"``: their sum);
    with ``per_example``, the mean over examples of each example's mean, so that the batch
    loss is a mean of per-example losses, as per-example gradient clipping (DP-SGD) needs
    (and a padded batch)."""
    if per_example and batch.packed:
        raise ValueError("per-example losses need a padded batch (one row per example)")
    logits, targets = answer_logits(model, batch)
    if not per_example:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               reduction=reduction)
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
    chat: bool = False,
    micro_batch_size: int = 0,
) -> dict[str, float]:
    """Train the model's trainable tensors for ``steps`` AdamW steps on ``examples``.

    Batches are drawn from seeded reshuffles of ``examples``, packed where the model allows
    (:func:`packs_sequences`; the same loss, without padding). With ``dpsgd``, each step is
    DP-SGD through Opacus instead: each example joins the batch with probability
    ``dpsgd.sample_rate`` (Poisson sampling, which the accountant assumes), per-example
    gradients are clipped to ``dpsgd.clip`` and their sum gets N(0, (noise * clip)^2)
    before AdamW; sampling and noise come from ``dpsgd``'s own seeds, not ``seed``, which
    the server knows. With ``gradient_checkpointing``, each layer's activations are
    recomputed in the backward pass instead of kept (Hugging Face's, non-reentrant: the
    frozen base needs no input gradients), and checkpointing is switched off again after.
    ``chat``: single-turn examples through the chat template (:func:`make_batch`). With
    ``micro_batch_size``, a batch's examples go through the model that many at a time and
    their gradients add up (each micro-batch's loss summed over its answer tokens, divided
    by the whole batch's): the same step up to float rounding, with one micro-batch's
    activations held at a time.
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
    hf_model = transformers_model(model)
    packed = dpsgd is None and packs_sequences(model)
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
            chosen = [examples[i] for i in chosen]
            if dpsgd is not None:
                with warnings.catch_warnings():  # Opacus' hooks on layers whose inputs need no grad
                    warnings.filterwarnings("ignore", "Full backward hook is firing")
                    loss = answer_loss(model, make_batch(chosen, tokenizer, max_length, False, chat)
                                       .to(device), per_example=True)
                    check_finite(loss, lr)
                    loss.backward()
            else:
                step = micro_batch_size or len(chosen)
                batches = [make_batch(chosen[i : i + step], tokenizer, max_length, packed, chat)
                           for i in range(0, len(chosen), step)]
                tokens = sum(b.answer_tokens for b in batches)
                loss = 0.0
                for batch in batches:  # one batch: its mean, as torch computes it
                    part = (answer_loss(model, batch.to(device)) if len(batches) == 1 else
                            answer_loss(model, batch.to(device), reduction="sum") / tokens)
                    check_finite(part, lr)
                    part.backward()
                    loss += part.detach()
            optimizer.step()
            losses.append(float(loss))
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
    chat: bool = False,
) -> dict[str, torch.Tensor]:
    """sum over batches of d(mean batch loss)/dW for each linear layer W in ``linears``
    (by path): the full-weight gradient LoRA-SB's initialisation starts from. Batches are
    packed where the model allows (:func:`packs_sequences`)."""
    if not examples:
        raise FedLoraError("this client has no training examples")
    weights = {path: linear.weight for path, linear in linears.items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    packed = packs_sequences(model)
    try:
        for begin in range(0, len(examples), batch_size):
            batch = make_batch(examples[begin : begin + batch_size], tokenizer, max_length,
                               packed, chat)
            answer_loss(model, batch.to(device)).backward()
        return {f"{path}.weight": w.grad.detach().to("cpu", torch.float32) for path, w in weights.items()}
    finally:
        for weight in weights.values():
            weight.requires_grad_(False)
            weight.grad = None
