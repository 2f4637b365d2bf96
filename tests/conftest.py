"""Shared fixtures: a tiny Llama built and saved here, Flower reply messages, a fake Grid
and the run identity that Flower messages need; and the order in which modules start."""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)

# The longest modules start first (30 s to 200 s each in one process on an idle 2-core
# machine; the others take seconds), so that the two xdist workers (pyproject) finish together
# instead of one of them running a long module alone at the end. xdist keeps this order with
# --no-loadscope-reorder.
LONGEST_FIRST = ("test_deploy.py", "test_study.py", "test_comparison.py", "test_simulation.py",
                 "test_faults.py", "test_flower_app.py", "test_privacy.py", "test_reproduce.py",
                 "test_secure_aggregation.py",
                 "test_chat.py", "test_ray_cluster.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: within a module as written


WORDS = (
    "a the movie film is was good bad great awful fun boring not very plot actors "
    "Question: which label fits this text negative or positive ? Answer : ."
).split()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer Llama with random weights and a word-level tokenizer, saved as an HF folder."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>", *dict.fromkeys(WORDS)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
        bos_token="<s>", eos_token="</s>",
    )
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, bos_token_id=2, eos_token_id=3,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def example_strategy(monkeypatch):
    """The worked example's class, examples/trimmed_mean.py, imported from the repository
    root as ``python -m`` imports it there. pytest does not put the root on sys.path, and
    Opacus installs a top-level package also named ``examples``: one imported before this
    fixture ran is dropped, so that the name resolves to the root's folder."""
    from strategies import strategy_class

    monkeypatch.syspath_prepend(str(ROOT))
    for name in [m for m in sys.modules if m == "examples" or m.startswith("examples.")]:
        if not str(getattr(sys.modules[name], "__file__", "")).startswith(str(ROOT)):
            monkeypatch.delitem(sys.modules, name)
    return strategy_class("examples.trimmed_mean:TrimmedMean")


@pytest.fixture
def task_identity():
    """Flower messages need a run to belong to; a unit test has none."""
    from server.dry_run import dry_run

    with dry_run():
        yield


def make_reply(node_id: int, content=None, error: str | None = None):
    """A train reply from ``node_id`` as the server receives it."""
    from flwr.app import Error, Message, Metadata

    metadata = Metadata(
        run_id=1, message_id=f"reply-{node_id}", src_node_id=node_id, dst_node_id=0,
        reply_to_message_id=f"msg-{node_id}", group_id="1", created_at=time.time(),
        ttl=60.0, message_type="train",
    )
    if error is not None:
        return Message(error=Error(code=1, reason=error), metadata=metadata)
    return Message(content=content, metadata=metadata)


def train_reply(node_id: int, tensors: dict, num_examples: int, loss: float = 1.0, rank: int = 8,
                codec: str = "fp32"):
    """A well-formed reply, as the client builds it, carrying ``tensors`` (an update or
    weights) encoded by ``codec``: what any client may send, so the encoder's own refusal
    of non-finite values is skipped (a hostile client skips it too)."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    from fedlora.codec import Codec, payload_header

    metrics = MetricRecord(
        {"num-examples": num_examples, "train-loss": loss, "train-seconds": 0.1, "rank": rank}
    )
    codec = Codec.parse(codec)
    payload, header = codec.encode(tensors), payload_header(tensors, codec)
    return make_reply(node_id, RecordDict({
        "arrays": ArrayRecord({k: Array(v) for k, v in payload.items()}),
        "codec": ConfigRecord(header),
        "metrics": metrics,
    }))


def client_plan(config):
    """What the server tells the clients with every message of a run of ``config``
    (fedlora.wire.run_record), for a binary sentiment task."""
    from fedlora.wire import run_record

    return run_record(config, ["negative", "positive"])


def parse_configs(argv: list[str] | None = None):
    """The configs of a command line as a run uses them: ``python -m fedlora.simulate``'s
    flags, each run's config checked by the preflight (server.preflight)."""
    from fedlora.cli import build_parser, study_from_args
    from server.preflight import preflight

    return [preflight(run.config)[1] for run in study_from_args(vars(build_parser().parse_args(argv)))]


def weighted_average(states: list[dict], weights: list[float]) -> dict:
    """sum_k w_k state_k / sum_k w_k, tensor by tensor: the reference the aggregations
    are checked against (computed in fp64, returned in fp32)."""
    total = sum(weights)
    return {key: sum(w / total * s[key].double() for s, w in zip(states, weights)).float()
            for key in states[0]}


def node_context(node: int, num_partitions: int, run_id: int | None = None):
    """A fresh Flower node context: partition ``node - 1`` of ``num_partitions``, no state,
    in a run of its own unless ``run_id`` is given (what a machine keeps per run, such as
    the base delta, is then its own too)."""
    from flwr.app import Context, RecordDict

    run_id = random.randrange(2**62) if run_id is None else run_id  # unique across processes
    return Context(run_id=run_id, node_id=node, state=RecordDict(), run_config={},
                   node_config={"partition-id": node - 1, "num-partitions": num_partitions})
