"""The aggregation math on plain tensors."""

import pytest
import torch

from fedlora.aggregate import example_weights, weighted_average
from fedlora.errors import FedLoraError


def test_example_weights_are_shares_of_the_examples():
    assert example_weights([10, 30, 60]) == pytest.approx([0.1, 0.3, 0.6])
    with pytest.raises(FedLoraError, match="must be positive"):
        example_weights([10, 0])


def test_weighted_average_is_the_weighted_mean_of_every_tensor():
    g = torch.Generator().manual_seed(0)
    states = [{"a": torch.randn(4, 3, generator=g), "b": torch.randn(2, generator=g)} for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    averaged = weighted_average(states, weights)
    for key in ("a", "b"):
        expected = 0.2 * states[0][key] + 0.5 * states[1][key] + 0.3 * states[2][key]
        torch.testing.assert_close(averaged[key], expected, rtol=1e-6, atol=1e-7)
        assert averaged[key].dtype == torch.float32


def test_fedavg_of_factors_is_not_the_average_of_products():
    """The baseline's known error: (sum p B)(sum p A) != sum p B A."""
    g = torch.Generator().manual_seed(1)
    states = [{"A": torch.randn(2, 6, generator=g), "B": torch.randn(5, 2, generator=g)} for _ in range(3)]
    weights = [0.5, 0.25, 0.25]
    avg = weighted_average(states, weights)
    exact = sum(w * s["B"] @ s["A"] for s, w in zip(states, weights))
    error = (avg["B"] @ avg["A"] - exact).norm() / exact.norm()
    assert error > 0.1
