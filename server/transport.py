"""Messages to and from the clients: sending a round's messages, handing each reply on as
it arrives, and counting every message's bytes exactly as Flower sends them, from the
message itself or (``shaped_bytes``) from the shapes of its arrays alone."""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import time
from collections import deque
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
from flwr.app import Array, ArrayRecord, Message, RecordDict
from flwr.common.constant import FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, SType
from flwr.serverapp import Grid
from flwr.supercore.constant import HEAD_BODY_DIVIDER, HEAD_VALUE_DIVIDER
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from tqdm import tqdm

log = logging.getLogger("fedlora")


def payload_bytes(message: Message) -> int:
    """Exact serialized size of a message's content, as Flower sends it: see serialized_bytes."""
    return serialized_bytes(message.content)


def serialized_bytes(record) -> int:
    """Exact serialized size of a Flower record (a RecordDict, ArrayRecord, ...).

    Flower stores a message as content-addressed objects (records, arrays, array chunks);
    an object that occurs twice is sent once. This is the sum of their serialized sizes,
    without the ~1 KB of message metadata.
    """
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(record).values())


class Shaped(NamedTuple):
    """An array known by its dtype and shape alone.

    Its content is unlike any other array's and repeats no chunk (a trained or random
    tensor's), unless ``same`` is given: arrays with equal ``same`` are one array (Flower
    sends it once per message), a zero tensor's encoding, taken to be one value repeated,
    so that its equal-length chunks after the first (which holds np.save's header) repeat.
    (A per-tensor top-k's indices of a zero tensor are not one value; they would be
    miscounted past two chunks, 2.6 million kept entries: no LoRA factor is that large.)
    """

    dtype: np.dtype
    shape: tuple[int, ...]
    same: tuple | None = None


@functools.lru_cache(maxsize=None)  # a run's messages repeat a few shapes many times
def array_bytes(array: Shaped) -> int:
    """Exact serialized size of the Flower Array that would hold ``array``, with its
    chunks, computed without the data.

    Flower stores an array as ``np.save``'s bytes (a header, then the values) cut into
    chunks of at most FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE bytes; each chunk is an object
    ("ArrayChunk", its length, the bytes) and the Array an object that lists its chunks'
    ids (64 hex digits each) and a JSON of dtype, shape and chunk order
    (flwr.app.message.array, .arraychunk). ``tests/test_plan.py`` holds this to Flower's own
    count.
    """
    header = io.BytesIO()
    view = np.lib.stride_tricks.as_strided(np.zeros(1, array.dtype), array.shape,
                                           [0] * len(array.shape))  # no data: np.save's header
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(view))
    data = header.tell() + math.prod(array.shape) * array.dtype.itemsize
    chunks = [min(FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE, data - start)
              for start in range(0, data, FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE)]
    # Each chunk's content, as far as it decides which chunks are equal.
    contents = [(0, size) if array.same is not None and n else n for n, size in enumerate(chunks)]
    distinct = list(dict.fromkeys(contents))
    chunk_bytes = sum(_object_bytes("ArrayChunk", 0, chunks[contents.index(c)]) for c in distinct)
    body = json.dumps({"dtype": str(array.dtype), "shape": list(array.shape), "stype": SType.NUMPY,
                       "arraychunk_ids": [distinct.index(c) for c in contents]})
    return chunk_bytes + _object_bytes("Array", len(distinct), len(body.encode()))


def _object_bytes(kind: str, children: int, body: int) -> int:
    """Bytes of a deflated Flower object: its head (type, its children's 64-digit ids
    joined by commas, the body's length), a divider and the body."""
    ids = max(0, 65 * children - 1)
    head = len(kind) + 2 * len(HEAD_VALUE_DIVIDER) + ids + len(str(body))
    return head + len(HEAD_BODY_DIVIDER) + body


