"""HetLoRA and FlexLoRA: clients of ranks 4, 8 and 16 on one global LoRA of rank 16."""

import pytest
import torch
from conftest import train_reply

from fedlora.aggregate import delta_weights, pad_lora, svd_lora, truncate_lora
from fedlora.codec import decode_payload
from fedlora.config import RunConfig
from fedlora.models import load_model
from strategies.flexlora import FlexLoRA
from strategies.hetlora import HetLoRA
from server.dry_run import DryRunGrid

RANKS = (4, 8, 16)
EXAMPLES = [120, 300, 580]
TARGETS = ("q_proj", "v_proj")
WEIGHTS = [n / sum(EXAMPLES) for n in EXAMPLES]

pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), torch.device("cpu"))[0]


def trained_factors(strategy, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{path}.lora_{x}.weight": torch.randn(shape, generator=g)
            for path, (m, n) in strategy.module_shapes.items()
            for x, shape in (("A", (rank, n)), ("B", (m, rank)))}


def received(message):
    content = message.content
    return decode_payload({k: a.numpy() for k, a in content["arrays"].items()}, dict(content["codec"]))


def run_round(strategy, base_model):
    """Round 1 to nodes 1-3 (ranks 4, 8, 16), their replies aggregated; then round 2's
    messages. Returns (round-1 messages, trained, new arrays, metrics, round-2 messages)."""
    arrays = strategy.initialize(base_model)
    grid = DryRunGrid([1, 2, 3])
    first = list(strategy.configure_train(1, arrays, RunConfig().to_dict(), grid))
    trained = [trained_factors(strategy, r, i) for i, r in enumerate(RANKS)]
    replies = [train_reply(i + 1, t, n, rank=r)
               for i, (t, n, r) in enumerate(zip(trained, EXAMPLES, RANKS))]
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    second = list(strategy.configure_train(2, new_arrays, RunConfig().to_dict(), grid))
    second.sort(key=lambda m: m.metadata.dst_node_id)  # Flower samples nodes in random order
    return first, trained, new_arrays, metrics, second


def test_hetlora_pads_to_the_largest_rank_and_sends_each_client_its_own(base_model):
    strategy = HetLoRA(ranks=RANKS, alpha=32, target_modules=TARGETS, check_exactness=True)
    first, trained, arrays, metrics, second = run_round(strategy, base_model)
    assert strategy.rank == 16 and strategy.scale == 2.0  # one scale: alpha / R
    key_a = next(k for k in trained[0] if k.endswith("lora_A.weight"))
    key_b = key_a.replace("lora_A", "lora_B")
    # Round 1: every node gets the rank-16 factors (ranks are not known yet).
    assert [tuple(received(m)[key_a].shape)[0] for m in first] == [16, 16, 16]
    assert first[0].content["config"]["truncate-to-rank"] and first[0].content["config"]["lora-scale"] == 2.0
    state = arrays.to_torch_state_dict()
    assert state[key_a].shape[0] == 16 and state[key_b].shape[1] == 16
    padded = [pad_lora(t, 16) for t in trained]
    assert padded[0][key_a].shape == (16, trained[0][key_a].shape[1])
    assert torch.equal(padded[0][key_a][4:], torch.zeros_like(padded[0][key_a][4:]))
    expected = sum(w * p[key_a].double() for p, w in zip(padded, WEIGHTS)).float()
    assert torch.allclose(state[key_a], expected, atol=1e-6)
    # Components 8-15 come from the rank-16 client alone, scaled by its weight.
    assert torch.allclose(state[key_a][8:], WEIGHTS[2] * trained[2][key_a][8:], atol=1e-6)
    assert metrics["aggregation-error"] > 1e-3  # the product of averages, as FedAvg
    # Round 2: each node is sent its own rank's leading components.
    for message, rank in zip(second, RANKS):
        got = received(message)
        assert got[key_a].shape[0] == rank and got[key_b].shape[1] == rank
        assert torch.equal(got[key_a], truncate_lora(state, rank)[key_a])


