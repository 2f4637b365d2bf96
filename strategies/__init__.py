"""Flower strategies, one file per method, and the registry that finds them by name."""

from __future__ import annotations

from fedlora.errors import FedLoraError
from strategies.base import LoraStrategy
from strategies.fedavg import FedAvgLoRA
from strategies.fedsb import FedSB
from strategies.ffa import FFALoRA
from strategies.flora import FLoRA
from strategies.sparse import SparseLoRA

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls for cls in (FedAvgLoRA, FFALoRA, FLoRA, FedSB, SparseLoRA)
}


def strategy_class(name: str) -> type[LoraStrategy]:
    """The strategy class registered as ``name``."""
    if name not in STRATEGIES:
        raise FedLoraError(f"unknown strategy '{name}'; valid choices: {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


def build_strategy(config) -> LoraStrategy:
    """The strategy named by ``config.strategy``, built from the config."""
    return strategy_class(config.strategy).from_config(config)


__all__ = ["STRATEGIES", "LoraStrategy", "build_strategy", "strategy_class"]
