"""FedEx-LoRA: FedAvg of A and B plus a dense residual in the base weights, so the
global model is exact."""

from __future__ import annotations

import dataclasses

from fedlora.aggregate import State, delta_weights, fedex_residual
from fedlora.errors import FedLoraError
from strategies.base import LoraStrategy, TrafficShapes


PRODUCT = "product/"  # the client terms that hold s B_k A_k, by module path


class FedExLoRA(LoraStrategy):
    """Average A and B as FedAvg does, and fold what that misses into the base weights
    (Singhal, Ponkshe, Vepakomma, "FedEx-LoRA: Exact Aggregation for Federated and
    Efficient Fine-Tuning of Foundation Models", ACL 2025).

    Each round A = sum p_k A_k and B = sum p_k B_k, and the residual
    R = s (sum_k p_k B_k A_k - B A), with s = alpha / r, is added to the frozen base
    weights W of every client, so that W + R + s B A = W + s sum_k p_k B_k A_k exactly.
    Clients continue from the averaged A and B. R is a dense out x in matrix per module:
    it travels as the base delta (strategies/kept.py) by ``--download-codec``, each
    increment once per client, and counts in ``bytes_down``; a lossy codec's loss is
    carried into the next round's increment. The run saves the adapter and the summed
    residuals (``adapter/base_delta.safetensors``).

    Parameters: see LoraStrategy. ``--dp user`` is refused: R needs each client's B_k A_k,
    which user-level DP releases only as one noised mean (R would be zero: FedAvg).
    """

    name = "fedex"
    changes_base = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        if self.privacy and self.privacy.mode == "user":
            raise FedLoraError(
                "--dp user releases only a noised mean of the updates, from which "
                "--strategy fedex cannot form its residual (it would be FedAvg); use "
                "--dp sample, or --strategy fedavg with --dp user"
            )
        self.residual: State = {}  # the last round's, as the clients received it

    def initialize_shapes(self, model) -> TrafficShapes:
        lora = super().initialize_shapes(model)
        return dataclasses.replace(lora, residual=self.adapted_shapes(model))

    def client_terms(self, state, metrics) -> State:
        """A and B, and s B_k A_k of each module (dense), for sum_k p_k B_k A_k."""
        return {**state, **{f"{PRODUCT}{path}": delta
                            for path, delta in delta_weights(state, self.scale).items()}}

    def aggregate_means(self, means, metrics) -> State:
        average = {k: v for k, v in means.items() if not k.startswith(PRODUCT)}
        mean_delta = {k.removeprefix(PRODUCT): v for k, v in means.items() if k.startswith(PRODUCT)}
        self.residual = self.kept.add_to_base(fedex_residual(mean_delta, average, self.scale))
        return average

    def round_delta(self, new_state: State) -> State:
        """The global change of this round: s B A plus the residual sent with it."""
        return {path: delta + self.residual[path].double()
                for path, delta in super().round_delta(new_state).items()}
