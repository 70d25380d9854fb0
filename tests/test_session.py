"""The device session machine (devstream_core.session): keepalive, renewal, backoff, final errors.

Test rules: the machine is driven by hand, with no I/O: time is a number the test moves, and
an adapter's duty (call ``timer`` at each ``next_deadline``, report traffic before it) is
kept by the helpers below. Randomness is a fraction the test picks. The last tests drive a
``DeviceClient`` against an in-memory hub on ``autojump_clock`` and assert the virtual time
at which it pings and reconnects.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import math
import os
import random
from collections.abc import Callable

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from devstream_core import control
from devstream_core.credentials import ConnectionString, sas_renewal_time
from devstream_core.errors import ErrorCode, LocalProtocolError
from devstream_core.exceptions import Unauthorized
from devstream_core.registry import new_key
from devstream_core.session import (
    CONTROL_IDLE_TIMEOUT,
    DEFAULT_BACKOFF_BASE,
    DEFAULT_BACKOFF_CAP,
    DEFAULT_PING_INTERVAL,
    DEFAULT_PING_TIMEOUT,
    DEFAULT_REFUSALS,
    DEFAULT_SAS_LIFETIME,
    FINAL_AT_OPEN,
    FINAL_ONCE_OPEN,
    SESSION_TRANSITIONS,
    Action,
    CloseChannel,
    CloseReason,
    DeviceSession,
    GiveUp,
    Online,
    OpenChannel,
    Reconnect,
    RefusalBackoff,
    SendPing,
    SendRegister,
    SessionInput,
    SessionState,
    backoff_ceiling,
    is_final,
    long_wait_cause,
)
from devstream_trio.client import device as device_module
from devstream_trio.client.device import DeviceClient
from devstream_trio.server.hub import HubConfig
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpServerConnection
from devstream_trio.transport.websocket import ConnectionClosed, payload

from .conftest import HubEnv
from .test_device_client import Tap, device_with, round_trip
from .test_hub import echo

S = SessionState
I = SessionInput  # noqa: E741 - the table's own shorthand

#: The Unix time tokens are signed at, unless a test says otherwise.
WALL = 1_000.0


def machine(**options: float) -> DeviceSession:
    settings_: dict[str, float] = {
        "ping_interval": 1000.0,
        "ping_timeout": 10.0,
        "backoff_base": 1.0,
        "backoff_cap": 8.0,
        "sas_lifetime": 100,
    }
    settings_.update(options)
    return DeviceSession(**settings_)  # type: ignore[arg-type]


def open_channel(s: DeviceSession, channel: int, now: float) -> list[Action]:
    """Sign channel *channel*'s token and finish its handshake at *now*."""
    s.token_expiry(channel, now=now, wall_time=WALL + now)
    return s.channel_opened(channel, now)


def online(**options: float) -> DeviceSession:
    """A session online on channel 1 since 0, its token signed at 0 (renewal due at 85)."""
    s = machine(**options)
    s.start(0.0)
    open_channel(s, 1, 0.0)
    assert s.registered(1, 0.0) == [Online(channel=1)]
    return s


def in_state(state: SessionState) -> tuple[DeviceSession, float]:
    """A session in *state*, and the time it got there."""
    s = machine()
    if state is S.IDLE:
        return s, 0.0
    s.start(0.0)
    if state is S.CONNECTING:
        return s, 0.0
    if state is S.WAITING:
        s.channel_lost(1, 0.0, code=None, random_fraction=0.5)
        return s, 0.0
    if state is S.FAILED:
        s.channel_lost(1, 0.0, code=ErrorCode.UNAUTHORIZED, random_fraction=0.5)
        return s, 0.0
    open_channel(s, 1, 0.0)
    if state is S.REGISTERING:
        return s, 0.0
    s.registered(1, 0.0)
    if state is S.ONLINE:
        return s, 0.0
    assert s.next_deadline() == pytest.approx(85.0)
    s.timer(85.0, random_fraction=0.5)
    if state is S.RENEWING:
        return s, 85.0
    open_channel(s, 2, 85.0)
    assert state is S.HANDING_OVER
    return s, 85.0


# -- the table -------------------------------------------------------------------------------

LOCAL, SAME, UNREACHABLE = "LocalProtocolError", "ignored", "no call gives it"

#: What each pair missing from SESSION_TRANSITIONS does instead: the call that would give the
#: input raises (LOCAL) or is ignored (SAME: it names a channel the machine let go), or no call
#: can give that input in that state (no serving channel, no backoff under way, ...).
MISSING: dict[tuple[SessionState, SessionInput], str] = {
    (S.IDLE, I.OPENED): LOCAL,  # no channel was asked for
    (S.IDLE, I.REGISTERED): LOCAL,
    (S.IDLE, I.PENDING_LOST): LOCAL,
    (S.IDLE, I.SERVING_LOST): UNREACHABLE,
    (S.IDLE, I.RENEWAL_DUE): UNREACHABLE,
    (S.IDLE, I.BACKOFF_OVER): UNREACHABLE,
    (S.IDLE, I.FINAL_ERROR): LOCAL,
    (S.CONNECTING, I.START): LOCAL,
    (S.CONNECTING, I.REGISTERED): LOCAL,  # registered before its handshake
    (S.CONNECTING, I.SERVING_LOST): UNREACHABLE,
    (S.CONNECTING, I.RENEWAL_DUE): UNREACHABLE,
    (S.CONNECTING, I.BACKOFF_OVER): UNREACHABLE,
    (S.REGISTERING, I.START): LOCAL,
    (S.REGISTERING, I.OPENED): LOCAL,  # its handshake was done already
    (S.REGISTERING, I.SERVING_LOST): UNREACHABLE,
    (S.REGISTERING, I.RENEWAL_DUE): UNREACHABLE,
    (S.REGISTERING, I.BACKOFF_OVER): UNREACHABLE,
    (S.ONLINE, I.START): LOCAL,
    (S.ONLINE, I.OPENED): LOCAL,  # the serving channel's handshake again
    (S.ONLINE, I.REGISTERED): LOCAL,  # the serving channel registered again
    (S.ONLINE, I.PENDING_LOST): UNREACHABLE,
    (S.ONLINE, I.BACKOFF_OVER): UNREACHABLE,
    (S.RENEWING, I.START): LOCAL,
    (S.RENEWING, I.REGISTERED): LOCAL,
    (S.RENEWING, I.RENEWAL_DUE): UNREACHABLE,
    (S.RENEWING, I.BACKOFF_OVER): UNREACHABLE,
    (S.HANDING_OVER, I.START): LOCAL,
    (S.HANDING_OVER, I.OPENED): LOCAL,
    (S.HANDING_OVER, I.RENEWAL_DUE): UNREACHABLE,
    (S.HANDING_OVER, I.BACKOFF_OVER): UNREACHABLE,
    (S.WAITING, I.START): LOCAL,
    (S.WAITING, I.OPENED): SAME,  # channel 1 was let go
    (S.WAITING, I.REGISTERED): SAME,
    (S.WAITING, I.PENDING_LOST): SAME,
    (S.WAITING, I.SERVING_LOST): UNREACHABLE,
    (S.WAITING, I.RENEWAL_DUE): UNREACHABLE,
    (S.WAITING, I.FINAL_ERROR): SAME,
    (S.FAILED, I.START): LOCAL,
    (S.FAILED, I.OPENED): SAME,
    (S.FAILED, I.REGISTERED): SAME,
    (S.FAILED, I.PENDING_LOST): SAME,
    (S.FAILED, I.SERVING_LOST): UNREACHABLE,
    (S.FAILED, I.RENEWAL_DUE): UNREACHABLE,
    (S.FAILED, I.BACKOFF_OVER): UNREACHABLE,
    (S.FAILED, I.FINAL_ERROR): SAME,
}

