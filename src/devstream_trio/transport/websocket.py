"""A small WebSocket connection over any ``trio.abc.Stream``, driving the core's codec.

The opening handshake is done elsewhere (``_http``); this module takes over once the
``101 Switching Protocols`` has been exchanged, with a
:class:`devstream_core.websocket.Connection` (the codec: every frame in and out, the closing
handshake, masking) and any bytes that arrived after the handshake. What is left here is I/O:
reads, writes, the send lock, cancellation, and the random masking keys a client gives the
codec.

Rules:

* One task reads (``receive``); any number of tasks may send: sends are serialised by a lock.
* ``receive`` is safe to cancel: events already parsed wait in a queue, and bytes are only
  read from the transport when that queue is empty.
* Pings are answered by the reader. The time of the last byte received is kept, so a keepalive
  task can tell a silent peer from a live one.
* A close from the peer is answered and reported as :class:`ConnectionClosed`; a transport that
  ends without a close is reported as ``ConnectionClosed(1006)``.
* The codec encodes a data frame as a header and the payload (masked by a client, with the
  function it was given: ``_http`` gives ``_mask.masker()``'s), so that a payload is copied
  at most once on its way out, and parses what arrives handing each payload on as a slice of
  what arrived.
* Reads ask for 64 KiB, doubling up to 1 MiB while each read fills what it asked for, and
  everything one read brings is parsed before the next. On a plain socket a server (the hub)
  reads into one buffer per trio run and parses it before any other task runs: it copies each
  payload out anyway, unmasking it, and allocating a buffer of a few hundred KiB per read cost
  more than the read. A client reads into fresh bytes and hands its payloads on as views of
  them, which costs less than copying them. Relays take what was parsed in one go
  (:meth:`WebSocket.take_queued`, :meth:`WebSocket.receive_messages`) and write it at once:
  on a plain socket with ``writev``, payloads of 16 KiB or more as buffers of their own (not
  copied), the frame headers and short payloads between them joined; on TLS with one
  ``send_all`` (payloads of 512 KiB or more with a ``send_all`` of their own).
* A read's frames are parsed in batches of at most ``websocket.MAX_BATCH_FRAMES``: a receive
  that parses the next batch of what a read brought is a checkpoint, as one that reads is, so
  one connection's flood of tiny frames holds the run for one batch at a time, and what a
  relay takes at once (:meth:`WebSocket.take_queued`) is one batch at most. A message read
  whole may come in at most :data:`MAX_MESSAGE_FRAGMENTS` fragments.
* Checkpoints. A receive that reads from the transport is a checkpoint; one answered from
  what was already parsed is not. A send is a cancellation point, but on a plain socket not a
  schedule point when the lock is free and the kernel takes every byte at once: each pass of
  a relay then costs one trip through trio's scheduler, not three. Every loop that sends here
  also reads. On a plain socket a read that drained the socket makes the next one wait for
  data first, rather than try a read bound to fail.
"""

from __future__ import annotations

import collections
import contextlib
import os
from collections.abc import Sequence
from typing import NoReturn

import trio

from devstream_core.errors import LocalProtocolError
from devstream_core.websocket import (
    BytesMessage,
    CloseConnection,
    Connection,
    ConnectionState,
    Event,
    Ping,
    Pong,
    TextMessage,
    sendable_close_code,
)

from . import io as _io

__all__ = [
    "ABNORMAL_CLOSURE",
    "MAX_MESSAGE_FRAGMENTS",
    "MESSAGE_TOO_BIG",
    "NORMAL_CLOSURE",
    "ConnectionClosed",
    "SendLock",
    "WebSocket",
    "close_forcefully",
    "payload",
]

