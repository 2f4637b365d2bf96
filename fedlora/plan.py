"""``python -m fedlora.plan``: a whole run's traffic and one client's peak memory, before
the run, from the model's config alone.

Traffic: the bytes every client uploads and downloads in each round and over the run,
everything that travels counted (the plan, the global tensors, kept tensors sent once,
base-delta increments and catch-ups, the initialisation round). Two planners give the
same bytes, to the byte:

- :func:`plan_traffic` runs the server's own code (the strategy's configure and
  aggregate steps, the codecs, Flower's serialization) through the initialisation and
  every round, against stand-in clients. A stand-in does not train: it replies what a
  real client would, in form and size (the tensors the server expects of it, filled with
  random values, encoded by the run's codec; the metrics a client reports, with its real
  example count), through the ClientApp's own reply builder. It is the source of truth,
  held to real runs by tests/test_comparison.py; what it costs is the server's own work
  on the tensors (FedEx-LoRA's dense residuals, Fed-SB's gradient round: out x in values
  per module and client), which a 7B model cannot afford on a laptop.
- :func:`plan_run` builds no tensor: the strategy describes what its messages carry by
  shape (``LoraStrategy.initialize_shapes``), its own hooks give what varies by round and
  node (sampling, the plan, codecs, the reply's shapes), the kept tensors' bookkeeping is
  followed node by node, and each message's bytes come from its shapes
  (``server.transport.shaped_bytes``). It plans a 7B model in seconds;
  tests/test_plan.py holds it to :func:`plan_traffic` for every strategy. The command
  runs it.

The model is built on the meta device from its config: no weights are read. Bytes
depend on shapes, codecs and settings (the run config travels in every message, so
``--name`` and ``--output`` count too), not on values, with one exception: Flower sends
a tensor that occurs twice in a message once (the zero B of a fresh LoRA). Which clients
a round samples (``--fraction-train`` < 1) is Flower's draw from Python's ``random``,
seeded here by ``--seed``: a run draws its own, so a first-time client's costs (Fed-SB's
B and A, FLoRA's stacks) fall in other rounds of a real run.

Memory: ``fedlora.memory`` (the formulas), from the model's shapes, the adapter, what a
node keeps and ``--batch-size`` x ``--max-length`` tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from fedlora import wire
from fedlora.cli import build_parser as build_command_parser
from fedlora.cli import study_from_args
from fedlora.errors import FedLoraError
from fedlora.memory import Architecture, ClientMemory, client_memory
from fedlora.models import meta_model
from fedlora.wire import reply_content, run_record, train_metrics
from server.dry_run import DryRunGrid, dry_run
from server.preflight import preflight
from server.transport import Shaped, shaped_bytes, traffic

# Answer tokens per example whose logits a training step computes: a one-token label word
# and end-of-sequence (classification); a generation task's answers keep more.
ANSWER_TOKENS = 2


@dataclass
class RoundBytes:
    """One round's traffic: each client's bytes by partition id (0: the initialisation)."""

    round: int
    up: dict[int, int] = field(default_factory=dict)
    down: dict[int, int] = field(default_factory=dict)


@dataclass
class RunPlan:
    """A whole run's traffic, round by round, and one training client's peak memory with
    and without gradient checkpointing."""

    rounds: list[RoundBytes]
    memory: ClientMemory
    memory_checkpointed: ClientMemory

    def summary(self, config) -> dict:
        """The plan as one JSON-ready object: totals over the run, the largest message of
        one client in a training round, the peak memory and its parts."""
        init, training = self.rounds[0], self.rounds[1:]
        peak = self.memory_checkpointed if config.gradient_checkpointing else self.memory
        return {
            "strategy": config.strategy, "model": config.model, "rounds": config.rounds,
            "num_clients": config.num_clients, "fraction_train": config.fraction_train,
            "upload_bytes_total": sum(sum(r.up.values()) for r in self.rounds),
            "download_bytes_total": sum(sum(r.down.values()) for r in self.rounds),
            "init_upload_bytes": sum(init.up.values()),
            "init_download_bytes": sum(init.down.values()),
            "upload_bytes_per_client_round": max(max(r.up.values(), default=0) for r in training),
            "download_bytes_per_client_round": max(max(r.down.values(), default=0) for r in training),
            "client_peak_memory_bytes": peak.total,
            "client_peak_memory_bytes_without_checkpointing": self.memory.total,
            "client_peak_memory_bytes_with_checkpointing": self.memory_checkpointed.total,
            "client_memory": peak.as_dict(),
        }


def reply_form(plan, strategy, examples: dict[int, int], partition: int, generator):
    """What a real client's reply to ``plan`` holds: its metrics, the keys and shapes of
    its tensors and their codec (read from the plan as the ClientApp does: the strategy
    may set the rank and codec there)."""
    from flwr.app import MetricRecord

    from client.app import client_rank
    from fedlora.codec import Codec
    from fedlora.privacy import Privacy

    config = plan.run
    if plan.task == "gradient":
        metrics = {wire.NUM_EXAMPLES: min(examples[partition], plan.gradient_examples)}
        return metrics, strategy.init_reply_shapes(), Codec.parse(str(plan.gradient_codec))
    privacy = Privacy.from_config(config)
    dpsgd = (privacy.client_dpsgd(examples[partition], plan.server_round, partition)
             if privacy and privacy.mode == "sample" else None)
    stats = {"train_loss": 1.0 + generator.random(), "train_seconds": 1.0 + generator.random()}
    metrics = train_metrics(examples[partition], stats, client_rank(plan, {}, partition),
                            dpsgd, config.local_steps)
    return metrics, strategy.expected_shapes(MetricRecord(metrics)), Codec.parse(config.upload_codec)


def stand_in_reply(message, strategy, examples: dict[int, int], generator):
    """The reply a real client would send to ``message``, with random tensors."""
    from flwr.app import Message, Metadata

    from fedlora.codec import encode_payload

    node = message.metadata.dst_node_id
    plan = wire.Plan.from_record(message.content[wire.CONFIG])
    metrics, shapes, codec = reply_form(plan, strategy, examples, node - 1, generator)
    tensors = {k: torch.from_numpy(generator.standard_normal(shape, dtype="float32"))
               for k, shape in shapes.items()}
    payload, header = encode_payload(tensors, codec)
    metadata = Metadata(run_id=1, message_id=f"reply-{node}", src_node_id=node, dst_node_id=0,
                        reply_to_message_id=f"message-{node}", group_id="", created_at=time.time(),
                        ttl=3600.0, message_type=message.metadata.message_type)
    return Message(content=reply_content(payload, header, metrics, str(node - 1)),
                   metadata=metadata)


def prepared(config, model, stored: bool):
    """The run's strategy and config (preflight), its model on the meta device (with CPU
    storage for the adapted linears if ``stored``), each client's training examples (its
    weight, in its metrics), the run record every plan carries and the planner's grid
    (node n serves partition n - 1). Flower's sampling is seeded by ``--seed``."""
    from fedlora.data import load_task, local_examples, server_data

    # A config.json is checked by meta_model: no weights are read.
    strategy, config = preflight(config, model=not config.model.endswith(".json"))
    if model is None:
        model = meta_model(config.model, config.target_module_list if stored else None)
    words = server_data(config).label_words
    task = None if config.client_data else load_task(config, words)
    examples = {}
    for partition in range(config.num_clients):
        data_file = config.client_data_list[partition] if config.client_data else None
        train, _ = local_examples(config, data_file, partition, config.num_clients, words, task)
        examples[partition] = len(train)
    random.seed(config.seed)  # Flower's sample_nodes draws from Python's random
    grid = DryRunGrid(range(1, config.num_clients + 1))
    return strategy, config, model, examples, run_record(config, words), grid


