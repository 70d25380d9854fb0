"""The streaming endpoint's pairing logic: two tokens in, one paired stream out.

What the bridge knows: every stream the hub created and not yet ended, which of its two sides
(device, service) are attached and on which connection, which ``devstream.v1`` sides are held
(dropped, within their grace period), when its tokens and holds expire, the nonces of stream
tokens already used, and the resume tokens it issued. It does not relay bytes, parse frames or
own a clock: every input takes ``now``, and the earliest deadline (a token expiry of an
unpaired stream, the end of a hold, or the end of a side's time to answer a close) goes out as
data through :meth:`Bridge.next_deadline`, answered by :meth:`Bridge.advance`.

A stream's life, with its legal transitions in :data:`TRANSITIONS`::

                                       --drop-->       --drop-->
    WAITING --join--> HALF --join--> PAIRED     HELD           BOTH_HELD
                                       <-resume-       <-resume-
       |               |               |          |               |
     expire      leave, expire       leave   leave, expire      expire
       v               v               v          v               v
     ENDED           ENDED           ENDED      ENDED           ENDED

                       --drop-->
    PAIRED --close--> CLOSING     CLOSING_HELD <--close-- HELD
                       <-resume-
                          |             |
                    leave, expire     expire
                          v             v
                        ENDED         ENDED

    replace (a side resumes while still attached) leaves HALF, PAIRED and HELD as they are;
    confirm (a side's connection proved itself, see below) leaves every state as it is;
    revoke (the device lost its right to stream: disabled or deleted) ends every live state.

``close`` is a ``devstream.v1`` side's normal close (1000) after its last messages: the hub
passed them and the close on to the other side (or, that side being held, could not), and the
stream waits in ``CLOSING`` for the other side's answer. A side that loses its connection
before it answers is held like any dropped side (``CLOSING_HELD``), and its resume gets the
closing side's last messages and close (:attr:`Resumed.farewell`) before anything else: it
learns that its peer got everything, and ends cleanly. An attached side has ``close_timeout``
to answer (``expire`` from ``CLOSING``): a side that keeps its connection up without ever
answering would otherwise hold the stream, and its device's count, for as long as it likes.

``drop`` and ``resume`` exist only for ``devstream.v1`` streams: a paired side whose WebSocket
ended without a close is *held* for ``grace_period`` seconds while its peer stays attached, and
comes back with a resume token. ``replace`` is a resume by a side still attached (a half-open
drop the hub has not noticed): the new connection takes over and the old one is forgotten.

Rules:

* Both stream tokens of a stream expire together, ``token_lifetime`` after
  :meth:`Bridge.create_stream` (rounded down to the millisecond, see
  :func:`~devstream_core.tokens.stream_token_expiry`). A stream that is not paired by then
  ends; a lone side is closed with ``PEER_NEVER_CONNECTED``. A paired stream lives until a side
  leaves (or, for ``devstream.v1``, until a held side's grace period ends, or a side's time to
  answer the other side's close).
* A stream token is accepted at most once. Its nonce is remembered until the token's own
  expiry, even after its stream ended, so a second use is refused as ``STREAM_TOKEN_REUSED``;
  past the expiry it is refused as ``STREAM_TOKEN_EXPIRED`` anyway. One allowance, for a
  ``devstream.v1`` side whose ``101`` was lost (and with it its first resume token):
  :meth:`Bridge.rejoin` takes the token again, as a resume, until the connection it opened
  is confirmed or the side resumes.
* A join is checked in a fixed order: the token itself (invalid, wrong stream, wrong role,
  expired), then reuse, then whether the stream still exists (``NOT_FOUND``).
* The connection that asked for a stream may join it at once as that side, without a token
  (:meth:`Bridge.join_opener`, a one-step open): its token is used up as a join with it
  would, and the same refusals apply, the stream's existence first (nothing else says
  which stream it is).
* Every join or resume of a ``devstream.v1`` side issues a fresh resume token for that role,
  which reaches the side only in the answer to that join or resume. So a resume token is
  *spent* only once the connection it opened has proven itself: the hub calls
  :meth:`Bridge.confirm` when the first message arrives on it (a side cannot send one before
  it read the answer). Until then the side may not have the fresh token, and two of its
  tokens work: the *latest* and the *previous* one (the one that opened the unconfirmed
  connection). Per role::

      presented      accepted   afterwards
      latest         yes        the previous one (if any) is spent; the presented one is the
                                previous one now, bound to the new connection
      previous       yes        the latest is spent; the presented one stays the previous one,
                                bound to the new connection
      any other      no         STREAM_TOKEN_REUSED (an earlier token of this stream)
      confirm        -          the previous one is spent: only the latest works

  Either accepted resume replaces the side's connection (attached: ``replace``; held:
  ``resume``) and issues another fresh token; the grace deadline of a held side is not
  changed by any of it. A join has no previous resume token (its stream token is spent at
  once, as above). Resume tokens are forgotten when their stream ends (a resume then gets
  ``NOT_FOUND``).
* A hold ends at ``deadline = drop time + grace_period``: from ``now >= deadline`` the side
  cannot resume (``NOT_FOUND``), and :meth:`Bridge.advance` resets the attached peer with
  ``PEER_LOST`` (or, when no side is attached: both held, or the other one closed, reports
  :class:`StreamExpired`); the stream ends.
* A ``leave`` always ends the stream. A ``drop`` of a raw stream, or of an unpaired one, is a
  ``leave``. A ``leave`` or ``drop`` for a connection that is not attached (unknown, held
  already, replaced) is ignored.
* A ``close`` (:meth:`Bridge.close`) is a ``leave`` except for a side of a paired
  ``devstream.v1`` stream (``PAIRED``, or ``HELD`` with the other side held) closing with
  1000: then the stream keeps the side's :class:`Farewell` (its last messages, at most
  ``MAX_FAREWELL_SIZE`` bytes of them, the newest kept; and its close) and waits for the other
  side. The other side's ``leave`` or ``close`` ends it; its ``drop`` holds it (the deadline
  of a side already held stays). The side that closed cannot resume (``NOT_FOUND``).
* In ``CLOSING`` the attached side has until ``answer_by = now + close_timeout`` to answer,
  ``now`` being when its current connection was given the close: the close itself, or the
  resume (from ``CLOSING_HELD``) or replace that hands it the closing side's last messages
  and close (:attr:`Resumed.farewell`), which starts the time afresh. A drop stops the time
  (``CLOSING_HELD`` has the grace deadline instead). From ``now >= answer_by`` the side
  cannot replace its connection (``NOT_FOUND``), and :meth:`Bridge.advance` ends the stream
  with :class:`CloseUnanswered` for the attached side, which had the close already and is
  owed nothing more: drop its connection. Nothing is lost by it: the closing side closed
  normally, its stream done.
* A device has at most ``max_streams_per_device`` live streams (waiting, half, paired or held):
  creating one more raises ``DevstreamError(THROTTLED)`` with a message that names the limit.
  A stream leaves the count when it ends; the capacity is back at once.
* A stream whose initiation was refused or failed (the service never gets its token) is
  cancelled (:meth:`Bridge.cancel`): before pairing, it ends at once as if its tokens had
  expired (``expire`` in the table), and a side that joined is closed with
  ``PEER_NEVER_CONNECTED``.
* :meth:`Bridge.revoke_device` ends every live stream of a device at once (it was disabled
  or deleted): each attached side is reset with the given code (:class:`StreamRevoked`), a
  held side cannot resume (``NOT_FOUND``), and the stream tokens not yet used are worthless.
* Memory is bounded: at most ``max_streams`` live streams, used stream-token nonces only within
  their tokens' lifetime, and resume nonces (one per join or resume, plus at most one
  previous token and its connection per role) and a closed side's last messages (at most
  ``MAX_FAREWELL_SIZE`` bytes) only within their stream's life.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from .common import IdentityEnum, Role, b64url
from .control import MODE_FRAMED, MODE_RAW
from .errors import DevstreamError, ErrorCode, LocalProtocolError, StreamTokenError
from .tokens import (
    STREAM_TOKEN_LIFETIME,
    check_nonce,
    mint_resume_token,
    mint_stream_token,
    stream_token_expiry,
    verify_resume_token,
    verify_stream_token,
)

__all__ = [
    "DEFAULT_CLOSE_TIMEOUT",
    "DEFAULT_GRACE_PERIOD",
    "DEFAULT_MAX_STREAMS_PER_DEVICE",
    "MAX_FAREWELL_SIZE",
    "NORMAL_CLOSURE",
    "RESUMABLE_MODE",
    "STREAM_MODES",
    "TRANSITIONS",
    "Bridge",
    "BridgeEvent",
    "CloseLoneSide",
    "ClosePeer",
    "CloseUnanswered",
    "Farewell",
    "Joined",
    "ResetPeer",
    "Resumed",
    "SideHeld",
    "StreamExpired",
    "StreamInput",
    "StreamRevoked",
    "StreamState",
]

#: The data-plane modes a stream can be created with: ``raw`` (Azure-compatible, each binary
#: message forwarded intact) and ``devstream.v1`` (framed: seq/ack, half-close, resume).
STREAM_MODES = frozenset({MODE_RAW, MODE_FRAMED})
#: The one mode whose sides may drop and resume.
RESUMABLE_MODE = MODE_FRAMED
#: How long a dropped ``devstream.v1`` side is held for its resume, in seconds.
DEFAULT_GRACE_PERIOD = 30.0
#: How long an attached ``devstream.v1`` side has to answer the other side's normal close,
#: in seconds (the hub's ``close_timeout``).
DEFAULT_CLOSE_TIMEOUT = 5.0
#: The most live streams (waiting, half, paired or held) one device may have.
DEFAULT_MAX_STREAMS_PER_DEVICE = 1000
#: The WebSocket close code of a normal close: the one close whose side's last words are kept.
NORMAL_CLOSURE = 1000
#: The most bytes of a closing side's last messages a stream keeps for a side that has not
#: answered the close (the newest whole messages that fit). A side closes normally once its
#: stream is done (both EOFs acknowledged) or its reset settled: what its peer may still lack
#: then is an acknowledgement or a Reset sent after the peer's last frames, a few frames of at
#: most 132 bytes each. Anything carrying Data came before the peer acknowledged it, so the
#: peer had it. Small, because the hub keeps every attached side's latest messages this size
#: in case that side closes next.
MAX_FAREWELL_SIZE = 1024


class StreamState(IdentityEnum):
    """Where a stream is in its life."""

    #: Created; neither side has joined.
    WAITING = "waiting"
    #: One side has joined; the other has not.
    HALF = "half"
    #: Both sides joined and attached; bytes may flow.
    PAIRED = "paired"
    #: Paired ``devstream.v1`` stream; one side dropped and is held, the other is attached.
    HELD = "held"
    #: Paired ``devstream.v1`` stream; both sides dropped and are held.
    BOTH_HELD = "both_held"
    #: Paired ``devstream.v1`` stream; one side closed normally after its last messages, the
    #: other is attached and has not answered the close yet (it has ``close_timeout`` to).
    CLOSING = "closing"
    #: Paired ``devstream.v1`` stream; one side closed normally, the other dropped before it
    #: answered and is held: its resume gets the closing side's last messages and close.
    CLOSING_HELD = "closing_held"
    #: Over; the bridge has forgotten it.
    ENDED = "ended"


class StreamInput(IdentityEnum):
    """What can happen to a stream."""

    #: A side presents its stream token.
    JOIN = "join"
    #: An attached side closed (or dropped on a stream that cannot hold it).
    LEAVE = "leave"
    #: The tokens of an unpaired stream, a held side's grace period, or an attached side's time
    #: to answer the other side's close ran out.
    EXPIRE = "expire"
    #: An attached side of a paired ``devstream.v1`` stream dropped without a close.
    DROP = "drop"
    #: A held side came back with its resume token.
    RESUME = "resume"
    #: An attached side came back with its resume token on a new connection.
    REPLACE = "replace"
    #: The stream's device may no longer stream (disabled or deleted).
    REVOKE = "revoke"
    #: An attached side of a paired ``devstream.v1`` stream closed normally (1000).
    CLOSE = "close"


#: The legal transitions; any pair missing here is a bug in the bridge.
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (StreamState.WAITING, StreamInput.JOIN): StreamState.HALF,
    (StreamState.WAITING, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.HALF, StreamInput.JOIN): StreamState.PAIRED,
    (StreamState.HALF, StreamInput.LEAVE): StreamState.ENDED,
    (StreamState.HALF, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.HALF, StreamInput.REPLACE): StreamState.HALF,
    (StreamState.PAIRED, StreamInput.LEAVE): StreamState.ENDED,
    (StreamState.PAIRED, StreamInput.DROP): StreamState.HELD,
    (StreamState.PAIRED, StreamInput.REPLACE): StreamState.PAIRED,
    (StreamState.HELD, StreamInput.LEAVE): StreamState.ENDED,
    (StreamState.HELD, StreamInput.DROP): StreamState.BOTH_HELD,
    (StreamState.HELD, StreamInput.RESUME): StreamState.PAIRED,
    (StreamState.HELD, StreamInput.REPLACE): StreamState.HELD,
    (StreamState.HELD, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.BOTH_HELD, StreamInput.RESUME): StreamState.HELD,
    (StreamState.BOTH_HELD, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.WAITING, StreamInput.REVOKE): StreamState.ENDED,
    (StreamState.HALF, StreamInput.REVOKE): StreamState.ENDED,
    (StreamState.PAIRED, StreamInput.REVOKE): StreamState.ENDED,
    (StreamState.HELD, StreamInput.REVOKE): StreamState.ENDED,
    (StreamState.BOTH_HELD, StreamInput.REVOKE): StreamState.ENDED,
    (StreamState.PAIRED, StreamInput.CLOSE): StreamState.CLOSING,
    (StreamState.HELD, StreamInput.CLOSE): StreamState.CLOSING_HELD,
    (StreamState.CLOSING, StreamInput.LEAVE): StreamState.ENDED,
    (StreamState.CLOSING, StreamInput.DROP): StreamState.CLOSING_HELD,
    (StreamState.CLOSING, StreamInput.REPLACE): StreamState.CLOSING,
    (StreamState.CLOSING, StreamInput.REVOKE): StreamState.ENDED,
    (StreamState.CLOSING, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.CLOSING_HELD, StreamInput.RESUME): StreamState.CLOSING,
    (StreamState.CLOSING_HELD, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.CLOSING_HELD, StreamInput.REVOKE): StreamState.ENDED,
}

#: The states of a stream whose two sides have joined (whether attached or held).
_PAIRED_STATES = frozenset(
    {
        StreamState.PAIRED,
        StreamState.HELD,
        StreamState.BOTH_HELD,
        StreamState.CLOSING,
        StreamState.CLOSING_HELD,
    }
)
#: The states whose stream-token expiry still matters.
_UNPAIRED_STATES = frozenset({StreamState.WAITING, StreamState.HALF})


@dataclass(frozen=True, kw_only=True)
class Joined:
    """A side joined stream ``stream_id`` on ``connection_id``.

    When ``paired`` is true both sides are in and ``peer_connection_id`` is the other side's
    connection; the caller starts relaying. For a ``devstream.v1`` stream ``resume_token`` is
    the side's credential to come back after a drop (give it to the side; None for raw).
    """

    stream_id: str
    role: Role
    device_id: str
    mode: str
    connection_id: int
    paired: bool
    peer_connection_id: int | None
    resume_token: str | None = None


@dataclass(frozen=True, kw_only=True)
class Farewell:
    """What a side that closed normally last sent (``messages``, each a whole WebSocket
    message, oldest first) and its close (``code``, ``reason``): a side that resumes after
    it gets them, in that order, before anything else."""

    messages: tuple[bytes, ...]
    code: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Resumed:
    """Side ``role`` of stream ``stream_id`` is back, attached on ``connection_id``.

    ``peer_connection_id`` is the other side's connection, or None when the other side is held
    (or, before pairing, has not joined). ``replaced_connection_id`` is the side's previous
    connection when it was still attached (close it; the bridge has forgotten it), else None.
    ``resume_token`` is the side's fresh resume token; the one just used is spent once the
    new connection is confirmed (:meth:`Bridge.confirm`), the ones before it at once.
    ``farewell``, when the other side closed normally and left (``CLOSING``): send the side
    its messages, then its close, before anything else (None otherwise).
    """

    stream_id: str
    role: Role
    connection_id: int
    peer_connection_id: int | None
    replaced_connection_id: int | None
    resume_token: str
    farewell: Farewell | None = None


@dataclass(frozen=True, kw_only=True)
class ClosePeer:
    """A paired side left; close the other side's ``connection_id``. The stream has ended."""

    stream_id: str
    connection_id: int


