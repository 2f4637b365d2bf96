"""Secure aggregation: one round's messages through Flower's SecAgg+ protocol
(``SecAggPlusWorkflow``), so that the server learns the weighted mean of what the clients
send and never one client's values (docs/privacy.md, "Secure aggregation").

Flower 1.41 offers SecAgg+ only through its legacy workflow, which asks a legacy
``Strategy`` for the round's instructions and hands it the result. :class:`LegacyRound`
is that strategy for one round: it hands the workflow the messages fedlora's strategy
built and keeps what the workflow hands back (the mean, and each client's metrics, which
travel in the clear). The four stages' messages go through :class:`CountingGrid`, which
counts their bytes as a plain round's are counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common import FitIns, Parameters, parameters_to_ndarrays
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedlora import wire
from fedlora.secure_aggregation import (MAX_WEIGHT, MIN_CLIENTS, MODULUS, SecureRanges,
                                        secure_ranges)
from fedlora.wire import Plan
from server.transport import exchange, traffic

log = logging.getLogger("fedlora")

# A client's private key is shared with every other client of the round, and two thirds
# of the shares rebuild it: the round survives up to a third of its clients dropping out
# after they sent their keys, and the server learns one client's values only with two
# thirds of the clients (that many shares) colluding with it.
SHARES, THRESHOLD = 1.0, 2 / 3


@dataclass
class SecureSum:
    """What a secure round gives the server.

    Attributes
    ----------
    mean : list of numpy arrays or None
        sum_k w_k x_k / sum_k w_k over the clients whose values were summed, one array per
        key of their values in sorted order; None: the protocol stopped (too few clients).
    weights, metrics, nodes : lists
        Each summed client's weight w_k, metrics (with its ``client-id``) and node id.
    bytes_up, bytes_down : int
        Payload bytes of every message of the four stages, both ways.
    ranges : SecureRanges or None
        The clipping and quantisation ranges the round ran with (the error bound's input);
        None when no client was asked.
    """

    mean: list[np.ndarray] | None = None
    weights: list[int] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    nodes: list[int] = field(default_factory=list)
    bytes_up: int = 0
    bytes_down: int = 0
    ranges: SecureRanges | None = None


class CountingGrid:
    """The grid SecAgg+'s stages talk through: fedlora's exchange (progress, timeout),
    every message's bytes counted."""

    def __init__(self, grid: Grid, timeout: float, label: str, counts: SecureSum) -> None:
        self.grid, self.timeout, self.label, self.counts = grid, timeout, label, counts

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        messages = list(messages)
        self.counts.bytes_down += traffic(messages)
        replies = exchange(self.grid, messages, self.timeout, self.label)
        self.counts.bytes_up += traffic(replies)
        return replies


class LegacyRound(Strategy):
    """The legacy strategy SecAgg+'s workflow drives, for one round: its instructions
    are ``messages`` (fedlora's own, as the strategy built them), its result is kept in
    ``summed``."""

    def __init__(self, grid: Grid, messages: list[Message], summed: SecureSum) -> None:
        self.grid, self.summed = grid, summed
        self.contents = {m.metadata.dst_node_id: m.content for m in messages}

    def configure_fit(self, server_round, parameters, client_manager):
        # The workflow wraps each FitIns in a record; Workflow swaps in the real content.
        return [(GridClientProxy(node, self.grid, 0), FitIns(Parameters([], ""), {}))
                for node in self.contents]

    def aggregate_fit(self, server_round, results, failures):
        if results:  # each result carries the same mean; the metrics are each client's
            self.summed.mean = parameters_to_ndarrays(results[0][1].parameters)
        for proxy, fitres in results:
            self.summed.weights.append(int(fitres.num_examples))
            self.summed.metrics.append(dict(fitres.metrics))
            self.summed.nodes.append(proxy.node_id)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with each client's training message the one fedlora's
    strategy built (the legacy workflow would send a FitIns)."""

    def setup_stage(self, grid, context, state) -> bool:
        proceed = super().setup_stage(grid, context, state)
        state.nid_to_fitins = {node: RecordDict(dict(context.strategy.contents[node]))
                               for node in state.nid_to_fitins}
        return proceed


def secure_exchange(grid: Grid, messages: list[Message], clip: float, timeout: float,
                    label: str) -> SecureSum:
    """Run SecAgg+ over one round's ``messages`` (the clients' training messages, whose
    plans name the clipping range ``clip``: fedlora.secure_aggregation.secure_ranges);
    return the weighted mean of the values the clients sent and what travelled in the
    clear. A client that fails or stays silent after it sent its keys is a dropout: its
    masks are removed with its neighbours' shares. Fewer than MIN_CLIENTS messages are not
    sent: each client would learn the others' values from the sum."""
    summed = SecureSum()
    if len(messages) < MIN_CLIENTS:
        log.warning("%s: %d clients drawn, fewer than secure aggregation's %d: none asked",
                    label, len(messages), MIN_CLIENTS)
        return summed
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            strategy=LegacyRound(grid, messages, summed))
    server_round = Plan.from_record(messages[0].content[wire.CONFIG]).server_round
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    ranges = summed.ranges = secure_ranges(len(messages), clip)
    workflow = Workflow(SHARES, THRESHOLD, max_weight=float(MAX_WEIGHT), clipping_range=ranges.clip,
                        quantization_range=ranges.levels, modulus_range=MODULUS, timeout=timeout)
    workflow(CountingGrid(grid, timeout, label, summed), context)
    if summed.mean is None:
        log.warning("%s: secure aggregation stopped: too few of %d clients took part",
                    label, len(messages))
    return summed
