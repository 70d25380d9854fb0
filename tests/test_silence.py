"""Tests for devstream_core.silence: connections watched for silence from one schedule.
No I/O, no clock: times are literals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstream_core.errors import LocalProtocolError
from devstream_core.silence import SilenceWatch, WaitingWriters


def test_a_connection_heard_from_is_looked_at_again_from_its_last_bytes() -> None:
    watch = SilenceWatch(10.0)
    heard = {7: 0.0}
    assert watch.watch(7, since=0.0)  # the earliest look: the timer must wake
    assert watch.next_deadline() == 10.0
    heard[7] = 4.0
    assert watch.silent(10.0, heard.__getitem__) == []
    assert watch.next_deadline() == 14.0
    assert watch.silent(13.999, heard.__getitem__) == []
    assert watch.silent(14.0, heard.__getitem__) == [7]  # silent at exactly timeout
    assert 7 not in watch and len(watch) == 0
    assert watch.next_deadline() is None
    assert watch.silent(100.0, heard.__getitem__) == []  # handed out once


def test_a_busy_connection_is_never_cut_and_looked_at_again_soon() -> None:
    watch = SilenceWatch(10.0, recheck=1.0)
    watch.watch(1, since=0.0)
    busy = {1: True}
    assert watch.silent(10.0, lambda c: 0.0, busy.__getitem__) == []
    assert watch.next_deadline() == 11.0
    busy[1] = False
    assert watch.silent(11.0, lambda c: 0.0, busy.__getitem__) == [1]
    # The look again never waits longer than the timeout itself.
    short = SilenceWatch(0.5, recheck=1.0)
    short.watch(1, since=0.0)
    assert short.silent(0.5, lambda c: 0.0, lambda c: True) == []
    assert short.next_deadline() == 1.0


def test_silence_counts_from_when_watching_began_if_that_is_later() -> None:
    watch = SilenceWatch(10.0)
    watch.watch(1, since=50.0)
    assert watch.silent(59.0, lambda c: 0.0) == []
    assert watch.silent(60.0, lambda c: 0.0) == [1]


def test_only_a_look_sooner_than_all_others_asks_for_a_wake() -> None:
    watch = SilenceWatch(10.0)
    assert watch.watch(1, since=5.0)
    assert not watch.watch(2, since=6.0)
    assert watch.watch(3, since=1.0)
    assert watch.next_deadline() == 11.0
    assert watch.silent(16.0, lambda c: 0.0) == [3, 1, 2]  # earliest first


def test_forgotten_connections_are_skipped_and_the_schedule_stays_bounded() -> None:
    watch = SilenceWatch(10.0)
    watch.watch(1000, since=0.0)
    for connection_id in range(300):
        watch.watch(connection_id, since=float(connection_id))
        watch.forget(connection_id)
    watch.forget(12345)  # never watched: nothing
    assert len(watch) == 1
    assert watch.scheduled <= 2 * len(watch) + 65
    watch.watch(2000, since=-5.0)
    watch.forget(2000)
    assert watch.next_deadline() == 10.0  # the forgotten earlier look is skipped
    assert watch.silent(1000.0, lambda c: 0.0) == [1000]
    assert watch.next_deadline() is None


def test_misuse_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        SilenceWatch(0.0)
    with pytest.raises(LocalProtocolError):
        SilenceWatch(1.0, recheck=0.0)
    watch = SilenceWatch(1.0)
    watch.watch(1, since=0.0)
    with pytest.raises(LocalProtocolError):
        watch.watch(1, since=0.5)


@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.floats(0, 100), st.floats(0, 100)),
        max_size=40,
    ),
    st.floats(0.1, 50),
)
def test_a_connection_is_found_silent_exactly_when_its_time_is_up(
    events: list[tuple[int, float, float]], timeout: float
) -> None:
    """Random watches and last-received times: whatever is handed out is silent by the rule,
    and whatever is still watched at the end is not yet silent (or not yet looked at)."""
    watch = SilenceWatch(timeout)
    since: dict[int, float] = {}
    heard: dict[int, float] = {}
    now = 0.0
    for connection_id, start, last in events:
        now = max(now, start)
        if connection_id not in watch:
            watch.watch(connection_id, since=now)
            since[connection_id] = now
        heard[connection_id] = min(max(heard.get(connection_id, 0.0), last), now)
        for found in watch.silent(now, heard.__getitem__):
            assert now >= max(since[found], heard[found]) + timeout
            del since[found]
        deadline = watch.next_deadline()
        assert deadline is None or deadline > now
    for connection_id in since:
        assert connection_id in watch


# -- writes that wait: a heartbeat every interval ---------------------------------------------


def test_a_write_that_waits_gets_a_heartbeat_each_interval_while_it_waits() -> None:
    writers = WaitingWriters(1.0)
    assert writers.next_deadline() is None and writers.due(5.0) == []
    assert writers.waits(1, 10.0)  # the first wait asks for the timer
    assert 1 in writers and len(writers) == 1
    assert writers.next_deadline() == 11.0
    assert writers.due(10.9) == []
    assert writers.due(11.0) == [1]
    assert writers.next_deadline() == 12.0
    assert writers.due(12.3) == [1]  # the timer came late: the next one counts from then
    assert writers.next_deadline() == 13.3
    writers.done(1)
    assert 1 not in writers
    assert writers.due(13.3) == []  # looked, found nothing, and stops looking
    assert writers.next_deadline() is None
    writers.done(1)  # nothing to do


def test_writes_waiting_together_share_the_timer_and_each_keeps_its_own_time() -> None:
    writers = WaitingWriters(1.0)
    assert writers.waits(1, 0.0)
    assert not writers.waits(2, 0.4)  # the timer already looks at 1.0, before 2's time
    assert writers.due(1.0) == [1]
    assert writers.next_deadline() == 1.4
    assert writers.due(1.4) == [2]
    assert writers.next_deadline() == 2.0
    writers.done(1)
    assert writers.due(2.0) == []  # 1's look comes up empty; 2's is next
    assert writers.next_deadline() == 2.4
    # A write that stopped waiting and waits again counts from its new wait.
    writers.done(2)
    assert writers.waits(2, 2.3) is False
    assert writers.due(2.4) == []
    assert writers.next_deadline() == 3.3
    assert writers.due(3.3) == [2]


def test_a_write_that_stopped_waiting_before_its_time_gets_nothing() -> None:
    writers = WaitingWriters(1.0)
    writers.waits(7, 0.0)
    writers.done(7)
    assert writers.due(1.0) == []
    assert writers.next_deadline() is None
    assert writers.waits(7, 5.0)  # nothing was waiting: the timer is asked again


def test_waiting_writers_refuse_an_interval_that_is_not_positive() -> None:
    with pytest.raises(LocalProtocolError):
        WaitingWriters(0.0)


@given(
    st.lists(
        st.tuples(st.sampled_from(["waits", "done", "tick"]), st.integers(0, 5), st.floats(0, 3)),
        max_size=60,
    ),
    st.floats(0.1, 5),
)
def test_every_waiting_write_hears_within_an_interval_of_the_timer(
    steps: list[tuple[str, int, float]], interval: float
) -> None:
    """Random waits, ends and timer ticks (the timer running at next_deadline or later): a
    write that waits gets a heartbeat at the first tick at least ``interval`` after its wait
    began or its last heartbeat, never sooner, and the deadline is never later than that."""
    writers = WaitingWriters(interval)
    since: dict[int, float] = {}
    now = 0.0
    for action, connection_id, step in steps:
        now += step
        if action == "waits":
            if connection_id not in since:  # a connection's writes wait one at a time
                writers.waits(connection_id, now)
                since[connection_id] = now
        elif action == "done":
            writers.done(connection_id)
            since.pop(connection_id, None)
        else:
            deadline = writers.next_deadline()
            if since:
                assert deadline is not None
                assert deadline <= min(since.values()) + interval
            if deadline is None or deadline > now:
                continue
            found = writers.due(now)
            for waiting, start in since.items():
                assert (waiting in found) == (start + interval <= now)
            for waiting in found:
                since[waiting] = now