@dataclass(frozen=True, kw_only=True)
class CloseLoneSide:
    """The tokens expired with only one side in; close its ``connection_id`` with ``code``."""

    stream_id: str
    connection_id: int
    role: Role
    code: ErrorCode


@dataclass(frozen=True, kw_only=True)
class StreamExpired:
    """The stream ended with no side attached to tell.

    Either its tokens expired before any side joined, or both sides of a ``devstream.v1``
    stream were held and a grace period ran out.
    """

    stream_id: str


@dataclass(frozen=True, kw_only=True)
class SideHeld:
    """Side ``role`` of ``devstream.v1`` stream ``stream_id`` dropped on ``connection_id``.

    The stream waits until ``deadline`` for it to resume; the peer (if attached) stays.
    """

    stream_id: str
    role: Role
    connection_id: int
    deadline: float


@dataclass(frozen=True, kw_only=True)
class ResetPeer:
    """A held side did not resume in time; reset the attached side's ``connection_id``.

    ``code`` is ``PEER_LOST``. The stream has ended.
    """

    stream_id: str
    connection_id: int
    code: ErrorCode


@dataclass(frozen=True, kw_only=True)
class StreamRevoked:
    """Stream ``stream_id`` of device ``device_id`` ended because the device may no longer
    stream; reset each of its attached ``connection_ids`` with ``code`` (``DEVICE_DISABLED``
    or ``DEVICE_NOT_FOUND``)."""

    stream_id: str
    device_id: str
    connection_ids: tuple[int, ...]
    code: ErrorCode


