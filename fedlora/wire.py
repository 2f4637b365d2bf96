"""The wire protocol: every key of the messages between the server and its clients, and
the plan and reply types built from them (as ``fedlora.evaluate.Scores`` is for scores).

A message the server sends carries the records

- ``config``: the :class:`Plan` (the run config, the label set and what to do this round);
- ``arrays`` and ``codec``: encoded tensors and the header that names their codec, keys
  and shapes (fedlora.codec);
- ``keep``: tensors the client keeps for the whole run (strategies/kept.py);
- ``base-delta`` and ``base-delta-codec``: a dense change to the base weights.

A training reply carries ``arrays``, ``codec``, ``metrics`` (:func:`train_metrics`) and
``client`` (the client's own identity, ``client-id``); an evaluation reply carries
``metrics`` (``Scores.to_record``, with ``eval-shard`` for central evaluation on clients)
and ``client``. Reading a reply checks its form and raises FedLoraError with the reason
the server logs when it leaves the reply out.
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass

import flwr.compat.common.recorddict_compat as compat
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters

from fedlora.config import RunConfig
from fedlora.data import Example
from fedlora.errors import FedLoraError

# ---- the records of a message -------------------------------------------------------------

CONFIG = "config"  # ConfigRecord: the plan
ARRAYS = "arrays"  # ArrayRecord: encoded tensors
CODEC = "codec"  # ConfigRecord: the codec header of ARRAYS
KEEP = "keep"  # ArrayRecord: tensors to keep for the run, "<batch>/<frozen|merge>/<key>"
BASE_DELTA = "base-delta"  # ArrayRecord: a change to the base weights, by module path
BASE_DELTA_CODEC = "base-delta-codec"  # ConfigRecord: its header, with FROM
FROM = "from"  # the base-delta version a payload builds on (0: the whole delta)
METRICS = "metrics"  # MetricRecord of a reply
CLIENT = "client"  # ConfigRecord of a reply: CLIENT_ID
CLIENT_ID = "client-id"
LABEL_WORDS = "label-words"  # in a plan: the run's label set, JSON (null without labels)

# ---- the metrics of a training reply ---------------------------------------------------------

NUM_EXAMPLES = "num-examples"  # the client's training examples: its weight
TRAIN_LOSS = "train-loss"
TRAIN_SECONDS = "train-seconds"
RANK = "rank"  # the LoRA rank the client trained
# Conversations of the client's training data cut at a turn boundary to fit --max-length,
# and left out (the first answer did not fit); sent only where there were any.
EXAMPLES_CUT = "examples-cut"
EXAMPLES_LEFT_OUT = "examples-left-out"
SECURE_CLIPPED = "secure-clipped"  # secure aggregation: values beyond SecAgg+'s range
DP_NOISE = "dp-noise"  # DP-SGD: what the server's accountant composes
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
EVAL_SHARD = "eval-shard"  # central evaluation on clients: the share scored

# ---- tasks and adapters ------------------------------------------------------------------------

TASKS = ("train", "gradient", "evaluate")
ADAPTERS = ("lora", "lorasb")  # a peft LoRA, or LoRA-SB (B R A, R trained)
UPLOADS = ("delta", "weights")  # trained minus received, or what was trained


@dataclass
class Plan:
    """What one message tells a client: the run's settings and this round's task.

    Parameters
    ----------
    run : RunConfig
        The run's settings, with the adapter settings the strategy sets (rank, alpha,
        target modules, seed, client ranks). The client reads what it needs of them; it
        checks no file of the server's.
    label_words : list of str or None
        The run's label set (None for prompt/response data).
    server_round : int
        The round (0: an initialisation round).
    task : str
        "train", "gradient" (Fed-SB's initialisation: each weight's gradient) or
        "evaluate".
    adapter : str
        What the client attaches: "lora" (peft) or "lorasb".
    trainable, personal : tuple of str
        Adapter tensors the client trains and uploads; those it trains and keeps for
        itself, never uploaded (each client's part of a personalised adapter).
    upload : str
        "delta" (trained minus received) or "weights" (the reply's codec is the run's
        ``upload_codec``, as the strategy sets it for the round).
    kept_batches, base_delta_version : int
        How many kept batches, and which version of the base delta, the client must hold.
    aggregated_round : int or None
        The last round whose reply from this node the server aggregated (error feedback).
    lora_scale : float or None
        One scale for every rank: the client's alpha is scale x its rank.
    truncate_to_rank : bool or None
        The global factors have a higher rank: load the leading components of the
        client's own.
    gradient_examples : int or None, gradient_codec : str or None
        The "gradient" task's examples and upload codec.
    eval_rank : int or None, eval_alpha : float or None
        The "evaluate" task's PEFT adapter.
    eval_shard : int or None, eval_examples : list of Example or None
        Central evaluation on clients: the share of the server's examples to score.
    secure_clip : float or None
        Secure aggregation: the range [-c, c] SecAgg+ clips each value the client sends to
        (fedlora.secure_aggregation); the client counts the values beyond it.

    A field left None is not sent. The run config's fields are not repeated here: a
    strategy that sets one for its clients (its rank, a round's codec) sets it in ``run``.
    """

    run: RunConfig
    label_words: list[str] | None
    server_round: int
    task: str
    adapter: str = "lora"
    trainable: tuple[str, ...] = ("lora_A", "lora_B")
    personal: tuple[str, ...] = ()
    upload: str = "delta"
    kept_batches: int = 0
    base_delta_version: int = 0
    lora_scale: float | None = None
    truncate_to_rank: bool | None = None
    gradient_examples: int | None = None
    gradient_codec: str | None = None
    eval_rank: int | None = None
    eval_alpha: float | None = None
    aggregated_round: int | None = None
    eval_shard: int | None = None
    eval_examples: list[Example] | None = None
    secure_clip: float | None = None

    def to_record(self) -> ConfigRecord:
        """The plan as a ConfigRecord: :func:`run_record`'s keys, then this round's, dashed."""
        record = dict(run_record(self.run, self.label_words))
        for name in ROUND_FIELDS:
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, tuple):
                value = ",".join(value)
            elif name == "eval_examples":
                value = json.dumps([[e.prompt, e.answer, e.label, e.turns] for e in value])
            record[name.replace("_", "-")] = value
        return ConfigRecord(record)

    @classmethod
    def from_record(cls, record) -> Plan:
        """The plan a message carries, or FedLoraError naming the key that is missing or
        of the wrong type. The run config is checked as values only (RunConfig.validate)."""
        record = dict(record)
        run, words = run_from_record(record)
        types = typing.get_type_hints(cls)
        values = {}
        for name in ROUND_FIELDS:
            key = name.replace("_", "-")
            if key not in record:
                if name in ("server_round", "task"):
                    raise FedLoraError(f"the plan has no '{key}'")
                continue
            value = record[key]
            if name in ("trainable", "personal"):
                value = tuple(part for part in str(value).split(",") if part)
            elif name == "eval_examples":
                value = _examples(key, value)
            else:
                value = _typed(key, value, typing.get_args(types[name])[0]
                               if typing.get_args(types[name]) else types[name])
            values[name] = value
        plan = cls(run=run, label_words=words, **values)
        plan.check()
        return plan

    def check(self) -> None:
        """Raise FedLoraError unless the round's keys name a known task, adapter and upload."""
        for name, value, choices in (("task", self.task, TASKS), ("adapter", self.adapter, ADAPTERS),
                                     ("upload", self.upload, UPLOADS)):
            if value not in choices:
                raise FedLoraError(f"the plan's {name} '{value}' is unknown; valid choices: "
                                   f"{', '.join(choices)}")


# The round's fields of a plan, in the order a record lists them (after the run's).
ROUND_FIELDS = tuple(f.name for f in dataclasses.fields(Plan) if f.name not in ("run", "label_words"))


def _typed(key: str, value, kind: type):
    """``value`` as ``kind`` (an int for a float), or FedLoraError naming the plan's key."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise FedLoraError(f"the plan's '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def _examples(key: str, value) -> list[Example]:
    """Central evaluation's share of examples, from its JSON ``[prompt, answer, label,
    turns]`` rows (``turns``: [role, content] pairs of a conversation, else empty), or
    FedLoraError."""
    try:
        return [Example(str(prompt), str(answer), label,
                        tuple((str(role), str(content)) for role, content in turns))
                for prompt, answer, label, turns in json.loads(str(value))]
    except (json.JSONDecodeError, TypeError, ValueError):
        raise FedLoraError(f"the plan's '{key}' is no JSON list of [prompt, answer, label, "
                           "turns] rows") from None


def run_record(config: RunConfig, label_words: list[str] | None) -> ConfigRecord:
    """What every message tells the clients before a strategy adds its round: the run
    config, less the server's own ``--resume`` path, and the label set (JSON). Flower's
    strategy hooks take it as their ``config``."""
    return ConfigRecord({**{k: v for k, v in config.to_dict().items() if k != "resume"},
                         LABEL_WORDS: json.dumps(label_words)})


def run_from_record(record) -> tuple[RunConfig, list[str] | None]:
    """The run config and label set of :func:`run_record`'s record (a plan's too), or
    FedLoraError."""
    values, keys = dict(record), set(RunConfig.keys())
    run = RunConfig.from_dict({k: v for k, v in values.items() if k in keys})
    try:
        words = json.loads(str(values.get(LABEL_WORDS, "null")))
    except json.JSONDecodeError:
        raise FedLoraError(f"the plan's '{LABEL_WORDS}' is not JSON") from None
    return run, words or None


# ---- replies -----------------------------------------------------------------------------------


def train_metrics(num_examples: int, stats: dict, rank: int, dpsgd, local_steps: int) -> dict:
    """What a training reply reports: its examples (its weight), the training loss and
    time, its rank, and with DP-SGD what the server's accountant composes."""
    metrics = {
        NUM_EXAMPLES: num_examples,
        TRAIN_LOSS: stats["train_loss"],
        TRAIN_SECONDS: stats["train_seconds"],
        RANK: rank,
    }
    if dpsgd is not None:
        metrics.update({DP_NOISE: float(dpsgd.noise), DP_SAMPLE_RATE: float(dpsgd.sample_rate),
                        DP_STEPS: local_steps})
    return metrics


