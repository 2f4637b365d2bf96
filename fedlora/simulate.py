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
    """The validated RunConfigs of a command line: see ``configs_from_args``."""
    return configs_from_args(vars(build_parser().parse_args(argv)))


def configs_from_args(args: dict) -> list[RunConfig]:
    """The validated RunConfigs of parsed flags: one per strategy of ``--strategy a,b``.

    ``args`` holds the flags given to a parser from ``build_parser`` (the flags that were
    not given are absent). Values come from the config file, then its table named after the
    strategy (e.g. ``[fedsb]`` with ``rank = 32``), then the flags. With several
    strategies, each run goes to ``<output>/<name>/<strategy>/`` on the same data
    partitions and seed. With ``--resume FOLDER`` the values come from the run's saved
    config.toml, then the flags (e.g. ``--rounds`` to run longer).
    """
    args = dict(args)
    file = args.pop("config", None)
    if args.get("resume"):
        if file:
            raise FedLoraError("--resume continues a run with its own saved config; drop --config")
        saved = Path(args["resume"]) / "config.toml"
        if not saved.is_file():
            raise FedLoraError(f"--resume {args['resume']}: not a run folder (no config.toml there)")
        file = saved
    values = RunConfig.from_toml(file) if file else {}
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
    configs = []
    for each in strategies:
        merged = {**values, **tables.get(each, {}), **args, "strategy": each, "name": name}
        if len(strategies) > 1:
            merged["name"] = f"{name}/{folder_name(each)}"
        configs.append(RunConfig.from_dict(merged))
    return configs


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
                    print(f"\n== {config.strategy} ==", flush=True)
                outcome["run_dirs"].append(run_federation(grid, config, simulation=True))
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
    if len(outcome["run_dirs"]) < len(configs):
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
        configs = parse_configs(argv)
        from server.run import check_unused, evaluation_for
        from strategies import build_strategy

        for config in configs:  # mistakes fail here, before Ray starts for the first run
            evaluation_for(build_strategy(config), config)  # an unknown strategy or a refused combination
            if config.name and not config.resume:
                check_unused(Path(config.output) / config.name)
        start = time.perf_counter()
        run_dirs = simulate(configs)
    except FedLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_outputs(run_dirs, time.perf_counter() - start, "config.toml, metrics.jsonl, adapter/, report.png")
    return 0


def print_outputs(run_dirs: list[Path], seconds: float, files: str) -> None:
    """Say where the runs' outputs are; with several runs, write and print their comparison."""
    print(f"done in {seconds:.0f}s: {run_dirs[-1]}/ ({files})")
    if len(run_dirs) > 1:
        from server.report import write_comparison

        folder = Path(run_dirs[0]).parent
        print("\n" + write_comparison(run_dirs, folder))
        print(f"comparison: {folder}/comparison.md, {folder}/comparison.png")


if __name__ == "__main__":
    sys.exit(main())
