"""The hub's timer watches devstream.v1 sides for silence (StreamingEndpoint.check_idle)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import trio

from devstream_trio.metrics import Metrics
from devstream_trio.streaming import StreamingEndpoint, _IdleWatch


def endpoint(wakes: list[int]) -> StreamingEndpoint:
    bridge: Any = SimpleNamespace()
    return StreamingEndpoint(
        bridge,
        Metrics(),
        random_bytes=lambda n: b"\0" * n,
        close_timeout=1.0,
        idle_timeout=10.0,
        wake=lambda: wakes.append(1),
    )


async def test_a_silent_side_is_cut_only_while_it_waits_for_bytes(
    autojump_clock: trio.abc.Clock,
) -> None:
    wakes: list[int] = []
    streaming = endpoint(wakes)
    ws: Any = SimpleNamespace(last_received=trio.current_time())
    watch = streaming._watch_idle(7, ws, trio.CancelScope())
    assert isinstance(watch, _IdleWatch) and wakes
    start = trio.current_time()
    assert streaming.next_idle_check() == start + 10.0

    # Heard from 4 s in: the check at 10 s looks again at 14 s.
    ws.last_received = start + 4.0
    streaming.check_idle(start + 10.0)
    assert not watch.scope.cancel_called and not watch.fired
    assert streaming.next_idle_check() == start + 14.0

    # Silent, but busy sending to its peer: never cut mid-send, looked at again soon.
    streaming.check_idle(start + 14.0)
    assert not watch.scope.cancel_called
    later = streaming.next_idle_check()
    assert later is not None and start + 14.0 < later <= start + 15.0

    # Silent and waiting for bytes: its read is ended.
    watch.receiving = True
    streaming.check_idle(later)
    assert watch.scope.cancel_called and watch.fired
    assert streaming.next_idle_check() is None


async def test_sides_that_ended_are_skipped_and_the_heap_stays_bounded(
    autojump_clock: trio.abc.Clock,
) -> None:
    streaming = endpoint([])
    ws: Any = SimpleNamespace(last_received=trio.current_time())
    for connection_id in range(300):
        streaming._watch_idle(connection_id, ws, trio.CancelScope())
        streaming._idle_watches.pop(connection_id)  # the side ended
    assert len(streaming._idle_checks) <= 2 * len(streaming._idle_watches) + 65
    kept = streaming._watch_idle(1000, ws, trio.CancelScope())
    kept.receiving = True
    streaming.check_idle(trio.current_time() + 10.0)
    assert kept.scope.cancel_called
    assert streaming.next_idle_check() is None


def test_check_heap_pops_what_is_due_in_order_and_drops_ended_entries() -> None:
    from devstream_trio._checks import CheckHeap

    live: dict[int, object] = {1: None, 2: None, 3: None}
    heap = CheckHeap()
    assert heap.next_due() is None
    assert heap.push(30.0, 3, live)  # the earliest so far
    assert heap.push(10.0, 1, live)
    assert not heap.push(20.0, 2, live)
    assert heap.next_due() == 10.0
    assert list(heap.pop_due(25.0)) == [1, 2]
    assert heap.next_due() == 30.0
    # Entries of connections no longer watched go once the heap outgrows the live ones.
    live.clear()
    for connection_id in range(100):
        heap.push(50.0 + connection_id, connection_id, live)
    assert len(heap) <= 65
