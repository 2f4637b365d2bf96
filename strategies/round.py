"""One training round at the server: each valid reply folded in as it arrives, then the new
global state. What is kept is the least the method needs: running sums for a method that
streams (it implements ``aggregate_means``), every client's state for one that needs each
client (``aggregate_states``), only the clipped sum under user-level DP."""

from __future__ import annotations

from flwr.app import ArrayRecord, Message, MetricRecord

from fedlora import wire
from fedlora.aggregate import RunningMean, State, aggregation_error
from fedlora.privacy import clip_update
from fedlora.wire import client_identity


class Round:
    """What the server holds of one round's valid replies while they come in.

    Parameters
    ----------
    strategy : LoraStrategy
        The run's strategy: it validates each reply (``accept``), weighs it
        (``client_weight``), says what of it to average (``client_terms``) and does the
        method's math (``aggregate_means`` or ``aggregate_states``).
    server_round : int
        The round.
    """

    def __init__(self, strategy, server_round: int) -> None:
        self.strategy, self.server_round = strategy, server_round
        self.nodes: list[int] = []  # node ids of the valid replies
        self.metrics: list[MetricRecord] = []
        self.clients: list[str] = []  # their identities (DP-SGD accounting)
        self.terms = RunningMean()  # a method that streams
        self.states: list[State] = []  # a method that needs every client
        self.clipped = RunningMean()  # --dp user: clipped updates
        self.deltas = RunningMean()  # --check-exactness

    def fold(self, reply: Message) -> None:
        """Add one reply to the round (or drop it, with the reason logged)."""
        strategy = self.strategy
        state = strategy.accept(self.server_round, reply, strategy.expected_shapes)
        if state is None:
            return
        metrics = reply.content[wire.METRICS]
        privacy = strategy.privacy
        if privacy and privacy.mode == "sample":  # each identity gets an accountant
            client = client_identity(reply, privacy.node_identities)
            if not strategy.dp.admits(client, self.clients):
                strategy.drop(self.server_round, reply.metadata.src_node_id,
                              f"'{wire.CLIENT_ID}' {client!r} would be a client beyond the "
                              f"plan's {privacy.clients} (--num-clients)")
                return
            self.clients.append(client)
        self.nodes.append(reply.metadata.src_node_id)
        self.metrics.append(metrics)
        if privacy and privacy.mode == "user":  # only the clipped sum is released
            self.clipped.add(clip_update(state, privacy.clip), 1.0)
            return
        if strategy.max_update_norm:  # no client moves the average further than this
            state = {k: v.float() for k, v in clip_update(state, strategy.max_update_norm).items()}
        weight = strategy.client_weight(metrics)
        if strategy.folds_updates:  # sum_k p_k u_k: finish() adds the global state once
            self.terms.add(state, weight)
        if strategy.upload == "delta" and (not strategy.folds_updates or strategy.check_exactness):
            state = {k: strategy.global_state[k] + u for k, u in state.items()}  # the client's adapter
        if not strategy.streams:
            self.states.append(state)
        elif not strategy.folds_updates:
            self.terms.add(strategy.client_terms(state, metrics), weight)
        if strategy.check_exactness:
            self.deltas.add(strategy.client_delta(state, metrics), weight)

    def fold_sum(self, mean: State, weights: list[int], metrics: list[dict],
                 nodes: list[int]) -> None:
        """Add a secure round's result instead of its replies (server/secure.py): the
        weighted mean of what the clients sent (their updates, clipped by themselves
        under user-level DP, each then weighing the same), their weights and the metrics
        that travelled in the clear. Nothing can be left out of a sum after the fact: a
        client's DP-SGD settings are accounted as its plan gives them, whatever it
        reports."""
        strategy, privacy = self.strategy, self.strategy.privacy
        for node, m in zip(nodes, metrics):
            client = f"node-{node}" if privacy and privacy.node_identities else str(m.get(wire.CLIENT_ID))
            m = {k: v for k, v in m.items() if k != wire.CLIENT_ID}
            if privacy and privacy.mode == "sample":
                noise, rate = privacy.dpsgd_terms(int(m[wire.NUM_EXAMPLES]))
                m.update({wire.DP_NOISE: noise, wire.DP_SAMPLE_RATE: rate,
                          wire.DP_STEPS: privacy.local_steps})
            self.clients.append(client)
            self.nodes.append(node)
            self.metrics.append(MetricRecord(m))
            strategy.kept.confirm(node)  # it holds what it was sent
            strategy.record_reply(node, self.metrics[-1])
        if not nodes:
            return
        if privacy and privacy.mode == "user":  # every client weighed the same: n x mean
            self.clipped.add({k: v.double() * len(nodes) for k, v in mean.items()}, 1.0)
        else:  # folds_updates: the mean of the updates, the global state added by finish()
            self.terms.add(mean, 1.0)

    def finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The new global state and the round's metrics from what was folded in; (None,
        None) when too few replies were valid."""
        strategy, metrics = self.strategy, self.metrics
        user_dp = strategy.privacy is not None and strategy.privacy.mode == "user"
        # Under user-level DP a Poisson draw of fewer clients than min_train_nodes is no
        # failure: the round is released (noise alone when none was drawn).
        required = (min(strategy.min_train_nodes, strategy.sampled) if user_dp
                    else max(strategy.min_train_nodes, 1))
        if len(metrics) < required:
            return None, None
        for node in self.nodes:
            strategy.aggregated_rounds[node] = self.server_round
        weights = [strategy.client_weight(m) for m in metrics]
        weights = [w / sum(weights) for w in weights]
        aggregated = MetricRecord({"train-seconds": sum(float(m.get(wire.TRAIN_SECONDS, 0.0))
                                                        for m in metrics)})
        if metrics:  # a user-level DP round may have drawn no client: no loss to report
            aggregated["train-loss"] = sum(w * float(m.get(wire.TRAIN_LOSS, 0.0))
                                           for m, w in zip(metrics, weights))
        for key in (wire.EXAMPLES_CUT, wire.EXAMPLES_LEFT_OUT):
            if any(key in m for m in metrics):
                aggregated[key] = sum(int(m.get(key, 0)) for m in metrics)
        if strategy.dp:
            strategy.dp.record_round(self.clients, metrics, strategy.weighted_by_key)
            aggregated["epsilon"], aggregated["delta"] = strategy.dp.accountant.spent()
        global_state = strategy.global_state
        if user_dp:  # one noised mean stands for all
            update = strategy.dp.noised_update(self.clipped, global_state, strategy.available)
            examples = sum(int(m[strategy.weighted_by_key]) for m in metrics)
            new_state = strategy.aggregate_states(
                [{k: global_state[k] + u for k, u in update.items()}], [1.0],
                [MetricRecord({strategy.weighted_by_key: examples})])
        elif strategy.streams:
            new_state = strategy.aggregate_means(
                self.terms.mean(plus=global_state if strategy.folds_updates else None), metrics)
        else:
            new_state = strategy.aggregate_states(self.states, weights, metrics)
        if strategy.check_exactness:
            aggregated["aggregation-error"] = aggregation_error(strategy.round_delta(new_state),
                                                                self.deltas.mean())
        return ArrayRecord(new_state), aggregated
