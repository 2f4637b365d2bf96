"""CELLM / FLASC: sparse LoRA updates, top-k both ways, with an optional server optimizer."""

from __future__ import annotations

import dataclasses

import torch
from flwr.app import ConfigRecord

from fedlora.aggregate import State
from fedlora.codec import Codec, TopK
from fedlora.errors import FedLoraError
from fedlora.wire import Plan
from strategies.base import SECURE_METHODS, LoraStrategy


class SparseLoRA(LoraStrategy):
    """Dense local LoRA training, sparse communication (Kuo et al., FLASC, 2024).

    Each round the server sends the top-k (by magnitude, across all LoRA tensors) of the
    global adapter at density d_down, and each client uploads the top-k of its update
    (trained - received) at density d_up; both decay as d_t = d_0 * decay^floor((t - 1) /
    every), so round 1 uses d_0. The server adds the weighted mean of the sparse updates to
    its dense global adapter ("avg"), or feeds it to Adam as a pseudo-gradient ("adam",
    FedOpt). With ``error_feedback`` clients keep the part of their update the server did
    not receive and add it to the next one (FLASC drops it). Values travel as the codecs
    say (fp32 unless ``fp16`` or ``topk:D,fp16``; ``per-tensor`` picks the entries within
    each tensor), indices in the smallest integer type that holds them.

    Parameters
    ----------
    upload_density, download_density : float (default: 0.1, 1.0)
        d_up and d_down at round 1; 1.0 sends dense tensors without indices.
    density_decay : float (default: 1.0)
        gamma of the decay; 1.0 keeps the densities fixed.
    density_decay_every : int (default: 1)
        f of the decay, in rounds.
    server_optimizer : str (default: "avg")
        "avg" or "adam".
    server_lr : float (default: 1e-3)
        The server Adam's learning rate.
    error_feedback : bool (default: False)
        Whether clients carry their unsent residual to the next round.
    **kwargs
        See LoraStrategy. Its ``upload_codec`` and ``download_codec`` give the value type
        and index option of each direction (fp32, fp16, or topk:D[,fp16][,per-tensor] with
        D the initial density of that direction); the densities come from the schedule.
    """

    name = "sparse"

    def __init__(
        self,
        upload_density: float = 0.1,
        download_density: float = 1.0,
        density_decay: float = 1.0,
        density_decay_every: int = 1,
        server_optimizer: str = "avg",
        server_lr: float = 1e-3,
        error_feedback: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if self.secure_aggregation and upload_density < 1.0:
            raise FedLoraError(f"--secure-aggregation sums dense vectors, and --strategy sparse "
                               f"uploads each update's top-k at entries each client picks "
                               f"(--upload-density {upload_density:g}); valid choices: "
                               f"{SECURE_METHODS}")
        self.upload_form = sparse_form(self.upload_codec, upload_density, "upload")
        self.download_form = sparse_form(self.download_codec, download_density, "download")
        self.upload_density, self.download_density = upload_density, download_density
        self.density_decay, self.density_decay_every = density_decay, density_decay_every
        self.server_optimizer, self.server_lr = server_optimizer, server_lr
        self.error_feedback = error_feedback
        self.optimizer: torch.optim.Adam | None = None
        self.parameters: dict[str, torch.nn.Parameter] = {}

    @classmethod
    def config_arguments(cls, config) -> dict:
        return {
            **super().config_arguments(config),
            "upload_density": config.upload_density,
            "download_density": config.download_density,
            "density_decay": config.density_decay,
            "density_decay_every": config.density_decay_every,
            "server_optimizer": config.server_optimizer,
            "server_lr": config.server_lr,
            "error_feedback": config.error_feedback,
        }

    def density(self, initial: float, server_round: int) -> float:
        """d_t = d_0 * decay^floor((t - 1) / every): rounds count from 1, which uses d_0."""
        return initial * self.density_decay ** ((server_round - 1) // self.density_decay_every)

    def start_round(self, server_round: int) -> None:
        """The round's codecs, at its densities."""
        self.upload_codec = at_density(self.upload_form, self.density(self.upload_density, server_round))
        self.download_codec = at_density(self.download_form, self.density(self.download_density, server_round))

    def plan(self, config: ConfigRecord, server_round: int, task: str) -> Plan:
        plan = super().plan(config, server_round, task)
        plan.run = dataclasses.replace(plan.run, error_feedback=self.error_feedback)
        return plan

    def state_dict(self) -> dict:
        server_optimizer = None
        if self.optimizer is not None:  # Adam's moments carry over from round to round
            server_optimizer = {
                "parameters": {k: p.detach() for k, p in self.parameters.items()},
                "adam": self.optimizer.state_dict(),
            }
        return {**super().state_dict(), "server_optimizer": server_optimizer}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        saved = state["server_optimizer"]
        if saved is not None:
            self.parameters = {k: torch.nn.Parameter(v.clone()) for k, v in saved["parameters"].items()}
            self.optimizer = torch.optim.Adam(self.parameters.values(), lr=self.server_lr)
            self.optimizer.load_state_dict(saved["adam"])

    def aggregate_means(self, means, metrics) -> State:
        mean_update = {key: means[key].double() - self.global_state[key].double()
                       for key in self.global_state}
        if self.server_optimizer == "avg":
            return {k: (self.global_state[k].double() + u).float() for k, u in mean_update.items()}
        if self.optimizer is None:  # one Adam for the whole run: its moments carry over
            self.parameters = {k: torch.nn.Parameter(v.clone()) for k, v in self.global_state.items()}
            self.optimizer = torch.optim.Adam(self.parameters.values(), lr=self.server_lr)
        for key, parameter in self.parameters.items():
            parameter.grad = -mean_update[key].float()  # the update is a descent direction
        self.optimizer.step()
        return {k: p.detach().clone() for k, p in self.parameters.items()}


def sparse_form(given: Codec, density: float, direction: str) -> TopK:
    """The top-k codec a direction uses, from the codec the user gave it: its value type
    and index option, at the direction's initial ``density``; FedLoraError for a codec
    that cannot be a top-k, or whose density contradicts the schedule's."""
    flag = f"--{direction}-codec {given.name}"
    if given.kind in ("fp32", "fp16"):
        return TopK(density, given.kind)
    if given.kind != "topk":
        raise FedLoraError(f"{flag}: --strategy sparse sends top-k entries as fp32 or fp16 "
                           "values; valid: fp32, fp16, topk:D[,fp16][,per-tensor]")
    if given.density != density:
        raise FedLoraError(f"{flag}: --strategy sparse takes its density from "
                           f"--{direction}-density ({density:g}); give that density here, or "
                           "only the value type (fp16)")
    return given


def at_density(form: TopK, density: float) -> Codec:
    """``form`` at ``density``: dense values of its type at 1.0."""
    return Codec.parse(form.values) if density >= 1.0 else dataclasses.replace(form, density=density)
