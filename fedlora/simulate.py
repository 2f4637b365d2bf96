"""``python -m fedlora.simulate``: a federated run with N virtual clients on this machine.

It runs the project's ServerApp logic (``server.run``) and ClientApp (``client.app``)
under Flower's simulation engine. Flags override the values of ``--config FILE``; a
mistake in either is reported in one line, with exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from pathlib import Path

from fedlora.cli import (build_parser, preflight_runs, print_outputs, study_from_args,
                         write_study_comparison)
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.study import pending


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
    from server.run import run_federation

    first = configs[0]
    for config in configs[1:]:
        for key in ("num_clients", "client_cpus", "client_gpus", "device"):
            if getattr(config, key) != getattr(first, key):
                raise FedLoraError(
                    f"--strategy {config.strategy} sets {key.replace('_', '-')} "
                    f"{getattr(config, key)!r}, {first.strategy} {getattr(first, key)!r}: the "
                    "strategies of a comparison share one federation"
                )
    cluster = os.environ.get("RAY_ADDRESS")  # a running Ray cluster to attach to
    cores = os.cpu_count() or 1
    if first.client_cpus > cores and not cluster:
        raise FedLoraError(f"--client-cpus {first.client_cpus} exceeds this machine's {cores} "
                           "cores: no client could be scheduled")
    gpu = first.device != "cpu" and torch.cuda.is_available()
    if first.client_gpus and not gpu and not cluster:
        raise FedLoraError(f"--client-gpus {first.client_gpus:g}: this machine has no CUDA GPU "
                           "(or --device cpu): no client could be scheduled; drop it, or attach "
                           "to a Ray cluster with GPUs (RAY_ADDRESS, docs: README)")
    report_client_files(first)
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
                                     "num_gpus": first.client_gpus or (1.0 if gpu else 0.0)},
                # A cluster brings its own resources: Ray refuses them given on attaching.
                "init_args": ({"address": cluster} if cluster else {"num_cpus": cores})
                | {"log_to_driver": False},
            },
        )
    finally:
        flower_log.removeFilter(_drop_run_simulation_notice)
    if "error" in outcome:
        raise outcome["error"]
    if len(outcome["run_dirs"]) < len(configs):  # a run failed without a FedLoraError
        raise RuntimeError("the simulation ended without finishing the run; see the log above")
    return outcome["run_dirs"]


def report_client_files(config: RunConfig) -> None:
    """Read the clients' files once, before the run, so that their bad rows and unusable
    files are reported here: a simulated client's log is not shown (Ray's workers keep
    theirs). The run goes on; a client whose file is unusable fails its rounds with the
    same reason."""
    from fedlora.data import declared_label_words, read_examples

    words = declared_label_words(config)
    for name in dict.fromkeys(config.client_data_list):
        try:
            read_examples(name, config, words)
        except FedLoraError as err:
            logging.getLogger("fedlora").warning("%s", err)


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
            from server.outputs import is_finished, run_dir

            finished = [run for run in runs if is_finished(run_dir(run.config))]
            if not finished:
                raise FedLoraError(f"--summarise: none of the {len(runs)} runs of this command "
                                   f"has finished under {runs[0].study_dir}")
            print(f"{len(finished)} of {len(runs)} runs are finished", flush=True)
            write_study_comparison(finished)
            return 0
        configs = preflight_runs(pending(runs))  # mistakes fail here, before Ray starts
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


if __name__ == "__main__":
    sys.exit(main())
