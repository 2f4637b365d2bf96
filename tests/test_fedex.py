"""FedEx-LoRA: FedAvg of A and B plus a dense residual in every client's base weights, so
that the global model is exactly the weighted mean of the clients'; the residual travels
as the base delta (strategies/kept.py), by any codec, and every client holds what the
server holds."""

import math

import pytest
import torch
from conftest import client_plan, node_context, train_reply
from client.node_state import BASE_DELTAS, held_base_delta, run_key
from fedlora.wire import Plan
from flwr.app import ArrayRecord, RecordDict

import client.app
from fedlora.adapters import add_to_weights, apply_base_delta, lora_applied, save_base_delta
from conftest import weighted_average
from fedlora.aggregate import delta_weights, fedex_residual
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.evaluate import score
from fedlora.models import load_model
from strategies import build_strategy
from strategies.fedex import FedExLoRA
from server.dry_run import DryRunGrid

CPU = torch.device("cpu")
TARGETS = ("q_proj", "v_proj")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


def random_lora(shapes, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{path}.lora_{x}.weight": torch.randn(shape, generator=g)
            for path, (m, n) in shapes.items() for x, shape in (("A", (rank, n)), ("B", (m, rank)))}


def residual_of(states, weights, scale):
    """FedEx-LoRA's residual of these clients, from the plain mean of their products."""
    deltas = [delta_weights(state, scale) for state in states]
    mean_delta = {path: sum(w * d[path] for d, w in zip(deltas, weights)) for path in deltas[0]}
    return fedex_residual(mean_delta, weighted_average(states, weights), scale)


def test_residual_makes_the_average_of_the_factors_exact():
    shapes = {"layer.q_proj": (24, 16), "layer.v_proj": (8, 16)}
    states = [random_lora(shapes, 4, seed) for seed in range(3)]
    weights, scale = [0.2, 0.3, 0.5], 2.0
    residual = residual_of(states, weights, scale)
    averaged = delta_weights(weighted_average(states, weights), scale)
    for path in shapes:
        exact = sum(w * scale * s[f"base_model.model.{path}.lora_B.weight"].double()
                    @ s[f"base_model.model.{path}.lora_A.weight"].double()
                    for s, w in zip(states, weights))
        got = averaged[path] + residual[path].double()
        assert float((got - exact).norm() / exact.norm()) < 1e-6
        # FedAvg alone misses much of it: the residual is far from zero.
        assert float(residual[path].norm() / exact.norm()) > 0.1


@pytest.mark.parametrize("codec", ["fp32", "int8"])
def test_every_client_holds_the_servers_base_delta_and_a_lagging_one_catches_up(tiny_model_dir, codec):
    """Round 1: nodes 1-3 train; round 2: nodes 1-2; round 3: all. Node 3 missed round 2's
    increment, so round 3 sends it the whole delta in fp32; the others get the increment
    by the codec. Every node ends with the server's delta, bit for bit; the nodes of a run
    share one copy of it (client/node_state.py's BaseDeltas), their states hold its version
    only, and a fresh process (deployment: one per message) reads it from this machine's
    disk."""
    model = load_model(str(tiny_model_dir), CPU)[0]
    strategy = FedExLoRA(rank=4, alpha=8, target_modules=TARGETS, check_exactness=True,
                         download_codec=codec)
    shapes = strategy.adapted_shapes(model)
    arrays = strategy.initialize(model)
    run = node_context(1, 3).run_id  # one run's nodes: one run id
    contexts = {node: node_context(node, 3, run) for node in (1, 2, 3)}
    exact_sum = {}  # sum over rounds of the exact residuals, what base + carry must equal
    for server_round, nodes in ((1, [1, 2, 3]), (2, [1, 2]), (3, [1, 2, 3])):
        messages = strategy.configure_train(server_round, arrays, RunConfig().to_dict(), DryRunGrid(nodes))
        for message in messages:
            node = message.metadata.dst_node_id
            content = message.content
            if server_round == 1:
                assert "base-delta" not in content  # nothing to add yet
            else:
                header = content["base-delta-codec"]
                whole = server_round == 3 and node == 3
                assert header["from"] == (0 if whole else server_round - 2)
                assert header["codec"] == ("fp32" if whole else codec)
                arrays_sent = [a.numpy() for a in content["base-delta"].values()]
                values = sum(m * n for m, n in shapes.values())
                bytes_per_value = 4 if whole or codec == "fp32" else 1
                assert sum(a.nbytes for a in arrays_sent) == values * bytes_per_value + (
                    0 if whole or codec == "fp32" else 4 * len(shapes))  # int8: a scale each
            held = held_base_delta(contexts[node], content, int(content["config"]["base-delta-version"]))
            for path, value in strategy.kept.base_delta.items():
                assert torch.equal(held[path], value), (server_round, node, path)
        if server_round > 1:  # one copy per process, whichever node built it
            first, *others = (held_base_delta(contexts[node], RecordDict(), strategy.kept.base_version)
                              for node in nodes)
            assert all(first[p] is other[p] for other in others for p in first)
        received = arrays.to_torch_state_dict()
        trained = {node: random_lora(shapes, 4, 10 * server_round + node) for node in nodes}
        replies = [train_reply(node, {k: v - received[k] for k, v in trained[node].items()}, 100 * node)
                   for node in nodes]
        residual = residual_of(list(trained.values()), [n / sum(nodes) for n in nodes], 2.0)
        exact_sum = {p: exact_sum.get(p, 0.0) + r.double() for p, r in residual.items()}
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert not strategy.dropped
        if codec == "fp32":  # the global change of each round is the exact mean
            assert metrics["aggregation-error"] < 1e-6
        else:
            assert metrics["aggregation-error"] > 1e-4
        # The codec's loss is carried, never dropped: sent so far plus carry is exact.
        for path, total in exact_sum.items():
            got = strategy.kept.base_delta[path].double() + strategy.kept.carry[path].double()
            assert float((got - total).norm() / total.norm()) < 1e-6
    for context in contexts.values():  # a version, not the delta: nothing that grows
        assert all(not isinstance(r, ArrayRecord) for r in context.state.values())
    BASE_DELTAS.memory.clear()  # a fresh process
    version = strategy.kept.base_version - 1  # round 3's messages held this version
    held = held_base_delta(contexts[1], RecordDict(), version)
    assert set(held) == set(shapes) and BASE_DELTAS.path(run_key(contexts[1]), version).is_file()


