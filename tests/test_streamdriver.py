"""Tests of the stream driver: one devstream.v1 stream's life, decided in the core.

Rules: pure core tests, no I/O and no clock: time is a number each call is given, and a
reconnection's jitter is a number too, so every deadline is asserted exactly. Two drivers talk
through :class:`Link`, which holds each side's messages until a test delivers them (whole, as
the hub relays them) and loses what a dropped connection had in flight. The phase table is
walked pair by pair through the public API; a pair missing from it raises, or is one of the few
documented no-ops. A hypothesis state machine drives two drivers over a link that drops
connections at random and checks the driver's promises after every step.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from devstream_core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from devstream_core.exceptions import DeviceNotFound, HubError, StreamReset
from devstream_core.framing import (
    MAX_MESSAGE_SIZE,
    Ack,
    Data,
    EndpointState,
    FrameDecoder,
    Resume,
)
from devstream_core.streamdriver import (
    ACK_DELAY,
    ACK_PROBE,
    DIRECT_READ_TIME,
    FINAL_ERRORS,
    FIRST_RESUME_DELAY,
    IDLE_ACK,
    MAX_RESUME_DELAY,
    PHASE_TRANSITIONS,
    PROBE_TIMEOUT,
    STALL_PROBE,
    CloseConnection,
    Connect,
    DropConnection,
    Flush,
    Outcome,
    OutcomeKind,
    PhaseInput,
    SendPing,
    StreamDriver,
    StreamOptions,
    StreamPhase,
)

P = StreamPhase
I = PhaseInput  # noqa: E741
OPTIONS = StreamOptions(
    window=4096, ping_interval=10, ping_timeout=4, resume_timeout=30, close_timeout=5
)
GARBAGE = b"\x7f" + (8).to_bytes(4, "big") + bytes(8)  # an unknown frame type


class Link:
    """Two connected drivers, ``a`` and ``b``; messages wait in a queue per direction."""

    def __init__(self, options: StreamOptions = OPTIONS, now: float = 0.0) -> None:
        self.a = StreamDriver(options, now=now)
        self.b = StreamDriver(options, now=now)
        self.a.connection_made(now)
        self.b.connection_made(now)
        self.queue: dict[StreamDriver, list[bytes]] = {self.a: [], self.b: []}

    def peer(self, side: StreamDriver) -> StreamDriver:
        return self.b if side is self.a else self.a

    def flush(self, side: StreamDriver) -> list[bytes]:
        """Take every message *side* has to send, checking each against the hub's limit."""
        out = []
        while message := side.next_message():
            assert len(message) <= MAX_MESSAGE_SIZE
            out.append(message)
        self.queue[side] += out
        return out

    def deliver(self, side: StreamDriver, now: float) -> None:
        """Deliver what *side* sent to its peer."""
        peer = self.peer(side)
        queued, self.queue[side] = self.queue[side], []
        for message in queued:
            peer.receive(message, now)

    def pump(self, now: float, *, read: bool = True) -> None:
        """Exchange everything (reading what arrives when *read*) until both are quiet."""
        for _ in range(100):
            moved = False
            for side in (self.a, self.b):
                if read and side.endpoint.state is EndpointState.OPEN:
                    side.read(None, now)
                if self.flush(side):
                    moved = True
                self.deliver(side, now)
            if not moved:
                return
        raise AssertionError("the drivers never went quiet")


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def test_the_table_is_the_documented_one() -> None:
    """The module docstring's picture, pair by pair (a change to one is a change to both)."""
    assert {
        (P.OPENING, I.CONNECTED): P.OPEN,
        (P.OPENING, I.ABORT): P.CLOSED,
        (P.OPEN, I.LOST): P.RESUMING,
        (P.OPEN, I.CLOSE): P.CLOSING,
        (P.OPEN, I.RESET): P.RESETTING,
        (P.OPEN, I.FINISHED): P.FINISHING,
        (P.OPEN, I.FAIL): P.FINISHING,
        (P.OPEN, I.PEER_CLOSED): P.CLOSED,
        (P.OPEN, I.ABORT): P.CLOSED,
        (P.RESUMING, I.CONNECTED): P.OPEN,
        (P.RESUMING, I.CLOSE): P.CLOSING,
        (P.RESUMING, I.RESET): P.RESETTING,
        (P.RESUMING, I.GIVE_UP): P.CLOSED,
        (P.RESUMING, I.ABORT): P.CLOSED,
        (P.CLOSING, I.CONNECTED): P.CLOSING,
        (P.CLOSING, I.LOST): P.CLOSING,
        (P.CLOSING, I.RESET): P.FINISHING,
        (P.CLOSING, I.FINISHED): P.FINISHING,
        (P.CLOSING, I.FAIL): P.FINISHING,
        (P.CLOSING, I.CLOSE_TIMEOUT): P.FINISHING,
        (P.CLOSING, I.GIVE_UP): P.CLOSED,
        (P.CLOSING, I.PEER_CLOSED): P.CLOSED,
        (P.CLOSING, I.ABORT): P.CLOSED,
        (P.RESETTING, I.CONNECTED): P.RESETTING,
        (P.RESETTING, I.LOST): P.RESETTING,
        (P.RESETTING, I.RESET): P.RESETTING,
        (P.RESETTING, I.CLOSE): P.FINISHING,
        (P.RESETTING, I.FINISHED): P.FINISHING,
        (P.RESETTING, I.FAIL): P.FINISHING,
        (P.RESETTING, I.GIVE_UP): P.CLOSED,
        (P.RESETTING, I.PEER_CLOSED): P.CLOSED,
        (P.RESETTING, I.ABORT): P.CLOSED,
        (P.FINISHING, I.CLOSE): P.FINISHING,
        (P.FINISHING, I.RESET): P.FINISHING,
        (P.FINISHING, I.FAIL): P.FINISHING,
        (P.FINISHING, I.LOST): P.CLOSED,
        (P.FINISHING, I.CONNECTED): P.FINISHING,
        (P.FINISHING, I.GIVE_UP): P.CLOSED,
        (P.FINISHING, I.CLOSE_TIMEOUT): P.CLOSED,
        (P.FINISHING, I.PEER_CLOSED): P.CLOSED,
        (P.FINISHING, I.ABORT): P.CLOSED,
        (P.CLOSED, I.CLOSE): P.CLOSED,
        (P.CLOSED, I.RESET): P.CLOSED,
        (P.CLOSED, I.LOST): P.CLOSED,
        (P.CLOSED, I.PEER_CLOSED): P.CLOSED,
        (P.CLOSED, I.ABORT): P.CLOSED,
    } == PHASE_TRANSITIONS


def test_closed_is_final() -> None:
    assert all(
        after is P.CLOSED for (before, _), after in PHASE_TRANSITIONS.items() if before is P.CLOSED
    )


