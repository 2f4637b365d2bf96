"""The Flower ClientApp: a generic executor of the plan the server sends.

It knows adapter kinds (peft LoRA, LoRA-SB), not methods. A message carries:

- ``config``: the plan: the run config, plus ``server-round``, ``task`` ("train" or
  "gradient"), ``adapter``, ``trainable`` (which adapter tensors to train and upload),
  ``upload`` ("delta": trained minus received, or "weights"), ``upload-codec`` and
  ``kept-batches``;
- ``arrays`` and ``codec``: global adapter tensors to load (any subset of the adapter's),
  encoded by the codec the ``codec`` header names (fedlora.codec);
- ``keep``: tensors to keep for the whole run, in numbered batches: ``<i>/frozen/<key>``
  (loaded into every adapter, never trained) and ``<i>/merge/<key>`` (LoRA factors whose
  product is merged into the base weights, in batch order).

Kept tensors live in Flower's per-node ``context.state``, which outlives a message even in
deployment, where each message starts a fresh process.
"""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import faults
from fedlora.adapters import (
    adapter_state,
    attach_lora,
    attach_lora_sb,
    load_adapter_state,
    lora_sb_state,
    merge_lora,
    target_linears,
)
from fedlora.codec import Codec, decode_payload, encode_payload
from fedlora.config import RunConfig
from fedlora.data import client_examples, load_task
from fedlora.errors import FedLoraError
from fedlora.models import load_model, pick_device
from fedlora.privacy import Privacy
from fedlora.train import train_local, weight_gradients

app = ClientApp()
KEPT = "fedlora-kept"  # the context.state record that holds kept tensors
RESIDUAL = "fedlora-residual"  # and the one that holds the error-feedback residual


def plan_to_config(plan) -> RunConfig:
    """The RunConfig inside a plan (a plan also carries keys such as ``server-round``)."""
    keys = set(RunConfig.keys())
    return RunConfig.from_dict({k: v for k, v in plan.items() if k in keys})


def client_rank(config: RunConfig, node_config, partition_id: int) -> int:
    """This client's LoRA rank: its ``rank`` node setting, else ``--ranks`` cycled by
    partition id (which is ``--rank`` when ``--ranks`` is not given)."""
    if "rank" in node_config:
        return int(node_config["rank"])
    ranks = config.rank_list
    return ranks[partition_id % len(ranks)]


