"""The life of one devstream.v1 stream: when to acknowledge, ping, resume, give up and close.

:class:`~devstream_core.framing.StreamEndpoint` knows frames, offsets, the window, resume and
reset; it never decides *when* anything happens. :class:`StreamDriver` owns one endpoint and
makes those decisions, the same for every I/O layer (trio, asyncio): how long an
acknowledgement may wait for company, when to ping, when a silent connection counts as lost,
when to probe a stalled message, how big each message is, when to reconnect after a drop and
when to give up, how a close proceeds (EOF, wait for its acknowledgement, reset on timeout,
close the connection), and how the stream ended. It has no clock and no randomness: every
call that depends on time takes ``now`` (seconds, any monotonic origin) and the jitter of a
reconnection delay comes in as ``rand`` (uniform in ``[0, 1)``). Deadlines and actions go out
as data; the adapter sleeps until :meth:`StreamDriver.next_deadline`, then calls
:meth:`StreamDriver.timer` and carries out what it returns.

The stream's life is one table, :data:`PHASE_TRANSITIONS` (:class:`StreamPhase` by
:class:`PhaseInput`), that a test walks pair by pair::

    OPENING --connected--> OPEN --lost--> RESUMING --connected--> OPEN
    OPEN / RESUMING --close--> CLOSING
    CLOSING --finished (EOF acknowledged), reset, close timeout--> FINISHING
    OPEN / RESUMING --reset--> RESETTING --finished (reset confirmed), close--> FINISHING
    OPEN --finished (both EOFs acknowledged), fail--> FINISHING
    FINISHING --peer closed, lost, close timeout, give up--> CLOSED
    FINISHING --connected--> FINISHING (a resume that delivers the last frames, see below)
    RESUMING / CLOSING / RESETTING --give up--> CLOSED; OPEN / ... --peer closed--> CLOSED
    anything --abort--> CLOSED

A pair missing from the table raises :class:`LocalProtocolError` (every input comes from the
adapter). ``CLOSING`` and ``RESETTING`` are held whether or not a connection is up: a drop
while in them is resumed as in ``RESUMING`` (:attr:`StreamDriver.connected` says which).
``FINISHING`` is held over a drop too when the stream ended well (completed, or reset and
settled): the last frames (the acknowledgement of the peer's EOF, the answer to its Reset)
and the close may not have reached the hub, and the peer waits for them. The side resumes
once more to send them and its close again; a hub that had its close answers ``404902``, and
the stream is over. The drop does not count as an answer: it is not the peer's close.

Rules every change must keep:

* **No message over the hub's limit.** Every message :meth:`StreamDriver.next_message` hands
  out is whole frames of at most :attr:`~devstream_core.framing.StreamEndpoint.message_size`
  bytes, never more than :data:`~devstream_core.framing.MAX_MESSAGE_SIZE`.
* **Deadlines are never in the past** of the last ``now`` given: :meth:`next_deadline` is at
  least that, or ``inf`` when nothing is waited for; :meth:`timer` acts on every deadline due
  and moves each one forward (or clears it).
* **Bounded everywhere.** An acknowledgement waits at most :data:`ACK_DELAY`; a connection
  silent for ``ping_interval + ping_timeout`` is dropped, and one silent for
  :data:`PROBE_TIMEOUT` after a probe ping; a reconnection attempt lasts at most
  ``ping_timeout`` and resuming at most ``resume_timeout`` after the drop; a close waits
  ``close_timeout`` for its acknowledgement, then resets; ``FINISHING`` lasts at most
  ``close_timeout`` after the close went out.
* **The outcome is decided once**, on entering ``FINISHING`` or ``CLOSED``, and never changes.

Decisions:

* The acknowledgement of the peer's EOF, made by the read that reaches it, waits up to
  :data:`ACK_DELAY`: the application's EOF or close usually follows at once, and both go out
  in one message. Other acknowledgements go at once.
* While closing, a peer's EOF that arrives right after the last byte the application read is
  acknowledged (as reading it would have): two sides that close at once without reading to
  the EOF finish at once. An EOF behind unread bytes is never acknowledged.
* A close whose EOF is not acknowledged within ``close_timeout`` resets the stream with
  ``STREAM_RESET`` ("closed before the peer read all"): the peer learns not all was read.
* ``FINISHING`` entered without a connection ends at once when a close timed out while
  resuming (the reset is all there is to say, and the peer learns of the drop from the hub);
  when the stream completed while resuming (the application closed after the drop), the
  resume under way goes on, to send the Ack of the peer's EOF and the close. Entered with a
  connection that then drops, it resumes as above, within a fresh ``close_timeout``; a stream
  that ended badly (broken, failed) ends.
* Reconnection: the first attempt at once, then after a delay growing from
  :data:`FIRST_RESUME_DELAY` (doubling, at most :data:`MAX_RESUME_DELAY`), each jittered to
  between half and all of it; a hub answer in :data:`FINAL_ERRORS` gives up at once.
* A message that stops half-way for :data:`STALL_PROBE` makes the stream ping at once (the
  hub writes messages whole, so the connection was likely lost on the way); once per stall.
* What the application read and no Ack covers is acknowledged :data:`IDLE_ACK` after the last
  bytes arrived (by the timer, or by a read made later), once per arrival: the peer learns of
  it sooner than the Ack rule's quarter window would tell it, and a connection lost without
  a sound is written to, and found out.
* Frames that wait for their acknowledgement (data or the EOF) with nothing arriving make the
  stream ping :data:`ACK_PROBE` after they went out or after the last bytes came, whichever
  is later, then twice as long after each answer while the peer's Ack stays where it is;
  none once that wait reaches ``ping_interval`` (the keepalive goes on). A peer that reads
  acknowledges within ``IDLE_ACK``, so a healthy exchange is not probed.
* A probe ping (a stalled message's, or one for frames waiting for their acknowledgement,
  once a message came on the connection) followed by :data:`PROBE_TIMEOUT` (at most
  ``ping_timeout``) without a byte arriving drops the connection, and the stream resumes: a
  connection that went silent both ways while something waits is left within seconds, not
  after the keepalive's ``ping_interval + ping_timeout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Final

from .common import IdentityEnum
from .errors import (
    DevstreamError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    parse_close_reason,
)
from .exceptions import error_for, reset_error
from .framing import (
    DEFAULT_WINDOW,
    ConnectionState,
    DataAvailable,
    EndpointState,
    Event,
    RecvState,
    StreamEndpoint,
)

__all__ = [
    "ACK_DELAY",
    "ACK_PROBE",
    "DIRECT_READ_TIME",
    "FINAL_ERRORS",
    "FIRST_RESUME_DELAY",
    "IDLE_ACK",
    "MAX_RESUME_DELAY",
    "PHASE_TRANSITIONS",
    "PROBE_TIMEOUT",
    "STALL_PROBE",
    "Action",
    "CloseConnection",
    "Connect",
    "DropConnection",
    "Flush",
    "Outcome",
    "OutcomeKind",
    "PhaseInput",
    "SendPing",
    "StreamDriver",
    "StreamOptions",
    "StreamPhase",
]

#: How long the acknowledgement of the peer's EOF may wait for this side's own EOF (or other
#: frames) to go out with it.
ACK_DELAY: Final = 0.005
#: How long a stream stays young after it opened: an adapter may read from the application's
#: own tasks meanwhile (see :attr:`StreamDriver.direct_read_until`).
DIRECT_READ_TIME: Final = 0.1
#: How long a WebSocket message may stop arriving half-way before the stream pings.
STALL_PROBE: Final = 0.05
#: How long after the last bytes arrived the application's reads are acknowledged, when the
#: Ack rule has not sent an Ack for them by then.
IDLE_ACK: Final = 0.05
#: How long frames this side sent may wait for their acknowledgement, with nothing arriving
#: meanwhile, before the stream pings; each answered ping doubles it. Longer than IDLE_ACK and
#: a round trip: a peer that reads acknowledges within IDLE_ACK.
ACK_PROBE: Final = 0.2
#: How long a ping the stream sent because something waits (:data:`STALL_PROBE`,
#: :data:`ACK_PROBE`) may go without a byte arriving before the connection counts as lost (at
#: most ``ping_timeout``). The hub answers a ping at once when it reads the side, as it does
#: once the stream is paired: a connection lost without a sound (a NAT that forgot it, a
#: middlebox's lost state) is left much sooner than by the keepalive's rule.
PROBE_TIMEOUT: Final = 3.0
#: The delay before the second reconnection attempt; each later one doubles it.
FIRST_RESUME_DELAY: Final = 0.05
#: The longest delay between two reconnection attempts.
MAX_RESUME_DELAY: Final = 5.0
#: WebSocket close codes the driver tells apart.
NORMAL_CLOSURE: Final = 1000
ABNORMAL_CLOSURE: Final = 1006
#: Hub answers that end resuming at once: the hub will never take this stream back.
FINAL_ERRORS: Final = frozenset(
    {
        ErrorCode.NOT_FOUND,
        ErrorCode.STREAM_TOKEN_INVALID,
        ErrorCode.STREAM_TOKEN_REUSED,
        ErrorCode.STREAM_TOKEN_WRONG_ROLE,
        ErrorCode.STREAM_TOKEN_WRONG_STREAM,
        ErrorCode.STREAM_TOKEN_EXPIRED,
        ErrorCode.ARGUMENT_INVALID,
        ErrorCode.UNAUTHORIZED,
    }
)
_CLOSE_TIMEOUT_REASON: Final = "closed before the peer read all"


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """Settings of devstream.v1 streams, shared by every stream a client opens."""

    #: The most unacknowledged bytes in flight towards the peer, and the most this side
    #: buffers from the peer. Both sides of a stream use one window: the service's, sent at
    #: initiation (``devstream-stream-window``); a device adopts it for that stream.
    window: int = DEFAULT_WINDOW
    #: Ping the hub this often; a WebSocket silent for ``ping_interval + ping_timeout``
    #: counts as dropped and the stream resumes over a new one.
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    #: Give up resuming after this long (the hub holds a stream 30 s by default).
    resume_timeout: float = 30.0
    #: How long a close waits for the peer to acknowledge everything.
    close_timeout: float = 5.0

    def for_window(self, window: int | None) -> StreamOptions:
        """These options with the *window* a stream's service chose (a device adopts it, so
        both ends agree); unchanged for None (the protocol's default window was chosen)."""
        if window is None or window == self.window:
            return self
        return replace(self, window=window)


class StreamPhase(IdentityEnum):
    """Where one stream is in its life."""

    #: No connection yet.
    OPENING = "opening"
    #: Connected; the application sends and receives.
    OPEN = "open"
    #: The connection dropped: reconnecting with the stream's resume credential.
    RESUMING = "resuming"
    #: The application closed: its EOF is out, the peer's acknowledgement awaited.
    CLOSING = "closing"
    #: Reset (by either side): the Reset goes out until the peer confirms it.
    RESETTING = "resetting"
    #: The outcome is known: the last frames and the WebSocket close go out, the peer's close
    #: is awaited.
    FINISHING = "finishing"
    #: Over: nothing more travels.
    CLOSED = "closed"


class PhaseInput(IdentityEnum):
    """What moves a stream's phase."""

    #: A connection is up (:meth:`StreamDriver.connection_made`).
    CONNECTED = "connected"
    #: The connection dropped (:meth:`StreamDriver.connection_lost`).
    LOST = "lost"
    #: The application closes (:meth:`StreamDriver.close`).
    CLOSE = "close"
    #: The stream was reset, by either side.
    RESET = "reset"
    #: Nothing left to wait for: both EOFs acknowledged (``OPEN``), this side's EOF
    #: acknowledged (``CLOSING``), the reset confirmed and answered (``RESETTING``).
    FINISHED = "finished"
    #: The peer broke the protocol.
    FAIL = "fail"
    #: A close deadline passed.
    CLOSE_TIMEOUT = "close timeout"
    #: Resuming failed for good.
    GIVE_UP = "give up"
    #: The connection was closed by the other end (the peer's close, or the hub's error).
    PEER_CLOSED = "peer closed"
    #: The adapter abandons the stream (a cancelled close, its task ended).
    ABORT = "abort"


_P = StreamPhase
_I = PhaseInput
#: The stream's legal moves.
PHASE_TRANSITIONS: Final = {
    (_P.OPENING, _I.CONNECTED): _P.OPEN,
    (_P.OPENING, _I.ABORT): _P.CLOSED,
    (_P.OPEN, _I.LOST): _P.RESUMING,
    (_P.OPEN, _I.CLOSE): _P.CLOSING,
    (_P.OPEN, _I.RESET): _P.RESETTING,
    (_P.OPEN, _I.FINISHED): _P.FINISHING,
    (_P.OPEN, _I.FAIL): _P.FINISHING,
    (_P.OPEN, _I.PEER_CLOSED): _P.CLOSED,
    (_P.OPEN, _I.ABORT): _P.CLOSED,
    (_P.RESUMING, _I.CONNECTED): _P.OPEN,
    (_P.RESUMING, _I.CLOSE): _P.CLOSING,
    (_P.RESUMING, _I.RESET): _P.RESETTING,
    (_P.RESUMING, _I.GIVE_UP): _P.CLOSED,
    (_P.RESUMING, _I.ABORT): _P.CLOSED,
    (_P.CLOSING, _I.CONNECTED): _P.CLOSING,
    (_P.CLOSING, _I.LOST): _P.CLOSING,
    (_P.CLOSING, _I.RESET): _P.FINISHING,
    (_P.CLOSING, _I.FINISHED): _P.FINISHING,
    (_P.CLOSING, _I.FAIL): _P.FINISHING,
    (_P.CLOSING, _I.CLOSE_TIMEOUT): _P.FINISHING,
    (_P.CLOSING, _I.GIVE_UP): _P.CLOSED,
    (_P.CLOSING, _I.PEER_CLOSED): _P.CLOSED,
    (_P.CLOSING, _I.ABORT): _P.CLOSED,
    (_P.RESETTING, _I.CONNECTED): _P.RESETTING,
    (_P.RESETTING, _I.LOST): _P.RESETTING,
    (_P.RESETTING, _I.RESET): _P.RESETTING,
    (_P.RESETTING, _I.CLOSE): _P.FINISHING,
    (_P.RESETTING, _I.FINISHED): _P.FINISHING,
    (_P.RESETTING, _I.FAIL): _P.FINISHING,
    (_P.RESETTING, _I.GIVE_UP): _P.CLOSED,
    (_P.RESETTING, _I.PEER_CLOSED): _P.CLOSED,
    (_P.RESETTING, _I.ABORT): _P.CLOSED,
    (_P.FINISHING, _I.CLOSE): _P.FINISHING,
    (_P.FINISHING, _I.RESET): _P.FINISHING,
    (_P.FINISHING, _I.FAIL): _P.FINISHING,
    (_P.FINISHING, _I.LOST): _P.CLOSED,
    (_P.FINISHING, _I.CONNECTED): _P.FINISHING,
    (_P.FINISHING, _I.GIVE_UP): _P.CLOSED,
    (_P.FINISHING, _I.CLOSE_TIMEOUT): _P.CLOSED,
    (_P.FINISHING, _I.PEER_CLOSED): _P.CLOSED,
    (_P.FINISHING, _I.ABORT): _P.CLOSED,
    (_P.CLOSED, _I.CLOSE): _P.CLOSED,
    (_P.CLOSED, _I.RESET): _P.CLOSED,
    (_P.CLOSED, _I.LOST): _P.CLOSED,
    (_P.CLOSED, _I.PEER_CLOSED): _P.CLOSED,
    (_P.CLOSED, _I.ABORT): _P.CLOSED,
}

_LIVE: Final = frozenset(
    {ConnectionState.CONNECTED, ConnectionState.RESUMING, ConnectionState.BROKEN}
)
#: Phases in which a dropped connection is resumed (FINISHING too, when it ended well: see
#: StreamDriver.connection_lost).
_RESUMABLE: Final = frozenset({_P.RESUMING, _P.CLOSING, _P.RESETTING})


class OutcomeKind(IdentityEnum):
    """How a stream ended."""

    #: Both EOFs acknowledged (or this side's, and it closed): everything was delivered.
    COMPLETED = "completed"
    #: Reset by either side (``code``, ``reason`` of the reset).
    RESET = "reset"
    #: The peer closed the connection before the stream completed.
    PEER_CLOSED = "peer closed"
    #: The peer broke the protocol (``code``, ``reason`` of the error).
    BROKEN = "broken"
    #: The hub closed the stream with an error, or resuming failed (``code``, ``reason``).
    FAILED = "failed"
    #: Abandoned by the application before any of the above.
    ABORTED = "aborted"


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """How a stream ended, with an :class:`ErrorCode` value (or a reset's code) and reason."""

    kind: OutcomeKind
    code: int = 0
    reason: str = ""


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Flush:
    """Send what :meth:`StreamDriver.next_message` hands out, then the close if one is due."""


@dataclass(frozen=True, kw_only=True)
class SendPing:
    """Ping the connection (its answer counts as hearing from it)."""


@dataclass(frozen=True, kw_only=True)
class DropConnection:
    """Abort the connection without a close; tell :meth:`StreamDriver.connection_lost`."""


@dataclass(frozen=True, kw_only=True)
class Connect:
    """Open a new connection with the resume credential; give up waiting at ``deadline``
    (then :meth:`StreamDriver.connect_failed`)."""

    deadline: float


@dataclass(frozen=True, kw_only=True)
class CloseConnection:
    """Send the WebSocket close with ``code`` and ``reason``."""

    code: int
    reason: str = ""


#: Anything :meth:`StreamDriver.timer` asks for.
Action = Flush | SendPing | DropConnection | Connect | CloseConnection

_OPEN: Final = StreamPhase.OPEN
_INF: Final = math.inf
_FLUSH: Final = Flush()
_PING: Final = SendPing()
_DROP: Final = DropConnection()


def _invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.ARGUMENT_INVALID, message)


