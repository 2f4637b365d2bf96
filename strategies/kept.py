"""What the clients keep for the whole run, and what each node still lacks of it.

Two kinds of kept tensors, each sent to a node once:

- **batches**, an append-only list of ``{kind/name: tensor}``: ``frozen/...`` (adapter
  factors that are never trained: FFA's A, Fed-SB's A and B) and ``merge/...`` (LoRA
  stacks whose product each client merges into its base weights: FLoRA). They travel in
  fp32; a node is sent the batches it lacks.
- **a base delta**: one dense change per adapted module, added to every client's base
  weights (FedEx-LoRA's residuals). It is the sum of the increments added so far (its
  version counts them) and travels by the download codec; the part a lossy codec leaves
  out is carried into the next increment, so the clients' bases drift from the exact
  sum by at most one increment's codec error. A node one version behind is sent the
  latest increment; one further behind (or new, or restarted) is sent the whole delta
  in fp32, so that every client holds bit for bit what the server holds.

What a node holds counts as delivered only once it replied (:meth:`KeptTensors.confirm`):
a node whose message may never have arrived, or whose reply was lost, is sent its kept
batches again and the whole base delta, which is right whatever it holds.

The server evaluates and saves the base delta with the global adapter (server/evaluation.py,
server/outputs.py).
"""

from __future__ import annotations

from flwr.app import Array, ArrayRecord, ConfigRecord

from fedlora import wire
from fedlora.aggregate import State
from fedlora.codec import FP32, Codec, decode_payload, encode_payload


class KeptTensors:
    """The kept batches and the base delta of one run, and what each node holds.

    Parameters
    ----------
    codec : Codec
        How base-delta increments travel (the strategy's download codec).
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.batches: list[State] = []
        self.node_batches: dict[int, int] = {}  # node id -> batches it holds (it replied)
        self.base_delta: State = {}  # by module path, fp32: what every client adds
        self.base_version = 0  # increments summed into base_delta
        self.increment: tuple[dict, dict] | None = None  # the last increment, encoded
        self.carry: State = {}  # what the codec left out of the increments so far
        self.node_versions: dict[int, int] = {}  # node id -> base-delta version it holds
        # What went to a node since its last reply: it holds it once it replies.
        self.sent_batches: dict[int, int] = {}
        self.sent_versions: dict[int, int] = {}

    def add_batch(self, batch: State) -> None:
        """Append a batch (keys ``frozen/...`` or ``merge/...``)."""
        self.batches.append(batch)

    def add_to_base(self, delta: State) -> State:
        """Add ``delta`` (by module path) to the base delta, as the codec sends it; returns
        the increment the clients receive (``delta`` plus the carried codec loss, decoded)."""
        wanted = {path: value.float() + self.carry.get(path, 0.0) for path, value in delta.items()}
        payload, header = encode_payload(wanted, self.codec)
        sent = decode_payload(payload, header)
        self.carry = {path: wanted[path] - sent[path] for path in wanted}
        self.increment = (payload, header)
        self.base_delta = {path: self.base_delta[path] + sent[path] if path in self.base_delta
                           else sent[path] for path in sent}
        self.base_version += 1
        return sent

    def batches_for(self, node_id: int) -> dict:
        """The message part ``keep``: the batches ``node_id`` is not known to hold."""
        first = self.node_batches.get(node_id, 0)
        keep = {f"{i}/{key}": value
                for i, batch in enumerate(self.batches[first:], start=first)
                for key, value in batch.items()}
        self.sent_batches[node_id] = len(self.batches)
        return {wire.KEEP: ArrayRecord(keep)}

    def base_delta_for(self, node_id: int) -> dict:
        """The message parts that bring the base delta of ``node_id`` up to date, none
        where it is known to be: ``base-delta`` and its ``base-delta-codec`` header, whose
        ``from`` is the version the payload builds on (0: the whole delta). A node that
        did not confirm a newer version sent to it may hold either: it gets the whole."""
        held = self.node_versions.get(node_id, 0)
        unknown = self.sent_versions.get(node_id, held) != held
        self.sent_versions[node_id] = self.base_version
        if held == self.base_version and not unknown:
            return {}
        if held == self.base_version - 1 and not unknown and self.increment is not None:
            payload, header = self.increment
            return {wire.BASE_DELTA: ArrayRecord({k: Array(v) for k, v in payload.items()}),
                    wire.BASE_DELTA_CODEC: ConfigRecord({**header, wire.FROM: held})}
        return self.whole_base_delta()

    def confirm(self, node_id: int) -> None:
        """``node_id`` replied: it holds what it was last sent."""
        if node_id in self.sent_batches:
            self.node_batches[node_id] = self.sent_batches.pop(node_id)
        if node_id in self.sent_versions:
            self.node_versions[node_id] = self.sent_versions.pop(node_id)

    def whole_base_delta(self) -> dict:
        """The message parts that carry the whole base delta, exactly (fp32, ``from`` 0);
        none before the first increment."""
        if not self.base_version:
            return {}
        payload, header = encode_payload(self.base_delta, FP32())
        return {wire.BASE_DELTA: ArrayRecord({k: Array(v) for k, v in payload.items()}),
                wire.BASE_DELTA_CODEC: ConfigRecord({**header, wire.FROM: 0})}

    def forget(self, node_id: int) -> None:
        """The node may have lost what it kept (a failed reply): send it everything again."""
        self.node_batches.pop(node_id, None)
        self.node_versions.pop(node_id, None)
        self.sent_batches.pop(node_id, None)
        self.sent_versions.pop(node_id, None)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "base_delta": self.base_delta,
                "base_version": self.base_version, "carry": self.carry}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint: the clients of a resumed run are taken to hold nothing."""
        self.batches = state["batches"]
        self.base_delta, self.base_version = state["base_delta"], state["base_version"]
        self.carry, self.increment = state["carry"], None
        self.node_batches, self.node_versions = {}, {}
        self.sent_batches, self.sent_versions = {}, {}