def in_phase(
    phase: StreamPhase, *, connected: bool = True, broken: bool = False
) -> tuple[Link, StreamDriver]:
    """A link whose side ``a`` is in *phase* (with or without a connection, where it may be
    either), reached through the public API only. ``FINISHING`` is reached by both EOFs
    acknowledged, or with *broken* by the peer breaking the protocol (a stream that ended
    badly: a drop then ends it)."""
    link = Link()
    a = link.a
    if phase is P.OPENING:
        link.a = a = StreamDriver(OPTIONS, now=0.0)
        return link, a
    if phase is P.RESUMING:
        a.connection_lost(1.0)
    elif phase is P.CLOSING:
        a.endpoint.write(b"unacknowledged")
        a.close(1.0)
    elif phase is P.RESETTING:
        a.reset(9, "stop", 1.0)
    elif phase is P.FINISHING and broken:
        with pytest.raises(RemoteProtocolError):
            a.receive(GARBAGE, 1.0)
    elif phase is P.FINISHING:
        a.write_eof()
        link.b.write_eof()
        link.pump(1.0)
    elif phase is P.CLOSED:
        a.abort(1.0)
    if not connected:
        a.connection_lost(1.0)
    assert a.phase is phase
    return link, a


def finish(link: Link, a: StreamDriver) -> bool:
    """Make *a* finish as its phase can: both EOFs acknowledged, its own EOF acknowledged, or
    its reset confirmed. False when its phase has nothing to finish."""
    if a.phase is P.OPEN:
        a.write_eof()
        link.b.write_eof()
    elif a.phase not in (P.CLOSING, P.RESETTING) or not a.connected:
        return False
    link.pump(2.0)
    return True


def give_up(link: Link, a: StreamDriver) -> bool:
    if not a.wants_connection:
        return False
    a.connect_started(2.0)
    assert a.connect_failed(2.0, 0.5, code=ErrorCode.UNAUTHORIZED, message="no") is None
    return True


def close_timeout(link: Link, a: StreamDriver) -> bool:
    if a.close_deadline == math.inf:
        return False
    a.timer(a.close_deadline, a.close_deadline)
    return True


def fail(link: Link, a: StreamDriver) -> bool:
    with pytest.raises(RemoteProtocolError):
        a.receive(GARBAGE, 2.0)
    return True


#: How each input is given through the public API; False: it cannot be in this phase.
APPLY: dict[PhaseInput, Callable[[Link, StreamDriver], bool | None]] = {
    I.CONNECTED: lambda link, a: a.connection_made(2.0),
    I.LOST: lambda link, a: a.connection_lost(2.0),
    I.CLOSE: lambda link, a: a.close(2.0),
    I.RESET: lambda link, a: a.reset(7, "reset", 2.0),
    I.FINISHED: finish,
    I.FAIL: fail,
    I.CLOSE_TIMEOUT: close_timeout,
    I.GIVE_UP: give_up,
    I.PEER_CLOSED: lambda link, a: a.connection_closed(1000, "", 2.0),
    I.ABORT: lambda link, a: a.abort(2.0),
}

#: Pairs the table leaves out that the API takes without a change: a drop reported when no
#: connection is up (as StreamEndpoint.connection_lost).
NO_OPS = {(P.OPENING, I.LOST), (P.RESUMING, I.LOST)}
#: Pairs the table leaves out that no call can produce: the driver never asks for them.
UNREACHABLE = {
    (P.OPENING, I.FINISHED),
    (P.OPENING, I.CLOSE_TIMEOUT),
    (P.OPENING, I.GIVE_UP),
    (P.OPEN, I.CLOSE_TIMEOUT),
    (P.OPEN, I.GIVE_UP),
    (P.RESUMING, I.FINISHED),
    (P.RESUMING, I.CLOSE_TIMEOUT),
    (P.RESETTING, I.CLOSE_TIMEOUT),
    (P.FINISHING, I.FINISHED),
    (P.CLOSED, I.FINISHED),
    (P.CLOSED, I.CLOSE_TIMEOUT),
    (P.CLOSED, I.GIVE_UP),
}
#: Where the input needs the stream without a connection (FINISHING: a stream that ended
#: well and lost its connection, resuming to deliver its last frames).
DISCONNECTED = {
    (P.CLOSING, I.CONNECTED),
    (P.CLOSING, I.GIVE_UP),
    (P.RESETTING, I.CONNECTED),
    (P.RESETTING, I.GIVE_UP),
    (P.FINISHING, I.CONNECTED),
    (P.FINISHING, I.GIVE_UP),
}
#: Where the input needs a stream that ended badly: one that ended well resumes instead.
BROKEN = {(P.FINISHING, I.LOST)}


@pytest.mark.parametrize(("phase", "event"), list(itertools.product(P, I)))
def test_table_walk(phase: StreamPhase, event: PhaseInput) -> None:
    """Every pair, through the public API: a pair in the table moves to its phase; a pair
    missing from it raises LocalProtocolError and changes nothing, but for the documented
    no-ops and the pairs no call can produce."""
    pair = (phase, event)
    link, a = in_phase(phase, connected=pair not in DISCONNECTED, broken=pair in BROKEN)
    outcome = a.outcome
    try:
        applied = APPLY[event](link, a)
    except LocalProtocolError:
        assert pair not in PHASE_TRANSITIONS
        assert pair not in NO_OPS | UNREACHABLE
        assert a.phase is phase and a.outcome == outcome
        return
    if applied is False:
        assert pair in UNREACHABLE
        return
    if pair in PHASE_TRANSITIONS:
        assert a.phase is PHASE_TRANSITIONS[pair]
    else:
        assert pair in NO_OPS and a.phase is phase, pair


def test_every_pair_of_the_table_is_reached() -> None:
    """No pair of the table is among those the walk cannot produce."""
    assert not UNREACHABLE & set(PHASE_TRANSITIONS)
    assert not NO_OPS & set(PHASE_TRANSITIONS)


# --------------------------------------------------------------------------------------------
# Deadlines
# --------------------------------------------------------------------------------------------


def test_a_new_stream_waits_for_its_keepalive() -> None:
    driver = StreamDriver(OPTIONS, now=3.0)
    assert driver.phase is P.OPENING and driver.next_deadline(0.0) == math.inf
    assert driver.timer(100.0, 0.0) == []
    assert driver.direct_read_until == 3.0 + DIRECT_READ_TIME
    driver.connection_made(3.0)
    assert driver.phase is P.OPEN and driver.connected
    assert driver.next_deadline(3.0) == 13.0  # the ping, before the silence limit (17)


def test_keepalive_pings_and_a_silent_connection_is_dropped() -> None:
    link = Link()
    a = link.a
    assert a.timer(9.99, 0.0) == []
    assert a.timer(10.0, 9.0) == [SendPing()]
    assert a.next_deadline(9.0) == 20.0
    assert a.next_deadline(2.0) == 16.0  # silent since 2: ping_interval + ping_timeout
    assert a.timer(16.0, 2.0) == [DropConnection()]
    a.connection_lost(16.0)
    assert a.phase is P.RESUMING


