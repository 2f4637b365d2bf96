"""Datasets, the held-out split and client partitioning."""

import json

import numpy as np
import pytest

from fedlora.config import RunConfig
from fedlora.data import (
    MOVIE_LABEL_WORDS,
    client_examples,
    declared_label_words,
    load_task,
    local_examples,
    partition_indices,
    server_data,
)
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
    # a client's own partition alone (what it asks for) is the same partition
    (own,) = partition_indices(1000, 5, method, labels, dirichlet_alpha=0.5, seed=3, partition_ids=[3])
    assert np.array_equal(own, parts[3])


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
    with pytest.raises(FedLoraError, match=r"has no column 'review' \(read as classification data; --data-format: auto, "
                       r"classification, prompt-response, messages, sharegpt, alpaca\); its "
                       "columns: text, label"):
        load_task(RunConfig.from_dict({"dataset": str(path), "text-column": "review", "eval-size": 1}))
    with pytest.raises(FedLoraError, match="--eval-size 2 leaves no training data"):
        load_task(RunConfig.from_dict({"dataset": str(path), "eval-size": 2}))


def test_every_file_kind_reads_alike(tmp_path):
    import datasets
    import pandas as pd

    frame = pd.DataFrame({"text": [f"note {i}" for i in range(12)],
                          "label": ["cardiology" if i % 3 else "oncology" for i in range(12)]})
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_json(tmp_path / "a.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_pandas(frame).save_to_disk(str(tmp_path / "saved"))
    config = RunConfig.from_dict({"evaluation": "federated", "client-eval-fraction": 0.25})
    results = []
    for name in ("a.csv", "a.jsonl", "a.parquet", "saved"):
        train, held = local_examples(config, str(tmp_path / name), 0, 1, ["cardiology", "oncology"])
        assert (len(train), len(held)) == (9, 3)
        results.append((train, held))
    assert all(r == results[0] for r in results)
    assert all(e.answer in (" cardiology", " oncology") for e in results[0][0])
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_pandas(frame),
                                   "test": datasets.Dataset.from_pandas(frame)})
    splits.save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(FedLoraError, match="holds the splits train, test; save one split"):
        local_examples(config, str(tmp_path / "splits"), 0, 1, None)


def test_a_bad_client_file_says_which_file_and_which_value(tmp_path):
    config = RunConfig.from_dict({"labels": "negative,positive"})
    words = ["negative", "positive"]
    good = tmp_path / "good.csv"
    good.write_text("text,label\nfine,positive\nbad,negative\nmeh,neutral\n")
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"PAR1 not really parquet")
    cases = {
        str(tmp_path / "missing.jsonl"): f"data-file: data file not found: {tmp_path}/missing.jsonl",
        str(corrupt): f"cannot read {corrupt}: ",
        str(tmp_path / "notes.txt"): f"data-file {tmp_path}/notes.txt: not a .jsonl, .csv or .parquet file",
        str(good): f"{good}: label 'neutral' (row 3) is not in the run's label set: negative, positive",
    }
    for path, message in cases.items():
        with pytest.raises(FedLoraError) as err:
            local_examples(config, path, 0, 1, words)
        assert str(err.value).startswith(message) and "\n" not in str(err.value)
    other = RunConfig.from_dict({"text-column": "body"})
    with pytest.raises(FedLoraError, match=f"{good} has no column 'body' \\(read as classification data; "
                       r"--data-format: .*\); its columns: text, label"):
        local_examples(other, str(good), 0, 1, words)


def test_label_names_map_raw_labels_and_declare_the_label_set(tmp_path):
    path = tmp_path / "raw.csv"
    path.write_text("text,label\n" + "".join(f"row {i},{i % 3}\n" for i in range(9)))
    config = RunConfig.from_dict({"label-names": "2=high,0=low,1=mid", "client-data": str(path),
                                  "evaluation": "federated"})
    examples, held = local_examples(config, str(path), 0, 1, declared_label_words(config))
    assert declared_label_words(config) == ["high", "low", "mid"]  # in the order given
    assert sorted({(e.answer, e.label) for e in examples + held}) == [
        (" high", 0), (" low", 1), (" mid", 2)]
    assert server_data(config) == (None, [], ["high", "low", "mid"])  # the server reads no file
    with pytest.raises(FedLoraError, match="server holds none to read the label set from: give --labels"):
        server_data(RunConfig.from_dict({"client-data": str(path)}))


def test_a_server_with_declared_labels_and_federated_evaluation_reads_no_data():
    # --dataset names a file that does not exist on this server: only clients hold data.
    config = RunConfig(dataset="/clients/only.csv", evaluation="federated", labels="low,high")
    assert server_data(config) == (None, [], ["low", "high"])
