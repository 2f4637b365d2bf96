"""Studies: runs over seeds and a grid, chosen on validation, summarised over seeds, resumed."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from fedlora.config import RunConfig
from fedlora.data import load_task, server_data
from fedlora.errors import FedLoraError
from conftest import parse_configs
from fedlora.cli import build_parser, study_from_args
from fedlora.comparison import Summary, choose
from fedlora.study import to_do
from server.outputs import check_unused

T_975 = {1: 12.7062, 2: 4.3027}  # Student's t, 97.5 % quantiles by degrees of freedom (tables)


def study(*flags: str):
    return study_from_args(vars(build_parser().parse_args(list(flags))))


def test_seeds_and_grids_give_one_run_per_strategy_value_and_seed(tmp_path):
    runs = study("--strategy", "fedavg,fedsb", "--seeds", "0,1", "--lr-grid", "1e-3,1e-2",
                 "--val-size", "20", "--name", "s")
    assert [(r.strategy, r.value, r.seed, r.config.lr, r.config.name) for r in runs[:4]] == [
        ("fedavg", "lr0.001", 0, 1e-3, "s/fedavg/lr0.001/seed0"),
        ("fedavg", "lr0.001", 1, 1e-3, "s/fedavg/lr0.001/seed1"),
        ("fedavg", "lr0.01", 0, 1e-2, "s/fedavg/lr0.01/seed0"),
        ("fedavg", "lr0.01", 1, 1e-2, "s/fedavg/lr0.01/seed1"),
    ]
    assert len(runs) == 8 and {r.folder for r in runs} == {"s"}
    # A grid in a strategy's table applies to that strategy; a flag's single value wins.
    file = tmp_path / "grid.toml"
    file.write_text('strategy = "fedavg,fedsb"\nval-size = 20\nseeds = [3]\n'
                    '[fedsb]\nlr-grid = [0.01, 0.03]\nrank-grid = [16, 32]\n')
    runs = study("--config", str(file), "--name", "g")
    assert [(r.strategy, r.value, r.config.seed) for r in runs] == [
        ("fedavg", "", 3), ("fedsb", "lr0.01-rank16", 3), ("fedsb", "lr0.01-rank32", 3),
        ("fedsb", "lr0.03-rank16", 3), ("fedsb", "lr0.03-rank32", 3)]
    assert runs[0].config.name == "g/fedavg/seed3" and runs[4].config.rank == 32
    # Ranks are compared (a row each), learning rates tuned (one chosen per row).
    assert [(r.label, r.tuned) for r in runs[1:3]] == [("fedsb rank16", "lr0.01"),
                                                      ("fedsb rank32", "lr0.01")]
    assert [(r.label, r.tuned) for r in study("--seeds", "1")] == [("fedavg", "")]
    small = study("--lr-grid", "1e-5,3e-4", "--rank-grid", "16", "--val-size", "9", "--name", "x")
    assert [(r.config.name, r.label, r.tuned) for r in small] == [  # "1e-05" has a dash
        ("x/fedavg/lr1e-05-rank16", "fedavg rank16", "lr1e-05"),
        ("x/fedavg/lr0.0003-rank16", "fedavg rank16", "lr0.0003")]
    assert [r.config.lr for r in study("--config", str(file), "--lr", "0.002")] == [0.002] * 3
    # Without a study key, one run keeps its folder.
    [single] = study("--name", "plain")
    assert (single.config.name, single.value, single.seed) == ("plain", "", 0)


@pytest.mark.parametrize("flags, message", [
    (["--lr-grid", "1e-3,3e-3"], "--strategy fedavg: a learning rate of --lr-grid's 2 is "
                                 "chosen on a validation split; give --val-size N"),
    (["--lr", "0.1", "--lr-grid", "1e-3"], "--lr and --lr-grid both given; keep one"),
    (["--seeds", "0,x"], "--seeds must list ints, got '0,x'"),
    (["--seeds", "1,1"], "--seeds names a value twice: '1,1'"),
    (["--rank-grid", "4,8", "--val-size", "9", "--strategy", "flora", "--ranks", "8,4"],
     "--rank-grid gives every client one rank, --ranks 8,4 gives each its own: keep one"),
    (["--val-size", "5", "--client-data", "a.jsonl"], "--val-size 5: the server holds no data"),
])
def test_bad_study_settings_are_one_line_errors(flags, message):
    with pytest.raises(FedLoraError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        study(*flags)


def test_summary_matches_an_independent_computation():
    values = [0.71, 0.74, 0.80]
    figure = Summary(values)
    mean = sum(values) / 3
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    assert figure.mean == pytest.approx(mean, abs=1e-12)
    assert figure.std == pytest.approx(std, abs=1e-12)
    assert figure.half_width == pytest.approx(T_975[2] * std / math.sqrt(3), rel=1e-4)
    assert math.isnan(Summary([0.5]).std) and math.isnan(Summary([0.5]).half_width)
    # Near a bound the interval is cut to the figure's range, and only there.
    high = Summary([0.95, 1.0, 1.0])
    assert high.interval(0.0, 1.0) == (pytest.approx(high.mean - high.half_width), 1.0)
    assert high.mean + high.half_width > 1.0
    assert figure.interval(0.0, 1.0) == pytest.approx((mean - figure.half_width, mean + figure.half_width))


def test_a_grid_value_is_chosen_on_validation_not_on_the_reported_evaluation():
    def rows(val, test):
        return [{"round": 0, "val_accuracy": 0.5, "eval_accuracy": 0.5},
                {"round": 1, "val_accuracy": val, "eval_accuracy": test}]

    groups = {"lr0.001": [rows(0.70, 0.90), rows(0.72, 0.88)],  # best on evaluation
              "lr0.01": [rows(0.80, 0.60), rows(0.78, 0.62)]}  # best on validation
    assert choose(groups) == ("lr0.01", "val_accuracy")
    tie = {"a": [rows(0.7, 0.1)], "b": [rows(0.7, 0.9)]}
    assert choose(tie) == ("a", "val_accuracy")  # the first in grid order
    loss = {"a": [[{"round": 1, "val_loss": 2.0}]], "b": [[{"round": 1, "val_loss": 1.0}]]}
    assert choose(loss) == ("b", "val_loss")  # lower is better


def test_validation_is_disjoint_from_evaluation_and_training(tmp_path):
    config = RunConfig.from_dict({"eval-size": 50, "val-size": 30})
    task = load_task(config)
    without = load_task(RunConfig.from_dict({"eval-size": 50}))
    assert task.eval == without.eval  # the reported split does not move
    assert len(task.validation) == 30
    prompts = [set(e.prompt for e in part) for part in (task.train, task.eval, task.validation)]
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])
    assert len(task.train) == len(without.train) - 30
    # From the server's own file: disjoint parts whose union is the file.
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps({"text": f"review {i}", "label": i % 2}) + "\n"
                            for i in range(40)))
    examples, validation, words = server_data(RunConfig.from_dict(
        {"eval-dataset": str(path), "val-size": 10, "label-names": "0=bad,1=good"}))
    assert len(examples) == 30 and len(validation) == 10 and words == ["bad", "good"]
    assert {e.prompt for e in examples} | {e.prompt for e in validation} == {
        e.prompt for e in examples + validation} and len({e.prompt for e in examples + validation}) == 40
    with pytest.raises(FedLoraError, match="--val-size 40 leaves no evaluation data"):
        server_data(RunConfig.from_dict({"eval-dataset": str(path), "val-size": 40}))


def test_the_summary_names_the_runs_that_lost_clients(tmp_path):
    from fedlora.comparison import write_comparison

    folders = []
    for seed, dropped in ((0, 0), (1, 1)):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        rows = [{"round": 0, "eval_accuracy": 0.5, "eval_loss": 1.0, "cumulative_bytes_up": 0,
                 "cumulative_bytes_down": 0, "seconds": 1.0},
                {"round": 1, "dropped": dropped, "eval_accuracy": 0.6 + seed / 10, "eval_loss": 0.9,
                 "cumulative_bytes_up": 10, "cumulative_bytes_down": 20, "seconds": 1.0}]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        folders.append(folder)
    table = write_comparison({"fedavg": {"": folders}}, tmp_path).splitlines()
    assert table[2].startswith("| fedavg | 2 | 1 | 0.650 ± 0.071 |")
    assert table[-1] == ("Some rounds of these had fewer clients than they sampled (a reply "
                         "missing, failed or refused; the 'dropped' of metrics.jsonl): fedavg (2 seeds).")


def test_summarise_writes_the_comparison_of_the_finished_runs_and_runs_nothing(tmp_path, capsys):
    from fedlora import deploy
    from fedlora.simulate import main

    flags = ["--model", "tiny-llama", "--seeds", "0,1,2", "--output", str(tmp_path), "--name", "s"]
    assert main([*flags, "--summarise"]) == 2
    assert "--summarise: none of the 3 runs of this command has finished" in capsys.readouterr().err
    for seed, accuracy in ((0, 0.6), (2, 0.8)):  # seed 1 has not finished
        folder = tmp_path / "s" / "fedavg" / f"seed{seed}"
        folder.mkdir(parents=True)
        rows = [{"round": r, "eval_accuracy": a, "eval_loss": 1.0, "seconds": 1.0,
                 "cumulative_bytes_up": 10 * r, "cumulative_bytes_down": 20 * r}
                for r, a in ((0, 0.5), (1, accuracy))]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "summary.json").write_text("{}")
    assert main([*flags, "--summarise"]) == 0
    assert "2 of 3 runs are finished" in capsys.readouterr().out
    table = (tmp_path / "s" / "comparison.md").read_text().splitlines()
    assert table[2].startswith("| fedavg | 2 | 1 | 0.700 ± 0.141 |")
    assert not (tmp_path / "s" / "fedavg" / "seed1").exists()  # nothing ran
    assert deploy.main([*flags, "--summarise"]) == 2
    assert "python -m fedlora.simulate --summarise" in capsys.readouterr().err


def test_a_finished_run_is_skipped_and_a_changed_one_refused(tmp_path):
    runs = study("--seeds", "0,1", "--output", str(tmp_path), "--name", "s")
    done, cut = (tmp_path / r.config.name for r in runs)
    for folder in (done, cut):
        folder.mkdir(parents=True)
        (folder / "config.toml").write_text(
            __import__("tomli_w").dumps({**runs[0].config.to_dict(), "seed": 0 if folder == done else 1}))
        (folder / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1}\n')
        (folder / "checkpoint.pt").write_bytes(b"")
    (done / "summary.json").write_text("{}")
    [pending] = to_do(runs)  # the finished one is skipped, the other resumes
    assert pending.resume == str(cut) and pending.seed == 1
    saved = (cut / "config.toml").read_text()  # a run saved before --val-size existed
    (cut / "config.toml").write_text("\n".join(line for line in saved.splitlines()
                                               if not line.startswith("val-size")))
    assert to_do(runs) == [pending]
    # Another method's setting cannot change a FedAvg run (a default that moved, say).
    (cut / "config.toml").write_text(saved.replace('fedsb-init-codec = ""', 'fedsb-init-codec = "bf16"'))
    assert 'fedsb-init-codec = "bf16"' in (cut / "config.toml").read_text()
    assert to_do(runs) == [pending]
    changed = study("--seeds", "0,1", "--output", str(tmp_path), "--name", "s", "--rounds", "5")
    with pytest.raises(FedLoraError, match=f"^{done} was run with rounds = 3, this command gives 5: "
                                           "choose another --name$"):
        to_do(changed)


STUDY = """
model = "tiny-llama"
strategy = "sparse,fedavg"
num-clients = 2
min-clients = 2
rounds = 2
local-steps = 2
eval-size = 16
val-size = 16
max-length = 40
dp-clip = 1.0
dp-noise-seed = 5
seeds = [0, 1]
lr-grid = [0.03, 0.001]
name = "st"

