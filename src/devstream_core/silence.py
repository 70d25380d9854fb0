"""Connections that must not stay silent too long, watched from one schedule, sans-IO.

The hub closes a control channel that sent nothing (no message, no ping) for its idle time,
and counts a devstream.v1 side silent for its idle time as dropped. Thousands of connections
are watched this way; a timer task each would cost more than the connections themselves, so
one :class:`SilenceWatch` holds them all and says when it next needs to look
(:meth:`SilenceWatch.next_deadline`). The adapter keeps the time each connection last
received bytes (its WebSocket does) and passes a function to read it; nothing here runs on
every received byte.

Rules:

* A connection is silent once ``timeout`` has passed since the later of when it was watched
  and when it last received bytes; at exactly that moment it is silent.
* A connection the adapter reports busy at that moment (it is in the middle of sending, which
  is never cut) is looked at again ``min(recheck, timeout)`` later.
* :meth:`SilenceWatch.silent` hands each silent connection out once and stops watching it.
* Memory stays proportional to the connections watched: a connection forgotten leaves its
  scheduled look behind, which is skipped when it comes up, and dropped with the others when
  the schedule grows past twice the connections watched (plus 64).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .errors import ErrorCode, LocalProtocolError

__all__ = ["SilenceWatch"]


class SilenceWatch:
    """Connections (by id) that must not stay silent for more than *timeout* seconds."""

    __slots__ = ("_heap", "_recheck", "_since", "timeout")

    def __init__(self, timeout: float, *, recheck: float = 1.0) -> None:
        if not timeout > 0 or not recheck > 0:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "timeout and recheck must be positive"
            )
        self.timeout = timeout
        self._recheck = min(recheck, timeout)
        #: When each watched connection was watched (silence counts from there at the latest).
        self._since: dict[int, float] = {}
        self._heap: list[tuple[float, int]] = []

    def __len__(self) -> int:
        return len(self._since)

    def __contains__(self, connection_id: object) -> bool:
        return connection_id in self._since

    @property
    def scheduled(self) -> int:
        """Looks scheduled, forgotten connections' included (at most twice the connections
        watched, plus 64, plus one)."""
        return len(self._heap)

    def watch(self, connection_id: int, *, since: float) -> bool:
        """Watch *connection_id*, silent from *since* on (usually now, or when its last bytes
        arrived). True if the watch must now look sooner than it would have (the adapter's
        timer should wake and take :meth:`next_deadline`)."""
        if connection_id in self._since:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "connection already watched")
        self._since[connection_id] = since
        return self._push(since + self.timeout, connection_id)

    def forget(self, connection_id: int) -> None:
        """Stop watching *connection_id* (it ended); nothing if it was not watched."""
        self._since.pop(connection_id, None)

    def next_deadline(self) -> float | None:
        """When :meth:`silent` may next find something, if ever."""
        heap = self._heap
        while heap and heap[0][1] not in self._since:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def silent(
        self,
        now: float,
        last_received: Callable[[int], float],
        busy: Callable[[int], bool] | None = None,
    ) -> list[int]:
        """The connections silent at *now*, which are no longer watched.

        *last_received* gives the time a connection last received bytes; *busy*, whether it
        is in the middle of something that must not be cut (then it is looked at again later).
        """
        found: list[int] = []
        heap, since = self._heap, self._since
        while heap and heap[0][0] <= now:
            _, connection_id = heapq.heappop(heap)
            start = since.get(connection_id)
            if start is None:
                continue
            due = max(last_received(connection_id), start) + self.timeout
            if now < due:
                self._push(due, connection_id)
            elif busy is not None and busy(connection_id):
                self._push(now + self._recheck, connection_id)
            else:
                del since[connection_id]
                found.append(connection_id)
        return found

    def _push(self, due: float, connection_id: int) -> bool:
        heap = self._heap
        if len(heap) > 2 * len(self._since) + 64:
            heap[:] = [entry for entry in heap if entry[1] in self._since]
            heapq.heapify(heap)
        heapq.heappush(heap, (due, connection_id))
        return heap[0] == (due, connection_id)
