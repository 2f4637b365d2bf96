"""RoLoRA: the round's parity decides which factor trains and travels up; each round's
average is exact because the other factor is shared."""

import pytest
import torch
from conftest import train_reply

from fedlora.codec import Codec
from fedlora.config import RunConfig
from fedlora.models import load_model
from server.dry_run import DryRunGrid
from strategies.rolora import RoLoRA

TARGETS = ("q_proj", "v_proj")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


def test_odd_rounds_train_b_even_rounds_a_each_exact_and_one_factor_travels_up(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.device("cpu"))[0]
    strategy = RoLoRA(rank=4, alpha=8, target_modules=TARGETS, check_exactness=True)
    arrays = strategy.initialize(model)
    fp32 = Codec.parse("fp32")
    g = torch.Generator().manual_seed(0)
    for server_round, factor, other in ((1, "lora_B", "lora_A"), (2, "lora_A", "lora_B"),
                                        (3, "lora_B", "lora_A")):
        messages = list(strategy.configure_train(server_round, arrays, RunConfig().to_dict(),
                                                 DryRunGrid([1, 2, 3])))
        assert {m.content["config"]["trainable"] for m in messages} == {factor}
        sent = arrays.to_torch_state_dict()
        keys = [k for k in sent if f".{factor}." in k]
        assert sorted(strategy.expected_shapes(None)) == sorted(keys)
        updates = [{k: torch.randn(sent[k].shape, generator=g) for k in keys} for _ in range(2)]
        replies = [train_reply(node, u, n) for node, u, n in zip((1, 3), updates, (20, 60))]
        for reply in replies:  # the round's factor and nothing else, to the byte
            assert sum(a.numpy().nbytes for a in reply.content["arrays"].values()) == \
                fp32.payload_bytes({k: tuple(sent[k].shape) for k in keys})
        arrays, metrics = strategy.aggregate_train(server_round, replies)
        assert not strategy.dropped and metrics["aggregation-error"] < 1e-6  # 2 of 3 replied
        new = arrays.to_torch_state_dict()
        for key in sent:
            if f".{other}." in key:
                assert torch.equal(new[key], sent[key])  # the shared factor stays
            else:
                torch.testing.assert_close(new[key], sent[key] + 0.25 * updates[0][key]
                                           + 0.75 * updates[1][key])
