"""The sparse strategy (CELLM / FLASC): density schedule, server optimizers, error feedback."""

import math

import numpy as np
import pytest
import torch
from conftest import train_reply
from flwr.app import ArrayRecord, Context, RecordDict

from client.node_state import encode_with_feedback, feedback_residual
from fedlora.codec import Codec, decode_payload, encode_payload
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from strategies import build_strategy
from strategies.sparse import SparseLoRA, at_density
from server.dry_run import DryRunGrid


def random_state(seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(4, 30, generator=g) + shift,
            "m.lora_B.weight": torch.randn(20, 4, generator=g) + shift}



def test_densities_start_at_d0_decay_and_reach_the_plan(task_identity):
    strategy = SparseLoRA(upload_density=0.2, download_density=0.5, density_decay=0.5,
                          density_decay_every=2)
    # d_t = d_0 * 0.5^floor((t - 1) / 2): round 1 sends d_0 itself.
    for server_round, up, down in ((1, 0.2, 0.5), (2, 0.2, 0.5), (3, 0.1, 0.25), (4, 0.1, 0.25),
                                   (5, 0.05, 0.125)):
        messages = strategy.configure_train(
            server_round, ArrayRecord(random_state(0)), RunConfig().to_dict(), DryRunGrid())
        plan, header = messages[0].content["config"], messages[0].content["codec"]
        assert plan["upload-codec"] == f"topk:{up},fp32"
        assert header["codec"] == f"topk:{down},fp32"
        assert plan["error-feedback"] is False


def smollm2_qv_lora():
    """Random tensors of SmolLM2-135M's rank-8 LoRA on q_proj and v_proj: 460,800 values."""
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in range(30):
        for name, out_features in (("q_proj", 576), ("v_proj", 192)):
            state[f"{layer}.{name}.lora_A.weight"] = torch.randn(8, 576, generator=g)
            state[f"{layer}.{name}.lora_B.weight"] = torch.randn(out_features, 8, generator=g)
    return state


DENSITIES = (0.2, 0.1, 0.013, 0.77)
DECAYS = (0.9, 0.5, 0.75)
ROUNDS = range(1, 9)


@pytest.mark.parametrize("per_tensor", [False, True])
def test_every_scheduled_density_decodes_at_both_ends(per_tensor):
    """Both ends count the same k = ceil(d n): the client decodes what the server encoded
    with its own float, and the server what the client encoded from the plan's text
    (4 x 3 x 8 schedules on 4 sizes, SmolLM2's 460,800 LoRA values among them)."""
    g = torch.Generator().manual_seed(1)
    states = [smollm2_qv_lora()] + [
        {"a.lora_A.weight": torch.randn(1, n, generator=g), "a.lora_B.weight": torch.randn(n, 1, generator=g)}
        for n in (38, 6172, 50_000)
    ]
    cases = 0
    for state in states:
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        for d0 in DENSITIES:
            for decay in DECAYS:
                options = ",fp32,per-tensor" if per_tensor else ""
                given = f"topk:{d0}{options}" if per_tensor else "fp32"
                strategy = SparseLoRA(upload_density=d0, download_density=d0, density_decay=decay,
                                      upload_codec=given, download_codec=given)
                for server_round in ROUNDS:
                    server_codec = at_density(strategy.upload_form, strategy.density(d0, server_round))
                    client_codec = Codec.parse(server_codec.name)  # what the plan carries
                    for codec in (server_codec, client_codec):  # download, upload
                        payload, header = encode_payload(state, codec)
                        decoded = decode_payload(payload, header, shapes)
                        sizes = [v.numel() for v in state.values()] if per_tensor else [
                            sum(v.numel() for v in state.values())]
                        kept = sum(int((v != 0).sum()) for v in decoded.values())
                        assert kept == sum(math.ceil(server_codec.density * n) for n in sizes)
                    cases += 1
    assert cases == 4 * len(DENSITIES) * len(DECAYS) * len(ROUNDS)


