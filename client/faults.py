"""Fault injection for tests and fire drills: make chosen clients fail, or turn hostile,
on purpose.

``FEDLORA_INJECT_FAULTS="raise:0@1,hang:1@2,exit:2@1"`` makes the client of partition 0
raise in round 1, partition 1 hang in round 2 for ``FEDLORA_HANG_SECONDS`` (default 3600,
so that the server's round timeout passes it by) and partition 2's process die in round 1.
The hostile kinds make a client's training reply what an attacker would send, to see what
it does to a run and what stops it (docs/privacy.md):

- ``header``: the payload's header names another codec than the plan's;
- ``nan``: a NaN among the values (encoded past the encoder's refusal);
- ``dp-lie``: DP-SGD settings claiming 2^62 steps and no noise;
- ``rank``: a LoRA rank of 4096 announced;
- ``scale``: the update multiplied by 1,000 (``--max-update-norm`` bounds it).

The variables reach the clients through the environment, in a simulation (Ray workers) and
on a SuperNode alike. Unset, nothing happens. (Flower's simulation engine waits for a hung
client before it returns, so a simulation test hangs a client only for a little longer
than the round timeout.) A fault may name the run it is for, ``raise:1@2@part``: then it
fires only in the run of that ``--name`` (two runs served by one simulation).
"""

from __future__ import annotations

import math
import os
import time

from fedlora import wire
from fedlora.codec import Codec, payload_header

VARIABLE = "FEDLORA_INJECT_FAULTS"
FAILURES = ("raise", "hang", "exit")
HOSTILE = ("header", "nan", "dp-lie", "rank", "scale")
KINDS = FAILURES + HOSTILE


def faults_for(partition_id: int, server_round: int, run_name: str = "") -> list[str]:
    """The kinds of fault the environment asks of this partition, round and run."""
    kinds = []
    for fault in filter(None, os.environ.get(VARIABLE, "").split(",")):
        kind, _, where = fault.partition(":")
        partition, _, rest = where.partition("@")
        round_, _, run = rest.partition("@")
        if kind not in KINDS or not partition.isdigit() or not round_.isdigit():
            raise ValueError(f"{VARIABLE}: bad fault '{fault}'; expected KIND:PARTITION@ROUND"
                             f"[@RUN], KIND one of {', '.join(KINDS)}")
        if (int(partition), int(round_)) == (partition_id, server_round) and run in ("", run_name):
            kinds.append(kind)
    return kinds


def inject(partition_id: int, server_round: int, run_name: str = "") -> None:
    """Fail now if the environment asks for a failure at this partition and round (and run)."""
    for kind in faults_for(partition_id, server_round, run_name):
        if kind == "raise":
            raise RuntimeError(f"injected fault: partition {partition_id} raises in round {server_round}")
        if kind == "hang":
            time.sleep(float(os.environ.get("FEDLORA_HANG_SECONDS", "3600")))
            return
        if kind == "exit":
            os._exit(1)  # the process dies without a reply


def scaled(upload: dict) -> dict:
    """The ``scale`` drill's update: the honest one times 1,000."""
    return {k: v * 1000 for k, v in upload.items()}


def hostile(kinds: list[str], upload: dict, codec: Codec, metrics: dict):
    """The payload, header and metrics of a training reply as the ``kinds`` of attacker
    would send them, instead of the honest client's (``upload`` before encoding)."""
    if "scale" in kinds:
        upload = scaled(upload)
    if "nan" in kinds:
        first = sorted(upload)[0]
        poisoned = upload[first].clone()
        poisoned.view(-1)[0] = math.nan
        upload = {**upload, first: poisoned}
    payload, header = codec.encode(upload), payload_header(upload, codec)
    if "header" in kinds:
        header = {**header, "codec": "fp16" if codec.name != "fp16" else "fp32"}
    metrics = dict(metrics)
    if "dp-lie" in kinds:
        metrics.update({wire.DP_STEPS: 2**62, wire.DP_NOISE: 0.0})
    if "rank" in kinds:
        metrics[wire.RANK] = 4096
    return payload, header, metrics