def test_flexlora_factors_are_the_truncated_svd_of_the_weighted_sum(base_model):
    strategy = FlexLoRA(ranks=RANKS, alpha=32, target_modules=TARGETS, check_exactness=True)
    _, trained, arrays, metrics, second = run_round(strategy, base_model)
    scale = strategy.scale
    mean = {}
    for t, w in zip(trained, WEIGHTS):
        for path, delta in delta_weights(t, scale).items():
            mean[path] = mean.get(path, 0) + w * delta
    state = arrays.to_torch_state_dict()
    error = reference = 0.0
    for path, target in mean.items():
        A = state[f"base_model.model.{path}.lora_A.weight"].double()
        B = state[f"base_model.model.{path}.lora_B.weight"].double()
        singular = torch.linalg.svdvals(target)
        # The rank-r product of the first r components is the best rank-r approximation:
        # its error is the norm of the singular values beyond r (Eckart-Young).
        for r in RANKS:
            approx = scale * B[:, :r] @ A[:r]
            best = singular[r:].pow(2).sum().sqrt()
            assert float(torch.linalg.norm(target - approx)) == pytest.approx(float(best), rel=1e-4, abs=1e-5)
        # The singular values are split evenly between B and A.
        assert torch.allclose(B.norm(dim=0), A.norm(dim=1), rtol=1e-4)
        error += float(singular[16:].pow(2).sum())
        reference += float(singular.pow(2).sum())
    # --check-exactness reports exactly the part of the weighted sum beyond rank 16.
    assert metrics["aggregation-error"] == pytest.approx((error / reference) ** 0.5, rel=1e-3)
    assert [received(m)[next(iter(state))].shape for m in second] == [
        truncate_lora(state, r)[next(iter(state))].shape for r in RANKS]


def test_svd_factors_of_a_narrow_module_are_zero_padded():
    delta = torch.randn(6, 3, dtype=torch.float64)  # rank at most 3
    factors = svd_lora({"m": delta}, rank=5, scale=0.5)
    A, B = factors["base_model.model.m.lora_A.weight"], factors["base_model.model.m.lora_B.weight"]
    assert A.shape == (5, 3) and B.shape == (6, 5)
    assert torch.allclose(0.5 * B.double() @ A.double(), delta, atol=1e-5)


def test_a_reply_above_the_global_rank_is_dropped(base_model):
    strategy = HetLoRA(ranks=(4, 8), alpha=16, target_modules=TARGETS)
    arrays = strategy.initialize(base_model)
    list(strategy.configure_train(1, arrays, RunConfig().to_dict(), DryRunGrid([1, 2])))
    replies = [train_reply(1, trained_factors(strategy, 4, 0), 10, rank=4),
               train_reply(2, trained_factors(strategy, 16, 1), 10, rank=16)]
    new_arrays, _ = strategy.aggregate_train(1, replies)
    assert new_arrays is not None and [node for node, _ in strategy.dropped] == [2]
    assert "no valid 'rank' in [1, 8] (got 16)" in strategy.dropped[0][1]


