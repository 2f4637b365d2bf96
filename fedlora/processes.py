"""The processes a deployment starts, and how they are watched and stopped: a supervisor
that ends every process it started (and the helpers those started), whatever way the
deployment ends, and the small waits and look-ups around starting them."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from fedlora.errors import FedLoraError

START_TIMEOUT = 120.0  # seconds for the SuperLink to listen and each SuperNode to connect


class DeploymentFailed(FedLoraError):
    """A Flower process or the run failed; the message names the log to read."""


class Processes:
    """The processes a deployment starts; ``stop`` ends them and everything they started.

    Each starts in a session of its own, so a Ctrl-C in the terminal reaches only this
    program, which then stops them all. Flower's SuperLink and SuperNodes start helper
    processes (SuperExec, ServerApp, ClientApps) in sessions of their own too: ``stop``
    finds them by walking the process tree before it signals anything.
    """

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.started: dict[str, subprocess.Popen] = {}
        self.log_offsets: dict[str, int] = {}  # where this deployment's part of a log starts

    def start(self, name: str, command: list[str], pipe: bool = False) -> subprocess.Popen:
        """Start ``command``; its output goes to ``logs/<name>.log``, or to a pipe."""
        if pipe:
            output = subprocess.PIPE
        else:
            output = (self.log_dir / f"{name}.log").open("ab")  # a resumed run adds to it
            self.log_offsets[name] = output.tell()
        process = subprocess.Popen(
            command, env=self.env, stdin=subprocess.DEVNULL, stdout=output,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        if not pipe:
            output.close()  # the child holds its own copy
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        """What process ``name`` has written to its log so far."""
        with (self.log_dir / f"{name}.log").open("rb") as log:
            log.seek(self.log_offsets[name])
            return log.read().decode(errors="replace")

    def check(self, *names: str) -> None:
        """Raise DeploymentFailed if one of the named processes has exited."""
        for name in names:
            code = self.started[name].poll()
            if code is not None:
                raise DeploymentFailed(
                    f"{name} exited with code {code}; see {self.log_dir / (name + '.log')}"
                )

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM to every process started and its descendants, SIGKILL after ``timeout``."""
        import psutil  # a dependency of peft and accelerate

        tree = []
        for process in self.started.values():
            try:
                root = psutil.Process(process.pid)
                tree += [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for process in self.started.values():
                # Its group: the process and any child that stayed in it. Only while the
                # process is not reaped, so that its id cannot name another group yet.
                if process.poll() is None:
                    try:
                        os.killpg(process.pid, sig)
                    except (ProcessLookupError, PermissionError):
                        pass
            for process in tree:  # psutil checks the pid still names the same process
                try:
                    process.send_signal(sig)
                except psutil.Error:
                    pass
            deadline = time.monotonic() + timeout
            while (tree := _running(tree)) and time.monotonic() < deadline:
                for process in self.started.values():
                    process.poll()  # reap our children as they exit
                time.sleep(0.1)
            if not tree:
                break
        for process in self.started.values():
            try:
                process.wait(timeout=1.0)  # reap our children: no zombies left behind
            except subprocess.TimeoutExpired:
                pass  # not even SIGKILL ended it (a process stuck in the kernel)


def _running(processes: list) -> list:
    """The psutil processes that still run. A zombie does not: it is dead, and a
    container's init may never reap the helpers whose parent exited."""
    import psutil

    running = []
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
        except psutil.NoSuchProcess:
            pass
    return running


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports that are free on 127.0.0.1 right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def flower_env(home: Path) -> dict[str, str]:
    """The environment of the Flower processes: their own FLWR_HOME, this Python's tools."""
    tools = str(Path(sys.executable).parent)  # flower-superexec is started by name
    return {
        **os.environ,
        "PATH": tools + os.pathsep + os.environ.get("PATH", ""),
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # use this environment
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",  # the run's log reaches the terminal as it is written
    }


def flower_tool(name: str) -> str:
    """The path of a Flower command, next to this Python or on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise FedLoraError(f"'{name}' was not found next to {sys.executable} or on PATH; "
                           "install flwr in this environment")
    return found


def wait_until(ready, what: str, processes: Processes, watched: list[str],
               timeout: float = START_TIMEOUT) -> float:
    """Wait until ``ready()`` while the watched processes live; return the seconds waited."""
    start = time.perf_counter()
    while not ready():
        processes.check(*watched)
        if time.perf_counter() - start > timeout:
            raise DeploymentFailed(f"{what} within {timeout:.0f}s; see the logs in "
                                   f"{processes.log_dir}")
        time.sleep(0.2)
    return time.perf_counter() - start


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
        return True
    except OSError:
        return False
