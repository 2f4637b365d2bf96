"""Flower strategies, one file per method, and the registry that finds them by name."""

from __future__ import annotations

from fedlora.errors import FedLoraError
from strategies.base import LoraStrategy
from strategies.fedavg import FedAvgLoRA

STRATEGIES: dict[str, type[LoraStrategy]] = {cls.name: cls for cls in (FedAvgLoRA,)}


def build_strategy(config) -> LoraStrategy:
    """The strategy named by ``config.strategy``, built from the config."""
    if config.strategy not in STRATEGIES:
        raise FedLoraError(
            f"unknown strategy '{config.strategy}'; valid choices: {', '.join(STRATEGIES)}"
        )
    return STRATEGIES[config.strategy].from_config(config)


__all__ = ["STRATEGIES", "LoraStrategy", "build_strategy"]
