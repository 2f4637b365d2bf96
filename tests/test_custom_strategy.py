"""Strategies written outside this package: ``--strategy module:Class``, entry points of the
group ``fedlora.strategies``, the refusals, and the worked example examples/trimmed_mean.py."""

import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from conftest import parse_configs
from fedlora.simulate import main
from strategies import STRATEGIES, build_strategy, resolved, strategy_class
from strategies.fedavg import FedAvgLoRA

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = "examples.trimmed_mean:TrimmedMean"
BUILT_IN_CHOICES = "valid choices: " + ", ".join(STRATEGIES)


@pytest.fixture
def TrimmedMean(example_strategy):
    return example_strategy


def write_module(folder: Path, name: str, source: str) -> None:
    (folder / f"{name}.py").write_text(textwrap.dedent(source))


# ---- the worked example's run folders -------------------------------------------------------


def test_the_examples_default_folder_has_no_colon(TrimmedMean):
    # The example runs end to end in tests/test_comparison.py; here, its folder name.
    (config,) = parse_configs(["--strategy", EXAMPLE, "--model", "tiny-llama"])
    assert config.name.startswith("examples.trimmed_mean-TrimmedMean-")  # no ':'


def test_several_strategies_get_valid_folder_names(TrimmedMean):
    configs = parse_configs(["--strategy", f"fedavg,{EXAMPLE}", "--model", "tiny-llama"])
    parent = configs[0].name.split("/")[0]
    assert parent.startswith("fedavg-examples.trimmed_mean-TrimmedMean-")
    assert [c.name for c in configs] == [
        f"{parent}/fedavg", f"{parent}/examples.trimmed_mean-TrimmedMean"
    ]
    assert configs[1].strategy == EXAMPLE  # the value the user gave, as metrics.jsonl records it


