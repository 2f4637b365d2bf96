"""Flower strategies, one file per method, and the registry that finds them by name.

``--strategy`` names a built-in strategy (:data:`STRATEGIES`), an entry point of the group
``fedlora.strategies`` that an installed package declares, or a class as
``module:Class`` (docs/custom-strategies.md).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import re

from fedlora.errors import FedLoraError
from strategies.base import LoraStrategy
from strategies.fedavg import FedAvgLoRA
from strategies.fedex import FedExLoRA
from strategies.fedsa import FedSALoRA
from strategies.fedsb import FedSB
from strategies.fedsvd import FedSVD
from strategies.ffa import FFALoRA
from strategies.flexlora import FlexLoRA
from strategies.flora import FLoRA
from strategies.hetlora import HetLoRA
from strategies.rolora import RoLoRA
from strategies.sparse import SparseLoRA

STRATEGIES: dict[str, type[LoraStrategy]] = {
    cls.name: cls
    for cls in (FedAvgLoRA, FFALoRA, FLoRA, FedSB, SparseLoRA, HetLoRA, FlexLoRA, FedExLoRA,
                FedSALoRA, FedSVD, RoLoRA)
}


ENTRY_POINT_GROUP = "fedlora.strategies"


def strategy_class(name: str) -> type[LoraStrategy]:
    """The strategy class that ``name`` stands for.

    Looked up in this order: a built-in name (:data:`STRATEGIES`), an entry point of the
    group ``fedlora.strategies``, then ``module:Class`` (``Class`` may be dotted). The
    module is imported as Python imports it: ``python -m fedlora.simulate`` puts the
    current directory first on ``sys.path``, so a module there is found.

    Raises
    ------
    FedLoraError
        One line naming ``name`` and the valid choices, when the strategy is unknown,
        fails to import (a class that lacks both ``aggregate_states`` and
        ``aggregate_means`` fails where it is defined: LoraStrategy.__init_subclass__) or
        is not a LoraStrategy subclass.
    """
    if name in STRATEGIES:
        return STRATEGIES[name]
    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    plugins = sorted(set(entry_points.names) - set(STRATEGIES))  # built-in names win
    choices = ", ".join([*STRATEGIES, *plugins])
    if name in entry_points.names:
        load = entry_points[name].load
    elif ":" in name:
        load = functools.partial(_import_class, name)
    else:
        raise FedLoraError(f"unknown strategy '{name}'; valid choices: {choices}")
    try:
        cls = load()
    except Exception as err:  # whatever the user's module raises while it is imported
        reason = " ".join(f"{type(err).__name__}: {err}".split())  # one line
        raise FedLoraError(
            f"strategy '{name}' does not load ({reason}); valid choices: {choices}"
        ) from err
    if not (isinstance(cls, type) and issubclass(cls, LoraStrategy)):
        raise FedLoraError(
            f"strategy '{name}' is not a subclass of strategies.base.LoraStrategy; "
            f"valid choices: {choices}"
        )
    return cls


def _import_class(value: str):
    """The object ``module:attr.attr`` names, imported."""
    module, _, attributes = value.partition(":")
    return functools.reduce(getattr, attributes.split("."), importlib.import_module(module))


def folder_name(strategy: str) -> str:
    """``--strategy``'s value as part of a folder name: characters other than letters,
    digits, '_', '.' and '-' (the ':' of ``module:Class``) become '-'."""
    return re.sub(r"[^\w.-]", "-", strategy)


def unread_settings(config) -> list[dataclasses.Field]:
    """The RunConfig fields of another built-in method (a field's ``method``), which
    ``config``'s strategy does not read."""
    cls = strategy_class(config.strategy)
    return [f for f in dataclasses.fields(config)
            if "method" in f.metadata and not issubclass(cls, STRATEGIES[f.metadata["method"]])]


def ignored_settings(config) -> list[str]:
    """The settings of another built-in method that ``config`` moves from their default,
    as flags."""
    return [f"--{f.name.replace('_', '-')} {getattr(config, f.name)} ({f.metadata['method']}'s)"
            for f in unread_settings(config) if getattr(config, f.name) != f.default]


def resolved(config):
    """``config`` with its strategy's own values where it leaves them to the strategy (a
    learning rate or rank of 0, empty target modules): ``LoraStrategy.resolve``."""
    return strategy_class(config.strategy).resolve(config)


def build_strategy(config) -> LoraStrategy:
    """The strategy named by ``config.strategy``, built from the config (its defaults
    filled in: :func:`resolved`)."""
    return strategy_class(config.strategy).from_config(resolved(config))


__all__ = [
    "ENTRY_POINT_GROUP", "STRATEGIES", "LoraStrategy", "build_strategy", "folder_name",
    "ignored_settings", "resolved", "strategy_class", "unread_settings",
]
