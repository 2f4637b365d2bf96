"""The numbers behind secure aggregation (Flower's SecAgg+, docs/privacy.md): the range a
client's values are clipped to and quantised in, what bounds them, and the error of the
securely aggregated mean. Pure functions; the protocol itself is Flower's
(server/secure.py runs it).

SecAgg+ sums integers. Each client multiplies its values x by its weight ratio
r_k = w_k / ``MAX_WEIGHT``, clips them to [-c, c] (the clipping range), quantises them by
stochastic rounding to ``levels`` steps of 2c / levels, masks and sends them; the server
unmasks the sum and divides by sum_k r_k (which travels the same way as one more value).
Unbiased rounding moves each value by less than one step, so the weighted mean moves by
less than n * step / sum_k r_k over n clients: :func:`error_bound`. The clip is exact, not
a bound, only where every value already lies within c: :func:`adam_update_bound` gives
such a c for an update of local AdamW steps without weight decay (fedlora's), whatever the
data; an L2 clip C (``--dp-clip`` under user-level DP, ``--max-update-norm``) bounds every
value by C too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# A client's weight (its examples) over MAX_WEIGHT is its ratio r_k <= 1, quantised like
# the values: a power of two no larger than the levels keeps w_k * levels / MAX_WEIGHT an
# integer, so the weights travel exactly. 2^20 examples per client at most.
MAX_WEIGHT = 2**20
MODULUS = 2**32  # masks and sums are taken modulo this (Flower's largest)
MAX_LEVELS = 2**30  # Flower rounds in int32: a quantised value must stay below 2^31
MIN_CLIENTS = 3  # two clients would each learn the other's update from the sum


@dataclass(frozen=True)
class SecureRanges:
    """SecAgg+'s fixed-point settings for one round.

    Attributes
    ----------
    clip : float
        c: every value a client sends (times its weight ratio) is clipped to [-c, c].
    levels : int
        The quantisation steps across [-c, c] (Flower's ``quantization_range``).
    """

    clip: float
    levels: int

    @property
    def step(self) -> float:
        return 2 * self.clip / self.levels


def secure_ranges(clients: int, clip: float) -> SecureRanges:
    """The ranges for a round of ``clients`` sampled clients whose values lie within
    ``clip``: as many levels as the modulus leaves room for (the sum of n quantised values
    must stay below 2^31 of the 2^32 modulus, so it never wraps), at most ``MAX_LEVELS``,
    at least ``MAX_WEIGHT`` (exact weights); ValueError beyond 2^11 clients a round."""
    if clients < 1 or not clip > 0:
        raise ValueError(f"clients {clients} and clip {clip} must be positive")
    levels = min(MAX_LEVELS, 2 ** (31 - math.ceil(math.log2(clients))))
    if levels < MAX_WEIGHT:
        raise ValueError(f"{clients} clients in one secure round: at most "
                         f"{2 ** (31 - int(math.log2(MAX_WEIGHT)))}")
    return SecureRanges(clip=float(clip), levels=levels)


def adam_update_bound(lr: float, steps: int, betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The largest change ``steps`` Adam(W) steps without weight decay can make to one
    value, whatever the gradients: sum over t of lr * b(t).

    Adam's step t is lr * m_hat / (sqrt(v_hat) + eps) with m_t = (1 - b1) sum_i b1^(t-i) g_i
    and v_t = (1 - b2) sum_i b2^(t-i) g_i^2. Cauchy-Schwarz on m_t, weighing each g_i by
    sqrt((1 - b2) b2^(t-i)), gives |m_t| / sqrt(v_t) <= (1 - b1) / sqrt(1 - b2) *
    sqrt(sum_{k<t} (b1^2 / b2)^k), and the bias corrections multiply that by
    sqrt(1 - b2^t) / (1 - b1^t); eps only shrinks the step. Step 1 is at most lr; with
    torch's default betas, later steps approach 7.3 lr.
    """
    b1, b2 = betas
    total, series = 0.0, 0.0
    for t in range(1, steps + 1):
        series += (b1 * b1 / b2) ** (t - 1)
        ratio = (1 - b1) / math.sqrt(1 - b2) * math.sqrt(series)
        total += lr * math.sqrt(1 - b2**t) / (1 - b1**t) * ratio
    return total


def error_bound(ranges: SecureRanges, weights: list[int]) -> float:
    """The most one value of the securely aggregated weighted mean can differ from the
    exact sum_k w_k x_k / sum_k w_k of the same clients (``weights``: their w_k, which
    travel exactly), when no value was clipped: n steps over sum_k r_k."""
    ratios = sum(w / MAX_WEIGHT for w in weights)
    return len(weights) * ranges.step / ratios if ratios else math.inf


def update_bound(config) -> float:
    """The clipping range of a training round of ``config`` (a RunConfig, the strategy's
    learning rate resolved): what bounds every value of a client's update, the least of
    the AdamW bound over ``--local-steps`` and the L2 clip the client applies itself
    (``--dp-clip`` under user-level DP, ``--max-update-norm``)."""
    bounds = [adam_update_bound(config.lr, config.local_steps)]
    if config.dp == "user":
        bounds.append(config.dp_clip)
    if config.max_update_norm:
        bounds.append(config.max_update_norm)
    return min(bounds)