def test_the_ack_of_the_peers_eof_waits_ack_delay() -> None:
    link = Link()
    a, b = link.a, link.b
    b.write_eof()
    link.flush(b)
    link.deliver(b, 1.0)
    assert a.read(None, 1.0) == b""
    assert a.endpoint.at_eof and a.ack_deferred
    assert a.ack_deadline == 1.0 + ACK_DELAY
    assert a.next_deadline(1.0) == 1.0 + ACK_DELAY
    assert a.read(None, 1.001) == b""  # read again: the deadline stays
    assert a.ack_deadline == 1.0 + ACK_DELAY
    assert a.timer(1.0 + ACK_DELAY, 1.0) == [Flush()]
    assert not a.ack_deferred and a.next_deadline(1.0) == 10.0
    assert link.flush(a)


def test_a_send_takes_the_deferred_ack_along() -> None:
    link = Link()
    a, b = link.a, link.b
    b.write_eof()
    link.flush(b)
    link.deliver(b, 1.0)
    a.read(None, 1.0)
    a.write_eof()
    assert len(link.flush(a)) == 1  # the Ack and the EOF, in one message
    assert not a.ack_deferred


def test_close_waits_close_timeout_then_resets() -> None:
    link = Link()
    a, b = link.a, link.b
    a.endpoint.write(b"never read")
    a.close(3.0)
    assert a.phase is P.CLOSING and a.eof_written
    assert a.close_deadline == 8.0 and a.next_deadline(3.0) == 8.0
    link.flush(a)
    link.deliver(a, 3.5)  # the peer does not read
    # (Its frames wait for an acknowledgement, with nothing arriving since 7.0: a probe.)
    assert a.timer(7.99, 7.0) == [SendPing()]
    assert a.timer(8.0, 7.0) == [Flush()]
    assert a.phase is P.FINISHING
    assert a.outcome == Outcome(
        kind=OutcomeKind.RESET,
        code=int(ErrorCode.STREAM_RESET),
        reason="closed before the peer read all",
    )
    assert a.close_deadline == 13.0
    assert a.closing is None  # the Reset goes first
    link.flush(a)
    assert a.closing == CloseConnection(code=1000)
    a.close_sent(9.0)
    assert a.closing is None and a.close_deadline == 14.0
    assert a.timer(14.0, 9.0) == [DropConnection()]
    assert a.phase is P.CLOSED and a.next_deadline(9.0) == math.inf
    link.deliver(a, 9.5)
    assert b.endpoint.state is EndpointState.RESET


def test_a_close_acknowledged_finishes_and_takes_the_peers_eof_along() -> None:
    """Both close at once without reading the other's EOF: each acknowledges the other's EOF
    that came right after what it read, so both finish without waiting."""
    link = Link()
    a, b = link.a, link.b
    a.close(1.0)
    link.flush(a)
    link.deliver(a, 1.0)
    b.close(1.0)  # the acknowledgement of a's EOF goes with b's own
    link.flush(b)
    link.deliver(b, 1.0)
    assert a.phase is P.FINISHING and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    link.flush(a)
    link.deliver(a, 1.0)
    assert b.phase is P.FINISHING and b.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    a.connection_closed(1000, "", 1.1)
    assert a.phase is P.CLOSED and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)


def test_an_eof_behind_unread_bytes_is_not_acknowledged_while_closing() -> None:
    link = Link()
    a, b = link.a, link.b
    b.endpoint.write(b"unread")
    b.write_eof()
    link.flush(b)
    a.close(1.0)
    link.deliver(b, 1.0)
    link.flush(a)
    link.deliver(a, 1.0)
    assert a.phase is P.CLOSING and not b.endpoint.eof_acked


def test_both_eofs_acknowledged_finish_an_open_stream() -> None:
    link = Link()
    a, b = link.a, link.b
    a.write_eof()
    b.write_eof()
    link.pump(1.0)
    assert a.phase is P.FINISHING and b.phase is P.FINISHING
    assert a.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    assert a.closing == CloseConnection(code=1000)
    a.close(1.5)  # the application's close changes nothing more
    assert a.phase is P.FINISHING
    a.connection_closed(1000, "", 2.0)  # the answer to its close
    assert a.phase is P.CLOSED and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)


def finishing_pair() -> tuple[Link, StreamDriver, StreamDriver]:
    """``a`` closed first; ``b`` read its EOF and closed, acknowledging it: ``a`` finished (its
    last message, the Ack of ``b``'s EOF, still to go), ``b`` closing and waiting for that Ack."""
    link = Link()
    a, b = link.a, link.b
    a.close(1.0)  # a's EOF goes to b
    link.flush(a)
    link.deliver(a, 1.0)
    assert b.read(None, 1.0) == b""
    b.close(1.0)  # b's EOF, with the Ack of a's EOF: a finishes, owing the Ack of b's
    link.flush(b)
    link.deliver(b, 1.0)
    assert a.phase is P.FINISHING and b.phase is P.CLOSING
    return link, a, b


def test_a_finished_side_that_loses_its_connection_resumes_to_deliver_its_last_frames() -> None:
    """The last Ack (of the peer's EOF) and the close may not have reached the hub: the peer
    would wait close_timeout for them, then reset. The side resumes once more and sends them
    again, then its close."""
    _, a, b = finishing_pair()
    lost = a.next_message(1.0)  # the Ack b waits for, lost with the connection
    assert lost and a.closing == CloseConnection(code=1000)
    a.close_sent(1.0)
    a.connection_lost(1.2)
    assert a.phase is P.FINISHING and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    assert a.wants_connection
    assert a.next_deadline(1.2) == 1.2  # at once
    [connect] = a.timer(1.2, 1.2)
    assert isinstance(connect, Connect)
    a.connection_made(1.25)
    # Resume and the Ack again, then the close.
    resend = a.next_message(1.25)
    assert resend and a.closing == CloseConnection(code=1000)
    b.connection_lost(1.25)  # (b's connection is untouched in the hub's eyes: a Resume
    b.connection_made(1.25)  # reaches it on a connection that carries on)
    b.receive(resend, 1.3)
    assert b.phase is P.FINISHING and b.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    a.close_sent(1.3)
    a.connection_closed(1000, "", 1.35)
    assert a.phase is P.CLOSED and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)


def test_a_finished_side_whose_close_the_hub_had_ends_at_the_refusal() -> None:
    _, a, _ = finishing_pair()
    a.next_message(1.0)
    a.close_sent(1.0)
    a.connection_lost(1.1)
    a.connect_started(1.1)
    done = a.connect_failed(1.15, 0.5, code=ErrorCode.NOT_FOUND, message="stream closed")
    assert done is None
    assert a.phase is P.CLOSED and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)


def test_a_finished_side_that_cannot_resume_ends_after_close_timeout() -> None:
    _, a, _ = finishing_pair()
    a.next_message(1.0)
    a.close_sent(1.0)
    a.connection_lost(2.0)
    assert a.close_deadline == 2.0 + OPTIONS.close_timeout  # a fresh one, from the drop
    now, attempts = 2.0, 0
    while True:
        for action in a.timer(now, now):
            if isinstance(action, Connect):
                attempts += 1
                a.connect_failed(now, 0.5, code=None, message="refused")
        if a.phase is P.CLOSED:
            break
        now = a.next_deadline(now)
    assert now == 2.0 + OPTIONS.close_timeout and attempts > 3
    assert a.outcome == Outcome(kind=OutcomeKind.COMPLETED)


