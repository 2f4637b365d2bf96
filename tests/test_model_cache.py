"""One base model per client process: clients served in turn by one process, on the cached
model, reply exactly as clients that load the model afresh for every message."""

from contextlib import contextmanager

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict

import client.app
import client.node_state
from client.node_state import join_run

from fedlora.config import RunConfig
from fedlora.models import borrowed_model, load_model
from strategies import build_strategy
from server.dry_run import DryRunGrid

CPU = torch.device("cpu")
pytestmark = pytest.mark.usefixtures("task_identity")  # conftest: messages need a run


@contextmanager
def fresh_model(name, device, dtype, quantize):
    yield load_model(name, device, dtype, quantize)


def run_rounds(config: RunConfig, rounds: int = 2) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """Every reply's arrays, by (round, node), of ``rounds`` rounds of two clients served
    one after the other by this process, through the real ClientApp handler and strategy."""
    strategy = build_strategy(config)
    plan = ConfigRecord({k: v for k, v in config.to_dict().items() if k != "resume"})
    contexts = {node: Context(run_id=1, node_id=node, state=RecordDict(), run_config={},
                              node_config={"partition-id": node - 1, "num-partitions": 2})
                for node in (1, 2)}
    model, _ = load_model(config.model, CPU, config.dtype, config.quantize)
    arrays = strategy.initialize(model)
    payloads = {}

    def serve(server_round, messages):  # in node order: Flower samples nodes in random order
        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        replies = [client.app.train(m, contexts[m.metadata.dst_node_id]) for m in messages]
        for r in replies:
            arrays = {k: a.numpy() for k, a in r.content["arrays"].items()}
            payloads[server_round, r.metadata.src_node_id] = arrays
        return replies

    init = strategy.configure_init(arrays, plan, DryRunGrid())
    if init:
        arrays = strategy.aggregate_init(serve(0, init))
    for server_round in range(1, rounds + 1):
        replies = serve(server_round, strategy.configure_train(server_round, arrays, plan, DryRunGrid()))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert not strategy.dropped, strategy.dropped
    return payloads


@pytest.mark.parametrize("values", [
    {"strategy": "fedavg"},  # peft LoRA, A and B received
    {"strategy": "ffa"},  # a kept frozen A
    {"strategy": "flora", "ranks": "4,2"},  # merged stacks, fresh LoRAs of two ranks
    {"strategy": "fedsb"},  # the gradient round, then LoRA-SB layers
    {"strategy": "fedavg", "dp": "sample", "dp-noise-seed": 1},  # Opacus' hooks
    {"strategy": "flora", "ranks": "4,2", "quantize": "nf4"},  # dense copies of 4-bit layers
    {"strategy": "fedsb", "quantize": "nf4"},  # gradients of dense copies, LoRA-SB on 4 bits
    {"strategy": "fedex", "quantize": "nf4"},  # a base delta on 4 bits
    {"strategy": "fedavg", "quantize": "int8"},  # peft on 8-bit layers
], ids=["fedavg", "ffa", "flora", "fedsb", "dpsgd", "flora-nf4", "fedsb-nf4", "fedex-nf4",
        "fedavg-int8"])
def test_a_cached_model_serves_clients_in_turn_exactly_as_fresh_loads(tiny_model_dir, values, monkeypatch):
    config = RunConfig.from_dict({
        "model": str(tiny_model_dir), "num-clients": 2, "rank": 4, "local-steps": 2,
        "batch-size": 4, "max-length": 32, "lr": 0.05, "fedsb-init-examples": 8, **values,
    })
    cached = run_rounds(config)
    with borrowed_model(config.model, CPU, config.dtype, config.quantize) as (model, _):
        loaded = load_model(config.model, CPU, config.dtype, config.quantize)[0]  # vs the cache
        assert [type(m) for m in model.modules()] == [type(m) for m in loaded.modules()]
        after = model.state_dict()
        for key, value in loaded.state_dict().items():
            assert torch.equal(after[key], value), key
        assert not any(p.requires_grad for p in model.parameters())
        assert not hasattr(model, "peft_config")
    monkeypatch.setattr(client.app, "borrowed_model", fresh_model)
    fresh = run_rounds(config)
    assert cached.keys() == fresh.keys() and len(cached) >= 4
    for message, got in cached.items():
        assert got.keys() == fresh[message].keys()
        for key in got:
            assert np.array_equal(got[key], fresh[message][key]), (message, key)


def test_node_state_starts_afresh_when_the_plan_names_another_run():
    # One simulation serves every strategy of a comparison: what a node kept for one
    # (FFA's frozen A, FedSA's own B) must not leak into the next.
    from flwr.app import ArrayRecord

    context = Context(run_id=1, node_id=1, state=RecordDict(), run_config={},
                      node_config={"partition-id": 0, "num-partitions": 1})
    join_run(context, "cmp/ffa")
    context.state[client.node_state.KEPT] = ArrayRecord({"0/frozen/x": torch.ones(2)})
    join_run(context, "cmp/ffa")  # the same run: kept
    assert client.node_state.KEPT in context.state
    join_run(context, "cmp/fedsb")
    assert list(context.state.keys()) == [client.node_state.RUN]