def plan_traffic(config, model=None) -> list[RoundBytes]:
    """The bytes of every client's messages in the initialisation (round 0) and in each
    of ``config.rounds`` rounds, from the server's own code on stand-in replies."""
    strategy, config, model, examples, record, grid = prepared(config, model, stored=True)
    generator = np.random.default_rng(config.seed)
    rounds = []
    with dry_run():
        arrays = strategy.initialize(model)
        messages = strategy.configure_init(arrays, record, grid)
        rounds.append(RoundBytes(0, down=sent_bytes(messages)))
        if messages:  # replies are made, counted and folded one at a time, as they arrive
            arrays = strategy.aggregate_init(counted(
                (stand_in_reply(m, strategy, examples, generator) for m in messages),
                rounds[-1]))
        for server_round in range(1, config.rounds + 1):
            messages = list(strategy.configure_train(server_round, arrays, record, grid))
            rounds.append(RoundBytes(server_round, down=sent_bytes(messages)))
            arrays, _ = strategy.aggregate_train(server_round, counted(
                (stand_in_reply(m, strategy, examples, generator) for m in messages),
                rounds[-1]))
            if arrays is None:
                raise FedLoraError(f"round {server_round}: the server refused the stand-in "
                                   f"replies: {strategy.dropped[:1]}")
            del messages
    return rounds


