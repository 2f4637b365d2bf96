"""``python -m fedlora.simulate``: a federated run with N virtual clients on this machine.

It runs the project's ServerApp logic (``server.run``) and ClientApp (``client.app``)
under Flower's simulation engine. Flags override the values of ``--config FILE``; a
mistake in either is reported in one line, with exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
import warnings
from datetime import datetime
from pathlib import Path

from fedlora.config import RunConfig, comma_list
from fedlora.errors import FedLoraError
from fedlora.study import GRID_FIELDS, StudyRun, expand, is_finished, pending, pop_study_keys, run_dir

# Flower and Hugging Face: no telemetry, no update checks, no hub.
for _name, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_name, _value)


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """One flag per RunConfig field, plus ``--config``."""
    parser = _OneLineParser(
        prog="python -m fedlora.simulate",
        description="Federated LoRA fine-tuning with N simulated clients (Flower simulation).",
    )
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


def parse_configs(argv: list[str] | None = None) -> list[RunConfig]:
    """The validated RunConfigs of a command line: see ``study_from_args``."""
    return [run.config for run in study_from_args(vars(build_parser().parse_args(argv)))]


def configs_from_args(args: dict) -> list[RunConfig]:
    """The validated RunConfigs of parsed flags: see ``study_from_args``."""
    return [run.config for run in study_from_args(args)]


def study_from_args(args: dict) -> list[StudyRun]:
    """The runs of parsed flags: one per strategy of ``--strategy a,b``, grid value and
    seed (fedlora.study).

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
    values = RunConfig.from_toml(file) if file else {}
    study_file = pop_study_keys(values)
    tables = {k: values.pop(k) for k in list(values) if isinstance(values[k], dict)}
    strategy = str(args.get("strategy", values.get("strategy", "fedavg")))
    strategies = comma_list(strategy)
    from strategies import STRATEGIES, folder_name  # Flower, after this module's env vars

    # A table of a built-in strategy that is not run is kept for when it is (one file can
    # serve several runs); any other stray table is a typo.
    stray = sorted(set(tables) - set(strategies) - set(STRATEGIES))
    if stray:
        raise FedLoraError(
            f"config table [{stray[0]}] names no strategy; valid tables: "
            f"{', '.join(dict.fromkeys([*strategies, *STRATEGIES]))}"
        )

    name = args.get("name", values.get("name", "")) or default_run_name(
        [folder_name(s) for s in strategies]  # "module:Class" has a ':'
    )
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


def default_run_name(strategies: list[str]) -> str:
    return f"{'-'.join(strategies)}-{datetime.now():%Y%m%d-%H%M%S}"


def simulate(configs: list[RunConfig]) -> list[Path]:
    """Run ``configs`` one after another under one Flower simulation; return the run folders.

    One engine start serves them all: the client actors start (and import torch, load the
    model) once, not once per strategy of a comparison. The configs must agree on the
    federation (``num-clients``, ``client-cpus``, ``device``); each client resets its node
    state when the plan names another run.
    """
    import torch
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client.app import app as client_app
    from fedlora.models import resolve_model
    from server.run import run_federation

    first = configs[0]
    for config in configs[1:]:
        for key in ("num_clients", "client_cpus", "device"):
            if getattr(config, key) != getattr(first, key):
                raise FedLoraError(
                    f"--strategy {config.strategy} sets {key.replace('_', '-')} "
                    f"{getattr(config, key)!r}, {first.strategy} {getattr(first, key)!r}: the "
                    "strategies of a comparison share one federation"
                )
    cores = os.cpu_count() or 1
    if first.client_cpus > cores:
        raise FedLoraError(f"--client-cpus {first.client_cpus} exceeds this machine's {cores} "
                           "cores: no client could be scheduled")
    for config in configs:
        resolve_model(config.model)  # convert a GGUF once, before clients ask for it

    outcome: dict = {"run_dirs": []}
    server_app = ServerApp()

    @server_app.main()
    def _main(grid, context) -> None:
        flower_log = logging.getLogger("flwr")  # the engine reset it: one round, one line
        flower_log.setLevel(logging.WARNING)
        flower_log.propagate = False
        try:
            for config in configs:
                if len(configs) > 1:
                    print(f"\n== {config.name} ==", flush=True)
                try:
                    outcome["run_dirs"].append(run_federation(grid, config, simulation=True))
                except FedLoraError as err:  # one failed run of a study stops no other
                    if len(configs) == 1:
                        raise
                    print(f"error: {config.name}: {err}", file=sys.stderr, flush=True)
                    outcome.setdefault("error", err)
        except BaseException as err:  # the engine would log and swallow it
            outcome["error"] = err

    gpu = first.device != "cpu" and torch.cuda.is_available()
    flower_log = logging.getLogger("flwr")
    flower_log.addFilter(_drop_run_simulation_notice)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=first.num_clients,
            backend_config={
                # Ray gives each actor OMP_NUM_THREADS = its CPUs: torch's threads follow.
                "client_resources": {"num_cpus": first.client_cpus,
                                     "num_gpus": 1.0 if gpu else 0.0},
                "init_args": {"num_cpus": cores, "log_to_driver": False},
            },
        )
    finally:
        flower_log.removeFilter(_drop_run_simulation_notice)
    if "error" in outcome:
        raise outcome["error"]
    if len(outcome["run_dirs"]) < len(configs):  # a run failed without a FedLoraError
        raise RuntimeError("the simulation ended without finishing the run; see the log above")
    return outcome["run_dirs"]