def array_record_bytes(keys: list[str], arrays: int) -> int:
    """Exact serialized size of a Flower ArrayRecord's own object (without its arrays)
    whose ``keys`` name ``arrays`` distinct arrays: its head lists their ids, its body is
    the JSON of each key's id (flwr.app.message.arrayrecord)."""
    body = json.dumps({key: "0" * 64 for key in keys}).encode()  # an id is 64 hex digits
    return _object_bytes("ArrayRecord", arrays, len(body))


def shaped_bytes(records: dict) -> int:
    """Exact serialized size of a message's content, as :func:`payload_bytes` counts it,
    where the arrays are known by shape alone.

    ``records`` maps each record's name to a Flower record, or to a dict of
    :class:`Shaped` arrays (an ArrayRecord's content). Flower serializes the message with
    a one-value stand-in for each such ArrayRecord; the stand-in's bytes are swapped for
    the ArrayRecord's own (:func:`array_record_bytes`) and its arrays'
    (:func:`array_bytes`). As Flower sends it, an object that occurs twice counts once:
    equal arrays (equal ``same``) and equal ArrayRecords (empty ones, or equal arrays
    under the same keys).
    """
    content, stand_ins, sent = {}, {}, set()  # sent: the arrays counted so far
    swapped = 0
    for name, record in records.items():
        if not isinstance(record, dict):
            content[name] = record
            continue
        identities = {key: array.same if array.same is not None else object()
                      for key, array in record.items()}
        whole = (tuple(sorted(identities.items()))
                 if all(isinstance(i, tuple) for i in identities.values()) else object())
        if whole not in stand_ins:
            stand_ins[whole] = ArrayRecord({"": Array(np.array([len(stand_ins)], np.int64))})
            distinct = {identity: record[key] for key, identity in identities.items()}
            swapped += (array_record_bytes(list(record), len(distinct))
                        + sum(array_bytes(array) for identity, array in distinct.items()
                              if identity not in sent)
                        - serialized_bytes(stand_ins[whole]))
            sent.update(distinct)
        content[name] = stand_ins[whole]
    return serialized_bytes(RecordDict(content)) + swapped


def traffic(messages: list[Message]) -> int:
    """Payload bytes of the messages that carry content (error replies carry none)."""
    return sum(payload_bytes(m) for m in messages if not m.has_error())


def exchange(grid: Grid, messages: list[Message], timeout: float, label: str) -> list[Message]:
    """Send ``messages``; the replies that arrive before ``timeout`` (see arrivals)."""
    return list(arrivals(grid, messages, timeout, label))


def arrivals(grid: Grid, messages: list[Message], timeout: float, label: str) -> Iterator[Message]:
    """Send ``messages`` and yield each reply as it arrives, until all are in or
    ``timeout`` passes.

    Like ``Grid.send_and_receive``, but polls every half second (sooner at first), shows
    a progress bar and keeps no reply it has handed on (a strategy that streams folds each
    one and lets it go).
    """
    if not messages:
        return
    pending = set(grid.push_messages(messages))
    total = len(pending)
    deadline = time.monotonic() + timeout
    wait = 0.01  # short exchanges (a small model's round, an evaluation) end sooner
    # disable=None: a bar on a terminal, nothing in a log file
    with tqdm(total=total, desc=label, unit="client", leave=False, disable=None) as bar:
        while pending and time.monotonic() < deadline:
            arrived = deque(grid.pull_messages(pending))
            pending -= {m.metadata.reply_to_message_id for m in arrived}
            bar.update(len(arrived))
            while arrived:
                yield arrived.popleft()
            if pending:
                time.sleep(wait)
                wait = min(2 * wait, 0.5)
    if pending:
        log.warning("%s: %d of %d clients did not reply within %gs",
                    label, len(pending), total, timeout)


class Tally:
    """Replies passed through :meth:`count`: how many, and their payload bytes."""

    def __init__(self) -> None:
        self.replies = self.bytes = 0

    def count(self, replies: Iterable[Message]) -> Iterator[Message]:
        for reply in replies:
            self.replies += 1
            self.bytes += traffic([reply])
            yield reply
            del reply  # held no longer than the strategy holds it
