"""Reading WebSocket frames as they arrive: data frames here, control frames through wsproto.

:class:`FrameReader` is sans-IO: :meth:`FrameReader.receive` takes the bytes one read brought
and returns wsproto events (``BytesMessage``, ``TextMessage``, ``Ping``, ``Pong``,
``CloseConnection``), the same ones, split at the same places, that wsproto's own
``Connection.receive_data`` followed by ``events()`` gives for the same bytes.

Why it exists: on a relay every payload byte is parsed on the way in. wsproto's parser copies
each payload three times (into its buffer, out of it, and into ``bytes``) and walks a generator
per frame; the hub spent about a third of its time relaying 64 KiB messages there. This reader
parses the header with a few integer operations and hands the payload on as a slice of what
arrived (one copy on a server, the unmasking; none on a client).

Rules:

* Data frames (binary, text, continuation) are checked here as RFC 6455 asks: reserved bits
  clear (no extension is ever negotiated), a known opcode, a mask from a client and none from a
  server, the shortest length encoding, no length with its top bit set, continuations only
  inside a message and new messages only outside one, text that is valid UTF-8.
* Control frames (ping, pong, close) are passed whole, as they arrived, to the wsproto
  ``Connection``: it checks them (a close's code and reason) and keeps the closing handshake's
  state, which sending a close also uses.
* A frame's payload is handed on as far as it has arrived, ``frame_finished=False`` until its
  end, as wsproto does, so a long frame never has to fit in memory at once.
* A payload is ``bytes`` (unmasked on a server; on a client, a read that held nothing else) or
  a ``memoryview`` of the ``bytes`` a read brought (on a client, not copied). Text is ``str``.
  Bytes only *borrowed* for the call (a buffer the next read reuses) are never kept: a client
  then copies its payloads out of them.
* A frame that breaks the protocol ends the reading with a ``CloseConnection`` carrying the
  close code to send (1002, or 1007 for text that is not UTF-8); the events before it stand.
  After a close frame, or such an error, nothing more is read.
* One call parses at most ``max_frames`` frames (:data:`MAX_BATCH_FRAMES`): the events of a
  read are a batch of bounded size, however small its frames (a read of 1 MiB could hold
  174,762 empty masked frames). What follows the last frame parsed is kept (copied if it was
  borrowed), :attr:`FrameReader.holds_more` says so, and ``receive(b"")`` parses the next
  batch; the caller lets other work run in between.
"""

from __future__ import annotations

import codecs
import struct

from wsproto.connection import Connection
from wsproto.events import BytesMessage, CloseConnection, Event, TextMessage

from . import _mask

__all__ = ["MAX_BATCH_FRAMES", "FrameReader"]

#: The most frames one :meth:`FrameReader.receive` parses; the rest waits for the next call.
#: The hub parses and relays this many 6-byte frames in about a millisecond (2.5 ms at most
#: on the benchmark machine, busy); larger frames are fewer per read.
MAX_BATCH_FRAMES = 512

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_OP_CONTINUATION = 0x0
_OP_TEXT = 0x1
_OP_BINARY = 0x2
_OP_CLOSE = 0x8
_PROTOCOL_ERROR = 1002
_INVALID_PAYLOAD = 1007


class _Failed(Exception):
    def __init__(self, reason: str, code: int = _PROTOCOL_ERROR) -> None:
        super().__init__(reason)
        self.code = code


