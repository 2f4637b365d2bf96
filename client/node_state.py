"""What a client node keeps between messages, in Flower's per-node ``context.state`` (which
outlives a message even in deployment, where each message starts a fresh process): the
client-side twin of strategies/kept.py.

- kept batches: tensors the server sent once for the whole run (``frozen/...``, loaded
  into every adapter; ``merge/...``, LoRA stacks merged into the base weights);
- the version of the base delta it holds (a dense change to the base weights, by module
  path). The delta itself is the same for every node of a run (:class:`BaseDeltas`): it
  is kept once per process and once per machine on disk, not in each node's state, which
  Flower's simulation holds in one process for every node and ships with every message;
- personal tensors: what the client trains and keeps for itself (plan ``personal``);
- error-feedback residuals: what the codec did not send, for either fate of the last reply.

All of it belongs to one run: a plan that names another starts from an empty state
(:func:`join_run`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict

from fedlora import wire
from fedlora.codec import Codec, decode_payload, encode_payload
from fedlora.errors import FedLoraError

KEPT = "fedlora-kept"  # the context.state record that holds kept tensors
PERSONAL = "fedlora-personal"  # trained tensors that never leave the client (plan "personal")
BASE_DELTA_VERSION = "fedlora-base-delta-version"  # how many increments it sums
RUN = "fedlora-run"  # the run the node state belongs to
RESIDUAL = "fedlora-residual"  # the error-feedback residual, for either fate of the last reply
RESIDUAL_ROUND = "fedlora-residual-round"  # and the round of that reply


def join_run(context: Context, run_name: str) -> None:
    """Node state belongs to one run: a plan that names another (the next strategy of a
    comparison, served by the same simulated nodes) starts from an empty state."""
    record = context.state.get(RUN)
    if isinstance(record, ConfigRecord) and record.get("name") == run_name:
        return
    context.state.clear()
    context.state[RUN] = ConfigRecord({"name": run_name})


def keep_tensors(context: Context, message_keep: ArrayRecord | None, batches: int):
    """Add the message's kept tensors to the node's store; return (frozen, merges).

    Raises FedLoraError if the store lacks a batch the plan says exists (the node lost its
    state): the server then sends everything again next time.
    """
    store = context.state.get(KEPT)
    if not isinstance(store, ArrayRecord):
        store = ArrayRecord()
    for key, value in (message_keep or {}).items():
        store[key] = value
    context.state[KEPT] = store
    held = {int(key.split("/", 1)[0]) for key in store}
    missing = sorted(set(range(batches)) - held)
    if missing:
        raise FedLoraError(f"this client lacks kept batches {missing}; the server resends them")
    frozen, merges = {}, [{} for _ in range(batches)]
    for key, array in store.items():
        batch, kind, name = key.split("/", 2)
        tensor = torch.from_numpy(array.numpy().copy())
        if kind == "frozen":
            frozen[name] = tensor
        elif int(batch) < batches:
            merges[int(batch)][name] = tensor
    return frozen, merges


class BaseDeltas:
    """The base deltas of the runs this machine serves, by run and version, kept once per
    process (the last two versions of a run in memory) and once per machine (files under
    ``folder``, which a deployment's fresh process per message reads).

    Every node of a run holds the same delta at a version, bit for bit (strategies/kept.py:
    an increment is added to the previous version as the server adds it, a whole delta is
    the server's), so one copy serves them all. Only a version and the one before it are
    ever built on: older ones are deleted.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.memory: dict[tuple[str, int], dict[str, torch.Tensor]] = {}

    def get(self, run: str, version: int) -> dict[str, torch.Tensor] | None:
        """The delta of ``run`` at ``version`` ({} at version 0), or None if this machine
        lacks it."""
        if version == 0:
            return {}
        if (run, version) not in self.memory:
            from safetensors.torch import load_file

            try:
                self.memory[(run, version)] = load_file(self.path(run, version))
            except (FileNotFoundError, OSError):
                return None
        return self.memory[(run, version)]

    def put(self, run: str, version: int, delta: dict[str, torch.Tensor]) -> None:
        """Keep ``delta`` as ``run``'s version ``version``; forget versions before the one
        below it."""
        from safetensors.torch import save_file

        path = self.path(run, version)
        if not path.is_file():  # written whole, then renamed: a reader never sees half
            path.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=path.parent, suffix=".partial")
            os.close(handle)
            save_file({k: v.contiguous() for k, v in delta.items()}, partial)
            os.replace(partial, path)
        self.memory[(run, version)] = delta
        for key in [k for k in self.memory if k[0] == run and k[1] < version - 1]:
            del self.memory[key]
        for old in path.parent.glob("*.safetensors"):
            if int(old.stem) < version - 1:
                old.unlink(missing_ok=True)

    def path(self, run: str, version: int) -> Path:
        return self.folder / run / f"{version}.safetensors"


BASE_DELTAS = BaseDeltas(Path(tempfile.gettempdir()) / "fedlora-base-delta")


def run_key(context: Context) -> str:
    """The run a node's state belongs to, unique on this machine: Flower's run id (new for
    each run, a resumed one too) and the run's name (the runs of a comparison share a
    Flower run)."""
    record = context.state.get(RUN)
    name = record.get("name", "") if isinstance(record, ConfigRecord) else ""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{context.run_id}-{name}")


def held_base_delta(context: Context, content: RecordDict, version: int) -> dict[str, torch.Tensor]:
    """The dense change to the base weights this node holds once the message's part of it
    is added (plan ``base-delta-version``; none at version 0), by module path.

    Raises FedLoraError if the message builds on a version the node does not hold (it
    lost its state, or this machine its copy): the server then sends the whole delta
    next time.
    """
    held = context.state.get(BASE_DELTA_VERSION)
    held = int(held["version"]) if isinstance(held, ConfigRecord) else 0
    run = run_key(context)
    sent = sent_base_delta(content)
    if sent is not None:
        start, sent = sent
        if start not in (0, held):
            raise FedLoraError(f"the base delta sent builds on version {start}, this client holds "
                               f"version {held}; the server resends it whole")
        delta = sent if start == 0 else BASE_DELTAS.get(run, version)
        if delta is None:  # no node of this machine has built this version yet
            before = BASE_DELTAS.get(run, held)
            if before is None:
                raise FedLoraError(f"this machine lost base delta version {held}; the server "
                                   "resends it whole")
            delta = {path: before[path] + sent[path] for path in sent}
        BASE_DELTAS.put(run, version, delta)
        held = version
        context.state[BASE_DELTA_VERSION] = ConfigRecord({"version": held})
    if held != version:
        raise FedLoraError(f"this client holds base delta version {held}, the plan says {version}; "
                           "the server resends it whole")
    delta = BASE_DELTAS.get(run, version)
    if delta is None:
        raise FedLoraError(f"this machine lost base delta version {version}; the server resends "
                           "it whole")
    return delta


def sent_base_delta(content: RecordDict) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The base delta a message carries, decoded, and the version it builds on (0: it is
    the whole delta); None when it carries none."""
    if not isinstance(content.get(wire.BASE_DELTA), ArrayRecord):
        return None
    header = dict(content[wire.BASE_DELTA_CODEC])
    start = int(header.pop(wire.FROM))
    return start, decode_payload({k: a.numpy() for k, a in content[wire.BASE_DELTA].items()}, header)


def personal_tensors(context: Context) -> dict[str, torch.Tensor]:
    """The tensors this client keeps for itself (plan ``personal``): none before it trained."""
    stored = context.state.get(PERSONAL)
    return stored.to_torch_state_dict() if isinstance(stored, ArrayRecord) else {}


def keep_personal(context: Context, tensors: dict[str, torch.Tensor]) -> None:
    """Keep ``tensors`` for this client's next message, never uploaded."""
    context.state[PERSONAL] = ArrayRecord(tensors)


def encode_with_feedback(context: Context, update: dict, codec: Codec, server_round: int,
                         aggregated_round: int):
    """Encode the update plus the residual of earlier rounds (error feedback).

    What the server has not aggregated stays in the residual: after any number of rounds,
    the aggregated replies plus the residual equal the sum of the updates. So two
    residuals are kept until the next message says the reply's fate
    (``aggregated_round``): what the codec did not send, if the server aggregated the
    reply, and everything it carried, if the reply was dropped or late.
    """
    residual = feedback_residual(context, aggregated_round)
    total = {k: v + residual[k] if k in residual else v for k, v in update.items()}
    payload, header = encode_payload(total, codec)
    sent = decode_payload(payload, header)
    context.state[RESIDUAL] = ArrayRecord({
        **{f"aggregated/{k}": total[k] - sent[k] for k in total},
        **{f"dropped/{k}": total[k] for k in total},
    })
    context.state[RESIDUAL_ROUND] = ConfigRecord({"round": server_round})
    return payload, header


def feedback_residual(context: Context, aggregated_round: int) -> dict[str, torch.Tensor]:
    """The residual after this node's last reply, given the last round the server
    aggregated a reply of this node in (none before the first reply)."""
    stored, last = context.state.get(RESIDUAL), context.state.get(RESIDUAL_ROUND)
    if not isinstance(stored, ArrayRecord) or not isinstance(last, ConfigRecord):
        return {}
    fate = "aggregated/" if int(last["round"]) == aggregated_round else "dropped/"
    return {k.removeprefix(fate): v for k, v in stored.to_torch_state_dict().items()
            if k.startswith(fate)}