def test_a_side_that_ended_badly_does_not_resume_after_its_close() -> None:
    link = Link()
    a = link.a
    with pytest.raises(RemoteProtocolError):
        a.receive(GARBAGE, 1.0)
    assert a.phase is P.FINISHING and a.outcome is not None
    assert a.outcome.kind is OutcomeKind.BROKEN
    a.connection_lost(1.1)
    assert a.phase is P.CLOSED and not a.wants_connection


def test_a_reset_finishes_once_confirmed() -> None:
    link = Link()
    a, b = link.a, link.b
    a.reset(42, "enough", 1.0)
    assert a.phase is P.RESETTING and a.outcome is None
    assert a.next_deadline(1.0) == 10.0  # the keepalive; a reset waits for no deadline
    link.pump(1.0)
    assert b.phase is P.FINISHING and a.phase is P.FINISHING
    for side in (a, b):
        assert side.outcome == Outcome(kind=OutcomeKind.RESET, code=42, reason="enough")
    b.reset(1, "again", 1.5)  # over already: nothing changes
    assert b.outcome == Outcome(kind=OutcomeKind.RESET, code=42, reason="enough")


def test_a_device_adopts_the_window_its_service_chose() -> None:
    assert OPTIONS.for_window(None) is OPTIONS
    assert OPTIONS.for_window(OPTIONS.window) is OPTIONS
    adopted = OPTIONS.for_window(1 << 16)
    assert adopted.window == 1 << 16 and adopted.ping_timeout == OPTIONS.ping_timeout


def test_error_names_how_a_stream_broke() -> None:
    link = Link()
    a, b = link.a, link.b
    assert a.error() is None and b.error() is None
    a.reset(4242, "enough", 1.0)
    link.flush(a)
    link.deliver(a, 1.0)
    error = b.error()  # before the outcome: the Reset has arrived
    assert isinstance(error, StreamReset) and error.reset_code == 4242
    assert error.message == "enough"
    failed = Link().a
    failed.connection_closed(4404, "404001 no such device", 1.0)
    assert isinstance(failed.error(), DeviceNotFound)
    broken = Link().a
    with pytest.raises(RemoteProtocolError):
        broken.receive(GARBAGE, 1.0)
    error = broken.error()
    assert type(error) is RemoteProtocolError and error.code is ErrorCode.PROTOCOL_ERROR
    peer_closed = Link().a
    peer_closed.connection_closed(1000, "", 1.0)
    assert peer_closed.error() is None  # no code says it: the adapter's to report


def test_closing_a_reset_stream_finishes_it() -> None:
    _, a = in_phase(P.RESETTING)
    a.close(2.0)
    assert a.phase is P.FINISHING and a.close_deadline == 7.0


def test_a_reset_arriving_while_closing_finishes() -> None:
    link, a = in_phase(P.CLOSING)
    link.b.reset(5, "no", 2.0)
    link.flush(link.b)
    link.deliver(link.b, 2.0)
    assert a.phase is P.FINISHING
    assert a.outcome == Outcome(kind=OutcomeKind.RESET, code=5, reason="no")


def test_a_protocol_error_finishes_with_the_errors_close() -> None:
    link = Link()
    a = link.a
    with pytest.raises(RemoteProtocolError):
        a.receive(GARBAGE, 1.0)
    assert a.phase is P.FINISHING and a.over
    assert a.outcome is not None and a.outcome.kind is OutcomeKind.BROKEN
    assert a.outcome.code == ErrorCode.PROTOCOL_ERROR
    assert a.closing is None  # the Reset first
    [message] = link.flush(a)
    assert message.startswith(bytes([0x04]))
    close = a.closing
    assert close is not None and close.code == ErrorCode.PROTOCOL_ERROR.close_code
    with pytest.raises(LocalProtocolError):
        a.receive(b"more", 1.1)  # the connection is broken until it is lost
    assert a.phase is P.FINISHING


@pytest.mark.parametrize(
    ("code", "reason", "outcome"),
    [
        (1000, "", Outcome(kind=OutcomeKind.PEER_CLOSED)),
        (
            4404,
            "404001 no such device",
            Outcome(kind=OutcomeKind.FAILED, code=404001, reason="no such device"),
        ),
        (
            4999,
            "odd",
            Outcome(
                kind=OutcomeKind.FAILED,
                code=int(ErrorCode.PROTOCOL_ERROR),
                reason="stream closed: 4999 odd",
            ),
        ),
    ],
)
def test_the_other_ends_close(code: int, reason: str, outcome: Outcome) -> None:
    link = Link()
    link.a.connection_closed(code, reason, 1.0)
    assert link.a.phase is P.CLOSED and link.a.outcome == outcome and link.a.over
    assert not link.a.connected and link.a.next_deadline(0.0) == math.inf


def test_a_close_behind_much_data_goes_out_in_growing_messages() -> None:
    link = Link(StreamOptions(window=1 << 20))
    a = link.a
    a.endpoint.write(bytes(300_000))
    a.close(1.0)
    sizes = [len(message) for message in link.flush(a)]
    assert sizes[:2] == [64 * 1024, 128 * 1024]  # whole frames, each within message_size
    assert sum(sizes) == 300_000 + 5 * 13 + 13  # the Data frames' headers and the EOF
    assert a.phase is P.CLOSING


def test_a_close_after_send_eof_writes_no_second_eof() -> None:
    link = Link()
    a = link.a
    a.write_eof()
    a.close(1.0)
    assert a.phase is P.CLOSING and a.close_deadline == 6.0
    link.pump(1.0)
    assert a.phase is P.FINISHING and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)


def test_a_second_close_from_the_other_end_changes_nothing() -> None:
    link = Link()
    link.a.connection_closed(1000, "", 1.0)
    link.a.connection_closed(4404, "404001 gone", 1.5)
    assert link.a.outcome == Outcome(kind=OutcomeKind.PEER_CLOSED)
    assert link.a.phase is P.CLOSED


def test_a_normal_close_after_a_reset_reports_the_reset() -> None:
    link = Link()
    link.a.reset(3, "x", 1.0)
    link.a.connection_closed(1000, "", 1.0)
    assert link.a.outcome == Outcome(kind=OutcomeKind.RESET, code=3, reason="x")


def test_an_abnormal_close_is_a_drop() -> None:
    link = Link()
    link.a.connection_closed(1006, "", 4.0)
    assert link.a.phase is P.RESUMING and link.a.wants_connection
    assert link.a.next_deadline(0.0) == 4.0