def test_a_strategys_own_settings_apply_where_they_are_not_given(tmp_path, monkeypatch):
    write_module(tmp_path, "eager", """
        from strategies.fedavg import FedAvgLoRA

        class Eager(FedAvgLoRA):
            default_lr = 0.02
            default_rank = 24
            default_target_modules = "q_proj,k_proj"
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    eager, plain = parse_configs(["--strategy", "eager:Eager,fedavg", "--name", "lr"])
    assert (eager.lr, eager.rank, eager.target_modules) == (0.02, 24, "q_proj,k_proj")
    assert (plain.lr, plain.rank, plain.target_modules) == (3e-3, 8, "q_proj,v_proj")
    flags = ["--strategy", "eager:Eager,fedavg", "--lr", "0.001", "--rank", "4", "--target-modules", "o_proj"]
    assert {(c.lr, c.rank, c.target_modules) for c in parse_configs(flags)} == {(0.001, 4, "o_proj")}
    assert resolved(RunConfig.from_dict({"strategy": "eager:Eager", "lr": 0, "rank": 0})).lr == 0.02  # its own
    assert build_strategy(eager).rank == 24
    # What the clients are sent, and what the run saves, is the learning rate used.
    from fedlora.wire import run_record

    assert run_record(eager, None)["lr"] == 0.02 and eager.to_dict()["lr"] == 0.02


def test_another_methods_settings_are_named_as_ignored(tmp_path, monkeypatch):
    from strategies import ignored_settings

    write_module(tmp_path, "mine", """
        from strategies.sparse import SparseLoRA

        class Sparser(SparseLoRA):
            pass
    """)
    monkeypatch.syspath_prepend(str(tmp_path))
    flags = {"upload-density": 0.05, "error-feedback": True, "fedsb-init": "random"}
    assert ignored_settings(RunConfig.from_dict(flags)) == [
        "--fedsb-init random (fedsb's)", "--upload-density 0.05 (sparse's)",
        "--error-feedback True (sparse's)"]
    # A subclass reads what its method reads; defaults are never named.
    assert ignored_settings(RunConfig.from_dict({**flags, "strategy": "mine:Sparser"})) == [
        "--fedsb-init random (fedsb's)"]
    assert ignored_settings(RunConfig.from_dict({"strategy": "fedsb"})) == []


# ---- the trimmed mean's math --------------------------------------------------------------


def client_states(n: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"m.lora_A.weight": torch.randn(2, 6, generator=g),
             "m.lora_B.weight": torch.randn(5, 2, generator=g)} for _ in range(n)]


def test_trimmed_mean_cuts_an_outlier_client(TrimmedMean):
    honest = client_states(4)
    outlier = {k: torch.full_like(v, 1e4) for k, v in honest[0].items()}
    states = [honest[0], outlier, *honest[1:]]
    # 5 clients, trim 0.2: one value cut at each end of every coordinate. The outlier claims
    # nearly all the examples; the trimmed mean ignores the weights.
    weights = [0.01, 0.96, 0.01, 0.01, 0.01]
    result = TrimmedMean(trim=0.2).aggregate_states(states, weights, [{}] * 5)
    for key in honest[0]:
        clients = np.stack([s[key].numpy() for s in states]).astype(np.float64)
        expected = np.sort(clients, axis=0)[1:-1].mean(axis=0)  # independent of Flower's code
        np.testing.assert_allclose(result[key].numpy(), expected, rtol=1e-6, atol=1e-7)
        honest_values = np.stack([s[key].numpy() for s in honest])
        assert np.all(result[key].numpy() <= honest_values.max(axis=0) + 1e-6)
        assert np.all(result[key].numpy() >= honest_values.min(axis=0) - 1e-6)
        assert result[key].dtype == torch.float32 and result[key].shape == honest[0][key].shape


def test_trim_zero_is_the_plain_mean_and_a_bad_trim_is_refused(TrimmedMean):
    states = client_states(3, seed=1)
    result = TrimmedMean(trim=0.0).aggregate_states(states, [0.2, 0.3, 0.5], [{}] * 3)
    for key in states[0]:
        torch.testing.assert_close(result[key], torch.stack([s[key] for s in states]).mean(0))
    for trim in (-0.1, 0.5):
        with pytest.raises(FedLoraError, match="trim must be in"):
            TrimmedMean(trim=trim)


def test_the_example_is_built_from_a_config_like_the_built_ins(TrimmedMean):
    config = RunConfig.from_dict({"strategy": EXAMPLE, "model": "tiny-llama", "rank": 4})
    strategy = build_strategy(config)
    assert isinstance(strategy, TrimmedMean)
    assert (strategy.rank, strategy.trim, strategy.name) == (4, 0.25, "trimmed-mean")


# ---- entry points -------------------------------------------------------------------------


def test_an_installed_package_registers_a_strategy_by_entry_point(tmp_path, monkeypatch):
    """A fake installed distribution: a ``*.dist-info`` folder and its module on sys.path."""
    write_module(tmp_path, "fake_plugin_median", """
        import torch

        from strategies.base import LoraStrategy


        class Median(LoraStrategy):
            name = "median"

            def aggregate_states(self, states, weights, metrics):
                return {k: torch.stack([s[k] for s in states]).median(0).values for k in states[0]}
    """)
    dist_info = tmp_path / "fake_fedlora_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: fake-fedlora-plugin\nVersion: 0.1\n"
    )
    (dist_info / "entry_points.txt").write_text(
        "[fedlora.strategies]\n"
        "median = fake_plugin_median:Median\n"
        "broken = fake_plugin_median:NoSuchClass\n"
        "fedavg = fake_plugin_median:Median\n"  # a built-in name is not shadowed
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    cls = strategy_class("median")
    assert (cls.__module__, cls.__name__) == ("fake_plugin_median", "Median")
    assert strategy_class("fedavg") is FedAvgLoRA
    config = RunConfig.from_dict({"strategy": "median", "model": "tiny-llama"})
    assert isinstance(build_strategy(config), cls)
    with pytest.raises(FedLoraError) as refused:
        strategy_class("broken")
    message = str(refused.value)
    assert "'broken' does not load" in message and "has no attribute 'NoSuchClass'" in message
    assert message.endswith(f"{BUILT_IN_CHOICES}, broken, median")  # and the entry points


# ---- refusals -----------------------------------------------------------------------------


@pytest.fixture
def user_modules(tmp_path, monkeypatch):
    """Modules a user might point ``--strategy`` at, on sys.path."""
    write_module(tmp_path, "user_strategies", """
        class NotAStrategy:
            def aggregate_states(self, states, weights, metrics):
                return states[0]
    """)
    write_module(tmp_path, "user_hookless", """
        from strategies.base import LoraStrategy


        class Hookless(LoraStrategy):
            name = "hookless"
    """)
    write_module(tmp_path, "user_syntax_error", "def broken(:\n")
    write_module(tmp_path, "user_missing_dependency", "import no_such_dependency_of_fedlora\n")
    monkeypatch.syspath_prepend(str(tmp_path))


@pytest.mark.parametrize("value, reason", [
    ("nosuch", "unknown strategy 'nosuch'"),
    ("no_such_module_of_fedlora:Strategy", "No module named 'no_such_module_of_fedlora'"),
    ("user_strategies:Missing", "module 'user_strategies' has no attribute 'Missing'"),
    ("user_strategies:NotAStrategy", "is not a subclass of strategies.base.LoraStrategy"),
    ("user_hookless:Hookless", "implements neither aggregate_states nor aggregate_means"),
    ("user_syntax_error:Strategy", "SyntaxError"),
    ("user_missing_dependency:Strategy", "No module named 'no_such_dependency_of_fedlora'"),
])
def test_a_bad_strategy_is_refused_in_one_line(user_modules, value, reason):
    # A class without the method's math fails where it is defined, a strategy built by
    # hand included (LoraStrategy.__init_subclass__); the registry reports that in one line.
    with pytest.raises(FedLoraError) as refused:
        strategy_class(value)
    message = str(refused.value)
    assert "\n" not in message
    assert f"'{value}'" in message and reason in message
    assert message.endswith(BUILT_IN_CHOICES)  # no entry points are installed here


def test_the_cli_refuses_a_bad_strategy_before_anything_runs(user_modules, capsys):
    assert main(["--strategy", "user_hookless:Hookless", "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: strategy 'user_hookless:Hookless'")


def test_a_strategy_without_the_methods_math_fails_where_it_is_defined():
    from strategies.base import LoraStrategy

    with pytest.raises(TypeError, match="Hookless implements neither aggregate_states nor aggregate_means"):
        class Hookless(LoraStrategy):  # built by hand: never passes through the registry
            name = "hookless"

    class Shared(LoraStrategy):  # steps for subclasses to share, no math of its own
        abstract = True

    with pytest.raises(TypeError, match="Child implements neither"):
        class Child(Shared):
            pass

    class Mean(Shared):
        def aggregate_means(self, means, metrics):
            return means

    assert Mean().aggregate_means({"x": 1}, []) == {"x": 1}