def test_sparse_honours_the_value_type_and_index_option_it_is_given(task_identity):
    config = RunConfig.from_dict({"strategy": "sparse", "upload-codec": "topk:0.1,fp16,per-tensor",
                                  "download-codec": "fp16", "download-density": 0.5,
                                  "num-clients": 2})  # DryRunGrid's two nodes
    strategy = build_strategy(config)
    messages = strategy.configure_train(1, ArrayRecord(random_state(0)), config.to_dict(), DryRunGrid())
    assert messages[0].content["config"]["upload-codec"] == "topk:0.1,fp16,per-tensor"
    assert messages[0].content["codec"]["codec"] == "topk:0.5,fp16"
    values = messages[0].content["arrays"]["values"].numpy()
    assert values.dtype == np.float16 and values.size == math.ceil(0.5 * 200)
    dense = build_strategy(RunConfig.from_dict({"strategy": "sparse", "download-codec": "fp16",
                                                "num-clients": 2}))
    messages = dense.configure_train(1, ArrayRecord(random_state(0)), config.to_dict(), DryRunGrid())
    assert messages[0].content["codec"]["codec"] == "fp16"  # density 1: dense fp16 values


@pytest.mark.parametrize("values, message", [
    ({"upload-codec": "int8"}, "--upload-codec int8: --strategy sparse sends top-k entries as "
                               "fp32 or fp16 values; valid: fp32, fp16, topk:D[,fp16][,per-tensor]"),
    ({"upload-codec": "topk:0.2"}, "--upload-codec topk:0.2,fp32: --strategy sparse takes its "
                                   "density from --upload-density (0.1); give that density here, "
                                   "or only the value type (fp16)"),
    ({"download-codec": "bf16"}, "--download-codec bf16: --strategy sparse sends top-k entries"),
])
def test_sparse_refuses_a_codec_it_cannot_honour(values, message):
    with pytest.raises(FedLoraError) as err:
        build_strategy(RunConfig.from_dict({"strategy": "sparse", **values}))
    assert str(err.value).startswith(message)


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


def test_error_feedback_keeps_what_the_server_never_aggregated():
    """After any number of rounds: the aggregated replies + the residual = the sum of the
    updates, also when replies are dropped (rounds 3 and 4 here) or late."""
    context = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    codec = Codec.parse("topk:0.05,fp32")
    total_aggregated = {k: torch.zeros_like(v) for k, v in random_state(0).items()}
    total_true = {k: torch.zeros_like(v) for k, v in random_state(0).items()}
    aggregated_round = 0  # what the server tells the client in the next plan
    for server_round in range(1, 8):
        update = random_state(10 + server_round)
        payload, header = encode_with_feedback(context, update, codec, server_round, aggregated_round)
        sent = decode_payload(payload, header)
        for key in update:
            total_true[key] += update[key]
        if server_round not in (3, 4):  # the server aggregated this reply
            aggregated_round = server_round
            for key in update:
                total_aggregated[key] += sent[key]
        residual = feedback_residual(context, aggregated_round)
        for key in update:
            torch.testing.assert_close(total_aggregated[key] + residual[key], total_true[key],
                                       atol=1e-5, rtol=1e-5)
        kept = sum(int((v != 0).sum()) for v in sent.values())
        assert kept == math.ceil(0.05 * 200)  # 5 % of the 200 entries


def test_the_plan_tells_each_node_whether_its_last_reply_was_aggregated(task_identity):
    strategy = SparseLoRA(upload_density=0.5, error_feedback=True)
    config = RunConfig().to_dict()
    messages = strategy.configure_train(1, ArrayRecord(random_state(0)), config, DryRunGrid())
    assert [m.content["config"]["aggregated-round"] for m in messages] == [0, 0]
    good = train_reply(1, random_state(2), 10, codec="topk:0.5,fp32")
    bad = train_reply(2, {"m.lora_A.weight": torch.full((4, 30), float("nan")),
                          "m.lora_B.weight": torch.zeros(20, 4)}, 10, codec="topk:0.5,fp32")
    arrays, _ = strategy.aggregate_train(1, [good, bad])
    assert [node for node, _ in strategy.dropped] == [2]
    messages = strategy.configure_train(2, arrays, config, DryRunGrid())
    fates = {m.metadata.dst_node_id: m.content["config"]["aggregated-round"] for m in messages}
    assert fates == {1: 1, 2: 0}  # node 2 keeps the whole of its dropped reply


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