[sparse]  # a resume must restore the server Adam's moments, the noise generator, the accountant
server-optimizer = "adam"
server-lr = 0.01
upload-density = 0.5
dp = "user"
dp-noise = 0.3

[fedsb]  # not run: a table may wait for its strategy

[fedavg]  # DP-SGD: each client's accountant composes across the restart, under new node ids
lr-grid = [0.03]  # one value: the broken run and its seed 0
dp = "sample"
dp-noise = 0.7
local-steps = 6
batch-size = 16
target-modules = "q_proj,v_proj,o_proj,down_proj"
"""
# The second run of each strategy fails in round 2 (its client 1 raises: one usable reply
# of the two --min-clients needs); each has an uninterrupted twin, whose name is as long
# (the plan carries the name, and the bytes must match).
BROKEN = {s: f"st/{s}/lr0.03/seed1" for s in ("sparse", "fedavg")}
TWIN = {s: f"tw/{s}/lr0.03/seed1" for s in ("sparse", "fedavg")}
VALUES, SEEDS = ("lr0.03", "lr0.001"), (0, 1)


def test_a_study_is_summarised_over_seeds_and_resumes_where_it_stopped(tmp_path, capsys):
    (tmp_path / "study.toml").write_text(STUDY)
    command = ["--config", str(tmp_path / "study.toml"), "--output", str(tmp_path)]
    script = "\n".join([  # one simulation serves the study and the twins
        "import dataclasses, sys",
        "from fedlora.errors import FedLoraError",
        "from fedlora.cli import build_parser, study_from_args",
        "from fedlora.simulate import simulate",
        f"configs = [r.config for r in study_from_args(vars(build_parser().parse_args({command!r})))]",
        f"twins = [dataclasses.replace(c, name=c.name.replace('st/', 'tw/')) for c in configs "
        f"if c.name in {list(BROKEN.values())!r}]",
        "try:",
        "    simulate([*configs, *twins])",
        "except FedLoraError as err:",  # as the CLI reports it
        "    sys.exit(print(f'error: {err}', file=sys.stderr) or 2)",
    ])
    faults = ",".join(f"raise:1@2@{name}" for name in BROKEN.values())
    first = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           timeout=600, env={**os.environ, "FEDLORA_INJECT_FAULTS": faults})
    assert first.returncode == 2, first.stderr[-3000:]
    for name in BROKEN.values():  # the rest went on
        assert f"error: {name}: round 2 failed: 1 of 2 clients" in first.stderr
    assert first.stderr.strip().splitlines()[-1].startswith(
        "error: round 2 failed: 1 of 2 clients gave a usable reply, --min-clients is 2; "
        "outputs so far are in ")
    assert "epsilon    delta" in first.stdout  # the table names delta beside epsilon
    folders = {(s, v, k): tmp_path / "st" / s / v / f"seed{k}"
               for s in BROKEN for v in (VALUES if s == "sparse" else VALUES[:1]) for k in SEEDS}
    rows = {key: rows_of(folder) for key, folder in folders.items()}
    for (strategy, value, seed), got in rows.items():
        broken = (value, seed) == ("lr0.03", 1)
        assert [r["round"] for r in got] == ([0, 1] if broken else [0, 1, 2])
    with pytest.raises(FedLoraError, match="already holds a run; choose another --name or continue"):
        check_unused(folders["sparse", "lr0.03", 1])

    second = subprocess.run([sys.executable, "-m", "fedlora.simulate", *command],
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]  # the same command picks up
    assert "4 of 6 runs are finished; running 2" in second.stdout
    timing = {"seconds", "eval_seconds", "client_train_seconds"}
    for strategy in BROKEN:
        resumed = rows_of(folders[strategy, "lr0.03", 1])
        assert resumed[:2] == rows[strategy, "lr0.03", 1] and resumed[2]["round"] == 2
        twin = rows_of(tmp_path / TWIN[strategy])
        assert ([{k: v for k, v in r.items() if k not in timing} for r in resumed]
                == [{k: v for k, v in r.items() if k not in timing} for r in twin])
        assert twin[2]["epsilon"] > twin[1]["epsilon"] and "epsilon" not in twin[0]
        rows[strategy, "lr0.03", 1] = resumed
    assert rows["sparse", "lr0.03", 0][-1]["eval_loss"] != rows["sparse", "lr0.03", 1][-1]["eval_loss"]

    # DP-SGD learns, and its epsilon is Opacus' analysis of each client's steps so far.
    from test_privacy import independent_epsilon

    from fedlora.data import client_examples, load_task
    from fedlora.privacy import default_delta

    dpsgd = rows["fedavg", "lr0.03", 1]
    assert dpsgd[2]["eval_loss"] < dpsgd[0]["eval_loss"] - 0.2
    [run] = [c for c in parse_configs(command) if c.name == BROKEN["fedavg"]]
    sizes = [len(client_examples(load_task(run), run, k, 2)) for k in (0, 1)]
    for row in dpsgd[1:]:
        expected = max(independent_epsilon(0.7, 16 / n, 6 * row["round"], default_delta(n)) for n in sizes)
        assert row["epsilon"] == pytest.approx(expected, rel=1e-6)
        assert row["delta"] == max(default_delta(n) for n in sizes)

    # The table: each value's seeds summarised, the value chosen on validation.
    def final(value, key, strategy="sparse"):
        return np.array([rows[strategy, value, s][-1][key] for s in SEEDS])

    means = {v: final(v, "val_accuracy").mean() for v in VALUES}
    best = "lr0.03" if means["lr0.03"] >= means["lr0.001"] else "lr0.001"
    table = (tmp_path / "st" / "comparison.md").read_text().splitlines()
    headings = [h.strip() for h in table[0].split("|")]
    cells = dict(zip(headings, (c.strip() for c in table[2].split("|"))))
    accuracy = final(best, "eval_accuracy")
    mean, std = accuracy.mean(), accuracy.std(ddof=1)
    assert cells["strategy"] == "sparse" and cells["value"] == best and cells["seeds"] == "2"
    assert cells["final eval_accuracy"] == (f"{mean:.3f}" if std == 0 else f"{mean:.3f} ± {std:.3f}")
    width = T_975[1] * std / math.sqrt(2)
    assert cells["95 % CI"] == f"[{mean - width:.3f}, {mean + width:.3f}]"
    loss = final(best, "eval_loss")
    assert cells["final eval_loss"] == f"{loss.mean():.4f} ± {loss.std(ddof=1):.4f}"
    upload = final(best, "cumulative_bytes_up")
    assert cells["upload bytes"] == f"{upload.mean():,.0f}"
    grid = [line for line in table[table.index("Every grid value (the final round, over seeds):"):]
            if line.startswith("| sparse | lr")]
    assert [line.endswith("| yes |") for line in grid] == [best == "lr0.03", best == "lr0.001"]
    assert (tmp_path / "st" / "comparison.png").read_bytes()[:4] == b"\x89PNG"

    from fedlora.simulate import main

    (tmp_path / "st" / "comparison.md").unlink()
    assert main(command) == 0  # nothing left to run: no engine
    assert "6 of 6 runs are finished; running 0" in capsys.readouterr().out
    assert (tmp_path / "st" / "comparison.md").read_text().splitlines() == table


def rows_of(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").open()]
