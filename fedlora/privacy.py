"""Differential privacy: the Gaussian mechanism on client updates, DP-SGD's settings, and
Opacus' RDP accountant.

Two levels (``--dp``):

- ``user``: clients are drawn by Poisson sampling at rate q; the server clips each
  client's update to L2 norm C (over every tensor the strategy aggregates, jointly), sums
  them, adds N(0, (z C)^2) to every coordinate and divides by the expected number of
  clients. One Gaussian event per round, composed with q. It protects everything a client
  contributes.
- ``sample``: each client trains with DP-SGD (Opacus: per-example clipping to C, noise
  z C on the sum of a Poisson-sampled batch). Each client's epsilon composes its steps;
  the run reports the largest over clients.

Only the math that Opacus does not offer lives here (clipping a whole update and noising a
sum of updates); the accounting is Opacus' RDP accountant. Opacus is imported on first use
(``opacus()``), so a run without ``--dp`` never loads it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import logging
import math
import secrets
from dataclasses import dataclass
from types import ModuleType

import torch

from fedlora.errors import FedLoraError
from fedlora.seeds import stream_seed

State = dict[str, torch.Tensor]

MODES = ("off", "user", "sample")


def opacus(module: str) -> ModuleType:
    """``opacus.<module>``, imported on first use, with the logging.basicConfig that
    Opacus calls on import undone (it would duplicate every log line)."""
    handlers = list(logging.getLogger().handlers)
    try:
        return importlib.import_module(f"opacus.{module}")
    finally:
        logging.getLogger().handlers = handlers


def update_norm(update: State) -> float:
    """The L2 norm of all of an update's tensors taken together."""
    return math.sqrt(sum(float(t.double().square().sum()) for t in update.values()))


def clip_update(update: State, clip: float) -> State:
    """The update scaled to L2 norm at most ``clip`` (unchanged when already within)."""
    factor = min(1.0, clip / max(update_norm(update), 1e-12))
    return {k: (t.double() * factor) for k, t in update.items()}


def noised_mean(total: State, clip: float, noise: float, denominator: float,
                generator: torch.Generator) -> State:
    """(``total`` + N(0, (noise * clip)^2) per coordinate) / denominator, fp32: user-level
    DP's release, from the sum of the clipped updates (which the server adds up one reply
    at a time).

    The denominator is the expected number of clients, q x connected, fixed before any
    client is drawn, so that dividing reveals nothing (McMahan et al., 2018: the number
    drawn, or a client that drops out, changes the mean a little, not the sensitivity).
    """
    return {
        k: ((t.double() + noise * clip * torch.randn(t.shape, generator=generator, dtype=torch.float64))
            / denominator).float()
        for k, t in total.items()
    }