#: What each pair of the table gives back (from the sessions :func:`in_state` makes).
EXPECTED_ACTIONS: dict[tuple[SessionState, SessionInput], list[Action]] = {
    (S.IDLE, I.START): [OpenChannel(channel=1)],
    (S.CONNECTING, I.OPENED): [SendRegister(channel=1)],
    (S.CONNECTING, I.PENDING_LOST): [Reconnect(after=0.5, attempt=1)],
    (S.CONNECTING, I.FINAL_ERROR): [GiveUp(channel=1, code=ErrorCode.DEVICE_DISABLED)],
    (S.REGISTERING, I.REGISTERED): [Online(channel=1)],
    (S.REGISTERING, I.PENDING_LOST): [Reconnect(after=0.5, attempt=1)],
    (S.REGISTERING, I.FINAL_ERROR): [GiveUp(channel=1, code=ErrorCode.DEVICE_DISABLED)],
    (S.ONLINE, I.RENEWAL_DUE): [OpenChannel(channel=2)],
    (S.ONLINE, I.SERVING_LOST): [Reconnect(after=0.5, attempt=1)],
    (S.ONLINE, I.FINAL_ERROR): [GiveUp(channel=1, code=ErrorCode.DEVICE_DISABLED)],
    (S.RENEWING, I.OPENED): [SendRegister(channel=2)],
    (S.RENEWING, I.PENDING_LOST): [
        CloseChannel(channel=1, reason=CloseReason.RENEWAL_FAILED),
        OpenChannel(channel=3),
    ],
    (S.RENEWING, I.SERVING_LOST): [],
    (S.RENEWING, I.FINAL_ERROR): [
        CloseChannel(channel=1, reason=CloseReason.GIVEN_UP),
        GiveUp(channel=2, code=ErrorCode.DEVICE_DISABLED),
    ],
    (S.HANDING_OVER, I.REGISTERED): [Online(channel=2, replaced=1)],
    (S.HANDING_OVER, I.PENDING_LOST): [
        CloseChannel(channel=1, reason=CloseReason.RENEWAL_FAILED),
        OpenChannel(channel=3),
    ],
    (S.HANDING_OVER, I.SERVING_LOST): [],
    (S.HANDING_OVER, I.FINAL_ERROR): [
        CloseChannel(channel=1, reason=CloseReason.GIVEN_UP),
        GiveUp(channel=2, code=ErrorCode.DEVICE_DISABLED),
    ],
    (S.WAITING, I.BACKOFF_OVER): [OpenChannel(channel=2)],
}


def give(s: DeviceSession, event: SessionInput, now: float, newest: int) -> list[Action]:
    """Make the call that gives *event* to *s* (on channel *newest*, or its serving one)."""
    if event is I.START:
        return s.start(now)
    if event is I.OPENED:
        if s.state in (S.CONNECTING, S.RENEWING):
            s.token_expiry(newest, now=now, wall_time=WALL + now)
        return s.channel_opened(newest, now)
    if event is I.REGISTERED:
        return s.registered(newest, now)
    if event is I.PENDING_LOST:
        return s.channel_lost(newest, now, code=None, random_fraction=0.5)
    if event is I.SERVING_LOST:
        assert s.serving_channel is not None
        return s.channel_lost(s.serving_channel, now, code=None, random_fraction=0.5)
    if event is I.FINAL_ERROR:
        return s.channel_lost(newest, now, code=ErrorCode.DEVICE_DISABLED, random_fraction=0.5)
    # RENEWAL_DUE and BACKOFF_OVER: the deadline comes.
    deadline = s.next_deadline()
    assert deadline is not None
    return s.timer(deadline, random_fraction=0.5)


def test_the_table_and_its_gaps_cover_every_pair() -> None:
    pairs = set(itertools.product(SessionState, SessionInput))
    assert set(SESSION_TRANSITIONS) | set(MISSING) == pairs
    assert not set(SESSION_TRANSITIONS) & set(MISSING)
    assert set(EXPECTED_ACTIONS) == set(SESSION_TRANSITIONS)
    # FAILED is final: nothing leaves it.
    assert not [pair for pair in SESSION_TRANSITIONS if pair[0] is S.FAILED]


@pytest.mark.parametrize(
    ("state", "event"), sorted(itertools.product(SessionState, SessionInput), key=str)
)
def test_table_walk(state: SessionState, event: SessionInput) -> None:
    s, now = in_state(state)
    # The newest channel: the successor while renewing, else the first.
    newest = 2 if state in (S.RENEWING, S.HANDING_OVER) else 1
    expected = SESSION_TRANSITIONS.get((state, event)) or MISSING[(state, event)]
    if expected == UNREACHABLE:
        return
    if expected == LOCAL:
        with pytest.raises(LocalProtocolError) as raised:
            give(s, event, now, newest)
        assert raised.value.code is ErrorCode.ARGUMENT_INVALID
        assert s.state is state
    elif expected == SAME:
        assert give(s, event, now, newest) == []
        assert s.state is state
    else:
        assert give(s, event, now, newest) == EXPECTED_ACTIONS[(state, event)]
        assert s.state is expected
        assert s.online == (expected in (S.ONLINE, S.RENEWING, S.HANDING_OVER))


# -- keepalive -------------------------------------------------------------------------------


def test_the_serving_channel_is_pinged_every_interval_from_its_registration() -> None:
    s = online(ping_interval=5.0, ping_timeout=3.0, sas_lifetime=10**6)
    for step in range(1, 30):
        now = 5.0 * step
        assert s.next_deadline() == now
        assert s.timer(now, random_fraction=0.5) == [SendPing(channel=1)]
        assert s.next_deadline() == now + 3.0  # the ping's timeout ...
        s.data_received(1, at=now + 0.1)  # ... until its pong
    assert s.state is S.ONLINE


def test_a_ping_unanswered_for_the_timeout_kills_the_channel() -> None:
    s = online(ping_interval=5.0, ping_timeout=3.0)
    assert s.timer(5.0, random_fraction=0.5) == [SendPing(channel=1)]
    assert s.ping_in_flight
    assert s.next_deadline() == 8.0
    s.data_received(1, at=4.9)  # before the ping: no answer to it
    assert s.timer(8.0, random_fraction=0.25) == [
        CloseChannel(channel=1, reason=CloseReason.DEAD),
        Reconnect(after=0.25, attempt=1),
    ]
    assert s.state is S.WAITING and not s.online
    assert s.next_deadline() == 8.25
    assert s.timer(8.25, random_fraction=0.5) == [OpenChannel(channel=2)]


def test_any_bytes_after_the_ping_answer_it() -> None:
    s = online(ping_interval=5.0, ping_timeout=3.0)
    s.timer(5.0, random_fraction=0.5)
    s.data_received(1, at=5.0)  # at the same instant: a pong on a fast link
    assert not s.ping_in_flight
    assert s.next_deadline() == 10.0
    assert s.timer(10.0, random_fraction=0.5) == [SendPing(channel=1)]


def test_the_timer_takes_the_channels_last_bytes_first() -> None:
    """What the adapter hands the timer counts as reported before it: bytes after the ping
    answer it; bytes before it do not."""
    s = online(ping_interval=5.0, ping_timeout=3.0)
    assert s.timer(5.0, random_fraction=0.5) == [SendPing(channel=1)]
    assert s.timer(8.0, random_fraction=0.5, last_received={1: 5.2}) == []
    assert not s.ping_in_flight and s.online
    assert s.timer(10.0, random_fraction=0.5, last_received={1: 5.2}) == [SendPing(channel=1)]
    assert s.timer(13.0, random_fraction=0.25, last_received={1: 9.9}) == [
        CloseChannel(channel=1, reason=CloseReason.DEAD),
        Reconnect(after=0.25, attempt=1),
    ]


