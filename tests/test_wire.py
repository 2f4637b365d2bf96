"""The wire protocol (fedlora/wire.py): the plan a message carries survives the trip, a
malformed one is refused in one line, and a client reads from it only what it needs:
never the server's files."""

import json

import pytest
import torch

import client.app
from conftest import node_context
from fedlora import wire
from fedlora.config import RunConfig
from fedlora.data import Example
from fedlora.errors import FedLoraError
from fedlora.models import load_model
from fedlora.wire import Plan
from server.dry_run import DryRunGrid
from server.preflight import preflight

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


def test_a_plan_survives_the_trip_to_the_client():
    run = RunConfig.from_dict({"strategy": "flora", "rank": 8, "ranks": "8,4", "lr": 0.003,
                               "target-modules": "q_proj,v_proj", "resume": "runs/x"})
    plan = Plan(run, ["negative", "positive"], server_round=3, task="evaluate",
                trainable=("lora_A",), personal=("lora_B",), kept_batches=2,
                base_delta_version=1, lora_scale=2.0, truncate_to_rank=True, eval_rank=8,
                eval_alpha=16.0, aggregated_round=2, eval_shard=1,
                eval_examples=[Example("a good film", " positive", 1)])
    record = plan.to_record()
    assert "resume" not in record  # the server's own
    assert record["trainable"] == "lora_A" and record["eval-shard"] == 1
    back = Plan.from_record(record)
    assert back == Plan(**{**vars(plan), "run": RunConfig(**{**vars(run), "resume": ""})})


def test_a_field_left_none_is_not_sent():
    record = Plan(RunConfig(), None, server_round=1, task="train").to_record()
    assert not {"lora-scale", "truncate-to-rank", "eval-rank", "aggregated-round"} & set(record)
    assert json.loads(record["label-words"]) is None


@pytest.mark.parametrize("change, message", [
    ({"task": "dance"}, "the plan's task 'dance' is unknown; valid choices: train, gradient, evaluate"),
    ({"server-round": "3"}, "the plan's 'server-round' must be a int, got '3'"),
    ({"kept-batches": True}, "the plan's 'kept-batches' must be a int, got True"),
    ({"lora-scale": "2"}, "the plan's 'lora-scale' must be a float, got '2'"),
    ({"rank": -2}, "--rank must be in [1, 4096], got -2"),
    ({"task": None}, "the plan has no 'task'"),
    ({"eval-examples": '[["a prompt"]]'}, "the plan's 'eval-examples' is no JSON list of [prompt, answer, label, turns] rows"),
    ({"label-words": "[neg"}, "the plan's 'label-words' is not JSON"),
])
def test_a_malformed_plan_is_refused_in_one_line(change, message):
    record = dict(Plan(RunConfig(), None, server_round=1, task="train").to_record())
    record = {k: v for k, v in {**record, **change}.items() if v is not None}  # None: left out
    with pytest.raises(FedLoraError) as err:
        Plan.from_record(record)
    assert str(err.value) == message or str(err.value).startswith(message)


def write_reviews(path, count):
    path.parent.mkdir(parents=True, exist_ok=True)
    words = ("good great fun", "bad awful boring")
    path.write_text("".join(json.dumps({"text": f"a {words[i % 2]} movie", "label": i % 2}) + "\n"
                            for i in range(count)))


def test_a_client_without_the_servers_evaluation_file_trains_and_evaluates(tmp_path, tiny_model_dir):
    # A deployment: the server holds an evaluation file, each client its own data file.
    server_file, client_file = tmp_path / "server" / "eval.jsonl", tmp_path / "client" / "own.jsonl"
    write_reviews(server_file, 12)
    write_reviews(client_file, 40)
    strategy, config = preflight(RunConfig.from_dict({
        "model": str(tiny_model_dir), "client-data": "a.jsonl,b.jsonl", "eval-dataset": str(server_file),
        "evaluation": "both", "label-names": "0=negative,1=positive", "rank": 4, "local-steps": 2,
        "batch-size": 4, "max-length": 32}))
    plan = wire.run_record(config, ["negative", "positive"])
    arrays = strategy.initialize(load_model(config.model, CPU)[0])
    server_file.unlink()  # not on the client's machine
    context = node_context(1, 2)
    context.node_config["data-file"] = str(client_file)

    [message] = [m for m in strategy.configure_train(1, arrays, plan, DryRunGrid()) if m.metadata.dst_node_id == 1]
    reply = client.app.train(message, context)
    assert not reply.has_error() and reply.content["metrics"]["num-examples"] == 36  # 4 held out
    [evaluation] = [m for m in strategy.configure_evaluate(1, arrays, plan, DryRunGrid())
                    if m.metadata.dst_node_id == 1]
    scores = client.app.evaluate(evaluation, context).content["metrics"]
    assert scores["examples"] == 4


def test_an_authenticated_node_is_known_by_its_node_id_not_its_word():
    from flwr.app import ConfigRecord, RecordDict

    from conftest import make_reply
    from fedlora.privacy import Privacy

    reply = make_reply(7, RecordDict({wire.CLIENT: ConfigRecord({wire.CLIENT_ID: "hospital-a"})}))
    assert wire.client_identity(reply) == "hospital-a"
    assert wire.client_identity(reply, node_identities=True) == "node-7"
    config = RunConfig(dp="sample", supernode_auth=True)
    assert Privacy.from_config(config).node_identities
    assert not Privacy.from_config(RunConfig(dp="sample")).node_identities
