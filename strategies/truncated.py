"""What HetLoRA and FlexLoRA share: one global LoRA at the largest client rank, of which
each client trains the leading components its own rank holds."""

from __future__ import annotations

import dataclasses

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedlora import wire
from fedlora.aggregate import State, truncate_lora
from fedlora.wire import Plan
from strategies.base import LoraStrategy, TrafficShapes
from strategies.replies import announced_rank, lora_shapes


class TruncatedRankLoRA(LoraStrategy):
    """Clients of different ranks r_k <= R = max(ranks) on one global LoRA of rank R.

    Every client attaches a LoRA of its own rank at one scale s = alpha / R (so that a
    component means the same whatever the rank: the plan's ``lora-scale``), loads the
    first r_k components of the global factors (A's rows, B's columns; the plan's
    ``truncate-to-rank``), trains them and uploads them. A subclass turns those
    uploads into the new global factors (``aggregate_states``). Once a node's rank is
    known from its reply, it is sent only its own components.

    Parameters
    ----------
    ranks : tuple of int (default: (8,))
        Client ranks, cycled over the clients by partition id (a client's ``rank``
        node-config value overrides it, up to R); R is the largest.
    **kwargs
        See LoraStrategy; ``rank`` is replaced by R.
    """

    abstract = True  # HetLoRA and FlexLoRA give the math
    heterogeneous_ranks = True
    upload = "weights"  # factors of the client's own rank, not an update of the global's

    def __init__(self, ranks: tuple[int, ...] = (8,), **kwargs) -> None:
        kwargs["rank"] = max(ranks)
        super().__init__(**kwargs)
        self.ranks = tuple(ranks)
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.node_ranks: dict[int, int] = {}  # node id -> rank its last reply announced

    @classmethod
    def config_arguments(cls, config) -> dict:
        return {**super().config_arguments(config), "ranks": tuple(config.rank_list)}

    def initialize(self, model) -> ArrayRecord:
        self.module_shapes = self.adapted_shapes(model)
        return super().initialize(model)  # a fresh LoRA of rank R

    def initialize_shapes(self, model) -> TrafficShapes:
        self.module_shapes = self.adapted_shapes(model)
        return super().initialize_shapes(model)  # a fresh LoRA of rank R

    def plan(self, config: ConfigRecord, server_round: int, task: str) -> Plan:
        plan = super().plan(config, server_round, task)
        plan.run = dataclasses.replace(plan.run, ranks=",".join(map(str, self.ranks)))
        plan.lora_scale, plan.truncate_to_rank = float(self.scale), True
        return plan

    def node_arrays(self, node_id: int, sent: State) -> State:
        rank = self.node_ranks.get(node_id)
        return truncate_lora(sent, rank) if rank else sent

    def expected_shapes(self, metrics: MetricRecord) -> dict[str, tuple[int, ...]]:
        return lora_shapes(self.module_shapes, announced_rank(metrics, self.rank))

    def secure_shapes(self) -> dict[str, tuple[int, ...]]:
        return lora_shapes(self.module_shapes, self.rank)  # every client's padded to R

    def record_reply(self, node_id: int, metrics: MetricRecord) -> None:
        self.node_ranks[node_id] = int(metrics[wire.RANK])
