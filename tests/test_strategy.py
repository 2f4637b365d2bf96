"""The strategy's handling of replies: aggregate the good ones, drop the bad ones."""

import torch
from conftest import make_reply, train_reply
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from strategies.fedavg import FedAvgLoRA


def states(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"m.lora_A.weight": torch.randn(2, 6, generator=g),
             "m.lora_B.weight": torch.randn(5, 2, generator=g)} for _ in range(n)]


def strategy_after_sending(global_state, min_clients=1):
    strategy = FedAvgLoRA(min_train_nodes=min_clients)
    # what configure_train records when it sends the global state
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
        12: make_reply(12, RecordDict({"arrays": ArrayRecord(template)})),
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
        values = {"num-examples": 10, "train-loss": 1.0, "train-seconds": 0.1, **metrics}
        return make_reply(node, RecordDict({"arrays": ArrayRecord(template),
                                            "metrics": MetricRecord(values)}))

    replies = [reply_with(1), reply_with(2, **{"train-loss": float("nan")}),
               reply_with(3, **{"train-seconds": [1.0, 2.0]}), reply_with(4, **{"num-examples": 2.5})]
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and sorted(n for n, _ in strategy.dropped) == [2, 3, 4]
    assert metrics["train-loss"] == 1.0 and abs(metrics["train-seconds"] - 0.1) < 1e-12
