"""Config loading, validation and the one-line errors of the CLI."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from conftest import parse_configs
from server.preflight import preflight
from strategies import build_strategy, resolved


def test_defaults_are_valid_and_round_trip_through_a_flat_dict():
    config = RunConfig.from_dict({})
    again = RunConfig.from_dict(config.to_dict())
    assert again == config
    assert all(isinstance(v, (bool, int, float, str)) for v in config.to_dict().values())


def test_flags_override_the_config_file(tmp_path):
    file = tmp_path / "run.toml"
    file.write_text('rounds = 7\nrank = 4\nlr = 0.01\nstrategy = "fedavg"\n')
    [config] = parse_configs(["--config", str(file), "--rank", "16"])
    assert (config.rounds, config.rank, config.lr) == (7, 16, 0.01)


def test_fedsb_default_learning_rate_follows_its_initialisation():
    # Random B, A and R = 0 (what --dp needs) take 10x the step of LoRA-SB's gradient start
    # (simulations/tune-lr-fedsb-random.toml against tune-lr.toml).
    from strategies.fedsb import FedSB

    def lr(**values):
        return resolved(RunConfig.from_dict({"strategy": "fedsb", **values})).lr

    assert FedSB.default_lr_random_init != FedSB.default_lr
    assert lr() == FedSB.default_lr  # auto: the gradient initialisation
    assert lr(**{"fedsb-init": "random"}) == FedSB.default_lr_random_init
    assert lr(dp="sample") == FedSB.default_lr_random_init  # auto picks random under DP
    assert lr(dp="user", **{"fedsb-init": "random"}) == FedSB.default_lr_random_init
    assert lr(dp="sample", lr=0.002) == 0.002  # a given --lr always wins
    fedavg = resolved(RunConfig.from_dict({"strategy": "fedavg"})).lr
    assert resolved(RunConfig.from_dict({"strategy": "fedavg", "dp": "sample"})).lr == fedavg  # one lr


def test_fedsb_default_rank_is_capped_at_the_smallest_adapted_dimension():
    # 64 was chosen on validation reviews (docs/results.md); tiny-llama's k and v
    # projections are 32 wide, and LoRA-SB refuses a rank above any adapted dimension.
    from strategies.fedsb import FedSB

    def rank(model, **values):
        return resolved(RunConfig.from_dict({"strategy": "fedsb", "model": model, **values})).rank

    llama_3b = str(Path(__file__).parent.parent / "benchmarks/models/llama-3.2-3b/config.json")
    assert FedSB.default_rank == 64 and rank(llama_3b) == 64
    assert rank("tiny-llama") == 32  # all-linear: k_proj and v_proj are 64 x 32
    assert rank("tiny-llama", **{"target-modules": "q_proj,o_proj"}) == 64  # 64 x 64 only
    assert rank("tiny-llama", rank=48) == 48  # a given rank is kept (and refused by adapt)


def test_a_comparison_gives_one_config_per_strategy_with_its_table(tmp_path):
    file = tmp_path / "compare.toml"
    file.write_text('strategy = "fedavg,flora,fedsb"\nrank = 8\nname = "cmp"\n'
                    '[flora]\nranks = "16,8,4"\n[fedsb]\nrank = 32\n')
    configs = parse_configs(["--config", str(file), "--rounds", "2"])
    assert [(c.strategy, c.rank, c.ranks, c.rounds, c.name) for c in configs] == [
        ("fedavg", 8, "", 2, "cmp/fedavg"),
        ("flora", 8, "16,8,4", 2, "cmp/flora"),
        ("fedsb", 32, "", 2, "cmp/fedsb"),
    ]
    [only] = parse_configs(["--config", str(file), "--strategy", "fedsb"])  # [flora] waits
    assert (only.strategy, only.rank, only.ranks) == ("fedsb", 32, "")
    stray = tmp_path / "stray.toml"
    stray.write_text('strategy = "fedavg"\n[fedbs]\nrank = 32\n')
    with pytest.raises(FedLoraError, match=r"config table \[fedbs\] names no strategy; valid tables: "
                                           r"fedavg, ffa, flora, fedsb, sparse"):
        parse_configs(["--config", str(stray)])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rank": -1}, "--rank must be in [1, 4096], got -1"),
        ({"num-clients": 0}, "--num-clients must be in [1, 10000], got 0"),
        ({"rounds": -1}, "--rounds must be in [1, 100000], got -1"),
        ({"lr": -0.1}, "--lr must be in (0, 1], got -0.1"),
        ({"client-data": "a.jsonl", "eval-size": 50},
         "--eval-size 50 sets how many examples of --dataset the server holds out; with "
         "--client-data it holds none: drop --eval-size"),
        ({"lr": 5}, "--lr must be in (0, 1], got 5"),
        ({"target-modules": "all-linear,q_proj"}, "--target-modules all-linear,q_proj: all-linear "
         "already names every linear layer; give it alone or list names"),
        ({"lr": "fast"}, "--lr must be a float, got 'fast'"),
        ({"rank": "2.5"}, "--rank must be a int, got '2.5'"),
        ({"fraction-train": 0}, "--fraction-train must be in (0, 1], got 0"),
        ({"partitioning": "random"}, "unknown partitioning 'random'; valid choices: iid, dirichlet"),
        ({"min-clients": 5, "num-clients": 4}, "--min-clients 5 exceeds --num-clients 4"),
        ({"model": "gpt-17"}, "unknown model 'gpt-17'; valid choices: smollm2-135m, tiny-llama"),
        ({"model": "/nowhere/model.gguf"}, "model not found: /nowhere/model.gguf"),
        ({"dataset": "squad"}, "--dataset: unknown dataset 'squad'; valid choices: rotten-tomatoes, imdb"),
        ({"dataset": "/nowhere/data.csv"}, "--dataset: data file not found: /nowhere/data.csv"),
        ({"eval-dataset": "/nowhere/e.parquet"}, "--eval-dataset: data file not found: /nowhere/e.parquet"),
        ({"eval-dataset": "e.xlsx"}, "--eval-dataset e.xlsx: not a .jsonl, .csv or .parquet file"),
        ({"client-data": "a.csv,b.csv", "num-clients": 3}, "--client-data names 2 files but --num-clients is 3"),
        ({"client-data": "a.csv", "evaluation": "both"}, "--evaluation both evaluates at the server, which holds no data"),
        ({"client-data": "a.csv", "partitioning": "dirichlet"}, "--partitioning dirichlet splits --dataset over the clients; with --client-data"),
        ({"evaluation": "local"}, "unknown evaluation 'local'; valid choices: auto, central, federated, both"),
        ({"dtype": "float16"}, "unknown dtype 'float16'; valid choices: auto, float32, bfloat16"),
        ({"label-names": "0=negative,1"}, "--label-names: '1' is not RAW=WORD (e.g. 0=negative)"),
        ({"labels": "spam,spam"}, "the label set needs at least 2 labels, got ['spam', 'spam']"),
        ({"client-eval-fraction": 0.95}, "--client-eval-fraction must be in (0, 0.9], got 0.95"),
        ({"colour": "red"}, "unknown config key 'colour'; valid keys: strategy, model"),
        ({"upload-codec": "gzip"}, "unknown codec 'gzip'; valid choices: fp32, fp16, bf16, int8, topk"),
        ({"download-codec": "topk:2"}, "top-k density must be in (0, 1], got '2'"),
    ],
)
def test_bad_values_name_the_value_and_the_choices(values, message):
    with pytest.raises(FedLoraError) as err:  # as a command checks a run before it starts
        preflight(RunConfig.from_dict(values))
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("values", [
    {"model": "gpt-17"}, {"dataset": "/nowhere/data.csv"}, {"eval-dataset": "/nowhere/e.parquet"},
    {"labels": "spam,spam"}, {"strategy": "fedsgd"},
])
def test_a_config_is_plain_data_checked_by_its_values_alone(values):
    # Files, models, label sets and strategies are the preflight's: a client that builds the
    # server's config from its plan never looks for the server's files.
    config = RunConfig.from_dict(values)
    assert config.to_dict() == {**RunConfig().to_dict(), **values}
    with pytest.raises(FedLoraError):
        preflight(config)


def test_unknown_strategy_lists_the_registered_ones():
    with pytest.raises(FedLoraError, match="unknown strategy 'fedsgd'; valid choices: fedavg, ffa, flora, fedsb, sparse"):
        build_strategy(RunConfig.from_dict({"strategy": "fedsgd"}))


def test_missing_config_file_and_bad_toml(tmp_path):
    with pytest.raises(FedLoraError, match="config file not found"):
        parse_configs(["--config", str(tmp_path / "none.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = = 3")
    with pytest.raises(FedLoraError, match="is not valid TOML"):
        parse_configs(["--config", str(bad)])


@pytest.mark.parametrize(
    "flags, expected",
    [  # a whole interpreter: nothing else reaches the terminal (imports, warnings)
        (["--strategy", "nope"], "error: unknown strategy 'nope'; valid choices: fedavg, ffa, flora, fedsb, sparse, hetlora, flexlora, fedex, fedsa, fedsvd, rolora"),
        (["--no-such-flag", "1"], "error: unrecognized arguments: --no-such-flag 1"),
    ],
)
def test_cli_prints_one_line_and_exits_2(flags, expected):
    result = subprocess.run(
        [sys.executable, "-m", "fedlora.simulate", *flags],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].endswith(expected), result.stderr
    assert "Traceback" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    "flags, expected",
    [  # the same path in this process (an interpreter start costs seconds each)
        (["--rank", "5000"], "error: --rank must be in [1, 4096], got 5000"),
        (["--dataset", "missing.jsonl"], "error: --dataset: data file not found: missing.jsonl"),
        (["--client-cpus", "1024", "--model", "tiny-llama", "--name", "never"],
         f"error: --client-cpus 1024 exceeds this machine's {os.cpu_count()} cores: no client "
         "could be scheduled"),
    ],
)
def test_cli_mistakes_in_values_are_one_line_and_exit_2(flags, expected, capsys):
    from fedlora.simulate import main

    assert main(flags) == 2
    captured = capsys.readouterr()
    assert captured.err == expected + "\n" and captured.out == ""