def test_a_client_that_lost_its_base_delta_or_a_resumed_run_sends_all_of_it(tiny_model_dir, tmp_path):
    model = load_model(str(tiny_model_dir), CPU)[0]
    strategy = FedExLoRA(rank=4, alpha=8, target_modules=TARGETS)
    shapes = strategy.adapted_shapes(model)
    arrays = strategy.initialize(model)
    config = RunConfig().to_dict()
    for server_round in (1, 2):
        strategy.configure_train(server_round, arrays, config, DryRunGrid([1]))
        received = arrays.to_torch_state_dict()
        update = {k: v - received[k] for k, v in random_lora(shapes, 4, server_round).items()}
        update2 = {k: v - received[k] for k, v in random_lora(shapes, 4, 9 + server_round).items()}
        arrays, _ = strategy.aggregate_train(server_round, [train_reply(1, update, 50),
                                                            train_reply(2, update2, 70)])
    message = strategy.configure_train(3, arrays, config, DryRunGrid([1]))[0]
    assert message.content["base-delta-codec"]["from"] == 1  # round 2's increment only
    with pytest.raises(FedLoraError, match="builds on version 1, this client holds version 0"):
        held_base_delta(node_context(1, 3), message.content, int(message.content["config"]["base-delta-version"]))
    strategy.kept.forget(1)  # what the server does with that client's error reply
    message = strategy.configure_train(4, arrays, config, DryRunGrid([1]))[0]
    assert message.content["base-delta-codec"]["from"] == 0
    held = held_base_delta(node_context(1, 3), message.content, int(message.content["config"]["base-delta-version"]))
    assert all(torch.equal(held[p], v) for p, v in strategy.kept.base_delta.items())

    # A resumed run (checkpoint through torch.save) sends its clients the whole delta.
    checkpoint = tmp_path / "strategy.pt"
    torch.save(strategy.state_dict(), checkpoint)
    resumed = FedExLoRA(rank=4, alpha=8, target_modules=TARGETS)
    resumed.initialize(model)
    resumed.load_state_dict(torch.load(checkpoint, weights_only=True))
    message = resumed.configure_train(5, arrays, config, DryRunGrid([1]))[0]
    assert message.content["config"]["base-delta-version"] == 2
    held = held_base_delta(node_context(1, 3), message.content, int(message.content["config"]["base-delta-version"]))
    assert all(torch.equal(held[p], v) for p, v in strategy.kept.base_delta.items())


