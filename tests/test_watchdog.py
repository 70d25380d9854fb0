"""The watchdog that keeps the clients' handshake deadlines with one task per nursery
(``devstream_trio.client.watchdog``).

Test rules: no sockets (in-memory streams), everything that waits runs on ``autojump_clock``,
and each test of a wait asserts the virtual time it took.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from devstream_trio.client.watchdog import LINGER, handshake_deadline, watchdog_for


class Late(Exception):
    pass


async def test_a_handshake_past_its_deadline_has_its_transport_closed_and_raises_late(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    near, _far = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(Late), handshake_deadline(nursery, near, start + 7, Late):
        await near.receive_some()  # the far end never answers
    assert trio.current_time() - start == pytest.approx(7)
    with pytest.raises(trio.ClosedResourceError):
        await near.send_all(b"x")


async def test_handshakes_that_end_in_time_leave_nothing_behind(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    watchdog = watchdog_for(nursery)
    assert watchdog_for(nursery) is watchdog
    start = trio.current_time()
    streams = []

    async def one(i: int) -> None:
        near, far = trio.testing.memory_stream_pair()
        streams.append(near)
        with handshake_deadline(nursery, near, trio.current_time() + 70, Late):
            await far.send_all(b"101")
            assert await near.receive_some() == b"101"
            await trio.sleep(0.001 * (i % 7))

    async with trio.open_nursery() as many:
        for i in range(3000):
            many.start_soon(one, i)
    assert trio.current_time() - start < 0.01
    await trio.sleep(LINGER + 0.001)
    assert not watchdog._running  # it left once none ran for LINGER
    assert watchdog._heap == []
    assert trio.current_time() - start < LINGER + 0.02  # not the deadlines' 70 s
    for near in streams:  # none was closed
        await near.send_all(b"ok")


async def test_ended_handshakes_behind_a_running_one_do_not_pile_up(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    watchdog = watchdog_for(nursery)
    held, _ = trio.testing.memory_stream_pair()
    with handshake_deadline(nursery, held, trio.current_time() + 600, Late):
        for _ in range(5000):
            near, _far = trio.testing.memory_stream_pair()
            with handshake_deadline(nursery, near, trio.current_time() + 70, Late):
                await trio.lowlevel.checkpoint()
        assert len(watchdog._heap) <= 2 * 1024 + 1


async def test_a_later_handshake_with_an_earlier_deadline_wakes_the_watchdog_sooner(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    slow, _ = trio.testing.memory_stream_pair()
    quick, _ = trio.testing.memory_stream_pair()
    start = trio.current_time()

    async def wait_on(stream: trio.testing.MemoryReceiveStream, within: float) -> float:
        try:
            with handshake_deadline(nursery, stream, start + within, Late):  # type: ignore[arg-type]
                await stream.receive_some()
        except Late:
            return trio.current_time() - start
        raise AssertionError("not given up")

    results: dict[str, float] = {}

    async def run(name: str, stream: trio.abc.Stream, within: float) -> None:
        results[name] = await wait_on(stream, within)  # type: ignore[arg-type]

    async with trio.open_nursery() as both:
        both.start_soon(run, "slow", slow, 60)
        await trio.sleep(0.5)
        both.start_soon(run, "quick", quick, 2)
    assert results == {"quick": pytest.approx(2), "slow": pytest.approx(60)}


async def test_a_cancelled_handshake_stays_cancelled(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    near, _far = trio.testing.memory_stream_pair()
    with trio.move_on_after(1) as scope:
        with handshake_deadline(nursery, near, trio.current_time() + 5, Late):
            await near.receive_some()
    assert scope.cancelled_caught


async def test_without_a_nursery_a_cancel_scope_keeps_the_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    near, _far = trio.testing.memory_stream_pair()
    start = trio.current_time()
    with pytest.raises(Late), handshake_deadline(None, near, start + 3, Late):
        await near.receive_some()
    assert trio.current_time() - start == pytest.approx(3)
