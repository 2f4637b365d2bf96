"""The Flower ClientApp: a generic executor of the plan the server sends.

It knows adapter kinds (peft LoRA, LoRA-SB), not methods. Its data is the node-config
``data-file``, else its file of ``--client-data``, else its partition of ``--dataset``;
under federated evaluation a seeded slice of it is held out, never trained on.

A train message carries:

- ``config``: the plan: the run config, plus ``server-round``, ``task`` ("train" or
  "gradient", with ``gradient-examples`` and ``gradient-codec``), ``adapter``,
  ``trainable`` (which adapter tensors to train and upload), ``upload`` ("delta":
  trained minus received, or "weights"), ``upload-codec``, ``kept-batches``,
  ``base-delta-version``, ``aggregated-round`` (the last round whose reply from this node
  the server aggregated) and ``label-words`` (the run's label set, JSON); for clients of
  several ranks on one global LoRA, ``truncate-to-rank`` (load only the leading
  components the client's rank holds) and ``lora-scale`` (alpha = scale * rank); and
  ``personal`` (adapter tensors the client trains and keeps in its node state for the
  whole run, never uploaded: each client's own part of a personalised adapter);
- ``arrays`` and ``codec``: global adapter tensors to load (any subset of the adapter's),
  encoded by the codec the ``codec`` header names (fedlora.codec);
- ``keep``: tensors to keep for the whole run, in numbered batches: ``<i>/frozen/<key>``
  (loaded into every adapter, never trained) and ``<i>/merge/<key>`` (LoRA factors whose
  product is merged into the base weights, in batch order);
- ``base-delta`` and ``base-delta-codec`` where the plan's ``base-delta-version`` is
  ahead of the node's: a dense change to the base weights (by module path) that adds
  to the node's (or, with ``from`` 0 in the header, replaces it); it is applied before
  the merges (strategies/kept.py).

Kept tensors live in Flower's per-node ``context.state``, which outlives a message even in
deployment, where each message starts a fresh process. An evaluate message carries the
plan, the global adapter as a PEFT LoRA and, like a train message, the base delta where
the node's is behind; the reply holds the evaluation counts
(fedlora.evaluate.Scores) of the held-out slice. Central evaluation in the clients'
processes sends instead a share of the server's examples (plan ``eval-examples``, JSON
``[prompt, answer, label]`` rows, and ``eval-shard``, echoed in the reply) with the whole
base delta, used for that evaluation only.

A reply carries, besides tensors and metrics, the ConfigRecord ``client`` with
``client-id``: the node-config value of that name, else the partition id. It is the
identity the server keys this client's privacy accountant by, and it is what the client
says it is.
"""

from __future__ import annotations

import json
from contextlib import nullcontext

import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import faults
from fedlora.adapters import (
    add_to_weights,
    adapter_state,
    attach_lora,
    attach_lora_sb,
    load_adapter_state,
    lora_applied,
    lora_sb_state,
    merge_lora,
    target_linears,
)
from fedlora.aggregate import truncate_lora
from fedlora.codec import Codec, decode_payload, encode_payload
from fedlora.config import RunConfig
from fedlora.data import Example, local_examples
from fedlora.errors import FedLoraError
from fedlora.evaluate import score
from fedlora.models import borrowed_model, pick_device
from fedlora.privacy import Privacy
from fedlora.seeds import stream_seed
from fedlora.train import train_local, weight_gradients

app = ClientApp()
KEPT = "fedlora-kept"  # the context.state record that holds kept tensors
PERSONAL = "fedlora-personal"  # trained tensors that never leave the client (plan "personal")
BASE_DELTA = "fedlora-base-delta"  # the dense change to the base weights, by module path
BASE_DELTA_VERSION = "fedlora-base-delta-version"  # how many increments it sums
RUN = "fedlora-run"  # the run the node state belongs to
RESIDUAL = "fedlora-residual"  # the error-feedback residual, for either fate of the last reply
RESIDUAL_ROUND = "fedlora-residual-round"  # and the round of that reply


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


