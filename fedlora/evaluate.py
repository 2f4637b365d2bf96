"""Evaluation: label scores by whole-sequence log-likelihood, greedy generation, and the
counts every metric is computed from.

A classification example is scored as multiple-choice evaluation harnesses do: each
label's whole token sequence after the prompt gets its log-likelihood, and the most
likely label is the model's answer. Labels may thus have several tokens, share their
first ones, and number in the dozens. The prompt runs once; each label continues it from
the KV cache.

Every answer, label word or response, ends with the end-of-sequence token (as in
training): a label that is a prefix of another ("good", "good fun") is then a complete
answer of its own, not a sure part of the longer one.

Every metric comes from :class:`Scores`, counts that add up across batches and across
clients: federated evaluation sums the clients' counts, so its loss, accuracy and
macro-F1 are those of the pooled held-out data, computed exactly.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from fedlora.data import Example
from fedlora.errors import FedLoraError
from fedlora.prompts import label_answer_ids, prompt_ids
from fedlora.train import answer_logits, forward_logits, left_padded, make_batch

# GSM8K-style solutions end in "#### 42"; a generation without it answers with its last number.
FINAL_ANSWER = re.compile(r"####\s*(-?[\d,]*\.?\d+)")
NUMBER = re.compile(r"-?[\d,]*\.?\d+")
PUNCTUATION = frozenset(string.punctuation)  # what SQuAD's normalisation removes


@dataclass
class Scores:
    """Counts of one evaluation; ``+`` pools two of them.

    ``label_counts[c]``, ``predicted_counts[c]`` and ``correct_counts[c]``: examples of
    label c, examples predicted as c, and both (classification only). ``numeric_examples``:
    responses that end in a numeric answer (``#### 42``), ``numeric_matches`` of them
    answered with that number.
    """

    examples: int = 0
    loss_sum: float = 0.0  # cross-entropy summed over the true answers' tokens
    tokens: int = 0
    label_counts: list[int] = field(default_factory=list)
    predicted_counts: list[int] = field(default_factory=list)
    correct_counts: list[int] = field(default_factory=list)
    generated: int = 0  # examples decoded (prompt/response data)
    exact_matches: int = 0
    token_f1_sum: float = 0.0
    rouge_l_sum: float = 0.0
    numeric_examples: int = 0
    numeric_matches: int = 0

    def __add__(self, other: Scores) -> Scores:
        def add(a, b):
            if isinstance(a, list):
                return [x + y for x, y in zip(a, b, strict=True)] if a and b else a or b
            return a + b

        return Scores(**{f.name: add(getattr(self, f.name), getattr(other, f.name))
                         for f in fields(self)})

    def metrics(self, prefix: str = "eval_") -> dict[str, float]:
        """Every figure of :data:`METRICS` these counts give (loss per answer token; with
        labels accuracy, macro-F1 and the accuracy of always answering the most common
        label; with generation exact match, token F1, ROUGE-L and numeric match), each key
        with ``prefix``."""
        return {prefix + m.name: value for m in METRICS if (value := m.value(self)) is not None}

    def to_record(self) -> dict:
        """The counts as MetricRecord values (dashed keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != []}

    @classmethod
    def from_record(cls, record, num_labels: int) -> Scores:
        """Counts from a client's MetricRecord, or FedLoraError saying why they are unusable
        (a hostile or broken client must not skew the pooled figures)."""
        values = {}
        for f in fields(cls):
            key = f.name.replace("_", "-")
            value = record.get(key, [] if f.name.endswith("counts") else 0)
            if f.name.endswith("_sum"):
                ok = isinstance(value, (int, float)) and math.isfinite(value) and value >= 0
            elif f.name.endswith("counts"):
                ok = isinstance(value, list) and all(isinstance(v, int) and v >= 0 for v in value)
            else:
                ok = isinstance(value, int) and value >= 0
            if not ok:
                raise FedLoraError(f"evaluation count '{key}' is unusable: {value!r}")
            values[f.name] = value
        scores = cls(**values)
        scores.check(num_labels)
        return scores

    def check(self, num_labels: int) -> None:
        """Raise FedLoraError unless the counts are consistent with each other."""
        if self.examples < 1 or self.tokens < 1:
            raise FedLoraError("the evaluation covers no examples")
        counts = (self.label_counts, self.predicted_counts, self.correct_counts)
        if num_labels:
            if any(len(c) != num_labels for c in counts):
                raise FedLoraError(f"label counts must have {num_labels} entries, one per label")
            if sum(self.label_counts) != self.examples or sum(self.predicted_counts) != self.examples:
                raise FedLoraError("label counts do not add up to the examples evaluated")
            if any(c > min(t, p) for t, p, c in zip(*counts)):
                raise FedLoraError("a label has more correct answers than examples or predictions")
        elif any(counts):
            raise FedLoraError("label counts sent for a task without labels")
        if not (self.exact_matches <= self.generated <= self.examples
                and self.numeric_matches <= self.numeric_examples <= self.generated
                and max(self.token_f1_sum, self.rouge_l_sum) <= self.generated):
            raise FedLoraError("generation counts exceed the examples evaluated")


def macro_f1(label_counts: list[int], predicted_counts: list[int],
             correct_counts: list[int]) -> float:
    """Mean F1 over the labels that occur in the truth or the predictions (as
    scikit-learn's ``f1_score(average="macro")``); F1 = 2 correct / (true + predicted)."""
    scores = [2 * c / (t + p) for t, p, c in zip(label_counts, predicted_counts, correct_counts)
              if t + p]
    return sum(scores) / len(scores)


Column = tuple[str, int, str]  # a round-table column: heading, width, format spec
PREFIXES = ("eval_", "val_", "fed_eval_")  # central evaluation, validation, federated


@dataclass(frozen=True)
class Metric:
    """One evaluation figure, everything about it in one place.

    Parameters
    ----------
    name : str
        Its key in metrics.jsonl, after the evaluation's prefix (``eval_``, ``val_``,
        ``fed_eval_``).
    value : callable
        The figure from pooled :class:`Scores` counts (federated evaluation pools the
        clients' counts, so every figure is that of the pooled data), or None where the
        counts do not give it.
    higher_is_better : bool
        Which way is better (a grid value is chosen on it).
    task : str
        "any", "labels" (classification) or "generation": the round table shows it only
        for its task.
    columns : dict
        Its round-table column by evaluation prefix: (heading, width, format).
    headline : int or None
        Its rank as a run's headline figure (the report's and the comparison's main
        panel, the figure a grid value is chosen on): the lowest rank a run has wins.
    bounds : (float, float)
        The range the figure can take (its confidence intervals are cut to it).
    worst_client : bool
        Federated evaluation also reports the worst client's figure (``..._min``)...
    worst_column : Column or None
        ... shown in this round-table column.
    chance : str or None
        The figure that is its chance line on the report (accuracy: always answering the
        most common label), and a comparison's column beside it.
    beside : str or None
        A figure a comparison shows beside it (accuracy: macro-F1).
    """

    name: str
    value: Callable[[Scores], float | None]
    higher_is_better: bool
    task: str = "any"
    columns: dict[str, Column] = field(default_factory=dict)
    headline: int | None = None
    bounds: tuple[float, float] = (0.0, 1.0)
    worst_client: bool = False
    worst_column: Column | None = None
    chance: str | None = None
    beside: str | None = None


METRICS = (
    Metric("loss", lambda s: s.loss_sum / s.tokens if s.tokens else math.nan, False,
           columns={"eval_": ("eval loss", 9, ".4f"), "val_": ("val loss", 9, ".4f"),
                    "fed_eval_": ("fed loss", 9, ".4f")}, headline=2, bounds=(0.0, math.inf)),
    Metric("accuracy", lambda s: sum(s.correct_counts) / s.examples if s.label_counts else None,
           True, "labels", {"eval_": ("accuracy", 8, ".3f"), "val_": ("val acc", 7, ".3f"),
                            "fed_eval_": ("fed acc", 7, ".3f")},
           headline=0, worst_client=True, worst_column=("fed min", 7, ".3f"),
           chance="majority_accuracy", beside="macro_f1"),
    Metric("macro_f1", lambda s: macro_f1(s.label_counts, s.predicted_counts, s.correct_counts)
           if s.label_counts else None, True, "labels", {"eval_": ("macro-F1", 8, ".3f")}),
    Metric("majority_accuracy", lambda s: max(s.label_counts) / s.examples if s.label_counts
           else None, True, "labels"),
    Metric("exact_match", lambda s: s.exact_matches / s.generated if s.generated else None, True,
           "generation", {"eval_": ("exact match", 11, ".3f"), "val_": ("val exact", 9, ".3f"),
                          "fed_eval_": ("fed exact", 9, ".3f")}, headline=1, worst_client=True),
    Metric("token_f1", lambda s: s.token_f1_sum / s.generated if s.generated else None, True,
           "generation", {"eval_": ("token F1", 8, ".3f"), "fed_eval_": ("fed F1", 7, ".3f")}),
    Metric("rouge_l", lambda s: s.rouge_l_sum / s.generated if s.generated else None, True,
           "generation", {"eval_": ("ROUGE-L", 7, ".3f"), "fed_eval_": ("fed R-L", 7, ".3f")}),
    Metric("numeric_match", lambda s: s.numeric_matches / s.numeric_examples
           if s.numeric_examples else None, True, "generation"),
)


def headline_keys(prefixes: tuple[str, ...] = ("eval_", "fed_eval_")) -> list[tuple[str, Metric]]:
    """(key, metric) of the figures that can head a run, best first: each headline metric
    under each of ``prefixes`` (central before federated)."""
    ranked = sorted((m for m in METRICS if m.headline is not None), key=lambda m: m.headline)
    return [(prefix + m.name, m) for m in ranked for prefix in prefixes]


def headline_metric(key: str) -> Metric | None:
    """The metric of a headline figure's key (``eval_accuracy``: accuracy), or None."""
    return next((metric for headline, metric in headline_keys(PREFIXES) if headline == key), None)


def metric_columns() -> list[tuple[str, str, Metric, Column]]:
    """The round table's evaluation columns: (key, prefix, metric, column), by prefix in
    :data:`PREFIXES` order, each prefix's metrics in table order, the worst client's
    figure after its federated one."""
    out = []
    for prefix in PREFIXES:
        for metric in METRICS:
            if prefix in metric.columns:
                out.append((prefix + metric.name, prefix, metric, metric.columns[prefix]))
            if prefix == "fed_eval_" and metric.worst_column:
                out.append((f"{prefix}{metric.name}_min", prefix, metric, metric.worst_column))
    return out


def normalize_answer(text: str) -> str:
    """Lower case, whitespace runs collapsed: what exact match compares."""
    return " ".join(text.split()).lower()


def squad_tokens(text: str) -> list[str]:
    """SQuAD's answer normalisation, as words: lower case, punctuation and the articles
    a, an, the removed."""
    text = "".join(c for c in text.lower() if c not in PUNCTUATION)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def token_f1(generated: str, reference: str) -> float:
    """SQuAD's token-level F1 of a generation against its reference (1 where both
    normalise to nothing, 0 where only one does)."""
    predicted, truth = squad_tokens(generated), squad_tokens(reference)
    if not predicted or not truth:
        return float(predicted == truth)
    common = sum((Counter(predicted) & Counter(truth)).values())
    if not common:
        return 0.0
    precision, recall = common / len(predicted), common / len(truth)
    return 2 * precision * recall / (precision + recall)


def rouge_l(generated: str, reference: str) -> float:
    """ROUGE-L F-measure (longest common subsequence of words), by Google's reference
    implementation (``rouge-score``; its tokenizer keeps lower-case ASCII letters and
    digits only)."""
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"]).score(reference, generated)["rougeL"].fmeasure


def final_number(text: str, marked_only: bool = False) -> str | None:
    """The numeric answer of a text: after ``####`` if present, else (unless
    ``marked_only``) its last number; commas and a trailing ".0" dropped."""
    marked = FINAL_ANSWER.findall(text)
    found = marked or ([] if marked_only else NUMBER.findall(text))
    if not found:
        return None
    number = found[-1].replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number or "0"


@torch.no_grad()
def score(
    model,
    tokenizer,
    examples: list[Example],
    label_words: list[str] | None,
    *,
    batch_size: int,
    max_length: int,
    device: torch.device,
    max_new_tokens: int = 0,
    chat: bool = False,
) -> Scores:
    """The counts of ``examples``: labels scored by log-likelihood, or answer loss (every
    assistant turn of a conversation) and, with ``max_new_tokens``, greedy generations of
    each example's (last) answer matched against it. Logits are computed in fp32 whatever
    the model's dtype. ``chat``: single-turn examples through the chat template
    (fedlora.prompts). Examples are batched in order of length, so that a batch pads
    little: the counts do not depend on the order."""
    model.eval()
    total = Scores()
    label_ids = label_answer_ids(tokenizer, label_words, chat) if label_words else None
    prompts = [prompt_ids(e, tokenizer, max_length, chat) for e in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    for begin in range(0, len(examples), batch_size):
        chosen = order[begin : begin + batch_size]
        chunk, chunk_prompts = [examples[i] for i in chosen], [prompts[i] for i in chosen]
        if label_ids:
            total += _score_labels(model, chunk, chunk_prompts, label_ids, max_length, device)
            continue
        batch = make_batch(chunk, tokenizer, max_length, chat=chat).to(device)
        logits, targets = answer_logits(model, batch, fp32_head=True)
        mask = targets != -100
        total += Scores(examples=len(chunk), tokens=int(mask.sum()),
                        loss_sum=F.cross_entropy(logits[mask], targets[mask], reduction="sum").item())
        if max_new_tokens:
            total += _score_generations(model, tokenizer, chunk, chunk_prompts, max_length,
                                        max_new_tokens, device)
    return total


def evaluate(model, tokenizer, examples, label_words, **kwargs) -> dict[str, float]:
    """:func:`score`'s metrics (``eval_loss``, ``eval_accuracy``, ...)."""
    return score(model, tokenizer, examples, label_words, **kwargs).metrics()


def label_log_likelihoods(model, prompts: list[list[int]], label_ids: list[list[int]],
                          max_length: int, device: torch.device, pad_id: int = 0) -> torch.Tensor:
    """log p(answer | prompt) of each label's answer tokens
    (:func:`fedlora.prompts.label_answer_ids`) after each prompt's tokens
    (:func:`fedlora.prompts.prompt_ids`), summed over them: shape (prompts, labels).

    Prompts are cut from the left to leave room for the longest label, then run once;
    each label's tokens continue from the KV cache, which is rewound after each label.
    """
    room = max(1, max_length - max(map(len, label_ids)))
    input_ids, mask, positions = (t.to(device) for t in left_padded(
        [ids[-room:] for ids in prompts], pad_id))
    width = input_ids.shape[1]
    out = forward_logits(model, True, input_ids=input_ids, attention_mask=mask,
                         position_ids=positions, use_cache=True, logits_to_keep=1)
    first = out.logits[:, -1].log_softmax(dim=-1)  # predicts every label's first token
    # transformers 5 calls the KV cache ``cache``, 4.x ``past_key_values``
    name = "cache" if "cache" in out.keys() else "past_key_values"
    cache = out[name]
    scores = torch.empty((len(prompts), len(label_ids)), device=device)
    for j, ids in enumerate(label_ids):
        scores[:, j] = first[:, ids[0]]
        if len(ids) == 1:
            continue
        rest = torch.tensor(ids[:-1], device=device).expand(len(prompts), -1)
        out = forward_logits(
            model, True, input_ids=rest, **{name: cache}, use_cache=True,
            attention_mask=torch.cat([mask, torch.ones_like(rest)], dim=1),
            position_ids=positions[:, -1:] + 1 + torch.arange(len(ids) - 1, device=device),
        )
        following = torch.tensor(ids[1:], device=device)
        scores[:, j] += out.logits.log_softmax(dim=-1)[:, torch.arange(len(ids) - 1), following].sum(dim=1)
        _rewind(cache, width)
    return scores


def _rewind(cache, length: int) -> None:
    """Cut a KV cache back to ``length`` positions (a negative crop removes that many
    tokens, in transformers 4.x and 5 alike)."""
    cache.crop(length - cache.get_seq_length())


def _score_labels(model, chunk, prompts, label_ids, max_length, device) -> Scores:
    scores = label_log_likelihoods(model, prompts, label_ids, max_length, device)
    truth = torch.tensor([e.label for e in chunk], device=device)
    predicted = scores.argmax(dim=1)
    n = len(label_ids)
    return Scores(
        examples=len(chunk),
        loss_sum=-scores[torch.arange(len(chunk)), truth].sum().item(),
        tokens=sum(len(label_ids[e.label]) for e in chunk),
        label_counts=torch.bincount(truth, minlength=n).tolist(),
        predicted_counts=torch.bincount(predicted, minlength=n).tolist(),
        correct_counts=torch.bincount(truth[predicted == truth], minlength=n).tolist(),
    )


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a generation: end-of-sequence, and the model's own (a chat
    model's end of turn, where it differs)."""
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return sorted(i for i in ids if i is not None)


def _score_generations(model, tokenizer, chunk, prompts, max_length, max_new_tokens,
                       device) -> Scores:
    """Greedy decoding after each prompt (batched, left-padded, with the KV cache),
    scored against each example's answer."""
    from transformers import GenerationConfig

    input_ids, mask, _ = (t.to(device) for t in left_padded(
        [ids[-max_length:] for ids in prompts], tokenizer.pad_token_id))
    settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id,
                                eos_token_id=stop_token_ids(model, tokenizer))
    output = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=settings)
    texts = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
    scores = Scores(generated=len(chunk))
    for example, text in zip(chunk, texts):
        scores.exact_matches += normalize_answer(text) == normalize_answer(example.answer)
        scores.token_f1_sum += token_f1(text, example.answer)
        scores.rouge_l_sum += rouge_l(text, example.answer)
        expected = final_number(example.answer, marked_only=True)
        if expected is not None:
            scores.numeric_examples += 1
            scores.numeric_matches += final_number(text) == expected
    return scores