class FrameReader:
    """Parses the frames a peer sends; see the module's rules."""

    __slots__ = (
        "_client",
        "_connection",
        "_decoder",
        "_done",
        "_fin",
        "_key",
        "_max_frames",
        "_message_opcode",
        "_pending",
        "_pending_start",
        "_remaining",
        "_unmask",
        "holds_more",
    )

    def __init__(self, connection: Connection, *, max_frames: int = MAX_BATCH_FRAMES) -> None:
        self._connection = connection
        #: True when this end is the client: frames then arrive unmasked.
        self._client = connection.client
        #: Bytes not parsed yet, from ``_pending_start`` on: a header (or a control frame)
        #: that arrived in part, or what followed the last frame of a full batch.
        self._pending: bytes | memoryview = b""
        self._pending_start = 0
        self._max_frames = max_frames
        #: The last call stopped after ``max_frames`` frames: ``receive(b"")`` goes on.
        self.holds_more = False
        #: Payload bytes of the current data frame still to come; -1 between frames.
        self._remaining = -1
        #: The current data frame's FIN bit, and its masking key turned to where it stands.
        self._fin = False
        self._key = b""
        #: The opcode of the data message in progress (text or binary), or ``None``.
        self._message_opcode: int | None = None
        self._decoder: codecs.IncrementalDecoder | None = None
        self._done = False
        #: The masking function (the native one when it is in use).
        self._unmask = _mask.unmasker()

    @property
    def in_message(self) -> bool:
        """True when part of a message (or of a frame) has arrived and the rest has not."""
        return self._message_opcode is not None or bool(self._pending)

    def receive(self, data: bytes | memoryview, *, borrowed: bool = False) -> list[Event]:
        """The events the bytes *data* complete, in order. *borrowed*: *data* may change once
        this returns, so nothing returned or kept refers to it."""
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
        except _Failed as exc:
            self._done = True
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
                chunk = self._unmask(view[pos : pos + take], self._key)
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
                # The usual event, made here rather than in _emit.
                if self._remaining:
                    events.append(BytesMessage(chunk, False, False))  # type: ignore[arg-type]
                else:
                    self._remaining = -1
                    if self._fin:
                        self._message_opcode = None
                    events.append(BytesMessage(chunk, True, self._fin))  # type: ignore[arg-type]
            else:
                self._emit(chunk, events)

    def _header(self, data: bytes | memoryview, pos: int, size: int, events: list[Event]) -> int:
        """Parse the frame header at *pos*; return where its payload starts, or -1 (with the
        rest kept for the next read) when the header, or a control frame, is not all here."""
        if size - pos < 2:
            self._pending = bytes(data[pos:])
            return -1
        first = data[pos]
        second = data[pos + 1]
        opcode = first & 0x0F
        if first & 0x70:
            raise _Failed("Reserved bit set unexpectedly")
        length = second & 0x7F
        masked = second & 0x80
        if masked and self._client:
            raise _Failed("client received unexpected masked frame")
        if not masked and not self._client:
            raise _Failed("server received unexpected unmasked frame")
        if opcode >= _OP_CLOSE:
            if opcode > 0xA:
                raise _Failed(f"Invalid opcode {opcode:#x}")
            if not first & 0x80:
                raise _Failed("Invalid attempt to fragment control frame")
            if length > 125:
                raise _Failed("Control frame with payload len > 125")
            end = pos + 2 + (4 if masked else 0) + length
            if end > size:
                self._pending = bytes(data[pos:])
                return -1
            self._connection.receive_data(bytes(data[pos:end]))
            for event in self._connection.events():
                events.append(event)
                if isinstance(event, CloseConnection):
                    self._done = True
            return end
        if opcode > _OP_BINARY:
            raise _Failed(f"Invalid opcode {opcode:#x}")
        start = pos + 2
        if length == 126:
            if size - start < 2:
                self._pending = bytes(data[pos:])
                return -1
            (length,) = _U16.unpack_from(data, start)
            start += 2
            if length < 126:
                raise _Failed("Payload length used 2 bytes when 1 would have sufficed")
        elif length == 127:
            if size - start < 8:
                self._pending = bytes(data[pos:])
                return -1
            (length,) = _U64.unpack_from(data, start)
            start += 8
            if length < 65536:
                raise _Failed("Payload length used 8 bytes when 2 would have sufficed")
            if length >> 63:
                raise _Failed("8-byte payload length with non-zero MSB")
        if masked:
            if size - start < 4:
                self._pending = bytes(data[pos:])
                return -1
            self._key = bytes(data[start : start + 4])
            start += 4
        else:
            self._key = b""
        if opcode == _OP_CONTINUATION:
            if self._message_opcode is None:
                raise _Failed("unexpected CONTINUATION")
        elif self._message_opcode is not None:
            raise _Failed(f"expected CONTINUATION, got {opcode:#x}")
        else:
            self._message_opcode = opcode
            if opcode == _OP_TEXT:
                self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._fin = bool(first & 0x80)
        self._remaining = length
        return start

    def _emit(self, chunk: bytes | memoryview, events: list[Event]) -> None:
        frame_finished = self._remaining == 0
        finished = frame_finished and self._fin
        if frame_finished:
            self._remaining = -1
        if self._message_opcode == _OP_BINARY:
            events.append(
                BytesMessage(
                    data=chunk,  # type: ignore[arg-type]  # wsproto says bytes; a view reads alike
                    frame_finished=frame_finished,
                    message_finished=finished,
                )
            )
        else:
            assert self._decoder is not None
            try:
                text = self._decoder.decode(chunk, finished)
            except UnicodeDecodeError as exc:
                raise _Failed(str(exc), _INVALID_PAYLOAD) from exc
            events.append(
                TextMessage(data=text, frame_finished=frame_finished, message_finished=finished)
            )
        if finished:
            self._message_opcode = None
            self._decoder = None