def test_resume_attempts_back_off_with_jitter_and_give_up() -> None:
    link = Link()
    a = link.a
    a.connection_lost(10.0)
    assert a.wants_connection and a.next_deadline(0.0) == 10.0
    assert a.timer(10.0, 0.0) == [Connect(deadline=14.0)]  # each attempt: ping_timeout
    assert a.next_deadline(0.0) == 40.0  # while it runs: only the give-up deadline
    assert a.timer(11.0, 0.0) == []
    delays = []
    now = 11.0
    for rand in (0.0, 0.5, 0.999, 0.5, 0.5, 0.5, 0.5):
        retry = a.connect_failed(now, rand, code=None, message="refused")
        assert retry is not None
        delays.append(retry - now)
        now = retry
        assert a.timer(now, 0.0) == [Connect(deadline=min(now + 4.0, 40.0))]
    expected = []
    delay = FIRST_RESUME_DELAY
    for rand in (0.0, 0.5, 0.999, 0.5, 0.5, 0.5, 0.5):
        expected.append(delay / 2 + rand * delay / 2)
        delay = min(delay * 2, MAX_RESUME_DELAY)
    assert delays == pytest.approx(expected)
    # The last attempt's deadline and the delays stop at the give-up time.
    assert a.connect_started(39.0) == 40.0
    assert a.connect_failed(39.5, 0.99, code=None, message="refused") == 40.0
    assert a.timer(40.0, 0.0) == []
    assert a.phase is P.CLOSED
    assert a.outcome == Outcome(
        kind=OutcomeKind.FAILED,
        code=int(ErrorCode.HUB_UNREACHABLE),
        reason="could not resume the stream",
    )


def test_a_failed_attempt_past_the_give_up_time_gives_up() -> None:
    link = Link()
    a = link.a
    a.connection_lost(0.0)
    a.connect_started(29.0)
    assert a.connect_failed(30.0, 0.1, code=ErrorCode.DEVICE_NOT_ONLINE, message="x") is None
    assert a.outcome == Outcome(
        kind=OutcomeKind.FAILED,
        code=int(ErrorCode.HUB_UNREACHABLE),
        reason="could not resume the stream: x",
    )


@pytest.mark.parametrize("code", sorted(FINAL_ERRORS))
def test_a_final_answer_gives_up_at_once(code: ErrorCode) -> None:
    link = Link()
    link.a.connection_lost(0.0)
    link.a.connect_started(0.0)
    assert link.a.connect_failed(0.1, 0.5, code=code, message="refused") is None
    assert link.a.outcome == Outcome(kind=OutcomeKind.FAILED, code=int(code), reason="refused")


def test_a_resumed_connection_starts_a_new_keepalive() -> None:
    link = Link()
    a = link.a
    a.connection_lost(5.0)
    a.connect_started(5.0)
    a.connection_made(6.0)
    assert a.phase is P.OPEN and a.next_deadline(6.0) == 16.0
    assert not a.wants_connection


def test_a_close_timing_out_while_resuming_ends_the_stream() -> None:
    link = Link()
    a = link.a
    a.endpoint.write(b"x")
    a.connection_lost(1.0)
    a.close(2.0)
    assert a.phase is P.CLOSING and a.wants_connection
    assert a.next_deadline(0.0) == 2.0  # the first attempt, due (never in the past)
    a.connect_started(2.0)
    assert a.next_deadline(0.0) == 7.0  # the close deadline comes before the give-up
    assert a.timer(7.0, 0.0) == [DropConnection()]
    assert a.phase is P.CLOSED and not a.wants_connection
    assert a.outcome is not None and a.outcome.kind is OutcomeKind.RESET


def test_a_stalled_message_is_probed_once() -> None:
    link = Link()
    a = link.a
    assert a.stall_timeout(5.0) == STALL_PROBE
    assert a.message_stalled(5.0, 5.05) == [SendPing()]
    assert a.stall_timeout(5.0) is None  # probed: wait for more bytes
    assert a.stall_timeout(5.2) == STALL_PROBE


def acks(messages: list[bytes]) -> list[int]:
    """The offsets of the Acks in *messages*."""
    frames = [frame for message in messages for frame in FrameDecoder().feed(message)]
    return [frame.offset for frame in frames if isinstance(frame, Ack)]


def test_bytes_read_and_not_yet_acknowledged_are_acknowledged_once_the_arrivals_pause() -> None:
    """Below a quarter window no Ack goes out at the read; once nothing more has arrived for
    IDLE_ACK, the timer asks for one, once per arrival: a connection that was cut without a
    sound is then written to, and found out."""
    link = Link()
    a, b = link.a, link.b
    b.endpoint.write(b"x" * 100)
    link.flush(b)
    link.deliver(b, 1.0)
    assert a.read(None, 1.0) == b"x" * 100
    assert not a.endpoint.has_output  # 100 bytes: below the Ack rule's quarter window
    assert a.next_deadline(1.0) == 1.0 + IDLE_ACK
    assert a.timer(1.0 + IDLE_ACK - 0.001, 1.0) == []
    assert a.timer(1.0 + IDLE_ACK, 1.0) == [Flush()]
    assert acks(link.flush(a)) == [100]
    assert a.next_deadline(1.0) == 10.0  # back to the keepalive
    assert a.timer(2.0, 1.0) == []
    # The next arrival counts afresh.
    b.endpoint.write(b"y" * 10)
    link.flush(b)
    link.deliver(b, 3.0)
    assert a.read(None, 3.0) == b"y" * 10
    assert a.timer(3.0 + IDLE_ACK, 3.0) == [Flush()]
    assert acks(link.flush(a)) == [110]


def test_bytes_read_after_the_pause_are_acknowledged_by_the_read() -> None:
    """The timer finds nothing read yet: no Ack, and no deadline left for that arrival (it
    would be due again at once). The application's read that follows queues the Ack itself;
    a second read of the same arrival does not."""
    link = Link()
    a, b = link.a, link.b
    b.endpoint.write(b"x" * 100)
    link.flush(b)
    link.deliver(b, 1.0)
    assert a.next_deadline(1.0) == 1.0 + IDLE_ACK
    assert a.timer(1.0 + IDLE_ACK, 1.0) == []
    assert a.next_deadline(1.0) == 10.0
    assert a.read(60, 2.0) == b"x" * 60
    assert acks(link.flush(a)) == [60]
    assert a.read(None, 2.5) == b"x" * 40
    assert not a.endpoint.has_output  # once per arrival
    assert a.next_deadline(1.0) == 10.0


def test_bytes_the_ack_rule_acknowledged_need_no_idle_ack() -> None:
    link = Link()
    a, b = link.a, link.b
    b.endpoint.write(b"x" * 1024)  # a quarter of the window
    link.flush(b)
    link.deliver(b, 1.0)
    assert a.read(None, 1.0) == b"x" * 1024
    assert acks(link.flush(a)) == [1024]
    assert a.next_deadline(1.0) == 10.0
    assert a.timer(1.0 + IDLE_ACK, 1.0) == []


