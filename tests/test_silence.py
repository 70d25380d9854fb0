"""Tests for devstream_core.silence: connections watched for silence from one schedule.
No I/O, no clock: times are literals."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstream_core.errors import LocalProtocolError
from devstream_core.silence import SilenceWatch


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
