"""The aggregation math as pure functions of plain tensors (no Flower, no model)."""

from __future__ import annotations

import torch

from fedlora.errors import FedLoraError

State = dict[str, torch.Tensor]


def example_weights(num_examples: list[int]) -> list[float]:
    """p_k = n_k / sum(n): each client's share of the examples that answered this round."""
    if not num_examples or any(n <= 0 for n in num_examples):
        raise FedLoraError(f"example counts must be positive, got {num_examples}")
    total = sum(num_examples)
    return [n / total for n in num_examples]


def weighted_average(states: list[State], weights: list[float]) -> State:
    """sum_k p_k * state_k, key by key: FedAvg of A and B separately (FedIT).

    Inexact for LoRA: (sum p_k B_k)(sum p_k A_k) != sum p_k B_k A_k, which is why the
    exact methods exist. Tensors are summed in fp64 and returned as fp32.
    """
    if len(states) != len(weights) or not states:
        raise FedLoraError(f"{len(states)} states but {len(weights)} weights")
    return {
        key: sum(w * s[key].double() for s, w in zip(states, weights)).float()
        for key in states[0]
    }
