"""The Flower ClientApp: a generic executor of the plan the server sends.

It knows adapter kinds (peft LoRA, LoRA-SB), not methods. Its data is the node-config
``data-file``, else its file of ``--client-data``, else its partition of ``--dataset``;
under federated evaluation a seeded slice of it is held out, never trained on.

Every message carries a plan (``fedlora.wire.Plan``: the run's settings and this round's
task), which says what to attach, train and upload; fedlora/wire.py lists every record
and key of the messages and replies. A train message also carries the global adapter
tensors to load (any subset of the adapter's, encoded by the codec its header names), the
tensors to keep for the whole run that this node lacks (``frozen`` ones loaded into every
adapter, ``merge`` ones whose product is merged into the base weights, in batch order)
and, where the node's is behind, the base delta (a dense change to the base weights,
applied before the merges). What the node keeps between messages is its node state
(client/node_state.py).

An evaluate message carries the plan, the global adapter as a PEFT LoRA and, like a train
message, the base delta where the node's is behind; the reply holds the evaluation counts
(fedlora.evaluate.Scores) of the held-out slice. Central evaluation in the clients'
processes sends instead a share of the server's examples (plan ``eval-examples`` and
``eval-shard``, echoed in the reply) with the whole base delta, used for that evaluation
only.

A reply names its client by ``client-id``: the node-config value of that name, else the
partition id. It is the identity the server keys this client's privacy accountant by,
and it is what the client says it is.
"""

from __future__ import annotations

import ctypes
import sys
from contextlib import nullcontext

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS

from client import faults
from client.node_state import (
    encode_with_feedback,
    held_base_delta,
    join_run,
    keep_personal,
    keep_tensors,
    personal_tensors,
    sent_base_delta,
)
from fedlora import wire
from fedlora.adapters import (
    add_to_weights,
    adapter_state,
    attach_lora,
    attach_lora_sb,
    differentiable_linears,
    load_adapter_state,
    lora_applied,
    lora_sb_state,
    merge_lora,
)
from fedlora.aggregate import pad_lora, truncate_lora
from fedlora.codec import Codec, decode_payload, encode_payload
from fedlora.data import local_examples
from fedlora.errors import FedLoraError
from fedlora.evaluate import score
from fedlora.models import borrowed_model, pick_device
from fedlora.prompts import fit_examples
from fedlora.privacy import Privacy, clip_update
from fedlora.seeds import stream_seed
from fedlora.train import train_local, weight_gradients
from fedlora.secure_aggregation import MAX_WEIGHT
from fedlora.wire import Plan, evaluation_content, reply_content, secure_reply_content, train_metrics


def secure_mod(msg: Message, context: Context, call_next) -> Message:
    """Flower's SecAgg+ client side (``secaggplus_mod``) for the messages of a secure round
    (they carry its configs); every other message goes straight to the app."""
    if RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[secure_mod])


