"""What a usable client reply is: held to its plan. No error, usable metrics, a client
identity, the DP-SGD settings its plan gives it, the codec the plan named, finite tensors
that decode to the shapes expected (the LoRA shapes of the rank it announces, at most the
plan's, for a method of mixed ranks). Each check raises FedLoraError with the reason the
server logs when it drops the reply: the field, its value and what the plan said."""

from __future__ import annotations

import math

from collections.abc import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from fedlora import wire
from fedlora.adapters import check_adapter_state
from fedlora.codec import Codec, decode_payload
from fedlora.errors import FedLoraError
from fedlora.privacy import Privacy
from fedlora.wire import check_no_error, client_identity, reply_metrics


def lora_shapes(module_shapes: dict[str, tuple[int, int]], rank: int) -> dict[str, tuple[int, int]]:
    """peft's keys and shapes of a rank-``rank`` LoRA on modules of (out, in) shapes."""
    shapes = {}
    for path, (out_features, in_features) in module_shapes.items():
        shapes[f"base_model.model.{path}.lora_A.weight"] = (rank, in_features)
        shapes[f"base_model.model.{path}.lora_B.weight"] = (out_features, rank)
    return shapes


def announced_rank(metrics: MetricRecord, highest: int = 4096) -> int:
    """The LoRA rank a reply announces, or FedLoraError unless it is in [1, highest]."""
    rank = metrics.get(wire.RANK)
    if not isinstance(rank, int) or not 1 <= rank <= highest:
        raise FedLoraError(f"the reply announces no valid '{wire.RANK}' in [1, {highest}] (got {rank!r})")
    return rank


def check_dpsgd_metrics(metrics: MetricRecord, privacy: Privacy, num_examples: int) -> None:
    """Raise FedLoraError unless a DP-SGD client reported the settings its plan gives it
    (``privacy``: the run's; ``num_examples``: its examples): its steps and Poisson rate
    exactly, a noise multiplier at least the plan's (more noise protects more)."""
    noise, rate, steps = (metrics.get(k) for k in (wire.DP_NOISE, wire.DP_SAMPLE_RATE, wire.DP_STEPS))
    if not isinstance(noise, float) or not 0.0 <= noise < math.inf:
        raise FedLoraError(f"'{wire.DP_NOISE}' must be a finite float >= 0, got {noise!r}")
    if not isinstance(rate, float) or not 0.0 < rate <= 1.0:
        raise FedLoraError(f"'{wire.DP_SAMPLE_RATE}' must be a float in (0, 1], got {rate!r}")
    if not isinstance(steps, int) or steps < 0:
        raise FedLoraError(f"'{wire.DP_STEPS}' must be an int >= 0, got {steps!r}")
    planned_noise, planned_rate = privacy.dpsgd_terms(num_examples)
    if steps != privacy.local_steps:
        raise FedLoraError(f"'{wire.DP_STEPS}' {steps} differs from the plan's "
                           f"{privacy.local_steps} (--local-steps)")
    if rate != planned_rate:
        raise FedLoraError(f"'{wire.DP_SAMPLE_RATE}' {rate!r} differs from the plan's "
                           f"{planned_rate!r} (--batch-size {privacy.batch_size} over its "
                           f"{num_examples} examples)")
    if noise < planned_noise:
        raise FedLoraError(f"'{wire.DP_NOISE}' {noise!r} is below the plan's {planned_noise!r}")


def decode_reply(reply: Message, expected_shapes: Callable[[MetricRecord], dict],
                 codec: Codec, weighted_by_key: str = wire.NUM_EXAMPLES,
                 dpsgd: Privacy | None = None) -> dict[str, torch.Tensor]:
    """A training reply's decoded tensors, or FedLoraError saying why it is unusable.

    ``expected_shapes(metrics)`` gives the keys and shapes the tensors must have;
    ``codec`` is the one the plan named for the reply (a client that picks another, say
    fp32 values of 1e6 where the plan said sign, is refused); ``weighted_by_key`` names
    the metric holding the client's examples; with ``dpsgd`` (the run's sample-level
    settings) the reply must also carry the DP-SGD settings its plan gives it and a client
    identity (for the accountant).
    """
    check_no_error(reply)
    content = reply.content
    if not isinstance(content.get(wire.ARRAYS), ArrayRecord):
        raise FedLoraError(f"the reply has no ArrayRecord '{wire.ARRAYS}'")
    metrics = reply_metrics(reply)
    num_examples = metrics.get(weighted_by_key)
    if not isinstance(num_examples, int) or num_examples <= 0:
        raise FedLoraError(f"'{weighted_by_key}' must be a positive int, got {num_examples!r}")
    for key in (wire.TRAIN_LOSS, wire.TRAIN_SECONDS):
        value = metrics.get(key, 0.0)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FedLoraError(f"'{key}' must be a finite number, got {value!r}")
    for key in (wire.EXAMPLES_CUT, wire.EXAMPLES_LEFT_OUT):
        value = metrics.get(key, 0)
        if not isinstance(value, int) or value < 0:
            raise FedLoraError(f"'{key}' must be a count (an int >= 0), got {value!r}")
    if dpsgd:
        check_dpsgd_metrics(metrics, dpsgd, num_examples)
        client_identity(reply, dpsgd.node_identities)
    if not isinstance(content.get(wire.CODEC), ConfigRecord):
        raise FedLoraError(f"the reply has no ConfigRecord '{wire.CODEC}'")
    named = str(content[wire.CODEC].get("codec", ""))
    if named != codec.name:
        raise FedLoraError(f"'codec' {named!r} differs from the plan's {codec.name!r}")
    try:
        arrays = {k: a.numpy() for k, a in content[wire.ARRAYS].items()}
    except Exception as err:  # a hostile payload can fail in many ways inside Flower
        raise FedLoraError(f"the arrays do not decode: {err}") from None
    expected = expected_shapes(metrics)
    try:
        state = decode_payload(arrays, dict(content[wire.CODEC]), expected)
    except (ValueError, TypeError, IndexError, RuntimeError) as err:  # hostile, not a bug
        raise FedLoraError(f"the payload does not decode: {err}") from None
    check_adapter_state(state, expected)
    return state
