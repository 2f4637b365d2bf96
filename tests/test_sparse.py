"""The sparse strategy (CELLM / FLASC): density schedule, server optimizers, error feedback."""

import pytest
import torch
from conftest import train_reply
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import encode_with_feedback
from fedlora.codec import Codec, decode_payload
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from strategies import build_strategy
from strategies.sparse import SparseLoRA


def random_state(seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(4, 30, generator=g) + shift,
            "m.lora_B.weight": torch.randn(20, 4, generator=g) + shift}


class FakeGrid:
    def get_node_ids(self):
        return [1, 2]


def test_densities_decay_and_reach_the_plan():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        strategy = SparseLoRA(upload_density=0.2, download_density=0.5, density_decay=0.5,
                              density_decay_every=2)
        from flwr.app import ArrayRecord

        for server_round, up, down in ((1, 0.2, 0.5), (2, 0.1, 0.25), (3, 0.1, 0.25), (4, 0.05, 0.125)):
            messages = strategy.configure_train(
                server_round, ArrayRecord(random_state(0)), RunConfig().to_dict(), FakeGrid())
            plan, header = messages[0].content["config"], messages[0].content["codec"]
            assert plan["upload-codec"] == f"topk:{up:g},fp32"
            assert header["codec"] == f"topk:{down:g},fp32"
            assert plan["error-feedback"] is False
    finally:
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None


def test_adam_takes_a_sign_step_of_the_server_learning_rate():
    global_state = random_state(1)
    strategy = SparseLoRA(server_optimizer="adam", server_lr=0.01)
    strategy.global_state = global_state
    strategy.sent_shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    strategy.upload_codec = Codec.parse("topk:0.3,fp32")
    updates = [random_state(2), random_state(3)]
    replies = [train_reply(1, updates[0], 10, codec="topk:0.3,fp32"),
               train_reply(2, updates[1], 10, codec="topk:0.3,fp32")]
    arrays, _ = strategy.aggregate_train(1, replies)
    new = arrays.to_torch_state_dict()
    sent = [decode_payload({k: a.numpy() for k, a in r.content["arrays"].items()},
                           dict(r.content["codec"])) for r in replies]
    for key, value in global_state.items():
        mean = 0.5 * sent[0][key] + 0.5 * sent[1][key]
        # Adam's first (bias-corrected) step is lr * g / (|g| + eps): the sign, where g != 0
        torch.testing.assert_close(new[key], value + 0.01 * torch.sign(mean), atol=1e-6, rtol=0)


def test_error_feedback_keeps_what_was_not_sent():
    """After any number of rounds: everything sent + the residual = the sum of the updates."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    codec = Codec.parse("topk:0.05,fp32")
    total_sent = {k: torch.zeros_like(v) for k, v in random_state(0).items()}
    total_true = {k: torch.zeros_like(v) for k, v in random_state(0).items()}
    for step in range(7):
        update = random_state(10 + step)
        payload, header = encode_with_feedback(context, update, codec)
        sent = decode_payload(payload, header)
        residual = context.state["fedlora-residual"].to_torch_state_dict()
        for key in update:
            total_true[key] += update[key]
            total_sent[key] += sent[key]
            torch.testing.assert_close(total_sent[key] + residual[key], total_true[key],
                                       atol=1e-5, rtol=1e-5)
        kept = sum(int((v != 0).sum()) for v in sent.values())
        assert kept == int(torch.tensor(0.05 * 200).ceil())  # 5 % of the 200 entries


@pytest.mark.parametrize("values, message", [
    ({"upload-density": 0}, "--upload-density must be in (0, 1], got 0"),
    ({"density-decay": 1.5}, "--density-decay must be in (0, 1], got 1.5"),
    ({"server-optimizer": "sgd"}, "unknown server_optimizer 'sgd'; valid choices: avg, adam"),
])
def test_sparse_options_are_validated(values, message):
    with pytest.raises(FedLoraError) as err:
        RunConfig.from_dict({"strategy": "sparse", **values})
    assert str(err.value) == message


def test_sparse_is_registered_with_its_options():
    strategy = build_strategy(RunConfig.from_dict(
        {"strategy": "sparse", "upload-density": 0.01, "error-feedback": True,
         "server-optimizer": "adam"}))
    assert isinstance(strategy, SparseLoRA)
    assert (strategy.upload_density, strategy.error_feedback, strategy.server_optimizer) == (
        0.01, True, "adam")