def client_rank(plan: Plan, node_config, partition_id: int) -> int:
    """This client's LoRA rank: its ``rank`` node setting, else ``--ranks`` cycled by
    partition id (which is ``--rank`` when ``--ranks`` is not given)."""
    if "rank" in node_config:
        return int(node_config["rank"])
    ranks = plan.run.rank_list
    return ranks[partition_id % len(ranks)]


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Run the plan: train an adapter (or estimate gradients) on this node's data, on the
    base model this process loaded once (and gets back as loaded after each message)."""
    plan = Plan.from_record(msg.content[wire.CONFIG])
    config = plan.run
    device = pick_device(str(context.node_config.get("device", config.device)))
    partition_id = int(context.node_config["partition-id"])
    faults.inject(partition_id, plan.server_round, config.name)  # tests only
    join_run(context, config.name)
    with borrowed_model(config.model, device, config.dtype, config.quantize) as (model, tokenizer):
        return run_plan(msg, context, plan, model, tokenizer, device)


def run_plan(msg: Message, context: Context, plan: Plan, model, tokenizer,
             device: torch.device) -> Message:
    """The reply to a train message, computed on ``model`` (which it may change: adapters,
    merges; ``train`` restores it)."""
    config = plan.run
    partition_id = int(context.node_config["partition-id"])
    client_id = node_client_id(context)
    frozen, merges = keep_tensors(context, msg.content.get(wire.KEEP), plan.kept_batches)
    base_delta = held_base_delta(context, msg.content, plan.base_delta_version)
    examples, _, fitted = node_examples(plan, context, tokenizer)
    if plan.task == "gradient":
        arrays = weight_gradients(
            model, tokenizer, examples[: plan.gradient_examples],
            differentiable_linears(model, config.target_module_list),
            batch_size=config.batch_size, max_length=config.max_length, device=device,
            chat=config.chat_template,
        )
        metrics = {wire.NUM_EXAMPLES: min(len(examples), plan.gradient_examples)}
        if config.secure_aggregation:  # the sign codec's votes, +1 for g >= 0, summed masked
            votes = {k: torch.where(g >= 0, 1.0, -1.0) for k, g in arrays.items()}
            return secure_reply(msg, plan, votes, MAX_WEIGHT, metrics, client_id, device)
        payload, header = encode_payload(arrays, Codec.parse(str(plan.gradient_codec)))
        return reply(msg, payload, header, metrics, client_id, device)

    add_to_weights(model, base_delta)  # FedEx-LoRA's residuals
    for merge in merges:  # FLoRA: the global base is the base plus every round's stack
        merge_lora(model, merge)
    received = decode_payload(
        {k: a.numpy() for k, a in msg.content[wire.ARRAYS].items()}, dict(msg.content[wire.CODEC])
    )
    rank = client_rank(plan, context.node_config, partition_id)
    if plan.truncate_to_rank:  # global factors of a higher rank: ours lead
        received = truncate_lora(received, rank)
    # One scale for every rank (HetLoRA, FlexLoRA), else peft's alpha / rank.
    alpha = plan.lora_scale * rank if plan.lora_scale is not None else config.alpha
    if plan.adapter == "lorasb":
        adapted = attach_lora_sb(model, {**frozen, **received}, config.target_module_list)
    else:  # a fresh LoRA: what it holds is overwritten by what was sent, except for
        # FLoRA, which trains a new one each round
        seed = stream_seed(config.seed, plan.server_round, partition_id, "lora-init")
        adapted = attach_lora(model, rank, alpha, config.target_module_list, seed)
        load_adapter_state(adapted, {**frozen, **received, **personal_tensors(context)},
                           partial=True)
    trainable, personal = name_markers(plan.trainable), name_markers(plan.personal)
    for name, parameter in adapted.named_parameters():
        parameter.requires_grad_(any(t in name for t in trainable))

    dpsgd = None  # user-level DP is the server's alone (and finding its noise takes a second)
    if config.dp == "sample":
        privacy = Privacy.from_config(config)
        dpsgd = privacy.client_dpsgd(len(examples), plan.server_round, partition_id)
    stats = train_local(
        adapted, tokenizer, examples,
        steps=config.local_steps, batch_size=config.batch_size, lr=config.lr,
        max_length=config.max_length, device=device, dpsgd=dpsgd,
        gradient_checkpointing=config.gradient_checkpointing, chat=config.chat_template,
        micro_batch_size=config.micro_batch_size,
        seed=stream_seed(config.seed, plan.server_round, partition_id, "batches"),
    )
    state = lora_sb_state(adapted) if plan.adapter == "lorasb" else adapter_state(adapted)
    if personal:  # kept for this client's next message, never uploaded
        keep_personal(context, {k: v for k, v in state.items() if any(t in k for t in personal)})
    upload = {k: v for k, v in state.items()
              if any(t in k for t in trainable) and not any(t in k for t in personal)}
    if plan.upload == "delta":  # what training changed, relative to what was received
        upload = {k: v - received[k] for k, v in upload.items()}
    metrics = {**train_metrics(len(examples), stats, rank, dpsgd, config.local_steps), **fitted}
    codec = Codec.parse(config.upload_codec)
    drills = faults.faults_for(partition_id, plan.server_round, config.name)  # drills only
    if config.secure_aggregation:
        if plan.upload == "weights":  # the update, padded to the global rank, is what sums
            upload = pad_lora({k: v - received[k] for k, v in upload.items()}, config.rank)
        return secure_reply(msg, plan, *secure_update(upload, config, len(examples), drills),
                            metrics, client_id, device)
    if set(drills) & set(faults.HOSTILE):
        payload, header, metrics = faults.hostile(drills, upload, codec, metrics)
    elif config.error_feedback:
        payload, header = encode_with_feedback(
            context, upload, codec, plan.server_round, plan.aggregated_round or 0
        )
    else:
        payload, header = encode_payload(upload, codec)
    return reply(msg, payload, header, metrics, client_id, device)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global adapter the message carries (a PEFT LoRA; none: the base model)
    on this node's held-out slice; reply with the counts every metric is computed from."""
    plan = Plan.from_record(msg.content[wire.CONFIG])
    config = plan.run
    device = pick_device(str(context.node_config.get("device", config.device)))
    join_run(context, config.name)
    central = plan.eval_examples is not None  # the server's examples, on this process's model
    if central:
        sent = sent_base_delta(msg.content)  # the whole delta, for this evaluation only
        base_delta = sent[1] if sent else {}
    else:
        base_delta = held_base_delta(context, msg.content, plan.base_delta_version)
    state = {k: torch.from_numpy(a.numpy().copy()) for k, a in msg.content[wire.ARRAYS].items()}
    with borrowed_model(config.model, device, config.dtype, config.quantize) as (model, tokenizer):
        # The server's examples were fitted to --max-length before they were shared out.
        examples = plan.eval_examples if central else node_examples(plan, context, tokenizer)[1]
        if not examples:
            raise FedLoraError("federated evaluation asked, but this client holds no examples out")
        add_to_weights(model, base_delta)
        with lora_applied(model, state, plan.eval_rank, plan.eval_alpha,
                          config.target_module_list) if state else nullcontext(model) as evaluated:
            if state and not central and plan.personal:  # its own part
                load_adapter_state(evaluated, personal_tensors(context), partial=True)
            scores = score(evaluated, tokenizer, examples, plan.label_words,
                           batch_size=config.eval_batch_size, max_length=config.max_length,
                           device=device, max_new_tokens=config.eval_max_new_tokens,
                           chat=config.chat_template)
    metrics = {**scores.to_record(), **({wire.EVAL_SHARD: plan.eval_shard} if central else {})}
    give_back_memory(device)
    return Message(content=evaluation_content(metrics, node_client_id(context)), reply_to=msg)


