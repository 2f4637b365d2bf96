"""Central evaluation in the clients' processes: each client scores a share of the
server's examples on the model it holds; the pooled counts equal the server's own
evaluation, a lost share is scored at the server, and no client's kept state changes."""

import json
import math

import pytest
import torch
from conftest import client_plan, make_reply, node_context, train_reply
from flwr.app import ArrayRecord

import client.app
import client.node_state
from fedlora.adapters import add_to_weights, lora_applied
from fedlora.codec import Codec
from fedlora.config import RunConfig
from fedlora.data import Example
from fedlora.evaluate import score
from fedlora.models import load_model
from fedlora.wire import Plan
from server.evaluation import central_evaluation_on_clients
from strategies import build_strategy
from strategies.evaluation import MAX_EVAL_SHARES, evaluation_messages, example_shards
from strategies.kept import KeptTensors
from server.dry_run import DryRunGrid

CPU = torch.device("cpu")
LABELS = ["negative", "positive"]
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


def test_shares_are_contiguous_near_equal_and_cover_every_example():
    for count, nodes in ((10, 3), (2, 5), (7, 7), (1, 1), (100, 4)):
        shares = example_shards(list(range(count)), nodes)
        assert [x for share in shares for x in share] == list(range(count))
        assert len(shares) == min(count, nodes) and all(shares)
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_a_large_federation_scores_a_few_shares_not_one_per_node():
    examples = [Example(f"review {i}", LABELS[i % 2], i % 2) for i in range(200)]
    plan = Plan(RunConfig(), LABELS, server_round=1, task="evaluate")
    messages = evaluation_messages(plan, ArrayRecord(), list(range(1, 1001)),
                                   KeptTensors(Codec.parse("fp32")), examples)
    assert len(messages) == MAX_EVAL_SHARES < 200
    assert [m.metadata.dst_node_id for m in messages] == list(range(1, MAX_EVAL_SHARES + 1))
    sent = [json.loads(m.content["config"]["eval-examples"]) for m in messages]
    assert [row[0] for share in sent for row in share] == [e.prompt for e in examples]
    assert [m.content["config"]["eval-shard"] for m in messages] == list(range(MAX_EVAL_SHARES))


class ClientsInThisProcess(DryRunGrid):
    """A Grid whose nodes answer at once with the real ClientApp (``broken``: an error)."""

    def __init__(self, contexts, broken=()):
        super().__init__(sorted(contexts))
        self.contexts, self.broken, self.replies = contexts, set(broken), []

    def push_messages(self, messages):
        ids = []
        for message in messages:
            node = message.metadata.dst_node_id
            reply = (make_reply(node, error="the actor died") if node in self.broken
                     else client.app.evaluate(message, self.contexts[node]))
            ids.append(reply.metadata.reply_to_message_id)
            self.replies.append(reply)
        return ids

    def pull_messages(self, ids):
        replies, self.replies = self.replies, []
        return replies


def test_pooled_shares_equal_the_servers_evaluation_and_a_lost_share_is_scored_there(tiny_model_dir):
    config = RunConfig.from_dict({"strategy": "fedex", "model": str(tiny_model_dir), "rank": 4,
                                  "num-clients": 3, "max-length": 32, "eval-batch-size": 4})
    strategy = build_strategy(config)
    plan = client_plan(config)
    model, tokenizer = load_model(config.model, CPU)
    arrays = strategy.initialize(model)
    strategy.configure_train(1, arrays, plan, DryRunGrid([1, 2, 3]))
    received = arrays.to_torch_state_dict()
    replies = []
    for node in (1, 2, 3):  # one FedEx round, so that the global model has a base delta
        g = torch.Generator().manual_seed(node)
        replies.append(train_reply(node, {k: 0.3 * torch.randn(v.shape, generator=g)
                                          for k, v in received.items()}, 10 * node))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert strategy.kept.base_delta
    words = "a the movie film is good bad great awful fun boring not very plot actors".split()
    examples = [Example(f"{words[i % 15]} {words[(3 * i) % 15]} film", LABELS[i % 2], i % 2)
                for i in range(11)]

    state, rank, alpha = strategy.peft_adapter(arrays)
    add_to_weights(model, strategy.kept.base_delta)
    with lora_applied(model, state, rank, alpha, ["q_proj", "v_proj"]) as evaluated:
        def here(share):
            return score(evaluated, tokenizer, share, LABELS, batch_size=4, max_length=32, device=CPU)

        expected = here(examples)
        contexts = {node: node_context(node, 3) for node in (1, 2, 3)}
        scored_here = []
        pooled = central_evaluation_on_clients(
            ClientsInThisProcess(contexts, broken={2}), strategy, arrays, plan, 1, 5.0,
            examples, 2, lambda share: scored_here.append(len(share)) or here(share))
    assert scored_here == [4]  # node 2's share (examples 4 to 7) was scored at the server
    assert pooled.examples == 11 and pooled.predicted_counts == expected.predicted_counts
    assert pooled.correct_counts == expected.correct_counts
    assert math.isclose(pooled.loss_sum, expected.loss_sum, rel_tol=1e-5)
    for context in contexts.values():  # the whole base delta was for that evaluation only
        assert client.node_state.BASE_DELTA_VERSION not in context.state
