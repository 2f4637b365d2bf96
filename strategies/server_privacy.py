"""The server's side of differential privacy (fedlora.privacy holds the mechanism and the
accountant): which clients a user-level round draws, the one noised mean it releases, and
what each round adds to the accountant."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import MetricRecord

from fedlora import wire
from fedlora.aggregate import RunningMean, State
from fedlora.privacy import Privacy, PrivacyAccountant, noised_mean


class ServerPrivacy:
    """A strategy's DP bookkeeping for one run.

    Parameters
    ----------
    privacy : Privacy
        The run's settings. "user": the server draws clients by Poisson sampling and
        releases only the noised mean of their clipped updates, one Gaussian event per
        round. "sample": the clients train with DP-SGD; the server composes the steps each
        one reports, by its identity.
    """

    def __init__(self, privacy: Privacy) -> None:
        self.privacy = privacy
        self.accountant = PrivacyAccountant(privacy.delta)
        # Fresh from the OS unless --dp-noise-seed: noise the clients could recompute
        # from --seed would protect nothing.
        self.noise_generator = torch.Generator().manual_seed(privacy.seed("server-noise"))

    @property
    def user_level(self) -> bool:
        return self.privacy.mode == "user"

    def draw_clients(self, server_round: int, connected: list[int]) -> list[int]:
        """User level: each connected node joins independently with probability q. The
        RDP accountant's amplification by subsampling is proved for this Poisson
        sampling, not for a fixed number, so the count varies (and may be 0: the release
        is then noise alone)."""
        rng = np.random.default_rng(self.privacy.seed(server_round, "client-sampling"))
        return [node for node, draw in zip(sorted(connected), rng.random(len(connected)))
                if draw < self.privacy.sample_rate]

    def noised_update(self, clipped: RunningMean, like: State, available: int) -> State:
        """User level's release: the sum of the clipped updates plus N(0, (zC)^2), over
        the expected number of clients, q x ``available`` (tensors shaped as ``like``
        where no client was drawn)."""
        total = clipped.sums or {k: torch.zeros(v.shape, dtype=torch.float64) for k, v in like.items()}
        return noised_mean(total, self.privacy.clip, self.privacy.noise,
                           self.privacy.sample_rate * available, self.noise_generator)

    def admits(self, client: str, this_round: list[str]) -> bool:
        """Whether a sample-level reply of ``client`` can be accounted: a known identity, or
        a new one while fewer than the federation's clients are known (``this_round``:
        the identities of the round so far). A client naming itself anew each round would
        otherwise start a fresh accountant each time, without bound."""
        known = set(self.accountant.accountants) | set(this_round)
        return client in known or len(known) < self.privacy.clients

    def record_round(self, clients: list[str], metrics: list[MetricRecord],
                     weighted_by_key: str) -> None:
        """Record what this round released: one Gaussian event for the federation (user
        level), or each client's DP-SGD steps, by its identity (sample level; Flower's
        node ids change on restarts)."""
        if self.user_level:
            self.accountant.record(*self.federation_event())
            return
        for client, m in zip(clients, metrics):
            self.accountant.record(client, m[wire.DP_NOISE], m[wire.DP_SAMPLE_RATE], m[wire.DP_STEPS],
                                   m[weighted_by_key])

    def federation_event(self) -> tuple:
        """User level's event of one round: (party, z, q, 1 step, N clients)."""
        return ("clients", self.privacy.noise, self.privacy.sample_rate, 1, self.privacy.clients)

    def epsilon_after_next_round(self) -> float | None:
        """The epsilon the next round would bring the run to, or None where unknown: for
        sample-level DP, clients are assumed to repeat their last round (unknown before
        the first)."""
        if self.user_level:
            return self.accountant.epsilon_after([self.federation_event()])
        if not self.accountant.last_round:
            return None
        return self.accountant.epsilon_after(list(self.accountant.last_round.values()))

    def state_dict(self) -> dict:
        return {"accountant": self.accountant.state_dict(),
                "noise_generator": self.noise_generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint. The noise generator continues where it was only with
        ``--dp-noise-seed`` (a reproducible experiment); otherwise the resumed run draws
        fresh noise from the OS: noise drawn twice would cancel in the difference of two
        releases."""
        self.accountant.load_state_dict(state["accountant"])
        if self.privacy.noise_seed >= 0:
            self.noise_generator.set_state(state["noise_generator"])
