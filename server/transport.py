"""Messages to and from the clients: sending a round's messages, handing each reply on as
it arrives, and counting every message's bytes exactly as Flower sends them."""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Iterator

from flwr.app import Message
from flwr.serverapp import Grid
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
