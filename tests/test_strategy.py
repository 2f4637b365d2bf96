"""The strategy's handling of replies: aggregate the good ones, drop the bad ones."""

import pytest
import torch
from conftest import make_reply, train_reply
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from strategies.fedavg import FedAvgLoRA


def states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"m.lora_A.weight": torch.randn(2, 6, generator=g),
             "m.lora_B.weight": torch.randn(5, 2, generator=g)} for _ in range(n)]


def strategy_after_sending(global_state, min_clients=1):
    """A strategy as configure_train leaves it, having sent zero tensors shaped like
    ``global_state``: a client's update then equals its trained state."""
    strategy = FedAvgLoRA(min_train_nodes=min_clients)
    strategy.global_state = {k: torch.zeros_like(v) for k, v in global_state.items()}
    strategy.sent_shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    return strategy


def test_fedavg_averages_valid_replies_weighted_by_examples():
    clients = states(3)
    strategy = strategy_after_sending(states(1, seed=9)[0])
    replies = [train_reply(i + 1, s, n, loss=l) for i, (s, n, l) in
               enumerate(zip(clients, [10, 30, 60], [3.0, 2.0, 1.0]))]
    arrays, metrics = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()
    for key in clients[0]:
        expected = 0.1 * clients[0][key] + 0.3 * clients[1][key] + 0.6 * clients[2][key]
        torch.testing.assert_close(result[key], expected)
    assert abs(metrics["train-loss"] - (0.3 + 0.6 + 0.6)) < 1e-9
    assert strategy.dropped == []