def test_frames_waiting_for_their_acknowledgement_are_probed_less_and_less_often() -> None:
    """Data went out and nothing arrives: a ping ACK_PROBE after it went out, then, after each
    answer, twice as long after the answer (the keepalive goes on meanwhile); none once the
    wait reaches the keepalive's interval. The peer's Ack starts the count again; nothing
    waiting, nothing probed."""
    link = Link()
    a, b = link.a, link.b
    a.endpoint.write(b"x" * 100)
    assert a.next_deadline(0.0) == 10.0  # written, not yet sent
    message = a.next_message(1.0)  # the time it goes out, as an adapter gives it
    assert message and a.endpoint.awaiting_ack
    assert a.next_deadline(0.5) == 1.0 + ACK_PROBE  # from when it went out
    assert a.timer(1.0 + ACK_PROBE - 0.001, 0.5) == []
    pong = 1.0
    seen = []
    for _ in range(8):
        deadline = a.next_deadline(pong)
        seen.append((round(deadline, 6), a.timer(deadline, pong)))
        pong = deadline + 0.001  # every ping answered at once
    # Waits after each answer of 0.2, 0.4, 0.8, 1.6, 3.2, 6.4 s; the keepalive at 10 and 20.
    assert seen == [
        (1.2, [SendPing()]),
        (1.601, [SendPing()]),
        (2.402, [SendPing()]),
        (4.003, [SendPing()]),
        (7.204, [SendPing()]),
        (10.0, [SendPing()]),
        (16.401, [SendPing()]),  # 6.4 s after the answer to the keepalive
        (20.0, [SendPing()]),  # a wait of 12.8 s would pass the keepalive's: none
    ]
    assert a.next_deadline(pong) == 30.0
    # The peer's Ack of part of it: the count starts again, from the Ack's arrival.
    link.queue[a] = [message]  # it arrives, late
    link.deliver(a, 20.0)
    assert b.read(50, 20.0) == b"x" * 50
    assert b.endpoint.queue_ack()
    link.flush(b)
    link.deliver(b, 20.5)
    assert a.endpoint.acked == 50 and a.endpoint.awaiting_ack
    assert a.next_deadline(20.5) == 20.5 + ACK_PROBE
    assert b.read(None, 21.0) == b"x" * 50
    assert b.endpoint.has_output  # read past IDLE_ACK after the arrival: its Ack is queued
    link.flush(b)
    link.deliver(b, 21.0)
    assert not a.endpoint.awaiting_ack
    assert a.next_deadline(21.0) == 30.0  # the keepalive alone


def test_an_eof_waiting_for_its_acknowledgement_is_probed() -> None:
    link = Link()
    a = link.a
    a.write_eof()
    assert a.next_message(2.0)
    assert a.endpoint.awaiting_ack
    assert a.next_deadline(1.0) == 2.0 + ACK_PROBE
    assert a.timer(2.0 + ACK_PROBE, 1.0) == [SendPing()]


def test_a_resumed_connection_probes_afresh() -> None:
    link = Link()
    a = link.a
    a.endpoint.write(b"x")
    assert a.next_message(1.0)
    assert a.timer(1.0 + ACK_PROBE, 0.0) == [SendPing()]
    assert a.next_deadline(1.0 + ACK_PROBE) == 1.0 + 3 * ACK_PROBE
    a.connection_lost(2.0)
    a.connection_made(2.5)
    assert a.next_message(2.5)  # the Resume, and the byte again
    assert a.next_deadline(2.5) == 2.5 + ACK_PROBE


def run_timer(driver: StreamDriver, last_received: float, until: float) -> list[tuple]:
    """Follow *driver*'s deadlines up to *until* (nothing arriving after *last_received*):
    each deadline (rounded) and what the timer did there, up to a DropConnection."""
    seen: list[tuple] = []
    while (deadline := driver.next_deadline(last_received)) <= until:
        actions = driver.timer(deadline, last_received)
        seen.append((round(deadline, 6), actions))
        if DropConnection() in actions:
            break
    return seen


def heard_link() -> Link:
    """A link whose ``a`` has had a message from its peer (the hub relays, so it answers
    pings), then sent 100 bytes at 1.0 that wait for their acknowledgement."""
    link = Link()
    a, b = link.a, link.b
    b.endpoint.write(b"y")
    link.flush(b)
    link.deliver(b, 0.5)
    assert a.read(None, 0.5) == b"y"
    a.endpoint.write(b"x" * 100)
    assert a.next_message(1.0)
    return link


def test_a_probe_left_unanswered_drops_the_connection() -> None:
    """Frames wait for their acknowledgement, a message came on this connection, and nothing
    arrives after the first probe: PROBE_TIMEOUT after it the connection is dropped (the
    stream resumes), long before the keepalive's rule (14 s here). The probes sent meanwhile
    do not put it off."""
    a = heard_link().a
    first = 1.0 + ACK_PROBE
    assert run_timer(a, 0.5, 30.0) == [
        (1.0, [Flush()]),  # the idle Ack of the byte read
        (first, [SendPing()]),
        (1.0 + 2 * ACK_PROBE, [SendPing()]),
        (1.0 + 4 * ACK_PROBE, [SendPing()]),
        (1.0 + 8 * ACK_PROBE, [SendPing()]),
        (round(first + PROBE_TIMEOUT, 6), [DropConnection()]),
    ]


def test_an_answered_probe_keeps_the_connection() -> None:
    """Every probe answered (a pong arrives): no drop, the probes thin out as before."""
    a = heard_link().a
    pong = 0.5
    for _ in range(6):
        deadline = a.next_deadline(pong)
        assert DropConnection() not in a.timer(deadline, pong)
        pong = deadline + 0.001
    assert pong > 1.0 + ACK_PROBE + PROBE_TIMEOUT
    assert a.phase is P.OPEN


def test_a_probe_before_anything_came_waits_for_the_keepalive() -> None:
    """Nothing came on the connection yet: the hub may not read this side (its peer has not
    joined) and leaves its pings unanswered; the probes go out, but only the keepalive's
    rule (ping_interval + ping_timeout of silence) drops the connection."""
    link = Link()
    a = link.a
    a.endpoint.write(b"x" * 100)
    assert a.next_message(1.0)
    seen = run_timer(a, 0.0, 30.0)
    assert seen[-1] == (14.0, [DropConnection()])
    assert [actions for _, actions in seen[:-1]] == [[SendPing()]] * (len(seen) - 1)


def test_a_stalled_message_probed_without_an_answer_drops_the_connection() -> None:
    link = Link()
    a = link.a
    assert a.message_stalled(5.0, 5.05) == [SendPing()]
    assert a.next_deadline(5.0) == 5.05 + PROBE_TIMEOUT
    assert a.timer(5.05 + PROBE_TIMEOUT - 0.001, 5.0) == []
    assert a.timer(5.05 + PROBE_TIMEOUT, 5.0) == [DropConnection()]
    # Answered: the connection stays.
    b = Link().a
    assert b.message_stalled(5.0, 5.05) == [SendPing()]
    assert b.next_deadline(5.06) == 10.0  # the keepalive's ping, as before
    assert b.timer(5.05 + PROBE_TIMEOUT, 5.06) == []


def test_a_stall_probe_after_an_unanswered_probe_does_not_put_the_drop_off() -> None:
    a = heard_link().a
    first = 1.0 + ACK_PROBE
    assert a.timer(first, 0.5) == [Flush(), SendPing()]  # the idle Ack, and the probe
    assert a.message_stalled(0.5, 2.0) == [SendPing()]  # noticed late, nothing came since
    assert a.timer(first + PROBE_TIMEOUT, 0.5) == [DropConnection()]


