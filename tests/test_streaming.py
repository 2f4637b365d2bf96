"""Aggregation that streams: the server folds each reply into running sums as it arrives
and lets it go, for every method whose math is a function of weighted means; a method
that needs each client (FLoRA's stacks) still gets every state."""

import gc
import weakref

import pytest
import torch
from conftest import train_reply

from conftest import weighted_average
from fedlora.aggregate import delta_weights
from fedlora.config import RunConfig
from fedlora.models import load_model
from strategies import build_strategy
from server.dry_run import DryRunGrid

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run
EXAMPLES = [30, 50, 20, 100]
WEIGHTS = [n / sum(EXAMPLES) for n in EXAMPLES]


def fold_four_replies(tiny_model_dir, name):
    """Round 1 of ``name`` with four replies from a one-shot generator; returns the
    strategy, the clients' states, the new global state and, for each reply, how many
    earlier replies were still alive when it was handed over."""
    model = load_model(str(tiny_model_dir), torch.device("cpu"))[0]
    strategy = build_strategy(RunConfig(strategy=name, rank=4, ranks="4", check_exactness=True))
    arrays = strategy.initialize(model)
    strategy.configure_train(1, arrays, RunConfig().to_dict(), DryRunGrid([1, 2, 3, 4]))
    received = arrays.to_torch_state_dict()
    shapes = {f"base_model.model.{path}.lora_{x}.weight": shape
              for path, (m, n) in strategy.adapted_shapes(model).items()
              for x, shape in (("A", (4, n)), ("B", (m, 4)))}
    states = []
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        states.append({k: received.get(k, 0) + 0.1 * torch.randn(s, generator=g) for k, s in shapes.items()})
    alive, held = [], []

    def arriving():
        for node, (state, examples) in enumerate(zip(states, EXAMPLES), start=1):
            gc.collect()
            held.append(sum(ref() is not None for ref in alive))
            sent = {k: v - received[k] for k, v in state.items()} if strategy.upload == "delta" else state
            reply = train_reply(node, sent, examples, rank=4)
            alive.append(weakref.ref(reply))
            yield reply
            del reply  # the generator's own reference

    new, metrics = strategy.aggregate_train(1, arriving())
    assert not strategy.dropped
    return strategy, states, new.to_torch_state_dict(), metrics, held


@pytest.mark.parametrize("name", ["fedavg", "fedex", "flexlora"])
def test_a_streaming_method_lets_each_reply_go_before_the_next(tiny_model_dir, name):
    strategy, states, new, metrics, held = fold_four_replies(tiny_model_dir, name)
    assert strategy.streams and held == [0, 0, 0, 0]
    exact = {p: sum(w * delta_weights(s, strategy.scale)[p] for s, w in zip(states, WEIGHTS))
             for p in delta_weights(states[0])}
    got = delta_weights(new, strategy.scale)
    if name == "flexlora":  # rank 4 of four rank-4 clients: the best rank-4 approximation
        for path, delta in exact.items():
            U, S, Vh = torch.linalg.svd(delta)
            best = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
            torch.testing.assert_close(got[path], best, rtol=1e-4, atol=1e-5)
        return
    torch.testing.assert_close(new, weighted_average(states, WEIGHTS), rtol=1e-6, atol=1e-7)
    if name == "fedex":  # and the residual makes it exact
        assert metrics["aggregation-error"] < 1e-6
        for path, delta in exact.items():
            full = got[path] + strategy.kept.base_delta[path].double()
            torch.testing.assert_close(full, delta, rtol=1e-5, atol=1e-6)


def test_a_method_that_needs_every_client_still_gets_them(tiny_model_dir):
    strategy, _, new, metrics, _ = fold_four_replies(tiny_model_dir, "flora")
    assert not strategy.streams
    assert metrics["aggregation-error"] < 1e-6  # the stack of all four
    assert all(v.shape[0 if k.endswith("lora_A.weight") else 1] == 16 for k, v in new.items())
