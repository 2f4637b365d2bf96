"""FedSVD: B averaged with A shared (exact), then the product refactored by its SVD: the
restart keeps B A and gives A orthonormal rows; only B travels up."""

import pytest
import torch
from conftest import train_reply

from fedlora.aggregate import delta_weights, svd_refactor
from fedlora.codec import Codec
from fedlora.config import RunConfig
from fedlora.models import load_model
from server.dry_run import DryRunGrid
from server.transport import payload_bytes
from strategies.fedsvd import FedSVD

TARGETS = ("q_proj", "v_proj")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


def factors(rank, m, n, seed):
    g = torch.Generator().manual_seed(seed)
    return {"m.lora_A.weight": torch.randn(rank, n, generator=g),
            "m.lora_B.weight": torch.randn(m, rank, generator=g)}


@pytest.mark.parametrize("rank, m, n", [(8, 30, 50), (4, 64, 16), (6, 3, 40)])
def test_the_restart_keeps_b_a_and_gives_a_orthonormal_rows(rank, m, n):
    state = factors(rank, m, n, 0)
    restarted = svd_refactor(state)
    A, B = restarted["m.lora_A.weight"].double(), restarted["m.lora_B.weight"].double()
    assert A.shape == (rank, n) and B.shape == (m, rank)
    before = state["m.lora_B.weight"].double() @ state["m.lora_A.weight"].double()
    assert float((B @ A - before).norm() / before.norm()) < 1e-6  # fp32 rounding
    kept = min(rank, m, n)  # a module narrower than the rank: zero components beyond it
    gram = A[:kept] @ A[:kept].T
    assert torch.allclose(gram, torch.eye(kept, dtype=torch.float64), atol=1e-6)
    assert torch.equal(A[kept:], torch.zeros(rank - kept, n, dtype=torch.float64))


def test_b_alone_travels_up_the_average_is_exact_and_a_follows_the_updates(tiny_model_dir):
    """Three nodes are sent the round, two reply (partial participation): the new B A is
    exactly (sum_k p_k B_k) A of the round's A, and A has changed."""
    model = load_model(str(tiny_model_dir), torch.device("cpu"))[0]
    strategy = FedSVD(rank=4, alpha=8, target_modules=TARGETS, check_exactness=True)
    arrays = strategy.initialize(model)
    messages = list(strategy.configure_train(1, arrays, RunConfig().to_dict(), DryRunGrid([1, 2, 3])))
    assert all(m.content["config"]["trainable"] == "lora_B" for m in messages)
    sent = arrays.to_torch_state_dict()
    b_keys = [k for k in sent if ".lora_B." in k]
    g = torch.Generator().manual_seed(1)
    updates = [{k: torch.randn(sent[k].shape, generator=g) for k in b_keys} for _ in range(2)]
    replies = [train_reply(node, update, n) for node, update, n in zip((1, 2), updates, (30, 90))]
    fp32 = Codec.parse("fp32")
    for reply in replies:  # B's values and nothing else, to the byte
        assert sorted(reply.content["arrays"].keys()) == sorted(b_keys)
        assert sum(a.numpy().nbytes for a in reply.content["arrays"].values()) == \
            fp32.payload_bytes({k: tuple(sent[k].shape) for k in b_keys})
    assert payload_bytes(replies[0]) < payload_bytes(messages[0]) / 1.5  # A and B go down
    new_arrays, metrics = strategy.aggregate_train(1, replies)
    assert not strategy.dropped and metrics["aggregation-error"] < 1e-6
    new = new_arrays.to_torch_state_dict()
    mean_b = {k: sent[k] + 0.25 * updates[0][k] + 0.75 * updates[1][k] for k in b_keys}
    expected = delta_weights({**sent, **mean_b}, strategy.scale)
    got = delta_weights(new, strategy.scale)
    for path, value in expected.items():
        assert float((got[path] - value).norm() / value.norm()) < 1e-6
        a_key = next(k for k in new if path in k and ".lora_A." in k)
        assert not torch.allclose(new[a_key], sent[a_key])  # A moved to the updates' span


@pytest.mark.parametrize("strategy_name", ["fedsvd", "rolora"])
def test_user_level_dp_and_a_lossy_codec_compose_with_the_one_factor_methods(tiny_model_dir, strategy_name):
    """--dp user at z = 0 releases the mean of the clipped updates of the round's factor
    (B in round 1), sent in fp16: the new product is (B + that mean) A."""
    from fedlora.privacy import clip_update
    from strategies import build_strategy

    config = RunConfig.from_dict({"strategy": strategy_name, "model": str(tiny_model_dir),
                                  "num-clients": 2, "rank": 4, "target-modules": "q_proj,v_proj",
                                  "dp": "user", "dp-noise": 0.0, "dp-clip": 0.5,
                                  "upload-codec": "fp16", "download-codec": "fp16"})
    strategy = build_strategy(config)
    arrays = strategy.initialize(load_model(config.model, torch.device("cpu"))[0])
    strategy.configure_train(1, arrays, RunConfig().to_dict(), DryRunGrid([1, 2]))
    sent = strategy.global_state
    b_keys = [k for k in sent if ".lora_B." in k]
    g = torch.Generator().manual_seed(2)
    updates = [{k: torch.randn(sent[k].shape, generator=g) for k in b_keys} for _ in range(2)]
    replies = [train_reply(node, u, 10, codec="fp16") for node, u in zip((1, 2), updates)]
    decoded = [strategy.accept(1, r, strategy.expected_shapes) for r in replies]  # fp16-rounded
    strategy.dropped = []
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert not strategy.dropped and metrics["epsilon"] == float("inf")  # z = 0
    clipped = [clip_update(d, 0.5) for d in decoded]
    mean_b = {k: sent[k].double() + (clipped[0][k] + clipped[1][k]) / 2 for k in b_keys}
    expected = delta_weights({**sent, **{k: v.float() for k, v in mean_b.items()}}, strategy.scale)
    got = delta_weights(arrays.to_torch_state_dict(), strategy.scale)
    for path, value in expected.items():
        assert float((got[path] - value).norm() / value.norm()) < 1e-5
