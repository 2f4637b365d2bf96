"""Faults in a simulation: clients that raise, hang or die; bad --resume folders. (A run
that fails for too few replies and resumes: tests/test_study.py.)"""

import json
import os
import subprocess
import sys
import time

import pytest
from conftest import make_reply
from flwr.app import RecordDict

from fedlora.simulate import main
from server.transport import exchange

COMMON = [
    "--model", "tiny-llama", "--local-steps", "5", "--lr", "0.01", "--eval-size", "32",
    "--max-length", "48", "--target-modules", "q_proj,v_proj,o_proj,down_proj",
]


def simulate(*flags, faults="", timeout=600):
    env = {**os.environ, "FEDLORA_INJECT_FAULTS": faults, "FEDLORA_HANG_SECONDS": "80"}
    return subprocess.run([sys.executable, "-m", "fedlora.simulate", *COMMON, *flags],
                          capture_output=True, text=True, timeout=timeout, env=env)


def simulate_runs(*command_lines, faults=""):
    """Several runs of one federation under one simulation engine (one start of Ray and
    the client actors), in a process of their own, as ``fedlora.simulate`` runs a study."""
    script = "\n".join([
        "from fedlora.cli import build_parser, study_from_args",
        "from fedlora.simulate import simulate",
        f"lines = {[[*COMMON, *line] for line in command_lines]!r}",
        "simulate([r.config for line in lines for r in study_from_args(vars(build_parser().parse_args(line)))])",
    ])
    env = {**os.environ, "FEDLORA_INJECT_FAULTS": faults}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=600, env=env)


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
    assert [r["dropped"] for r in rows[1:]] == [1, 1]
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


@pytest.mark.parametrize("flags, message", [
    (["--resume", "nowhere"], "--resume nowhere: not a run folder (no config.toml there)"),
    (["--resume", "nowhere", "--config", "simulations/default.toml"],
     "--resume continues a run with its own saved config; drop --config"),
])
def test_bad_resume_is_a_one_line_error(flags, message, capsys):
    assert main(flags) == 2
    assert capsys.readouterr().err == f"error: {message}\n"


def test_attack_drills_are_dropped_with_their_reason_and_the_run_goes_on(tmp_path):
    """The hostile kinds of FEDLORA_INJECT_FAULTS, each against the check that stops it:
    round 1 of a DP-SGD federation has a client lying in its header, one sending a NaN,
    one claiming 2^62 steps without noise, one scaling its update by 1,000 (bounded by
    --max-update-norm, not dropped); a FLoRA client announcing rank 4096."""
    drills = ["--num-clients", "4", "--rounds", "2", "--dp", "sample", "--max-update-norm", "1.0",
              "--output", str(tmp_path), "--name", "drills"]
    rank = ["--strategy", "flora", "--ranks", "4", "--num-clients", "4", "--rounds", "1",
            "--output", str(tmp_path), "--name", "rank"]
    result = simulate_runs(drills, rank, faults="header:0@1@drills,nan:1@1@drills,"
                                                "dp-lie:2@1@drills,scale:3@1@drills,rank:0@1@rank")
    assert result.returncode == 0, result.stderr[-3000:]
    rows = rows_of(tmp_path / "drills")
    assert [(r["clients"], r["dropped"]) for r in rows[1:]] == [(1, 3), (4, 0)]
    assert "'codec' 'fp16' differs from the plan's 'fp32'" in result.stderr
    assert "holds NaN or Inf" in result.stderr
    assert f"'dp-steps' {2**62} differs from the plan's 5 (--local-steps)" in result.stderr
    assert rows[-1]["epsilon"] < 100  # the liar's zero noise never reached the accountant

    assert [(r["clients"], r["dropped"]) for r in rows_of(tmp_path / "rank")[1:]] == [(3, 1)]
    assert "no valid 'rank' in [1, 4] (got 4096)" in result.stderr