def name_markers(names: tuple[str, ...]) -> list[str]:
    """``("lora_A", "lora_B")`` as the markers that pick those tensors out of adapter keys."""
    return [f".{name}." for name in names]


def node_examples(plan: Plan, context: Context, tokenizer):
    """(train, held out) examples of this node: its node-config ``data-file``, else its
    file of ``--client-data``, else its partition of ``--dataset``; conversations cut or
    left out to fit ``--max-length`` (fedlora.prompts.fit_examples), and how many of the
    training ones were (metrics ``examples-cut``, ``examples-left-out``, where any were)."""
    config = plan.run
    partition_id = int(context.node_config["partition-id"])
    data_file = context.node_config.get("data-file")
    if not data_file and config.client_data:
        data_file = config.client_data_list[partition_id]
    data_file = str(data_file) if data_file else None
    source = data_file or f"partition {partition_id}"
    train, held_out = local_examples(config, data_file, partition_id,
                                     int(context.node_config["num-partitions"]), plan.label_words)
    train, cut, left_out = fit_examples(train, tokenizer, config.max_length, source,
                                        config.chat_template)
    if held_out:
        held_out = fit_examples(held_out, tokenizer, config.max_length,
                                f"{source} (held out)", config.chat_template)[0]
    if not train:
        raise FedLoraError(f"{source}: no training example fits --max-length {config.max_length}")
    fitted = {wire.EXAMPLES_CUT: cut, wire.EXAMPLES_LEFT_OUT: left_out} if cut or left_out else {}
    return train, held_out, fitted


def node_client_id(context: Context) -> str:
    """The node-config ``client-id``, else the partition id."""
    return str(context.node_config.get("client-id", context.node_config["partition-id"]))


def reply(msg: Message, payload: dict, header: dict, metrics: dict, client_id: str,
          device: torch.device) -> Message:
    """The reply to ``msg`` (fedlora.wire.reply_content). Memory is given back before the
    process waits for the next message (:func:`give_back_memory`)."""
    content = reply_content(payload, header, metrics, client_id)
    give_back_memory(device)
    return Message(content=content, reply_to=msg)


def secure_update(upload: dict, config, num_examples: int, drills: list[str]):
    """What a client sends under secure aggregation, and its weight in the mean: the server
    cannot clip what it never sees, so the client bounds its own update (``--dp-clip``
    under user-level DP, every client then weighing the same; ``--max-update-norm``).
    The ``scale`` drill sends the update x 1,000 unclipped, as an attacker would: SecAgg+'s
    clipping range bounds each value it can move."""
    weight = MAX_WEIGHT if config.dp == "user" else num_examples
    bound = config.dp_clip if config.dp == "user" else config.max_update_norm
    if bound:
        upload = {k: v.float() for k, v in clip_update(upload, bound).items()}
    if "scale" in drills:
        upload = faults.scaled(upload)
    return upload, weight


def secure_reply(msg: Message, plan: Plan, values: dict, weight: int, metrics: dict,
                 client_id: str, device: torch.device) -> Message:
    """The reply that Flower's ``secaggplus_mod`` masks (fedlora.wire.secure_reply_content):
    ``values`` by sorted key, the values beyond the plan's clipping range counted (metric
    ``secure-clipped``: SecAgg+ clips them, and the mean is exact only without any)."""
    if weight > MAX_WEIGHT:
        raise FedLoraError(f"{weight} training examples: secure aggregation weighs a client by "
                           f"at most {MAX_WEIGHT} (fedlora.secure_aggregation.MAX_WEIGHT)")
    # fp64: Flower quantises to up to 2^30 levels, more than fp32 resolves
    arrays = [values[k].detach().double().cpu().numpy() for k in sorted(values)]
    if not all(np.isfinite(a).all() for a in arrays):
        raise FedLoraError("the update holds non-finite values: not sent")
    ratio = weight / MAX_WEIGHT  # Flower clips the values times the weight ratio
    clipped = sum(int((np.abs(a) * ratio > plan.secure_clip).sum()) for a in arrays)
    content = secure_reply_content(arrays, weight, {**metrics, wire.SECURE_CLIPPED: clipped},
                                   client_id)
    give_back_memory(device)
    return Message(content=content, reply_to=msg)


def give_back_memory(device: torch.device) -> None:
    """Return the memory a message freed: torch's cached GPU blocks, or on the CPU what
    glibc's allocator keeps of the freed activations (``malloc_trim``), which an actor
    waiting for its next message would otherwise hold at its training peak."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # another C library: nothing to trim
            pass
