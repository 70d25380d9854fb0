"""The streaming endpoint's pairing logic: two tokens in, one paired stream out.

What the bridge knows: every stream the hub created and not yet ended, which of its two sides
(device, service) have joined and on which connection, when its tokens expire, and the nonces
of tokens already used. It does not relay bytes, parse frames or own a clock: every input takes
``now``, and the one deadline (the earliest expiry of an unpaired stream) goes out as data
through :meth:`Bridge.next_deadline`, answered by :meth:`Bridge.advance`.

A stream's life, with its legal transitions in :data:`TRANSITIONS`::

    WAITING --join--> HALF --join--> PAIRED
       |                |               |
     expire      leave or expire      leave
       v                v               v
     ENDED            ENDED           ENDED

Rules:

* Both tokens of a stream expire together, ``token_lifetime`` after :meth:`Bridge.create_stream`
  (rounded down to the millisecond, see :func:`~devstream_core.tokens.stream_token_expiry`).
  A stream that is not paired by then ends; a lone side is closed with
  ``PEER_NEVER_CONNECTED``. A paired stream lives until a side leaves.
* A token is accepted at most once. Its nonce is remembered until the token's own expiry, even
  after its stream ended, so a second use is refused as ``STREAM_TOKEN_REUSED``; past the expiry
  it is refused as ``STREAM_TOKEN_EXPIRED`` anyway.
* A join is checked in a fixed order: the token itself (invalid, wrong stream, wrong role,
  expired), then reuse, then whether the stream still exists (``NOT_FOUND``).
* Memory is bounded: at most ``max_streams`` live streams, and used nonces only within their
  tokens' lifetime.
"""

from __future__ import annotations

import base64
import enum
import heapq
import math
from dataclasses import dataclass, field

from .common import Role
from .errors import DevstreamError, ErrorCode, LocalProtocolError, StreamTokenError
from .tokens import (
    STREAM_TOKEN_LIFETIME,
    mint_stream_token,
    stream_token_expiry,
    verify_stream_token,
)

__all__ = [
    "STREAM_MODES",
    "TRANSITIONS",
    "Bridge",
    "BridgeEvent",
    "CloseLoneSide",
    "ClosePeer",
    "Joined",
    "StreamExpired",
    "StreamInput",
    "StreamState",
]

#: The data-plane modes a stream can be created with: ``raw`` (Azure-compatible, each binary
#: message forwarded intact) and ``devstream.v1`` (framed: seq/ack, half-close, resume).
STREAM_MODES = frozenset({"raw", "devstream.v1"})


class StreamState(enum.Enum):
    """Where a stream is in its life."""

    #: Created; neither side has joined.
    WAITING = "waiting"
    #: One side has joined; the other has not.
    HALF = "half"
    #: Both sides joined; bytes may flow.
    PAIRED = "paired"
    #: Over; the bridge has forgotten it.
    ENDED = "ended"


class StreamInput(enum.Enum):
    """What can happen to a stream."""

    JOIN = "join"
    LEAVE = "leave"
    EXPIRE = "expire"


#: The legal transitions; any pair missing here is a bug in the bridge.
TRANSITIONS: dict[tuple[StreamState, StreamInput], StreamState] = {
    (StreamState.WAITING, StreamInput.JOIN): StreamState.HALF,
    (StreamState.WAITING, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.HALF, StreamInput.JOIN): StreamState.PAIRED,
    (StreamState.HALF, StreamInput.LEAVE): StreamState.ENDED,
    (StreamState.HALF, StreamInput.EXPIRE): StreamState.ENDED,
    (StreamState.PAIRED, StreamInput.LEAVE): StreamState.ENDED,
}


@dataclass(frozen=True, kw_only=True)
class Joined:
    """A side joined stream ``stream_id`` on ``connection_id``.

    When ``paired`` is true both sides are in and ``peer_connection_id`` is the other side's
    connection; the caller starts relaying.
    """

    stream_id: str
    role: Role
    device_id: str
    mode: str
    connection_id: int
    paired: bool
    peer_connection_id: int | None


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
    """The tokens expired before either side joined; the stream has ended."""

    stream_id: str