def reply_content(payload: dict, header: dict, metrics: dict, client_id: str) -> RecordDict:
    """A training reply's content: the encoded tensors, the codec header, the metrics and
    the client's identity."""
    return RecordDict({
        ARRAYS: ArrayRecord({k: Array(v) for k, v in payload.items()}),
        CODEC: ConfigRecord(header),
        METRICS: MetricRecord(metrics),
        CLIENT: ConfigRecord({CLIENT_ID: client_id}),
    })


def secure_reply_content(values: list, weight: int, metrics: dict, client_id: str) -> RecordDict:
    """A training reply under secure aggregation, in the legacy ``FitRes`` form Flower's
    ``secaggplus_mod`` reads: ``values`` (numpy arrays, in the order of their sorted keys)
    are what it masks; ``weight`` is the client's weight in the mean (its examples, or
    one for every client under user-level DP: ``fedlora.secure_aggregation.MAX_WEIGHT``);
    the metrics, with the client's identity, travel in the clear."""
    fitres = FitRes(Status(Code.OK, ""), ndarrays_to_parameters(values), weight,
                    {**metrics, CLIENT_ID: client_id})
    return compat.fitres_to_recorddict(fitres, keep_input=False)


def evaluation_content(metrics: dict, client_id: str) -> RecordDict:
    """An evaluation reply's content: the counts (``Scores.to_record``, with
    ``eval-shard`` for a share of the server's examples) and the client's identity."""
    return RecordDict({METRICS: MetricRecord(metrics), CLIENT: ConfigRecord({CLIENT_ID: client_id})})