def held_base_delta(context: Context, content: RecordDict, plan) -> dict[str, torch.Tensor]:
    """The dense change to the base weights this node holds once the message's part of it
    is added (plan ``base-delta-version``; none at version 0), by module path.

    Raises FedLoraError if the message builds on a version the node does not hold (it
    lost its state): the server then sends the whole delta next time.
    """
    version = int(plan.get("base-delta-version", 0))
    stored, held = context.state.get(BASE_DELTA), context.state.get(BASE_DELTA_VERSION)
    held = int(held["version"]) if isinstance(held, ConfigRecord) else 0
    delta = stored.to_torch_state_dict() if isinstance(stored, ArrayRecord) and held else {}
    sent = sent_base_delta(content)
    if sent is not None:
        start, sent = sent
        if start not in (0, held):
            raise FedLoraError(f"the base delta sent builds on version {start}, this client holds "
                               f"version {held}; the server resends it whole")
        delta = sent if start == 0 else {path: delta[path] + sent[path] for path in sent}
        held = version
        context.state[BASE_DELTA] = ArrayRecord(delta)
        context.state[BASE_DELTA_VERSION] = ConfigRecord({"version": held})
    if held != version:
        raise FedLoraError(f"this client holds base delta version {held}, the plan says {version}; "
                           "the server resends it whole")
    return delta


