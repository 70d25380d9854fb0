"""The sending half of devstream's WebSocket over trio: :class:`WebSocketSender`.

:class:`~devstream_trio.transport.websocket.WebSocket` (the receiving half, and what callers
use) stands on it. Here: encoding events with the core's codec, the send lock, and the writes:
small frames joined, long payloads as buffers of their own (``writev`` on a plain socket), the
writes from the calling task that never wait (``send_bytes_nowait``) and their backlog, and
what a cancellation part way through a frame does. The rules of both halves are in
:mod:`devstream_trio.transport.websocket`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import NoReturn, Protocol

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
from .mask import mask_keys

__all__ = [
    "ABNORMAL_CLOSURE",
    "NORMAL_CLOSURE",
    "Close",
    "ConnectionClosed",
    "SendLock",
    "WebSocketSender",
    "WriteWaits",
    "close_forcefully",
]


#: The close code of a normal end.
NORMAL_CLOSURE = 1000

#: The close code reported when the transport ended without a close frame (never sent).
ABNORMAL_CLOSURE = 1006


#: Parts at least this long are handed on as they are, not copied into one buffer with their
#: neighbours (frame headers, small payloads): on a plain socket as a buffer of their own in
#: one ``writev``; on other streams (TLS) with a ``send_all`` of their own, which only pays
#: for long parts.
_ALONE_SOCKET = 16384

_ALONE_STREAM = 1 << 19

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


class Close(Protocol):
    """A close to send after other frames: its code and reason (the codec's
    ``CloseConnection`` event, or the stream driver's action of that name)."""

    @property
    def code(self) -> int: ...

    @property
    def reason(self) -> str: ...


class WriteWaits(Protocol):
    """Told when a write waits for the transport to take it, and when that wait ends: a relay
    that stops reading one side while it writes that side's messages to the other keeps the
    first side hearing from it meanwhile (see ``FramedRelays``)."""

    def write_waits(self) -> None:
        """The write waits: for another send to end, or for the transport, which did not take
        it at once (a plain socket) or may not (any other stream: called before each write)."""

    def write_done(self) -> None:
        """The write that waited is over (written, failed or cancelled)."""


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


class WebSocketSender:
    """What a WebSocket sends: messages, pings, the close, encoded by the core's codec and
    written as the module says; :class:`~devstream_trio.transport.websocket.WebSocket` adds
    the receiving half."""

    #: Sizes the socket's limit on bytes written and not yet sent, made at the first write
    #: that the socket did not take whole (see _write_rest): most sockets never fill.
    _unsent: _io.UnsentLimit | None = None

    def __init__(self, stream: trio.abc.Stream, connection: Connection) -> None:
        self.stream = stream
        self._ws = connection
        self._client = connection.client
        self._send_lock = SendLock()
        #: The part of a message send_bytes_nowait could not write at once: written first by
        #: the next send.
        self._backlog: list[memoryview] = []
        self._closed: ConnectionClosed | None = None

    @property
    def closed(self) -> ConnectionClosed | None:
        """Why the connection closed, or ``None`` while it is open."""
        return self._closed

    def _raise_closed(self) -> NoReturn:
        """Raise a :class:`ConnectionClosed` like :attr:`closed`: a new one each time. The
        one kept here is never raised: a raised exception holds its traceback, whose frames
        hold this WebSocket, which holds the exception: a cycle that only Python's cyclic
        collector frees, and with it the socket, the codec and the buffers of every closed
        connection (on a hub, thousands a second)."""
        closed = self._closed
        assert closed is not None
        raise ConnectionClosed(closed.code, closed.reason)

    @property
    def is_open(self) -> bool:
        """True while messages can still be sent."""
        return self._ws.state is _OPEN

    @property
    def close_sent(self) -> bool:
        """True once this side's close went out (the peer's answer may be on its way)."""
        return self._ws.state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED)

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
                    key = mask_keys() if self._client else b""
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

    async def _write(
        self, parts: list[bytes | bytearray | memoryview], waits: WriteWaits | None = None
    ) -> None:
        """Write *parts* in order, the small ones joined, the large ones on their own; a lost
        transport is reported as ``ConnectionClosed(1006)``. Call with the send lock held.
        *waits* is told when the write waits for the transport, and when it is done."""
        try:
            await self._write_parts(parts, waits)
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

    async def _write_parts(
        self, parts: list[bytes | bytearray | memoryview], waits: WriteWaits | None = None
    ) -> None:
        if type(self.stream) is trio.SocketStream:
            own = _gather(parts, _ALONE_SOCKET)
            buffers = own
            if self._backlog:
                # What a send_bytes_nowait left goes first.
                buffers, self._backlog = [*self._backlog, *own], []
            rest = _io.write_nowait(self.stream, buffers)
            if rest:
                if waits is None:
                    await self._write_rest(self.stream, own, rest)
                else:
                    waits.write_waits()
                    try:
                        await self._write_rest(self.stream, own, rest)
                    finally:
                        waits.write_done()
        else:
            buffers = _gather(parts, _ALONE_STREAM)
            # Whether this stream's send_all waits is not known beforehand.
            if waits is not None:
                waits.write_waits()
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
            finally:
                if waits is not None:
                    waits.write_done()
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
        unsent = self._unsent
        if unsent is None:
            unsent = self._unsent = _io.UnsentLimit()
        unsent.filled(trio.current_time())
        left = sum(map(len, rest))
        try:
            while rest:
                await trio.lowlevel.wait_writable(stream.socket)
                rest = _io.write_nowait(stream, rest)
                # The socket's pace sizes how much it may hold unsent (see UnsentLimit).
                still = sum(map(len, rest))
                unsent.sent(stream, left - still, trio.current_time(), full=still > 0)
                left = still
        except trio.Cancelled:
            if left < sum(map(len, own)):
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

    def send_bytes_nowait(self, data: bytes, *, then_close: Close | None = None) -> bool:
        """Send *data* as one binary message from the calling task, without waiting and
        without a checkpoint, when that can be done: on a plain socket, with no other send in
        progress. True when the WebSocket took the message: written, or its end kept to go
        out first with the next send or :meth:`flush`, as the kernel allowed (or dropped with
        a transport that is gone, which the reader finds out). False when the caller must
        send it the usual way.

        With *then_close*, the close (as :meth:`send_close_nowait` sends it) follows the
        message in the same write: a stream's last frames and its close.

        For a writer that must not wait (a task that also reads, or one that must not be
        cancelled mid-frame): nothing is ever cut by a cancellation here.
        """
        if not self.can_send_nowait:
            return False
        ws = self._ws
        key = mask_keys() if self._client else b""
        parts = list(ws.send_data(data, mask_key=key))
        if then_close is not None:
            key = mask_keys() if self._client else b""
            code = sendable_close_code(then_close.code)
            parts.append(ws.send_close(code, then_close.reason, mask_key=key))
        self._write_nowait(parts)
        return True

    def send_close_nowait(self, code: int = 1000, reason: str = "") -> bool:
        """Start the closing handshake from the calling task, as :meth:`send_bytes_nowait`
        sends a message: True when the close went out (or its end was kept to go out first
        with the next write), False when the caller must use :meth:`send_close`."""
        if not self.can_send_nowait:
            return False
        self._write_close_nowait(code, reason)
        return True

    def _answer_close_nowait(self, close: Close) -> bool:
        """Write the answer to the peer's *close* (read, not yet answered) from the calling
        task, without waiting, when nothing else is being sent: True when it was written (in
        whole, or its end kept as the backlog for :meth:`flush`), False when nothing was."""
        if not self._writes_nowait or self._ws.state is not ConnectionState.REMOTE_CLOSING:
            return False
        self._write_close_nowait(close.code, close.reason)
        return True

    def _write_close_nowait(self, code: int, reason: str) -> None:
        key = mask_keys() if self._client else b""
        self._write_nowait([self._ws.send_close(sendable_close_code(code), reason, mask_key=key)])

    @property
    def _writes_nowait(self) -> bool:
        """A plain socket with no other send in progress or left over: the calling task may
        write to it at once."""
        return (
            type(self.stream) is trio.SocketStream
            and not self._send_lock.locked()
            and not self._backlog
            and not self._ws.sending_message
        )

    @property
    def can_send_nowait(self) -> bool:
        """True when :meth:`send_bytes_nowait` would take a message now."""
        return self._writes_nowait and self._closed is None and self._ws.state is _OPEN

    @property
    def sending(self) -> bool:
        """True while a send is under way (another task writing, or part of a message left
        to be written first): what it writes is not yet out."""
        return self._send_lock.locked() or bool(self._backlog)

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

    async def send_text_by(self, text: str, deadline: float) -> bool:
        """Send *text* as one message, giving up at *deadline* (trio time): False when it did
        not go out whole by then. Then either nothing of it went out (it waited its turn behind
        another send), or the connection was cut part way through it and is closed
        (:attr:`closed`): the peer would read the next frame as the rest of this one.

        A cancellation point. A message the kernel takes at once, the usual case, is written
        without a cancel scope; only the rest of one it does not take waits under one.
        """
        if not self.can_send_nowait:
            with trio.move_on_at(deadline):
                await self.send_text(text)
                return True
            return False
        await trio.lowlevel.checkpoint_if_cancelled()
        key = mask_keys() if self._client else b""
        self._write_nowait(list(self._ws.send_data(text, mask_key=key)))
        if self._closed is not None:
            raise self._closing_error()
        if not self._backlog:
            return True
        with trio.move_on_at(deadline):
            await self.flush()
            return True
        self._closed = self._closed or ConnectionClosed(
            ABNORMAL_CLOSURE, "a send timed out part way through a frame"
        )
        self._backlog = []
        await close_forcefully(self.stream)
        return False

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

    async def pong(self) -> None:
        """Send an unsolicited pong: a heartbeat the peer does not answer (RFC 6455 §5.5.3)."""
        await self._send(Pong(payload=b""))

    def pong_nowait(self) -> bool:
        """Send an unsolicited pong from the calling task, as :meth:`send_bytes_nowait` sends
        a message: True when it went out (or its end was kept to go out first with the next
        write), False when the caller must use :meth:`pong`."""
        if not self.can_send_nowait:
            return False
        key = mask_keys() if self._client else b""
        self._write_nowait([self._ws.send_pong(b"", mask_key=key)])
        return True

    async def send_close(self, code: int = 1000, reason: str = "") -> None:
        """Start (or answer) the closing handshake; does nothing if already closed. A code
        that only reports what happened (1005, 1006, 1015) is sent as 1001."""
        code = sendable_close_code(code)
        async with self._send_lock:
            if self._ws.state not in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                return
            key = mask_keys() if self._client else b""
            data = self._ws.send_close(code, reason, mask_key=key)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._write_parts([data])

    async def send_whole_messages(
        self,
        messages: Sequence[Sequence[bytes | memoryview]],
        *,
        then_close: Close | None = None,
        waits: WriteWaits | None = None,
    ) -> int:
        """Send binary messages, each given as its fragments (see :meth:`receive_messages`),
        as one frame each, with as few writes as possible; return their total size.

        With *then_close*, the close (its code as :meth:`send_close` sends it) follows the
        messages in the same write: a relay passing on a peer's last messages and its close
        together, which the other end then reads at once. *waits* is told when the write
        waits for the transport, and when that wait is over (see :class:`WriteWaits`)."""
        lock = self._send_lock
        if lock._busy:
            # Waiting for another send is waiting for the transport too.
            if waits is not None:
                waits.write_waits()
            try:
                async with lock:
                    return await self._send_whole(messages, then_close, None)
            finally:
                if waits is not None:
                    waits.write_done()
        # The lock is free (the usual case on a relay): taken without ``async with``.
        await trio.lowlevel.checkpoint_if_cancelled()
        lock._busy = True
        try:
            return await self._send_whole(messages, then_close, waits)
        finally:
            lock.release()

    async def _send_whole(
        self,
        messages: Sequence[Sequence[bytes | memoryview]],
        then_close: Close | None,
        waits: WriteWaits | None,
    ) -> int:
        ws = self._ws
        keys = mask_keys(len(messages)) if self._client else b""
        try:
            out = ws.send_messages(messages, mask_keys=keys)
        except LocalProtocolError as exc:
            # Closing, or a message sent in part is not finished: the keys always suit.
            raise self._closing_error() from exc
        if then_close is not None:
            key = mask_keys() if self._client else b""
            code = sendable_close_code(then_close.code)
            out.append(ws.send_close(code, then_close.reason, mask_key=key))
        await self._write(out, waits)
        return sum([sum(map(len, parts)) for parts in messages])


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
