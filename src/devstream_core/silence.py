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

The other way round, :class:`WaitingWriters` says when to send a connection something of the
hub's own: a relay that reads one side between its writes to the other reads nothing from
that side while such a write waits, so the side hears nothing either, unless the hub sends it
a heartbeat (a pong) every ``interval`` for as long as the write waits. Writes wait often for a
moment in a fast transfer and seldom for long, so a wait costs two dictionary operations and
the adapter's timer wakes at most once per ``interval`` for all of them.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable

from .errors import ErrorCode, LocalProtocolError

__all__ = ["SilenceWatch", "WaitingWriters"]


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


class WaitingWriters:
    """Connections whose writes wait (for the transport, or for another send), each owed a
    heartbeat once its wait is *interval* old and every *interval* after that, while it waits.

    The adapter calls :meth:`waits` when a write starts to wait and :meth:`done` when it is
    over, and at :meth:`next_deadline` takes :meth:`due` and sends each connection there its
    heartbeat.
    """

    __slots__ = ("_due", "_since", "interval")

    def __init__(self, interval: float) -> None:
        if not interval > 0:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "interval must be positive")
        self.interval = interval
        #: When each waiting write started to wait, or got its last heartbeat.
        self._since: dict[int, float] = {}
        #: When :meth:`due` next has something to look at (None: nothing waits).
        self._due: float | None = None

    def __len__(self) -> int:
        return len(self._since)

    def __contains__(self, connection_id: object) -> bool:
        return connection_id in self._since

    def waits(self, connection_id: int, now: float) -> bool:
        """A write on *connection_id* started to wait at *now*. True when the adapter's timer
        must now wake sooner than it would have (and take :meth:`next_deadline`): only when
        nothing else was waiting to be looked at."""
        self._since[connection_id] = now
        if self._due is None:
            self._due = now + self.interval
            return True
        return False

    def done(self, connection_id: int) -> None:
        """The write on *connection_id* no longer waits (nothing if it did not)."""
        self._since.pop(connection_id, None)

    def next_deadline(self) -> float | None:
        """When :meth:`due` may next find something, if ever (it may find nothing: a write
        that stopped waiting leaves this as it was)."""
        return self._due

    def due(self, now: float) -> list[int]:
        """The connections owed a heartbeat at *now* (the adapter sends each one); their next
        one is owed ``interval`` from now, if they still wait then."""
        due = self._due
        if due is None or now < due:
            return []
        found: list[int] = []
        interval = self.interval
        next_due = None
        for connection_id, since in self._since.items():
            at = since + interval
            if at <= now:
                found.append(connection_id)
                at = now + interval
            if next_due is None or at < next_due:
                next_due = at
        for connection_id in found:
            self._since[connection_id] = now
        self._due = next_due
        return found