def test_one_ping_in_flight_at_most() -> None:
    """With the timeout longer than the interval, a ping in flight holds back the next."""
    s = online(ping_interval=2.0, ping_timeout=5.0)
    assert s.timer(2.0, random_fraction=0.5) == [SendPing(channel=1)]
    assert s.timer(4.0, random_fraction=0.5) == []
    assert s.timer(6.0, random_fraction=0.5) == []
    assert s.next_deadline() == 7.0  # 2 + 5, before the tick at 8
    actions = s.timer(7.0, random_fraction=1.0)
    assert actions[0] == CloseChannel(channel=1, reason=CloseReason.DEAD)


@settings(max_examples=200, deadline=None)
@given(
    interval=st.floats(0.5, 30),
    timeout=st.floats(0.5, 30),
    silent_from=st.floats(0, 200),
)
def test_a_silent_hub_is_found_out_within_timeout_and_interval_plus_timeout(
    interval: float, timeout: float, silent_from: float
) -> None:
    """The hub answers every ping at once until *silent_from*, then says nothing: the channel
    is declared dead between ``timeout`` and ``interval + timeout`` later."""
    s = online(ping_interval=interval, ping_timeout=timeout, sas_lifetime=10**6)
    while True:
        deadline = s.next_deadline()
        assert deadline is not None
        actions = s.timer(deadline, random_fraction=0.5)
        if SendPing(channel=1) in actions and deadline < silent_from:
            s.data_received(1, at=deadline)
        if any(isinstance(a, CloseChannel) for a in actions):
            dead_at = deadline
            break
    assert silent_from + timeout <= dead_at <= silent_from + interval + timeout + 1e-9


def test_the_default_figures_keep_a_channel_within_the_hubs_idle_timeout() -> None:
    """The hub drops a channel it heard nothing from for 90 s; the device pings every 20 s and
    gives a ping 20 s, so a live hub always hears from it in time."""
    assert HubConfig().control_idle_timeout == CONTROL_IDLE_TIMEOUT
    assert DEFAULT_PING_INTERVAL + DEFAULT_PING_TIMEOUT < CONTROL_IDLE_TIMEOUT
    s = DeviceSession()
    assert (s.ping_interval, s.ping_timeout) == (DEFAULT_PING_INTERVAL, DEFAULT_PING_TIMEOUT)
    assert (s.backoff_base, s.backoff_cap) == (DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP)
    assert s.sas_lifetime == DEFAULT_SAS_LIFETIME
    client = DeviceClient("HostName=hub.test;DeviceId=d1;SharedAccessKey=AAAA")
    assert (client.ping_interval, client.ping_timeout) == (s.ping_interval, s.ping_timeout)
    assert (client.backoff_min, client.backoff_max) == (s.backoff_base, s.backoff_cap)
    assert client.sas_lifetime == s.sas_lifetime


# -- registration ----------------------------------------------------------------------------


def test_a_register_unanswered_for_the_ping_timeout_drops_the_channel() -> None:
    s = machine(ping_timeout=4.0)
    s.start(0.0)
    assert s.next_deadline() is None  # opening has no deadline of the session's
    assert open_channel(s, 1, 2.0) == [SendRegister(channel=1)]
    assert s.next_deadline() == 6.0
    assert s.timer(6.0, random_fraction=1.0) == [
        CloseChannel(channel=1, reason=CloseReason.NOT_REGISTERED),
        Reconnect(after=1.0, attempt=1),
    ]
    assert s.registered(1, 6.5) == []  # too late: ignored


def test_a_channel_must_be_signed_before_its_handshake() -> None:
    s = machine()
    s.start(0.0)
    with pytest.raises(LocalProtocolError, match="token_expiry"):
        s.channel_opened(1, 0.0)
    open_channel(s, 1, 0.0)
    with pytest.raises(LocalProtocolError, match="handshake is done"):
        s.token_expiry(1, now=0.0, wall_time=WALL)


# -- a token given in the connection string ---------------------------------------------------


def test_a_given_token_is_presented_as_is_and_never_renewed() -> None:
    s = machine(sas_lifetime=100, token_expires_at=int(WALL) + 50)  # type: ignore[arg-type]
    s.start(0.0)
    assert s.token_expiry(1, now=0.0, wall_time=WALL) == int(WALL) + 50
    s.channel_opened(1, 0.0)
    assert s.registered(1, 0.0) == [Online(channel=1)]
    # Pings go on; no successor channel is ever opened (there is no key to sign one with).
    now = 0.0
    for _ in range(20):
        deadline = s.next_deadline()
        assert deadline is not None and deadline < math.inf
        now = deadline
        s.data_received(1, at=now)
        assert all(isinstance(a, SendPing) for a in s.timer(now, random_fraction=0.5))
    assert now > 10_000 and s.state is S.ONLINE  # renewal would have been due at 85


def test_a_given_token_that_expired_ends_the_session_at_the_next_opening() -> None:
    s = machine(sas_lifetime=100, token_expires_at=int(WALL) + 50)  # type: ignore[arg-type]
    s.start(0.0)
    s.token_expiry(1, now=0.0, wall_time=WALL)
    s.channel_opened(1, 0.0)
    s.registered(1, 0.0)
    # The hub closes the channel at the expiry: not final once open, so the session reconnects.
    actions = s.channel_lost(1, 50.0, code=ErrorCode.UNAUTHORIZED, random_fraction=0.0)
    assert actions[-1] == OpenChannel(channel=2)
    with pytest.raises(Unauthorized) as raised:
        s.token_expiry(2, now=50.0, wall_time=WALL + 50)
    assert "no key" in raised.value.message
    # The adapter reports the opening refused with that code: final.
    assert s.channel_lost(2, 50.0, code=raised.value.code, random_fraction=0.5) == [
        GiveUp(channel=2, code=ErrorCode.UNAUTHORIZED)
    ]
    assert s.state is S.FAILED


def test_a_given_token_for_a_channel_let_go_is_its_expiry() -> None:
    s = machine(token_expires_at=int(WALL) + 50)  # type: ignore[arg-type]
    s.start(0.0)
    s.channel_lost(1, 0.0, code=None, random_fraction=1.0)  # let go before it was signed
    assert s.token_expiry(1, now=0.0, wall_time=WALL) == int(WALL) + 50


