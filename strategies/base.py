"""What every fedlora strategy shares: Flower's FedAvg sampling and messages, plus
per-reply validation, so that one bad client is dropped instead of ending the round."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedlora.adapters import check_adapter_state
from fedlora.aggregate import State, example_weights
from fedlora.errors import FedLoraError

log = logging.getLogger("fedlora")


class LoraStrategy(FedAvg):
    """Base class of fedlora's strategies.

    Sampling and message building are Flower's ``FedAvg``. A subclass overrides
    :meth:`aggregate_states`, the method's math; :meth:`check_reply` drops malformed
    replies with a logged reason.

    Parameters
    ----------
    fraction_train : float (default: 1.0)
        Fraction of the connected clients sampled for training each round.
    min_train_nodes : int (default: 1)
        A round fails unless at least this many clients return a valid reply.
    min_available_nodes : int (default: 1)
        Clients that must be connected before a round starts.
    weighted_by_key : str (default: "num-examples")
        The reply metric that holds each client's number of training examples.
    """

    name = "base"

    def __init__(
        self,
        fraction_train: float = 1.0,
        min_train_nodes: int = 1,
        min_available_nodes: int = 1,
        weighted_by_key: str = "num-examples",
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=0.0,  # evaluation is central, on the server's held-out split
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=0,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
        )
        self.sent_state: State = {}
        self.dropped: list[tuple[int, str]] = []  # (node id, reason) of the last round

    @classmethod
    def from_config(cls, config) -> LoraStrategy:
        """Build the strategy from a RunConfig."""
        return cls(
            fraction_train=config.fraction_train,
            min_train_nodes=config.min_clients,
            min_available_nodes=config.num_clients,
        )

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients and send each the global adapter and the plan."""
        self.sent_state = arrays.to_torch_state_dict()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate every reply, drop the bad ones, aggregate the rest.

        Returns ``(None, None)`` when fewer than ``min_train_nodes`` replies are valid.
        """
        valid, states, self.dropped = [], [], []
        for reply in replies:
            try:
                states.append(self.check_reply(reply))
                valid.append(reply)
            except FedLoraError as err:
                node = reply.metadata.src_node_id
                self.dropped.append((node, str(err)))
                log.warning("round %d: dropped the reply of node %d: %s", server_round, node, err)
        if not valid or len(valid) < self.min_train_nodes:
            return None, None
        num_examples = [int(r.content["metrics"][self.weighted_by_key]) for r in valid]
        state = self.aggregate_states(states, example_weights(num_examples))
        metrics = aggregate_metricrecords([r.content for r in valid], self.weighted_by_key)
        return ArrayRecord(state), metrics

    def check_reply(self, reply: Message) -> State:
        """The reply's adapter state, or FedLoraError saying why the reply is unusable."""
        if reply.has_error():
            raise FedLoraError(f"the client failed: {reply.error.reason}")
        content = reply.content
        if not isinstance(content.get("arrays"), ArrayRecord):
            raise FedLoraError("the reply has no ArrayRecord 'arrays'")
        metrics = content.get("metrics")
        if not isinstance(metrics, MetricRecord):
            raise FedLoraError("the reply has no MetricRecord 'metrics'")
        num_examples = metrics.get(self.weighted_by_key)
        if not isinstance(num_examples, int) or num_examples <= 0:
            raise FedLoraError(f"'{self.weighted_by_key}' must be a positive int, got {num_examples!r}")
        try:
            state = content["arrays"].to_torch_state_dict()
        except Exception as err:  # a hostile payload can fail in many ways inside Flower
            raise FedLoraError(f"the arrays do not decode: {err}") from None
        check_adapter_state(state, self.sent_state)
        return {k: v.to(torch.float32) for k, v in state.items()}

    def aggregate_states(self, states: list[State], weights: list[float]) -> State:
        """The method's math: client states and weights p_k in, the new global state out."""
        raise NotImplementedError