def test_bad_replies_are_dropped_with_a_reason_and_the_round_goes_on():
    good = states(2)
    template = good[0]
    key = "m.lora_A.weight"
    bad_replies = {
        7: make_reply(7, error="CUDA out of memory"),
        8: train_reply(8, {**template, key: torch.zeros(3, 6)}, 10),
        9: train_reply(9, {**template, key: torch.full((2, 6), float("inf"))}, 10),
        10: train_reply(10, {k: v for k, v in template.items() if k != key}, 10),
        11: train_reply(11, template, 0),
        12: make_reply(12, RecordDict({"arrays": ArrayRecord(template),
                                        "codec": ConfigRecord({"codec": "fp32"})})),
        13: make_reply(13, RecordDict({"metrics": MetricRecord({"num-examples": 5})})),
        14: train_reply(14, {**template, "extra.lora_A.weight": torch.zeros(1)}, 10),
    }
    strategy = strategy_after_sending(template)
    replies = [train_reply(1, good[0], 10), *bad_replies.values(), train_reply(2, good[1], 30)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = {k: 0.25 * good[0][k] + 0.75 * good[1][k] for k in template}
    result = arrays.to_torch_state_dict()
    assert all(torch.allclose(result[k], expected[k]) for k in template)
    reasons = dict(strategy.dropped)
    assert sorted(reasons) == sorted(bad_replies)
    assert "CUDA out of memory" in reasons[7]
    assert "shape (3, 6), expected (2, 6)" in reasons[8]
    assert "NaN or Inf" in reasons[9]
    assert "missing ['m.lora_A.weight']" in reasons[10]
    assert "must be a positive int" in reasons[11]
    assert "no MetricRecord" in reasons[12]
    assert "no ArrayRecord" in reasons[13]
    assert "unexpected ['extra.lora_A.weight']" in reasons[14]


def test_too_few_valid_replies_fail_the_round():
    template = states(1)[0]
    strategy = strategy_after_sending(template, min_clients=2)
    replies = [train_reply(1, template, 10), make_reply(2, error="killed")]
    assert strategy.aggregate_train(1, replies) == (None, None)


def test_hostile_metrics_are_dropped_not_fatal():
    template = states(1)[0]
    strategy = strategy_after_sending(template)

    def reply_with(node, **metrics):
        reply = train_reply(node, template, 10)
        values = {"num-examples": 10, "train-loss": 1.0, "train-seconds": 0.1, **metrics}
        reply.content["metrics"] = MetricRecord(values)
        return reply

    replies = [reply_with(1), reply_with(2, **{"train-loss": float("nan")}),
               reply_with(3, **{"train-seconds": [1.0, 2.0]}), reply_with(4, **{"num-examples": 2.5})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and sorted(n for n, _ in strategy.dropped) == [2, 3, 4]
    assert metrics["train-loss"] == 1.0 and abs(metrics["train-seconds"] - 0.1) < 1e-12


def test_sparse_updates_are_added_to_the_dense_global_state():
    """With a top-k upload, the new global state is the global plus the weighted mean of the
    clients' sparse updates: entries no client sent keep their global value."""
    global_state = {k: v + 1.0 for k, v in states(1, seed=5)[0].items()}
    strategy = FedAvgLoRA(upload_codec="topk:0.25,fp32")
    strategy.global_state = global_state
    strategy.sent_shapes = {k: tuple(v.shape) for k, v in global_state.items()}
    updates = states(2, seed=6)
    replies = [train_reply(1, updates[0], 10, codec="topk:0.25,fp32"),
               train_reply(2, updates[1], 30, codec="topk:0.25,fp32")]
    arrays, _ = strategy.aggregate_train(1, replies)
    result = arrays.to_torch_state_dict()

    def sparsified(update):  # what the client's codec kept of an update
        flat = torch.cat([update[k].flatten() for k in sorted(update)])
        kept = torch.zeros_like(flat)
        top = torch.topk(flat.abs(), int(0.25 * flat.numel() + 0.999)).indices
        kept[top] = flat[top]
        parts = torch.split(kept, [update[k].numel() for k in sorted(update)])
        return {k: part.reshape(update[k].shape) for k, part in zip(sorted(update), parts)}

    sent = [sparsified(u) for u in updates]
    for key in global_state:
        expected = global_state[key] + 0.25 * sent[0][key] + 0.75 * sent[1][key]
        torch.testing.assert_close(result[key], expected)


def test_hostile_codec_headers_are_dropped():
    template = states(1)[0]
    strategy = strategy_after_sending(template)
    good = train_reply(1, template, 10)
    headers = {
        2: {"codec": "zip", "keys": sorted(template), "shapes": ["2x6", "5x2"]},
        3: {"codec": "fp32", "keys": sorted(template), "shapes": ["2x6"]},
        4: {"codec": "fp32", "keys": sorted(template), "shapes": ["2x6", "5xtwo"]},
        5: {"codec": "fp32", "keys": sorted(template), "shapes": ["2x6", "500000x200000"]},
        6: {"codec": "topk:0.5", "keys": sorted(template), "shapes": ["2x6", "5x2"]},
    }
    replies = [good]
    for node, header in headers.items():
        reply = train_reply(node, template, 10)
        reply.content["codec"] = ConfigRecord(header)
        replies.append(reply)
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    reasons = dict(strategy.dropped)
    assert sorted(reasons) == [2, 3, 4, 5, 6]
    # Held to its plan: a header naming another codec than the plan's is refused first.
    assert reasons[2] == "'codec' 'zip' differs from the plan's 'fp32'"
    assert "2 tensors but 1 shapes" in reasons[3]
    assert "malformed shape" in reasons[4]
    assert "has shape (500000, 200000), expected (5, 2)" in reasons[5]
    assert reasons[6] == "'codec' 'topk:0.5' differs from the plan's 'fp32'"


def test_max_update_norm_bounds_each_update_before_the_average():
    """A client that scales its update by 1,000 moves the average by at most the bound."""
    from fedlora.privacy import clip_update, update_norm

    template = states(1)[0]
    honest, scaled = states(2, seed=3)
    scaled = {k: 1000 * v for k, v in scaled.items()}
    strategy = strategy_after_sending(template)
    strategy.max_update_norm = 1.0
    arrays, _ = strategy.aggregate_train(1, [train_reply(1, honest, 10), train_reply(2, scaled, 10)])
    result = arrays.to_torch_state_dict()
    bounded = [clip_update(u, 1.0) for u in (honest, scaled)]
    for key in template:
        torch.testing.assert_close(result[key], (0.5 * bounded[0][key] + 0.5 * bounded[1][key]).float())
    assert update_norm(bounded[1]) == pytest.approx(1.0)  # the attacker's weight: at most 1.0


@pytest.mark.parametrize("values, message", [
    ({"strategy": "flora", "max-update-norm": 1.0}, "--max-update-norm bounds updates, and --strategy flora"),
    ({"dp": "user", "max-update-norm": 1.0}, "--max-update-norm with --dp user: --dp-clip bounds"),
])
def test_max_update_norm_is_refused_where_it_cannot_apply(values, message):
    from fedlora.config import RunConfig
    from fedlora.errors import FedLoraError
    from strategies import build_strategy

    with pytest.raises(FedLoraError, match=message):
        build_strategy(RunConfig.from_dict(values))
