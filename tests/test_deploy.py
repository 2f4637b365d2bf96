"""``python -m fedlora.deploy``: a SuperLink and SuperNodes as real processes on loopback.

Each deployment runs in a subprocess whose TMPDIR is the test's folder, so every Flower
process it starts has a FLWR_HOME there; the test also records the process ids of the
deployment's descendants while it runs, and checks afterwards that none is left running.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import psutil
import pytest

from fedlora import deploy
from fedlora.config import RunConfig
from strategies import resolved
from strategies.fedavg import FedAvgLoRA

ROOT = Path(__file__).resolve().parents[1]

# Seconds matter here: tiny model, tiny evaluation, Fed-SB without its gradient round.
TINY = ["--model", "tiny-llama", "--local-steps", "2", "--batch-size", "4", "--max-length", "48"]
FAST = [*TINY, "--strategy", "fedsb", "--fedsb-init", "random"]
SHARE = ["--eval-size", "16"]  # the server's held-out share of --dataset
# The keys a simulation writes for every trained round (docs: README, Outputs), and those
# of central or federated evaluation.
ROUND_KEYS = {"round", "strategy", "clients", "dropped", "train_loss", "bytes_up", "bytes_down",
              "cumulative_bytes_up", "cumulative_bytes_down", "seconds", "client_train_seconds"}
CENTRAL_KEYS = {"eval_loss", "eval_accuracy", "eval_macro_f1", "eval_seconds"}
FEDERATED_KEYS = {"fed_eval_loss", "fed_eval_accuracy", "fed_eval_accuracy_min",
                  "fed_eval_by_client", "fed_eval_seconds", "eval_bytes_up", "eval_bytes_down"}


def running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def flower_processes(folder: Path) -> list[psutil.Process]:
    """Running processes whose FLWR_HOME lies under ``folder``."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("FLWR_HOME", "").startswith(str(folder)) and running(process):
                found.append(process)
        except psutil.Error:
            pass
    return found