BridgeEvent = ClosePeer | CloseLoneSide | StreamExpired


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
    sides: dict[Role, int] = field(default_factory=dict)

    def move(self, event: StreamInput) -> None:
        self.state = TRANSITIONS[(self.state, event)]


def _nonce_text(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class Bridge:
    """Pairs the two sides of each stream on the streaming endpoint (sans-IO).

    ``secret`` is the hub secret the tokens are signed with. ``max_streams`` caps the live
    streams; creating one more raises ``DevstreamError(THROTTLED)``.
    """

    def __init__(
        self,
        *,
        secret: bytes,
        token_lifetime: float = STREAM_TOKEN_LIFETIME,
        max_streams: int = 100_000,
    ) -> None:
        if not isinstance(secret, bytes) or not secret:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "the hub secret is empty")
        if (
            not isinstance(token_lifetime, (int, float))
            or not math.isfinite(token_lifetime)
            or token_lifetime <= 0
        ):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "token lifetime must be > 0")
        if not isinstance(max_streams, int) or max_streams < 1:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "max_streams must be >= 1")
        self._secret = secret
        self._lifetime = float(token_lifetime)
        self._max_streams = max_streams
        self._streams: dict[str, _Stream] = {}
        self._paired = 0
        self._serial = 0
        #: (expires_at, serial, stream id) of every unpaired stream; stale entries are skipped.
        self._expiries: list[tuple[float, int, str]] = []
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
        mode: str = "raw",
    ) -> tuple[str, str]:
        """Create stream ``stream_id`` to ``device_id``; return ``(device_token, service_token)``.

        The nonces must be fresh random bytes (16 to 64 each, different from each other). Both
        tokens expire ``token_lifetime`` after ``now``. Raises :class:`LocalProtocolError`
        (``ARGUMENT_INVALID``) on a bad argument or a stream id that is live already, and
        ``DevstreamError(THROTTLED)`` when ``max_streams`` streams are live.
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
        tokens = {
            role: mint_stream_token(
                secret=self._secret,
                stream_id=stream_id,
                role=role,
                now=now,
                nonce=nonce,
                lifetime=self._lifetime,
            )
            for role, nonce in ((Role.DEVICE, device_nonce), (Role.SERVICE, service_nonce))
        }
        self._purge_used(now)
        nonces = {Role.DEVICE: _nonce_text(device_nonce), Role.SERVICE: _nonce_text(service_nonce)}
        if any(nonce in self._used for nonce in nonces.values()):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "nonce already used")
        if len(self._streams) >= self._max_streams:
            raise DevstreamError(ErrorCode.THROTTLED, "too many streams")
        self._serial += 1
        self._streams[stream_id] = _Stream(
            stream_id=stream_id,
            device_id=device_id,
            mode=mode,
            expires_at=expires_at,
            serial=self._serial,
            nonces=nonces,
        )
        heapq.heappush(self._expiries, (expires_at, self._serial, stream_id))
        self._compact()
        return tokens[Role.DEVICE], tokens[Role.SERVICE]

    def join(
        self, *, stream_id: str, token: str, role: Role | None, connection_id: int, now: float
    ) -> Joined:
        """Connection ``connection_id`` presents ``token`` for stream ``stream_id``.

        ``role`` is the side the caller expects (None: the token's own). Raises
        :class:`StreamTokenError` (``STREAM_TOKEN_INVALID``, ``_WRONG_STREAM``, ``_WRONG_ROLE``,
        ``_EXPIRED``, then ``_REUSED``), or ``DevstreamError(NOT_FOUND)`` when the stream has
        ended. On success the token is used up.
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
        if connection_id in stream.sides.values():
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "a connection cannot be both sides of a stream"
            )
        # Each role's nonce is used at most once, so that side cannot have joined already.
        assert claims.role not in stream.sides
        self._used[claims.nonce] = claims.expires_at
        heapq.heappush(self._used_expiries, (claims.expires_at, claims.nonce))
        stream.move(StreamInput.JOIN)
        stream.sides[claims.role] = connection_id
        peer = stream.sides.get(claims.role.other)
        if stream.state is StreamState.PAIRED:
            self._paired += 1
        return Joined(
            stream_id=stream_id,
            role=claims.role,
            device_id=stream.device_id,
            mode=stream.mode,
            connection_id=connection_id,
            paired=stream.state is StreamState.PAIRED,
            peer_connection_id=peer,
        )

    def leave(self, *, stream_id: str, connection_id: int, now: float) -> list[BridgeEvent]:
        """Side ``connection_id`` of stream ``stream_id`` disconnected; the stream ends.

        After pairing this returns :class:`ClosePeer` for the other side (once: the stream is
        gone afterwards). Before pairing it returns ``[]`` and a later join of the peer gets
        ``NOT_FOUND``. An unknown stream or connection returns ``[]``.
        """
        stream = self._streams.get(stream_id)
        if stream is None or connection_id not in stream.sides.values():
            return []
        was_paired = stream.state is StreamState.PAIRED
        stream.move(StreamInput.LEAVE)
        self._end(stream)
        if not was_paired:
            return []
        peer = next(conn for conn in stream.sides.values() if conn != connection_id)
        return [ClosePeer(stream_id=stream_id, connection_id=peer)]

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """When the earliest unpaired stream expires, or None when no stream waits."""
        self._drop_stale_heads()
        return self._expiries[0][0] if self._expiries else None

    def advance(self, now: float) -> list[BridgeEvent]:
        """Time is ``now``: end every unpaired stream whose tokens expired (``<= now``).

        A stream with one side in gives :class:`CloseLoneSide` (``PEER_NEVER_CONNECTED``); one
        with no side gives :class:`StreamExpired`. Used nonces past their expiry are forgotten.
        """
        if not isinstance(now, (int, float)) or not math.isfinite(now):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "now must be finite")
        events: list[BridgeEvent] = []
        while self._expiries and self._expiries[0][0] <= now:
            _, serial, stream_id = heapq.heappop(self._expiries)
            stream = self._streams.get(stream_id)
            if stream is None or stream.serial != serial or stream.state is StreamState.PAIRED:
                continue
            state = stream.state
            stream.move(StreamInput.EXPIRE)
            self._end(stream)
            if state is StreamState.WAITING:
                events.append(StreamExpired(stream_id=stream_id))
            else:
                ((role, connection_id),) = stream.sides.items()
                events.append(
                    CloseLoneSide(
                        stream_id=stream_id,
                        connection_id=connection_id,
                        role=role,
                        code=ErrorCode.PEER_NEVER_CONNECTED,
                    )
                )
        self._purge_used(now)
        return events

    # -- queries ---------------------------------------------------------------------------

    def stream_count(self) -> int:
        """How many streams are live (created, not ended)."""
        return len(self._streams)

    def paired_count(self) -> int:
        """How many live streams have both sides in."""
        return self._paired

    # -- internals -------------------------------------------------------------------------

    def _end(self, stream: _Stream) -> None:
        assert stream.state is StreamState.ENDED
        del self._streams[stream.stream_id]
        if len(stream.sides) == 2:
            self._paired -= 1

    def _purge_used(self, now: float) -> None:
        while self._used_expiries and self._used_expiries[0][0] <= now:
            _, nonce = heapq.heappop(self._used_expiries)
            del self._used[nonce]

    def _is_stale(self, entry: tuple[float, int, str]) -> bool:
        stream = self._streams.get(entry[2])
        return stream is None or stream.serial != entry[1] or stream.state is StreamState.PAIRED

    def _drop_stale_heads(self) -> None:
        while self._expiries and self._is_stale(self._expiries[0]):
            heapq.heappop(self._expiries)

    def _compact(self) -> None:
        # Lazy deletion leaves entries of paired and ended streams behind; rebuild the heap
        # when they outnumber the live ones.
        if len(self._expiries) > 2 * len(self._streams) + 64:
            self._expiries = [entry for entry in self._expiries if not self._is_stale(entry)]
            heapq.heapify(self._expiries)