def sent_base_delta(content: RecordDict) -> tuple[int, dict[str, torch.Tensor]] | None:
    """The base delta a message carries, decoded, and the version it builds on (0: it is
    the whole delta); None when it carries none."""
    if not isinstance(content.get("base-delta"), ArrayRecord):
        return None
    header = dict(content["base-delta-codec"])
    start = int(header.pop("from"))
    return start, decode_payload({k: a.numpy() for k, a in content["base-delta"].items()}, header)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the plan: train an adapter (or estimate gradients) on this node's data, on the
    base model this process loaded once (and gets back as loaded after each message)."""
    plan = msg.content["config"]
    config = plan_to_config(plan)
    device = pick_device(str(context.node_config.get("device", config.device)))
    partition_id = int(context.node_config["partition-id"])
    faults.inject(partition_id, int(plan["server-round"]), str(plan.get("name", "")))  # tests only
    join_run(context, plan)
    with borrowed_model(config.model, device, config.dtype) as (model, tokenizer):
        return run_plan(msg, context, config, model, tokenizer, device)


def run_plan(msg: Message, context: Context, config: RunConfig, model, tokenizer,
             device: torch.device) -> Message:
    """The reply to a train message, computed on ``model`` (which it may change: adapters,
    merges; ``train`` restores it)."""
    plan = msg.content["config"]
    partition_id = int(context.node_config["partition-id"])
    client_id = client_identity(context)
    server_round = int(plan["server-round"])
    frozen, merges = keep_tensors(context, msg.content.get("keep"), int(plan["kept-batches"]))
    base_delta = held_base_delta(context, msg.content, plan)
    examples, _ = node_examples(plan, config, context)
    if plan["task"] == "gradient":
        arrays = weight_gradients(
            model, tokenizer, examples[: int(plan["gradient-examples"])],
            target_linears(model, config.target_module_list),
            batch_size=config.batch_size, max_length=config.max_length, device=device,
        )
        metrics = {"num-examples": min(len(examples), int(plan["gradient-examples"]))}
        payload, header = encode_payload(arrays, Codec.parse(str(plan["gradient-codec"])))
        return reply(msg, payload, header, metrics, client_id, device)

    add_to_weights(model, base_delta)  # FedEx-LoRA's residuals
    for merge in merges:  # FLoRA: the global base is the base plus every round's stack
        merge_lora(model, merge)
    received = decode_payload(
        {k: a.numpy() for k, a in msg.content["arrays"].items()}, dict(msg.content["codec"])
    )
    rank = client_rank(config, context.node_config, partition_id)
    if plan.get("truncate-to-rank", False):  # global factors of a higher rank: ours lead
        received = truncate_lora(received, rank)
    # One scale for every rank (HetLoRA, FlexLoRA), else peft's alpha / rank.
    alpha = float(plan["lora-scale"]) * rank if "lora-scale" in plan else config.alpha
    if plan["adapter"] == "lorasb":
        adapted = attach_lora_sb(model, {**frozen, **received}, config.target_module_list)
    elif plan["adapter"] == "lora":  # a fresh LoRA: what it holds is overwritten by what was
        # sent, except for FLoRA, which trains a new one each round
        seed = stream_seed(config.seed, server_round, partition_id, "lora-init")
        adapted = attach_lora(model, rank, alpha, config.target_module_list, seed)
        load_adapter_state(adapted, {**frozen, **received, **personal_tensors(context)},
                           partial=True)
    else:
        raise FedLoraError(f"unknown adapter '{plan['adapter']}'; valid choices: lora, lorasb")
    trainable = name_markers(plan["trainable"])
    personal = name_markers(plan.get("personal", ""))
    for name, parameter in adapted.named_parameters():
        parameter.requires_grad_(any(t in name for t in trainable))

    dpsgd = None  # user-level DP is the server's alone (and finding its noise takes a second)
    if config.dp == "sample":
        privacy = Privacy.from_config(config)
        dpsgd = privacy.client_dpsgd(config, len(examples), server_round, partition_id)
    stats = train_local(
        adapted, tokenizer, examples,
        steps=config.local_steps, batch_size=config.batch_size, lr=config.lr,
        max_length=config.max_length, device=device, dpsgd=dpsgd,
        gradient_checkpointing=config.gradient_checkpointing,
        seed=stream_seed(config.seed, server_round, partition_id, "batches"),
    )
    state = lora_sb_state(adapted) if plan["adapter"] == "lorasb" else adapter_state(adapted)
    if personal:  # kept for this client's next message, never uploaded
        context.state[PERSONAL] = ArrayRecord(
            {k: v for k, v in state.items() if any(t in k for t in personal)})
    upload = {k: v for k, v in state.items()
              if any(t in k for t in trainable) and not any(t in k for t in personal)}
    if plan["upload"] == "delta":  # what training changed, relative to what was received
        upload = {k: v - received[k] for k, v in upload.items()}
    metrics = train_metrics(len(examples), stats, rank, dpsgd, config.local_steps)
    codec = Codec.parse(config.upload_codec)
    if plan.get("error-feedback", False):
        payload, header = encode_with_feedback(
            context, upload, codec, server_round, int(plan.get("aggregated-round", 0))
        )
    else:
        payload, header = encode_payload(upload, codec)
    return reply(msg, payload, header, metrics, client_id, device)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter the message carries (a PEFT LoRA; none: the base model)
    on this node's held-out slice; reply with the counts every metric is computed from."""
    plan = msg.content["config"]
    config = plan_to_config(plan)
    device = pick_device(str(context.node_config.get("device", config.device)))
    join_run(context, plan)
    central = "eval-examples" in plan  # the server's examples, scored on this process's model
    if central:
        examples = [Example(*e) for e in json.loads(str(plan["eval-examples"]))]
        sent = sent_base_delta(msg.content)  # the whole delta, for this evaluation only
        base_delta = sent[1] if sent else {}
    else:
        _, examples = node_examples(plan, config, context)
        if not examples:
            raise FedLoraError("federated evaluation asked, but this client holds no examples out")
        base_delta = held_base_delta(context, msg.content, plan)
    state = {k: torch.from_numpy(a.numpy().copy()) for k, a in msg.content["arrays"].items()}
    with borrowed_model(config.model, device, config.dtype) as (model, tokenizer):
        add_to_weights(model, base_delta)
        with lora_applied(model, state, int(plan["eval-rank"]), float(plan["eval-alpha"]),
                          config.target_module_list) if state else nullcontext(model) as evaluated:
            if state and not central and name_markers(plan.get("personal", "")):  # its own part
                load_adapter_state(evaluated, personal_tensors(context), partial=True)
            scores = score(evaluated, tokenizer, examples, label_words(plan),
                           batch_size=config.eval_batch_size, max_length=config.max_length,
                           device=device, max_new_tokens=config.eval_max_new_tokens)
    metrics = {**scores.to_record(), **({"eval-shard": int(plan["eval-shard"])} if central else {})}
    content = RecordDict({
        "metrics": MetricRecord(metrics),
        "client": ConfigRecord({"client-id": client_identity(context)}),
    })
    return Message(content=content, reply_to=msg)


def join_run(context: Context, plan) -> None:
    """Node state belongs to one run: a plan that names another (the next strategy of a
    comparison, served by the same simulated nodes) starts from an empty state."""
    name = str(plan.get("name", ""))
    record = context.state.get(RUN)
    if isinstance(record, ConfigRecord) and record.get("name") == name:
        return
    context.state.clear()
    context.state[RUN] = ConfigRecord({"name": name})