def keep_tensors(context: Context, message_keep: ArrayRecord | None, batches: int):
    """Add the message's kept tensors to the node's store; return (frozen, merges).

    Raises FedLoraError if the store lacks a batch the plan says exists (the node lost its
    state): the server then sends everything again next time.
    """
    store = context.state.get(KEPT)
    if not isinstance(store, ArrayRecord):
        store = ArrayRecord()
    for key, value in (message_keep or {}).items():
        store[key] = value
    context.state[KEPT] = store
    held = {int(key.split("/", 1)[0]) for key in store}
    missing = sorted(set(range(batches)) - held)
    if missing:
        raise FedLoraError(f"this client lacks kept batches {missing}; the server resends them")
    frozen, merges = {}, [{} for _ in range(batches)]
    for key, array in store.items():
        batch, kind, name = key.split("/", 2)
        tensor = torch.from_numpy(array.numpy().copy())
        if kind == "frozen":
            frozen[name] = tensor
        elif int(batch) < batches:
            merges[int(batch)][name] = tensor
    return frozen, merges


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the plan: train an adapter (or estimate gradients) on this node's data."""
    plan = msg.content["config"]
    config = plan_to_config(plan)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    device = pick_device(str(context.node_config.get("device", config.device)))
    faults.inject(partition_id, int(plan["server-round"]))  # only when a test asks for it
    frozen, merges = keep_tensors(context, msg.content.get("keep"), int(plan["kept-batches"]))

    model, tokenizer = load_model(config.model, device)
    examples = client_examples(load_task(config), config, partition_id, num_partitions)
    if plan["task"] == "gradient":
        arrays = weight_gradients(
            model, tokenizer, examples[: int(plan["gradient-examples"])],
            target_linears(model, config.target_module_list),
            batch_size=config.batch_size, max_length=config.max_length, device=device,
        )
        metrics = {"num-examples": min(len(examples), int(plan["gradient-examples"]))}
        return reply(msg, *encode_payload(arrays, Codec.parse(config.upload_codec)), metrics, device)

    for merge in merges:  # FLoRA: the global base is the base plus every round's stack
        merge_lora(model, merge)
    received = decode_payload(
        {k: a.numpy() for k, a in msg.content["arrays"].items()}, dict(msg.content["codec"])
    )
    rank = client_rank(config, context.node_config, partition_id)
    if plan["adapter"] == "lorasb":
        adapted = attach_lora_sb(model, {**frozen, **received}, config.target_module_list)
    elif plan["adapter"] == "lora":
        seed = int(plan.get("init-seed", config.seed)) + partition_id
        adapted = attach_lora(model, rank, config.alpha, config.target_module_list, seed)
        load_adapter_state(adapted, {**frozen, **received}, partial=True)
    else:
        raise FedLoraError(f"unknown adapter '{plan['adapter']}'; valid choices: lora, lorasb")
    trainable = [f".{name}." for name in str(plan["trainable"]).split(",")]
    for name, parameter in adapted.named_parameters():
        parameter.requires_grad_(any(t in name for t in trainable))

    seed = 1000 * int(plan["server-round"]) + partition_id  # this client, this round
    privacy = Privacy.from_config(config)
    dpsgd = privacy.client_dpsgd(config, len(examples), seed) if privacy and privacy.mode == "sample" else None
    stats = train_local(
        adapted, tokenizer, examples,
        steps=config.local_steps, batch_size=config.batch_size, lr=config.lr,
        max_length=config.max_length, seed=config.seed + seed, device=device, dpsgd=dpsgd,
    )
    state = lora_sb_state(adapted) if plan["adapter"] == "lorasb" else adapter_state(adapted)
    upload = {k: v for k, v in state.items() if any(t in k for t in trainable)}
    if plan["upload"] == "delta":  # what training changed, relative to what was received
        upload = {k: v - received[k] for k, v in upload.items()}
    metrics = {
        "num-examples": len(examples),
        "train-loss": stats["train_loss"],
        "train-seconds": stats["train_seconds"],
        "rank": rank,
    }
    if dpsgd is not None:  # what the server's accountant composes
        metrics.update({"dp-noise": float(dpsgd.noise), "dp-sample-rate": float(dpsgd.sample_rate),
                        "dp-steps": config.local_steps})
    codec = Codec.parse(config.upload_codec)
    if plan.get("error-feedback", False):
        payload, header = encode_with_feedback(context, upload, codec)
    else:
        payload, header = encode_payload(upload, codec)
    return reply(msg, payload, header, metrics, device)


def encode_with_feedback(context: Context, update: dict, codec: Codec):
    """Encode the update plus the residual kept from earlier rounds, and keep as the new
    residual what the codec did not send: after any number of rounds, everything sent plus
    the residual equals the sum of the updates (error feedback)."""
    stored = context.state.get(RESIDUAL)
    residual = stored.to_torch_state_dict() if isinstance(stored, ArrayRecord) else {}
    total = {k: v + residual[k] if k in residual else v for k, v in update.items()}
    payload, header = encode_payload(total, codec)
    sent = decode_payload(payload, header)
    context.state[RESIDUAL] = ArrayRecord({k: total[k] - sent[k] for k in total})
    return payload, header


def reply(msg: Message, payload: dict, header: dict, metrics: dict, device: torch.device) -> Message:
    """The reply: the encoded tensors, the codec header and the metrics. GPU memory is given
    back before the process waits for the next message."""
    content = RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
        "codec": ConfigRecord(header),
        "metrics": MetricRecord(metrics),
    })
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Message(content=content, reply_to=msg)
