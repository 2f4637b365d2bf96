"""What the commands share (``fedlora.simulate``, ``fedlora.deploy``, ``fedlora.plan``):
their flags, the runs a command line asks for, the checks before anything starts and the
closing lines.

Importing it sets the environment the commands run in, before Flower or Hugging Face are
imported: no telemetry, no update checks, no model hub.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

for _name, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_name, _value)

from fedlora.config import RunConfig, comma_list  # noqa: E402  (after the environment)
from fedlora.errors import FedLoraError  # noqa: E402
from fedlora.study import GRID_FIELDS, StudyRun, expand, pop_study_keys  # noqa: E402


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser(prog: str = "python -m fedlora.simulate",
                 description: str = "Federated LoRA fine-tuning with N simulated clients "
                                    "(Flower simulation).") -> argparse.ArgumentParser:
    """One flag per RunConfig field, plus ``--config`` and the study flags."""
    parser = OneLineParser(prog=prog, description=description)
    parser.add_argument("--config", metavar="FILE", help="TOML file of settings; flags override it")
    study = parser.add_argument_group(
        "studies", "repeat each run over seeds and a grid; the same command again skips the "
        "finished runs and resumes an interrupted one")
    study.add_argument("--seeds", metavar="S,S,...", default=argparse.SUPPRESS,
                       help="run once per seed (data partitions, initialisation and batches "
                            "follow it), into <name>/<strategy>/seed<S>/")
    study.add_argument("--lr-grid", metavar="LR,LR,...", default=argparse.SUPPRESS,
                       help="run every learning rate; the value reported for each strategy is "
                            "chosen on --val-size validation examples")
    study.add_argument("--rank-grid", metavar="R,R,...", default=argparse.SUPPRESS,
                       help="run every LoRA rank, as --lr-grid (not --ranks, which gives each "
                            "client of flora, hetlora, flexlora its own rank)")
    study.add_argument("--summarise", action="store_true", default=argparse.SUPPRESS,
                       help="run nothing: write comparison.md and comparison.png of the "
                            "command's runs that have finished so far")
    for field in dataclasses.fields(RunConfig):
        flag, help = "--" + field.name.replace("_", "-"), field.metadata["help"]
        if isinstance(field.default, bool):  # --check-exactness / --no-check-exactness
            parser.add_argument(flag, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help)
            continue
        parser.add_argument(
            flag,
            default=argparse.SUPPRESS,  # only flags that were given override the file
            metavar=type(field.default).__name__.upper(),
            help=f"{help} (default: {field.default!r})",
        )
    return parser


def study_from_args(args: dict) -> list[StudyRun]:
    """The runs of parsed flags: one per strategy of ``--strategy a,b``, grid value and
    seed (fedlora.study), each config with its strategy's defaults filled in.

    ``args`` holds the flags given to a parser from ``build_parser`` (the flags that were
    not given are absent). Values come from the config file, then its table named after the
    strategy (e.g. ``[fedsb]`` with ``rank = 32``), then the flags. With several
    strategies, each run goes to ``<output>/<name>/<strategy>/`` on the same data
    partitions and seed. With ``--resume FOLDER`` the values come from the run's saved
    config.toml, then the flags (e.g. ``--rounds`` to run longer).
    """
    args = {k.replace("_", "-") if k in ("lr_grid", "rank_grid") else k: v
            for k, v in args.items()}
    study_flags = pop_study_keys(args)
    file = args.pop("config", None)
    if args.get("resume"):
        if file:
            raise FedLoraError("--resume continues a run with its own saved config; drop --config")
        if study_flags:
            raise FedLoraError("--resume continues one run; to continue a study, give its "
                               "command again")
        saved = Path(args["resume"]) / "config.toml"
        if not saved.is_file():
            raise FedLoraError(f"--resume {args['resume']}: not a run folder (no config.toml there)")
        file = saved
    for key, field in GRID_FIELDS.items():
        if key in study_flags and field in args:
            raise FedLoraError(f"--{field} and --{key} both given; keep one")
    from server.outputs import PROVENANCE, default_name  # Flower, after the environment
    from strategies import STRATEGIES

    values = RunConfig.from_toml(file) if file else {}
    values.pop(PROVENANCE, None)  # a saved run's record of its code: no setting
    study_file = pop_study_keys(values)
    tables = {k: values.pop(k) for k in list(values) if isinstance(values[k], dict)}
    strategy = str(args.get("strategy", values.get("strategy", "fedavg")))
    strategies = comma_list(strategy)

    # A table of a built-in strategy that is not run is kept for when it is (one file can
    # serve several runs); any other stray table is a typo.
    stray = sorted(set(tables) - set(strategies) - set(STRATEGIES))
    if stray:
        raise FedLoraError(
            f"config table [{stray[0]}] names no strategy; valid tables: "
            f"{', '.join(dict.fromkeys([*strategies, *STRATEGIES]))}"
        )

    name = args.get("name", values.get("name", "")) or default_name(",".join(strategies))
    runs = []
    for each in strategies:
        table = dict(tables.get(each, {}))
        study = {**study_file, **pop_study_keys(table), **study_flags}
        for key, field in GRID_FIELDS.items():  # a flag's single value overrides a file's grid
            if field in args and key not in study_flags:
                study.pop(key, None)
        merged = {**values, **table, **args, "strategy": each}
        runs += expand(merged, study, each, name, multi=len(strategies) > 1)
    return runs


def preflight_runs(configs: list[RunConfig]) -> list[RunConfig]:
    """Every run's checks (server.preflight), before a process starts or Ray does; a
    named run folder that already holds a run is refused; a GGUF model is converted once,
    before the clients ask for it. Returns the configs as the runs use them."""
    from fedlora.models import resolve_model
    from server.outputs import check_unused, run_dir
    from server.preflight import preflight

    checked = []
    for config in configs:
        _, config = preflight(config)
        if config.name and not config.resume:
            check_unused(run_dir(config))
        resolve_model(config.model)
        checked.append(config)
    return checked


def print_outputs(runs: list[StudyRun], seconds: float, files: str) -> None:
    """Say where the runs' outputs are; with several runs, write and print their comparison."""
    from server.outputs import run_dir

    print(f"done in {seconds:.0f}s: {run_dir(runs[-1].config)}/ ({files})")
    if len(runs) > 1:
        write_study_comparison(runs)


def write_study_comparison(runs: list[StudyRun]) -> None:
    """Write and print the comparison of ``runs`` (their rows, grid values and seeds)."""
    from fedlora.comparison import write_comparison
    from server.outputs import run_dir

    groups: dict[str, dict[str, list[Path]]] = {}
    for run in runs:
        groups.setdefault(run.label, {}).setdefault(run.tuned, []).append(run_dir(run.config))
    folder = runs[0].study_dir
    print("\n" + write_comparison(groups, folder))
    print(f"comparison: {folder}/comparison.md, {folder}/comparison.png")
