"""The aggregation math on plain tensors."""

import torch
from conftest import weighted_average

from fedlora.aggregate import (
    aggregation_error,
    concat_lora,
    delta_weights,
    lora_sb_from_gradient,
    random_lora_sb,
    stack_lora,
)


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


def random_lora(rank, out_features=5, in_features=6, seed=0, prefix="base_model.model.m"):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.lora_A.weight": torch.randn(rank, in_features, generator=g),
            f"{prefix}.lora_B.weight": torch.randn(out_features, rank, generator=g)}


def test_stacking_is_exact_for_different_ranks():
    states = [random_lora(r, seed=i) for i, r in enumerate([16, 8, 4])]
    weights, scales = [0.5, 0.3, 0.2], [16 / 16, 16 / 8, 16 / 4]
    stacked = stack_lora(states, weights, scales)
    assert stacked["base_model.model.m.lora_A.weight"].shape == (28, 6)
    assert stacked["base_model.model.m.lora_B.weight"].shape == (5, 28)
    expected = sum(w * s * st["base_model.model.m.lora_B.weight"] @ st["base_model.model.m.lora_A.weight"]
                   for st, w, s in zip(states, weights, scales))
    got = delta_weights(stacked)["m"]
    assert ((got - expected.double()).norm() / expected.norm()) < 1e-6


def test_concatenated_loras_add_their_products():
    a, b = random_lora(3, seed=1), random_lora(5, seed=2)
    joined = concat_lora([a, b])
    expected = delta_weights(a)["m"] + delta_weights(b)["m"]
    torch.testing.assert_close(delta_weights(joined)["m"], expected)


def test_delta_weights_of_lora_and_lora_sb():
    lora = random_lora(4, prefix="x.q_proj")
    torch.testing.assert_close(
        delta_weights(lora, scale=2.0)["x.q_proj"],
        2.0 * (lora["x.q_proj.lora_B.weight"] @ lora["x.q_proj.lora_A.weight"]).double(),
        rtol=1e-5, atol=1e-6)
    R = torch.randn(4, 4)
    sb = {**lora, "x.q_proj.lora_R.weight": R}
    torch.testing.assert_close(
        delta_weights(sb)["x.q_proj"],
        (lora["x.q_proj.lora_B.weight"] @ R @ lora["x.q_proj.lora_A.weight"]).double(),
        rtol=1e-5, atol=1e-6)


def test_aggregation_error_is_zero_for_the_exact_mean_and_relative_otherwise():
    deltas = [{"m": torch.randn(3, 3, dtype=torch.float64)} for _ in range(3)]
    weights = [0.2, 0.3, 0.5]
    exact = {"m": sum(w * d["m"] for d, w in zip(deltas, weights))}
    assert aggregation_error(exact, exact) == 0
    assert abs(aggregation_error({"m": 1.1 * exact["m"]}, exact) - 0.1) < 1e-9


def test_lora_sb_gradient_init_is_the_best_rank_r_approximation_of_the_sign_step():
    G = torch.randn(12, 9, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(0)
    B, A, R = lora_sb_from_gradient(G, rank=4, eta=0.01)
    assert (B.shape, A.shape, R.shape) == ((12, 4), (4, 9), (4, 4))
    torch.testing.assert_close(B.T @ B, torch.eye(4), atol=1e-5, rtol=0)  # orthonormal
    torch.testing.assert_close(A @ A.T, torch.eye(4), atol=1e-5, rtol=0)
    G_hat = -0.01 * torch.sign(G.double())
    U, S, Vh = torch.linalg.svd(G_hat)
    best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]  # the optimum (Eckart-Young)
    # svd_lowrank is randomised: its residual is within 1% of the optimal residual.
    assert (G_hat - (B @ R @ A).double()).norm() <= 1.01 * (G_hat - best).norm()


def test_random_lora_sb_is_orthonormal_with_zero_r():
    B, A, R = random_lora_sb(10, 7, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(B.T @ B, torch.eye(3), atol=1e-6, rtol=0)
    torch.testing.assert_close(A @ A.T, torch.eye(3), atol=1e-6, rtol=0)
    assert torch.count_nonzero(R) == 0
