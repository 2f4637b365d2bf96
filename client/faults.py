"""Fault injection for tests and fire drills: make chosen clients fail on purpose.

``FEDLORA_INJECT_FAULTS="raise:0@1,hang:1@2,exit:2@1"`` makes the client of partition 0
raise in round 1, partition 1 hang in round 2 for ``FEDLORA_HANG_SECONDS`` (default 3600,
so that the server's round timeout passes it by) and partition 2's process die in round 1.
The variables reach the clients through the environment, in a simulation (Ray workers) and
on a SuperNode alike. Unset, nothing happens. (Flower's simulation engine waits for a hung
client before it returns, so a simulation test hangs a client only for a little longer
than the round timeout.) A fault may name the run it is for, ``raise:1@2@part``: then it
fires only in the run of that ``--name`` (two runs served by one simulation).
"""

from __future__ import annotations

import os
import time

VARIABLE = "FEDLORA_INJECT_FAULTS"
KINDS = ("raise", "hang", "exit")


def inject(partition_id: int, server_round: int, run_name: str = "") -> None:
    """Fail now if the environment asks for a fault at this partition and round (and run)."""
    for fault in filter(None, os.environ.get(VARIABLE, "").split(",")):
        kind, _, where = fault.partition(":")
        partition, _, rest = where.partition("@")
        round_, _, run = rest.partition("@")
        if kind not in KINDS or not partition.isdigit() or not round_.isdigit():
            raise ValueError(f"{VARIABLE}: bad fault '{fault}'; expected KIND:PARTITION@ROUND"
                             f"[@RUN], KIND one of {', '.join(KINDS)}")
        if (int(partition), int(round_)) != (partition_id, server_round) or run not in ("", run_name):
            continue
        if kind == "raise":
            raise RuntimeError(f"injected fault: partition {partition_id} raises in round {server_round}")
        if kind == "hang":
            time.sleep(float(os.environ.get("FEDLORA_HANG_SECONDS", "3600")))
            return
        os._exit(1)  # "exit": the process dies without a reply
