"""The WebSocket protocol after the opening handshake (RFC 6455 §5, §7): frames in, frames out.

:class:`Connection` is devstream's WebSocket codec, sans-IO: :meth:`Connection.receive_data`
takes the bytes one read brought and returns events; the ``send_*`` methods return the bytes
(or the buffers) to write. It owns every rule of the framing and of the closing handshake:
data and control frames, masking, UTF-8, close codes, and the connection's state. The opening
handshake (HTTP) is :mod:`devstream_core.handshake`'s.

Why devstream has a codec of its own, and how it is split:

* **Speed on the relay.** The hub parses every payload byte on the way in and frames it again
  on the way out. A general-purpose codec copies each payload several times (wsproto: into its
  buffer, out of it, into ``bytes``; the ``websockets`` sans-IO protocol buffers its input
  too) and walks a generator per frame; the hub spent about a third of its time relaying
  64 KiB messages there. This parser reads a header with a few integer operations and hands
  the payload on as a slice of what arrived (one copy on a server, the unmasking; none on a
  client); the encoder returns a header and the payload as separate buffers (a server's
  payload not copied, a client's copied once, by masking), for a vectored write.
* **One owner per layer.** Data frames, control frames and the closing handshake are read and
  written here, in one place, with one set of event classes; no other WebSocket library is
  on the runtime path, and none is patched. wsproto stays the reference the tests and fuzz
  harnesses compare these decisions with.
* **Any I/O layer.** Nothing here reads a socket, a clock or a random source: the trio
  adapter (``devstream_trio.transport.websocket``) and an asyncio one drive the same
  object, and a client passes the 4-byte masking key of each frame in (``mask_key``).
* **Masking is a function the codec calls**, given to :class:`Connection` or, by default,
  :data:`default_apply_mask`: the C ``apply_mask`` of the ``websockets`` wheel where it is
  installed (importing a pure function is not I/O), else :func:`pure_apply_mask`. The bytes
  are the same either way.

Rules every change must keep:

* **Frames are checked as RFC 6455 asks**: reserved bits clear (no extension is ever
  negotiated), a known opcode, a mask from a client and none from a server, the shortest
  length encoding, no length with its top bit set, continuations only inside a message and
  new messages only outside one, text that is valid UTF-8 (checked as it arrives, so a
  message that goes wrong is refused at the first bad byte). Control frames are never
  fragmented and carry at most 125 bytes; a close carries nothing, or a valid code
  (:func:`is_valid_close_code`, §7.4) and a UTF-8 reason.
* **A payload is handed on as far as it has arrived**, ``frame_finished=False`` until its
  end, so a long frame never has to fit in memory at once. It is ``bytes`` (unmasked, on a
  server; on a client, a read that held nothing else) or a ``memoryview`` of the ``bytes`` a
  read brought (on a client, not copied). Bytes only *borrowed* for the call (a buffer the
  next read reuses) are never kept: a client then copies its payloads out of them. Text is
  ``str``. A control frame is handed on whole, once it has all arrived. Pings that follow
  one another in a call's events are handed on as one, the last (RFC 6455 §5.5.3 lets an
  endpoint answer only the most recent): a flood of pings costs a parse apiece, not a pong.
* **A refusal ends the reading**: the events before it stand, and the list ends with a
  :class:`CloseConnection` carrying the close code to send (1002; 1007 for text or a close
  reason that is not UTF-8; 1003 for a text message on a ``binary_only`` connection);
  :attr:`Connection.failed` then says so. After a close frame, or
  a refusal, nothing more is read.
* **Bounded work per call.** One call parses at most ``max_frames`` frames
  (:data:`MAX_BATCH_FRAMES`), however small (a read of 1 MiB could hold 174,762 empty masked
  frames). What follows the last frame parsed is kept (copied if it was borrowed),
  :attr:`Connection.holds_more` says so, and ``receive_data(b"")`` parses the next batch; the
  caller lets other work run in between. Besides that rest, what is kept between reads is at
  most one partial header or control frame (131 bytes).
* **The closing handshake** is one table, :data:`TRANSITIONS`: ``OPEN`` goes to
  ``LOCAL_CLOSING`` when this side sends a close and to ``REMOTE_CLOSING`` when the peer's
  arrives; the other close then leads to ``CLOSED``. Data, pings and pongs are sent only while
  ``OPEN``; a close only while ``OPEN`` or ``REMOTE_CLOSING``. Anything else raises
  :class:`~devstream_core.errors.LocalProtocolError`, and so does a close code a peer would
  refuse (:func:`sendable_close_code` turns the ones that only report, 1005/1006/1015, into
  1001).

Decisions where implementations differ: close code 1014 (registered with IANA after the RFC)
is taken, as the ``websockets`` package takes it (wsproto refuses it); a header that is bad
already in its first bytes is refused before the rest of it arrives (wsproto waits for it).
"""

