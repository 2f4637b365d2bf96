"""Faults in a simulation: clients that raise, hang or die; too few replies; resuming."""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import make_reply
from flwr.app import RecordDict

from fedlora.errors import FedLoraError
from fedlora.simulate import main
from server.run import check_unused, exchange

COMMON = [
    "--model", "tiny-llama", "--local-steps", "5", "--lr", "0.01", "--eval-size", "32",
    "--max-length", "48", "--target-modules", "q_proj,v_proj,o_proj,down_proj",
]


def simulate(*flags, faults="", timeout=600):
    env = {**os.environ, "FEDLORA_INJECT_FAULTS": faults, "FEDLORA_HANG_SECONDS": "80"}
    return subprocess.run([sys.executable, "-m", "fedlora.simulate", *COMMON, *flags],
                          capture_output=True, text=True, timeout=timeout, env=env)


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]


def test_clients_that_raise_or_die_do_not_kill_the_round(tmp_path):
    result = simulate("--num-clients", "3", "--min-clients", "1", "--rounds", "2",
                      "--output", str(tmp_path), "--name", "faults", faults="raise:0@1,exit:2@2")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(tmp_path / "faults")
    # Round 1: partition 0 raised; its error reply was dropped with the reason. Round 2:
    # partition 2's process died: the other two carried the round.
    assert [r["clients"] for r in rows[1:]] == [2, 2]
    assert "the client failed: " in result.stderr and "partition 0 raises in round 1" in result.stderr
    assert rows[-1]["round"] == 2 and (tmp_path / "faults" / "adapter").is_dir()


class SilentGrid:
    """A Grid whose third node never answers."""

    def push_messages(self, messages):
        return [f"msg-{node}" for node in (1, 2, 3)]

    answered = False

    def pull_messages(self, message_ids):
        replies = [] if self.answered else [make_reply(1, RecordDict()), make_reply(2, RecordDict())]
        self.answered = True
        return replies


def test_a_client_that_hangs_is_passed_by_at_the_round_timeout(caplog):
    start = time.monotonic()
    replies = exchange(SilentGrid(), [object()] * 3, timeout=1.5, label="round 4")
    assert 1.5 <= time.monotonic() - start < 3.0
    assert sorted(r.metadata.src_node_id for r in replies) == [1, 2]
    assert "round 4: 1 of 3 clients did not reply within 1.5s" in caplog.text


def test_a_run_that_fails_for_too_few_replies_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    # The state a resume must restore: the server Adam's moments, the DP noise generator
    # and accountant, the metrics so far.
    flags = ["--strategy", "sparse", "--server-optimizer", "adam", "--server-lr", "0.01",
             "--upload-density", "0.5", "--dp", "user", "--dp-noise", "0.3", "--dp-clip", "1.0",
             "--dp-noise-seed", "5", "--num-clients", "2", "--min-clients", "2",
             "--output", str(tmp_path)]
    # One simulation serves the uninterrupted run "full" and then "part", whose client 1
    # raises in round 2: one usable reply of the two --min-clients needs. (The names are
    # as long as each other: the plan carries them, and the bytes must match.)
    both = "\n".join([
        "import sys",
        "from fedlora.errors import FedLoraError",
        "from fedlora.simulate import parse_configs, simulate",
        f"runs = [*parse_configs({[*COMMON, *flags, '--rounds', '2', '--name', 'full']!r}),",
        f"        *parse_configs({[*COMMON, *flags, '--rounds', '2', '--name', 'part']!r})]",
        "try:",
        "    simulate(runs)",
        "except FedLoraError as err:",  # as the CLI reports it
        "    sys.exit(print(f'error: {err}', file=sys.stderr) or 2)",
    ])
    env = {**os.environ, "FEDLORA_INJECT_FAULTS": "raise:1@2@part"}
    short = subprocess.run([sys.executable, "-c", both], capture_output=True, text=True,
                           timeout=600, env=env)
    assert short.returncode == 2, short.stderr[-3000:]
    assert [r["round"] for r in rows_of(tmp_path / "full")] == [0, 1, 2]
    last = short.stderr.strip().splitlines()[-1]
    assert last.startswith("error: round 2 failed: 1 of 2 clients gave a usable reply, "
                           "--min-clients is 2; outputs so far are in ")
    assert [r["round"] for r in rows_of(tmp_path / "part")] == [0, 1]
    with pytest.raises(FedLoraError, match="already holds a run; choose another --name or continue"):
        check_unused(tmp_path / "part")
    resumed = subprocess.run(  # without the fault, from the checkpoint of round 1
        [sys.executable, "-m", "fedlora.simulate", "--resume", str(tmp_path / "part")],
        capture_output=True, text=True, timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    timing = {"seconds", "eval_seconds", "client_train_seconds"}
    expected = [{k: v for k, v in r.items() if k not in timing} for r in rows_of(tmp_path / "full")]
    got = [{k: v for k, v in r.items() if k not in timing} for r in rows_of(tmp_path / "part")]
    assert got == expected
    assert expected[-1]["round"] == 2 and expected[-1]["epsilon"] > expected[1]["epsilon"]


@pytest.mark.parametrize("flags, message", [
    (["--resume", "nowhere"], "--resume nowhere: not a run folder (no config.toml there)"),
    (["--resume", "nowhere", "--config", "simulations/default.toml"],
     "--resume continues a run with its own saved config; drop --config"),
])
def test_bad_resume_is_a_one_line_error(flags, message, capsys):
    assert main(flags) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
