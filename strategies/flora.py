"""FLoRA: stacking aggregation, exact for clients of different LoRA ranks."""

from __future__ import annotations

import dataclasses

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedlora import wire
from fedlora.aggregate import State, concat_lora, delta_weights, stack_lora
from fedlora.errors import FedLoraError
from fedlora.wire import Plan
from strategies.base import LoraStrategy, TrafficShapes
from strategies.replies import announced_rank, lora_shapes


class FLoRA(LoraStrategy):
    """Stack the clients' LoRA factors and merge the stack into the global base weights.

    Each round every sampled client attaches a fresh LoRA of its own rank r_k to the
    current global base model, trains it and uploads A_k, B_k. The server stacks
    A = [p_1 s_1 A_1; ...; p_K s_K A_K] and B = [B_1, ..., B_K], so that
    B A = sum_k p_k s_k B_k A_k exactly for any ranks, and keeps the stack. The client's
    scale s_k is alpha / r_k (``scale="per-rank"``, peft's: a low-rank client's
    components weigh more) or alpha / rank for every client (``"uniform"``; the FLoRA
    reference sets alpha_k = 2 r_k, which is s_k = 2 whatever the rank). Every client
    merges all stacks into its base weights before the next round; a client that missed
    rounds is sent every stack it lacks (Wang et al., FLoRA, 2024).

    The global adapter is the concatenation of all rounds' stacks: a PEFT LoRA of rank
    sum over rounds of sum_k r_k and scale 1.

    Parameters
    ----------
    ranks : tuple of int (default: (8,))
        Client ranks, cycled over the clients by partition id; a client's ``rank``
        node-config value overrides it. Each client announces its rank in its reply.
    scale : str (default: "per-rank")
        "per-rank" (s_k = alpha / r_k) or "uniform" (s_k = alpha / rank).
    **kwargs
        See LoraStrategy; ``download_codec`` must be fp32 (the stacks are all it sends).
    """

    name = "flora"
    heterogeneous_ranks = True
    upload = "weights"  # each client's fresh LoRA, whose initial state the server never saw
    changes_base = True

    def __init__(self, ranks: tuple[int, ...] = (8,), scale: str = "per-rank", **kwargs) -> None:
        super().__init__(**kwargs)
        if scale not in ("per-rank", "uniform"):
            raise FedLoraError(f"--flora-scale {scale}: valid choices: per-rank, uniform")
        if self.download_codec.kind != "fp32":
            raise FedLoraError(
                f"--download-codec {self.download_codec.name}: --strategy flora sends only its "
                "stacks, which travel in fp32 so that every client's merged base stays exact; "
                "drop --download-codec (--upload-codec applies)"
            )
        self.ranks = tuple(ranks)
        self.uniform_scale = scale == "uniform"
        self.module_shapes: dict[str, tuple[int, int]] = {}
        self.round_stacks: list[State] = []

    @classmethod
    def config_arguments(cls, config) -> dict:
        return {**super().config_arguments(config), "ranks": tuple(config.rank_list),
                "scale": config.flora_scale}

    def client_scale(self, rank: int) -> float:
        """s_k of a client of rank ``rank``."""
        return self.scale if self.uniform_scale else self.alpha / rank

    def initialize(self, model) -> ArrayRecord:
        self.module_shapes = self.adapted_shapes(model)
        return ArrayRecord()  # no global adapter yet: the base model is the global state

    def initialize_shapes(self, model) -> TrafficShapes:
        self.module_shapes = self.adapted_shapes(model)
        return TrafficShapes({}, stacked=True)  # nothing global is sent: the stacks are kept

    def arrays_to_send(self, arrays: ArrayRecord) -> ArrayRecord:
        return ArrayRecord()  # clients start a fresh LoRA; the stacks travel as kept batches

    def plan(self, config: ConfigRecord, server_round: int, task: str) -> Plan:
        plan = super().plan(config, server_round, task)
        plan.run = dataclasses.replace(plan.run, ranks=",".join(map(str, self.ranks)))
        if self.uniform_scale:
            plan.lora_scale = float(self.scale)  # the client's alpha = scale * r_k
        return plan

    def expected_shapes(self, metrics: MetricRecord) -> dict[str, tuple[int, ...]]:
        # At most the plan's largest rank: every stack is kept and sent for the whole run.
        return lora_shapes(self.module_shapes, announced_rank(metrics, max(self.ranks)))

    def aggregate_states(self, states, weights, metrics) -> State:
        scales = [self.client_scale(int(m[wire.RANK])) for m in metrics]
        stack = stack_lora(states, weights, scales)
        self.round_stacks.append(stack)
        self.kept.add_batch({f"merge/{k}": v for k, v in stack.items()})
        return concat_lora(self.round_stacks)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "round_stacks": self.round_stacks}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.round_stacks = state["round_stacks"]

    def client_delta(self, state: State, metrics: MetricRecord) -> State:
        return delta_weights(state, self.client_scale(int(metrics[wire.RANK])))

    def round_delta(self, new_state: State) -> State:
        return delta_weights(self.round_stacks[-1])

    def peft_adapter(self, arrays: ArrayRecord) -> tuple[State, int, float]:
        state = arrays.to_torch_state_dict()
        rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
        return state, rank, float(rank)  # scale 1: the stacks carry p_k s_k
