"""Connections to the hub over asyncio streams: TCP (TLS when the hub's URL says so), one HTTP
exchange (h11), and a client WebSocket driven by :class:`devstream_core.websocket.Connection`.

Nothing here decides anything of devstream's: the handshake's checks are
:mod:`devstream_core.handshake`'s, the frames and the closing handshake the codec's, the
errors the core's classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Sequence

from devstream_core import diagnosis, handshake, websocket
from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.exceptions import HubUnreachable
from devstream_core.response import Response, ResponseReader
from devstream_core.websocket import BytesMessage, Ping, Pong, TextMessage
from devstream_core.wire import HubAddress

Headers = list[tuple[bytes, bytes]]

_READ = 64 * 1024


class ConnectionClosed(Exception):
    """The WebSocket ended: the other end's close (its code and reason), or 1006 when the
    connection was lost without one."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


async def open_connection(
    address: HubAddress, ssl_context: ssl.SSLContext | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to the hub (TLS when *address* says so); :class:`HubUnreachable`
    if it cannot be made."""
    context = (ssl_context or ssl.create_default_context()) if address.tls else None
    where = f"{address.host}:{address.port}"
    try:
        return await asyncio.open_connection(
            address.host,
            address.port,
            ssl=context,
            server_hostname=address.host if context is not None else None,
        )
    except ssl.SSLError as exc:
        raise diagnosis.tls_handshake_failure(
            where,
            reason=exc.reason,
            verify_message=getattr(exc, "verify_message", None),
            detail=str(exc),
        ) from exc
    except OSError as exc:
        numbers = [exc.errno] if exc.errno else []
        raise diagnosis.connect_failure(where, numbers, exc.strerror or str(exc)) from exc


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: ResponseReader
) -> Response:
    """Write *request* and read its answer (:mod:`devstream_core.response` reads it and
    raises what an answer that goes wrong means)."""
    try:
        writer.write(request.request)
        await writer.drain()
        while (answer := request.receive_data(await reader.read(_READ))) is None:
            pass
    except OSError as exc:
        raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"connection lost: {exc}") from exc
    except RemoteProtocolError as exc:  # an answer too large
        raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, exc.message) from exc
    return answer


async def request(
    address: HubAddress,
    ssl_context: ssl.SSLContext | None,
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: bytes | None = None,
) -> Response:
    """One request on a connection of its own."""
    reader, writer = await open_connection(address, ssl_context)
    fields = [("host", address.host_header), ("connection", "close"), *headers]
    where = address.host_header
    try:
        return await exchange(
            reader,
            writer,
            ResponseReader(method, target, fields, body, where=where, tls=address.tls),
        )
    finally:
        writer.transport.abort()


async def websocket_connect(
    address: HubAddress,
    ssl_context: ssl.SSLContext | None,
    target: str,
    headers: Sequence[tuple[str, str]],
    subprotocols: Sequence[str] = (),
) -> WebSocket | Response:
    """A WebSocket to *target*, or the hub's answer when it is not a ``101``."""
    reader, writer = await open_connection(address, ssl_context)
    key = handshake.client_key(os.urandom(16))
    fields = handshake.upgrade_fields(address.host_header, key, headers, subprotocols)
    try:
        upgrade = ResponseReader(
            "GET", target, fields, where=address.host_header, tls=address.tls, upgrade=True
        )
        answer = await exchange(reader, writer, upgrade)
        if answer.status != 101:
            writer.transport.abort()
            return answer
        chosen = handshake.check_response(answer.headers, key=key, subprotocols=subprotocols)
    except BaseException:
        writer.transport.abort()
        raise
    return WebSocket(
        reader, writer, subprotocol=chosen, headers=answer.headers, initial=answer.trailing
    )


class WebSocket:
    """The client end of one open WebSocket. Writes are buffered by the transport (one
    ``write`` per frame, so frames from several tasks never interleave); :meth:`drain` waits
    for the transport's buffer to go down. One task reads (:meth:`receive`); pings are
    answered there, and the peer's close is answered there too."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        subprotocol: str | None,
        headers: Headers,
        initial: bytes = b"",
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._conn = websocket.Connection(client=True)
        self._pending = initial
        self.subprotocol = subprotocol
        #: The ``101``'s header fields (names lower-case).
        self.headers = headers
        #: When the last bytes arrived (the event loop's clock): a pong counts.
        self.last_received = asyncio.get_running_loop().time()
        #: How the WebSocket ended, once it has.
        self.closed: ConnectionClosed | None = None

    def _write(self, data: bytes) -> None:
        if self.closed is not None:
            raise self.closed
        self._writer.write(data)

    def send_nowait(self, data: bytes | bytearray | memoryview | str) -> None:
        """Queue one whole message (``str``: a text message)."""
        if self.closed is not None:
            raise self.closed
        head, body = self._conn.send_data(data, mask_key=os.urandom(4))
        self._write(head + bytes(body))

    def ping_nowait(self) -> None:
        if self.closed is None and self._conn.state is websocket.ConnectionState.OPEN:
            self._write(self._conn.send_ping(mask_key=os.urandom(4)))

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Send the close (if this side may still send one)."""
        state = self._conn.state
        if self.closed is None and state in (
            websocket.ConnectionState.OPEN,
            websocket.ConnectionState.REMOTE_CLOSING,
        ):
            self._write(self._conn.send_close(code, reason, mask_key=os.urandom(4)))

    async def drain(self) -> None:
        """Wait until the transport's buffer is low; a lost connection is the reader's news."""
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.drain()

    async def send(self, data: bytes | bytearray | memoryview | str) -> None:
        self.send_nowait(data)
        await self.drain()

    def abort(self) -> None:
        """Drop the connection at once."""
        if self.closed is None:
            self.closed = ConnectionClosed(1006, "connection dropped")
        self._writer.transport.abort()

    def shutdown(self, code: int = 1000, reason: str = "") -> None:
        """Send the close, if one may go, then close the transport once its buffer is out."""
        with contextlib.suppress(ConnectionClosed):
            self.close_nowait(code, reason)
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)
        self._writer.close()

    async def receive(self) -> list[BytesMessage | TextMessage]:
        """The data fragments the next read brings; raises :class:`ConnectionClosed` once the
        WebSocket has ended (after every fragment that came before its end)."""
        while True:
            if self.closed is not None:
                raise self.closed
            if self._pending:
                data, self._pending = self._pending, b""
            elif not self._conn.holds_more:
                try:
                    data = await self._reader.read(_READ)
                except OSError:
                    data = b""
                if not data:
                    self.abort()
                    self.closed = ConnectionClosed(1006, "connection lost")
                    continue
                self.last_received = asyncio.get_running_loop().time()
            else:
                data = b""
            out: list[BytesMessage | TextMessage] = []
            for event in self._conn.receive_data(data):
                if isinstance(event, (BytesMessage, TextMessage)):
                    out.append(event)
                elif isinstance(event, Ping):
                    if self._conn.state is websocket.ConnectionState.OPEN:
                        self._write(self._conn.send_pong(event.payload, mask_key=os.urandom(4)))
                elif isinstance(event, Pong):
                    pass
                else:  # the peer's close, or one to send for a frame refused
                    self.shutdown(websocket.sendable_close_code(event.code), event.reason)
                    self.closed = ConnectionClosed(event.code, event.reason)
            if out:
                return out


def payload(event: BytesMessage | TextMessage) -> bytes | str:
    """A received fragment's data as ``bytes`` or ``str``."""
    data = event.data
    return data if isinstance(data, str) else bytes(data)