def shaped_payload(shapes: dict, codec, zero: set[str] = frozenset()) -> tuple[dict, dict]:
    """The arrays (``server.transport.Shaped``) and header of the payload that ``codec``
    makes of tensors of ``shapes``, those named in ``zero`` being zero."""
    from fedlora.codec import payload_header

    header = payload_header({k: torch.empty(shape, device="meta") for k, shape in shapes.items()},
                            codec)
    if not (zero and codec.separate):  # no two arrays are equal
        return {k: Shaped(*spec) for k, spec in codec.encoded_shapes(shapes).items()}, header
    arrays = {}
    for name, shape in shapes.items():  # each tensor's arrays are its own
        for key, (dtype, encoded) in codec.encoded_shapes({name: shape}).items():
            same = ("zero", key.removeprefix(name), dtype.str, encoded) if name in zero else None
            arrays[key] = Shaped(dtype, encoded, same)
    return arrays, header


@dataclass
class KeptShapes:
    """What the clients keep for the run, by shape, and what each node holds of it: the
    twin of ``strategies.kept.KeptTensors`` for :func:`plan_run`, where every reply
    arrives (so every node holds what it was last sent).

    Attributes
    ----------
    batches : list of dict
        The kept batches in order (``frozen/...``, ``merge/...`` keys), sent in fp32.
    residual : dict
        Each base-delta increment's shapes, by module path (none: no base delta).
    codec : Codec
        How an increment travels (the whole delta: fp32).
    """

    batches: list[dict]
    residual: dict
    codec: object
    version: int = 0  # increments so far
    held: dict[int, int] = field(default_factory=dict)  # node -> batches it holds
    versions: dict[int, int] = field(default_factory=dict)  # node -> version it holds

    def records_for(self, node: int) -> dict:
        """The message parts that bring ``node`` up to date: ``keep`` (the batches it
        lacks) and, where it is behind, the last increment or the whole base delta."""
        from flwr.app import ConfigRecord

        from fedlora.codec import FP32

        first = self.held.get(node, 0)
        records = {wire.KEEP: {f"{i}/{k}": Shaped(np.dtype(np.float32), shape)
                               for i, batch in enumerate(self.batches[first:], start=first)
                               for k, shape in batch.items()}}
        held = self.versions.get(node, 0)
        if self.version and held != self.version:
            behind = held == self.version - 1  # one increment behind: the increment
            delta, header = shaped_payload(self.residual, self.codec if behind else FP32())
            records[wire.BASE_DELTA] = delta
            records[wire.BASE_DELTA_CODEC] = ConfigRecord({**header, wire.FROM: held if behind else 0})
        self.held[node], self.versions[node] = len(self.batches), self.version
        return records


