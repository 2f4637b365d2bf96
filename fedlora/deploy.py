"""``python -m fedlora.deploy``: a federated run with real Flower processes on this machine.

It starts one ``flower-superlink`` and N ``flower-supernode`` processes on 127.0.0.1 (ports
chosen at runtime), submits the project's Flower app with ``flwr run`` and the run config
of the flags (the flags of ``python -m fedlora.simulate``, plus the deployment flags
below), streams the run's log and waits for the run to end. The ServerApp writes the same
``runs/<name>/`` as a simulation; the processes' logs go to ``runs/<name>/logs/``.

Every process it started is stopped when the run ends, fails or is interrupted (Ctrl-C,
SIGTERM). With ``--tls`` the processes talk over TLS, with trial certificates made by
``scripts/make_certs.sh``; without it over plain HTTP, which is safe on loopback only. With
``--auth`` (which implies ``--tls``) the SuperLink admits only the SuperNodes whose public
keys were registered with it (Flower's SuperNode authentication): each SuperNode gets a
fresh key pair, its public key is registered (``flwr supernode register``) before it starts,
and the run keys its clients by their authenticated node ids (``--supernode-auth``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
import warnings
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedlora.cli import build_parser as build_simulate_parser
from fedlora.cli import preflight_runs, print_outputs, study_from_args
from fedlora.config import RunConfig, comma_list
from fedlora.errors import FedLoraError
from fedlora.processes import (DeploymentFailed, Processes, flower_env, flower_tool, free_ports,
                               listening, wait_until)
from fedlora.study import StudyRun, pending
from server.outputs import adopt_provenance, provenance, run_dir

# The project folder: `flwr run` builds the Flower app from its pyproject.toml.
ROOT = Path(__file__).resolve().parents[1]
MAKE_CERTS = ROOT / "scripts" / "make_certs.sh"
CONNECTION = "fedlora-deploy"  # the SuperLink connection's name in $FLWR_HOME/config.toml
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class Federation:
    """The deployment-only settings: the SuperNodes to start and how they connect."""

    clients: int
    tls: bool = False
    auth: bool = False  # SuperNode authentication (with TLS)
    ranks: tuple[int, ...] = ()  # node-config rank of each SuperNode, cycled
    devices: tuple[str, ...] = ()  # node-config device of each SuperNode, cycled
    data_files: tuple[str, ...] = ()  # node-config data-file of each SuperNode

    def node_config(self, partition_id: int) -> str:
        """The ``--node-config`` of SuperNode ``partition_id`` (strings quoted, as TOML)."""
        items = [f"partition-id={partition_id}", f"num-partitions={self.clients}"]
        if self.data_files:
            items.append(f"data-file={json.dumps(self.data_files[partition_id])}")
        if self.ranks:
            items.append(f"rank={self.ranks[partition_id % len(self.ranks)]}")
        if self.devices:
            items.append(f'device="{self.devices[partition_id % len(self.devices)]}"')
        return " ".join(items)


def build_parser() -> argparse.ArgumentParser:
    """``python -m fedlora.simulate``'s flags plus the deployment flags."""
    parser = build_simulate_parser(
        "python -m fedlora.deploy",
        "Federated LoRA fine-tuning with real Flower processes on this machine: one "
        "SuperLink and N SuperNodes on 127.0.0.1.")
    group = parser.add_argument_group("deployment")
    group.add_argument(
        "--clients", type=int, metavar="N", default=None,
        help="SuperNodes to start; sets --num-clients (default: --num-clients)",
    )
    group.add_argument(
        "--tls", action="store_true",
        help="TLS with trial certificates (scripts/make_certs.sh) instead of plain HTTP",
    )
    group.add_argument(
        "--auth", action="store_true",
        help="SuperNode authentication (implies --tls): only SuperNodes whose public keys "
             "were registered join, and the DP accountant keys clients by their node ids",
    )
    group.add_argument(
        "--client-ranks", metavar="R,R,...", default="",
        help="each SuperNode's LoRA rank (node-config rank), cycled; for flora",
    )
    group.add_argument(
        "--client-devices", metavar="D,D,...", default="",
        help="each SuperNode's device (node-config device: auto, cpu or cuda), cycled",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[list[StudyRun], Federation]:
    """The runs (as ``fedlora.cli.study_from_args`` makes them) and the federation."""
    args = vars(build_parser().parse_args(argv))
    if args.pop("summarise", False):
        raise FedLoraError("--summarise runs nothing, so it needs no federation: give the same "
                           "study flags to python -m fedlora.simulate --summarise")
    clients = args.pop("clients")
    auth = args.pop("auth")
    tls = args.pop("tls") or auth
    if auth:  # the server then trusts node ids, not the clients' word
        args["supernode_auth"] = True
    ranks = _ranks(args.pop("client_ranks"))
    devices = tuple(comma_list(args.pop("client_devices")))
    for device in devices:
        if device not in DEVICES:
            raise FedLoraError(
                f"--client-devices: unknown device '{device}'; valid choices: {', '.join(DEVICES)}"
            )
    if clients is not None:
        if "num_clients" in args and str(args["num_clients"]) != str(clients):
            raise FedLoraError(
                f"--clients {clients} and --num-clients {args['num_clients']} differ; "
                "the server waits for --num-clients SuperNodes: give one of them"
            )
        args["num_clients"] = clients
    runs = study_from_args(args)
    configs = [run.config for run in runs]
    # Each SuperNode reads its own file (node-config data-file), as on a client's machine;
    # the run config keeps the list only so that the server knows it holds no data.
    files = tuple(str(Path(f).resolve()) for f in configs[0].client_data_list)
    for path in files:
        if '"' in path:
            raise FedLoraError(f"--client-data: '{path}' has a double quote, which "
                               "flower-supernode's --node-config cannot carry; rename it")
    return runs, Federation(configs[0].num_clients, tls, auth, ranks, devices, files)


def _ranks(text: str) -> tuple[int, ...]:
    """``--client-ranks 16,8`` as ranks, each in [1, 4096] like ``--rank``."""
    ranks = []
    for item in comma_list(text):
        if not item.isdigit() or not 1 <= int(item) <= 4096:
            raise FedLoraError(f"--client-ranks: '{item}' is not a rank in [1, 4096]")
        ranks.append(int(item))
    return tuple(ranks)


def make_certs(folder: Path) -> Path:
    """Trial certificates for 127.0.0.1 in ``folder``; return it."""
    if shutil.which("openssl") is None:
        raise FedLoraError("--tls needs openssl to make trial certificates; it is not installed")
    result = subprocess.run(["bash", str(MAKE_CERTS), str(folder)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise DeploymentFailed(f"{MAKE_CERTS.name} failed: {result.stderr.strip()}")
    return folder


def make_node_key(folder: Path, name: str) -> Path:
    """A fresh SuperNode key pair, as Flower's authentication reads it: an EC (P-384) private
    key in OpenSSH format at ``folder/name`` and its public key at ``folder/name.pub``;
    returns the private key's path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    folder.mkdir(parents=True, exist_ok=True)
    private = folder / name
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    (folder / f"{name}.pub").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return private


def write_connection(home: Path, port: int, certs: Path | None) -> None:
    """$FLWR_HOME/config.toml: how ``flwr`` reaches the SuperLink."""
    connection = {"address": f"127.0.0.1:{port}"}
    if certs is None:
        connection["insecure"] = True
    else:
        connection["root-certificates"] = str(certs / "ca.crt")
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(tomli_w.dumps({"superlink": {CONNECTION: connection}}))


def start_federation(federation: Federation, processes: Processes, work: Path,
                     certs: Path | None) -> int:
    """Start the SuperLink, write the connection ``flwr`` uses ($FLWR_HOME under
    ``work``), register the SuperNodes' keys where they authenticate, start the
    SuperNodes and wait until every one connected; return the SuperLink's port."""
    begin = time.perf_counter()
    link_port, *node_ports = free_ports(1 + federation.clients)
    if certs is None:
        link_tls, node_tls = ["--insecure"], ["--insecure"]
    else:
        link_tls = ["--ssl-ca-certfile", str(certs / "ca.crt"),
                    "--ssl-certfile", str(certs / "server.crt"),
                    "--ssl-keyfile", str(certs / "server.key")]
        node_tls = ["--root-certificates", str(certs / "ca.crt")]
    processes.start("superlink", [
        flower_tool("flower-superlink"), *link_tls, "--disable-runtime-dependency-installation",
        "--host", "127.0.0.1", "--port", str(link_port),
        *(["--enable-supernode-auth"] if federation.auth else []),
    ])
    wait_until(lambda: listening(link_port), "the SuperLink did not listen", processes,
               ["superlink"])
    write_connection(work / "flwr-home", link_port, certs)
    security = "TLS, SuperNode authentication" if federation.auth else "TLS" if certs else "no TLS"
    print(f"deploy: SuperLink on 127.0.0.1:{link_port} ({security}) "
          f"up after {time.perf_counter() - begin:.1f}s", flush=True)
    nodes = [f"supernode-{i}" for i in range(federation.clients)]
    for i, (name, port) in enumerate(zip(nodes, node_ports)):
        auth = []
        if federation.auth:  # registered before it starts: the SuperLink admits no other
            key = make_node_key(work / "keys", name)
            flwr_json(processes, f"register-{name}",
                      ["supernode", "register", f"{key}.pub", CONNECTION])
            auth = ["--auth-supernode-private-key", str(key)]
        processes.start(name, [
            flower_tool("flower-supernode"), *node_tls, *auth,
            "--superlink", f"127.0.0.1:{link_port}", "--port", str(port),
            "--node-config", federation.node_config(i),
        ])

    def connected() -> bool:  # a SuperNode logs its id once the SuperLink registered it
        return all("SuperNode ID:" in processes.log(n) for n in nodes)

    wait_until(connected, "not every SuperNode connected to the SuperLink", processes,
               ["superlink", *nodes])
    print(f"deploy: {federation.clients} SuperNodes connected after "
          f"{time.perf_counter() - begin:.1f}s", flush=True)
    return link_port


def flwr_json(processes: Processes, name: str, command: list[str]) -> dict:
    """Run a ``flwr ... --format json`` command; return its JSON answer."""
    process = processes.start(name, [flower_tool("flwr"), *command, "--format", "json"],
                              pipe=True)
    output, _ = process.communicate()
    try:
        answer = json.loads(output[output.index("{"):])
    except ValueError:
        answer = {}
    if process.returncode != 0 or not answer.get("success"):
        reason = answer.get("error-message") or output
        last = (reason.strip().splitlines() or ["no output"])[-1]
        raise DeploymentFailed(f"flwr {command[0]} failed: {last}")
    return answer


def run_once(config: RunConfig, federation: Federation, processes: Processes,
             work: Path) -> Path:
    """Submit ``config`` as a run, stream its log until it ends; return the run folder."""
    run_config = work / "run-config.toml"
    run_config.write_text(tomli_w.dumps(run_config_overrides(config)))
    code = provenance()  # the checkout that flwr run bundles into the app
    begin = time.perf_counter()
    answer = flwr_json(processes, f"flwr-run-{len(processes.started)}",
                       ["run", str(ROOT), CONNECTION, "--run-config", str(run_config)])
    run_id = answer["run-id"]
    print(f"deploy: run {run_id} submitted after {time.perf_counter() - begin:.1f}s",
          flush=True)

    # The run's log (the ServerApp's output) goes to the terminal and to logs/.
    log_name = "server" if "/" not in config.name else f"server-{Path(config.name).name}"
    stream = processes.start(log_name, [flower_tool("flwr"), "log", run_id, CONNECTION,
                                        "--stream"], pipe=True)
    copier = threading.Thread(target=_copy_lines, daemon=True,
                              args=(stream.stdout, processes.log_dir / f"{log_name}.log"))
    copier.start()
    alive = {f"supernode-{i}" for i in range(federation.clients)}
    while stream.poll() is None:  # the stream ends when the run does
        processes.check("superlink")
        # A SuperNode that dies is a client fault: the server passes it by at the round
        # timeout and goes on while --min-clients reply. Say so once; do not stop the run.
        for name in sorted(n for n in alive if processes.started[n].poll() is not None):
            alive.discard(name)
            print(f"deploy: {name} exited with code {processes.started[name].poll()}; the "
                  f"run goes on without it (see {processes.log_dir / (name + '.log')})", flush=True)
        time.sleep(0.5)
    copier.join(timeout=5)

    runs = flwr_json(processes, f"flwr-ls-{len(processes.started)}",
                     ["ls", CONNECTION, "--run-id", run_id])["runs"]
    status = runs[0]["status"] if runs else "unknown"
    server_log = processes.log_dir / f"{log_name}.log"
    if not status.startswith("finished:"):
        raise DeploymentFailed(f"the log stream of run {run_id} ended while the run is "
                               f"{status}; see {server_log}")
    if status != "finished:completed":
        raise DeploymentFailed(f"run {run_id} ended {status} "
                               f"({runs[0].get('status-details', '')}); see {server_log}")
    compute = runs[0].get("compute-time", {})
    print(f"deploy: run {run_id} completed: {float(runs[0].get('elapsed', 0)):.1f}s running "
          f"(ServerApp {float(compute.get('serverapp-seconds', 0)):.1f}s, ClientApps "
          f"{float(compute.get('clientapp-seconds', 0)):.1f}s in all)", flush=True)
    adopt_provenance(run_dir(config), code)
    return run_dir(config)


def run_config_overrides(config: RunConfig) -> dict:
    """The values of ``config`` that differ from the Flower app's run config defaults.

    ``flwr run`` refuses a key that pyproject.toml's ``[tool.flwr.app.config]`` lacks; a
    key it lacks whose value is RunConfig's default needs no sending, the server uses it.
    """
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    app_defaults = pyproject["tool"]["flwr"]["app"]["config"]
    defaults = RunConfig().to_dict()
    overrides = {}
    for key, value in config.to_dict().items():
        if key not in app_defaults and value != defaults[key]:
            raise FedLoraError(f"pyproject.toml's [tool.flwr.app.config] lacks '{key}', "
                               f"so flwr run cannot pass {key} = {value!r}")
        if key in app_defaults and value != app_defaults[key]:
            overrides[key] = value
    return overrides


def _copy_lines(source, path: Path) -> None:
    with path.open("a") as log:
        for line in source:
            sys.stdout.write(line)
            sys.stdout.flush()
            log.write(line)


def deploy(configs: list[RunConfig], federation: Federation) -> list[Path]:
    """Run ``configs`` one after another on one federation; return their run folders."""
    if not (ROOT / "pyproject.toml").is_file():
        raise FedLoraError(f"python -m fedlora.deploy runs the Flower app of the project "
                           f"folder, and {ROOT} has no pyproject.toml; install from a clone")
    preflight_runs(configs)  # mistakes fail here, before a process starts
    for config in configs:
        run_config_overrides(config)  # a key that flwr run would refuse
    # The folder that holds them all: a comparison's or a study's.
    folder = Path(os.path.commonpath([run_dir(c) for c in configs]))
    log_dir = folder / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    work = Path(tempfile.mkdtemp(prefix="fedlora-deploy-"))  # FLWR_HOME, certificates
    processes = Processes(flower_env(work / "flwr-home"), log_dir)
    try:
        certs = make_certs(work / "certs") if federation.tls else None
        start_federation(federation, processes, work, certs)
        return [run_once(config, federation, processes, work) for config in configs]
    finally:
        # a second Ctrl-C or SIGTERM must not cut the clean-up short
        previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            processes.stop()
            print(f"deploy: stopped the {len(processes.started)} processes it started "
                  f"(logs: {log_dir})", flush=True)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(work, ignore_errors=True)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM: stop the processes as a Ctrl-C does


def main(argv: list[str] | None = None) -> int:
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecation notes of deps
    previous = signal.signal(signal.SIGTERM, _interrupt)
    start = time.perf_counter()
    try:
        runs, federation = parse_args(argv)
        configs = pending(runs)  # a study's finished runs are skipped
        if configs:
            deploy(configs, federation)
    except DeploymentFailed as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except FedLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    print_outputs(runs, time.perf_counter() - start,
                  "config.toml, metrics.jsonl, adapter/, report.png, summary.json, logs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