@pytest.mark.parametrize("bad", [1.5, True, "1"])
def test_token_expires_at_must_be_an_integer(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        machine(token_expires_at=bad)  # type: ignore[arg-type]


# -- renewal ---------------------------------------------------------------------------------


@pytest.mark.parametrize("wall", [1000.0, 1000.3, 1_800_000_000.999])
def test_renewal_falls_due_at_85_percent_of_the_tokens_life(wall: float) -> None:
    s = machine(sas_lifetime=100)
    s.start(10.0)
    expiry = s.token_expiry(1, now=10.0, wall_time=wall)
    assert expiry == int(wall) + 100
    s.channel_opened(1, 10.5)
    s.registered(1, 10.6)
    renew_at = 10.0 + sas_renewal_time(issued_at=wall, expiry=expiry) - wall
    assert renew_at == pytest.approx(10.0 + 0.85 * (expiry - wall))
    assert s.next_deadline() == pytest.approx(renew_at)
    assert s.timer(renew_at - 0.001, random_fraction=0.5) == []
    deadline = s.next_deadline()
    assert deadline is not None
    assert s.timer(deadline, random_fraction=0.5) == [OpenChannel(channel=2)]
    assert s.state is S.RENEWING and s.online and s.serving_channel == 1


def test_a_renewal_hands_over_and_the_old_channel_drains_for_the_ping_timeout() -> None:
    s, _ = in_state(S.HANDING_OVER)
    assert s.registered(2, 86.0) == [Online(channel=2, replaced=1)]
    assert s.serving_channel == 2 and s.attempt == 0
    # The successor's own renewal: 85 s after its token was signed (at 85).
    assert s.next_deadline() == 96.0  # the old one's drain: 86 + ping_timeout
    assert s.timer(95.9, random_fraction=0.5) == []  # early: nothing is due yet
    assert s.timer(96.0, random_fraction=0.5) == [
        CloseChannel(channel=1, reason=CloseReason.REPLACED)
    ]
    assert s.next_deadline() == pytest.approx(170.0)
    # A late report about the closed channel is ignored.
    assert s.channel_lost(1, 97.0, code=None, random_fraction=0.5) == []
    assert s.state is S.ONLINE


def test_the_hub_closing_the_old_channel_ends_its_drain_early() -> None:
    s, _ = in_state(S.HANDING_OVER)
    s.registered(2, 86.0)
    lost = s.channel_lost(1, 86.1, code=ErrorCode.DEVICE_NOT_ONLINE, random_fraction=0.5)
    assert lost == []
    assert s.next_deadline() == pytest.approx(170.0)  # no drain left to close


def test_the_old_channel_lost_during_the_hand_over_is_no_loss() -> None:
    s, _ = in_state(S.HANDING_OVER)
    assert s.channel_lost(1, 85.5, code=None, random_fraction=0.5) == []
    assert s.state is S.REGISTERING and not s.online
    assert s.registered(2, 85.6) == [Online(channel=2)]
    assert s.attempt == 0


def test_the_old_channel_may_die_during_the_renewal() -> None:
    s = online(ping_interval=50.0, ping_timeout=40.0)
    s.timer(50.0, random_fraction=0.5)  # a ping, never answered
    assert s.timer(85.0, random_fraction=0.5) == [OpenChannel(channel=2)]
    assert s.timer(90.0, random_fraction=0.5) == [CloseChannel(channel=1, reason=CloseReason.DEAD)]
    assert s.state is S.CONNECTING  # the successor carries on, without a backoff
    open_channel(s, 2, 91.0)
    assert s.registered(2, 91.0) == [Online(channel=2)]


def test_a_successor_not_registered_in_time_fails_the_renewal() -> None:
    s, _ = in_state(S.HANDING_OVER)
    assert s.next_deadline() == 95.0
    assert s.timer(95.0, random_fraction=0.5) == [
        CloseChannel(channel=2, reason=CloseReason.NOT_REGISTERED),
        CloseChannel(channel=1, reason=CloseReason.RENEWAL_FAILED),
        OpenChannel(channel=3),
    ]
    assert s.state is S.CONNECTING and s.attempt == 0


def test_a_channel_registered_after_its_renewal_time_renews_at_once() -> None:
    s = machine(sas_lifetime=2, ping_timeout=5.0)
    s.start(0.0)
    open_channel(s, 1, 0.0)  # renewal due at 0.85 * 2 = 1.7
    assert s.registered(1, 1.9) == [Online(channel=1), OpenChannel(channel=2)]
    assert s.state is S.RENEWING
    deadline = s.next_deadline()
    assert deadline is not None and deadline > 1.9


# -- backoff ---------------------------------------------------------------------------------


def losses(s: DeviceSession, fractions: list[float], first: int = 1) -> list[Reconnect]:
    """Fail every open of *s* (in CONNECTING, channel *first* on its way), once per fraction,
    each when it is asked for; the Reconnects the session chose."""
    chosen = []
    pending, now = first, 0.0
    for fraction in fractions:
        assert s.state is S.CONNECTING
        actions = s.channel_lost(pending, now, code=None, random_fraction=fraction)
        reconnect = actions[0]
        assert isinstance(reconnect, Reconnect)
        chosen.append(reconnect)
        if s.state is S.WAITING:
            deadline = s.next_deadline()
            assert deadline == now + reconnect.after
            now = deadline
            actions = s.timer(now, random_fraction=0.5)
        opened = actions[-1]
        assert isinstance(opened, OpenChannel) and opened.channel == pending + 1
        pending = opened.channel
    return chosen


def test_backoff_with_fraction_one_doubles_up_to_the_cap() -> None:
    s = machine(backoff_base=0.5, backoff_cap=30.0)
    s.start(0.0)
    chosen = losses(s, [1.0] * 10)
    assert [r.after for r in chosen] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30, 30]
    assert [r.attempt for r in chosen] == list(range(1, 11))


def test_backoff_with_fraction_zero_reconnects_at_once() -> None:
    s = machine()
    s.start(0.0)
    actions = s.channel_lost(1, 3.0, code=None, random_fraction=0.0)
    assert actions == [Reconnect(after=0.0, attempt=1), OpenChannel(channel=2)]
    assert s.state is S.CONNECTING and s.next_deadline() is None


@settings(max_examples=200, deadline=None)
@given(
    base=st.floats(0.01, 10),
    factor=st.floats(1, 100),
    fractions=st.lists(st.floats(0, 1), min_size=1, max_size=30),
)
def test_backoff_is_a_fraction_of_the_capped_doubling(
    base: float, factor: float, fractions: list[float]
) -> None:
    cap = base * factor
    s = machine(backoff_base=base, backoff_cap=cap)
    s.start(0.0)
    for attempt, (fraction, reconnect) in enumerate(
        zip(fractions, losses(s, fractions), strict=True)
    ):
        ceiling = min(cap, base * 2**attempt)
        assert reconnect.after == pytest.approx(fraction * ceiling)
        assert 0 <= reconnect.after <= cap


def test_backoff_starts_over_after_a_registration() -> None:
    s = machine(backoff_base=1.0, backoff_cap=64.0)
    s.start(0.0)
    assert [r.after for r in losses(s, [1.0] * 4)] == [1, 2, 4, 8]
    now = 100.0
    open_channel(s, 5, now)
    s.registered(5, now)
    assert s.attempt == 0
    actions = s.channel_lost(5, now + 1, code=None, random_fraction=1.0)
    assert actions == [Reconnect(after=1.0, attempt=1)]


def test_backoff_ceiling_does_not_overflow() -> None:
    assert backoff_ceiling(0, base=0.5, cap=30) == 0.5
    assert backoff_ceiling(3, base=0.5, cap=30) == 4.0
    assert backoff_ceiling(10**9, base=0.5, cap=30) == 30
    assert backoff_ceiling(5000, base=1e-300, cap=1e300) == 1e300
    with pytest.raises(LocalProtocolError):
        backoff_ceiling(-1, base=0.5, cap=30)


# -- final errors ----------------------------------------------------------------------------