def test_the_probe_timeout_is_at_most_the_ping_timeout() -> None:
    link = Link(StreamOptions(window=4096, ping_interval=10, ping_timeout=1, resume_timeout=30))
    a = link.a
    assert a.message_stalled(5.0, 5.05) == [SendPing()]
    assert a.next_deadline(5.0) == 6.05
    assert a.timer(6.05, 5.0) == [DropConnection()]


def test_time_never_goes_back() -> None:
    link = Link()
    a = link.a
    assert a.timer(10.0, 9.0) == [SendPing()]
    assert a.timer(5.0, 9.0) == []  # an earlier now is taken as the latest one
    assert a.next_deadline(0.0) >= 10.0


def test_abort_before_the_first_connection() -> None:
    driver = StreamDriver(now=0.0)
    assert driver.options == StreamOptions()
    driver.abort(1.0)
    assert driver.phase is P.CLOSED
    assert driver.outcome == Outcome(kind=OutcomeKind.ABORTED)


def test_bad_arguments() -> None:
    with pytest.raises(LocalProtocolError):
        StreamDriver(StreamOptions(close_timeout=0), now=0.0)
    with pytest.raises(LocalProtocolError):
        StreamDriver(StreamOptions(ping_interval="10"), now=0.0)  # type: ignore[arg-type]
    link = Link()
    with pytest.raises(LocalProtocolError):
        link.a.connect_started(1.0)  # connected: no attempt is wanted
    link.a.connection_lost(1.0)
    with pytest.raises(LocalProtocolError):
        link.a.connect_failed(1.0, 1.0, code=None, message="x")


def test_close_sent_without_a_close_owed_changes_nothing() -> None:
    link = Link()
    link.a.close_sent(1.0)
    assert link.a.close_deadline == math.inf


# --------------------------------------------------------------------------------------------
# Two drivers over a lossy link
# --------------------------------------------------------------------------------------------

STREAM = b"".join(hashlib.blake2b(bytes([n]), digest_size=64).digest() for n in range(256)) * 64
LOSSY_OPTIONS = StreamOptions(
    window=2 * MAX_MESSAGE_SIZE, ping_interval=2, ping_timeout=1, resume_timeout=60, close_timeout=5
)