def check_no_error(reply: Message) -> None:
    """Raise FedLoraError with the client's reason if the reply is an error."""
    if reply.has_error():  # the reason's last line says what happened; above: a traceback
        lines = str(reply.error.reason).strip().splitlines() or ["no reason given"]
        raise FedLoraError(f"the client failed: {lines[-1][:300]}")


def reply_metrics(reply: Message) -> MetricRecord:
    """The reply's MetricRecord ``metrics``, or FedLoraError."""
    metrics = reply.content.get(METRICS)
    if not isinstance(metrics, MetricRecord):
        raise FedLoraError(f"the reply has no MetricRecord '{METRICS}'")
    return metrics


def client_identity(reply: Message, node_identities: bool = False) -> str:
    """The ``client-id`` a reply names its sender by (its own word: the partition id in
    simulation, a node-config value in deployment), or FedLoraError; with
    ``node_identities``, its node id instead (``node-<id>``: what an authenticated
    SuperNode cannot choose)."""
    if node_identities:
        return f"node-{reply.metadata.src_node_id}"
    record = reply.content.get(CLIENT)
    client_id = record.get(CLIENT_ID) if isinstance(record, ConfigRecord) else None
    if not isinstance(client_id, str) or not 0 < len(client_id) <= 200:
        raise FedLoraError(f"the reply names no '{CLIENT_ID}' of 1 to 200 characters (got {client_id!r})")
    return client_id
