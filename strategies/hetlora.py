"""HetLoRA: clients of different ranks, zero-padded to the largest and averaged."""

from __future__ import annotations

from fedlora import wire
from fedlora.aggregate import State, keep_components, pad_lora, truncate_lora
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

    A component that no aggregated client of the round holds (every reply's rank is below
    it: partial participation, a drop, a timeout) keeps its previous global value. The
    zero-padded mean would set its row of A and column of B to zero, whose gradients are
    then zero for good: one round without the largest-rank client would cap the global
    rank for the rest of the run.

    Parameters: see TruncatedRankLoRA.
    """

    name = "hetlora"

    def secure_refusal(self) -> str | None:
        return None  # its terms follow from the sum of the updates (secure_terms)

    def secure_terms(self, mean: State, weights: list[int], metrics: list[dict]) -> State:
        """Under secure aggregation each client sends its update padded to R, pad_R(W_k -
        trunc_r_k(G)), the masked sum of which gives sum_k p_k pad_R(W_k) once the server
        adds sum_k p_k pad_R(trunc_r_k(G)): the global factors' first r_k components,
        weighted by the clients (their ranks and weights travel in the clear)."""
        total = sum(weights)
        terms = {k: v.double().clone() for k, v in mean.items()}
        for weight, m in zip(weights, metrics):
            held = pad_lora(truncate_lora(self.global_state, int(m[wire.RANK])), self.rank)
            for key, value in held.items():
                terms[key] += weight / total * value.double()
        return terms

    def client_terms(self, state, metrics) -> State:
        return pad_lora(state, self.rank)

    def aggregate_means(self, means, metrics) -> State:
        held = max(int(m[wire.RANK]) for m in metrics)  # the round's largest rank
        return keep_components(means, self.global_state, held) if held < self.rank else means