def plan_run(config, model=None) -> RunPlan:
    """The whole run's traffic (as :func:`plan_traffic` counts it, from shapes alone) and
    one client's peak memory, without a tensor of the model's or the adapter's size."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    from strategies.replies import lora_shapes

    strategy, config, model, examples, record, grid = prepared(config, model, stored=False)
    generator = np.random.default_rng(config.seed)
    shapes = strategy.initialize_shapes(model)
    kept = KeptShapes([shapes.frozen] if shapes.frozen else [], shapes.residual, strategy.kept.codec)
    aggregated: dict[int, int] = {}  # node -> last round its reply counted
    rounds = [RoundBytes(0)]
    with dry_run():
        for message in strategy.configure_init(ArrayRecord(), record, grid):  # plans alone
            node = message.metadata.dst_node_id
            rounds[0].down[node - 1] = traffic([message])
            plan = wire.Plan.from_record(message.content[wire.CONFIG])
            rounds[0].up[node - 1] = reply_bytes(plan, strategy, examples, node - 1, generator)
        for server_round in range(1, config.rounds + 1):
            row = RoundBytes(server_round)
            strategy.start_round(server_round)  # what configure_train does, by shape
            nodes = strategy.sample_train_nodes(server_round, grid)
            strategy.server_round, strategy.sampled = server_round, len(nodes)
            strategy.sent_shapes = shapes.sent
            plan = dataclasses.replace(strategy.plan(record, server_round, task="train"),
                                       kept_batches=len(kept.batches), base_delta_version=kept.version)
            meta = {k: torch.empty(shape, device="meta") for k, shape in shapes.sent.items()}
            ranks = []
            for node in nodes:
                sent = {k: tuple(v.shape) for k, v in strategy.node_arrays(node, meta).items()}
                arrays, header = shaped_payload(sent, strategy.download_codec,
                                                shapes.zero if server_round == 1 else set())
                node_plan = dataclasses.replace(plan, aggregated_round=aggregated.get(node, 0))
                row.down[node - 1] = shaped_bytes({
                    wire.CONFIG: node_plan.to_record(), wire.ARRAYS: arrays,
                    wire.CODEC: ConfigRecord(header), **kept.records_for(node)})
                row.up[node - 1] = reply_bytes(node_plan, strategy, examples, node - 1,
                                               generator, ranks)
                strategy.record_reply(node, MetricRecord({wire.RANK: ranks[-1]}))
                aggregated[node] = server_round
            if shapes.stacked:  # the round's LoRAs, stacked: every client merges them
                kept.batches.append({f"merge/{k}": s for k, s in
                                     lora_shapes(strategy.adapted_shapes(model), sum(ranks)).items()})
            kept.version += bool(shapes.residual)
            rounds.append(row)
    return RunPlan(rounds, *(client_peak(config, strategy, model, shapes, kept.batches,
                                         config.quantize, checkpointing)
                             for checkpointing in (False, True)))


def reply_bytes(plan, strategy, examples, partition, generator, ranks=None) -> int:
    """The bytes of a real client's reply to ``plan``, from shapes alone (its rank
    appended to ``ranks``)."""
    metrics, shapes, codec = reply_form(plan, strategy, examples, partition, generator)
    if ranks is not None:
        ranks.append(metrics[wire.RANK])
    arrays, header = shaped_payload(shapes, codec)
    return shaped_bytes({**reply_content({}, header, metrics, str(partition)), wire.ARRAYS: arrays})


def client_peak(config, strategy, model, shapes, batches: list[dict], quantize: str,
                gradient_checkpointing: bool) -> ClientMemory:
    """One training client's peak memory (fedlora.memory) in this run: its adapter at its
    rank (the largest of --ranks), what it keeps by the run's end (every kept batch, the
    base delta), the initialisation's gradient."""
    from fedlora.models import model_dtype, pick_device
    from strategies.replies import lora_shapes

    module_shapes = strategy.adapted_shapes(model)
    rank = max(config.rank_list) if strategy.heterogeneous_ranks else strategy.rank
    adapter = lora_shapes(module_shapes, rank)
    if strategy.adapter == "lorasb":
        adapter.update({f"{path}.lora_R.weight": (rank, rank) for path in module_shapes})
    trained = max(values({k: s for k, s in adapter.items() if any(f".{n}." in k for n in names)})
                  for names in (strategy.trained(1), strategy.trained(2)))  # RoLoRA alternates
    device = torch.device("cuda") if config.device == "cuda" else pick_device(config.device)
    dtype = str(model_dtype(device, config.dtype)).removeprefix("torch.")
    return client_memory(
        Architecture.of(model), dtype=dtype, quantize=quantize,
        adapter_params=values(adapter), trained_params=trained,
        kept_params=sum(values(b) for b in batches) + values(shapes.residual),
        adapted_params=values(module_shapes), copies_adapted=shapes.stacked or bool(shapes.residual),
        gradient_params=values(shapes.gradient), tokens=config.batch_size * config.max_length,
        keep=config.batch_size * ANSWER_TOKENS,
        adapted=sorted({path.rsplit(".", 1)[-1] for path in module_shapes}), rank=rank,
        gradient_checkpointing=gradient_checkpointing, cpu=device.type == "cpu")