@functools.lru_cache(maxsize=4096)
def budget_noise(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """``noise_for_budget``, remembered: the server checks every DP-SGD reply against it."""
    return noise_for_budget(epsilon, delta, sample_rate, steps)


def noise_for_budget(epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """The smallest noise multiplier whose ``steps`` events at ``sample_rate`` stay within
    (epsilon, delta), by Opacus' RDP accountant."""
    return opacus("accountants.utils").get_noise_multiplier(
        target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
        accountant="rdp",
    )


@dataclass(frozen=True)
class Privacy:
    """A run's ``--dp`` settings, with the noise multiplier resolved.

    Parameters
    ----------
    mode : str
        "user" (clip and noise at the server) or "sample" (DP-SGD on each client).
    clip : float
        C: the L2 bound of a client's update (user) or of an example's gradient (sample).
    noise : float
        z: the noise standard deviation as a multiple of C. Under ``sample`` with
        ``target_epsilon`` each client finds its own from its number of examples.
    delta : float
        delta; 0 means min(1e-5, 1/(10 n)), n the records protected (clients, or a
        client's examples).
    target_epsilon : float
        The epsilon the whole run should end at (0: use ``noise``).
    max_epsilon : float
        A round that would take epsilon past this is not run (0: no limit).
    sample_rate : float
        q: the probability that a client is drawn in a round (user level: Poisson
        sampling, LoraStrategy.sample_train_nodes).
    clients : int
        The number of clients in the federation (user level's n).
    batch_size, local_steps, rounds : int
        Sample level: the DP-SGD plan every client follows (its Poisson rate is
        batch_size / its examples; its steps local_steps a round, over ``rounds``), which
        the server holds each reply's DP-SGD settings to (``dpsgd_terms``).
    noise_seed : int
        Seed of the noise and of DP-SGD's sampling, or -1 for a fresh one from the OS
        (each stream derives its own seed from it: fedlora.seeds). A
        seeded noise can be recomputed, and so removed, by anyone who knows the seed (the
        clients know the run's ``--seed``): seeds are for experiments only.
    node_identities : bool
        Sample level: key each client's accountant by its node id, which an authenticated
        SuperNode cannot choose (``--supernode-auth``), not by the ``client-id`` it reports.
    """

    mode: str
    clip: float
    noise: float
    delta: float = 0.0
    target_epsilon: float = 0.0
    max_epsilon: float = 0.0
    sample_rate: float = 1.0
    clients: int = 1
    batch_size: int = 8
    local_steps: int = 10
    rounds: int = 1
    noise_seed: int = -1
    node_identities: bool = False

    @classmethod
    def from_config(cls, config) -> Privacy | None:
        """The settings of a RunConfig, or None when ``--dp off``."""
        if config.dp == "off":
            return None
        sampled = max(int(config.num_clients * config.fraction_train), config.min_clients)
        privacy = cls(
            mode=config.dp, clip=config.dp_clip, noise=config.dp_noise, delta=config.dp_delta,
            target_epsilon=config.dp_target_epsilon, max_epsilon=config.dp_max_epsilon,
            sample_rate=min(1.0, sampled / config.num_clients), clients=config.num_clients,
            batch_size=config.batch_size, local_steps=config.local_steps, rounds=config.rounds,
            noise_seed=config.dp_noise_seed, node_identities=config.supernode_auth,
        )
        if privacy.mode == "user" and privacy.target_epsilon:
            delta = privacy.delta_for(config.num_clients)
            noise = noise_for_budget(privacy.target_epsilon, delta, privacy.sample_rate, config.rounds)
            privacy = dataclasses.replace(privacy, noise=noise)
        return privacy

    def seed(self, *stream: int | str) -> int:
        """The seed of one noise stream (e.g. ``seed(round, partition, "dp-sgd-noise")``):
        derived from ``noise_seed`` and the stream's name, or fresh from the OS."""
        return stream_seed(self.noise_seed, *stream) if self.noise_seed >= 0 else secrets.randbits(63)

    def client_dpsgd(self, num_examples: int, server_round: int, partition: int) -> DPSGD:
        """A client's DP-SGD settings: Poisson rate batch_size / n_k, the noise that meets
        ``target_epsilon`` if the client trains in every round, and the seeds of its
        sampling and noise in this round (from ``noise_seed``, else from the OS)."""
        noise, sample_rate = self.dpsgd_terms(num_examples)
        return DPSGD(
            noise=noise, clip=self.clip, sample_rate=sample_rate,
            sampling_seed=self.seed(server_round, partition, "dp-sgd-sampling"),
            noise_seed=self.seed(server_round, partition, "dp-sgd-noise"),
        )

    def dpsgd_terms(self, num_examples: int) -> tuple[float, float]:
        """(noise multiplier, Poisson rate) of the DP-SGD of a client with ``num_examples``
        examples: rate batch_size / n_k, and ``noise``, or with ``target_epsilon`` the
        noise that meets it if the client trains ``local_steps`` in each of ``rounds``."""
        sample_rate = min(1.0, self.batch_size / num_examples)
        if not self.target_epsilon:
            return self.noise, sample_rate
        return budget_noise(self.target_epsilon, self.delta_for(num_examples), sample_rate,
                            self.rounds * self.local_steps), sample_rate

    def delta_for(self, records: int) -> float:
        """delta of a party holding ``records`` records: ``--dp-delta``, else the default."""
        return self.delta or default_delta(records)


def default_delta(records: int) -> float:
    """min(1e-5, 1 / (10 n)): well below 1/n, which admits a mechanism that publishes one
    of the n records in the clear."""
    return min(1e-5, 1.0 / (10 * records))


@dataclass(frozen=True)
class DPSGD:
    """One client's DP-SGD settings: Poisson sampling at ``sample_rate``, per-example
    clipping to ``clip`` and Gaussian noise ``noise * clip`` on each batch's sum; the
    sampling and the noise each come from a generator of their own seed."""

    noise: float
    clip: float
    sample_rate: float
    sampling_seed: int
    noise_seed: int


def make_private(model, optimizer, dpsgd: DPSGD, expected_batch_size: int, device: torch.device):
    """Opacus' DP-SGD around a model and its optimizer: the model keeps each example's
    gradient (``GradSampleModule``, whose hooks the caller removes with ``remove_hooks``)
    and the optimizer clips and noises them (``DPOptimizer``)."""
    private_optimizer = opacus("optimizers").DPOptimizer(
        optimizer, noise_multiplier=dpsgd.noise, max_grad_norm=dpsgd.clip,
        expected_batch_size=expected_batch_size,
        generator=torch.Generator(device).manual_seed(dpsgd.noise_seed),
    )
    return opacus("grad_sample").GradSampleModule(model), private_optimizer


Event = tuple[object, float, float, int, int]  # (party, noise, sample rate, steps, records)


class PrivacyAccountant:
    """Epsilon of a run so far, by Opacus' RDP accountant, one accountant per protected
    party: the federation's clients for user-level DP, each client's examples for
    sample-level DP.

    Parameters
    ----------
    delta : float (default: 0.0)
        delta of every party, or 0 for min(1e-5, 1 / (10 n)), n the party's records.
    """

    def __init__(self, delta: float = 0.0) -> None:
        self.delta = delta
        self.accountants: dict[object, object] = {}  # party -> Opacus' RDPAccountant
        self.records: dict[object, int] = {}
        self.last_round: dict[object, Event] = {}

    def record(self, party, noise: float, sample_rate: float, steps: int, records: int) -> None:
        """Compose ``steps`` Gaussian events of ``noise`` at ``sample_rate`` for ``party``,
        which holds ``records`` records."""
        if party not in self.accountants:
            self.accountants[party] = opacus("accountants").RDPAccountant()
        history = self.accountants[party].history  # (noise, rate, steps) entries, as Opacus'
        if history and history[-1][:2] == (noise, sample_rate):  # step() merges equal events
            history[-1] = (noise, sample_rate, history[-1][2] + steps)
        elif steps:
            history.append((noise, sample_rate, steps))
        self.records[party] = records
        self.last_round[party] = (party, noise, sample_rate, steps, records)

    def spent(self) -> tuple[float, float]:
        """(epsilon, delta): the largest epsilon over parties and the largest delta, so that
        every party is (epsilon, delta)-DP; (0, 0) before anything was released."""
        if not self.accountants:
            return 0.0, 0.0
        deltas = {p: self.delta or default_delta(n) for p, n in self.records.items()}
        epsilon = max(_epsilon(a, deltas[p]) for p, a in self.accountants.items())
        return epsilon, max(deltas.values())

    def state_dict(self) -> dict:
        """The accountant as plain values (for a checkpoint)."""
        return {
            "histories": {p: list(a.history) for p, a in self.accountants.items()},
            "records": dict(self.records),
            "last_round": dict(self.last_round),
        }

    def load_state_dict(self, state: dict) -> None:
        self.accountants = {}
        for party, history in state["histories"].items():
            self.accountants[party] = opacus("accountants").RDPAccountant()
            self.accountants[party].history = [tuple(event) for event in history]
        self.records = dict(state["records"])
        self.last_round = {p: tuple(e) for p, e in state["last_round"].items()}

    def epsilon_after(self, events: list[Event]) -> float:
        """The epsilon once ``events`` are recorded too (by default nothing changes)."""
        projected = copy.deepcopy(self)
        for event in events:
            projected.record(*event)
        return projected.spent()[0]


def _epsilon(accountant, delta: float) -> float:
    if any(noise == 0 for noise, _, _ in accountant.history):
        return math.inf  # no noise, no privacy (Opacus would divide by zero)
    return max(0.0, accountant.get_epsilon(delta))  # Opacus goes below 0 for a large delta


def check_settings(config) -> None:
    """Raise FedLoraError on DP settings that cannot go together (bounds are RunConfig's)."""
    if config.dp == "off":
        return
    if not 0.0 <= config.dp_delta < 1.0:
        raise FedLoraError(f"--dp-delta must be in (0, 1), or 0 for min(1e-5, 1/(10 n)); "
                           f"got {config.dp_delta:g}")
    if config.dp_target_epsilon and config.dp_noise != 1.0:
        raise FedLoraError("give --dp-noise or --dp-target-epsilon, not both")
    if config.dp_max_epsilon and config.dp_target_epsilon > config.dp_max_epsilon:
        raise FedLoraError(
            f"--dp-target-epsilon {config.dp_target_epsilon:g} exceeds the budget "
            f"--dp-max-epsilon {config.dp_max_epsilon:g}"
        )