from __future__ import annotations

import codecs
import enum
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import ErrorCode, LocalProtocolError

__all__ = [
    "MAX_BATCH_FRAMES",
    "MAX_CLOSE_REASON",
    "MAX_CONTROL_PAYLOAD",
    "TRANSITIONS",
    "BytesMessage",
    "CloseConnection",
    "CloseInput",
    "Connection",
    "ConnectionState",
    "Event",
    "MaskFunction",
    "Ping",
    "Pong",
    "TextMessage",
    "default_apply_mask",
    "is_valid_close_code",
    "native_apply_mask",
    "pure_apply_mask",
    "sendable_close_code",
]

#: The most frames one :meth:`Connection.receive_data` parses; the rest waits for the next
#: call. The hub parses and relays this many 6-byte frames in about a millisecond (2.5 ms at
#: most on the benchmark machine, busy); larger frames are fewer per read.
MAX_BATCH_FRAMES = 512
#: The longest payload of a control frame (RFC 6455 §5.5).
MAX_CONTROL_PAYLOAD = 125
#: The longest close reason, in bytes of UTF-8 (the payload less the code).
MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2

_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_OP_PING = 0x9
_OP_PONG = 0xA
_FIN = 0x80
_PROTOCOL_ERROR = 1002
_UNSUPPORTED = 1003
_NO_STATUS = 1005
_INVALID_PAYLOAD = 1007
_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_HEAD16 = struct.Struct("!BBH")
_HEAD64 = struct.Struct("!BBQ")

# -- masking -----------------------------------------------------------------------------------

#: ``apply_mask(data, key)``: *data* XORed with the 4-byte *key* repeated, as new ``bytes``.
MaskFunction = Callable[[bytes | bytearray | memoryview, bytes], bytes]