def values(shapes: dict) -> int:
    """How many values tensors of ``shapes`` hold."""
    return sum(math.prod(shape) for shape in shapes.values())


def sent_bytes(messages) -> dict[int, int]:
    """Each message's bytes, by the partition id of the node it goes to."""
    return {m.metadata.dst_node_id - 1: traffic([m]) for m in messages}


def counted(replies, row: RoundBytes):
    """``replies``, each counted into ``row`` on its way to the strategy."""
    for reply in replies:
        row.up[reply.metadata.src_node_id - 1] = traffic([reply])
        yield reply
        del reply


def per_client(values: dict[int, int]) -> str:
    """One client's bytes, or the range where clients differ."""
    if not values:
        return "-"
    low, high = min(values.values()), max(values.values())
    return f"{low:,}" if low == high else f"{low:,} to {high:,}"


def table(config, plan: RunPlan) -> str:
    """The plan of one strategy as a markdown table of rounds, then the peak memory."""
    lines = [f"{config.strategy}: rank {config.rank_list if config.ranks else config.rank}, "
             f"{config.target_modules}, upload {config.upload_codec}, download "
             f"{config.download_codec}, {config.num_clients} clients, fraction "
             f"{config.fraction_train:g}, model {config.model}", "",
             "| round | upload per client | download per client | upload, all clients "
             "| download, all clients |", "|---|---|---|---|---|"]
    for row in plan.rounds:
        lines.append(f"| {'init' if row.round == 0 else row.round} | {per_client(row.up)} "
                     f"| {per_client(row.down)} | {sum(row.up.values()):,} | {sum(row.down.values()):,} |")
    lines.append(f"| total | | | {sum(sum(r.up.values()) for r in plan.rounds):,} "
                 f"| {sum(sum(r.down.values()) for r in plan.rounds):,} |")
    for memory, label in ((plan.memory, "without"), (plan.memory_checkpointed, "with")):
        parts = ", ".join(f"{name.replace('_', ' ')} {value / 2**20:,.0f}"
                          for name, value in memory.as_dict().items() if name != "total")
        lines.append(f"\none client's peak memory {label} gradient checkpointing, batch "
                     f"{config.batch_size} x {config.max_length} tokens: "
                     f"{memory.total / 2**30:,.2f} GiB (MiB: {parts})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """``python -m fedlora.simulate``'s flags, and ``--json``; ``--model`` also takes a
    config.json."""
    parser = build_command_parser(
        "python -m fedlora.plan",
        "A whole run's bytes, each client's per round and in the initialisation, and one "
        "training client's peak memory, for every strategy of --strategy, without loading "
        "the model's weights (it is built on the meta device from its config: --model "
        "NAME, FOLDER or config.json).")
    parser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print each strategy's plan as one JSON object (totals, the "
                             "largest message per client and round, the peak memory and its "
                             "parts) instead of tables")
    return parser


def main(argv: list[str] | None = None) -> int:
    # peft looks for the model's files beside a config.json, and says it found none.
    warnings.filterwarnings("ignore", message="Could not find a config file")

    args = vars(build_parser().parse_args(argv))
    as_json = args.pop("json", False)
    try:
        for run in study_from_args(args):
            if run.config.secure_aggregation:  # four exchanges a round, int64 masked vectors
                raise FedLoraError("--secure-aggregation: the planner counts plain rounds; "
                                   "SecAgg+'s traffic is measured by "
                                   "benchmarks/secure_aggregation.py (docs/results.md)")
            plan = plan_run(run.config)
            print(json.dumps(plan.summary(run.config)) if as_json
                  else f"{table(run.config, plan)}\n", flush=True)
    except FedLoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