def _drop_run_simulation_notice(record: logging.LogRecord) -> bool:
    """Flower 1.41 calls ``run_simulation`` deprecated in favour of ``flwr run``, and says so
    on every run. It is kept on purpose: ``flwr run`` takes the config only as a flat run
    config, starts a SuperLink process that outlives it and first packs the project folder
    into an archive (6 s with a virtual environment inside it, measured), while ``run_simulation`` runs this process's ServerApp closure over
    the parsed config and hands its errors back to print in one line. ``flwr run .`` works
    too (README, "With Flower's own CLI")."""
    return "`run_simulation` function is deprecated" not in record.getMessage()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fedlora").setLevel(logging.INFO)
    logging.getLogger("flwr").propagate = False  # Flower has its own console handler
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes of deps
    try:
        args = vars(build_parser().parse_args(argv))
        summarise = args.pop("summarise", False)
        runs = study_from_args(args)
        if summarise:
            finished = [run for run in runs if is_finished(run_dir(run.config))]
            if not finished:
                raise FedLoraError(f"--summarise: none of the {len(runs)} runs of this command "
                                   f"has finished under {runs[0].study_dir}")
            print(f"{len(finished)} of {len(runs)} runs are finished", flush=True)
            write_study_comparison(finished)
            return 0
        configs = pending(runs)
        from server.run import check_unused, evaluation_for
        from strategies import build_strategy

        for config in configs:  # mistakes fail here, before Ray starts for the first run
            evaluation_for(build_strategy(config), config)  # an unknown strategy or a refused combination
            if config.name and not config.resume:
                check_unused(Path(config.output) / config.name)
        if len(configs) < len(runs):
            print(f"{len(runs) - len(configs)} of {len(runs)} runs are finished; running "
                  f"{len(configs)}", flush=True)
        start = time.perf_counter()
        if configs:
            simulate(configs)
    except FedLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_outputs(runs, time.perf_counter() - start, "config.toml, metrics.jsonl, adapter/, report.png, summary.json")
    return 0


def print_outputs(runs: list[StudyRun], seconds: float, files: str) -> None:
    """Say where the runs' outputs are; with several runs, write and print their comparison."""
    print(f"done in {seconds:.0f}s: {run_dir(runs[-1].config)}/ ({files})")
    if len(runs) > 1:
        write_study_comparison(runs)


def write_study_comparison(runs: list[StudyRun]) -> None:
    """Write and print the comparison of ``runs`` (their rows, grid values and seeds)."""
    from server.report import write_comparison

    groups: dict[str, dict[str, list[Path]]] = {}
    for run in runs:
        groups.setdefault(run.label, {}).setdefault(run.tuned, []).append(run_dir(run.config))
    folder = runs[0].study_dir
    print("\n" + write_comparison(groups, folder))
    print(f"comparison: {folder}/comparison.md, {folder}/comparison.png")


if __name__ == "__main__":
    sys.exit(main())
