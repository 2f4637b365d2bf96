"""The aggregation math as pure functions of plain tensors (no Flower, no model)."""

from __future__ import annotations

import math

import torch

from fedlora.errors import FedLoraError

State = dict[str, torch.Tensor]


def module_path(key: str) -> str:
    """The module a LoRA tensor belongs to: ``base_model.model.x.q_proj.lora_A.weight`` and
    ``x.q_proj.lora_A.weight`` both give ``x.q_proj``."""
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]


class RunningMean:
    """sum_k w_k x_k / sum_k w_k over dicts of tensors, one client at a time: the server
    holds the running sums (fp64), never every client's tensors."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.total = 0.0

    def add(self, terms: State, weight: float) -> None:
        for key, value in terms.items():
            if key not in self.sums:
                self.sums[key] = torch.zeros(value.shape, dtype=torch.float64)
            self.sums[key].add_(value.detach().cpu(), alpha=weight)
        self.total += weight

    def mean(self, plus: State | None = None) -> State:
        """The weighted mean (plus ``plus``, added in fp64), fp32."""
        if self.total <= 0:
            raise FedLoraError("no client was added to the mean")
        return {key: (value / self.total + (plus[key].double() if plus else 0.0)).float()
                for key, value in self.sums.items()}


def stack_lora(states: list[State], weights: list[float], scales: list[float]) -> State:
    """FLoRA's stacking: per module, A = [p_1 s_1 A_1; ...; p_K s_K A_K] (rows) and
    B = [B_1, ..., B_K] (columns), so that B A = sum_k p_k s_k B_k A_k exactly, for any
    ranks r_k. Keys end in ``lora_A.weight`` / ``lora_B.weight``; the result has rank
    sum r_k and scale 1 (Wang et al., FLoRA, NeurIPS 2024).
    """
    if not (len(states) == len(weights) == len(scales)) or not states:
        raise FedLoraError(f"{len(states)} states, {len(weights)} weights, {len(scales)} scales")
    stacked = {}
    for key in states[0]:
        if key.endswith("lora_A.weight"):
            parts = [w * s * state[key].double() for state, w, s in zip(states, weights, scales)]
            stacked[key] = torch.cat(parts, dim=0).float()
        elif key.endswith("lora_B.weight"):
            stacked[key] = torch.cat([state[key] for state in states], dim=1).float()
        else:
            raise FedLoraError(f"cannot stack {key}: not a lora_A or lora_B tensor")
    return stacked


def concat_lora(states: list[State]) -> State:
    """Several scale-1 LoRAs as one: A's rows and B's columns concatenated, so the
    product is the sum of the products (FLoRA's accumulated delta over rounds)."""
    return {
        key: torch.cat([s[key] for s in states], dim=0 if key.endswith("lora_A.weight") else 1)
        for key in states[0]
    }


def delta_weights(state: State, scale: float = 1.0) -> State:
    """The weight change of each adapted module, by module path: scale * B @ A for LoRA,
    B @ R @ A for LoRA-SB (keys ``<path>.lora_{A,B,R}.weight``, optionally peft-prefixed)."""
    deltas = {}
    for key, A in state.items():
        if not key.endswith("lora_A.weight"):
            continue
        B = state[key.replace("lora_A.weight", "lora_B.weight")].double()
        R = state.get(key.replace("lora_A.weight", "lora_R.weight"))
        product = B @ R.double() @ A.double() if R is not None else scale * B @ A.double()
        deltas[module_path(key)] = product
    return deltas


def aggregation_error(global_delta: State, mean_delta: State) -> float:
    """||D - sum_k p_k D_k||_F / ||sum_k p_k D_k||_F over all modules together: how far the
    aggregated weight change D is from the weighted mean of the clients' weight changes
    (``mean_delta``, by module path)."""
    error = reference = 0.0
    for path, delta in global_delta.items():
        target = mean_delta[path].double()
        error += float((delta.double() - target).pow(2).sum())
        reference += float(target.pow(2).sum())
    return (error / reference) ** 0.5 if reference > 0 else error**0.5


def lora_sb_from_gradient(gradient: torch.Tensor, rank: int, eta: float) -> tuple[torch.Tensor, ...]:
    """LoRA-SB's initialisation from a full-weight gradient G (out x in).

    G_hat = -eta * sign(G) approximates Adam's first step; the truncated SVD
    G_hat^T ~ U S V^T of rank r gives B = V (out x r), A = U^T (r x in), R = diag(S), so
    that B R A is the best rank-r approximation of G_hat (Ponkshe et al., LoRA-SB, 2024).
    Seed torch beforehand: svd_lowrank is randomised.
    """
    G_hat = -eta * torch.sign(gradient.double())
    U, S, V = torch.svd_lowrank(G_hat.T, q=rank, niter=10)
    return V.float(), U.T.float(), torch.diag(S).float()  # B, A, R


def random_lora_sb(out_features: int, in_features: int, rank: int, generator: torch.Generator):
    """LoRA-SB's fallback initialisation: B and A with orthonormal columns / rows, R = 0."""
    B, _ = torch.linalg.qr(torch.randn(out_features, rank, generator=generator, dtype=torch.float64))
    A, _ = torch.linalg.qr(torch.randn(in_features, rank, generator=generator, dtype=torch.float64))
    return B.float(), A.T.float(), torch.zeros(rank, rank)


def pad_lora(state: State, rank: int) -> State:
    """LoRA factors zero-padded to ``rank``: A gains zero rows, B zero columns, so the
    product B A is unchanged (HetLoRA's padding)."""
    padded = {}
    for key, value in state.items():
        missing = rank - value.shape[0 if key.endswith("lora_A.weight") else 1]
        if missing < 0:
            raise FedLoraError(f"{key} has rank above {rank}")
        if key.endswith("lora_A.weight"):
            padded[key] = torch.cat([value, value.new_zeros(missing, value.shape[1])], dim=0)
        else:
            padded[key] = torch.cat([value, value.new_zeros(value.shape[0], missing)], dim=1)
    return padded


def truncate_lora(state: State, rank: int) -> State:
    """The first ``rank`` components of LoRA factors: A's first rows, B's first columns
    (factors of lower rank are left as they are)."""
    return {
        key: value[:rank] if key.endswith("lora_A.weight") else value[:, :rank]
        for key, value in state.items()
    }


def keep_components(state: State, previous: State, held: int) -> State:
    """LoRA factors whose components from ``held`` on (A's rows, B's columns) are
    ``previous``'s, the first ``held`` ``state``'s (HetLoRA: components that no client of
    the round trained keep their value)."""
    return {key: torch.cat([value[:held], previous[key][held:]]) if key.endswith("lora_A.weight")
            else torch.cat([value[:, :held], previous[key][:, held:]], dim=1)
            for key, value in state.items()}


def reinit_null_components(factors: State, scale: float, generator: torch.Generator) -> State:
    """LoRA factors with every null component started again as a fresh LoRA's: A's row
    drawn as peft draws it (Kaiming-uniform, a = sqrt(5): U(-1/sqrt(n), 1/sqrt(n))), B's
    column zero (FlexLoRA: a component of zero singular value has zero A and B, whose
    gradients are then zero for good). A component j is null when its singular value
    S_j = scale |A_j|^2 is at most S_max max(m, n) eps(fp32), the tolerance numpy's
    matrix_rank uses; the product B A then changes by at most that much per component."""
    out = dict(factors)
    for key_a in [k for k in factors if k.endswith("lora_A.weight")]:
        key_b = key_a.replace("lora_A", "lora_B")
        A, B = factors[key_a], factors[key_b]
        singular = scale * A.double().square().sum(dim=1)
        tolerance = float(singular.max()) * max(B.shape[0], A.shape[1]) * torch.finfo(torch.float32).eps
        null = singular <= tolerance
        if not null.any():
            continue
        bound = 1.0 / math.sqrt(A.shape[1])
        fresh = (torch.rand(A.shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        out[key_a] = torch.where(null[:, None], fresh.float(), A)
        out[key_b] = torch.where(null[None, :], torch.zeros_like(B), B)
    return out


def svd_lora(deltas: dict[str, torch.Tensor], rank: int, scale: float) -> State:
    """Factors of the best rank-``rank`` approximation of each module's weight change
    (truncated SVD, Eckart-Young): Delta = U S V^T gives B = U_r sqrt(S_r / scale) and
    A = sqrt(S_r / scale) V_r^T, so that scale * B A = U_r S_r V_r^T, the singular values
    split evenly between B and A; components stay sorted by singular value, so the first
    r' of them are the best rank-r' approximation too. Keys are peft's
    (``base_model.model.<path>.lora_{A,B}.weight``)."""
    factors = {}
    for path, delta in deltas.items():
        U, S, Vh = torch.linalg.svd(delta.double(), full_matrices=False)
        root = (S[:rank] / scale).sqrt()
        factors[f"base_model.model.{path}.lora_A.weight"] = (root[:, None] * Vh[:rank]).float()
        factors[f"base_model.model.{path}.lora_B.weight"] = (U[:, :rank] * root).float()
    return pad_lora(factors, rank)  # a module narrower than the rank: zero components


def svd_refactor(state: State) -> State:
    """LoRA factors with the same product B A, refactored: B A = U S V^T (its SVD), A = V_r^T
    (orthonormal rows), B = U_r S_r (FedSVD). The SVD is taken without forming the m x n
    product: with QR factorisations B = Q_B R_B and A^T = Q_A R_A, B A = Q_B (R_B R_A^T)
    Q_A^T, and the r x r middle's SVD U' S V'^T gives U = Q_B U', V = Q_A V': O((m + n) r^2),
    in fp64, returned in fp32 (the product then changes only by fp32 rounding). A module
    narrower than the rank gets zero components beyond its width. Keys are peft's,
    ``...lora_{A,B}.weight``."""
    out = {}
    for key_a in [k for k in state if k.endswith("lora_A.weight")]:
        key_b = key_a.replace("lora_A.weight", "lora_B.weight")
        q_b, r_b = torch.linalg.qr(state[key_b].double())  # m x r, r x r
        q_a, r_a = torch.linalg.qr(state[key_a].double().T)  # n x r, r x r
        u, singular, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
        out[key_a] = (vh @ q_a.T).float()  # V^T: r x n, orthonormal rows
        out[key_b] = (q_b @ u * singular).float()  # U S: m x r
    rank = next(iter(state.values())).shape[0] if state else 0
    return pad_lora(out, rank)  # a module narrower than the rank: zero components


def fedex_residual(mean_delta: State, average: State, scale: float) -> State:
    """FedEx-LoRA's residual, by module path: s sum_k p_k B_k A_k (``mean_delta``, the
    weighted mean of the clients' weight changes) minus s B A of the averaged factors
    (``average``): what the average of the factors misses (Singhal et al., FedEx-LoRA,
    2025). Added to the base weights, it makes base + s B A exact. Computed in fp64,
    returned in fp32."""
    averaged = delta_weights(average, scale)
    return {path: (mean_delta[path].double() - averaged[path]).float() for path in averaged}