def test_hetlora_components_no_client_held_keep_their_value_and_train_again(tiny_model_dir):
    """Round 1: only the rank-4 client of ranks (4, 16) replies. The zero-padded mean would
    zero components 4-15 of A and B for good (zero factors get zero gradients); they keep
    the global value instead, and in round 2 the rank-16 client's training moves them."""
    import client.app
    from conftest import client_plan, node_context
    from strategies import resolved

    config = resolved(RunConfig.from_dict({
        "strategy": "hetlora", "model": str(tiny_model_dir), "num-clients": 2, "ranks": "4,16",
        "alpha": 32.0, "local-steps": 3, "batch-size": 4, "max-length": 32, "lr": 0.05,
        "eval-size": 8}))
    strategy = HetLoRA.from_config(config)
    plan = client_plan(config)
    arrays = strategy.initialize(load_model(config.model, torch.device("cpu"))[0])
    before = arrays.to_torch_state_dict()
    contexts = {node: node_context(node, 2) for node in (1, 2)}
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, arrays, plan, DryRunGrid([1, 2]))}
    arrays, _ = strategy.aggregate_train(1, [client.app.train(messages[1], contexts[1])])  # node 2: silent
    after = arrays.to_torch_state_dict()
    for key, value in after.items():
        high = value[4:] if key.endswith("lora_A.weight") else value[:, 4:]
        kept = before[key][4:] if key.endswith("lora_A.weight") else before[key][:, 4:]
        assert torch.equal(high, kept), key  # A's fresh rows, B's zero columns
        assert key.endswith("lora_B.weight") or high.abs().sum() > 0
    message = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        2, arrays, plan, DryRunGrid([1, 2]))}[2]
    reply = client.app.train(message, contexts[2])
    trained = decode_payload({k: a.numpy() for k, a in reply.content["arrays"].items()},
                             dict(reply.content["codec"]))
    assert all(value[:, 4:].abs().sum() > 0 for key, value in trained.items()
               if key.endswith("lora_B.weight"))  # B's high columns left zero: they trained


def test_flexlora_null_components_start_again_as_a_fresh_lora(base_model):
    """One rank-4 client under a global rank of 16: the weighted change has rank 4, so
    components 4-15 have zero singular values; they come back with A drawn as peft draws
    it and B zero, the product B A unchanged."""
    strategy = FlexLoRA(ranks=(4, 16), alpha=32, target_modules=TARGETS, seed=3)
    arrays = strategy.initialize(base_model)
    list(strategy.configure_train(1, arrays, RunConfig().to_dict(), DryRunGrid([1, 2])))
    trained = trained_factors(strategy, 4, 0)
    new_arrays, _ = strategy.aggregate_train(1, [train_reply(1, trained, 10, rank=4)])
    state = new_arrays.to_torch_state_dict()
    for path, (m, n) in strategy.module_shapes.items():
        A = state[f"base_model.model.{path}.lora_A.weight"]
        B = state[f"base_model.model.{path}.lora_B.weight"]
        assert torch.equal(B[:, 4:], torch.zeros(m, 12))
        assert A[4:].abs().min() > 0 and A[4:].abs().max() <= 1 / n ** 0.5  # U(-1/sqrt(n), 1/sqrt(n))
        exact = strategy.scale * trained[f"base_model.model.{path}.lora_B.weight"].double() \
            @ trained[f"base_model.model.{path}.lora_A.weight"].double()
        got = strategy.scale * B.double() @ A.double()
        assert float((got - exact).norm() / exact.norm()) < 1e-6
    again = FlexLoRA(ranks=(4, 16), alpha=32, target_modules=TARGETS, seed=3)
    again.initialize(base_model)
    list(again.configure_train(1, again.initialize(base_model), RunConfig().to_dict(), DryRunGrid([1, 2])))
    same, _ = again.aggregate_train(1, [train_reply(1, trained, 10, rank=4)])
    assert all(torch.equal(v, same.to_torch_state_dict()[k]) for k, v in state.items())  # seeded


@pytest.mark.parametrize("strategy", ["flora", "hetlora", "flexlora"])
def test_a_topk_upload_of_factors_themselves_is_refused(strategy):
    from fedlora.errors import FedLoraError
    from strategies import build_strategy

    with pytest.raises(FedLoraError, match=f"--upload-codec topk:0.1,fp32: --strategy {strategy}'s "
                                           "clients upload their factors themselves"):
        build_strategy(RunConfig.from_dict({"strategy": strategy, "upload-codec": "topk:0.1"}))
    build_strategy(RunConfig.from_dict({"strategy": strategy, "upload-codec": "int8"}))  # dense: fine
