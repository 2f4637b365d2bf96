"""Seeds of the run's random streams, each derived from what it is for.

Every per-client, per-round stream (batch order, a fresh LoRA's initialisation, DP-SGD's
sampling and noise) gets its seed from the tuple (run seed, round, partition, purpose)
through numpy's SeedSequence, which hashes the whole tuple. Arithmetic such as
``seed + 1000 * round + partition`` collides (client p + 1000 in round r is client p in
round r + 1); distinct tuples here give independent 63-bit seeds.
"""

from __future__ import annotations

import zlib

import numpy as np


def stream_seed(seed: int, *parts: int | str) -> int:
    """A 63-bit seed for the stream named by ``seed`` and ``parts`` (ints >= 0 and
    names, e.g. ``stream_seed(0, 3, 12, "batches")``)."""
    entropy = [int(seed)]
    for part in parts:  # a name becomes its CRC-32, tagged so that it never equals an int
        entropy += [1, zlib.crc32(part.encode())] if isinstance(part, str) else [0, int(part)]
    high, low = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(high) << 32 | int(low)) >> 1  # below 2**63: fits torch and numpy