class StreamDriver:
    """One side of one devstream.v1 stream, from its first connection to its outcome.

    Owns :attr:`endpoint` (write to it directly; read through :meth:`read`, send through
    :meth:`next_message`). *now* is when the stream opened.
    """

    def __init__(self, options: StreamOptions | None = None, *, now: float) -> None:
        options = options or StreamOptions()
        try:
            valid = (
                options.ping_interval > 0
                and options.ping_timeout > 0
                and options.resume_timeout > 0
                and options.close_timeout > 0
            )
        except TypeError:
            valid = False
        if not valid:
            raise _invalid(
                "ping_interval, ping_timeout, resume_timeout and close_timeout must be > 0"
            )
        #: The settings; replacing them applies to every deadline set afterwards.
        self.options = options
        #: The framing endpoint this driver owns.
        self.endpoint: Final = StreamEndpoint(window=options.window)
        self._phase = StreamPhase.OPENING
        self._outcome: Outcome | None = None
        self._now = now
        #: Until when the stream is young (see direct_read_until).
        self._young_until = now + DIRECT_READ_TIME
        self._eof_written = False
        # Connected: keepalive, deferred acknowledgement, the one probe per stall.
        self._ping_at = math.inf
        self._ack_at = math.inf
        self._probed = -math.inf
        # A connection lost silently while something is in flight: when the last bytes
        # arrived, the arrival the idle Ack last looked at and the one it acknowledged; when
        # frames began to wait for an acknowledgement, the peer's Ack offset the probes count
        # for, and how many went out.
        self._received_at = now
        self._idle_checked = -math.inf
        self._idle_acked = -math.inf
        self._sent_at = now
        self._probe_acked = -1
        self._probes = 0
        # When the last probe ping went out (inf: none yet on this connection), and whether a
        # message came on this connection (the hub relays the peer's only once the stream is
        # paired, and then answers pings: before, a probe's silence means nothing).
        self._probe_sent = math.inf
        self._heard = False
        # CLOSING's and FINISHING's deadline.
        self._close_at = math.inf
        #: The WebSocket close owed (FINISHING), None once sent or when none is owed.
        self._close: CloseConnection | None = None
        #: FINISHING lost its connection before the peer's close came: resume to deliver
        #: the last frames and the close again.
        self._redeliver = False
        # Disconnected: the next attempt, the running attempt's end, when to give up.
        self._retry_at = math.inf
        self._attempt_until = math.inf
        self._give_up_at = math.inf
        self._delay = FIRST_RESUME_DELAY

    # -- state -------------------------------------------------------------------------------

    @property
    def phase(self) -> StreamPhase:
        """Where the stream is (:data:`PHASE_TRANSITIONS`)."""
        return self._phase

    @property
    def outcome(self) -> Outcome | None:
        """How the stream ended; None until known (``FINISHING`` or ``CLOSED``)."""
        return self._outcome

    @property
    def connected(self) -> bool:
        """A connection is up."""
        return self.endpoint.connection_state in _LIVE

    @property
    def over(self) -> bool:
        """Nothing more can travel: closed, or failed (only the close goes out)."""
        outcome = self._outcome
        return self._phase is StreamPhase.CLOSED or (
            outcome is not None and outcome.kind in (OutcomeKind.BROKEN, OutcomeKind.FAILED)
        )

    @property
    def eof_written(self) -> bool:
        """The application's EOF was written (:meth:`write_eof` or :meth:`close`)."""
        return self._eof_written

    @property
    def direct_read_until(self) -> float:
        """``DIRECT_READ_TIME`` after the stream opened: while it is young an adapter may read
        the connection from the application's own waiting calls instead of a task of its own
        (most request-and-answer streams end before it)."""
        return self._young_until

    @property
    def ack_deferred(self) -> bool:
        """An acknowledgement waits (up to ``ACK_DELAY``) for other frames to go with."""
        return self._ack_at != math.inf

    @property
    def ack_deadline(self) -> float:
        """When the deferred acknowledgement goes out at the latest (inf: none waits)."""
        return self._ack_at

    @property
    def close_deadline(self) -> float:
        """When ``CLOSING`` times out (a reset follows), or ``FINISHING`` ends; else inf."""
        return self._close_at

    @property
    def closing(self) -> CloseConnection | None:
        """The WebSocket close to send now: in ``FINISHING``, once every frame went out."""
        if self._close is None or self.endpoint.has_output:
            return None
        return self._close

    def error(self) -> DevstreamError | None:
        """The exception a broken stream is reported with to the application, or None while
        it is not broken: the hub's error or a failed resume (``FAILED``), the peer's
        protocol error (``BROKEN``), a reset by either side (also before the outcome is
        known: the Reset has arrived). A stream the peer closed before its EOF is the
        adapter's to report (no error code says it)."""
        outcome = self._outcome
        if outcome is not None:
            if outcome.kind is OutcomeKind.FAILED:
                return error_for(ErrorCode(outcome.code), outcome.reason)
            if outcome.kind is OutcomeKind.BROKEN:
                return RemoteProtocolError(ErrorCode(outcome.code), outcome.reason)
        info = self.endpoint.reset_info
        if info is not None:
            return reset_error(*info)
        return None

    @property
    def peer_closed(self) -> bool:
        """The peer closed the connection before the stream completed (outcome
        ``PEER_CLOSED``)."""
        outcome = self._outcome
        return outcome is not None and outcome.kind is OutcomeKind.PEER_CLOSED

    def failure(self) -> DevstreamError | None:
        """The exception the application's reads and writes raise once the stream cannot
        carry on, or None while it can: :meth:`error`; else ``PEER_LOST`` when the peer
        closed before its EOF, or when the stream was abandoned (``ABORTED``).
        A completed stream has none: reads give ``b""`` and this side's EOF is written."""
        error = self.error()
        if error is not None:
            return error
        outcome = self._outcome
        if outcome is None or outcome.kind is OutcomeKind.COMPLETED:
            return None
        if outcome.kind is OutcomeKind.PEER_CLOSED:
            return error_for(ErrorCode.PEER_LOST, "the peer closed the stream before its EOF")
        return error_for(ErrorCode.PEER_LOST, "the stream is over")  # abandoned (ABORTED)

    def stall_timeout(self, last_received: float) -> float | None:
        """How long a message may stop half-way before :meth:`message_stalled` is due (None:
        already probed for this stall, wait for more bytes)."""
        return STALL_PROBE if last_received != self._probed else None

    # -- the table -----------------------------------------------------------------------------

    def _next(self, event: PhaseInput) -> StreamPhase:
        """The phase *event* leads to; raises for a pair missing from the table."""
        phase = PHASE_TRANSITIONS.get((self._phase, event))
        if phase is None:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"{event.value} when the stream is {self._phase.value}"
            )
        return phase

    def _move(self, event: PhaseInput) -> None:
        phase = self._phase = self._next(event)
        if phase is StreamPhase.FINISHING:
            self._decide()
            if self._close is None:
                self._close = CloseConnection(code=NORMAL_CLOSURE)
            self._close_at = self._now + self.options.close_timeout
            if not (self.connected or self._redeliver):
                assert self._outcome is not None  # (decided above)
                if self._outcome.kind is OutcomeKind.COMPLETED:
                    # Completed while resuming (the peer's EOF and the Ack of this side's
                    # came before the drop): the Ack of the peer's EOF and the close have yet
                    # to go. The resume under way delivers them (see connection_lost).
                    self._redeliver = True
                else:
                    self._move(PhaseInput.LOST)  # a close timed out while resuming: it ends
        elif phase is StreamPhase.CLOSED:
            self._decide()
            self._close = None
            self._redeliver = False
            self._close_at = self._ping_at = self._ack_at = math.inf
            self._retry_at = self._attempt_until = self._give_up_at = math.inf

    def _decide(self, kind: OutcomeKind | None = None, code: int = 0, reason: str = "") -> None:
        """Fix the outcome, once: *kind* when given, else what the endpoint says."""
        if self._outcome is not None:
            return
        if kind is None:
            endpoint = self.endpoint
            info = endpoint.reset_info
            if info is not None:
                kind, code, reason = OutcomeKind.RESET, info[0], info[1]
            elif endpoint.done or endpoint.eof_acked:
                kind = OutcomeKind.COMPLETED
            else:
                kind = OutcomeKind.ABORTED
        self._outcome = Outcome(kind=kind, code=code, reason=reason)

    def _settle(self) -> None:
        """Move the phase on when the endpoint says the stream is reset or finished."""
        phase = self._phase
        endpoint = self.endpoint
        state = endpoint.state
        if phase is StreamPhase.OPEN or phase is StreamPhase.RESUMING:
            if state is EndpointState.RESET:
                self._move(PhaseInput.RESET)
                phase = self._phase
            elif state is EndpointState.DONE:
                self._move(PhaseInput.FINISHED)
                return
        if phase is StreamPhase.CLOSING:
            if state is EndpointState.RESET:
                self._move(PhaseInput.RESET)
                return
            self._take_peer_eof()  # its acknowledgement goes out with what follows
            if endpoint.eof_acked:
                self._move(PhaseInput.FINISHED)
        elif phase is StreamPhase.RESETTING and endpoint.reset_settled:
            self._move(PhaseInput.FINISHED)

    def _take_peer_eof(self) -> bool:
        """While closing: read the peer's EOF if it came right after the last byte read."""
        endpoint = self.endpoint
        if (
            endpoint.recv_state is RecvState.EOF_RECEIVED
            and endpoint.consumed == endpoint.received
            and endpoint.state is EndpointState.OPEN
        ):
            endpoint.read()
            return True
        return False

    # -- the application side ------------------------------------------------------------------

    def read(self, max_bytes: int | None, now: float) -> bytes:
        """Up to *max_bytes* received bytes (see :meth:`StreamEndpoint.read`). The read that
        reaches the peer's EOF defers its acknowledgement by up to ``ACK_DELAY``."""
        endpoint = self.endpoint
        data = endpoint.read(max_bytes)
        if endpoint.at_eof and endpoint.has_output and self._ack_at == math.inf:
            self._now = now
            self._ack_at = now + ACK_DELAY
        elif (
            now >= self._received_at + IDLE_ACK
            and self._received_at != self._idle_acked
            and endpoint.queue_ack()
        ):
            # Read after the idle Ack's time: acknowledged at once, once per arrival.
            self._idle_acked = self._received_at
        return data

    def take(self, max_bytes: int | None, now: float) -> bytes | None:
        """What the application's receive gets now: received bytes (:meth:`read`), ``b""``
        at the peer's EOF, or None while nothing has come; raises :meth:`failure` once the
        stream cannot carry on and nothing is left to read. After bytes, the adapter sends
        what :attr:`~StreamEndpoint.has_output` says is due (an acknowledgement), or, at the
        EOF, leaves it for :attr:`ack_deadline`."""
        endpoint = self.endpoint
        if endpoint.state is not EndpointState.RESET:
            data = self.read(max_bytes, now)
            if data or endpoint.at_eof:
                return data
        failure = self.failure()
        if failure is None:
            return None
        try:
            raise failure
        finally:
            del failure  # this frame would hold it, and its traceback this frame: a cycle

    def write_eof(self) -> None:
        """No more data (see :meth:`StreamEndpoint.write_eof`)."""
        self.endpoint.write_eof()
        self._eof_written = True

    def close(self, now: float) -> None:
        """The application closes: its EOF goes out (with the acknowledgement of a peer's EOF
        that came right after the last byte read), and ``close_timeout`` runs for the peer's
        acknowledgement. On a reset stream the Reset and the close go out."""
        self._now = now
        phase = self._phase
        if phase is StreamPhase.OPEN or phase is StreamPhase.RESUMING:
            self._close_at = now + self.options.close_timeout
            self._move(PhaseInput.CLOSE)
            self._take_peer_eof()
            if not self._eof_written:
                self.write_eof()
            self._settle()
            return
        self._move(PhaseInput.CLOSE)

    def reset(self, code: int, reason: str, now: float) -> None:
        """Abort the stream (see :meth:`StreamEndpoint.reset`)."""
        self._next(PhaseInput.RESET)
        self._now = now
        self.endpoint.reset(code, reason)
        self._move(PhaseInput.RESET)
        self._settle()

    def abort(self, now: float) -> None:
        """The adapter abandons the stream: nothing more travels."""
        self._now = now
        self._move(PhaseInput.ABORT)

    # -- the transport side --------------------------------------------------------------------

    def connection_made(self, now: float, *, rejoined: bool = False) -> None:
        """A connection is up: the stream's first, or a resumed one.

        *rejoined*, for the first: it came from a join tried again, and the first try may
        have reached the hub (whose ``101`` was lost), the peer sending to it meanwhile. The
        connection then starts as a resumed one (``Resume(0)`` first): the peer sends again
        from where this side is, the start."""
        if self.connected:
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, "a connection is already up")
        self._now = now
        first = self._phase is StreamPhase.OPENING
        if self._phase is StreamPhase.FINISHING:
            # Back to deliver the last frames: the close goes out again after them.
            self._next(PhaseInput.CONNECTED)
            self._redeliver = False
            self._close = CloseConnection(code=NORMAL_CLOSURE)
            self._close_at = now + self.options.close_timeout
        else:
            self._move(PhaseInput.CONNECTED)
        self.endpoint.connection_made(resumed=not first)
        if first and rejoined:
            self.endpoint.connection_lost()
            self.endpoint.connection_made(resumed=True)
        self._ping_at = now + self.options.ping_interval
        self._probed = -math.inf
        self._received_at = self._sent_at = now
        self._idle_checked = self._idle_acked = -math.inf
        self._probe_acked, self._probes = -1, 0
        self._probe_sent, self._heard = math.inf, False
        self._retry_at = self._attempt_until = self._give_up_at = math.inf
        self._delay = FIRST_RESUME_DELAY

    def connection_lost(self, now: float) -> None:
        """The connection dropped (no close from the other end). In a phase that resumes,
        the first attempt is due at once and resuming gives up ``resume_timeout`` later.
        Does nothing when no connection is up."""
        if not self.connected:
            return
        self._now = now
        self.endpoint.connection_lost()
        self._ping_at = self._ack_at = math.inf
        if self._phase is StreamPhase.FINISHING and self._ended_well():
            # The last frames and the close may not have reached the hub: resume to send
            # them again, within a fresh close_timeout (see the module docstring).
            self._redeliver = True
            self._close_at = now + self.options.close_timeout
        else:
            self._move(PhaseInput.LOST)
        if self._redeliver or self._phase in _RESUMABLE:
            self._retry_at = now
            self._give_up_at = now + self.options.resume_timeout
            self._delay = FIRST_RESUME_DELAY

    def connection_closed(self, code: int, reason: str, now: float) -> None:
        """The other end closed the connection with *code* and *reason*. An abnormal closure
        (1006) is a drop (:meth:`connection_lost`); a normal one is the peer's close; any
        other is the hub's error."""
        if code == ABNORMAL_CLOSURE:
            self.connection_lost(now)
            return
        self._next(PhaseInput.PEER_CLOSED)
        self._now = now
        if code == NORMAL_CLOSURE:
            endpoint = self.endpoint
            finished = endpoint.done or endpoint.reset_info is not None
            self._decide(None if finished else OutcomeKind.PEER_CLOSED)
        else:
            known, message = parse_close_reason(reason)
            if known is not None:
                self._decide(OutcomeKind.FAILED, int(known), message)
            else:
                text = f"stream closed: {code} {reason}".rstrip()
                self._decide(OutcomeKind.FAILED, int(ErrorCode.PROTOCOL_ERROR), text)
        if self.connected:
            self.endpoint.connection_lost()
        self._move(PhaseInput.PEER_CLOSED)

    def receive(self, data: bytes | bytearray | memoryview, now: float) -> list[Event]:
        """Bytes of one connection, to the endpoint; return its events. A frame that breaks
        the protocol raises its :class:`~devstream_core.errors.RemoteProtocolError` after
        moving the stream to ``FINISHING`` (outcome ``BROKEN``; the Reset, then a close with
        the error's code)."""
        self._now = self._received_at = now
        self._heard = True
        try:
            events = self.endpoint.receive_data(data)
        except RemoteProtocolError as exc:
            self._next(PhaseInput.FAIL)
            self._decide(OutcomeKind.BROKEN, int(exc.code), exc.message)
            self._close = CloseConnection(code=exc.code.close_code, reason=exc.message[:100])
            self._move(PhaseInput.FAIL)
            raise
        if self._phase is not _OPEN or len(events) != 1 or type(events[0]) is not DataAvailable:
            self._settle()  # (new bytes alone, the usual case, change no phase)
        return events

    def next_message(self, now: float | None = None) -> bytes:
        """The next WebSocket message to send (``b""`` when none): whole frames, at most the
        endpoint's ``message_size``. The close may be due once none is left (:attr:`closing`).

        *now* (the time it goes out) starts the wait of its frames for their acknowledgement
        (see :data:`ACK_PROBE`); without it, the driver's last known time is taken."""
        endpoint = self.endpoint
        if now is not None:
            self._now = now
        waiting = endpoint.awaiting_ack
        data = endpoint.data_to_send(endpoint.message_size)
        if not waiting and data:
            self._sent_at = self._now
        if self._phase is not _OPEN or self._ack_at != _INF or endpoint.done:
            if not endpoint.has_output:
                self._ack_at = math.inf
            self._settle()
        return data

    def close_sent(self, now: float) -> None:
        """The close (:attr:`closing`) went out: ``close_timeout`` runs for the other end's."""
        self._now = now
        if self._close is not None:
            self._close = None
            self._close_at = now + self.options.close_timeout

    def message_stalled(self, last_received: float, now: float) -> list[Action]:
        """A message stopped half-way for :meth:`stall_timeout`: ping, once per stall."""
        self._now = now
        self._probed = last_received
        if self._probe_lost_at(last_received) == _INF:
            self._probe_sent = now  # the first probe of those not answered
        return [_PING]

    # -- reconnection --------------------------------------------------------------------------

    @property
    def wants_connection(self) -> bool:
        """A reconnection is wanted: no connection, and the stream resumes."""
        return (self._redeliver or self._phase in _RESUMABLE) and not self.connected

    def _ended_well(self) -> bool:
        """The outcome is one whose last frames the peer waits for: completed, or reset (and
        the reset settled)."""
        outcome = self._outcome
        return outcome is not None and outcome.kind in (OutcomeKind.COMPLETED, OutcomeKind.RESET)

    def connect_started(self, now: float) -> float:
        """An attempt starts now; return when to give up waiting for it."""
        if not self.wants_connection:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, f"no connection is wanted when {self._phase.value}"
            )
        self._now = now
        self._retry_at = math.inf
        self._attempt_until = max(now, min(now + self.options.ping_timeout, self._give_up_at))
        return self._attempt_until

    def connect_failed(
        self, now: float, rand: float, *, code: ErrorCode | None, message: str
    ) -> float | None:
        """The attempt failed: *code* is the hub's answer (None: no answer, or no hub
        error). Return when to try again, or None when the stream gave up (``CLOSED``, with
        a ``FAILED`` outcome)."""
        if not 0.0 <= rand < 1.0:
            raise _invalid("rand must be in [0, 1)")
        self._now = now
        self._attempt_until = math.inf
        if code is not None and code in FINAL_ERRORS:
            self._give_up(int(code), message)
            return None
        if now >= self._give_up_at:
            self._give_up(int(ErrorCode.HUB_UNREACHABLE), f"could not resume the stream: {message}")
            return None
        delay = self._delay
        self._delay = min(delay * 2, MAX_RESUME_DELAY)
        self._retry_at = min(now + delay / 2 + rand * (delay / 2), self._give_up_at)
        return self._retry_at

    def _give_up(self, code: int, reason: str) -> None:
        self._decide(OutcomeKind.FAILED, code, reason)
        self._move(PhaseInput.GIVE_UP)

    # -- time ----------------------------------------------------------------------------------

    def next_deadline(self, last_received: float) -> float:
        """When :meth:`timer` next has something to do (inf: nothing); *last_received* is when
        the connection last brought anything (a pong counts)."""
        phase = self._phase
        if phase is StreamPhase.CLOSED or phase is StreamPhase.OPENING:
            return math.inf
        if self.connected:
            options = self.options
            deadline = min(
                self._ping_at,
                last_received + options.ping_interval + options.ping_timeout,
                self._ack_at,
                self._close_at,
                self._idle_ack_at(),
                self._probe_at(last_received),
                self._probe_lost_at(last_received),
            )
        else:
            # A running attempt ends at its own deadline (Connect.deadline): the adapter
            # reports it with connect_failed.
            deadline = min(self._retry_at, self._give_up_at, self._close_at)
        return max(deadline, self._now)

    def _idle_ack_at(self) -> float:
        """When the Ack of bytes that arrived last is due, if the Ack rule sends none first."""
        if self._received_at == self._idle_checked or not self.endpoint.owes_ack:
            return math.inf
        return self._received_at + IDLE_ACK

    def _probe_count(self) -> int:
        """Probes already sent while the peer's Ack offset stayed where it is."""
        return self._probes if self.endpoint.acked == self._probe_acked else 0

    def _probe_at(self, last_received: float) -> float:
        """When to ping because frames wait for the peer's acknowledgement: :data:`ACK_PROBE`
        after they went out or after the last bytes arrived (*last_received*), whichever is
        later, then twice as long after each answer while the peer's Ack does not move; left
        to the keepalive once the wait reaches ``ping_interval``."""
        if not self.endpoint.awaiting_ack:
            return math.inf
        wait = ACK_PROBE * (1 << min(self._probe_count(), 30))
        if wait >= self.options.ping_interval:
            return math.inf
        sent_at = self._sent_at
        return (last_received if last_received > sent_at else sent_at) + wait

    def _probe_lost_at(self, last_received: float) -> float:
        """When the connection counts as lost because the last probe ping went without a byte
        arriving since (*last_received*): :data:`PROBE_TIMEOUT` after it went out."""
        sent = self._probe_sent
        if last_received >= sent:
            return math.inf  # answered, or something else came: the connection works
        return sent + min(PROBE_TIMEOUT, self.options.ping_timeout)

    def timer(self, now: float, last_received: float) -> list[Action]:
        """Act on every deadline due at *now*; return what the adapter is to do, in order."""
        if now < self._now:
            now = self._now  # time never goes back
        self._now = now
        actions: list[Action] = []
        phase = self._phase
        if phase is StreamPhase.CLOSED or phase is StreamPhase.OPENING:
            return actions
        if now >= self._close_at:
            self._close_at = math.inf
            if phase is StreamPhase.CLOSING:
                # Not acknowledged in time: the peer learns that not all was read.
                self.endpoint.reset(int(ErrorCode.STREAM_RESET), _CLOSE_TIMEOUT_REASON)
            # CLOSING goes on to FINISHING (CLOSED at once without a connection), FINISHING
            # to CLOSED.
            self._move(PhaseInput.CLOSE_TIMEOUT)
            actions.append(_FLUSH if self._phase is StreamPhase.FINISHING else _DROP)
            return actions
        if self.connected:
            options = self.options
            if (
                now >= last_received + options.ping_interval + options.ping_timeout
                or now >= self._probe_lost_at(last_received)
            ):
                actions.append(_DROP)
                return actions
            flush = False
            if now >= self._ack_at:
                self._ack_at = math.inf
                flush = True
            if now >= self._idle_ack_at():
                self._idle_checked = received_at = self._received_at
                if received_at != self._idle_acked and self.endpoint.queue_ack():
                    self._idle_acked = received_at
                    flush = True
            if flush:
                actions.append(_FLUSH)
            if now >= self._ping_at:
                self._ping_at = now + options.ping_interval
                actions.append(_PING)
            elif now >= self._probe_at(last_received):
                self._probe_acked = self.endpoint.acked
                self._probes = self._probe_count() + 1
                if self._heard and self._probe_lost_at(last_received) == _INF:
                    self._probe_sent = now  # the first probe of those not answered
                actions.append(_PING)
        elif self._attempt_until != math.inf:
            pass  # an attempt runs: it ends at its own deadline
        elif now >= self._give_up_at:
            self._give_up(int(ErrorCode.HUB_UNREACHABLE), "could not resume the stream")
        elif now >= self._retry_at:
            actions.append(Connect(deadline=self.connect_started(now)))
        return actions
