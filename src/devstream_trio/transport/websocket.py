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
import math
import os
from collections.abc import Callable
from typing import NoReturn

import trio

from devstream_core.websocket import (
    BytesMessage,
    CloseConnection,
    Connection,
    Event,
    Ping,
    TextMessage,
)

from . import io as _io
from .websocket_send import (
    ABNORMAL_CLOSURE,
    NORMAL_CLOSURE,
    ConnectionClosed,
    SendLock,
    WebSocketSender,
    close_forcefully,
)

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

#: The events that carry data (the codec makes exactly these types).
_DATA_EVENTS = frozenset({BytesMessage, TextMessage})


_READ_BUFFER: trio.lowlevel.RunVar[memoryview] = trio.lowlevel.RunVar("devstream_read_buffer")


def _read_buffer() -> memoryview:
    """The buffer plain-socket reads go into, one per trio run (``_RECEIVE_SIZE_MAX`` bytes)."""
    try:
        return _READ_BUFFER.get()
    except LookupError:
        buffer = memoryview(bytearray(_RECEIVE_SIZE_MAX))
        _READ_BUFFER.set(buffer)
        return buffer


class WebSocket(WebSocketSender):
    """One open WebSocket: messages in and out, pings, close (the sending half is
    :class:`~devstream_trio.transport.websocket_send.WebSocketSender`'s)."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        connection: Connection,
        *,
        subprotocol: str | None = None,
        handshake_headers: list[tuple[bytes, bytes]] | None = None,
        initial_data: bytes = b"",
    ) -> None:
        super().__init__(stream, connection)
        self.subprotocol = subprotocol
        #: The headers of the handshake's other half (the 101 response, on a client).
        self.handshake_headers = handshake_headers or []
        #: The pieces of a message received in part (a frame that came in several reads is
        #: several pieces), their total length, and the frames of it that have ended.
        self._parts: list[bytes | memoryview] = []
        self._parts_size = 0
        self._frames = 0
        self._receive_size = _RECEIVE_SIZE
        #: The last read brought less than a quarter of what it asked for.
        self._small_read = False
        #: A server on a plain socket: reads go into the run's shared buffer (_read_plain).
        self._server_plain = type(stream) is trio.SocketStream and not self._client
        #: The last read brought less than it asked for: the next one waits for data first.
        #: A server's handshake read took the whole request, and its client sends nothing
        #: more before it has read the 101: its first read waits, rather than try a read
        #: bound to fail.
        self._drained = self._server_plain and not initial_data
        self._events: collections.deque[Event] = collections.deque()
        #: The run's read buffer, as the list ``readv`` takes (a server's plain-socket reads),
        #: fetched at the first read.
        self._read_buffers: list[memoryview] = []
        #: trio time of the last bytes received from the peer.
        self.last_received = trio.current_time()
        #: See beat_while_receiving: when the next beat is due (inf: none), how often, what.
        self._beat_due = math.inf
        self._beat_every = math.inf
        self._beat: Callable[[], None] | None = None
        # Bytes that came in with the handshake, after it.
        if initial_data:
            self._events.extend(connection.receive_data(initial_data))

    def beat_while_receiving(self, interval: float, beat: Callable[[], None] | None) -> None:
        """While bytes keep arriving, call *beat* (from the reading task, which must not wait
        in it) once *interval* seconds have passed since this call or the last beat; *beat*
        None stops it. A relay's heartbeat to a side that sends (see ``FramedRelays``)."""
        self._beat = beat
        self._beat_every = interval
        self._beat_due = trio.current_time() + interval if beat is not None else math.inf

    def _beat_now(self, now: float) -> None:
        self._beat_due = now + self._beat_every
        assert self._beat is not None  # a beat is due only while one is set
        self._beat()

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

    @property
    def has_queued_events(self) -> bool:
        """True when the next receive starts from what was already read and parsed (it may
        then return without reading, and without a checkpoint)."""
        return bool(self._events)

    @property
    def queued_close(self) -> CloseConnection | None:
        """The close that ends this WebSocket when it is the next thing already read and
        parsed (the peer's, or one the codec makes for a frame it refused): the next receive
        answers it and raises :class:`ConnectionClosed` with its code and reason."""
        events = self._events
        if events and type(events[0]) is CloseConnection:
            return events[0]
        return None

    def answer_queued_close_nowait(self) -> ConnectionClosed | None:
        """Answer the peer's close, when it is the next thing already read (see
        :attr:`queued_close`), from the calling task without waiting, and return it as the
        :class:`ConnectionClosed` the next receive would raise. None when there is none, or
        when the answer cannot go out now (another send in progress, a stream other than a
        plain socket): the next receive answers it. Should the socket not take all of the
        answer at once, the rest waits in :attr:`has_backlog` for :meth:`flush`."""
        close = self.queued_close
        if close is None or not self._answer_close_nowait(close):
            return None
        self._events.popleft()
        self._closed = ConnectionClosed(close.code, close.reason)
        return self._closed

    def take_queued(self) -> list[BytesMessage | TextMessage]:
        """The data fragments already received and parsed, without waiting for more.

        Stops at the first control event (ping, close), which :meth:`receive` handles.
        """
        taken: list[BytesMessage | TextMessage] = []
        events = self._events
        while events and type(events[0]) in _DATA_EVENTS:
            taken.append(events.popleft())  # type: ignore[arg-type]  # a data event
        return taken

    async def receive(self) -> BytesMessage | TextMessage:
        """Return the next data fragment; raise :class:`ConnectionClosed` at the end."""
        events = self._events
        while True:
            if self._closed is not None and not events:
                self._raise_closed()
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
                self._raise_closed()
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
        message arrived and then no byte at all for that long (counted from the last bytes
        read, whenever the call was made: a read cancelled by a timer of the caller's and made
        again does not put it off; a call made after that time reports it at once): on a
        healthy connection the rest follows at once, so the caller may want to find out
        whether the connection still works.
        """
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
                self._raise_closed()
            if stall_timeout is not None and (self._parts or self._ws.in_message):
                # Reading is safe to cancel: nothing read is lost.
                with trio.move_on_at(self.last_received + stall_timeout):
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
        self._raise_closed()

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
            now = self.last_received = trio.current_time()
            if now >= self._beat_due:
                self._beat_now(now)
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
            self._raise_closed()
        now = self.last_received = trio.current_time()
        if now >= self._beat_due:
            self._beat_now(now)
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