@pytest.mark.parametrize("code", [c for c in ErrorCode if c is not ErrorCode.DEVICE_REPLACED])
def test_which_errors_are_final(code: ErrorCode) -> None:
    """(A replacement is no loss like the others: its tests are below.)"""
    at_open = code in {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.DEVICE_NOT_FOUND,
        ErrorCode.DEVICE_DISABLED,
        ErrorCode.INVALID_CONNECTION_STRING,
        ErrorCode.ARGUMENT_INVALID,
    }
    once_open = at_open and code is not ErrorCode.UNAUTHORIZED
    assert is_final(code, opened=False) == at_open == (code in FINAL_AT_OPEN)
    assert is_final(code, opened=True) == once_open == (code in FINAL_ONCE_OPEN)
    # The same through the machine: refused at the opening ...
    s = machine()
    s.start(0.0)
    refused = s.channel_lost(1, 0.0, code=code, random_fraction=1.0)
    assert refused == (
        [GiveUp(channel=1, code=code)] if at_open else [Reconnect(after=1.0, attempt=1)]
    )
    # ... and closing a channel once open.
    s = online()
    closed = s.channel_lost(1, 5.0, code=code, random_fraction=1.0)
    assert closed == (
        [GiveUp(channel=1, code=code)] if once_open else [Reconnect(after=1.0, attempt=1)]
    )
    assert (s.state is S.FAILED) == once_open


def test_no_code_is_never_final() -> None:
    assert not is_final(None, opened=False) and not is_final(None, opened=True)


def test_the_device_clients_permanent_errors_are_the_cores() -> None:
    assert device_module.PERMANENT == FINAL_AT_OPEN


def test_giving_up_closes_every_other_channel_and_ends_the_session() -> None:
    s, _ = in_state(S.HANDING_OVER)
    s.registered(2, 86.0)  # 1 drains
    s.timer(170.0, random_fraction=0.5)  # the next renewal: 3 opens
    actions = s.channel_lost(2, 170.5, code=ErrorCode.DEVICE_DISABLED, random_fraction=0.5)
    assert actions == [
        CloseChannel(channel=3, reason=CloseReason.GIVEN_UP),
        GiveUp(channel=2, code=ErrorCode.DEVICE_DISABLED),
    ]
    assert s.state is S.FAILED and s.next_deadline() is None and not s.online
    assert s.timer(1000.0, random_fraction=0.5) == []


# -- replaced by another connection ----------------------------------------------------------

REPLACED = ErrorCode.DEVICE_REPLACED


def back_online(s: DeviceSession, now: float) -> int:
    """Wait out the backoff *s* chose, then open and register the next channel: its number."""
    deadline = s.next_deadline()
    assert deadline is not None and deadline > now
    opened = s.timer(deadline, random_fraction=0.5)
    assert len(opened) == 1 and isinstance(opened[0], OpenChannel)
    channel = opened[0].channel
    open_channel(s, channel, deadline)
    assert s.registered(channel, deadline) == [Online(channel=channel)]
    return channel


def test_a_replaced_device_waits_half_to_all_of_the_backoff_cap_never_at_once() -> None:
    for fraction, wait in [(0.0, 4.0), (0.5, 6.0), (1.0, 8.0)]:  # the cap is 8 s
        s = online()
        actions = s.channel_lost(1, 10.0, code=REPLACED, random_fraction=fraction)
        assert actions == [Reconnect(after=wait, attempt=1, code=REPLACED)]
        assert s.state is S.WAITING and not s.online
        assert s.next_deadline() == 10.0 + wait
        assert s.timer(10.0 + wait - 0.001, random_fraction=0.5) == []
        assert s.timer(10.0 + wait, random_fraction=0.5) == [OpenChannel(channel=2)]


def test_replaced_again_within_the_window_gives_up_with_a_clear_error() -> None:
    s = online(replaced_window=600.0, sas_lifetime=10**6)
    s.channel_lost(1, 10.0, code=REPLACED, random_fraction=0.0)
    channel = back_online(s, 10.0)  # registered again at 14: that resets no count
    actions = s.channel_lost(channel, 610.0, code=REPLACED, random_fraction=0.0)
    assert len(actions) == 1 and isinstance(actions[0], GiveUp)
    assert (actions[0].channel, actions[0].code) == (channel, REPLACED)
    assert actions[0].message == (
        "replaced by a newer connection again, 600 s after the last time: "
        "another client uses this device id"
    )
    assert s.state is S.FAILED and s.next_deadline() is None


def test_replaced_again_after_the_window_waits_again() -> None:
    s = online(replaced_window=60.0, sas_lifetime=10**6)
    s.channel_lost(1, 10.0, code=REPLACED, random_fraction=0.0)
    channel = back_online(s, 10.0)
    actions = s.channel_lost(channel, 70.5, code=REPLACED, random_fraction=1.0)
    assert actions == [Reconnect(after=8.0, attempt=1, code=REPLACED)]
    # ... and that replacement starts the window again.
    channel = back_online(s, 70.5)
    assert isinstance(s.channel_lost(channel, 130.0, code=REPLACED, random_fraction=1.0)[0], GiveUp)


def test_keep_trying_when_replaced_waits_out_every_replacement() -> None:
    s = online(keep_trying_when_replaced=True, sas_lifetime=10**6)
    now = 10.0
    for _ in range(5):
        channel = s.serving_channel
        assert channel is not None
        actions = s.channel_lost(channel, now, code=REPLACED, random_fraction=0.0)
        assert actions == [Reconnect(after=4.0, attempt=1, code=REPLACED)]
        back_online(s, now)
        now += 5.0


def test_a_channel_replaced_before_its_register_was_answered_counts_too() -> None:
    s = machine()
    s.start(0.0)
    open_channel(s, 1, 0.0)  # REGISTERING: the hub took the Register, then another came
    actions = s.channel_lost(1, 1.0, code=REPLACED, random_fraction=0.0)
    assert actions == [Reconnect(after=4.0, attempt=1, code=REPLACED)]
    deadline = s.next_deadline()
    assert deadline == 5.0
    assert s.timer(deadline, random_fraction=0.5) == [OpenChannel(channel=2)]
    open_channel(s, 2, deadline)
    actions = s.channel_lost(2, 6.0, code=REPLACED, random_fraction=0.0)
    assert isinstance(actions[0], GiveUp) and actions[0].code is REPLACED


@pytest.mark.parametrize("state", [S.RENEWING, S.HANDING_OVER])
def test_the_renewed_channel_replacing_the_old_one_is_no_replacement(
    state: SessionState,
) -> None:
    """The hub closes the predecessor of a renewed channel with DEVICE_REPLACED: that is this
    session's own successor taking over, and counts for nothing."""
    s, now = in_state(state)
    assert s.channel_lost(1, now + 0.1, code=REPLACED, random_fraction=0.0) == []
    if state is S.RENEWING:
        open_channel(s, 2, now + 0.2)
    assert s.registered(2, now + 0.3) == [Online(channel=2)]
    # A replacement by another client later is the first one: waited out, not final.
    actions = s.channel_lost(2, now + 1, code=REPLACED, random_fraction=0.0)
    assert actions == [Reconnect(after=4.0, attempt=1, code=REPLACED)]


def test_the_successor_replaced_during_its_hand_over_fails_the_renewal_as_usual() -> None:
    s, now = in_state(S.HANDING_OVER)
    actions = s.channel_lost(2, now + 0.1, code=REPLACED, random_fraction=0.0)
    assert actions == [
        CloseChannel(channel=1, reason=CloseReason.RENEWAL_FAILED),
        OpenChannel(channel=3),
    ]


# -- refusals, retried -------------------------------------------------------------------------


def refused_again(s: DeviceSession, code: ErrorCode, fraction: float, times: int) -> list[float]:
    """Refuse every open of *s* (started at 0, channel 1 on its way) with *code*, *times*
    times, each when it is asked for: the waits it chose."""
    waits = []
    now, channel = 0.0, 1
    for _ in range(times):
        actions = s.channel_lost(channel, now, code=code, random_fraction=fraction)
        assert len(actions) == 1 and isinstance(actions[0], Reconnect)
        assert actions[0].code is code
        waits.append(actions[0].after)
        now += actions[0].after
        assert s.timer(now, random_fraction=fraction) == [OpenChannel(channel=channel + 1)]
        channel += 1
    return waits


