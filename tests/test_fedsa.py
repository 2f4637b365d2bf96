"""FedSA-LoRA: A travels and is averaged; each client's B stays on the client, persists
across rounds, and is what the client evaluates with."""

import pytest
import torch

import client.app
import client.node_state
from conftest import client_plan, node_context
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.models import load_model
from server.preflight import evaluation_for
from strategies import build_strategy
from server.dry_run import DryRunGrid

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


def personal_b(context):
    return context.state[client.node_state.PERSONAL].to_torch_state_dict()


def test_b_never_travels_and_each_clients_b_persists(tiny_model_dir):
    config = evaluation_for(build_strategy(RunConfig(strategy="fedsa")), RunConfig.from_dict({
        "strategy": "fedsa", "model": str(tiny_model_dir), "num-clients": 2, "rank": 4,
        "local-steps": 3, "batch-size": 4, "max-length": 32, "lr": 0.05, "eval-size": 8}))
    assert config.evaluation == "federated"  # auto: only the clients can evaluate it
    strategy = build_strategy(config)
    plan = client_plan(config)
    contexts = {node: node_context(node, 2) for node in (1, 2)}
    arrays = strategy.initialize(load_model(config.model, CPU)[0])
    history = []
    for server_round in (1, 2):
        messages = sorted(strategy.configure_train(server_round, arrays, plan, DryRunGrid()),
                          key=lambda m: m.metadata.dst_node_id)
        for message in messages:  # nothing of B goes down, and no B comes back
            assert all("lora_A" in k for k in message.content["arrays"].keys())
            assert not list(message.content["keep"].keys())
        replies = [client.app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        for reply in replies:
            assert reply.content["arrays"].keys() and all(
                "lora_A" in k for k in reply.content["arrays"].keys())
        history.append({node: personal_b(c) for node, c in contexts.items()})
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert not strategy.dropped, strategy.dropped
    first, second = history
    for node in (1, 2):
        assert first[node].keys() and all("lora_B" in k for k in first[node])
        for key, b in first[node].items():
            assert b.abs().sum() > 0  # trained away from its zero start
            assert not torch.equal(second[node][key], b)  # and on in round 2
    key = next(iter(first[1]))
    assert not torch.equal(first[1][key], first[2][key])  # each client its own

    # Round 2 started from the client's own B: without it, the same message trains to
    # another A.
    message = sorted(strategy.configure_train(3, arrays, plan, DryRunGrid()),
                     key=lambda m: m.metadata.dst_node_id)[0]
    stateless = node_context(1, 2)
    with_b = client.app.train(message, contexts[1]).content["arrays"]
    without_b = client.app.train(message, stateless).content["arrays"]
    assert any(not (with_b[k].numpy() == without_b[k].numpy()).all() for k in with_b.keys())

    # Federated evaluation scores the shared A with the client's own B.
    evaluation = sorted(strategy.configure_evaluate(3, arrays, plan, DryRunGrid()),
                        key=lambda m: m.metadata.dst_node_id)[0]
    assert all(float(abs(evaluation.content["arrays"][k].numpy()).sum()) == 0
               for k in evaluation.content["arrays"].keys() if "lora_B" in k)  # B sent as 0
    own = client.app.evaluate(evaluation, contexts[1]).content["metrics"]
    none = client.app.evaluate(evaluation, node_context(1, 2)).content["metrics"]
    assert own["examples"] == none["examples"] > 0
    assert own["loss-sum"] != none["loss-sum"]


def test_fedsa_refuses_central_evaluation_and_the_exactness_check():
    strategy = build_strategy(RunConfig(strategy="fedsa"))
    with pytest.raises(FedLoraError, match="only the clients can evaluate it; use --evaluation federated"):
        evaluation_for(strategy, RunConfig(strategy="fedsa", evaluation="central"))
    with pytest.raises(FedLoraError, match="--val-size 20: --strategy fedsa keeps lora_B on each "
                                           "client, so the server has no model to validate"):
        evaluation_for(strategy, RunConfig(strategy="fedsa", val_size=20))
    with pytest.raises(FedLoraError, match="--strategy fedsa has none"):
        build_strategy(RunConfig(strategy="fedsa", check_exactness=True))