def run_deploy(tmp_path: Path, *flags: str, terminate_on: str | None = None,
               kill_on: tuple[str, str] | None = None, on_output=None, timeout: float = 300):
    """Run ``python -m fedlora.deploy`` with ``flags``; return (exit code, output, left).

    ``left`` lists the processes the deployment started that still run after it exited.
    With ``terminate_on``, the deployment gets SIGTERM once one of the processes it
    started runs a command line that holds this text. With ``kill_on = (trigger, victim)``,
    once a process's command line holds ``trigger``, the one whose command line holds
    ``victim`` is killed (SIGKILL). With ``on_output = (text, action)``, ``action(output)``
    is called once the deployment's output holds ``text``.
    """
    output = tmp_path / "deploy.out"
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # deploy's FLWR_HOME goes under it
    command = [sys.executable, "-m", "fedlora.deploy", *flags,
               "--output", str(tmp_path / "runs")]
    seen: dict[int, psutil.Process] = {}
    with output.open("w") as sink:
        process = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while process.poll() is None and time.monotonic() < deadline:
            try:
                children = psutil.Process(process.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            if on_output and on_output[0] in output.read_text():
                on_output[1](output.read_text())
                on_output = None
            for child in children:
                seen.setdefault(child.pid, child)
                if terminate_on and terminate_on in " ".join(_command(child)):
                    process.send_signal(signal.SIGTERM)
                    terminate_on = None
                if kill_on and kill_on[0] in " ".join(_command(child)):
                    victims = [c for c in children if kill_on[1] in " ".join(_command(c))]
                    assert len(victims) == 1, [_command(c) for c in victims]
                    victims[0].kill()
                    kill_on = None
            time.sleep(0.2)
        if process.poll() is None:
            process.kill()
        process.wait()
        left = [p for p in seen.values() if running(p)]
        left += [p for p in flower_processes(tmp_path) if p.pid not in seen]
    finally:
        for leftover in [*seen.values(), *flower_processes(tmp_path)]:
            if running(leftover):  # psutil checks the pid still names the same process
                leftover.kill()
    return process.returncode, output.read_text(), left


def _command(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def check_outputs(run_dir: Path, rounds: int, clients: int, evaluation=CENTRAL_KEYS) -> list[dict]:
    """The output contract of a run folder, as a simulation writes it."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == list(range(rounds + 1))
    for row in rows[1:]:
        assert ROUND_KEYS | evaluation <= set(row), ROUND_KEYS | evaluation - set(row)
        assert row["clients"] == clients and row["bytes_up"] > 0 and row["bytes_down"] > 0
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert (run_dir / "report.png").is_file()
    config = tomllib.loads((run_dir / "config.toml").read_text())
    assert config["num-clients"] == clients and config["rounds"] == rounds
    # flwr run serves the app from a bundle; the checkout deploy submitted is recorded
    assert config["provenance"] == json.loads((run_dir / "summary.json").read_text())["provenance"]
    assert config["provenance"]["commit"] == subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    for name in ("superlink", "supernode-0", "supernode-1", "server"):
        assert (run_dir / "logs" / f"{name}.log").is_file(), name
    return rows


def test_supernodes_with_their_own_files_and_a_server_without_data_over_tls_with_auth(tmp_path):
    # One deployment serves four checks: the output contract; a real federation (each
    # SuperNode trains on and evaluates its own file, the server holds no data and
    # evaluates through the clients); TLS (plain HTTP is what the killed-SuperNode test
    # below runs); and SuperNode authentication: a SuperNode whose key was never
    # registered tries to join once the SuperLink is up, is refused, and the run goes on.
    sizes = (30, 50)
    files = []
    for i, size in enumerate(sizes):
        files.append(tmp_path / f"hospital-{i}.jsonl")
        files[-1].write_text("".join(
            json.dumps({"text": f"the film was {'good' if j % 2 else 'bad'} .",
                        "label": ["negative", "positive"][j % 2]}) + "\n" for j in range(size)))
    intruder = {}

    def intrude(output: str) -> None:  # a SuperNode with a key of its own making
        port = output.split("deploy: SuperLink on 127.0.0.1:")[1].split(" ")[0]
        [ca] = tmp_path.glob("fedlora-deploy-*/certs/ca.crt")
        key = deploy.make_node_key(tmp_path / "intruder", "key")
        intruder["log"] = tmp_path / "intruder.log"
        intruder["process"] = subprocess.Popen(
            [deploy.flower_tool("flower-supernode"), "--root-certificates", str(ca),
             "--auth-supernode-private-key", str(key), "--superlink", f"127.0.0.1:{port}",
             "--port", str(deploy.free_ports(1)[0]), "--node-config", "partition-id=1 num-partitions=2"],
            stdout=intruder["log"].open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, stopped below
            env={**os.environ, "FLWR_HOME": tempfile.mkdtemp(prefix="intruder-")})

    code, output, left = run_deploy(
        tmp_path, "--client-data", ",".join(map(str, files)), "--labels", "negative,positive",
        "--rounds", "1", "--auth", "--name", "tls", *FAST,
        on_output=("(TLS, SuperNode authentication) up", intrude))
    try:
        assert intruder["process"].wait(timeout=60) != 0
    finally:
        with contextlib.suppress(ProcessLookupError):  # it, and what it started
            os.killpg(intruder["process"].pid, signal.SIGKILL)
    assert "Failed to activate SuperNode" in intruder["log"].read_text()
    assert code == 0, output[-3000:]
    assert left == []
    run_dir = tmp_path / "runs" / "tls"
    rows = check_outputs(run_dir, rounds=1, clients=2, evaluation=FEDERATED_KEYS)
    assert not CENTRAL_KEYS & set(rows[-1])  # no data at the server, no central evaluation
    # Each SuperNode held out a tenth of its own file: 3 of 30 and 5 of 50 examples.
    assert sorted(c["examples"] for c in rows[-1]["fed_eval_by_client"].values()) == [3, 5]
    assert "train loss" in (run_dir / "logs" / "server.log").read_text()  # the streamed table
    assert "(TLS, SuperNode authentication)" in output
    superlink_log = (run_dir / "logs" / "superlink.log").read_text()
    assert superlink_log.count("[ControlServicer.RegisterNode] Created node_id=") == 2
    assert "--insecure" not in superlink_log
    assert "Uvicorn running on https://127.0.0.1" in superlink_log
    assert not list(tmp_path.glob("fedlora-deploy-*")), "the temporary folder (keys) is gone"


def test_a_supernode_killed_mid_round_does_not_kill_the_run(tmp_path):
    # SuperNode 1 dies once the clients train: its reply never comes, the round times out
    # on it and goes on with SuperNode 0's (--min-clients 1). SuperNode 0's reply takes about
    # 10 s on an idle machine and over 20 s beside the other test worker's simulations. The
    # timeout must also end the round before Flower's SuperLink declares the dead node
    # unavailable (2 missed 30 s heartbeats: 30 to 60 s after the kill); at 45 s the two raced.
    timeout = 28
    code, output, left = run_deploy(
        tmp_path, "--clients", "2", "--rounds", "1", "--min-clients", "1", "--round-timeout", str(timeout),
        "--name", "killed", *FAST, *SHARE, kill_on=("flwr-clientapp", "partition-id=1 "),
    )
    assert code == 0, output[-3000:]
    assert left == []
    assert "(no TLS)" in output
    run_dir = tmp_path / "runs" / "killed"
    assert "Uvicorn running on http://127.0.0.1" in (run_dir / "logs" / "superlink.log").read_text()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    assert [r["round"] for r in rows] == [0, 1] and (rows[1]["clients"], rows[1]["dropped"]) == (1, 1)
    assert "deploy: supernode-1 exited with code -9; the run goes on without it" in output
    assert f"round 1: 1 of 2 clients did not reply within {timeout}s" in (
        tmp_path / "runs" / "killed" / "logs" / "server.log").read_text()


def test_failed_run_stops_every_process_and_says_why(tmp_path):
    # rank-4 clients under a rank-8 FedAvg: the server drops both replies, the round fails
    code, output, left = run_deploy(tmp_path, "--clients", "2", "--client-ranks", "4",
                                    "--rounds", "1", "--name", "failed", *TINY, *SHARE)
    assert code == 1, output[-3000:]
    assert left == []
    last = output.strip().splitlines()[-1]
    assert last.startswith("error: run ") and "finished:failed" in last
    assert "round 1 failed: 0 of 2 clients" in last


def test_sigterm_while_clients_train_stops_every_process(tmp_path):
    code, output, left = run_deploy(tmp_path, "--clients", "2", "--rounds", "2",
                                    "--name", "stopped", *FAST, *SHARE, terminate_on="flwr-clientapp")
    assert code == 130, output[-3000:]
    assert left == []
    assert "stopped the" in output and output.strip().endswith("interrupted")


@pytest.mark.parametrize("flags, message", [
    (["--clients", "2", "--num-clients", "3"], "--clients 2 and --num-clients 3 differ"),
    (["--client-devices", "tpu"], "unknown device 'tpu'; valid choices: auto, cpu, cuda"),
    (["--client-ranks", "8,x"], "--client-ranks: 'x' is not a rank"),
    (["--rank", "5000"], "--rank"),
])
def test_a_mistake_is_one_line_and_exit_code_2(flags, message, capsys):
    assert deploy.main(flags) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_a_bad_flag_is_argparse_exit_code_2(capsys):
    with pytest.raises(SystemExit) as exit:
        deploy.main(["--clients", "two"])
    assert exit.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_node_config_cycles_ranks_and_devices():
    federation = deploy.Federation(3, ranks=(16, 8), devices=("cuda", "cpu"))
    assert federation.node_config(0) == 'partition-id=0 num-partitions=3 rank=16 device="cuda"'
    assert federation.node_config(2) == 'partition-id=2 num-partitions=3 rank=16 device="cuda"'
    assert deploy.Federation(2).node_config(1) == "partition-id=1 num-partitions=2"


def test_run_config_sends_what_differs_from_the_app_defaults():
    config = resolved(RunConfig.from_dict({"model": "tiny-llama", "rounds": 2, "name": "x"}))
    # The strategy's own settings are sent as the values used (the app's 0 and "" would
    # mean the same).
    assert deploy.run_config_overrides(config) == {
        "model": "tiny-llama", "rounds": 2, "name": "x", "lr": FedAvgLoRA.default_lr,
        "rank": FedAvgLoRA.default_rank, "target-modules": FedAvgLoRA.default_target_modules}


def test_a_study_deploys_its_runs_one_after_another():
    runs, federation = deploy.parse_args(["--model", "tiny-llama", "--seeds", "0,1", "--clients", "2",
                                          "--name", "d"])
    assert [(r.config.name, r.config.seed) for r in runs] == [("d/fedavg/seed0", 0), ("d/fedavg/seed1", 1)]
    assert federation.clients == 2
