"""devstream.v1, the framed stream protocol: its frames, and one side of one stream.

A devstream.v1 stream joins a device side and a service side through the hub. Each side holds
one :class:`StreamEndpoint` for the whole life of the stream; WebSockets come and go under it
(a drop, then a resume over a new one). The hub forwards whole WebSocket messages between the
sides without parsing them, and may itself send a side a :class:`Reset` (its peer never came
back). This module knows the five frames, how they look on the wire, and what one side does with
them. It knows nothing about sockets, WebSockets, clocks or retries: the adapter feeds it the
bytes it received and sends the bytes it is given.

Frames (a WebSocket message carries one or more *whole* frames)::

    type: u8 | length: u32 big-endian (of the body) | body

    Data    0x01  offset: u64 | payload (1..MAX_FRAME_PAYLOAD bytes)
    Ack     0x02  offset: u64        everything below it was consumed by the peer's reader
    Eof     0x03  offset: u64        the final length of the sender's stream
    Reset   0x04  code: u32 | reason (UTF-8, at most 123 bytes)
    Resume  0x05  received: u64 | flags: u8 (bit 0: reply requested)

Offsets count bytes of one direction's stream from 0. The EOF counts as one virtual byte at the
final offset (like TCP's FIN): ``Ack(final + 1)`` acknowledges the EOF, and a ``Resume`` that
says ``final + 1`` says the EOF arrived.

An endpoint's life, in three tables that a test walks pair by pair:

* :data:`SEND_TRANSITIONS` (:class:`SendState`): ``OPEN --write_eof--> EOF_PENDING --Ack of the
  EOF--> CLOSED``; a reset from any state leads to ``RESET``.
* :data:`RECV_TRANSITIONS` (:class:`RecvState`): ``OPEN --Eof--> EOF_RECEIVED --read reaches
  it--> EOF_READ --its Ack goes out--> CLOSED``; a reset from any state leads to ``RESET``.
* :data:`CONNECTION_TRANSITIONS` (:class:`ConnectionState`): ``IDLE --first connection-->
  CONNECTED --lost--> DISCONNECTED --resumed connection--> RESUMING --peer's Resume-->
  CONNECTED``; a protocol error makes the connection ``BROKEN`` until it is lost.

A pair missing from a table is an error by construction: :class:`LocalProtocolError` when this
program asked for it (``write`` after ``write_eof``), :class:`RemoteProtocolError` when a frame
asked for it. :attr:`StreamEndpoint.state` sums up both directions: ``OPEN``, ``RESET`` (sent or
received) or ``DONE`` (both EOFs acknowledged).

Rules every change must keep:

* **Every byte once, in order.** A side accepts only the part of a Data frame that starts at
  ``received``; a frame wholly before it is a duplicate and one starting after it is a gap, both
  ignored (the sender rewinds after the next Resume). Nothing is ever delivered twice or
  skipped.
* **Bounded memory.** The send buffer holds at most ``window`` bytes (:meth:`write` takes no
  more); the receive buffer holds at most ``window`` bytes (a peer that sends past
  ``consumed + window`` broke the protocol); the decoder holds at most one partial frame.
  Both sides must use the same window (strictly: the receiver's must not be smaller).
* **Flow control rides on Acks only.** ``Ack`` says *consumed* (read by the application), and
  only Acks free send capacity; ``Resume`` says *received* and only moves where sending
  restarts. ``unacked <= window`` always.
* **Resume.** After a drop, :meth:`StreamEndpoint.connection_made` with ``resumed=True`` queues
  ``Resume(received, reply=True)`` and ``Ack(consumed)`` and sends no data until the peer's
  Resume arrives; a Resume sets where sending restarts (``next_send = received``; the EOF is
  sent again unless the peer has it) and, when it asks, is answered by one
  ``Resume(reply=False)`` and an Ack. A Resume may also arrive on a connection that never
  dropped: the hub keeps a side attached while its peer reconnects, and drops frames meant
  for the missing side in the meantime.
* **Small messages first on a new connection.** The hub relays whole WebSocket messages, so a
  connection that drops in the middle of a message delivers none of it. After this side's
  connection is made, and after the peer's Resume (the peer is on a new connection), the
  messages this side sends start at :data:`FIRST_MESSAGE_SIZE` and double with every message
  that carries Data, up to :data:`MAX_MESSAGE_SIZE` (:attr:`StreamEndpoint.message_size`). A
  connection that lives for only a few hundred KiB thus still moves the stream forward,
  where a window resent in 1 MiB messages would never arrive whole.
* **Reset is confirmed.** A reset side sends ``Reset`` and keeps sending it again on every new
  connection (and on every Resume of the peer) until a Reset from the peer has arrived
  (:attr:`StreamEndpoint.reset_confirmed`). A side that receives a Reset answers it with a Reset
  carrying the agreed code and reason, unless it already sent (or has queued) a Reset since the
  last (re)connection of either side; so an answer that was lost is answered again, and two
  resets that cross are not answered at all. When they cross with different codes, both sides
  keep the smaller ``(code, reason)``, so they agree.

Decisions the spec left open:

* ``reset()`` discards everything buffered both ways; ``read``/``write`` raise afterwards.
  ``reset()`` on a stream that is already over (``RESET`` or ``DONE``) does nothing, and a long
  reason is cut to 123 bytes of UTF-8.
* ``DONE`` is final: a Reset arriving after both EOFs were acknowledged is answered (so its
  sender learns it arrived) and otherwise ignored.
* The Ack rule of :meth:`StreamEndpoint.read`: an Ack is queued once ``consumed`` has moved at
  least ``max(1, window // 4)`` past the last Ack sent, and at once when the read reaches the
  EOF. It never deadlocks: a writer is blocked only with a full window unacknowledged; all of
  it reaches the reader, and a reader that wants more reads what is buffered, which moves
  ``consumed`` by at least a quarter window, so an Ack goes out. Smaller Acks would only make
  the writer send smaller pieces (no "blocked peer" rule is needed).
* A remote protocol error (any :class:`RemoteProtocolError` out of :meth:`receive_data`)
  resets the stream, unless it is ``DONE``, with that error's code and message (queued as a
  Reset frame) and breaks the connection: :meth:`data_to_send` still gives the Reset,
  :meth:`receive_data` raises :class:`LocalProtocolError` until :meth:`connection_lost`.
  Local API misuse raises :class:`LocalProtocolError` and changes nothing.
* :class:`StreamDone` is returned by :meth:`receive_data` when an arriving Ack completes the
  stream. When the stream is completed by this side sending the Ack of the peer's EOF (the last
  step was a :meth:`read`), :attr:`done` turns true inside :meth:`data_to_send`, which returns
  no events: check :attr:`done` after sending.
* Decoder errors: the size cap is checked first (``PAYLOAD_TOO_LARGE``), then the type, then
  the body size for the type (``PROTOCOL_ERROR``); all three from the 5-byte header alone, before
  the body arrives. :meth:`FrameDecoder.reset` also clears the poison: the next byte starts a new
  frame, as on a new connection.
"""

from __future__ import annotations

