"""The checks a run passes before anything starts: the ones that need the strategy
registry, files, the model's name or the label set. A RunConfig checks only its own
values when it is built (RunConfig.validate); the commands (``fedlora.simulate``,
``fedlora.deploy``, ``fedlora.plan``) and the ServerApp call :func:`preflight` once per
run, so a mistake is one line before a process starts or a model loads."""

from __future__ import annotations

import dataclasses

from fedlora.config import RunConfig
from fedlora.data import check_data_file, check_dataset_name, declared_label_words
from fedlora.errors import FedLoraError
from fedlora.models import check_model_name, check_quantize
from strategies import LoraStrategy, build_strategy, resolved


def preflight(config: RunConfig, model: bool = True) -> tuple[LoraStrategy, RunConfig]:
    """The run's strategy and its config as the run uses it: the strategy's own defaults
    filled in and the evaluation settled for it; FedLoraError on the first mistake.

    Checks: the strategy is known and accepts the settings; the model is a known name, a
    Hugging Face folder or a .gguf file; ``--quantize`` finds its library and suits the
    strategy; the dataset (unless each client reads its own files: their errors are
    theirs) and ``--eval-dataset`` exist; ``--labels`` and ``--label-names`` parse.
    ``model=False`` leaves the model to the caller (the planner reads a config.json alone).
    """
    config = resolved(config)
    if model:
        check_model_name(config.model)
    check_quantize(config.quantize)
    if not config.client_data:
        check_dataset_name(config.dataset)
    if config.eval_dataset:
        check_data_file(config.eval_dataset, "--eval-dataset")
    declared_label_words(config)
    strategy = build_strategy(config)
    if strategy.changes_base and config.quantize == "int8":
        raise FedLoraError(
            f"--strategy {strategy.name} adds to the base weights, which on a quantised base "
            "go into dense copies of the adapted layers; LLM.int8 also rounds each layer's "
            "inputs to 8 bits, so no dense copy computes what the int8 base does: use "
            "--quantize nf4")
    return strategy, evaluation_for(strategy, config)


def evaluation_for(strategy: LoraStrategy, config: RunConfig) -> RunConfig:
    """``config`` with its evaluation settled for ``strategy``: a personalised method (each
    client keeps part of the adapter) has no global model to evaluate at the server, so
    ``auto`` means federated and central evaluation is refused."""
    if not strategy.personal:
        return config
    if config.evaluation in ("central", "both"):
        raise FedLoraError(f"--evaluation {config.evaluation}: --strategy {strategy.name} keeps "
                           f"{', '.join(strategy.personal)} on each client, so only the clients "
                           "can evaluate it; use --evaluation federated")
    if config.val_size:
        raise FedLoraError(f"--val-size {config.val_size}: --strategy {strategy.name} keeps "
                           f"{', '.join(strategy.personal)} on each client, so the server has no "
                           "model to validate; drop --val-size (and --lr-grid) for it")
    return dataclasses.replace(config, evaluation="federated")
