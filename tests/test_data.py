"""Datasets, the held-out split and client partitioning."""

import json

import numpy as np
import pytest

from fedlora.config import RunConfig
from fedlora.data import MOVIE_LABEL_WORDS, client_examples, load_task, partition_indices
from fedlora.errors import FedLoraError


def test_rotten_tomatoes_becomes_label_word_prompts_with_a_held_out_split():
    task = load_task(RunConfig.from_dict({"eval-size": 300}))
    assert len(task.eval) == 300 and len(task.train) == 8530 - 300
    assert task.label_words == MOVIE_LABEL_WORDS
    example = task.train[0]
    assert example.prompt.endswith("negative or positive?\nAnswer:")
    assert example.answer == " " + MOVIE_LABEL_WORDS[example.label]
    labels = task.train_labels
    assert 0.45 < labels.mean() < 0.55  # Rotten Tomatoes is balanced


def test_split_is_a_function_of_the_seed():
    a, b = load_task(RunConfig.from_dict({"seed": 1})), load_task(RunConfig.from_dict({"seed": 1}))
    c = load_task(RunConfig.from_dict({"seed": 2}))
    assert a.eval == b.eval and a.train[:50] == b.train[:50]
    assert a.eval != c.eval


@pytest.mark.parametrize("method", ["iid", "dirichlet"])
def test_partitions_cover_the_data_without_overlap(method):
    labels = np.random.default_rng(0).integers(0, 2, size=1000)
    parts = partition_indices(1000, 5, method, labels, dirichlet_alpha=0.5, seed=3)
    joined = np.concatenate(parts)
    assert len(parts) == 5 and all(len(p) > 0 for p in parts)
    assert len(joined) == 1000 and len(np.unique(joined)) == 1000
    again = partition_indices(1000, 5, method, labels, dirichlet_alpha=0.5, seed=3)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again))


def test_dirichlet_skews_labels_and_iid_does_not():
    labels = np.random.default_rng(0).integers(0, 2, size=4000)

    def mean_skew(parts):  # mean |share of label 1 in a client - share overall|
        return np.mean([abs(labels[p].mean() - labels.mean()) for p in parts])

    iid = partition_indices(4000, 8, "iid", labels, seed=0)
    skewed = partition_indices(4000, 8, "dirichlet", labels, dirichlet_alpha=0.3, seed=0)
    assert max(len(p) for p in iid) - min(len(p) for p in iid) <= 1
    assert mean_skew(iid) < 0.04
    assert mean_skew(skewed) > 0.15


def test_client_examples_are_the_clients_partition():
    config = RunConfig.from_dict({"num-clients": 3, "eval-size": 100})
    task = load_task(config)
    shares = [client_examples(task, config, i, 3) for i in range(3)]
    assert sum(len(s) for s in shares) == len(task.train)
    with pytest.raises(FedLoraError, match="partition-id 3 is outside"):
        client_examples(task, config, 3, 3)


def test_user_csv_with_its_own_columns(tmp_path):
    path = tmp_path / "tickets.csv"
    rows = ["body,topic"] + [f"text number {i},{'billing' if i % 3 else 'bug'}" for i in range(30)]
    path.write_text("\n".join(rows))
    config = RunConfig.from_dict(
        {"dataset": str(path), "text-column": "body", "label-column": "topic", "eval-size": 5}
    )
    task = load_task(config)
    assert task.label_words == ["billing", "bug"]
    assert len(task.train) + len(task.eval) == 30
    assert all(e.answer == " " + task.label_words[e.label] for e in task.train)


def test_user_jsonl_prompt_response(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text("\n".join(json.dumps({"q": f"2+{i}=", "a": str(2 + i)}) for i in range(20)))
    config = RunConfig.from_dict(
        {"dataset": str(path), "prompt-column": "q", "response-column": "a", "eval-size": 4}
    )
    task = load_task(config)
    assert task.label_words is None and len(task.eval) == 4
    assert {(e.prompt, e.answer) for e in task.train + task.eval} == {
        (f"2+{i}=", f" {2 + i}") for i in range(20)
    }
    with pytest.raises(FedLoraError, match="dirichlet needs labels"):
        partition_indices(16, 2, "dirichlet", None)


def test_user_file_errors(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nfine,1\nbad,0\n")
    with pytest.raises(FedLoraError, match="has no column 'review'; its columns: text, label"):
        load_task(RunConfig.from_dict({"dataset": str(path), "text-column": "review", "eval-size": 1}))
    with pytest.raises(FedLoraError, match="--eval-size 2 leaves no training data"):
        load_task(RunConfig.from_dict({"dataset": str(path), "eval-size": 2}))