def test_a_node_that_never_replied_is_sent_the_whole_delta_not_failed(tiny_model_dir):
    """Round 2's message to node 2 is lost (no reply): its version was never confirmed, so
    round 3 sends it the whole delta, which it can apply from what it holds (nothing)."""
    model = load_model(str(tiny_model_dir), CPU)[0]
    strategy = FedExLoRA(rank=4, alpha=8, target_modules=TARGETS)
    shapes = strategy.adapted_shapes(model)
    arrays = strategy.initialize(model)
    config = RunConfig().to_dict()
    for server_round, replying in ((1, [1, 2]), (2, [1])):  # node 2's round-2 reply never comes
        strategy.configure_train(server_round, arrays, config, DryRunGrid([1, 2]))
        received = arrays.to_torch_state_dict()
        replies = [train_reply(node, {k: v - received[k] for k, v in random_lora(
            shapes, 4, 10 * server_round + node).items()}, 50) for node in replying]
        arrays, _ = strategy.aggregate_train(server_round, replies)
    messages = {m.metadata.dst_node_id: m for m in strategy.configure_train(
        3, arrays, config, DryRunGrid([1, 2]))}
    assert messages[1].content["base-delta-codec"]["from"] == 1  # it replied: the increment
    assert messages[2].content["base-delta-codec"]["from"] == 0  # unconfirmed: the whole delta
    held = held_base_delta(node_context(2, 2), messages[2].content,
                           int(messages[2].content["config"]["base-delta-version"]))
    assert all(torch.equal(held[p], v) for p, v in strategy.kept.base_delta.items())


def test_clients_train_and_evaluate_on_the_base_plus_the_residual(tiny_model_dir, tmp_path):
    """Real ClientApp calls: round 2 trains on W + R; federated evaluation scores
    W + R + s B A, as the test computes it; the saved residual loads back exactly."""
    config = RunConfig.from_dict({
        "strategy": "fedex", "model": str(tiny_model_dir), "num-clients": 2, "rank": 4,
        "local-steps": 3, "batch-size": 4, "max-length": 32, "lr": 0.05, "eval-size": 8,
        "evaluation": "federated", "check-exactness": True})
    strategy = build_strategy(config)
    plan = client_plan(config)
    contexts = {node: node_context(node, 2) for node in (1, 2)}
    model, tokenizer = load_model(config.model, CPU)
    arrays = strategy.initialize(model)
    for server_round in (1, 2):
        messages = strategy.configure_train(server_round, arrays, plan, DryRunGrid())
        replies = [client.app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert not strategy.dropped, strategy.dropped
        assert metrics["aggregation-error"] < 1e-5
    assert set(held_base_delta(contexts[1], RecordDict(), 1)) \
        == set(strategy.adapted_shapes(model))  # round 2 was trained on round 1's residual

    evaluation = sorted(strategy.configure_evaluate(2, arrays, plan, DryRunGrid()),
                        key=lambda m: m.metadata.dst_node_id)[0]
    got = client.app.evaluate(evaluation, contexts[1]).content["metrics"]
    _, held_out, _ = client.app.node_examples(Plan.from_record(evaluation.content["config"]),
                                              contexts[1], tokenizer)
    state, rank, alpha = strategy.peft_adapter(arrays)

    def scored():
        with lora_applied(model, state, rank, alpha, list(TARGETS)) as evaluated:
            return score(evaluated, tokenizer, held_out, ["negative", "positive"],
                         batch_size=config.eval_batch_size, max_length=32, device=CPU).to_record()

    without_residual = scored()
    add_to_weights(model, strategy.kept.base_delta)
    expected = scored()
    assert got["examples"] == expected["examples"] > 0
    assert list(got["predicted-counts"]) == expected["predicted-counts"]
    assert math.isclose(got["loss-sum"], expected["loss-sum"], rel_tol=1e-6)
    assert not math.isclose(got["loss-sum"], without_residual["loss-sum"], rel_tol=1e-4)

    save_base_delta(strategy.kept.base_delta, tmp_path)
    reloaded = apply_base_delta(load_model(config.model, CPU)[0], tmp_path)
    for path in strategy.kept.base_delta:
        assert torch.equal(reloaded.get_submodule(path).weight, model.get_submodule(path).weight)


def test_fedex_refuses_user_level_dp_and_mixed_ranks():
    with pytest.raises(FedLoraError, match="--strategy fedex cannot form its residual"):
        build_strategy(RunConfig(strategy="fedex", dp="user", dp_noise=1.0, dp_clip=1.0))
    with pytest.raises(FedLoraError, match="which --strategy fedex cannot aggregate"):
        build_strategy(RunConfig(strategy="fedex", ranks="8,4"))