#: The close code of a normal end.
NORMAL_CLOSURE = 1000
#: The close code reported when the transport ended without a close frame (never sent).
ABNORMAL_CLOSURE = 1006
#: The close code for a message larger than the receiver takes, or in too many fragments.
MESSAGE_TOO_BIG = 1009
#: The most fragments (frames, empty ones too) a message read whole may come in (the default
#: of ``max_fragments``, for devstream.v1 on the hub and in the clients): one that has come
#: in this many without its end is refused with 1009, as one too big is. Bytes are not all a
#: message costs: each fragment is kept until the message is whole. A 1 MiB message in
#: 256-byte frames still fits. Frames are counted, not reads: one frame that arrives in many
#: small reads is one fragment (its pieces, one per read, are joined whenever more than this
#: many are kept).
MAX_MESSAGE_FRAGMENTS = 4096
#: Bytes a client asks of the transport per read, at first and at most. A read that fills
#: what it asked for doubles the next one (a busy stream then moves up to 1 MiB per scheduler
#: pass); two in a row that bring less than a quarter halve it (a chatty connection does not
#: allocate 1 MiB for each small read). Two, not one: a message a little longer than a read
#: leaves a short tail for the next, and halving on that tail would split every such message
#: in two reads. A server reads into the run's shared buffer, always up to its whole size.
_RECEIVE_SIZE = 65536
_RECEIVE_SIZE_MAX = 1024 * 1024

#: Parts at least this long are handed on as they are, not copied into one buffer with their
#: neighbours (frame headers, small payloads): on a plain socket as a buffer of their own in
#: one ``writev``; on other streams (TLS) with a ``send_all`` of their own, which only pays
#: for long parts.
_ALONE_SOCKET = 16384
_ALONE_STREAM = 1 << 19
#: The events that carry data (the codec makes exactly these types).
_DATA_EVENTS = frozenset({BytesMessage, TextMessage})
#: Looked up once: an enum member is a slow class attribute lookup on every send.
_OPEN = ConnectionState.OPEN


async def close_forcefully(stream: trio.abc.Stream) -> None:
    """Close *stream* at once, as :func:`trio.aclose_forcefully` does.

    A plain :class:`trio.SocketStream` has nothing to flush: its socket is closed directly,
    which spares the cancelled scope (and the ``Cancelled`` raised and caught in it) that
    ``aclose_forcefully`` costs on every connection. That path is not a checkpoint.
    """
    if type(stream) is trio.SocketStream:
        stream.socket.close()
    else:
        await trio.aclose_forcefully(stream)


def _gather(
    parts: Sequence[bytes | bytearray | memoryview], alone: int
) -> list[bytes | bytearray | memoryview]:
    """*parts* as the buffers to write: parts of *alone* bytes or more by themselves, runs of
    shorter ones joined."""
    if len(parts) == 2 and len(parts[1]) >= alone:
        # One long payload and its frame header (a relay's usual write): nothing to join.
        return [parts[0], parts[1]] if parts[0] else [parts[1]]
    buffers: list[bytes | bytearray | memoryview] = []
    run: list[bytes | bytearray | memoryview] = []
    for part in parts:
        if len(part) >= alone:
            if run:
                buffers.append(b"".join(run) if len(run) > 1 else run[0])
                run = []
            buffers.append(part)
        elif part:
            run.append(part)
    if run:
        buffers.append(b"".join(run) if len(run) > 1 else run[0])
    return buffers


_READ_BUFFER: trio.lowlevel.RunVar[memoryview] = trio.lowlevel.RunVar("devstream_read_buffer")


def _read_buffer() -> memoryview:
    """The buffer plain-socket reads go into, one per trio run (``_RECEIVE_SIZE_MAX`` bytes)."""
    try:
        return _READ_BUFFER.get()
    except LookupError:
        buffer = memoryview(bytearray(_RECEIVE_SIZE_MAX))
        _READ_BUFFER.set(buffer)
        return buffer