import collections
import enum
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .common import IdentityEnum
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "CONNECTION_TRANSITIONS",
    "DEFAULT_WINDOW",
    "FIRST_MESSAGE_SIZE",
    "HEADER_SIZE",
    "MAX_FRAME_PAYLOAD",
    "MAX_FRAME_SIZE",
    "MAX_MESSAGE_SIZE",
    "MAX_REASON_SIZE",
    "MIN_SEND_LIMIT",
    "RECV_TRANSITIONS",
    "SEND_TRANSITIONS",
    "SUBPROTOCOL",
    "Ack",
    "ConnectionInput",
    "ConnectionState",
    "Data",
    "DataAvailable",
    "EndpointState",
    "Eof",
    "EofReceived",
    "Event",
    "Frame",
    "FrameDecoder",
    "FrameType",
    "RecvInput",
    "RecvState",
    "Reset",
    "ResetReceived",
    "Resume",
    "Resumed",
    "SendInput",
    "SendState",
    "StreamDone",
    "StreamEndpoint",
    "WindowOpened",
    "encode_frame",
]

#: The WebSocket subprotocol of framed streams.
SUBPROTOCOL: Final = "devstream.v1"
#: Bytes in flight per direction: 2 MiB is about 160 Mbit/s on a 100 ms round trip.
DEFAULT_WINDOW: Final = 2 * 1024 * 1024
#: The largest payload of one Data frame.
MAX_FRAME_PAYLOAD: Final = 64 * 1024
#: The largest frame body the decoder accepts (a Data body is 8 + payload).
MAX_FRAME_SIZE: Final = MAX_FRAME_PAYLOAD + 16
#: The largest WebSocket message (whole frames) :attr:`StreamEndpoint.message_size` asks for.
MAX_MESSAGE_SIZE: Final = 1024 * 1024
#: The first message's size on a new connection (and after the peer's Resume); each message
#: that carries Data doubles it, up to MAX_MESSAGE_SIZE.
FIRST_MESSAGE_SIZE: Final = 64 * 1024
#: The longest Reset reason, in bytes of UTF-8 (what fits a WebSocket close reason).
MAX_REASON_SIZE: Final = 123
#: Bytes before every frame body: type (1) and length (4).
HEADER_SIZE: Final = 5
#: The smallest ``max_bytes`` :meth:`StreamEndpoint.data_to_send` takes: every control frame it
#: may owe (Resume, Ack, Reset) fits, and a Data frame with some payload.
MIN_SEND_LIMIT: Final = 256

_U64_MAX: Final = 2**64 - 1
_U32_MAX: Final = 2**32 - 1
_HEADER: Final = struct.Struct(">BI")
_U64: Final = struct.Struct(">Q")
_U32: Final = struct.Struct(">I")
_RESUME_BODY: Final = struct.Struct(">QB")
#: A Data frame's header and offset, together.
_DATA_HEAD: Final = struct.Struct(">BIQ")
_DATA_OVERHEAD: Final = HEADER_SIZE + 8
_EOF_SIZE: Final = HEADER_SIZE + 8
_FLAG_REPLY: Final = 0x01


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------


class FrameType(enum.IntEnum):
    """The type byte of each frame."""

    DATA = 0x01
    ACK = 0x02
    EOF = 0x03
    RESET = 0x04
    RESUME = 0x05


def _invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.PROTOCOL_ERROR, message)


def _check_int(value: object, name: str, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise _invalid(f"{name} must be an integer from 0 to {maximum}")
    return int(value)


def _reason_bytes(reason: object) -> bytes:
    if not isinstance(reason, str):
        raise _invalid("reason must be a string")
    try:
        raw = reason.encode("utf-8")
    except UnicodeEncodeError:
        raise _invalid("reason must be encodable as UTF-8") from None
    if len(raw) > MAX_REASON_SIZE:
        raise _invalid(f"reason must be at most {MAX_REASON_SIZE} bytes of UTF-8")
    return raw


@dataclass(frozen=True, kw_only=True)
class Data:
    """Bytes of the sender's stream; ``payload[0]`` is at stream offset ``offset``."""

    offset: int
    payload: bytes

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _check_int(self.offset, "offset", _U64_MAX))
        if not isinstance(self.payload, bytes):
            raise _invalid("payload must be bytes")
        if not 1 <= len(self.payload) <= MAX_FRAME_PAYLOAD:
            raise _invalid(f"payload must be 1 to {MAX_FRAME_PAYLOAD} bytes")


@dataclass(frozen=True, kw_only=True)
class Ack:
    """Everything below ``offset`` of the receiver's stream was consumed (cumulative)."""

    offset: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _check_int(self.offset, "offset", _U64_MAX))


@dataclass(frozen=True, kw_only=True)
class Eof:
    """The sender's stream ends at ``offset`` (its final length)."""

    offset: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "offset", _check_int(self.offset, "offset", _U64_MAX))


@dataclass(frozen=True, kw_only=True)
class Reset:
    """The stream is aborted, with ``code`` (an :class:`ErrorCode` or an application number)."""

    code: int
    reason: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "code", _check_int(self.code, "code", _U32_MAX))
        _reason_bytes(self.reason)


@dataclass(frozen=True, kw_only=True)
class Resume:
    """After a reconnection: the sender has ``received`` bytes of the receiver's stream.

    ``received`` counts the EOF as one byte once it arrived. With ``reply`` the sender asks
    for the receiver's own Resume.
    """

    received: int
    reply: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "received", _check_int(self.received, "received", _U64_MAX))
        if not isinstance(self.reply, bool):
            raise _invalid("reply must be a boolean")


#: Any devstream.v1 frame.
Frame = Data | Ack | Eof | Reset | Resume


def _encode_data(offset: int, payload: bytes) -> bytes:
    return _HEADER.pack(FrameType.DATA, 8 + len(payload)) + _U64.pack(offset) + payload


def _encode_offset(kind: FrameType, offset: int) -> bytes:
    return _HEADER.pack(kind, 8) + _U64.pack(offset)