def name_markers(names) -> list[str]:
    """``lora_A,lora_B`` as the markers that pick those tensors out of adapter keys."""
    return [f".{name}." for name in str(names).split(",") if name]


def personal_tensors(context: Context) -> dict[str, torch.Tensor]:
    """The tensors this client keeps for itself (plan ``personal``): none before it trained."""
    stored = context.state.get(PERSONAL)
    return stored.to_torch_state_dict() if isinstance(stored, ArrayRecord) else {}


def label_words(plan) -> list[str] | None:
    """The run's label set, as the server sends it (none for prompt/response data)."""
    words = json.loads(str(plan.get("label-words", "null")))
    return words if words else None


def node_examples(plan, config: RunConfig, context: Context):
    """(train, held out) examples of this node: its node-config ``data-file``, else its
    file of ``--client-data``, else its partition of ``--dataset``."""
    partition_id = int(context.node_config["partition-id"])
    data_file = context.node_config.get("data-file")
    if not data_file and config.client_data:
        data_file = config.client_data_list[partition_id]
    return local_examples(config, str(data_file) if data_file else None, partition_id,
                       int(context.node_config["num-partitions"]), label_words(plan))


def client_identity(context: Context) -> str:
    """The node-config ``client-id``, else the partition id."""
    return str(context.node_config.get("client-id", context.node_config["partition-id"]))


def encode_with_feedback(context: Context, update: dict, codec: Codec, server_round: int,
                         aggregated_round: int):
    """Encode the update plus the residual of earlier rounds (error feedback).

    What the server has not aggregated stays in the residual: after any number of rounds,
    the aggregated replies plus the residual equal the sum of the updates. So two
    residuals are kept until the next message says the reply's fate
    (``aggregated_round``): what the codec did not send, if the server aggregated the
    reply, and everything it carried, if the reply was dropped or late.
    """
    residual = feedback_residual(context, aggregated_round)
    total = {k: v + residual[k] if k in residual else v for k, v in update.items()}
    payload, header = encode_payload(total, codec)
    sent = decode_payload(payload, header)
    context.state[RESIDUAL] = ArrayRecord({
        **{f"aggregated/{k}": total[k] - sent[k] for k in total},
        **{f"dropped/{k}": total[k] for k in total},
    })
    context.state[RESIDUAL_ROUND] = ConfigRecord({"round": server_round})
    return payload, header


def feedback_residual(context: Context, aggregated_round: int) -> dict[str, torch.Tensor]:
    """The residual after this node's last reply, given the last round the server
    aggregated a reply of this node in (none before the first reply)."""
    stored, last = context.state.get(RESIDUAL), context.state.get(RESIDUAL_ROUND)
    if not isinstance(stored, ArrayRecord) or not isinstance(last, ConfigRecord):
        return {}
    fate = "aggregated/" if int(last["round"]) == aggregated_round else "dropped/"
    return {k.removeprefix(fate): v for k, v in stored.to_torch_state_dict().items()
            if k.startswith(fate)}


def train_metrics(num_examples: int, stats: dict, rank: int, dpsgd, local_steps: int) -> dict:
    """What a training reply reports: its examples (its weight), the training loss and
    time, its rank, and with DP-SGD what the server's accountant composes."""
    metrics = {
        "num-examples": num_examples,
        "train-loss": stats["train_loss"],
        "train-seconds": stats["train_seconds"],
        "rank": rank,
    }
    if dpsgd is not None:
        metrics.update({"dp-noise": float(dpsgd.noise), "dp-sample-rate": float(dpsgd.sample_rate),
                        "dp-steps": local_steps})
    return metrics


def reply_content(payload: dict, header: dict, metrics: dict, client_id: str) -> RecordDict:
    """A reply's content: the encoded tensors, the codec header, the metrics and the
    client's identity."""
    return RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
        "codec": ConfigRecord(header),
        "metrics": MetricRecord(metrics),
        "client": ConfigRecord({"client-id": client_id}),
    })


def reply(msg: Message, payload: dict, header: dict, metrics: dict, client_id: str,
          device: torch.device) -> Message:
    """The reply to ``msg`` (see reply_content). GPU memory is given back before the
    process waits for the next message."""
    content = reply_content(payload, header, metrics, client_id)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return Message(content=content, reply_to=msg)
