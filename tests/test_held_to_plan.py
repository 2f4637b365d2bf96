"""A reply is held to its plan: the codec the plan named, the ranks it allows, DP-SGD
settings and client identities it accounts for, and finite values. Each violation drops
that reply with one line naming the field, its value and what the plan said."""

import pytest
import torch
from conftest import train_reply
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from fedlora.codec import Codec, encode_payload
from fedlora.config import RunConfig
from fedlora.errors import FedLoraError
from fedlora.models import load_model
from server.dry_run import DryRunGrid
from strategies import build_strategy
from strategies.fedsb import FedSB
from strategies.flora import FLoRA

TARGETS = ("q_proj", "v_proj")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


@pytest.fixture(scope="module")
def base_model(tiny_model_dir):
    return load_model(str(tiny_model_dir), torch.device("cpu"))[0]


def test_a_sign_vote_cannot_be_outvoted_by_an_fp32_reply(base_model):
    """Fed-SB's gradient round takes each client's sign as one vote. A client that answers
    with fp32 values of 1e6 would decide every entry alone: its header names another codec
    than the plan's, so it is dropped and the two honest votes stand."""
    strategy = FedSB(init="gradient", init_codec="sign", rank=4, target_modules=TARGETS)
    strategy.initialize(base_model)
    messages = strategy.configure_init(ArrayRecord(), RunConfig().to_dict(), DryRunGrid([1, 2, 3]))
    assert {m.content["config"]["gradient-codec"] for m in messages} == {"sign"}
    shapes = {f"{path}.weight": shape for path, shape in strategy.module_shapes.items()}
    honest = {k: torch.ones(s) for k, s in shapes.items()}
    hostile = {k: torch.full(s, -1e6) for k, s in shapes.items()}
    strategy.aggregate_init([train_reply(1, honest, 16, codec="sign"),
                             train_reply(2, honest, 16, codec="sign"),
                             train_reply(3, hostile, 16, codec="fp32")])
    assert strategy.dropped == [(3, "'codec' 'fp32' differs from the plan's 'sign'")]


def test_a_sparse_reply_must_keep_the_rounds_density():
    strategy = build_strategy(RunConfig.from_dict({"strategy": "sparse", "upload-density": 0.1}))
    state = {"m.lora_A.weight": torch.randn(4, 10), "m.lora_B.weight": torch.randn(6, 4)}
    strategy.configure_train(1, ArrayRecord(state), RunConfig().to_dict(), DryRunGrid([1, 2, 3, 4]))
    assert strategy.upload_codec.name == "topk:0.1,fp32"
    update = {k: torch.randn_like(v) for k, v in state.items()}
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, update, 10, codec="topk:0.1"),
                                             train_reply(2, update, 10, codec="topk:1.0"),
                                             train_reply(3, update, 10, codec="fp32")])
    assert arrays is not None
    assert dict(strategy.dropped) == {
        2: "'codec' 'topk:1.0,fp32' differs from the plan's 'topk:0.1,fp32'",
        3: "'codec' 'fp32' differs from the plan's 'topk:0.1,fp32'"}


def test_a_flora_rank_above_the_plans_largest_is_dropped(base_model):
    """A rank-4096 stack would be kept for the whole run and sent to every client."""
    strategy = FLoRA(ranks=(4, 8), alpha=16, target_modules=TARGETS)
    strategy.initialize(base_model)
    strategy.configure_train(1, ArrayRecord(), RunConfig().to_dict(), DryRunGrid([1, 2]))
    shapes = strategy.expected_shapes(MetricRecord({"rank": 8}))
    assert max(s[0] for k, s in shapes.items() if k.endswith("lora_A.weight")) == 8
    with pytest.raises(FedLoraError, match=r"no valid 'rank' in \[1, 8\] \(got 16\)"):
        strategy.expected_shapes(MetricRecord({"rank": 16}))


def test_a_client_never_sends_non_finite_values():
    for codec in ("sign", "int8", "fp32"):
        with pytest.raises(FedLoraError, match="m.w holds NaN or Inf; nothing non-finite is sent"):
            encode_payload({"m.w": torch.tensor([1.0, float("nan")])}, Codec.parse(codec))


def test_under_dp_sgd_no_more_identities_than_clients_are_accounted():
    strategy = build_strategy(RunConfig.from_dict({"dp": "sample", "num-clients": 2, "rounds": 3}))
    state = {"m.lora_A.weight": torch.zeros(2, 6), "m.lora_B.weight": torch.zeros(5, 2)}
    strategy.global_state = state
    strategy.sent_shapes = {k: tuple(v.shape) for k, v in state.items()}

    def reply(node, client):
        made = train_reply(node, {k: torch.randn_like(v) for k, v in state.items()}, 80)
        made.content["metrics"].update({"dp-noise": 1.0, "dp-sample-rate": 0.1, "dp-steps": 10})
        made.content["client"] = ConfigRecord({"client-id": client})
        return made

    strategy.aggregate_train(1, [reply(1, "a"), reply(2, "b"), reply(3, "c")])
    assert strategy.dropped == [(3, "'client-id' 'c' would be a client beyond the plan's 2 "
                                    "(--num-clients)")]
    strategy.aggregate_train(2, [reply(4, "a"), reply(5, "d")])  # a known one is welcome
    assert strategy.dropped == [(5, "'client-id' 'd' would be a client beyond the plan's 2 "
                                    "(--num-clients)")]
    assert sorted(strategy.dp.accountant.accountants) == ["a", "b"]
