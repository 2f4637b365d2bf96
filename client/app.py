"""The Flower ClientApp: a generic executor of the plan the server sends.

It knows no method by name. The plan (the message's ConfigRecord) says which model,
data and adapter to use and how to train; the ArrayRecord holds the global adapter.
The client trains locally and replies with its adapter and metrics.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedlora.adapters import adapter_state, attach_lora, load_adapter_state
from fedlora.config import RunConfig
from fedlora.data import client_examples, load_task
from fedlora.models import load_model, pick_device
from fedlora.train import train_local

app = ClientApp()


def plan_to_config(plan) -> RunConfig:
    """The RunConfig inside a plan (a plan also carries keys such as ``server-round``)."""
    keys = set(RunConfig.keys())
    return RunConfig.from_dict({k: v for k, v in plan.items() if k in keys})


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Attach the global adapter to the base model, train on this node's data, reply."""
    plan = msg.content["config"]
    config = plan_to_config(plan)
    server_round = int(plan["server-round"])
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    device = pick_device(str(context.node_config.get("device", config.device)))

    model, tokenizer = load_model(config.model, device)
    adapter = attach_lora(model, config.rank, config.alpha, config.target_module_list, config.seed)
    load_adapter_state(adapter, msg.content["arrays"].to_torch_state_dict())
    examples = client_examples(load_task(config), config, partition_id, num_partitions)
    stats = train_local(
        adapter,
        tokenizer,
        examples,
        steps=config.local_steps,
        batch_size=config.batch_size,
        lr=config.lr,
        max_length=config.max_length,
        seed=config.seed + 1000 * server_round + partition_id,
        device=device,
    )
    metrics = MetricRecord(
        {
            "num-examples": len(examples),
            "train-loss": stats["train_loss"],
            "train-seconds": stats["train_seconds"],
        }
    )
    reply = RecordDict({"arrays": ArrayRecord(adapter_state(adapter)), "metrics": metrics})
    del adapter, model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Message(content=reply, reply_to=msg)
