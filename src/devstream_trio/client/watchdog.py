"""Deadlines for the clients' handshakes, kept by one task per nursery.

A handshake (the ``101`` of a join, the answer to an initiate) must end by the deadline the
core sets (:data:`~devstream_core.initiator.JOIN_TIMEOUT`,
:func:`~devstream_core.initiator.answer_timeout`): a connection that went silent without a
reset or a close would hold it for ever. A cancel scope with a deadline per handshake made a
stream's set-up cost the service about a twentieth more (cachegrind, per stream), so one
:class:`Watchdog` task per nursery keeps every deadline of its handshakes instead. It sleeps
until the earliest deadline of a handshake still running and closes that handshake's
transport, which ends its wait (the transport was closed under it); the handshake, seeing
:attr:`Handshake.expired`, reports that the hub did not answer in time. Handshakes almost
always end long before their deadline: the task then wakes about once per deadline's length,
and what it holds is dropped as the handshakes end.
"""

from __future__ import annotations

import heapq
import math
import weakref
from collections.abc import Callable
from types import TracebackType

import trio

__all__ = ["LINGER", "Handshake", "Watchdog", "handshake_deadline", "watchdog_for"]


class Handshake:
    """One handshake the watchdog keeps a deadline for."""

    __slots__ = ("done", "expired", "transport")

    def __init__(self, transport: trio.abc.Stream) -> None:
        self.transport = transport
        #: The handshake ended (either way): the watchdog forgets it.
        self.done = False
        #: The deadline passed first: the watchdog closed the transport.
        self.expired = False


#: How long the watchdog task stays once no handshake runs: the next one (one after another
#: is the usual case) finds it running. A nursery left to end by itself waits this long.
LINGER = 0.1


class Watchdog:
    """The handshake deadlines of one nursery's clients (see the module docstring)."""

    __slots__ = ("_added", "_heap", "_limit", "_linger", "_live", "_nursery", "_running", "_sleep")

    def __init__(self, nursery: trio.Nursery) -> None:
        #: Weakly, as _STARTERS in framed_connection: the nursery owns the watchdog.
        self._nursery = weakref.ref(nursery)
        #: (deadline, order added, handshake): a heap; ended handshakes leave it lazily.
        self._heap: list[tuple[float, int, Handshake]] = []
        #: The heap's size past which the ended handshakes in it are dropped all at once.
        self._limit = 1024
        self._added = 0
        #: Handshakes running.
        self._live = 0
        #: Until when the task stays with none running.
        self._linger = -math.inf
        self._running = False
        self._sleep: trio.CancelScope | None = None

    def watch(self, transport: trio.abc.Stream, deadline: float) -> Handshake:
        """Keep *deadline* for a handshake over *transport* (past it, the transport is
        closed) until :meth:`end`."""
        handshake = Handshake(transport)
        heap = self._heap
        if not self._running:
            nursery = self._nursery()
            assert nursery is not None  # the caller's own reference keeps it
            nursery.start_soon(self._run)
            self._running = True
        elif len(heap) > self._limit:
            heap = self._heap = [entry for entry in heap if not entry[2].done]
            heapq.heapify(heap)
            self._limit = max(1024, 2 * len(heap))
        self._added += 1
        self._live += 1
        heapq.heappush(heap, (deadline, self._added, handshake))
        sleep = self._sleep
        if sleep is not None and deadline < sleep.deadline:
            sleep.deadline = deadline
        return handshake

    def end(self, handshake: Handshake) -> None:
        """The handshake ended (either way): its deadline is dropped."""
        handshake.done = True
        self._live -= 1
        if not self._live:
            self._linger = trio.current_time() + LINGER
            sleep = self._sleep
            if sleep is not None and self._linger < sleep.deadline:
                sleep.deadline = self._linger

    async def _run(self) -> None:
        try:
            while True:
                heap = self._heap
                while heap and heap[0][2].done:
                    heapq.heappop(heap)
                now = trio.current_time()
                if not self._live:
                    if now >= self._linger:
                        break
                    wake = self._linger
                else:
                    deadline, _, handshake = heap[0]
                    if now >= deadline:
                        heapq.heappop(heap)
                        handshake.expired = True
                        await trio.aclose_forcefully(handshake.transport)
                        continue
                    wake = deadline
                with trio.CancelScope(deadline=wake) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
        finally:
            self._running = False
            self._sleep = None


#: Each nursery's watchdog, for as long as the nursery lives.
_WATCHDOGS: weakref.WeakKeyDictionary[trio.Nursery, Watchdog] = weakref.WeakKeyDictionary()


def watchdog_for(nursery: trio.Nursery) -> Watchdog:
    """The watchdog of *nursery*'s handshakes (made on first use)."""
    watchdog = _WATCHDOGS.get(nursery)
    if watchdog is None:
        watchdog = _WATCHDOGS[nursery] = Watchdog(nursery)
    return watchdog


class handshake_deadline:
    """Run the block, a handshake over *transport*, until *deadline*; past it the block ends
    and ``late()`` is raised. With a *nursery*, its watchdog keeps the deadline (see the
    module docstring); without one, a cancel scope. (A class, not a generator: it is on
    every stream's set-up.)"""

    __slots__ = ("_handshake", "_late", "_scope", "_watchdog")

    def __init__(
        self,
        nursery: trio.Nursery | None,
        transport: trio.abc.Stream,
        deadline: float,
        late: Callable[[], BaseException],
    ) -> None:
        self._late = late
        if nursery is None:
            self._scope: trio.CancelScope | None = trio.CancelScope(deadline=deadline)
        else:
            self._scope = None
            self._watchdog = watchdog_for(nursery)
            self._handshake = self._watchdog.watch(transport, deadline)

    def __enter__(self) -> None:
        if self._scope is not None:
            self._scope.__enter__()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        scope = self._scope
        if scope is not None:
            scope.__exit__(kind, exc, tb)
            if scope.cancelled_caught:  # (the only exception it suppresses)
                raise self._late()
            return
        handshake = self._handshake
        self._watchdog.end(handshake)
        if exc is not None and handshake.expired and not isinstance(exc, trio.Cancelled):
            raise self._late() from None