@dataclass(frozen=True, kw_only=True)
class CloseUnanswered:
    """Side ``role`` of ``devstream.v1`` stream ``stream_id``, attached on ``connection_id``,
    did not answer the other side's normal close within ``close_timeout``. It was sent that
    close (and the messages before it) already and is owed nothing more: drop its connection.
    The stream has ended; it ended normally, by the other side's close."""

    stream_id: str
    connection_id: int
    role: Role


BridgeEvent = (
    ClosePeer
    | CloseLoneSide
    | StreamExpired
    | SideHeld
    | ResetPeer
    | StreamRevoked
    | CloseUnanswered
)


@dataclass(kw_only=True)
class _Stream:
    stream_id: str
    device_id: str
    mode: str
    expires_at: float
    #: Which heap entry is this stream's (stream ids may come back after a stream ended).
    serial: int
    nonces: dict[Role, str]
    state: StreamState = StreamState.WAITING
    #: Attached sides: role -> connection.
    sides: dict[Role, int] = field(default_factory=dict)
    #: Held sides: role -> the end of its grace period.
    held: dict[Role, float] = field(default_factory=dict)
    #: The nonce of the latest resume token issued per role.
    resume_nonces: dict[Role, str] = field(default_factory=dict)
    #: Per role whose current connection is not confirmed yet: the nonce of the resume token
    #: that opened it (it works until that connection is confirmed), and that connection.
    previous: dict[Role, tuple[str, int]] = field(default_factory=dict)
    #: The nonces of every other resume token of this stream (spent or retired).
    spent_resume_nonces: set[str] = field(default_factory=set)
    #: Per role of a devstream.v1 stream whose joining connection is not confirmed yet: the
    #: nonce of its stream token, and that connection (see Bridge.rejoin).
    rejoin: dict[Role, tuple[str, int]] = field(default_factory=dict)
    #: What the side that closed normally last sent (CLOSING, CLOSING_HELD).
    farewell: Farewell | None = None
    #: CLOSING: when the attached side's time to answer the close ends (None otherwise).
    answer_by: float | None = None


