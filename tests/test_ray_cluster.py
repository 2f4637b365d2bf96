"""A simulation attaches to a running Ray cluster (RAY_ADDRESS), as a multi-node one does:
here a one-node cluster started with ``ray start --head`` (README, "More than one machine")."""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def cluster():
    ray = Path(sys.executable).with_name("ray")
    # Ray's socket paths must stay short: a folder of its own right under /tmp
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    address = f"127.0.0.1:{free_port()}"
    subprocess.run([str(ray), "start", "--head", f"--port={address.split(':')[1]}", "--num-cpus=2",
                    "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                   check=True, capture_output=True, timeout=120)
    try:
        yield address, Path(temp)
    finally:
        stop_cluster(temp)
        shutil.rmtree(temp, ignore_errors=True)


def stop_cluster(temp: str) -> None:
    """Stop this cluster's processes only: ``ray stop`` would stop every Ray on the machine
    (the other test worker's simulations too). Each of them names its session folder,
    under ``temp``, on its command line; a test cluster has nothing to save, so SIGKILL
    (SIGTERM left them running for 20 s)."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"])
            if any(temp in part for part in p.info["cmdline"] or [])]
    for process in mine:
        process.kill()
    psutil.wait_procs(mine, timeout=10)


def test_a_simulation_runs_on_a_running_ray_cluster(cluster, tmp_path):
    address, temp = cluster
    drivers = lambda: sorted(temp.glob("session_2*/logs/python-core-driver-*"))  # noqa: E731
    before = drivers()
    command = [sys.executable, "-m", "fedlora.simulate", "--model", "tiny-llama", "--rounds", "1",
               "--num-clients", "2", "--local-steps", "2", "--eval-size", "16",
               "--output", str(tmp_path), "--name", "on-cluster"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "RAY_ADDRESS": address})
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "on-cluster" / "summary.json").is_file()
    # The run was a job of the cluster (its driver logged there), not a Ray of its own
    assert len(drivers()) == len(before) + 1


def test_gpus_per_client_without_a_gpu_is_one_line(tmp_path, capsys, monkeypatch):
    import torch

    from fedlora.simulate import main

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--model", "tiny-llama", "--client-gpus", "0.5", "--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "error: --client-gpus 0.5: this machine has no CUDA GPU (or --device cpu): no client "
        "could be scheduled; drop it, or attach to a Ray cluster with GPUs (RAY_ADDRESS, docs: "
        "README)\n")
