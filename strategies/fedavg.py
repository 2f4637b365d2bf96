"""FedAvg of LoRA's A and B separately (FedIT): the inexact baseline."""

from __future__ import annotations

from fedlora.aggregate import State
from strategies.base import LoraStrategy


class FedAvgLoRA(LoraStrategy):
    """Average A and B separately, weighted by each client's number of examples.

    A = sum p_k A_k, B = sum p_k B_k. The product of the averages is not the average of
    the products, so the global update differs from sum p_k B_k A_k (``--check-exactness``
    measures by how much); it is the baseline the exact methods are measured against.
    Parameters: see LoraStrategy.
    """

    name = "fedavg"

    def aggregate_means(self, means, metrics) -> State:
        return means