def _is_lost(stream: _Stream, now: float) -> bool:
    """A held side's grace period or (``CLOSING``) the attached side's time to answer the
    close is over: the stream is lost, even before :meth:`Bridge.advance` says so."""
    return any(deadline <= now for deadline in stream.held.values()) or (
        stream.answer_by is not None and stream.answer_by <= now
    )


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or not math.isfinite(now):
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "now must be finite")


class Bridge:
    """Pairs the two sides of each stream on the streaming endpoint (sans-IO).

    ``secret`` is the hub secret the tokens are signed with. ``max_streams`` caps the live
    streams, ``max_streams_per_device`` those of one device; creating one more raises
    ``DevstreamError(THROTTLED)``. ``grace_period`` is how long a dropped ``devstream.v1``
    side is held for its resume; ``close_timeout`` how long an attached one has to answer the
    other side's normal close (the hub's own close timeout).
    """

    def __init__(
        self,
        *,
        secret: bytes,
        token_lifetime: float = STREAM_TOKEN_LIFETIME,
        max_streams: int = 100_000,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        max_streams_per_device: int = DEFAULT_MAX_STREAMS_PER_DEVICE,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT,
    ) -> None:
        if not isinstance(secret, bytes) or not secret:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "the hub secret is empty")
        for name, value in (
            ("token lifetime", token_lifetime),
            ("grace period", grace_period),
            ("close timeout", close_timeout),
        ):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, f"{name} must be > 0")
        for name, limit in (
            ("max_streams", max_streams),
            ("max_streams_per_device", max_streams_per_device),
        ):
            if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
                raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, f"{name} must be >= 1")
        self._secret = secret
        self._lifetime = float(token_lifetime)
        self._grace = float(grace_period)
        self._close_timeout = float(close_timeout)
        self._max_streams = max_streams
        self._max_per_device = max_streams_per_device
        self._streams: dict[str, _Stream] = {}
        #: How many live streams each device has (devices with none are left out).
        self._per_device: Counter[str] = Counter()
        #: How many live streams are in each state.
        self._states: Counter[StreamState] = Counter()
        self._serial = 0
        #: (expires_at, serial, stream id) of every unpaired stream; stale entries are skipped.
        self._expiries: list[tuple[float, int, str]] = []
        #: (deadline, serial, stream id, role value) of every hold; stale entries are skipped.
        self._holds: list[tuple[float, int, str, str]] = []
        #: (answer_by, serial, stream id) of every CLOSING stream; stale entries are skipped.
        self._closings: list[tuple[float, int, str]] = []
        #: nonce -> the used token's expiry, and the same as a heap for purging.
        self._used: dict[str, float] = {}
        self._used_expiries: list[tuple[float, str]] = []

    # -- streams ---------------------------------------------------------------------------

    def create_stream(
        self,
        *,
        stream_id: str,
        device_id: str,
        now: float,
        device_nonce: bytes,
        service_nonce: bytes,
        mode: str = MODE_RAW,
        service_token: bool = True,
    ) -> tuple[str, str]:
        """Create stream ``stream_id`` to ``device_id``; return ``(device_token, service_token)``.

        The nonces must be fresh random bytes (16 to 64 each, different from each other). Both
        tokens expire ``token_lifetime`` after ``now``. With ``service_token=False`` (a one-step
        open: the service side joins with :meth:`join_opener`, no token changing hands) the
        service's token is not made, and ``""`` stands in for it; its nonce still marks the
        side's single use. Raises :class:`LocalProtocolError`
        (``ARGUMENT_INVALID``) on a bad argument or a stream id that is live already, and
        ``DevstreamError(THROTTLED)`` when ``max_streams`` streams are live, or
        ``max_streams_per_device`` of ``device_id``'s.
        """
        if not isinstance(device_id, str) or not device_id:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "device id is empty")
        if mode not in STREAM_MODES:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "unknown stream mode")
        if device_nonce == service_nonce:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "the two nonces must differ")
        if stream_id in self._streams:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "stream id already in use")
        expires_at = stream_token_expiry(now=now, lifetime=self._lifetime)
        sides = ((Role.DEVICE, device_nonce), (Role.SERVICE, service_nonce))
        tokens = {
            role: mint_stream_token(
                secret=self._secret,
                stream_id=stream_id,
                role=role,
                now=now,
                nonce=nonce,
                lifetime=self._lifetime,
            )
            for role, nonce in (sides if service_token else sides[:1])
        }
        if not service_token:
            # (Its nonce must still be a nonce: as a minted token's would have been checked.)
            check_nonce(service_nonce)
            tokens[Role.SERVICE] = ""
        self._purge_used(now)
        nonces = {Role.DEVICE: b64url(device_nonce), Role.SERVICE: b64url(service_nonce)}
        if any(nonce in self._used for nonce in nonces.values()):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "nonce already used")
        if len(self._streams) >= self._max_streams:
            raise DevstreamError(ErrorCode.THROTTLED, "too many streams")
        count = self._per_device[device_id]
        if count >= self._max_per_device:
            raise DevstreamError(
                ErrorCode.THROTTLED,
                f"device {device_id!r} has {count} streams open or waiting to be joined, "
                "the most the hub allows; try again when one ends",
            )
        self._per_device[device_id] = count + 1
        self._serial += 1
        self._streams[stream_id] = _Stream(
            stream_id=stream_id,
            device_id=device_id,
            mode=mode,
            expires_at=expires_at,
            serial=self._serial,
            nonces=nonces,
        )
        self._states[StreamState.WAITING] += 1
        heapq.heappush(self._expiries, (expires_at, self._serial, stream_id))
        self._compact()
        return tokens[Role.DEVICE], tokens[Role.SERVICE]

    def join(
        self,
        *,
        stream_id: str,
        token: str,
        role: Role | None,
        connection_id: int,
        now: float,
        resume_nonce: bytes | None = None,
    ) -> Joined:
        """Connection ``connection_id`` presents ``token`` for stream ``stream_id``.

        ``role`` is the side the caller expects (None: the token's own). Raises
        :class:`StreamTokenError` (``STREAM_TOKEN_INVALID``, ``_WRONG_STREAM``, ``_WRONG_ROLE``,
        ``_EXPIRED``, then ``_REUSED``), or ``DevstreamError(NOT_FOUND)`` when the stream has
        ended. On success the token is used up.

        ``resume_nonce`` (16 to 64 fresh random bytes) is required for a ``devstream.v1``
        stream, whose :class:`Joined` carries the side's first resume token; it is ignored for
        a raw stream. Missing or bad: :class:`LocalProtocolError` (``ARGUMENT_INVALID``), and
        the stream token stays unused.
        """
        claims = verify_stream_token(
            token, secret=self._secret, stream_id=stream_id, role=role, now=now
        )
        if claims.nonce in self._used:
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_REUSED)
        stream = self._streams.get(stream_id)
        if stream is None:
            raise DevstreamError(ErrorCode.NOT_FOUND, "stream closed")
        if stream.nonces[claims.role] != claims.nonce:
            # Signed by this hub for this stream id, but for an earlier stream of that id.
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_INVALID)
        return self._join(stream, claims.role, claims.expires_at, connection_id, resume_nonce)

    def join_opener(
        self,
        *,
        stream_id: str,
        role: Role,
        connection_id: int,
        now: float,
        resume_nonce: bytes | None = None,
    ) -> Joined:
        """The connection that asked for stream ``stream_id`` joins it as side ``role`` at once,
        without a token changing hands (a one-step open: the hub answers the request by
        joining its connection). Otherwise as :meth:`join` with the side's own token, which
        is used up: ``STREAM_TOKEN_EXPIRED`` once that token's lifetime is over,
        ``STREAM_TOKEN_REUSED`` once it was presented, ``DevstreamError(NOT_FOUND)`` once the
        stream ended."""
        _check_now(now)
        stream = self._streams.get(stream_id)
        if stream is None:
            raise DevstreamError(ErrorCode.NOT_FOUND, "stream closed")
        if now >= stream.expires_at:
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_EXPIRED)
        if stream.nonces[role] in self._used:
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_REUSED)
        return self._join(stream, role, stream.expires_at, connection_id, resume_nonce)

    def _join(
        self,
        stream: _Stream,
        role: Role,
        token_expires_at: float,
        connection_id: int,
        resume_nonce: bytes | None,
    ) -> Joined:
        """Side *role* joins *stream* over *connection_id*, its token (expiring at
        *token_expires_at*) used up."""
        self._check_connection(stream, connection_id)
        resume_token: str | None = None
        if stream.mode == RESUMABLE_MODE:
            if resume_nonce is None:
                raise LocalProtocolError(
                    ErrorCode.ARGUMENT_INVALID, "a devstream.v1 join needs a resume nonce"
                )
            resume_token = self._mint_resume(stream, role, resume_nonce)
        # Each role's nonce is used at most once, so that side cannot have joined already.
        assert role not in stream.sides
        nonce = stream.nonces[role]
        self._used[nonce] = token_expires_at
        heapq.heappush(self._used_expiries, (token_expires_at, nonce))
        self._move(stream, StreamInput.JOIN)
        stream.sides[role] = connection_id
        if resume_token is not None:
            assert resume_nonce is not None
            stream.resume_nonces[role] = b64url(resume_nonce)
            stream.rejoin[role] = (nonce, connection_id)
        peer = stream.sides.get(role.other)
        return Joined(
            stream_id=stream.stream_id,
            role=role,
            device_id=stream.device_id,
            mode=stream.mode,
            connection_id=connection_id,
            paired=stream.state is StreamState.PAIRED,
            peer_connection_id=peer,
            resume_token=resume_token,
        )

    def resume(
        self,
        *,
        stream_id: str,
        token: str,
        role: Role | None,
        connection_id: int,
        now: float,
        resume_nonce: bytes,
    ) -> Resumed:
        """Connection ``connection_id`` presents resume ``token`` for stream ``stream_id``.

        ``role`` is the side the caller expects (None: the token's own). The side may be held
        (it comes back) or still attached (its old connection is replaced and reported in
        :attr:`Resumed.replaced_connection_id`). ``resume_nonce`` (16 to 64 fresh random
        bytes) makes the side's next resume token, returned in :class:`Resumed`.

        ``token`` is the side's latest resume token or, while the side's current connection is
        not confirmed (see :meth:`confirm`), the one that opened that connection: the side
        may have lost the answer that carried the latest. The new connection is unconfirmed
        until :meth:`confirm`.

        Raises, in this order: :class:`StreamTokenError` ``STREAM_TOKEN_INVALID``,
        ``_WRONG_STREAM``, ``_WRONG_ROLE`` (the token itself); ``DevstreamError(NOT_FOUND)``
        when the stream has ended, or a held side's grace period or (``CLOSING``) the attached
        side's time to answer the close is over (``now >= deadline``, even before
        :meth:`advance`: the stream is lost); ``DevstreamError(ARGUMENT_INVALID)``
        for a stream that is not ``devstream.v1``; ``STREAM_TOKEN_REUSED`` for a spent resume
        token of this stream; ``STREAM_TOKEN_INVALID`` for one of an earlier stream with the
        same id. A bad ``resume_nonce`` or a connection already attached to the stream is a
        :class:`LocalProtocolError`. Any refusal leaves the stream and the token as they were.
        """
        claims = verify_resume_token(
            token, secret=self._secret, stream_id=stream_id, role=role, now=now
        )
        stream = self._streams.get(stream_id)
        if stream is None or _is_lost(stream, now):
            raise DevstreamError(ErrorCode.NOT_FOUND, "stream closed")
        if stream.mode != RESUMABLE_MODE:
            raise DevstreamError(ErrorCode.ARGUMENT_INVALID, "this stream cannot be resumed")
        if claims.role not in stream.sides and claims.role not in stream.held:
            # This side closed normally and left (CLOSING): it has nothing to come back for.
            raise DevstreamError(ErrorCode.NOT_FOUND, "stream closed")
        if claims.nonce in stream.spent_resume_nonces:
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_REUSED)
        latest = stream.resume_nonces.get(claims.role)
        previous = stream.previous.get(claims.role)
        if claims.nonce == latest:
            # The side read the last answer: the token before it is spent.
            retired = previous[0] if previous is not None else None
        elif previous is not None and claims.nonce == previous[0]:
            # The side never read the last answer: the token it carried is spent.
            retired = latest
        else:
            # Signed by this hub for this stream id, but for an earlier stream of that id.
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_INVALID)
        self._check_connection(stream, connection_id)
        fresh = self._mint_resume(stream, claims.role, resume_nonce)
        replaced = self._take_back(stream, claims.role, connection_id)
        if retired is not None:
            stream.spent_resume_nonces.add(retired)
        stream.previous[claims.role] = (claims.nonce, connection_id)
        stream.resume_nonces[claims.role] = b64url(resume_nonce)
        # It held a resume token: the answer to its join came, and its stream token is spent.
        stream.rejoin.pop(claims.role, None)
        return self._resumed(stream, claims.role, connection_id, replaced, fresh, now)

    def _take_back(self, stream: _Stream, role: Role, connection_id: int) -> int | None:
        """Attach side *role* on *connection_id* again: a held side comes back, an attached
        one has its connection replaced (returned; None for a held side)."""
        replaced = stream.sides.get(role)
        if replaced is None:
            assert role in stream.held
            self._move(stream, StreamInput.RESUME)
            del stream.held[role]
        else:
            self._move(stream, StreamInput.REPLACE)
        stream.sides[role] = connection_id
        return replaced

    def _resumed(
        self,
        stream: _Stream,
        role: Role,
        connection_id: int,
        replaced: int | None,
        resume_token: str,
        now: float,
    ) -> Resumed:
        """What a side taken back (:meth:`resume`, :meth:`rejoin`) is told."""
        if stream.state is StreamState.CLOSING:
            # The new connection gets the close (Resumed.farewell): its time to answer starts.
            self._start_answer(stream, now)
        return Resumed(
            stream_id=stream.stream_id,
            role=role,
            connection_id=connection_id,
            peer_connection_id=stream.sides.get(role.other),
            replaced_connection_id=replaced,
            resume_token=resume_token,
            farewell=stream.farewell,
        )

    def rejoin(
        self,
        *,
        stream_id: str,
        token: str,
        role: Role | None,
        connection_id: int,
        now: float,
        resume_nonce: bytes,
    ) -> Resumed:
        """Connection ``connection_id`` presents again the stream ``token`` a side of
        ``devstream.v1`` stream ``stream_id`` joined with, before any message came on the
        connection it opened: the side may have lost the ``101`` and, with it, its first
        resume token. Taken as a resume (:meth:`resume`): the side comes back (held) or its
        connection is replaced (attached), with a fresh resume token; the one the lost ``101``
        carried is spent.

        Raises, in this order: the errors of :func:`verify_stream_token`;
        ``STREAM_TOKEN_REUSED`` when the token is not one whose joining connection is
        unconfirmed (a raw stream's, or once a message came or the side resumed);
        ``DevstreamError(NOT_FOUND)`` when the stream has ended, its held side's grace period
        or the attached side's time to answer a close is over, or the side left. A bad
        ``resume_nonce`` or a connection already attached is a :class:`LocalProtocolError`.
        Any refusal leaves the stream and the token as they were.
        """
        claims = verify_stream_token(
            token, secret=self._secret, stream_id=stream_id, role=role, now=now
        )
        stream = self._streams.get(stream_id)
        pending = None if stream is None else stream.rejoin.get(claims.role)
        if stream is None or pending is None or pending[0] != claims.nonce:
            raise StreamTokenError(ErrorCode.STREAM_TOKEN_REUSED)
        if _is_lost(stream, now) or (
            claims.role not in stream.sides and claims.role not in stream.held
        ):
            raise DevstreamError(ErrorCode.NOT_FOUND, "stream closed")
        self._check_connection(stream, connection_id)
        fresh = self._mint_resume(stream, claims.role, resume_nonce)
        replaced = self._take_back(stream, claims.role, connection_id)
        # The resume token the lost answer carried is spent.
        stream.spent_resume_nonces.add(stream.resume_nonces[claims.role])
        stream.resume_nonces[claims.role] = b64url(resume_nonce)
        stream.rejoin[claims.role] = (claims.nonce, connection_id)
        return self._resumed(stream, claims.role, connection_id, replaced, fresh, now)

    def confirm(self, *, stream_id: str, connection_id: int, now: float) -> None:
        """The first message arrived on side connection ``connection_id`` of ``stream_id``.

        The side has read the answer to its join or resume, so it holds its latest resume
        token: the one that opened this connection is spent, and from now on only the latest
        works. Call it once per connection (more is harmless). A connection that is not the
        current, unconfirmed connection of a side (unknown, replaced, held, confirmed already,
        of a raw stream) is ignored.
        """
        _check_now(now)
        stream = self._streams.get(stream_id)
        if stream is None:
            return
        for role in list(stream.previous):
            nonce, connection = stream.previous[role]
            if connection == connection_id and stream.sides.get(role) == connection_id:
                del stream.previous[role]
                stream.spent_resume_nonces.add(nonce)
        for role in list(stream.rejoin):
            if stream.rejoin[role][1] == connection_id:
                del stream.rejoin[role]

    def leave(self, *, stream_id: str, connection_id: int, now: float) -> list[BridgeEvent]:
        """Side ``connection_id`` of stream ``stream_id`` closed (or answered the other side's
        close, ``CLOSING``); the stream ends.

        After pairing this returns :class:`ClosePeer` for the other side when it is attached
        (once: the stream is gone afterwards); a held other side just ends with the stream.
        Before pairing it returns ``[]`` and a later join of the peer gets ``NOT_FOUND``. A
        connection not attached to the stream (unknown, held, replaced) returns ``[]``.
        """
        stream = self._streams.get(stream_id)
        if stream is None or connection_id not in stream.sides.values():
            return []
        was_paired = stream.state is StreamState.PAIRED
        self._move(stream, StreamInput.LEAVE)
        self._end(stream)
        if not was_paired:
            return []
        peer = next(conn for conn in stream.sides.values() if conn != connection_id)
        return [ClosePeer(stream_id=stream_id, connection_id=peer)]

    def close(
        self,
        *,
        stream_id: str,
        connection_id: int,
        now: float,
        code: int,
        reason: str = "",
        messages: Sequence[bytes] = (),
    ) -> list[BridgeEvent]:
        """Side ``connection_id`` of stream ``stream_id`` closed with ``code`` and ``reason``,
        after ``messages`` (its last WebSocket messages, oldest first, each whole: those that
        came with the close, which the caller passed on to the other side with it, or could
        not pass on because that side is held).

        An attached side of a paired ``devstream.v1`` stream (``PAIRED``, or ``HELD`` with
        the other side held) closing with 1000: the stream is not over until the other side
        answers (``CLOSING``; or fails to within ``close_timeout``, see :meth:`advance`) or,
        held, comes back for the messages and the close (``CLOSING_HELD``; see
        :attr:`Resumed.farewell`), or its grace period ends. At most
        ``MAX_FAREWELL_SIZE`` bytes of ``messages`` are kept: the newest whole messages that
        fit. Returns ``[]``. Anything else (another code, a raw or unpaired stream, the other
        side's answer to a close, an unknown stream or connection) is exactly :meth:`leave`.
        """
        _check_now(now)
        stream = self._streams.get(stream_id)
        if (
            code != NORMAL_CLOSURE
            or stream is None
            or stream.mode != RESUMABLE_MODE
            or (stream.state is not StreamState.PAIRED and stream.state is not StreamState.HELD)
            or connection_id not in stream.sides.values()
        ):
            return self.leave(stream_id=stream_id, connection_id=connection_id, now=now)
        kept: list[bytes] = []
        room = MAX_FAREWELL_SIZE
        for message in reversed(messages):
            room -= len(message)
            if room < 0:
                break
            kept.append(bytes(message))
        kept.reverse()
        (role,) = (r for r, conn in stream.sides.items() if conn == connection_id)
        self._move(stream, StreamInput.CLOSE)
        del stream.sides[role]
        stream.previous.pop(role, None)
        stream.farewell = Farewell(messages=tuple(kept), code=code, reason=reason)
        if not stream.held:  # CLOSING: the other side is attached and was sent the close
            self._start_answer(stream, now)
        return []

    def cancel(self, *, stream_id: str, now: float) -> list[BridgeEvent]:
        """The initiation of stream ``stream_id`` was refused or failed: no service will join.

        An unpaired stream ends now, as at its tokens' expiry: :class:`StreamExpired` when no
        side joined, :class:`CloseLoneSide` (``PEER_NEVER_CONNECTED``) when one did; a later
        join gets ``NOT_FOUND``. A paired, ended or unknown stream returns ``[]``.
        """
        _check_now(now)
        stream = self._streams.get(stream_id)
        if stream is None or stream.state not in _UNPAIRED_STATES:
            return []
        return [self._expire_tokens(stream)]

    def drop(self, *, stream_id: str, connection_id: int, now: float) -> list[BridgeEvent]:
        """Side ``connection_id`` of stream ``stream_id`` ended without a close.

        On a paired ``devstream.v1`` stream the side is held until ``now + grace_period``
        (:class:`SideHeld`); its peer stays attached (or held). Anything else (a raw stream,
        an unpaired stream, an unknown stream or connection) is exactly :meth:`leave`.
        """
        _check_now(now)
        stream = self._streams.get(stream_id)
        if (
            stream is None
            or stream.mode != RESUMABLE_MODE
            or stream.state not in _PAIRED_STATES
            or connection_id not in stream.sides.values()
        ):
            return self.leave(stream_id=stream_id, connection_id=connection_id, now=now)
        (role,) = (r for r, conn in stream.sides.items() if conn == connection_id)
        deadline = now + self._grace
        self._move(stream, StreamInput.DROP)
        del stream.sides[role]
        stream.held[role] = deadline
        stream.answer_by = None  # CLOSING_HELD: the grace deadline instead
        heapq.heappush(self._holds, (deadline, stream.serial, stream_id, role.value))
        self._compact()
        return [
            SideHeld(stream_id=stream_id, role=role, connection_id=connection_id, deadline=deadline)
        ]

    def revoke_device(self, *, device_id: str, code: ErrorCode, now: float) -> list[BridgeEvent]:
        """Device ``device_id`` may no longer stream (``code``: it was disabled or deleted):
        end every live stream of it, whatever its state.

        Returns one :class:`StreamRevoked` per stream, naming its attached connections (none
        for a stream nobody joined yet, or whose sides are both held). Afterwards a join or a
        resume of these streams gets ``NOT_FOUND``. Looks at every live stream once.
        """
        _check_now(now)
        events: list[BridgeEvent] = []
        for stream in [s for s in self._streams.values() if s.device_id == device_id]:
            self._move(stream, StreamInput.REVOKE)
            self._end(stream)
            events.append(
                StreamRevoked(
                    stream_id=stream.stream_id,
                    device_id=device_id,
                    connection_ids=tuple(stream.sides.values()),
                    code=code,
                )
            )
        return events

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When the next thing is due: the earliest token expiry of an unpaired stream, end
        of a hold, or end of a side's time to answer a close; None when nothing waits."""
        self._drop_stale_heads()
        first: float | None = None
        for heap in (self._expiries, self._holds, self._closings):
            if heap and (first is None or heap[0][0] < first):
                first = heap[0][0]
        return first

    def advance(self, now: float) -> list[BridgeEvent]:
        """Time is ``now``: end every stream whose tokens, hold or time to answer a close
        expired (``<= now``).

        An unpaired stream with one side in gives :class:`CloseLoneSide`
        (``PEER_NEVER_CONNECTED``); one with no side gives :class:`StreamExpired`. A stream
        whose held side was not resumed in time gives :class:`ResetPeer` (``PEER_LOST``) for
        its attached side, or :class:`StreamExpired` when both sides are held. A ``CLOSING``
        stream whose attached side did not answer in time gives :class:`CloseUnanswered`.
        Events come earliest deadline first (on a tie: token expiries, holds, closes). Used
        nonces past their expiry are forgotten.
        """
        _check_now(now)
        events: list[BridgeEvent] = []
        while True:
            self._drop_stale_heads()
            expiry = self._expiries[0][0] if self._expiries else math.inf
            hold = self._holds[0][0] if self._holds else math.inf
            closing = self._closings[0][0] if self._closings else math.inf
            first = min(expiry, hold, closing)
            if first > now:
                break
            if expiry == first:
                _, _, stream_id = heapq.heappop(self._expiries)
                events.append(self._expire_tokens(self._streams[stream_id]))
            elif hold == first:
                _, _, stream_id, _ = heapq.heappop(self._holds)
                events.append(self._expire_hold(self._streams[stream_id]))
            else:
                _, _, stream_id = heapq.heappop(self._closings)
                events.append(self._expire_answer(self._streams[stream_id]))
        self._purge_used(now)
        return events

    # -- queries ---------------------------------------------------------------------------

    def stream_count(self) -> int:
        """How many streams are live (created, not ended)."""
        return len(self._streams)

    def paired_count(self) -> int:
        """How many live streams have both sides in (attached, or held for a resume)."""
        return sum(self._states[state] for state in _PAIRED_STATES)

    def held_count(self) -> int:
        """How many live streams have at least one side held for a resume."""
        states = self._states
        return (
            states[StreamState.HELD]
            + states[StreamState.BOTH_HELD]
            + states[StreamState.CLOSING_HELD]
        )

    def device_stream_count(self, device_id: str) -> int:
        """How many live streams ``device_id`` has (what ``max_streams_per_device`` caps)."""
        return self._per_device[device_id]

    def stream_state(self, stream_id: str) -> StreamState:
        """Where stream ``stream_id`` is in its life (``ENDED`` when unknown or over)."""
        stream = self._streams.get(stream_id)
        return StreamState.ENDED if stream is None else stream.state

    def unconfirmed_roles(self, stream_id: str) -> frozenset[Role]:
        """The roles of stream ``stream_id`` whose current connection is not confirmed yet,
        so the resume token that opened it still works (empty when the stream is unknown).
        For observability (tests, diagnostics): at most one earlier token per role is kept."""
        stream = self._streams.get(stream_id)
        return frozenset() if stream is None else frozenset(stream.previous)

    def retired_resume_token_count(self, stream_id: str) -> int:
        """How many resume tokens of stream ``stream_id`` are spent or retired (0 when the
        stream is unknown). For observability (tests, diagnostics)."""
        stream = self._streams.get(stream_id)
        return 0 if stream is None else len(stream.spent_resume_nonces)

    def table_sizes(self) -> dict[str, int]:
        """For observability (memory accounting, tests): the entries the bridge's bookkeeping
        holds: ``expiries``, ``holds`` and ``closings`` (timer entries, stale ones included
        until they surface) and ``used_nonces`` (spent stream tokens, remembered until they
        expire)."""
        return {
            "expiries": len(self._expiries),
            "holds": len(self._holds),
            "closings": len(self._closings),
            "used_nonces": len(self._used),
        }

    # -- internals -------------------------------------------------------------------------

    def _move(self, stream: _Stream, event: StreamInput) -> None:
        new = TRANSITIONS[(stream.state, event)]
        self._states[stream.state] -= 1
        self._states[new] += 1
        stream.state = new

    def _end(self, stream: _Stream) -> None:
        assert stream.state is StreamState.ENDED
        self._states[StreamState.ENDED] -= 1
        del self._streams[stream.stream_id]
        count = self._per_device[stream.device_id] - 1
        if count:
            self._per_device[stream.device_id] = count
        else:
            del self._per_device[stream.device_id]

    @staticmethod
    def _check_connection(stream: _Stream, connection_id: int) -> None:
        if connection_id in stream.sides.values():
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "a connection cannot be two sides of a stream"
            )

    def _mint_resume(self, stream: _Stream, role: Role, nonce: bytes) -> str:
        """Mint the next resume token for ``role``; refuse a nonce this stream has seen."""
        token = mint_resume_token(
            secret=self._secret, stream_id=stream.stream_id, role=role, nonce=nonce
        )
        text = b64url(nonce)
        if (
            text in stream.spent_resume_nonces
            or text in stream.resume_nonces.values()
            or any(text == earlier for earlier, _ in stream.previous.values())
        ):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "resume nonce already used")
        return token

    def _expire_tokens(self, stream: _Stream) -> BridgeEvent:
        state = stream.state
        self._move(stream, StreamInput.EXPIRE)
        self._end(stream)
        if state is StreamState.WAITING:
            return StreamExpired(stream_id=stream.stream_id)
        ((role, connection_id),) = stream.sides.items()
        return CloseLoneSide(
            stream_id=stream.stream_id,
            connection_id=connection_id,
            role=role,
            code=ErrorCode.PEER_NEVER_CONNECTED,
        )

    def _expire_hold(self, stream: _Stream) -> BridgeEvent:
        self._move(stream, StreamInput.EXPIRE)
        self._end(stream)
        if not stream.sides:
            return StreamExpired(stream_id=stream.stream_id)
        ((_, connection_id),) = stream.sides.items()
        return ResetPeer(
            stream_id=stream.stream_id, connection_id=connection_id, code=ErrorCode.PEER_LOST
        )

    def _start_answer(self, stream: _Stream, now: float) -> None:
        """The attached side of CLOSING *stream* was given the close at *now*: its time to
        answer starts afresh."""
        stream.answer_by = answer_by = now + self._close_timeout
        heapq.heappush(self._closings, (answer_by, stream.serial, stream.stream_id))
        self._compact()

    def _expire_answer(self, stream: _Stream) -> BridgeEvent:
        self._move(stream, StreamInput.EXPIRE)
        self._end(stream)
        ((role, connection_id),) = stream.sides.items()
        return CloseUnanswered(stream_id=stream.stream_id, connection_id=connection_id, role=role)

    def _purge_used(self, now: float) -> None:
        while self._used_expiries and self._used_expiries[0][0] <= now:
            _, nonce = heapq.heappop(self._used_expiries)
            del self._used[nonce]

    def _is_stale(self, entry: tuple[float, int, str]) -> bool:
        stream = self._streams.get(entry[2])
        return stream is None or stream.serial != entry[1] or stream.state not in _UNPAIRED_STATES

    def _is_stale_hold(self, entry: tuple[float, int, str, str]) -> bool:
        deadline, serial, stream_id, role_value = entry
        stream = self._streams.get(stream_id)
        return (
            stream is None
            or stream.serial != serial
            or stream.held.get(Role(role_value)) != deadline
        )

    def _is_stale_closing(self, entry: tuple[float, int, str]) -> bool:
        stream = self._streams.get(entry[2])
        return stream is None or stream.serial != entry[1] or stream.answer_by != entry[0]

    def _drop_stale_heads(self) -> None:
        while self._expiries and self._is_stale(self._expiries[0]):
            heapq.heappop(self._expiries)
        while self._holds and self._is_stale_hold(self._holds[0]):
            heapq.heappop(self._holds)
        while self._closings and self._is_stale_closing(self._closings[0]):
            heapq.heappop(self._closings)

    def _compact(self) -> None:
        # Lazy deletion leaves entries of paired and ended streams behind; rebuild a heap when
        # they outnumber the live ones.
        if len(self._expiries) > 2 * len(self._streams) + 64:
            self._expiries = [entry for entry in self._expiries if not self._is_stale(entry)]
            heapq.heapify(self._expiries)
        if len(self._holds) > 2 * len(self._streams) + 64:
            self._holds = [entry for entry in self._holds if not self._is_stale_hold(entry)]
            heapq.heapify(self._holds)
        if len(self._closings) > 2 * len(self._streams) + 64:
            self._closings = [e for e in self._closings if not self._is_stale_closing(e)]
            heapq.heapify(self._closings)