def pure_apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """*data* masked with the 4-byte *key*, in pure Python (one big-integer XOR)."""
    size = len(data)
    if not size:
        return b""
    stream = (bytes(key) * (size // 4 + 1))[:size]
    value = int.from_bytes(data, "little") ^ int.from_bytes(stream, "little")
    return value.to_bytes(size, "little")


def _native_apply_mask() -> MaskFunction | None:
    try:
        from websockets.speedups import apply_mask
    except ImportError:  # pragma: no cover - where the optional C part is missing
        return None
    function: MaskFunction = apply_mask
    return function


#: The C ``apply_mask`` of the ``websockets`` wheel (tens of GB/s), or ``None`` where it is
#: not installed.
native_apply_mask: MaskFunction | None = _native_apply_mask()
#: The masking function a :class:`Connection` uses unless it is given one.
default_apply_mask: MaskFunction = native_apply_mask or pure_apply_mask

# -- events ------------------------------------------------------------------------------------
# Data events are made for every fragment on the relay's path, positionally: they are the
# only events whose fields are not keyword-only (a keyword call costs 40 % more there), and
# the only ones not frozen (a frozen dataclass sets each field through object.__setattr__:
# three times the cost of making one, 0.76 µs against 0.23). Nothing changes them once made.


@dataclass(slots=True)
class BytesMessage:
    """A binary fragment: part of a frame, or all of it (*frame_finished*), maybe the end of
    its message (*message_finished*). Received, *data* may be a view of what a read brought."""

    data: bytes | memoryview
    frame_finished: bool = True
    message_finished: bool = True


@dataclass(slots=True)
class TextMessage:
    """A text fragment, as :class:`BytesMessage` (sent as UTF-8)."""

    data: str
    frame_finished: bool = True
    message_finished: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    """A ping; the peer answers it with a :class:`Pong` carrying the same payload."""

    payload: bytes = b""

    def response(self) -> Pong:
        """The pong that answers this ping."""
        return Pong(payload=self.payload)


@dataclass(frozen=True, slots=True, kw_only=True)
class Pong:
    """A pong: the answer to a ping, or a heartbeat of its own."""

    payload: bytes = b""


@dataclass(frozen=True, slots=True, kw_only=True)
class CloseConnection:
    """A close: the peer's (code 1005 when its close carried none), or the one to send
    after a refusal (1002, 1007)."""

    code: int
    reason: str = ""

    def response(self) -> CloseConnection:
        """The close that answers this one (the same code and reason)."""
        return CloseConnection(code=self.code, reason=self.reason)


Event = BytesMessage | TextMessage | Ping | Pong | CloseConnection


def is_valid_close_code(code: int) -> bool:
    """True for a code a close frame may carry (RFC 6455 §7.4 and the IANA registry): the
    defined codes 1000-1003 and 1007-1014, and 3000-4999 (libraries and applications). Never
    1005, 1006 or 1015, which only report what happened."""
    return 1000 <= code <= 1003 or 1007 <= code <= 1014 or 3000 <= code <= 4999


def sendable_close_code(code: int) -> int:
    """*code* as this side may send it: a code that only reports what happened (1005: the
    close carried none; 1006: the connection ended without one; 1015: TLS failed) becomes
    1001 (going away), so a relay can pass on any close it saw."""
    return 1001 if code in (_NO_STATUS, 1006, 1015) else code


# -- the closing handshake ---------------------------------------------------------------------


class ConnectionState(enum.Enum):
    """Where the closing handshake stands."""

    OPEN = "open"
    #: This side sent a close; the peer's answer is awaited (data still arrives meanwhile).
    LOCAL_CLOSING = "local closing"
    #: The peer's close arrived; this side's answer is owed.
    REMOTE_CLOSING = "remote closing"
    CLOSED = "closed"


# Enum members looked up once: ``ConnectionState.OPEN`` costs a slow class attribute lookup
# on every send.
_OPEN = ConnectionState.OPEN


class CloseInput(enum.Enum):
    """What moves the closing handshake."""

    SEND_CLOSE = "send close"
    RECEIVE_CLOSE = "receive close"


#: Every legal step of the closing handshake; any other pair is refused.
TRANSITIONS: dict[tuple[ConnectionState, CloseInput], ConnectionState] = {
    (ConnectionState.OPEN, CloseInput.SEND_CLOSE): ConnectionState.LOCAL_CLOSING,
    (ConnectionState.OPEN, CloseInput.RECEIVE_CLOSE): ConnectionState.REMOTE_CLOSING,
    (ConnectionState.LOCAL_CLOSING, CloseInput.RECEIVE_CLOSE): ConnectionState.CLOSED,
    (ConnectionState.REMOTE_CLOSING, CloseInput.SEND_CLOSE): ConnectionState.CLOSED,
}


class _Refused(Exception):
    def __init__(self, reason: str, code: int = _PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


def _frame_header(first: int, length: int, mask_key: bytes) -> bytes:
    """The header of a frame: FIN/opcode byte *first*, payload *length*, mask key if any."""
    mask_bit = 0x80 if mask_key else 0
    if length < 126:
        head = bytes((first, mask_bit | length))
    elif length < 65536:
        head = _HEAD16.pack(first, mask_bit | 126, length)
    else:
        head = _HEAD64.pack(first, mask_bit | 127, length)
    return head + mask_key if mask_key else head


def _misuse(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.ARGUMENT_INVALID, message)


class Connection:
    """One end of an open WebSocket (the hub is the server, devices and services are
    clients); see the module's rules."""

    __slots__ = (
        "_decoder",
        "_done",
        "_failed",
        "_fin",
        "_key",
        "_mask",
        "_max_frames",
        "_message_opcode",
        "_out_opcode",
        "_pending",
        "_pending_start",
        "_remaining",
        "_state",
        "binary_only",
        "client",
        "holds_more",
    )

    def __init__(
        self,
        *,
        client: bool,
        apply_mask: MaskFunction | None = None,
        max_frames: int = MAX_BATCH_FRAMES,
        binary_only: bool = False,
    ) -> None:
        if max_frames < 1:
            raise _misuse("max_frames must be >= 1")
        #: A text message from the peer is refused with 1003 (a protocol whose messages are
        #: all binary: devstream.v1).
        self.binary_only = binary_only
        #: True when this end is the client: it masks what it sends, and frames arrive
        #: unmasked.
        self.client = bool(client)
        self._mask: MaskFunction = apply_mask or default_apply_mask
        self._max_frames = max_frames
        self._state = ConnectionState.OPEN
        #: Bytes not parsed yet, from ``_pending_start`` on: a header (or a control frame)
        #: that arrived in part, or what followed the last frame of a full batch.
        self._pending: bytes | memoryview = b""
        self._pending_start = 0
        #: The last call stopped after ``max_frames`` frames: ``receive_data(b"")`` goes on.
        self.holds_more = False
        #: Payload bytes of the current data frame still to come; -1 between frames.
        self._remaining = -1
        #: The current data frame's FIN bit, and its masking key turned to where it stands.
        self._fin = False
        self._key = b""
        #: The opcode of the data message arriving (text or binary), or ``None``.
        self._message_opcode: int | None = None
        self._decoder: codecs.IncrementalDecoder | None = None
        #: Nothing more is read: a close arrived, or a frame was refused.
        self._done = False
        self._failed = False
        #: The opcode of a data message sent in part, while its last fragment is still to come.
        self._out_opcode: int | None = None

    # -- state --------------------------------------------------------------------------------

    @property
    def state(self) -> ConnectionState:
        """Where the closing handshake stands."""
        return self._state

    @property
    def failed(self) -> bool:
        """True once a frame from the peer was refused (the last event was the close to send)."""
        return self._failed

    @property
    def in_message(self) -> bool:
        """True when part of a message (or of a frame) has arrived and the rest has not."""
        return self._message_opcode is not None or bool(self._pending)

    @property
    def sending_message(self) -> bool:
        """True while a data message sent in part waits for its last fragment."""
        return self._out_opcode is not None

    def _step(self, what: CloseInput) -> None:
        try:
            self._state = TRANSITIONS[(self._state, what)]
        except KeyError:
            raise _misuse(f"cannot {what.value} in state {self._state.value}") from None

    # -- sending ------------------------------------------------------------------------------

    def _check_key(self, mask_key: bytes) -> None:
        """Refuse a *mask_key* that does not suit this side."""
        if self.client:
            if len(mask_key) != 4:
                raise _misuse("a client masks every frame: mask_key must be 4 bytes")
        elif mask_key:
            raise _misuse("a server never masks: mask_key must be empty")

    def send_data(
        self,
        data: bytes | bytearray | memoryview | str,
        *,
        message_finished: bool = True,
        mask_key: bytes = b"",
    ) -> tuple[bytes, bytes | bytearray | memoryview]:
        """One data frame, as its header and its payload (text as UTF-8; on a server, *data*
        itself, not copied; on a client, masked with *mask_key*). With
        ``message_finished=False`` the message goes on in the next frames (continuations)."""
        if self._state is not _OPEN:
            raise _misuse(f"cannot send data in state {self._state.value}")
        if bool(mask_key) is not self.client or (mask_key and len(mask_key) != 4):
            self._check_key(mask_key)
        payload: bytes | bytearray | memoryview
        if isinstance(data, str):
            opcode, payload = _OP_TEXT, data.encode()
        else:
            opcode, payload = _OP_BINARY, data
        if self._out_opcode is None:
            first = opcode
        elif self._out_opcode != opcode:
            raise _misuse("one message cannot mix text and binary fragments")
        else:
            first = _OP_CONTINUATION
        self._out_opcode = None if message_finished else opcode
        if message_finished:
            first |= _FIN
        head = _frame_header(first, len(payload), mask_key)
        if mask_key:
            return head, self._mask(payload, mask_key)
        return head, payload

    def send_message(
        self, parts: Sequence[bytes | bytearray | memoryview], *, mask_key: bytes = b""
    ) -> list[bytes | bytearray | memoryview]:
        """One whole binary message given as its *parts* (joined, they are the message), in
        one frame: the buffers to write, the parts themselves on a server (not copied), one
        masked copy of them on a client."""
        return self.send_messages([parts], mask_keys=mask_key)

    def send_messages(
        self,
        messages: Sequence[Sequence[bytes | bytearray | memoryview]],
        *,
        mask_keys: bytes = b"",
    ) -> list[bytes | bytearray | memoryview]:
        """Whole binary messages, each given as its parts, one frame each, as
        :meth:`send_message` writes them; a client gives a 4-byte key for each message, one
        after the other in *mask_keys*. One call for a relay's batch."""
        if self._state is not _OPEN or self._out_opcode is not None:
            raise _misuse(f"cannot send a message in state {self._state.value}")
        if len(mask_keys) != (4 * len(messages) if self.client else 0):
            raise _misuse("mask_keys: 4 bytes for each message on a client, none on a server")
        out: list[bytes | bytearray | memoryview] = []
        append = out.append
        if mask_keys:
            mask = self._mask
            for index, parts in enumerate(messages):
                key = mask_keys[4 * index : 4 * index + 4]
                joined = parts[0] if len(parts) == 1 else b"".join(parts)
                append(_frame_header(_FIN | _OP_BINARY, len(joined), key))
                append(mask(joined, key))
        else:
            extend = out.extend
            for parts in messages:
                append(_frame_header(_FIN | _OP_BINARY, sum(map(len, parts)), b""))
                extend(parts)
        return out

    def _control(self, opcode: int, payload: bytes, mask_key: bytes) -> bytes:
        self._check_key(mask_key)
        if len(payload) > MAX_CONTROL_PAYLOAD:
            raise _misuse(f"a control frame carries at most {MAX_CONTROL_PAYLOAD} bytes")
        head = _frame_header(_FIN | opcode, len(payload), mask_key)
        return head + (self._mask(payload, mask_key) if mask_key else payload)

    def send_ping(self, payload: bytes = b"", *, mask_key: bytes = b"") -> bytes:
        """A ping frame (at most 125 bytes of *payload*)."""
        if self._state is not _OPEN:
            raise _misuse(f"cannot send a ping in state {self._state.value}")
        return self._control(_OP_PING, bytes(payload), mask_key)

    def send_pong(self, payload: bytes = b"", *, mask_key: bytes = b"") -> bytes:
        """A pong frame (at most 125 bytes of *payload*)."""
        if self._state is not _OPEN:
            raise _misuse(f"cannot send a pong in state {self._state.value}")
        return self._control(_OP_PONG, bytes(payload), mask_key)

    def send_close(
        self, code: int | None = 1000, reason: str = "", *, mask_key: bytes = b""
    ) -> bytes:
        """A close frame, starting the closing handshake or answering the peer's close.

        *code* ``None`` (or 1005, "no code") sends a close without a code, and then without a
        reason; any other code must be one a peer accepts (:func:`is_valid_close_code`). A
        reason longer than :data:`MAX_CLOSE_REASON` bytes of UTF-8 is cut there, between
        characters.
        """
        if code is None or code == _NO_STATUS:
            if reason:
                raise _misuse("a close without a code carries no reason")
            payload = b""
        elif not is_valid_close_code(code):
            raise _misuse(f"{code} is not a close code a peer accepts")
        else:
            data = reason.encode()
            if len(data) > MAX_CLOSE_REASON:
                data = data[:MAX_CLOSE_REASON].decode(errors="ignore").encode()
            payload = _U16.pack(code) + data
        self._check_key(mask_key)
        self._step(CloseInput.SEND_CLOSE)
        return self._control(_OP_CLOSE, payload, mask_key)

    # -- receiving ----------------------------------------------------------------------------

    def receive_data(self, data: bytes | memoryview, *, borrowed: bool = False) -> list[Event]:
        """The events the bytes *data* complete, in order. *borrowed*: *data* may change once
        this returns, so nothing returned or kept refers to it. ``b""`` parses the next batch
        of what was kept (:attr:`holds_more`); it does not mean the end of the stream."""
        events: list[Event] = []
        self.holds_more = False
        if self._done:
            return events
        start = 0
        if self._pending:
            if data:
                data = b"".join((self._pending[self._pending_start :], data))
            else:
                data, start = self._pending, self._pending_start
            self._pending, self._pending_start = b"", 0
            borrowed = False  # a new bytes object, or one kept
        try:
            self._parse(data, events, borrowed, start)
        except _Refused as exc:
            self._done = self._failed = True
            self._pending, self._pending_start = b"", 0
            events.append(CloseConnection(code=exc.code, reason=str(exc)))
        return events

    def _parse(
        self, data: bytes | memoryview, events: list[Event], borrowed: bool, pos: int
    ) -> None:
        size = len(data)
        view = memoryview(data)
        frames = self._max_frames
        while pos < size or self._remaining == 0:
            if self._remaining < 0:
                if not frames:
                    # A full batch: the rest waits for the next call.
                    self._pending = bytes(view[pos:]) if borrowed else data
                    self._pending_start = 0 if borrowed else pos
                    self.holds_more = True
                    return
                frames -= 1
                pos = self._header(data, pos, size, events)
                if pos < 0 or self._done:
                    return
                continue
            take = self._remaining
            if take > size - pos:
                take = size - pos
            chunk: bytes | memoryview
            if self._key:
                # Unmasking copies; it reads straight from what arrived.
                chunk = self._mask(view[pos : pos + take], self._key)
                turn = take & 3
                if turn:
                    self._key = self._key[turn:] + self._key[:turn]
            elif borrowed:
                chunk = bytes(view[pos : pos + take])
            elif pos == 0 and take == size:
                chunk = data
            else:
                chunk = view[pos : pos + take]  # a view of what arrived: not copied
            pos += take
            self._remaining -= take
            if self._message_opcode == _OP_BINARY:
                # Binary fragments are made here; text ones in _text.
                if self._remaining:
                    events.append(BytesMessage(chunk, False, False))
                else:
                    self._remaining = -1
                    if self._fin:
                        self._message_opcode = None
                    events.append(BytesMessage(chunk, True, self._fin))
            else:
                self._text(chunk, events)

    def _keep(self, data: bytes | memoryview, pos: int) -> int:
        """Keep the frame that starts at *pos*, not all here yet, for the next read."""
        self._pending = bytes(data[pos:])
        return -1

    def _header(self, data: bytes | memoryview, pos: int, size: int, events: list[Event]) -> int:
        """Parse the frame header at *pos*; return where its payload starts, or -1 (with the
        rest kept for the next read) when the header, or a control frame, is not all here."""
        if size - pos < 2:
            return self._keep(data, pos)
        first = data[pos]
        second = data[pos + 1]
        opcode = first & 0x0F
        if first & 0x70:
            raise _Refused("a reserved bit is set")
        length = second & 0x7F
        masked = second & 0x80
        if masked and self.client:
            raise _Refused("a client received a masked frame")
        if not masked and not self.client:
            raise _Refused("a server received an unmasked frame")
        if opcode >= _OP_CLOSE:
            if opcode > _OP_PONG:
                raise _Refused(f"unknown opcode {opcode:#x}")
            if not first & _FIN:
                raise _Refused("a fragmented control frame")
            if length > MAX_CONTROL_PAYLOAD:
                raise _Refused(f"a control frame of more than {MAX_CONTROL_PAYLOAD} bytes")
            start = pos + 2 + (4 if masked else 0)
            end = start + length
            if end > size:
                return self._keep(data, pos)
            payload = bytes(data[start:end])
            if masked:
                payload = self._mask(payload, bytes(data[start - 4 : start]))
            self._control_frame(opcode, payload, events)
            return end
        if opcode > _OP_BINARY:
            raise _Refused(f"unknown opcode {opcode:#x}")
        start = pos + 2
        if length == 126:
            if size - start < 2:
                return self._keep(data, pos)
            (length,) = _U16.unpack_from(data, start)
            start += 2
            if length < 126:
                raise _Refused("a 2-byte length where 1 byte would do")
        elif length == 127:
            if size - start < 8:
                return self._keep(data, pos)
            (length,) = _U64.unpack_from(data, start)
            start += 8
            if length < 65536:
                raise _Refused("an 8-byte length where 2 bytes would do")
            if length >> 63:
                raise _Refused("an 8-byte length with its top bit set")
        if masked:
            if size - start < 4:
                return self._keep(data, pos)
            self._key = bytes(data[start : start + 4])
            start += 4
        else:
            self._key = b""
        if opcode == _OP_CONTINUATION:
            if self._message_opcode is None:
                raise _Refused("a continuation frame outside a message")
        elif self._message_opcode is not None:
            raise _Refused(f"a new message (opcode {opcode:#x}) inside a message")
        else:
            if opcode == _OP_TEXT:
                if self.binary_only:
                    raise _Refused("a text message where only binary ones are taken", _UNSUPPORTED)
                self._decoder = codecs.getincrementaldecoder("utf-8")()
            self._message_opcode = opcode
        self._fin = bool(first & _FIN)
        self._remaining = length
        return start

    def _control_frame(self, opcode: int, payload: bytes, events: list[Event]) -> None:
        if opcode == _OP_PING:
            if events and type(events[-1]) is Ping:
                # Pings one after another: only the last is reported, and answered (RFC 6455
                # §5.5.3 allows a pong for the most recent only). A peer that floods pings
                # costs a parse apiece, not an answer apiece.
                events[-1] = Ping(payload=payload)
            else:
                events.append(Ping(payload=payload))
        elif opcode == _OP_PONG:
            events.append(Pong(payload=payload))
        else:
            events.append(self._close_frame(payload))

    def _close_frame(self, payload: bytes) -> CloseConnection:
        if not payload:
            code, reason = _NO_STATUS, ""
        elif len(payload) == 1:
            raise _Refused("a close frame with a 1-byte payload")
        else:
            (code,) = _U16.unpack_from(payload)
            if not is_valid_close_code(code):
                raise _Refused(f"a close frame with code {code}")
            try:
                reason = payload[2:].decode()
            except UnicodeDecodeError as exc:
                raise _Refused("a close reason that is not UTF-8", _INVALID_PAYLOAD) from exc
        self._step(CloseInput.RECEIVE_CLOSE)
        self._done = True
        return CloseConnection(code=code, reason=reason)

    def _text(self, chunk: bytes | memoryview, events: list[Event]) -> None:
        frame_finished = self._remaining == 0
        finished = frame_finished and self._fin
        if frame_finished:
            self._remaining = -1
        assert self._decoder is not None
        try:
            text = self._decoder.decode(chunk, finished)
        except UnicodeDecodeError as exc:
            # Not the decoder's own words ("'utf-8' codec can't decode byte..."): the reason
            # goes to the peer, and to the other side of a stream.
            raise _Refused("text that is not UTF-8", _INVALID_PAYLOAD) from exc
        events.append(TextMessage(text, frame_finished, finished))
        if finished:
            self._message_opcode = None
            self._decoder = None
