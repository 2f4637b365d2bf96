"""Federated evaluation: the messages that ask clients to score the global adapter, and
the pooling of their counts (a bad reply is logged and left out)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from fedlora import wire
from fedlora.errors import FedLoraError
from fedlora.evaluate import METRICS, Scores
from fedlora.wire import Plan, check_no_error, client_identity, reply_metrics
from strategies.kept import KeptTensors

if TYPE_CHECKING:
    from fedlora.data import Example

log = logging.getLogger("fedlora")

# Central evaluation in the clients' processes splits the examples into at most this many
# shares: past the few actors a simulation runs, more shares add only messages, each with
# the adapter and the whole base delta (1,000 clients and 200 reviews made 200 shares of
# one review: 59 s a round, against 14 s in the server process).
MAX_EVAL_SHARES = 16


def example_shards(examples: list, count: int) -> list[list]:
    """``examples`` in at most ``count`` contiguous, non-empty shares of near-equal size."""
    count = max(1, min(count, len(examples)))
    size, extra = divmod(len(examples), count)
    bounds = [i * size + min(i, extra) for i in range(count + 1)]
    return [examples[a:b] for a, b in zip(bounds, bounds[1:])]


def evaluation_messages(plan: Plan, adapter: ArrayRecord, nodes: list[int],
                        kept: KeptTensors, examples: list[Example] | None = None) -> list[Message]:
    """One EVALUATE message per node: the plan and the PEFT ``adapter``, with the base
    delta where the node's own is behind, to score on its held-out slice.

    With ``examples`` (central evaluation in the clients' processes) the first nodes, at
    most ``MAX_EVAL_SHARES``, are sent shares of those instead (plan ``eval-examples``,
    ``eval-shard``), with the whole base delta, which they use for this evaluation only.
    """
    if examples is None:
        record = plan.to_record()
        return [Message(content=RecordDict({wire.CONFIG: record, wire.ARRAYS: adapter,
                                            **kept.base_delta_for(node)}),
                        message_type=MessageType.EVALUATE, dst_node_id=node)
                for node in nodes]
    base_delta = kept.whole_base_delta()
    messages = []
    shares = example_shards(examples, min(len(nodes), MAX_EVAL_SHARES))
    for shard, (node, part) in enumerate(zip(nodes, shares)):
        shard_plan = dataclasses.replace(plan, eval_shard=shard, eval_examples=part)
        messages.append(Message(content=RecordDict({wire.CONFIG: shard_plan.to_record(),
                                                    wire.ARRAYS: adapter, **base_delta}),
                                message_type=MessageType.EVALUATE, dst_node_id=node))
    return messages


def pool_evaluations(server_round: int, replies: Iterable[Message], num_labels: int,
                     kept: KeptTensors) -> tuple[MetricRecord | None, dict[str, Scores]]:
    """The clients' counts pooled: (``fed_eval_*`` metrics of the pooled held-out data,
    ``fed_eval_accuracy_min`` (or ``..._exact_match_min``) of the worst client and
    ``fed_eval_clients``, or None when no reply is usable; each client's counts by
    client-id). A node whose reply is left out is sent its base delta again next time."""
    by_client: dict[str, Scores] = {}
    for reply in replies:
        try:
            check_no_error(reply)
            metrics = reply_metrics(reply)
            client = client_identity(reply)
            if client in by_client:
                raise FedLoraError(f"a second reply names itself client '{client}'")
            by_client[client] = Scores.from_record(metrics, num_labels)
            kept.confirm(reply.metadata.src_node_id)  # it holds the base delta it was sent
        except FedLoraError as err:
            kept.forget(reply.metadata.src_node_id)  # it may have lost its base delta
            log.warning("round %d evaluation: left out node %d: %s", server_round,
                        reply.metadata.src_node_id, err)
    reports = list(by_client.values())
    if not reports:
        return None, by_client
    pooled = sum(reports[1:], reports[0])
    metrics = pooled.metrics("fed_eval_")
    for metric in METRICS:  # the worst client's figure, where the table asks for it
        if metric.worst_client and f"fed_eval_{metric.name}" in metrics:
            metrics[f"fed_eval_{metric.name}_min"] = min(r.metrics("")[metric.name] for r in reports)
    return MetricRecord({**metrics, "fed_eval_clients": len(reports)}), by_client