class SendLock:
    """The lock that serialises a WebSocket's writers, first come first served. Taking it
    while it is free is a cancellation point but not a schedule point: the write that follows
    usually completes at once, and the loops that send also read, which always is one.

    Lighter than ``trio.StrictFIFOLock``, which it replaces on every send: a flag while no one
    waits, and a parking lot made only when a second writer has to wait. A releasing writer
    hands the lock straight to the first one waiting.
    """

    __slots__ = ("_busy", "_waiters")

    def __init__(self) -> None:
        self._busy = False
        self._waiters: trio.lowlevel.ParkingLot | None = None

    async def __aenter__(self) -> None:
        if self._busy:
            if self._waiters is None:
                self._waiters = trio.lowlevel.ParkingLot()
            # Woken holding the lock; cancelled while waiting, never holding it.
            await self._waiters.park()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
            self._busy = True

    async def __aexit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        if self._waiters:
            self._waiters.unpark()  # the first waiter now holds it
        else:
            self._busy = False

    def locked(self) -> bool:
        return self._busy


class ConnectionClosed(Exception):
    """The WebSocket is closed; ``code`` and ``reason`` are the peer's (or 1006)."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(f"WebSocket closed: {code} {reason}".rstrip())
        self.code = code
        self.reason = reason


class WebSocket:
    """One open WebSocket: messages in and out, pings, close."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: Connection,
        *,
        subprotocol: str | None = None,
        handshake_headers: list[tuple[bytes, bytes]] | None = None,
        initial_data: bytes = b"",
    ) -> None:
        self.stream = stream
        self.subprotocol = subprotocol
        #: The headers of the handshake's other half (the 101 response, on a client).
        self.handshake_headers = handshake_headers or []
        #: The pieces of a message received in part (a frame that came in several reads is
        #: several pieces), their total length, and the frames of it that have ended.
        self._parts: list[bytes | memoryview] = []
        self._parts_size = 0
        self._frames = 0
        self._ws = connection
        self._client = connection.client
        self._receive_size = _RECEIVE_SIZE
        #: The last read brought less than a quarter of what it asked for.
        self._small_read = False
        #: The last read brought less than it asked for: the next one waits for data first.
        self._drained = False
        self._events: collections.deque[Event] = collections.deque()
        self._send_lock = SendLock()
        #: The part of a message send_bytes_nowait could not write at once: written first by
        #: the next send.
        self._backlog: list[memoryview] = []
        self._closed: ConnectionClosed | None = None
        #: A server on a plain socket: reads go into the run's shared buffer (_read_plain).
        self._server_plain = type(stream) is trio.SocketStream and not self._client
        #: The run's read buffer, as the list ``readv`` takes (a server's plain-socket reads),
        #: fetched at the first read.
        self._read_buffers: list[memoryview] = []
        #: trio time of the last bytes received from the peer.
        self.last_received = trio.current_time()
        # Bytes that came in with the handshake, after it.
        if initial_data:
            self._events.extend(connection.receive_data(initial_data))

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection closed, or ``None`` while it is open."""
        return self._closed

    @property
    def is_open(self) -> bool:
        """True while messages can still be sent."""
        return self._ws.state is _OPEN

    @property
    def close_sent(self) -> bool:
        """True once this side's close went out (the peer's answer may be on its way)."""
        return self._ws.state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED)

    @property
    def buffered(self) -> int:
        """For observability (memory accounting, tests): the bytes of messages this side
        read from the socket and holds, not yet handed to the application (the parts of a
        message being put together, and the fragments decoded but not yet taken)."""
        held = self._parts_size
        for event in self._events:
            if isinstance(event, (BytesMessage, TextMessage)):
                held += len(event.data)
        return held

    async def _send(self, event: Event) -> None:
        await self._send_events([event])

    async def _send_events(self, events: Sequence[Event]) -> None:
        """Encode *events* with the codec and write them out, small frames together in one
        write. Refused because the connection is closing, they raise
        :class:`ConnectionClosed`; refused otherwise (text inside a binary message), the
        codec's ``LocalProtocolError``."""
        async with self._send_lock:
            parts: list[bytes | bytearray | memoryview] = []
            ws = self._ws
            try:
                for event in events:
                    key = os.urandom(4) if self._client else b""
                    if type(event) is BytesMessage or type(event) is TextMessage:
                        parts.extend(
                            ws.send_data(
                                event.data, message_finished=event.message_finished, mask_key=key
                            )
                        )
                    elif type(event) is Ping:
                        parts.append(ws.send_ping(event.payload, mask_key=key))
                    elif type(event) is Pong:
                        parts.append(ws.send_pong(event.payload, mask_key=key))
                    elif type(event) is CloseConnection:
                        code = sendable_close_code(event.code)
                        parts.append(ws.send_close(code, event.reason, mask_key=key))
                    else:
                        raise TypeError(f"not an event of devstream_core.websocket: {event!r}")
            except LocalProtocolError as exc:
                if ws.state is _OPEN:
                    raise
                raise self._closing_error() from exc
            await self._write(parts)

    def _closing_error(self) -> ConnectionClosed:
        """What a send raises once the connection is closing or closed."""
        return ConnectionClosed(self._closed.code if self._closed else ABNORMAL_CLOSURE, "closed")

    async def _write(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write *parts* in order, the small ones joined, the large ones on their own; a lost
        transport is reported as ``ConnectionClosed(1006)``. Call with the send lock held."""
        try:
            await self._write_parts(parts)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._mark_lost()
            raise ConnectionClosed(ABNORMAL_CLOSURE, "connection lost") from exc

    def _mark_lost(self) -> None:
        """The transport is gone: the WebSocket counts as closed (1006) unless it already is."""
        self._closed = self._closed or ConnectionClosed(ABNORMAL_CLOSURE, "connection lost")

    def _write_nowait(self, parts: list[bytes | bytearray | memoryview]) -> None:
        """Write *parts* from the calling task as far as the socket takes them now, keeping
        the rest as the backlog the next send writes first (callers checked
        :attr:`can_send_nowait`). A transport that is gone marks the WebSocket closed, for the
        reader to find out."""
        stream = self.stream
        assert type(stream) is trio.SocketStream  # can_send_nowait says so
        try:
            self._backlog = _io.write_nowait(stream, _gather(parts, _ALONE_SOCKET))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._mark_lost()

    async def _write_parts(self, parts: list[bytes | bytearray | memoryview]) -> None:
        if type(self.stream) is trio.SocketStream:
            own = _gather(parts, _ALONE_SOCKET)
            buffers = own
            if self._backlog:
                # What a send_bytes_nowait left goes first.
                buffers, self._backlog = [*self._backlog, *own], []
            rest = _io.write_nowait(self.stream, buffers)
            if rest:
                await self._write_rest(self.stream, own, rest)
        else:
            buffers = _gather(parts, _ALONE_STREAM)
            try:
                for buffer in buffers:
                    await self.stream.send_all(buffer)
            except trio.Cancelled:
                # How much of the frames went out is unknown (a TLS stream is broken after
                # this): the connection ends, as a socket's does when its frame is cut.
                self._closed = self._closed or ConnectionClosed(
                    ABNORMAL_CLOSURE, "a send was cancelled part way through a frame"
                )
                raise
            if not buffers:
                await trio.lowlevel.checkpoint()

    async def _write_rest(
        self,
        stream: trio.SocketStream,
        own: list[bytes | bytearray | memoryview],
        rest: list[memoryview],
    ) -> None:
        """Write *rest*, what the socket did not take at once, as it drains; *own* are this
        send's buffers, which come after any backlog of an earlier send_bytes_nowait.

        Cancelled once part of *own* went out, the frames on the wire are cut, and the peer
        would read the next frame's bytes as the rest of the cut one: the connection ends
        instead (the transport is closed; sends and receives then raise
        ``ConnectionClosed(1006)``). Cancelled before any of *own* went out, this send is
        dropped whole and what is left of the backlog stays for the next send.
        """
        try:
            while rest:
                await trio.lowlevel.wait_writable(stream.socket)
                rest = _io.write_nowait(stream, rest)
        except trio.Cancelled:
            if sum(map(len, rest)) < sum(map(len, own)):
                self._closed = self._closed or ConnectionClosed(
                    ABNORMAL_CLOSURE, "a send was cancelled part way through a frame"
                )
                stream.socket.close()
            else:
                self._backlog = rest[: len(rest) - len(own)]
            raise

    async def send_bytes(self, data: bytes, *, message_finished: bool = True) -> None:
        """Send binary data; ``message_finished=False`` sends a fragment of a longer message."""
        await self._send(BytesMessage(data=data, message_finished=message_finished))

    def send_bytes_nowait(self, data: bytes) -> bool:
        """Send *data* as one binary message from the calling task, without waiting and
        without a checkpoint, when that can be done: on a plain socket, with no other send in
        progress. True when the WebSocket took the message: written, or its end kept to go
        out first with the next send or :meth:`flush`, as the kernel allowed (or dropped with
        a transport that is gone, which the reader finds out). False when the caller must
        send it the usual way.

        For a writer that must not wait (a task that also reads, or one that must not be
        cancelled mid-frame): nothing is ever cut by a cancellation here.
        """
        if not self.can_send_nowait:
            return False
        key = os.urandom(4) if self._client else b""
        self._write_nowait(list(self._ws.send_data(data, mask_key=key)))
        return True

    def send_close_nowait(self, code: int = 1000, reason: str = "") -> bool:
        """Start the closing handshake from the calling task, as :meth:`send_bytes_nowait`
        sends a message: True when the close went out (or its end was kept to go out first
        with the next write), False when the caller must use :meth:`send_close`."""
        if not self.can_send_nowait:
            return False
        key = os.urandom(4) if self._client else b""
        self._write_nowait([self._ws.send_close(sendable_close_code(code), reason, mask_key=key)])
        return True

    @property
    def can_send_nowait(self) -> bool:
        """True when :meth:`send_bytes_nowait` would take a message now."""
        return (
            type(self.stream) is trio.SocketStream
            and not self._send_lock.locked()
            and not self._backlog
            and not self._ws.sending_message
            and self._closed is None
            and self._ws.state is _OPEN
        )

    @property
    def has_queued_events(self) -> bool:
        """True when the next receive starts from what was already read and parsed (it may
        then return without reading, and without a checkpoint)."""
        return bool(self._events)

    @property
    def has_backlog(self) -> bool:
        """True while part of a message :meth:`send_bytes_nowait` took waits to be written."""
        return bool(self._backlog)

    async def flush(self) -> None:
        """Write what :meth:`send_bytes_nowait` left, if anything."""
        if not self._backlog:
            await trio.lowlevel.checkpoint()
            return
        async with self._send_lock:
            await self._write([])

    async def send_text(self, text: str, *, message_finished: bool = True) -> None:
        """Send text data."""
        await self._send(TextMessage(data=text, message_finished=message_finished))

    def take_queued(self) -> list[BytesMessage | TextMessage]:
        """The data fragments already received and parsed, without waiting for more.

        Stops at the first control event (ping, close), which :meth:`receive` handles.
        """
        taken: list[BytesMessage | TextMessage] = []
        events = self._events
        while events and type(events[0]) in _DATA_EVENTS:
            taken.append(events.popleft())  # type: ignore[arg-type]  # a data event
        return taken

    async def send_messages(self, events: Sequence[BytesMessage | TextMessage]) -> None:
        """Relay several received fragments with one write.

        Adjacent fragments of one message are joined into one frame, each byte copied once;
        message boundaries are kept exactly.
        """
        merged: list[BytesMessage | TextMessage] = []
        run: list[BytesMessage | TextMessage] = []
        for event in events:
            run.append(event)
            if event.message_finished:
                merged.append(_joined(run))
                run = []
        if run:
            merged.append(_joined(run))
        await self._send_events(merged)

    async def ping(self, payload: bytes = b"") -> None:
        """Send a ping; the peer's pong updates :attr:`last_received`."""
        await self._send(Ping(payload=payload))

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        """Start (or answer) the closing handshake; does nothing if already closed. A code
        that only reports what happened (1005, 1006, 1015) is sent as 1001."""
        code = sendable_close_code(code)
        async with self._send_lock:
            if self._ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                return
            key = os.urandom(4) if self._client else b""
            data = self._ws.send_close(code, reason, mask_key=key)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._write_parts([data])

    async def receive(self) -> BytesMessage | TextMessage:
        """Return the next data fragment; raise :class:`ConnectionClosed` at the end."""
        events = self._events
        while True:
            if self._closed is not None and not events:
                raise self._closed
            while events:
                event = events.popleft()
                # By type, not isinstance: a relay's every fragment passes here.
                if type(event) is BytesMessage or type(event) is TextMessage:
                    return event
                await self._handle_control(event)
            await self._read_more()

    async def _handle_control(self, event: Event) -> None:
        """Act on a control event taken from the queue: answer a ping, answer a close and
        raise :class:`ConnectionClosed`; a pong needs nothing beyond ``last_received``.
        Cancelled before the answer went out, the event goes back to the queue's front, to be
        answered on the next receive."""
        try:
            if isinstance(event, Ping):
                with contextlib.suppress(ConnectionClosed):
                    await self._send(event.response())
            elif isinstance(event, CloseConnection):
                self._closed = ConnectionClosed(event.code, event.reason)
                # Answers the peer's close, or closes on a frame the codec refused.
                await self.send_close(event.code, event.reason)
                raise self._closed
        except trio.Cancelled:
            self._events.appendleft(event)
            raise

    async def receive_message(
        self, max_size: int, *, max_fragments: int = MAX_MESSAGE_FRAGMENTS
    ) -> bytes:
        """Return the next whole message (text as UTF-8); close with 1009 past *max_size*
        bytes, or once *max_fragments* fragments have come without the message's end.

        Safe to cancel: a message assembled in part is kept for the next call.
        """
        parts = await self._receive_parts(max_size, max_fragments)
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    async def receive_messages(
        self,
        max_size: int,
        *,
        max_fragments: int = MAX_MESSAGE_FRAGMENTS,
        stall_timeout: float | None = None,
    ) -> list[list[bytes | memoryview]]:
        """Return the next whole message and every further one already received in full, each
        as the list of its fragments (joined, they are the message: nothing is copied here; a
        fragment may be a view of what a read brought, to be used before the next call).

        What follows them in part is kept for the next call; limits and cancellation as in
        :meth:`receive_message`. With *stall_timeout*, an empty list means that part of a
        message arrived and then no byte at all for that long (counted from the last bytes, or
        from the call when they came before it): on a healthy connection the rest follows at
        once, so the caller may want to find out whether the connection still works.
        """
        called = trio.current_time() if stall_timeout is not None else 0.0
        # One loop over the queue rather than receive() per fragment: a relay's every message
        # passes here.
        events = self._events
        messages: list[list[bytes | memoryview]] = []
        while True:
            while events:
                event = events[0]
                chunk: bytes | memoryview
                if type(event) is BytesMessage:
                    chunk = event.data  # bytes or a view
                elif type(event) is TextMessage:
                    chunk = event.data.encode()
                elif messages:
                    return messages  # the control event waits for the next call
                else:
                    events.popleft()
                    await self._handle_control(event)
                    continue
                size = self._parts_size + len(chunk)
                finished = event.message_finished
                # Frames are counted, not reads: a frame that came in many reads is one.
                if size > max_size or (
                    not finished and event.frame_finished and self._frames + 1 >= max_fragments
                ):
                    if messages:
                        return messages  # the next call refuses it
                    events.popleft()
                    await self._refuse_too_big(size > max_size)
                events.popleft()
                self._parts.append(chunk)
                self._parts_size = size
                if finished:
                    messages.append(self._parts)
                    self._parts, self._parts_size, self._frames = [], 0, 0
                elif event.frame_finished:
                    self._frames += 1
                elif len(self._parts) > max_fragments:
                    # Pieces of frames, one per read: joined once there are more of them than
                    # fragments allowed, so a message in many small reads keeps no more objects
                    # than one in many frames. A join copies at most max_size bytes, after at
                    # least max_fragments reads.
                    self._parts = [b"".join(self._parts)]
            if messages:
                return messages
            if self._closed is not None:
                raise self._closed
            if stall_timeout is not None and (self._parts or self._ws.in_message):
                # Reading is safe to cancel: nothing read is lost.
                with trio.move_on_at(max(self.last_received, called) + stall_timeout):
                    await self._read_more()
                    continue
                return messages  # none: the message stopped half-way
            await self._read_more()

    async def _refuse_too_big(self, by_size: bool) -> NoReturn:
        """Close with 1009: a message grew past the size the receiver allows (*by_size*), or
        came in more fragments than it allows."""
        reason = "message too big" if by_size else "message in too many fragments"
        self._parts, self._parts_size, self._frames = [], 0, 0
        self._closed = ConnectionClosed(MESSAGE_TOO_BIG, reason)
        await self.send_close(MESSAGE_TOO_BIG, reason)
        raise self._closed

    async def _receive_parts(self, max_size: int, max_fragments: int) -> list[bytes | memoryview]:
        while True:
            event = await self.receive()
            chunk = _part(event.data)
            self._parts_size += len(chunk)
            if self._parts_size > max_size:
                await self._refuse_too_big(True)
            if event.message_finished:
                self._parts.append(chunk)
                parts = self._parts
                self._parts, self._parts_size, self._frames = [], 0, 0
                return parts
            if event.frame_finished:
                if self._frames + 1 >= max_fragments:
                    await self._refuse_too_big(False)
                self._frames += 1
            self._parts.append(chunk)
            if not event.frame_finished and len(self._parts) > max_fragments:
                self._parts = [b"".join(self._parts)]  # as in receive_messages

    async def send_whole_messages(self, messages: Sequence[Sequence[bytes | memoryview]]) -> int:
        """Send binary messages, each given as its fragments (see :meth:`receive_messages`),
        as one frame each, with as few writes as possible; return their total size."""
        lock = self._send_lock
        if lock._busy:
            async with lock:
                return await self._send_whole(messages)
        # The lock is free (the usual case on a relay): taken without ``async with``.
        await trio.lowlevel.checkpoint_if_cancelled()
        lock._busy = True
        try:
            return await self._send_whole(messages)
        finally:
            lock.release()

    async def _send_whole(self, messages: Sequence[Sequence[bytes | memoryview]]) -> int:
        keys = os.urandom(4 * len(messages)) if self._client else b""
        try:
            out = self._ws.send_messages(messages, mask_keys=keys)
        except LocalProtocolError as exc:
            # Closing, or a message sent in part is not finished: the keys always suit.
            raise self._closing_error() from exc
        await self._write(out)
        return sum([sum(map(len, parts)) for parts in messages])

    async def _read_more(self) -> None:
        if self._ws.holds_more:
            await self._parse_held()
            return
        if self._server_plain:
            await self._read_plain(self.stream)  # type: ignore[arg-type]  # a SocketStream
            return
        data: bytes | bytearray
        try:
            if type(self.stream) is trio.SocketStream:
                # A client keeps each read's bytes: its payloads are views of them (no copy).
                data = await _io.receive_plain(
                    self.stream, self._receive_size, wait_first=self._drained
                )
            else:
                data = await self.stream.receive_some(self._receive_size)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        await self._parse(bytes(data), borrowed=False)

    async def _read_plain(self, stream: trio.SocketStream) -> None:
        """Read from a server's plain socket into the run's read buffer, and parse what came
        before any other task runs (the next read, on any connection, reuses the buffer). A
        checkpoint, as ``receive_some`` is; see the module's rules for when it waits first."""
        if not self._read_buffers:
            self._read_buffers.append(_read_buffer())
        buffer = self._read_buffers[0]
        try:
            count, waited = await _io.read_when_ready(
                stream, os.readv, self._read_buffers, wait_first=self._drained
            )
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            count, waited = 0, True  # _parse raises the loss: no schedule point owed
        if count:
            # _parse's work, inline: this is every read of the hub's.
            self.last_received = trio.current_time()
            self._drained = count < _RECEIVE_SIZE_MAX  # the shared buffer's size
            self._events.extend(self._ws.receive_data(buffer[:count], borrowed=True))
        else:
            await self._parse(b"", borrowed=True)  # raises the loss
        if not waited:
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def _parse(self, data: bytes | memoryview, *, borrowed: bool) -> None:
        """Queue the events of what a read brought (nothing once the transport ended)."""
        if not data:
            self._closed = ConnectionClosed(ABNORMAL_CLOSURE, "connection lost")
            raise self._closed
        self.last_received = trio.current_time()
        if borrowed:
            self._drained = len(data) < _RECEIVE_SIZE_MAX  # the shared buffer's size
        else:
            self._adapt_receive_size(len(data))
        self._events.extend(self._ws.receive_data(data, borrowed=borrowed))

    async def _parse_held(self) -> None:
        """Parse the next batch of frames the last read brought, once other tasks had their
        turn (a checkpoint): one connection's burst of small frames never holds the run for
        longer than a batch takes (``MAX_BATCH_FRAMES``)."""
        await trio.lowlevel.checkpoint()
        self._events.extend(self._ws.receive_data(b""))

    def _adapt_receive_size(self, count: int) -> None:
        """Size a client's next read after one that brought *count* bytes."""
        size = self._receive_size
        self._drained = count < size
        if count >= size:
            self._receive_size = min(size * 2, _RECEIVE_SIZE_MAX)
            self._small_read = False
        elif count < size >> 2:
            if self._small_read:
                self._receive_size = max(size >> 1, _RECEIVE_SIZE)
            self._small_read = not self._small_read
        else:
            self._small_read = False

    async def aclose(self, code: int = 1000, reason: str = "", *, timeout: float = 5.0) -> None:
        """Close politely: send a close, wait for the peer's, then drop the transport; at most
        *timeout* seconds in all. A WebSocket already closed (the peer's close answered, or
        the transport lost) is dropped at once.

        Only call this when no other task is receiving on this WebSocket.
        """
        try:
            if self._closed is None:
                with trio.move_on_after(timeout):
                    await self.send_close(code, reason)
                    while self._closed is None:
                        try:
                            await self.receive()
                        except ConnectionClosed:
                            break
        finally:
            await close_forcefully(self.stream)

    async def abort(self) -> None:
        """Drop the transport without a closing handshake."""
        await close_forcefully(self.stream)


def _joined(run: list[BytesMessage | TextMessage]) -> BytesMessage | TextMessage:
    """The fragments *run* (of one message, the last one ending it or not) as one."""
    last = run[-1]
    if len(run) == 1:
        return last
    kind = type(last)
    if any(type(event) is not kind for event in run):
        raise TypeError("one message cannot mix text and binary fragments")
    if kind is TextMessage:
        text = "".join([event.data for event in run if type(event) is TextMessage])
        return TextMessage(text, True, last.message_finished)
    data = b"".join([event.data for event in run if type(event) is BytesMessage])
    return BytesMessage(data, True, last.message_finished)


def _part(data: bytes | bytearray | memoryview | str) -> bytes | memoryview:
    """A received fragment's data as a part of a message: text as UTF-8, bytes as they are."""
    if isinstance(data, str):
        return data.encode()
    return data if isinstance(data, (bytes, memoryview)) else bytes(data)


def payload(event: BytesMessage | TextMessage) -> bytes | str:
    """The data of a received fragment as ``bytes`` or ``str`` (it may have come as a view of
    what a read brought, or a bytearray)."""
    data: bytes | bytearray | memoryview | str = event.data
    return bytes(data) if isinstance(data, (bytearray, memoryview)) else data