def test_a_refusal_backoff_grows_from_5_s_to_5_minutes() -> None:
    for fraction, scale in [(1.0, 1.0), (0.0, 0.5)]:
        s = DeviceSession(refusal_backoff=RefusalBackoff())
        s.start(0.0)
        waits = refused_again(s, ErrorCode.DEVICE_DISABLED, fraction, 9)
        assert waits == [scale * w for w in (5, 10, 20, 40, 80, 160, 300, 300, 300)]


@pytest.mark.parametrize("code", sorted(DEFAULT_REFUSALS))
def test_each_default_refusal_is_retried_at_the_opening(code: ErrorCode) -> None:
    s = DeviceSession(refusal_backoff=RefusalBackoff(base=1.0, cap=2.0))
    s.start(0.0)
    assert refused_again(s, code, 0.5, 3) == [0.75, 1.5, 1.5]
    assert s.state is S.CONNECTING


def test_a_refusal_backoff_retries_only_its_codes() -> None:
    retry = RefusalBackoff(codes=frozenset({ErrorCode.DEVICE_DISABLED}))
    s = machine()
    s.refusal_backoff = retry
    s.start(0.0)
    actions = s.channel_lost(1, 0.0, code=ErrorCode.DEVICE_NOT_FOUND, random_fraction=0.5)
    assert actions == [GiveUp(channel=1, code=ErrorCode.DEVICE_NOT_FOUND)]
    s = machine(refusal_backoff=RefusalBackoff())  # type: ignore[arg-type]
    s.start(0.0)
    actions = s.channel_lost(1, 0.0, code=ErrorCode.PERMISSION_DENIED, random_fraction=0.5)
    assert actions == [GiveUp(channel=1, code=ErrorCode.PERMISSION_DENIED)]


def test_a_device_disabled_while_online_comes_back_once_enabled() -> None:
    s = online(refusal_backoff=RefusalBackoff(), sas_lifetime=10**6)  # type: ignore[arg-type]
    actions = s.channel_lost(1, 10.0, code=ErrorCode.DEVICE_DISABLED, random_fraction=1.0)
    assert actions == [Reconnect(after=5.0, attempt=1, code=ErrorCode.DEVICE_DISABLED)]
    assert s.timer(15.0, random_fraction=1.0) == [OpenChannel(channel=2)]
    actions = s.channel_lost(2, 15.0, code=ErrorCode.DEVICE_DISABLED, random_fraction=1.0)
    assert actions == [Reconnect(after=10.0, attempt=2, code=ErrorCode.DEVICE_DISABLED)]
    assert s.timer(25.0, random_fraction=1.0) == [OpenChannel(channel=3)]
    open_channel(s, 3, 25.0)  # enabled meanwhile
    assert s.registered(3, 25.0) == [Online(channel=3)]
    assert s.attempt == 0  # the next refusal starts from 5 s again
    actions = s.channel_lost(3, 30.0, code=ErrorCode.DEVICE_NOT_FOUND, random_fraction=1.0)
    assert actions == [Reconnect(after=5.0, attempt=1, code=ErrorCode.DEVICE_NOT_FOUND)]


def test_an_expired_token_is_no_refusal_even_with_a_refusal_backoff() -> None:
    """401002 closing an open channel is retried at once with a fresh token, as always; only
    a refused opening waits the long backoff."""
    s = online(refusal_backoff=RefusalBackoff())  # type: ignore[arg-type]
    actions = s.channel_lost(1, 10.0, code=ErrorCode.UNAUTHORIZED, random_fraction=1.0)
    assert actions == [Reconnect(after=1.0, attempt=1)]


def test_a_refusal_of_the_renewed_channel_retries_the_usual_way() -> None:
    s, now = in_state(S.RENEWING)
    s.refusal_backoff = RefusalBackoff()
    actions = s.channel_lost(2, now, code=ErrorCode.DEVICE_DISABLED, random_fraction=1.0)
    assert actions == [
        CloseChannel(channel=1, reason=CloseReason.RENEWAL_FAILED),
        OpenChannel(channel=3),
    ]
    actions = s.channel_lost(3, now, code=ErrorCode.DEVICE_DISABLED, random_fraction=1.0)
    assert actions == [Reconnect(after=5.0, attempt=1, code=ErrorCode.DEVICE_DISABLED)]


@pytest.mark.parametrize(
    "options",
    [
        {"base": 0},
        {"base": math.nan},
        {"base": 10.0, "cap": 5.0},
        {"cap": math.inf},
        {"codes": {ErrorCode.DEVICE_DISABLED}},
        {"codes": frozenset({403902})},
    ],
)
def test_bad_refusal_backoffs_are_refused(options: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError) as raised:
        RefusalBackoff(**options)  # type: ignore[arg-type]
    assert raised.value.code is ErrorCode.ARGUMENT_INVALID


# -- misuse ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"ping_interval": 0},
        {"ping_interval": 0.0001},
        {"ping_timeout": -1},
        {"ping_timeout": math.inf},
        {"ping_interval": True},
        {"backoff_base": 0},
        {"backoff_cap": math.nan},
        {"backoff_base": 2.0, "backoff_cap": 1.0},
        {"sas_lifetime": 1},
        {"sas_lifetime": 100.5},
        {"refusal_backoff": 5.0},
        {"keep_trying_when_replaced": 1},
        {"replaced_window": 0},
    ],
)
def test_bad_settings_are_refused(options: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError) as raised:
        machine(**options)
    assert raised.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.timer(4.0, random_fraction=0.5),  # now went back
        lambda s: s.timer(math.nan, random_fraction=0.5),
        lambda s: s.timer(6.0, random_fraction=1.5),
        lambda s: s.timer(6.0, random_fraction=math.nan),
        lambda s: s.channel_lost(1, 6.0, code=None, random_fraction=-0.1),
        lambda s: s.channel_lost(1, 6.0, code=401002, random_fraction=0.5),  # type: ignore[arg-type]
        lambda s: s.channel_lost(2, 6.0, code=None, random_fraction=0.5),  # never opened
        lambda s: s.channel_lost(0, 6.0, code=None, random_fraction=0.5),
        lambda s: s.registered(True, 6.0),
        lambda s: s.data_received(1, at=math.inf),
        lambda s: s.data_received(7, at=6.0),
        lambda s: s.token_expiry(1, now=6.0, wall_time=math.nan),
        lambda s: s.token_expiry(1, now=6.0, wall_time=WALL),  # serves already
    ],
)
def test_misuse_raises_and_changes_nothing(call: Callable[[DeviceSession], object]) -> None:
    s = online()
    s.timer(5.0, random_fraction=0.5)
    before = (s.state, s.next_deadline(), s.serving_channel, s.attempt)
    with pytest.raises(LocalProtocolError):
        call(s)
    assert (s.state, s.next_deadline(), s.serving_channel, s.attempt) == before


def test_a_channel_let_go_is_signed_but_not_remembered() -> None:
    s, _ = in_state(S.WAITING)
    assert s.token_expiry(1, now=1.0, wall_time=WALL) == int(WALL) + 100
    assert s.state is S.WAITING and s.next_deadline() == 0.5


# -- a stateful walk ---------------------------------------------------------------------------