class LossyLink(RuleBasedStateMachine):
    """Two drivers, a hub between them that forwards whole messages, and connections that
    drop (what was on its way to the dropped side is lost; of what it sent, the hub got a
    prefix). Time moves forward by steps; each side carries out what its timer asks."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.sides = [StreamDriver(LOSSY_OPTIONS, now=0.0) for _ in range(2)]
        for side in self.sides:
            side.connection_made(0.0)
        self.queue: list[list[bytes]] = [[], []]  # messages from each side
        self.heard = [0.0, 0.0]
        self.written = [0, 0]
        self.read = [bytearray(), bytearray()]
        self.attempt = [False, False]

    def send(self, i: int) -> None:
        side = self.sides[i]
        while message := side.next_message():
            assert len(message) <= MAX_MESSAGE_SIZE
            if self.sides[1 - i].connected:
                self.queue[i].append(message)  # the hub drops what the absent side misses

    def drop(self, i: int, kept: int) -> None:
        side = self.sides[i]
        self.queue[1 - i].clear()  # on its way to the dropped side: lost
        del self.queue[i][kept:]
        side.connection_lost(self.now)

    @rule(i=st.integers(0, 1), size=st.integers(1, 300_000))
    def write(self, i: int, size: int) -> None:
        side = self.sides[i]
        if side.endpoint.send_capacity:
            start = self.written[i]
            self.written[i] += side.endpoint.write(STREAM[start : start + size])
        self.send(i)

    @rule(i=st.integers(0, 1))
    def write_eof(self, i: int) -> None:
        side = self.sides[i]
        if not side.eof_written and side.endpoint.state is EndpointState.OPEN:
            side.write_eof()
            self.send(i)

    @rule(i=st.integers(0, 1), size=st.one_of(st.none(), st.integers(1, 100_000)))
    def read_some(self, i: int, size: int | None) -> None:
        side = self.sides[i]
        if side.endpoint.state is EndpointState.OPEN:
            self.read[i] += side.read(size, self.now)
            self.send(i)

    @rule(i=st.integers(0, 1), count=st.integers(1, 4))
    def deliver(self, i: int, count: int) -> None:
        peer = self.sides[1 - i]
        for message in self.queue[i][:count]:
            if peer.connected:
                try:
                    peer.receive(message, self.now)
                except RemoteProtocolError:  # pragma: no cover - the invariant below fails
                    raise AssertionError("a driver broke the protocol") from None
                self.heard[1 - i] = self.now
        del self.queue[i][:count]
        self.send(1 - i)

    @precondition(lambda self: any(side.connected for side in self.sides))
    @rule(i=st.integers(0, 1), kept=st.integers(0, 3))
    def drop_connection(self, i: int, kept: int) -> None:
        if self.sides[i].connected:
            self.drop(i, kept)

    @rule(step=st.sampled_from([0.001, ACK_DELAY, 0.5, 1.5, 3.0]))
    def time_passes(self, step: float) -> None:
        self.now += step
        for i, side in enumerate(self.sides):
            for action in side.timer(self.now, self.heard[i]):
                if isinstance(action, SendPing):
                    self.heard[i] = self.now  # the hub answers the ping
                elif isinstance(action, DropConnection):
                    if side.connected:
                        # A side whose stream is over closes a connection that carried
                        # everything it sent long ago: the hub forwards all of it. A side
                        # that gives up on a silent connection loses what is still on its way.
                        kept = len(self.queue[i]) if side.phase is P.CLOSED else 0
                        self.drop(i, kept)
                elif isinstance(action, Connect):
                    self.attempt[i] = True
            self.send(i)

    @rule(i=st.integers(0, 1), works=st.booleans(), rand=st.floats(0, 0.999))
    def reconnect(self, i: int, works: bool, rand: float) -> None:
        side = self.sides[i]
        if not side.wants_connection:
            return
        if not self.attempt[i]:
            side.connect_started(self.now)
        self.attempt[i] = False
        if works:
            side.connection_made(self.now)
            self.heard[i] = self.now
            self.send(i)
        else:
            side.connect_failed(self.now, rand, code=None, message="refused")

    @invariant()
    def every_byte_once_in_order(self) -> None:
        for i in range(2):
            got = self.read[i]
            assert got == STREAM[: len(got)]
            assert len(got) <= self.written[1 - i]

    @invariant()
    def deadlines_never_in_the_past(self) -> None:
        for i, side in enumerate(self.sides):
            assert side.next_deadline(self.heard[i]) >= self.now

    @invariant()
    def flow_control_holds(self) -> None:
        for side in self.sides:
            assert side.endpoint.unacked <= side.endpoint.window

    def teardown(self) -> None:
        """Reconnect whatever is down and exchange everything: every byte written arrives."""
        if any(
            side.outcome is not None and side.outcome.kind is OutcomeKind.FAILED
            for side in self.sides
        ):
            return  # gave up (time passed beyond resume_timeout): nothing more to check
        for _ in range(100):
            for i, side in enumerate(self.sides):
                if side.wants_connection:
                    if not self.attempt[i]:
                        side.connect_started(self.now)
                    self.attempt[i] = False
                    side.connection_made(self.now)
            for i in range(2):
                self.read_some(i, None)
                self.send(i)
            for i in range(2):
                self.deliver(i, len(self.queue[i]))
            quiet = not any(self.queue) and not any(s.endpoint.has_output for s in self.sides)
            if quiet and all(s.endpoint.at_eof or not s.endpoint.readable for s in self.sides):
                break  # nothing in flight, nothing left to read
        for i in range(2):
            assert bytes(self.read[i]) == STREAM[: self.written[1 - i]]
        if all(side.eof_written for side in self.sides):
            # Both EOFs written and everything read: the stream completed on both sides, but
            # for one case. A side whose connection dropped with the peer's last Ack on its
            # way cannot complete once that peer completed and left (as a TCP whose last ACK
            # is lost after its peer's TIME_WAIT): it resumes, hears nothing, and its own
            # timers end it later. Every byte still arrived (above).
            completed = Outcome(kind=OutcomeKind.COMPLETED)
            for i, side in enumerate(self.sides):
                if side.outcome != completed:
                    peer = self.sides[1 - i]
                    assert peer.phase is P.CLOSED and peer.outcome == completed
                    assert side.phase in (P.OPEN, P.RESUMING)
                else:
                    assert side.phase in (P.FINISHING, P.CLOSED)


TestLossyLink = LossyLink.TestCase
TestLossyLink.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_the_last_ack_lost_after_the_peer_left_leaves_the_side_resuming() -> None:
    """The case the link's teardown allows, found by it: both EOFs cross, side 1 reads side
    0's and completes; side 0's connection dies (no pong for 3 s) with side 1's Ack of its
    EOF on the way, and side 1 leaves. Side 0 read everything but cannot complete: it
    resumes, and its own timers end it."""
    link = LossyLink()
    link.write_eof(0)
    link.write_eof(1)
    link.deliver(count=1, i=0)
    link.deliver(count=1, i=1)
    link.read_some(0, None)
    link.read_some(1, None)
    link.deliver(count=1, i=0)
    link.time_passes(3.0)
    assert link.sides[1].outcome == Outcome(kind=OutcomeKind.COMPLETED)
    assert link.sides[0].phase is P.RESUMING and link.sides[0].outcome is None
    link.teardown()
    assert link.read[0] == link.read[1] == b""


# --------------------------------------------------------------------------------------------
# What the application's reads get, and what its calls raise
# --------------------------------------------------------------------------------------------


def test_take_gives_bytes_then_nothing_yet_then_the_eof() -> None:
    link = Link()
    a, b = link.a, link.b
    assert b.take(None, 0.0) is None and b.failure() is None
    a.endpoint.write(b"hello")
    link.flush(a)
    link.deliver(a, 0.0)
    assert b.take(2, 0.0) == b"he"
    assert b.take(None, 0.0) == b"llo"
    assert b.take(None, 0.0) is None
    a.write_eof()
    link.flush(a)
    link.deliver(a, 0.0)
    assert b.take(None, 0.0) == b""
    assert b.ack_deferred  # the acknowledgement of the EOF waits for company
    assert b.take(None, 0.0) == b""
    assert b.failure() is None and not b.peer_closed


def test_take_raises_the_reset_once_nothing_is_left_to_read() -> None:
    link = Link()
    a, b = link.a, link.b
    a.endpoint.write(b"last words")
    a.reset(4242, "changed my mind", 0.0)
    link.flush(a)
    link.deliver(a, 0.0)
    with pytest.raises(StreamReset) as info:
        b.take(None, 0.0)
    assert info.value.reset_code == 4242
    assert b.failure() is not None


def test_a_peer_that_closes_before_its_eof_is_a_lost_peer() -> None:
    link = Link()
    b = link.b
    b.connection_closed(1000, "", 1.0)
    assert b.peer_closed and b.phase is P.CLOSED
    with pytest.raises(HubError) as info:
        b.take(None, 1.0)
    assert info.value.code is ErrorCode.PEER_LOST
    assert "before its EOF" in info.value.message


def test_an_abandoned_stream_is_over_for_the_application() -> None:
    link = Link()
    link.a.abort(1.0)
    failure = link.a.failure()
    assert isinstance(failure, HubError) and failure.code is ErrorCode.PEER_LOST
    assert failure.message == "the stream is over"
    assert not link.a.peer_closed


def test_a_completed_stream_reads_its_eof_and_fails_nothing() -> None:
    link = Link()
    a, b = link.a, link.b
    a.write_eof()
    b.write_eof()
    link.pump(0.0)
    assert a.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    assert a.take(None, 0.0) == b"" and a.failure() is None


def test_a_rejoined_first_connection_starts_as_a_resumed_one() -> None:
    """A join tried again may have reached the hub the first time, and the peer sent to that
    connection meanwhile: the stream starts with Resume(0), and sends no data before the
    peer's Resume. The peer sends again from the start; nothing is lost or doubled."""
    link = Link()
    a, b = link.a, link.b
    b.endpoint.write(b"sent to the lost connection")
    lost = link.flush(b)  # to a connection of a's that the hub dropped
    assert lost
    link.queue[b].clear()
    a = link.a = StreamDriver(OPTIONS, now=1.0)
    link.queue[a] = []
    a.connection_made(1.0, rejoined=True)
    a.endpoint.write(b"hello")
    [first] = link.flush(a)
    frames = FrameDecoder().feed(first)
    assert frames[0] == Resume(received=0, reply=True)
    assert not any(isinstance(frame, Data) for frame in frames)  # not before b's Resume
    link.pump(1.1, read=False)
    assert a.read(None, 1.1) == b"sent to the lost connection"
    assert b.read(None, 1.1) == b"hello"


def test_a_stream_that_completes_while_resuming_resumes_to_send_its_last_ack() -> None:
    """The drop came after the peer's EOF and the Ack of this side's arrived, and the
    application closes only then: completed, but the Ack of the peer's EOF and the close have
    yet to go. The resume under way goes on to send them (a close that timed out while
    resuming, by contrast, ends at once)."""
    link = Link()
    a, b = link.a, link.b
    a.write_eof()
    link.pump(1.0)  # b reads a's EOF and acknowledges it
    b.write_eof()
    link.flush(b)
    link.deliver(b, 1.0)  # a has b's EOF, unread
    a.connection_lost(1.1)
    assert a.phase is P.RESUMING
    assert a.read(None, 1.2) == b""
    a.close(1.2)
    assert a.phase is P.FINISHING and a.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    assert a.wants_connection and a.close_deadline == 1.2 + OPTIONS.close_timeout
    a.connection_made(1.3)
    frames = FrameDecoder().feed(a.next_message(1.3))
    # b's EOF (at offset 0) arrived and was read: the Resume and the Ack say 1.
    assert frames == [Resume(received=1, reply=True), Ack(offset=1)]
    assert a.closing == CloseConnection(code=1000)
