"""Checks the hub's timer makes on many connections, kept in one heap instead of a task each.

A control channel or a devstream.v1 side that must not stay silent too long puts a check in a
:class:`CheckHeap` (when to look, and at which connection); the hub's timer sleeps until the
earliest one and pops what is due. A connection that has ended leaves its entries behind:
they are skipped when they come up, and dropped all at once when the heap grows past twice the
connections still watched (plus 64), so it stays proportional to them.
"""

from __future__ import annotations

import heapq
from collections.abc import Container, Iterator, Sized
from typing import Protocol

__all__ = ["CheckHeap"]


class _Live(Container[int], Sized, Protocol):
    """The connections still watched (a dict keyed by connection id will do)."""


class CheckHeap:
    """(due, connection id) entries, earliest first."""

    __slots__ = ("_heap",)

    def __init__(self) -> None:
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, due: float, connection_id: int, live: _Live) -> bool:
        """Look at *connection_id* at time *due*; True if that is now the earliest check."""
        heap = self._heap
        if len(heap) > 2 * len(live) + 64:
            heap[:] = [entry for entry in heap if entry[1] in live]
            heapq.heapify(heap)
        heapq.heappush(heap, (due, connection_id))
        return heap[0][1] == connection_id and heap[0][0] == due

    def next_due(self) -> float | None:
        """When the earliest check is due, if there is one."""
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> Iterator[int]:
        """Take every check due at *now*, earliest first (a check pushed meanwhile for a later
        time stays)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            yield heapq.heappop(heap)[1]