class SessionWalk(RuleBasedStateMachine):
    """Random inputs to one session, as an adapter (and a hub) could give them.

    The adapter keeps its duty: it calls ``timer`` at every deadline, and reports each
    channel's traffic before. Hubs answer pings at once (the answer is reported when it comes)
    unless the test made them silent. Channels open, register, drop and get refused at
    random, with any error code. After every step the invariants hold.
    """

    @initialize(
        interval=st.sampled_from([1.0, 5.0, 20.0]),
        timeout=st.sampled_from([1.0, 3.0, 20.0]),
        base=st.sampled_from([0.1, 0.5, 2.0]),
        cap_factor=st.sampled_from([1, 4, 60]),
        lifetime=st.sampled_from([2, 10, 100]),
        retry=st.booleans(),
        keep=st.booleans(),
        window=st.sampled_from([5.0, 600.0]),
    )
    def start(
        self,
        interval: float,
        timeout: float,
        base: float,
        cap_factor: int,
        lifetime: int,
        retry: bool,
        keep: bool,
        window: float,
    ) -> None:
        self.s = DeviceSession(
            ping_interval=interval,
            ping_timeout=timeout,
            backoff_base=base,
            backoff_cap=base * cap_factor,
            sas_lifetime=lifetime,
            refusal_backoff=RefusalBackoff(base=1.0, cap=8.0) if retry else None,
            keep_trying_when_replaced=keep,
            replaced_window=window,
        )
        #: When the last replacement was that the session waited out.
        self.replaced_at: float | None = None
        self.now = 0.0
        #: Channels by state, as the actions told: opening, open (registering), serving.
        self.opening: int | None = None
        self.signed = False
        self.registering: int | None = None
        self.serving: int | None = None
        self.draining: set[int] = set()
        self.silent: set[int] = set()
        self.opened: list[int] = []
        self.ping_sent: float | None = None
        self.last_sent = 0.0
        self.failed = False
        self.take(self.s.start(self.now))

    # -- the model's reading of the actions ---------------------------------------------------

    def take(self, actions: list[Action]) -> None:
        for action in actions:
            assert not self.failed, "an action after GiveUp"
            if isinstance(action, OpenChannel):
                assert action.channel == len(self.opened) + 1
                assert self.opening is None and self.registering is None
                self.opened.append(action.channel)
                self.opening, self.signed = action.channel, False
            elif isinstance(action, SendRegister):
                assert action.channel == self.opening
                self.opening, self.registering = None, action.channel
            elif isinstance(action, SendPing):
                assert action.channel == self.serving
                assert self.ping_sent is None, "two pings in flight"
                self.ping_sent = self.last_sent = self.now
                if action.channel not in self.silent:
                    self.s.data_received(action.channel, at=self.now)
                    self.ping_sent = None
            elif isinstance(action, CloseChannel):
                self.close(action)
            elif isinstance(action, Online):
                assert action.channel == self.registering
                assert action.replaced == self.serving
                if self.serving is not None:
                    self.draining.add(self.serving)
                self.registering, self.serving = None, action.channel
                self.ping_sent, self.last_sent = None, self.now
            elif isinstance(action, Reconnect):
                assert self.serving is None and self.opening is None
                assert self.registering is None
                if action.code is None:
                    base, cap, least = self.s.backoff_base, self.s.backoff_cap, 0.0
                elif action.code is ErrorCode.DEVICE_REPLACED:  # never at once
                    base = cap = self.s.backoff_cap
                    least = cap / 2
                else:
                    retry = self.s.refusal_backoff
                    assert retry is not None and action.code in retry.codes
                    base, cap = retry.base, retry.cap
                    least = min(cap, base * 2 ** (action.attempt - 1)) / 2
                ceiling = min(cap, base * 2 ** (action.attempt - 1))
                assert least * (1 - 1e-12) <= action.after <= ceiling * (1 + 1e-12)
                assert action.after <= cap
            else:
                assert isinstance(action, GiveUp)
                assert action.code in FINAL_AT_OPEN or action.code is ErrorCode.DEVICE_REPLACED
                self.failed = True
                self.opening = self.registering = self.serving = self.ping_sent = None
                self.draining.clear()

    def close(self, action: CloseChannel) -> None:
        n = action.channel
        if action.reason is CloseReason.DEAD:
            assert n == self.serving
            assert self.ping_sent is not None and self.now >= self.ping_sent + self.s.ping_timeout
            self.serving = None
        elif action.reason is CloseReason.NOT_REGISTERED:
            assert n == self.registering
            self.registering = None
        elif action.reason is CloseReason.REPLACED:
            assert n in self.draining
            self.draining.remove(n)
        elif action.reason is CloseReason.RENEWAL_FAILED:
            assert n == self.serving
            self.serving = None
        else:
            assert n in (self.opening, self.registering, self.serving) or n in self.draining
            self.lost(n)
        if self.serving is None:
            self.ping_sent = None

    def lost(self, n: int) -> None:
        if n in (self.opening, self.registering):
            self.opening = self.registering = None
        elif n == self.serving:
            self.serving, self.ping_sent = None, None
        self.draining.discard(n)

    # -- rules -------------------------------------------------------------------------------

    @rule(dt=st.floats(0, 30), fraction=st.floats(0, 1))
    def time_passes(self, dt: float, fraction: float) -> None:
        target = self.now + dt
        while (deadline := self.s.next_deadline()) is not None and deadline <= target:
            self.now = deadline
            self.take(self.s.timer(self.now, random_fraction=fraction))
        self.now = target

    @precondition(lambda self: self.opening is not None)
    @rule(wall=st.floats(0, 2e9))
    def sign(self, wall: float) -> None:
        assert self.opening is not None
        expiry = self.s.token_expiry(self.opening, now=self.now, wall_time=wall)
        assert expiry == int(wall) + self.s.sas_lifetime
        self.signed = True

    @precondition(lambda self: self.opening is not None and self.signed)
    @rule()
    def handshake_done(self) -> None:
        assert self.opening is not None
        self.take(self.s.channel_opened(self.opening, self.now))

    @precondition(lambda self: self.registering is not None)
    @rule()
    def hub_registers(self) -> None:
        assert self.registering is not None
        self.take(self.s.registered(self.registering, self.now))

    @precondition(lambda self: bool(self.opened))
    @rule(
        data=st.data(),
        code=st.none() | st.sampled_from(ErrorCode),
        fraction=st.floats(0, 1),
    )
    def channel_ends(self, data: st.DataObject, code: ErrorCode | None, fraction: float) -> None:
        n = data.draw(st.sampled_from(self.opened))
        was_open = n != self.opening
        live = n in (self.opening, self.registering, self.serving)
        # Whether the loss leaves the device offline, no other channel carrying on.
        if n == self.serving:
            waits = self.opening is None and self.registering is None
        else:
            waits = self.serving is None
        actions = self.s.channel_lost(n, self.now, code=code, random_fraction=fraction)
        retried = self.s.refusal_backoff is not None and code in self.s.refusal_backoff.codes
        if live and waits and code is ErrorCode.DEVICE_REPLACED:
            last, self.replaced_at = self.replaced_at, self.now
            again = last is not None and self.now - last <= self.s.replaced_window
            if again and not self.s.keep_trying_when_replaced:
                assert isinstance(actions[-1], GiveUp) and actions[-1].code == code
                assert "another client uses this device id" in actions[-1].message
            else:
                assert actions[0] == Reconnect(
                    after=actions[0].after, attempt=self.s.attempt, code=code
                )
        elif live and is_final(code, opened=was_open) and not retried:
            assert isinstance(actions[-1], GiveUp) and actions[-1].code == code
        else:
            assert not any(isinstance(a, GiveUp) for a in actions)
            if live and waits and is_final(code, opened=was_open):
                assert isinstance(actions[0], Reconnect) and actions[0].code == code
        if not live:
            assert actions == []
        self.lost(n)
        self.take(actions)

    @precondition(lambda self: bool(self.opened))
    @rule(data=st.data())
    def hub_goes_silent_or_comes_back(self, data: st.DataObject) -> None:
        n = data.draw(st.sampled_from(self.opened))
        self.silent ^= {n}

    @precondition(lambda self: bool(self.opened))
    @rule(data=st.data(), before=st.floats(0, 5))
    def bytes_arrive(self, data: st.DataObject, before: float) -> None:
        n = data.draw(st.sampled_from(self.opened))
        at = self.now - before
        self.s.data_received(n, at=at)
        if n == self.serving and self.ping_sent is not None and at >= self.ping_sent:
            # Answered, if late: the ticks until now went by without a ping (one was in
            # flight); the next one comes within an interval from now.
            self.ping_sent, self.last_sent = None, self.now

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def deadline_in_the_future(self) -> None:
        deadline = self.s.next_deadline()
        assert deadline is None or deadline > self.now

    @invariant()
    def channels_as_the_actions_said(self) -> None:
        assert self.s.serving_channel == self.serving
        assert self.s.online == (self.serving is not None)
        assert self.s.online == (self.s.state in (S.ONLINE, S.RENEWING, S.HANDING_OVER))
        assert (self.s.state is S.FAILED) == self.failed
        if self.failed:
            assert self.s.next_deadline() is None

    @invariant()
    def ping_rules(self) -> None:
        assert self.s.ping_in_flight == (self.ping_sent is not None)
        if self.ping_sent is not None:
            # Never a ping unanswered past the timeout on a channel still serving.
            assert self.now < self.ping_sent + self.s.ping_timeout
        elif self.serving is not None:
            # A hub that answers hears from the device at least every ping_interval (counted
            # from the last ping, or from the late answer to it).
            assert self.now - self.last_sent <= self.s.ping_interval

    @invariant()
    def bounded(self) -> None:
        most_drains = math.ceil(self.s.ping_timeout / (0.85 * (self.s.sas_lifetime - 1))) + 1
        assert len(self.draining) <= most_drains
        assert self.s.attempt <= len(self.opened)


