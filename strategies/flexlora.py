"""FlexLoRA: clients of different ranks, their full weight changes averaged and split
back into factors by a truncated SVD."""

from __future__ import annotations

import torch

from fedlora.aggregate import State, delta_weights, reinit_null_components, svd_lora
from fedlora.seeds import stream_seed
from strategies.truncated import TruncatedRankLoRA


class FlexLoRA(TruncatedRankLoRA):
    """Average the clients' weight changes, not their factors; refactor by SVD (Bai et
    al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and
    Client Resources", NeurIPS 2024).

    Per module, Delta = sum_k p_k s B_k A_k (exact for any ranks), then its truncated SVD
    U_R S_R V_R^T at the largest rank R is the new global LoRA: B = U_R sqrt(S_R / s),
    A = sqrt(S_R / s) V_R^T (the singular values split evenly between the factors). A
    rank-r_k client receives the first r_k components: the best rank-r_k approximation
    of Delta. The global adapter is exact up to the part of Delta beyond rank R
    (``--check-exactness`` reports it; zero while sum_k r_k <= R). Each round starts from
    the factors of the last one, so the adapter holds the running model, as in the paper.

    Components of zero singular value (Delta of rank below R: few clients, low ranks, a
    module narrower than R) would be zero in A and B, whose gradients are then zero for
    good; they start again as a fresh LoRA's (A seeded, B zero:
    ``fedlora.aggregate.reinit_null_components``), which leaves B A as it is.

    Parameters: see TruncatedRankLoRA.
    """

    name = "flexlora"

    def client_terms(self, state, metrics) -> State:
        return delta_weights(state, self.scale)  # s B_k A_k by module: dense, out x in

    def aggregate_means(self, means, metrics) -> State:
        generator = torch.Generator().manual_seed(
            stream_seed(self.seed, self.server_round, "flexlora-null-components"))
        return reinit_null_components(svd_lora(means, self.rank, self.scale), self.scale, generator)
