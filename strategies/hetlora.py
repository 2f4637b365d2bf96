"""HetLoRA: clients of different ranks, zero-padded to the largest and averaged."""

from __future__ import annotations

from fedlora.aggregate import State, pad_lora
from strategies.truncated import TruncatedRankLoRA


class HetLoRA(TruncatedRankLoRA):
    """Zero-pad every client's factors to the largest rank R, average them by examples,
    send each client the first r_k components back (Cho et al., "Heterogeneous LoRA for
    Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024).

    A = sum_k p_k pad_R(A_k), B = sum_k p_k pad_R(B_k): a rank-r_k client contributes only
    to the first r_k components, and like FedAvg the product of the averages is not the
    average of the products (``--check-exactness`` measures it). The paper's rank
    self-pruning (a client shrinking its rank when its last components' norm is small)
    and its sparsity-weighted aggregation are left out: clients keep their ranks.

    Parameters: see TruncatedRankLoRA.
    """

    name = "hetlora"

    def client_terms(self, state, metrics) -> State:
        return pad_lora(state, self.rank)

    def aggregate_means(self, means, metrics) -> State:
        return means