TestSessionWalk = SessionWalk.TestCase
TestSessionWalk.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


# -- the trio device client, driven by the machine -------------------------------------------


class Fixed(random.Random):
    """An rng whose every fraction is *fraction*: the backoff the machine picks is known."""

    def __init__(self, fraction: float) -> None:
        super().__init__(0)
        self.fraction = fraction

    def random(self) -> float:
        return self.fraction


async def test_device_client_pings_on_the_sessions_schedule(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    tap = Tap(hub_env)
    device = device_with(hub_env, cs, tap, ping_interval=7.0, ping_timeout=3.0)
    with trio.fail_after(200):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        start = trio.current_time()
        for k in range(1, 15):
            await trio.sleep_until(start + 7 * k - 0.01)
            assert tap.streams[0].pings_sent() == k - 1
            await trio.sleep_until(start + 7 * k + 0.01)
            assert tap.streams[0].pings_sent() == k
        assert trio.current_time() - start == pytest.approx(98.01)
        # Past the hub's idle limit (90 s): still the first channel.
        assert (device.connections, len(tap.attempts)) == (1, 1)
        await round_trip(hub_env, "d1")


async def test_device_client_reconnects_after_the_backoff_the_session_chose(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    tap = Tap(hub_env, fail_first=6)
    fraction = 0.75
    device = device_with(
        hub_env,
        cs,
        tap,
        ping_interval=5.0,
        ping_timeout=3.0,
        backoff_min=1.0,
        backoff_max=8.0,
        rng=Fixed(fraction),
    )
    with trio.fail_after(200):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        gaps = [later - earlier for earlier, later in itertools.pairwise(tap.attempts)]
        expected = [fraction * backoff_ceiling(k, base=1.0, cap=8.0) for k in range(6)]
        assert expected == [0.75, 1.5, 3.0, 6.0, 6.0, 6.0]
        assert gaps == pytest.approx(expected, abs=1e-9)
        # The hub goes silent at 12.5 s: the ping at 15 s goes unanswered until 18 s, and
        # the next open comes a first backoff (the registration reset it) later.
        start = trio.current_time()
        await trio.sleep_until(start + 12.5)
        tap.control_channel().silent = True
        await trio.sleep_until(start + 30)
        assert tap.attempts[-1] - start == pytest.approx(18.0 + fraction * 1.0, abs=1e-9)
        assert device.online and device.connections == 2
        await round_trip(hub_env, "d1")


async def test_device_client_drops_a_channel_whose_register_goes_unanswered(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """A hub that takes the first channel's WebSocket but never answers its Register (it
    answers pings): the device drops it ``ping_timeout`` after the handshake and opens the
    next after the backoff, where before it waited there for ever."""
    opens: list[float] = []
    registers: list[float] = []

    async def hub(stream: trio.abc.Stream, answer: bool) -> None:
        http = HttpServerConnection(stream)
        request = await http.next_request()
        assert request is not None
        ws = await http.accept_websocket(request, subprotocol=control.CONTROL_SUBPROTOCOL)
        machine = control.HubControl()
        with contextlib.suppress(ConnectionClosed):
            while True:
                event = await ws.receive()
                for message in machine.receive(payload(event), message_finished=True):
                    assert isinstance(message, control.Register)
                    registers.append(trio.current_time())
                    if answer:
                        await ws.send_text(machine.send(control.Registered(names=message.names)))

    async def opener(address: HubAddress) -> trio.abc.Stream:
        opens.append(trio.current_time())
        client, server = trio.testing.memory_stream_pair()
        hub_env.nursery.start_soon(hub, server, len(opens) > 1)
        return client

    cs = ConnectionString(
        host_name="hub.test:8080",
        device_id="d1",
        shared_access_key=new_key(os.urandom(32)),
        use_tls=False,
    )
    device = DeviceClient(cs, opener=opener, ping_timeout=4.0, backoff_min=1.0, rng=Fixed(0.5))
    with trio.fail_after(30):
        start = trio.current_time()
        await hub_env.nursery.start(device.serve, {"echo": echo})
        assert device.online and device.connections == 1
        assert [t - start for t in opens] == [0.0, 4.5]  # 4 s unanswered, then 0.5 * 1 s
        assert [t - start for t in registers] == [0.0, 4.5]
        assert trio.current_time() - start == 4.5


async def test_device_client_retries_an_opener_that_raises_os_error(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    opens: list[float] = []

    async def opener(address: HubAddress) -> trio.abc.Stream:
        opens.append(trio.current_time())
        if len(opens) == 1:
            await trio.lowlevel.checkpoint()
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        return await hub_env.open(address)

    device = DeviceClient(cs, opener=opener, backoff_min=2.0, rng=Fixed(0.25))
    with trio.fail_after(30):
        start = trio.current_time()
        await hub_env.nursery.start(device.serve, {"echo": echo})
        assert [t - start for t in opens] == [0.0, 0.5]
        assert device.online
        await round_trip(hub_env, "d1")


def test_long_wait_cause_names_a_replacement_or_the_refusal() -> None:
    replaced = long_wait_cause(ErrorCode.DEVICE_REPLACED, "ignored")
    assert replaced == "replaced by a newer connection (another client uses this device id)"
    refused = long_wait_cause(ErrorCode.DEVICE_NOT_FOUND, "device 'd1' not found")
    assert refused == "the hub refuses it: device 'd1' not found (error 404001)"
    plain = long_wait_cause(ErrorCode.DEVICE_NOT_FOUND)
    assert plain == f"the hub refuses it: {ErrorCode.DEVICE_NOT_FOUND.message} (error 404001)"
