"""Building a strategy's messages without a federation, as the planner
(``fedlora.plan``), the tests and the benchmarks do: a stand-in for the part of Flower's
Grid that the strategies use, and the placeholder run that Flower's messages need."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class DryRunGrid:
    """What a strategy asks of Flower's Grid when it builds messages: the node ids.

    Parameters
    ----------
    nodes : iterable of int (default: (1, 2))
        The connected nodes' ids (the planner's node n serves partition n - 1).
    """

    def __init__(self, nodes: Iterable[int] = (1, 2)) -> None:
        self.nodes = list(nodes)

    def get_node_ids(self) -> list[int]:
        return self.nodes


@contextmanager
def dry_run() -> Iterator[None]:
    """Flower gives every message the run it belongs to; outside a run there is none, so
    messages borrow a placeholder identity for as long as they are built."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    try:
        yield
    finally:  # unset again (dry runs do not nest)
        TaskIdentity.run_id = TaskIdentity.task_id = TaskIdentity.node_id = None