def _encode_reset(code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8")
    return _HEADER.pack(FrameType.RESET, 4 + len(raw)) + _U32.pack(code) + raw


def _encode_resume(received: int, reply: bool) -> bytes:
    flags = _FLAG_REPLY if reply else 0
    return _HEADER.pack(FrameType.RESUME, _RESUME_BODY.size) + _RESUME_BODY.pack(received, flags)


def encode_frame(frame: Frame) -> bytes:
    """The wire bytes of *frame*.

    Raises :class:`LocalProtocolError` (``PROTOCOL_ERROR``) if *frame* is not a frame.
    """
    if isinstance(frame, Data):
        return _encode_data(frame.offset, frame.payload)
    if isinstance(frame, Ack):
        return _encode_offset(FrameType.ACK, frame.offset)
    if isinstance(frame, Eof):
        return _encode_offset(FrameType.EOF, frame.offset)
    if isinstance(frame, Reset):
        return _encode_reset(frame.code, frame.reason)
    if isinstance(frame, Resume):
        return _encode_resume(frame.received, frame.reply)
    raise _invalid("not a devstream.v1 frame")


#: The smallest and largest body each frame type may have.
_BODY_SIZES: Final[Mapping[int, tuple[int, int]]] = {
    FrameType.DATA: (8 + 1, 8 + MAX_FRAME_PAYLOAD),
    FrameType.ACK: (8, 8),
    FrameType.EOF: (8, 8),
    FrameType.RESET: (4, 4 + MAX_REASON_SIZE),
    FrameType.RESUME: (_RESUME_BODY.size, _RESUME_BODY.size),
}


def _bad_frame(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, message)


class FrameDecoder:
    """Turns the bytes of one connection, split anywhere, into frames.

    A partial frame is buffered until the rest arrives; :attr:`buffered` never exceeds
    ``HEADER_SIZE + max_frame_size``. A header is checked as soon as its 5 bytes are in: a body
    longer than *max_frame_size* raises ``RemoteProtocolError(PAYLOAD_TOO_LARGE)``; an unknown
    type, a body of the wrong size for its type (which includes an empty Data payload), a Reset
    reason that is not UTF-8 and Resume flags with unknown bits raise
    ``RemoteProtocolError(PROTOCOL_ERROR)``. After an error the decoder is poisoned: every
    :meth:`feed` raises ``LocalProtocolError(PROTOCOL_ERROR)`` until :meth:`reset`.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not isinstance(max_frame_size, int) or max_frame_size < 0:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "max_frame_size must be >= 0")
        self.max_frame_size = max_frame_size
        self._buffer = bytearray()
        self._poisoned = False

    @property
    def buffered(self) -> int:
        """Bytes of a partial frame held until the rest arrives."""
        return len(self._buffer)

    @property
    def poisoned(self) -> bool:
        """Whether an earlier error stopped the decoder (until :meth:`reset`)."""
        return self._poisoned

    def reset(self) -> None:
        """Forget the partial frame and any earlier error: the next byte starts a frame.

        Use it when a new connection starts.
        """
        self._buffer.clear()
        self._poisoned = False

    def feed(self, data: bytes | bytearray | memoryview) -> list[Frame]:
        """Add *data*; return every frame it completes, in order.

        Raises :class:`RemoteProtocolError` for a bad frame (the frames completed before it in
        the same call are dropped too), :class:`LocalProtocolError` once poisoned.
        """
        if self._poisoned:
            raise _invalid("the frame decoder is broken by an earlier error")
        buffer = self._buffer
        frames: list[Frame] = []
        try:
            with memoryview(data) as view:
                size = len(view)
                pos = 0
                if buffer:
                    # Complete the partial frame held back, copying no more than it needs.
                    if len(buffer) < HEADER_SIZE:
                        pos = min(HEADER_SIZE - len(buffer), size)
                        buffer += view[:pos]
                        if len(buffer) < HEADER_SIZE:
                            return frames
                    kind, length = _HEADER.unpack_from(buffer)
                    self._check_header(kind, length)
                    take = min(HEADER_SIZE + length - len(buffer), size - pos)
                    buffer += view[pos : pos + take]
                    pos += take
                    if len(buffer) < HEADER_SIZE + length:
                        return frames
                    with memoryview(buffer) as held:
                        frames.append(_frame_at(held, 0, kind, len(held)))
                    buffer.clear()
                # The rest is read straight from *data*; only a partial frame at its end is
                # copied, into the buffer.
                while size - pos >= HEADER_SIZE:
                    kind, length = _HEADER.unpack_from(view, pos)
                    self._check_header(kind, length)
                    end = pos + HEADER_SIZE + length
                    if size < end:
                        break
                    frames.append(_frame_at(view, pos, kind, end))
                    pos = end
                if pos < size:
                    buffer += view[pos:]
        except RemoteProtocolError:
            self._poisoned = True
            buffer.clear()
            raise
        return frames

    def _check_header(self, kind: int, length: int) -> None:
        if length > self.max_frame_size:
            raise RemoteProtocolError(
                ErrorCode.PAYLOAD_TOO_LARGE,
                f"frame body of {length} bytes exceeds the limit of {self.max_frame_size}",
            )
        sizes = _BODY_SIZES.get(kind)
        if sizes is None:
            raise _bad_frame(f"unknown frame type 0x{kind:02x}")
        low, high = sizes
        if not low <= length <= high:
            name = FrameType(kind).name
            if kind == FrameType.DATA and length == 8:
                raise _bad_frame("Data frame with an empty payload")
            raise _bad_frame(f"{name} frame body of {length} bytes (must be {low} to {high})")


_DATA_KIND: Final = int(FrameType.DATA)
#: The largest body of a Data frame.
_MAX_DATA_BODY: Final = _BODY_SIZES[FrameType.DATA][1]


def _frame_at(view: memoryview, pos: int, kind: int, end: int) -> Frame:
    """The frame whose header starts at *pos* and whose body ends at *end* (checked)."""
    body = pos + HEADER_SIZE
    if kind == FrameType.DATA:
        # The payload is copied once, straight out of what arrived.
        (offset,) = _U64.unpack_from(view, body)
        return Data(offset=offset, payload=bytes(view[body + 8 : end]))
    return _decode_body(kind, bytes(view[body:end]))


def _decode_body(kind: int, body: bytes) -> Frame:
    """Any frame but Data, which the caller decodes without a copy of its body."""
    if kind == FrameType.ACK:
        return Ack(offset=_U64.unpack(body)[0])
    if kind == FrameType.EOF:
        return Eof(offset=_U64.unpack(body)[0])
    if kind == FrameType.RESET:
        (code,) = _U32.unpack_from(body)
        try:
            reason = body[4:].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_frame("Reset reason is not valid UTF-8") from None
        return Reset(code=code, reason=reason)
    received, flags = _RESUME_BODY.unpack(body)
    if flags & ~_FLAG_REPLY:
        raise _bad_frame(f"Resume flags 0x{flags:02x} have unknown bits")
    return Resume(received=received, reply=bool(flags & _FLAG_REPLY))


# --------------------------------------------------------------------------------------------
# Events
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class DataAvailable:
    """New bytes of the peer's stream can be read."""


@dataclass(frozen=True, kw_only=True)
class EofReceived:
    """The peer's EOF arrived; :meth:`StreamEndpoint.read` reaches it after the data before it."""


@dataclass(frozen=True, kw_only=True)
class WindowOpened:
    """An Ack freed send capacity (:attr:`StreamEndpoint.send_capacity` grew)."""


@dataclass(frozen=True, kw_only=True)
class ResetReceived:
    """The peer (or the hub) aborted the stream with ``code`` and ``reason``; it is over."""

    code: int
    reason: str


@dataclass(frozen=True, kw_only=True)
class Resumed:
    """The peer's Resume arrived; what it lacks is queued to be sent again."""


@dataclass(frozen=True, kw_only=True)
class StreamDone:
    """Both EOFs are acknowledged: the stream completed (see :attr:`StreamEndpoint.done`)."""


#: Anything :meth:`StreamEndpoint.receive_data` returns.
Event = DataAvailable | EofReceived | WindowOpened | ResetReceived | Resumed | StreamDone

#: Events carry nothing but their type: one instance serves every stream.
_DATA_AVAILABLE: Final = DataAvailable()


# --------------------------------------------------------------------------------------------
# State tables
# --------------------------------------------------------------------------------------------


class SendState(IdentityEnum):
    """This side's outgoing direction."""

    #: The application may write.
    OPEN = "open"
    #: ``write_eof`` was called; the peer has not acknowledged the EOF yet.
    EOF_PENDING = "eof pending"
    #: The peer acknowledged the EOF: it read everything this side wrote.
    CLOSED = "closed"
    #: The stream was reset (by either side).
    RESET = "reset"


class SendInput(IdentityEnum):
    """What moves the outgoing direction."""

    WRITE = "write"
    WRITE_EOF = "write_eof"
    #: An Ack of the EOF arrived.
    EOF_ACKED = "eof acked"
    RESET = "reset"


class RecvState(IdentityEnum):
    """This side's incoming direction."""

    #: Bytes may arrive.
    OPEN = "open"
    #: The peer's EOF arrived; bytes before it may still be unread.
    EOF_RECEIVED = "eof received"
    #: The application read up to the EOF; its Ack is not sent yet.
    EOF_READ = "eof read"
    #: The Ack of the peer's EOF was handed out by ``data_to_send``.
    CLOSED = "closed"
    #: The stream was reset (by either side).
    RESET = "reset"


class RecvInput(IdentityEnum):
    """What moves the incoming direction."""

    #: A Data frame brought new bytes.
    DATA = "data"
    #: The application read (possibly nothing).
    READ = "read"
    #: An Eof frame arrived at the end of what was received.
    EOF = "eof"
    #: A read consumed everything up to the EOF.
    READ_EOF = "read eof"
    #: ``data_to_send`` produced the Ack of the EOF.
    ACK_EOF = "ack eof"
    RESET = "reset"


class ConnectionState(IdentityEnum):
    """The WebSocket under the endpoint, as the adapter reports it."""

    #: No connection yet.
    IDLE = "idle"
    #: Up; data flows.
    CONNECTED = "connected"
    #: Up after a drop; waiting for the peer's Resume before sending data.
    RESUMING = "resuming"
    #: The peer sent garbage on this connection; only a Reset goes out until it is lost.
    BROKEN = "broken"
    #: Dropped; nothing is sent until the next connection.
    DISCONNECTED = "disconnected"


class ConnectionInput(IdentityEnum):
    """What moves the connection state."""

    #: ``connection_made(resumed=False)``.
    MADE_NEW = "made new"
    #: ``connection_made(resumed=True)``.
    MADE_RESUMED = "made resumed"
    #: A Resume frame arrived.
    PEER_RESUME = "peer resume"
    #: A frame broke the protocol.
    ERROR = "error"
    #: ``connection_lost()``.
    LOST = "lost"


class EndpointState(IdentityEnum):
    """The whole stream, as this side sees it."""

    #: At least one direction is still open.
    OPEN = "open"
    #: Aborted, by this side or the peer (or the hub).
    RESET = "reset"
    #: Both EOFs acknowledged: everything was delivered both ways.
    DONE = "done"


_S = SendState
_SI = SendInput
#: The outgoing direction's legal moves.
SEND_TRANSITIONS: Final[Mapping[tuple[SendState, SendInput], SendState]] = {
    (_S.OPEN, _SI.WRITE): _S.OPEN,
    (_S.OPEN, _SI.WRITE_EOF): _S.EOF_PENDING,
    (_S.OPEN, _SI.RESET): _S.RESET,
    (_S.EOF_PENDING, _SI.EOF_ACKED): _S.CLOSED,
    (_S.EOF_PENDING, _SI.RESET): _S.RESET,
    (_S.CLOSED, _SI.RESET): _S.RESET,
    (_S.RESET, _SI.RESET): _S.RESET,
}

_R = RecvState
_RI = RecvInput
#: The incoming direction's legal moves.
RECV_TRANSITIONS: Final[Mapping[tuple[RecvState, RecvInput], RecvState]] = {
    (_R.OPEN, _RI.DATA): _R.OPEN,
    (_R.OPEN, _RI.READ): _R.OPEN,
    (_R.OPEN, _RI.EOF): _R.EOF_RECEIVED,
    (_R.OPEN, _RI.RESET): _R.RESET,
    (_R.EOF_RECEIVED, _RI.READ): _R.EOF_RECEIVED,
    (_R.EOF_RECEIVED, _RI.READ_EOF): _R.EOF_READ,
    (_R.EOF_RECEIVED, _RI.RESET): _R.RESET,
    (_R.EOF_READ, _RI.READ): _R.EOF_READ,
    (_R.EOF_READ, _RI.ACK_EOF): _R.CLOSED,
    (_R.EOF_READ, _RI.RESET): _R.RESET,
    (_R.CLOSED, _RI.READ): _R.CLOSED,
    (_R.CLOSED, _RI.RESET): _R.RESET,
    (_R.RESET, _RI.RESET): _R.RESET,
}

_C = ConnectionState
_CI = ConnectionInput
#: The connection's legal moves. ``connection_lost`` without a connection changes nothing.
CONNECTION_TRANSITIONS: Final[Mapping[tuple[ConnectionState, ConnectionInput], ConnectionState]] = {
    (_C.IDLE, _CI.MADE_NEW): _C.CONNECTED,
    (_C.IDLE, _CI.LOST): _C.IDLE,
    (_C.CONNECTED, _CI.PEER_RESUME): _C.CONNECTED,
    (_C.CONNECTED, _CI.ERROR): _C.BROKEN,
    (_C.CONNECTED, _CI.LOST): _C.DISCONNECTED,
    (_C.RESUMING, _CI.PEER_RESUME): _C.CONNECTED,
    (_C.RESUMING, _CI.ERROR): _C.BROKEN,
    (_C.RESUMING, _CI.LOST): _C.DISCONNECTED,
    (_C.BROKEN, _CI.LOST): _C.DISCONNECTED,
    (_C.DISCONNECTED, _CI.MADE_RESUMED): _C.RESUMING,
    (_C.DISCONNECTED, _CI.LOST): _C.DISCONNECTED,
}

_LIVE_CONNECTIONS: Final = frozenset({_C.CONNECTED, _C.RESUMING, _C.BROKEN})
_CONNECTED: Final = _C.CONNECTED
_SEND_RESET: Final = _S.RESET
_EOF_PENDING: Final = _S.EOF_PENDING
#: Incoming states in which bytes read may still be acknowledged by the Ack rule's plain Acks
#: (the Ack of the EOF has rules of its own).
_ACKABLE: Final = frozenset({RecvState.OPEN, RecvState.EOF_RECEIVED})


def _cut_reason(reason: str) -> str:
    return reason.encode("utf-8")[:MAX_REASON_SIZE].decode("utf-8", errors="ignore")


def _remote(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, message)


# --------------------------------------------------------------------------------------------
# The endpoint
# --------------------------------------------------------------------------------------------


#: Writes shorter than this are gathered into one chunk of the send queue, up to
#: ``_GATHER_LIMIT`` bytes; longer ones are a chunk each.
_SMALL_WRITE: Final = 16 * 1024
_GATHER_LIMIT: Final = 64 * 1024


class _SendQueue:
    """The bytes written and not yet acknowledged, as a queue of chunks.

    Appended at the end, dropped from the front, read anywhere: each byte is copied at most
    once on its way in and once on its way out. (One ``bytearray`` that grows at the end and
    shrinks at the front is reallocated, with everything in it, every time it grows.) A write
    of ``bytes`` (or a view of them: they cannot change) is kept as it is, not copied; other
    writes are copied, as the caller may reuse its buffer. Small writes are gathered so that
    the queue never holds more than about one chunk per ``_GATHER_LIMIT`` bytes, plus one per
    write of ``_SMALL_WRITE`` bytes or more.
    """

    __slots__ = ("_chunks", "_head")

    def __init__(self) -> None:
        self._chunks: collections.deque[bytes | bytearray | memoryview] = collections.deque()
        self._head = 0  # bytes of the first chunk already dropped

    def append(self, data: memoryview) -> None:
        chunks = self._chunks
        if len(data) < _SMALL_WRITE:
            last = chunks[-1] if chunks else None
            if isinstance(last, bytearray) and len(last) < _GATHER_LIMIT:
                last += data
            else:
                chunks.append(bytearray(data))
        elif type(data.obj) is bytes:
            chunks.append(data)  # immutable: a view of it is as good as a copy
        else:
            chunks.append(bytes(data))

    def drop(self, size: int) -> None:
        """Forget the first *size* bytes."""
        head = self._head + size
        chunks = self._chunks
        while chunks and head >= len(chunks[0]):
            head -= len(chunks.popleft())
        self._head = head

    def take(self, start: int, size: int, out: list[memoryview]) -> None:
        """Append views of bytes ``[start, start + size)`` to *out*; the caller drops them
        before the queue changes again."""
        pos = start + self._head
        chunks = iter(self._chunks)
        while size:
            chunk = next(chunks)
            length = len(chunk)
            if pos >= length:
                pos -= length
                continue
            part = min(length - pos, size)
            out.append(memoryview(chunk)[pos : pos + part])
            size -= part
            pos = 0

    def clear(self) -> None:
        self._chunks.clear()
        self._head = 0


#: What is left of the views once they are all in frames.
_NO_VIEW: Final = memoryview(b"")


def _frame_views(
    views: list[memoryview], sizes: list[int], offset: int, out: list[bytes | memoryview]
) -> None:
    """Append Data frames of *sizes* to *out*, their payloads cut from *views* (the bytes
    from stream offset *offset* on, as many as *sizes* add up to): each frame's header,
    then the views (or parts of them) its payload is made of."""
    parts = iter(views)
    view = next(parts, _NO_VIEW)
    for size in sizes:
        out.append(_DATA_HEAD.pack(_DATA_KIND, 8 + size, offset))
        offset += size
        while len(view) <= size:  # the view ends in this frame: all of it goes in
            out.append(view)
            size -= len(view)
            if not size:
                view = next(parts, _NO_VIEW)
                break
            view = next(parts)  # (the views hold every byte the sizes ask for)
        else:  # the frame ends inside the view: the rest of it starts the next frame
            out.append(view[:size])
            view = view[size:]


class StreamEndpoint:
    """One side of one devstream.v1 stream (sans-IO); see the module docstring for the rules.

    The application side: :meth:`write`, :meth:`write_eof`, :meth:`read`, :meth:`reset`. The
    transport side: :meth:`connection_made`, :meth:`connection_lost`, :meth:`receive_data`,
    :meth:`data_to_send`. *window* bounds the bytes in flight each way (both sides must use the
    same), *max_payload* the payload of each Data frame this side sends.
    """

    def __init__(
        self, *, window: int = DEFAULT_WINDOW, max_payload: int = MAX_FRAME_PAYLOAD
    ) -> None:
        if not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= 2**62:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "window must be >= 1")
        if (
            not isinstance(max_payload, int)
            or isinstance(max_payload, bool)
            or not 1 <= max_payload <= MAX_FRAME_PAYLOAD
        ):
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, f"max_payload must be 1 to {MAX_FRAME_PAYLOAD}"
            )
        #: The most bytes in flight (unacknowledged) in each direction.
        self.window: Final = window
        #: The largest payload of a Data frame this side sends.
        self.max_payload: Final = max_payload
        self._ack_threshold = max(1, window // 4)
        self._send_state = SendState.OPEN
        self._recv_state = RecvState.OPEN
        self._conn_state = ConnectionState.IDLE
        self._decoder = FrameDecoder()
        # Outgoing: the buffer holds bytes [acked data, written_end).
        self._send_queue = _SendQueue()
        self._written_end = 0
        self._acked = 0
        self._next_send = 0
        self._sent_end = 0
        self._eof_sent = False
        self._eof_ever_sent = False
        self._eof_acked = False
        # Incoming: the chunks hold bytes [consumed, received), a message's Data payloads in
        # one chunk where they came in order (read hands a chunk that fits on as it is).
        self._recv_chunks: collections.deque[bytes] = collections.deque()
        self._received = 0
        self._consumed = 0
        self._peer_final: int | None = None
        self._ack_sent = 0
        self._ack_pending = False
        # Resume.
        self._resume_pending = False
        #: The size of the next message (see message_size).
        self._message_size = FIRST_MESSAGE_SIZE
        self._resume_reply = False
        # Reset.
        self._reset_info: tuple[int, str] | None = None
        self._reset_confirmed = False
        self._reset_pending: tuple[int, str] | None = None
        self._reset_sent_in_epoch = False

    # -- state -------------------------------------------------------------------------------

    @property
    def state(self) -> EndpointState:
        """``RESET`` once aborted by either side, ``DONE`` once both EOFs are acknowledged."""
        send = self._send_state
        if send is SendState.RESET:
            return EndpointState.RESET
        if send is SendState.CLOSED and self._recv_state is RecvState.CLOSED:
            return EndpointState.DONE
        return EndpointState.OPEN

    @property
    def send_state(self) -> SendState:
        """The outgoing direction's state (:data:`SEND_TRANSITIONS`)."""
        return self._send_state

    @property
    def recv_state(self) -> RecvState:
        """The incoming direction's state (:data:`RECV_TRANSITIONS`)."""
        return self._recv_state

    @property
    def connection_state(self) -> ConnectionState:
        """The connection's state (:data:`CONNECTION_TRANSITIONS`)."""
        return self._conn_state

    @property
    def done(self) -> bool:
        """Our EOF was acknowledged by the peer, and the peer's EOF was read and its Ack
        handed out by :meth:`data_to_send`."""
        return self._send_state is SendState.CLOSED and self._recv_state is RecvState.CLOSED

    @property
    def eof_acked(self) -> bool:
        """The peer acknowledged our EOF: it read every byte this side wrote."""
        return self._eof_acked

    @property
    def reset_info(self) -> tuple[int, str] | None:
        """``(code, reason)`` of the reset, or None while not reset."""
        return self._reset_info

    @property
    def reset_confirmed(self) -> bool:
        """Reset, and a Reset from the peer arrived: both sides know the stream is over."""
        return self._reset_info is not None and self._reset_confirmed

    @property
    def reset_settled(self) -> bool:
        """The reset is confirmed and this side owes the peer no Reset (its answer went out):
        the connection may be closed."""
        return self.reset_confirmed and self._reset_pending is None

    @property
    def message_size(self) -> int:
        """The most bytes the next WebSocket message should carry (the ``max_bytes`` to give
        :meth:`data_to_send`): :data:`FIRST_MESSAGE_SIZE` on a new connection and after the
        peer's Resume, doubled by every :meth:`data_to_send` that hands out Data, up to
        :data:`MAX_MESSAGE_SIZE`. See the module docstring's rule."""
        return self._message_size

    # -- counters ----------------------------------------------------------------------------

    @property
    def written_end(self) -> int:
        """Bytes the application wrote."""
        return self._written_end

    @property
    def acked(self) -> int:
        """The peer's latest Ack: bytes of ours it consumed (``written_end + 1`` once our EOF
        is acknowledged)."""
        return self._acked

    @property
    def sent_end(self) -> int:
        """The highest offset of our stream ever handed out by :meth:`data_to_send`."""
        return self._sent_end

    @property
    def next_send(self) -> int:
        """Where the next Data frame starts (moved back by the peer's Resume)."""
        return self._next_send

    @property
    def unacked(self) -> int:
        """Bytes sent and not yet acknowledged; never more than :attr:`window`."""
        return self._sent_end - min(self._acked, self._written_end)

    @property
    def awaiting_ack(self) -> bool:
        """Something this side sent (data, or its EOF) waits for the peer's acknowledgement
        (and the stream is not reset)."""
        if self._reset_info is not None:
            return False
        return self._sent_end > self._acked or (self._eof_ever_sent and not self._eof_acked)

    @property
    def owes_ack(self) -> bool:
        """Bytes of the peer's arrived that no Ack sent or queued covers yet (the application
        may not have read them all)."""
        return (
            self._received > self._ack_sent
            and not self._ack_pending
            and self._recv_state in _ACKABLE
        )

    def queue_ack(self) -> bool:
        """Queue an Ack of what the application consumed, if it is past the last Ack sent
        (the next :meth:`data_to_send` carries it); True when one was queued.

        The Ack rule's own Acks (a quarter window, the EOF) need no call; this is for an Ack
        the caller wants sooner (see :data:`~devstream_core.streamdriver.IDLE_ACK`)."""
        if (
            self._consumed > self._ack_sent
            and not self._ack_pending
            and self._recv_state in _ACKABLE
            and self._conn_state in _LIVE_CONNECTIONS
        ):
            self._ack_pending = True
            return True
        return False

    @property
    def send_capacity(self) -> int:
        """How many bytes :meth:`write` would take now (0 after ``write_eof`` or a reset)."""
        if self._send_state is not SendState.OPEN:
            return 0
        return self.window - (self._written_end - self._acked)

    @property
    def received(self) -> int:
        """Bytes of the peer's stream received, contiguous and in order."""
        return self._received

    @property
    def consumed(self) -> int:
        """Bytes of the peer's stream read by the application."""
        return self._consumed

    @property
    def readable(self) -> bool:
        """:meth:`read` would not have to wait: bytes are buffered, the EOF arrived (read
        returns ``b""`` there), or the stream was reset (read raises)."""
        if self._recv_state is RecvState.RESET or self._recv_chunks:
            return True
        return self._recv_state is not RecvState.OPEN

    @property
    def at_eof(self) -> bool:
        """The application read everything up to the peer's EOF (and the stream is not reset)."""
        return self._recv_state in (RecvState.EOF_READ, RecvState.CLOSED)

    @property
    def has_output(self) -> bool:
        """Whether :meth:`data_to_send` would return bytes now."""
        conn = self._conn_state
        if conn is _CONNECTED:
            # The usual case, in fewer steps (the adapter asks after every message).
            if self._reset_pending is not None or self._resume_pending:
                return True
            send_state = self._send_state
            if send_state is _SEND_RESET:
                return False
            if self._ack_pending:
                return True
            next_send, written = self._next_send, self._written_end
            if next_send < written:
                acked = self._acked
                return next_send < (acked if acked < written else written) + self.window
            return send_state is _EOF_PENDING and not self._eof_sent
        if conn is not ConnectionState.RESUMING:
            # Broken: only the Reset goes out. No connection: nothing.
            return conn is ConnectionState.BROKEN and self._reset_pending is not None
        # Resuming: the Resume, an Ack and a Reset go out, no Data or Eof until the peer's
        # Resume.
        if self._reset_pending is not None or self._resume_pending:
            return True
        return self._send_state is not _SEND_RESET and self._ack_pending

    # -- transitions -------------------------------------------------------------------------

    def _move_send(self, event: SendInput, *, remote: bool = False) -> None:
        next_state = SEND_TRANSITIONS.get((self._send_state, event))
        if next_state is None:
            message = f"{event.value} when sending is {self._send_state.value}"
            raise _remote(message) if remote else _invalid(message)
        self._send_state = next_state

    def _move_recv(self, event: RecvInput, *, remote: bool = False) -> None:
        next_state = RECV_TRANSITIONS.get((self._recv_state, event))
        if next_state is None:
            message = f"{event.value} when receiving is {self._recv_state.value}"
            raise _remote(message) if remote else _invalid(message)
        self._recv_state = next_state

    def _move_connection(self, event: ConnectionInput, *, remote: bool = False) -> None:
        next_state = CONNECTION_TRANSITIONS.get((self._conn_state, event))
        if next_state is None:
            message = f"{event.value} when the connection is {self._conn_state.value}"
            raise _remote(message) if remote else _invalid(message)
        self._conn_state = next_state

    def _enter_reset(self, code: int, reason: str) -> None:
        self._move_send(SendInput.RESET)
        self._move_recv(RecvInput.RESET)
        self._reset_info = (code, reason)
        self._send_queue.clear()
        self._recv_chunks.clear()
        self._ack_pending = False

    def _queue_reset(self, info: tuple[int, str]) -> None:
        if self._reset_pending is None:
            self._reset_pending = info

    # -- application side --------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Queue up to :attr:`send_capacity` bytes of *data*; return how many (0 when full).

        Raises :class:`LocalProtocolError` after :meth:`write_eof` or a reset.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "data must be bytes")
        if self._send_state is not SendState.OPEN:
            self._move_send(SendInput.WRITE)  # raises: writing is over
        taken = len(data)
        capacity = self.window - (self._written_end - self._acked)
        if taken > capacity:
            taken = capacity
        if taken:
            with memoryview(data) as view:
                self._send_queue.append(view[:taken])
            self._written_end += taken
        return taken

    def write_eof(self) -> None:
        """No more data: the EOF goes out after everything written so far.

        Raises :class:`LocalProtocolError` if called twice or after a reset.
        """
        self._move_send(SendInput.WRITE_EOF)

    def read(self, max_bytes: int | None = None) -> bytes:
        """Return up to *max_bytes* received bytes in order (all of them when None).

        Returns ``b""`` when nothing is buffered: check :attr:`at_eof` to tell the EOF from
        "nothing yet" (the read that consumes the last byte before the EOF sets it). Queues an
        Ack when ``consumed`` has moved a quarter window since the last one, and at once when
        the read reaches the EOF. Raises :class:`LocalProtocolError` after a reset.
        """
        if max_bytes is not None and (
            not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1
        ):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "max_bytes must be >= 1")
        if self._recv_state is RecvState.RESET:
            self._move_recv(RecvInput.READ)  # raises; in every other state READ stays put
        data = self._take_received(max_bytes)
        self._consumed += len(data)
        if self._recv_state is RecvState.EOF_RECEIVED and self._consumed == self._peer_final:
            self._move_recv(RecvInput.READ_EOF)
            self._ack_pending = True
        elif self._consumed - self._ack_sent >= self._ack_threshold:
            self._ack_pending = True
        return data

    def _take_received(self, max_bytes: int | None) -> bytes:
        """Up to *max_bytes* of the received bytes (all of them when None), as many as there
        are: a chunk as it is when it is all that is taken, several joined, the last one
        taken split. (So what a read returns does not depend on how the bytes arrived.)"""
        chunks = self._recv_chunks
        if not chunks:
            return b""
        first = chunks.popleft()
        if max_bytes is not None and len(first) >= max_bytes:
            if len(first) > max_bytes:
                chunks.appendleft(first[max_bytes:])
                return first[:max_bytes]
            return first
        if not chunks:
            return first
        if max_bytes is None:
            taken = [first, *chunks]
            chunks.clear()
            return b"".join(taken)
        taken = [first]
        room = max_bytes - len(first)
        while chunks and room:
            chunk = chunks[0]
            if len(chunk) > room:
                taken.append(chunk[:room])
                chunks[0] = chunk[room:]
                break
            taken.append(chunks.popleft())
            room -= len(chunk)
        return b"".join(taken)

    def reset(self, code: int, reason: str = "") -> None:
        """Abort the stream with *code* (a u32) and *reason* (cut to 123 bytes of UTF-8).

        Queues a Reset (sent again on every new connection until the peer confirms it) and
        discards everything buffered. Does nothing if the stream is already over (``RESET`` or
        ``DONE``). Raises ``LocalProtocolError(ARGUMENT_INVALID)`` for a bad code or reason.
        """
        if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= _U32_MAX:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "code must be a u32")
        if not isinstance(reason, str):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "reason must be a string")
        try:
            reason = _cut_reason(reason)
        except UnicodeEncodeError:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "reason must be encodable as UTF-8"
            ) from None
        if self.state is not EndpointState.OPEN:
            return
        self._enter_reset(int(code), reason)
        self._queue_reset((int(code), reason))

    # -- transport side ----------------------------------------------------------------------

    def connection_made(self, *, resumed: bool) -> None:
        """A new WebSocket is up.

        ``resumed=False`` is the stream's first connection (both sides start at 0).
        ``resumed=True`` follows a drop: it queues ``Resume(received, reply=True)`` and
        ``Ack(consumed)``, and no data goes out until the peer's Resume arrives. Raises
        :class:`LocalProtocolError` when a connection is already up, for ``resumed=False``
        after the first connection, and for ``resumed=True`` before it.
        """
        self._move_connection(ConnectionInput.MADE_RESUMED if resumed else ConnectionInput.MADE_NEW)
        self._decoder.reset()
        self._reset_sent_in_epoch = False
        self._message_size = FIRST_MESSAGE_SIZE
        if resumed:
            self._resume_pending = True
            self._resume_reply = True
            if self._send_state is not SendState.RESET:
                self._ack_pending = True
        self._requeue_reset()

    def connection_lost(self) -> None:
        """The WebSocket dropped (or closed): forget a partial frame, send nothing until the
        next :meth:`connection_made`. Does nothing when no connection is up."""
        self._move_connection(ConnectionInput.LOST)
        self._decoder.reset()

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Take bytes from the connection (frames may be split anywhere); return the events.

        Raises :class:`RemoteProtocolError` when the peer broke the protocol (which resets the
        stream and breaks the connection, see the module docstring) and
        :class:`LocalProtocolError` when no usable connection is up.
        """
        if self._conn_state not in (ConnectionState.CONNECTED, ConnectionState.RESUMING):
            raise _invalid(f"cannot receive when the connection is {self._conn_state.value}")
        if (
            self._conn_state is ConnectionState.CONNECTED
            and self._recv_state is RecvState.OPEN
            and not self._decoder.buffered
        ):
            # The usual message: whole Data frames only, each with the next bytes in order,
            # in the window. Taken here as the general path below would take it, in fewer
            # steps, and kept as one chunk (one copy, and none to join them when read).
            payloads = self._data_frames(data)
            if payloads is not None:
                self._recv_chunks.append(
                    bytes(payloads[0]) if len(payloads) == 1 else b"".join(payloads)
                )
                self._received += sum(map(len, payloads))
                return [_DATA_AVAILABLE]
        return self._receive_frames(data)

    def _data_frames(self, data: bytes | bytearray | memoryview) -> list[memoryview] | None:
        """The payloads of *data*, when it is whole Data frames only, each with the next
        bytes in order and all of them in the window; None for anything else (which the
        general path takes, checks and reports)."""
        size = len(data)
        pos = 0
        received = self._received
        limit = self._consumed + self.window
        payloads: list[memoryview] = []
        view = memoryview(data)
        while pos < size:
            if size - pos <= _DATA_OVERHEAD:
                return None
            kind, length, offset = _DATA_HEAD.unpack_from(view, pos)
            stop = pos + HEADER_SIZE + length
            end = offset + length - 8
            if (
                kind != _DATA_KIND
                or not 8 < length <= _MAX_DATA_BODY
                or stop > size
                or offset != received
                or end > limit
            ):
                return None
            payloads.append(view[pos + _DATA_OVERHEAD : stop])
            received = end
            pos = stop
        return payloads or None

    def _receive_frames(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """:meth:`receive_data`'s general path: decode, then take one frame at a time."""
        events: list[Event] = []
        try:
            for frame in self._decoder.feed(data):
                self._handle(frame, events)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        return events

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """The frames ready now, concatenated (``b""`` if none): one WebSocket message.

        Resume, Ack and Reset come first, then Data from :attr:`next_send` up to
        ``min(written_end, acked + window)`` in payloads of at most ``max_payload``, then the
        Eof once everything before it is out. The result is whole frames totalling at most
        *max_bytes* (at least :data:`MIN_SEND_LIMIT`) and never more than
        :data:`MAX_MESSAGE_SIZE`, the largest message the hub takes, whatever *max_bytes*
        says (None means that limit); call again while :attr:`has_output` for the rest.
        """
        if max_bytes is None or (type(max_bytes) is int and max_bytes > MAX_MESSAGE_SIZE):
            max_bytes = MAX_MESSAGE_SIZE
        elif not isinstance(max_bytes, int) or max_bytes < MIN_SEND_LIMIT:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, f"max_bytes must be >= {MIN_SEND_LIMIT}"
            )
        conn = self._conn_state
        if conn not in _LIVE_CONNECTIONS:
            return b""
        out: list[bytes | memoryview] = []
        is_reset = self._send_state is SendState.RESET
        if conn is not ConnectionState.BROKEN:
            if self._resume_pending:
                received = self._received + (self._peer_final is not None)
                out.append(_encode_resume(received, self._resume_reply))
                self._resume_pending = False
            if self._ack_pending and not is_reset:
                out.append(self._take_ack())
        if self._reset_pending is not None:
            code, reason = self._reset_info if self._reset_info is not None else self._reset_pending
            out.append(_encode_reset(code, reason))
            self._reset_pending = None
            self._reset_sent_in_epoch = True
        if conn is ConnectionState.CONNECTED and not is_reset:
            room = max_bytes - sum(map(len, out))
            # Payloads go from the send queue into the result in one copy, through views that
            # are all let go before the queue can change again.
            try:
                self._take_data(out, room)
                return b"".join(out)
            finally:
                out.clear()
        return b"".join(out)

    # -- internals: sending ------------------------------------------------------------------

    def _acked_data(self) -> int:
        return min(self._acked, self._written_end)

    def _eof_due(self) -> bool:
        return (
            self._send_state is SendState.EOF_PENDING
            and self._next_send == self._written_end
            and not self._eof_sent
        )

    def _take_ack(self) -> bytes:
        eof_read = self._recv_state is RecvState.EOF_READ
        offset = self._consumed + (self._recv_state in (RecvState.EOF_READ, RecvState.CLOSED))
        self._ack_sent = self._consumed
        self._ack_pending = False
        if eof_read:
            self._move_recv(RecvInput.ACK_EOF)
        return _encode_offset(FrameType.ACK, offset)

    def _take_data(self, out: list[bytes | memoryview], room: int) -> None:
        written = self._written_end
        base = self._acked if self._acked < written else written
        limit = min(written, base + self.window)
        next_send = self._next_send
        if next_send < limit:
            # The frames' sizes first, then their payloads from the queue in one pass.
            max_payload = self.max_payload
            sizes: list[int] = []
            end = next_send
            while end < limit:
                size = min(max_payload, limit - end, room - _DATA_OVERHEAD)
                if size <= 0:
                    break  # no room left: the EOF (not due yet) waits too
                room -= _DATA_OVERHEAD + size
                sizes.append(size)
                end += size
            views: list[memoryview] = []
            self._send_queue.take(next_send - base, end - next_send, views)
            _frame_views(views, sizes, next_send, out)
            next_send = end
            if next_send > self._next_send and self._message_size < MAX_MESSAGE_SIZE:
                self._message_size = min(2 * self._message_size, MAX_MESSAGE_SIZE)
            self._next_send = next_send
            if next_send > self._sent_end:
                self._sent_end = next_send
        if self._eof_due() and room >= _EOF_SIZE:
            out.append(_encode_offset(FrameType.EOF, self._written_end))
            self._eof_sent = True
            self._eof_ever_sent = True

    def _requeue_reset(self) -> None:
        if self._reset_info is not None and not self._reset_confirmed:
            self._queue_reset(self._reset_info)

    # -- internals: receiving ----------------------------------------------------------------

    def _fail(self, exc: RemoteProtocolError) -> None:
        self._move_connection(ConnectionInput.ERROR)
        if self.state is EndpointState.OPEN:
            info = (int(exc.code), _cut_reason(exc.message))
            self._enter_reset(*info)
            self._queue_reset(info)

    def _handle(self, frame: Frame, events: list[Event]) -> None:
        if isinstance(frame, Reset):
            self._on_reset(frame, events)
        elif isinstance(frame, Resume):
            self._on_resume(frame, events)
        elif self._send_state is SendState.RESET:
            return  # in flight before the peer learned of the reset
        elif isinstance(frame, Data):
            self._on_data(frame, events)
        elif isinstance(frame, Ack):
            self._on_ack(frame, events)
        else:
            self._on_eof(frame, events)

    def _check_in_window(self, end: int, what: str) -> None:
        if end > self._consumed + self.window:
            raise _remote(f"{what} past the flow-control window")
        if self._peer_final is not None and end > self._peer_final:
            raise _remote(f"{what} past the peer's EOF")

    def _on_data(self, frame: Data, events: list[Event]) -> None:
        end = frame.offset + len(frame.payload)
        self._check_in_window(end, "Data")
        if end <= self._received or frame.offset > self._received:
            return  # a duplicate, or a gap the peer fills after the next Resume
        self._move_recv(RecvInput.DATA, remote=True)
        skip = self._received - frame.offset
        self._recv_chunks.append(frame.payload[skip:] if skip else frame.payload)
        self._received = end
        _add_once(events, _DATA_AVAILABLE)

    def _on_eof(self, frame: Eof, events: list[Event]) -> None:
        self._check_in_window(frame.offset, "Eof")
        if self._peer_final is not None:
            if frame.offset != self._peer_final:
                raise _remote("Eof contradicts the earlier Eof")
            return
        if frame.offset < self._received:
            raise _remote("Eof before bytes already received")
        if frame.offset > self._received:
            return  # a gap: bytes before it are still missing
        self._move_recv(RecvInput.EOF, remote=True)
        self._peer_final = frame.offset
        events.append(EofReceived())

    def _on_ack(self, frame: Ack, events: list[Event]) -> None:
        limit = self._sent_end + self._eof_ever_sent
        if frame.offset > limit:
            raise _remote("Ack beyond what was sent")
        if frame.offset <= self._acked:
            return  # cumulative: an old Ack says nothing new
        before = self._acked_data()
        self._acked = frame.offset
        after = self._acked_data()
        self._send_queue.drop(after - before)
        self._next_send = max(self._next_send, after)
        if frame.offset == self._written_end + 1:
            self._eof_sent = True
            self._eof_acked = True
            self._move_send(SendInput.EOF_ACKED, remote=True)
            if self.done:
                events.append(StreamDone())
        elif after > before and self._send_state is SendState.OPEN:
            _add_once(events, WindowOpened())

    def _on_reset(self, frame: Reset, events: list[Event]) -> None:
        info = (frame.code, frame.reason)
        if self.state is EndpointState.DONE:
            self._answer_reset(info)
            return
        if self._reset_info is None:
            self._enter_reset(*info)
            events.append(ResetReceived(code=frame.code, reason=frame.reason))
        else:
            self._reset_info = min(self._reset_info, info)
        self._reset_confirmed = True
        self._answer_reset(self._reset_info or info)

    def _answer_reset(self, info: tuple[int, str]) -> None:
        if self._reset_pending is None and not self._reset_sent_in_epoch:
            self._reset_pending = info

    def _on_resume(self, frame: Resume, events: list[Event]) -> None:
        self._move_connection(ConnectionInput.PEER_RESUME, remote=True)
        # The peer is on a new connection: what we sent it before may be lost, and the
        # messages towards it start small again.
        self._reset_sent_in_epoch = False
        self._message_size = FIRST_MESSAGE_SIZE
        if self._resume_pending:
            self._resume_reply = False  # we have the peer's Resume: no need to ask again
        if self._send_state is SendState.RESET:
            self._requeue_reset()
            return
        received = frame.received
        if not self._acked <= received <= self._sent_end + self._eof_ever_sent:
            raise _remote("Resume outside what was sent and not acknowledged")
        if received > self._written_end:  # the peer has our EOF
            self._next_send = self._written_end
            self._eof_sent = True
        else:
            self._next_send = received
            self._eof_sent = False
        if frame.reply:
            self._resume_pending = True
            self._resume_reply = False
            self._ack_pending = True
        events.append(Resumed())


def _add_once(events: list[Event], event: Event) -> None:
    if event not in events:
        events.append(event)
