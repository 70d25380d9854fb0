"""Connections to the hub over asyncio streams: TCP (TLS when the hub's URL says so), one HTTP
exchange (read by :class:`devstream_core.response.ResponseReader`), and a client WebSocket
driven by :class:`devstream_core.client_websocket.ClientWebSocket`.

Nothing here decides anything of devstream's: the handshake's checks are
:mod:`devstream_core.handshake`'s, the frames and the closing handshake the codec's, what a
failed connection means :mod:`devstream_core.diagnosis`'s, the errors the core's classes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import threading
from collections.abc import Sequence

from devstream_core import diagnosis, handshake
from devstream_core.client_websocket import ABNORMAL_CLOSURE, ClientWebSocket, ConnectionClosed
from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.exceptions import HubUnreachable
from devstream_core.maskkeys import MaskKeyPool
from devstream_core.response import Response, ResponseReader
from devstream_core.websocket import BytesMessage, TextMessage
from devstream_core.wire import HubAddress, error_from_response

Headers = list[tuple[bytes, bytes]]

_READ = 64 * 1024


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
        raise diagnosis.tls_error(where, exc) from exc
    except OSError as exc:
        raise diagnosis.connect_error(where, exc) from exc


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, http: ResponseReader
) -> Response:
    """Write *http*'s request and read its answer (:mod:`devstream_core.response` reads it
    and raises what an answer that goes wrong means)."""
    try:
        writer.write(http.request)
        await writer.drain()
        while (answer := http.receive_data(await reader.read(_READ))) is None:
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


async def join(
    address: HubAddress,
    ssl_context: ssl.SSLContext | None,
    target: str,
    headers: Sequence[tuple[str, str]],
    subprotocols: Sequence[str] = (),
) -> WebSocket:
    """A WebSocket to *target*; the hub's error (its class) when it answers otherwise."""
    got = await websocket_connect(address, ssl_context, target, headers, subprotocols)
    if not isinstance(got, WebSocket):
        raise error_from_response(got.status, got.body)
    return got


class _Keys(threading.local):
    """Each thread's masking keys: one draw of random bytes per 1,024 frames, not one per
    frame (:mod:`devstream_core.maskkeys`); a forked child draws afresh."""

    def __init__(self) -> None:
        self.pool = MaskKeyPool(os.urandom)


_keys = _Keys()
os.register_at_fork(after_in_child=lambda: _keys.pool.forget())


class WebSocket:
    """The client end of one open WebSocket, driving a
    :class:`devstream_core.client_websocket.ClientWebSocket` (which answers pings and the
    peer's close, and says what may still be sent). Writes are buffered by the transport
    (one ``write`` per frame, so frames from several tasks never interleave); :meth:`drain`
    waits for the transport's buffer to go down. One task reads (:meth:`receive`)."""

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
        self._ws = ClientWebSocket(_keys.pool.key)
        self._pending = initial
        self.subprotocol = subprotocol
        #: The ``101``'s header fields (names lower-case).
        self.headers = headers
        #: When the last bytes arrived (the event loop's clock): a pong counts.
        self.last_received = asyncio.get_running_loop().time()

    @property
    def closed(self) -> ConnectionClosed | None:
        """How the WebSocket ended, once it has."""
        return self._ws.closed

    def send_nowait(self, data: bytes | bytearray | memoryview | str) -> None:
        """Queue one whole message (``str``: a text message)."""
        self._writer.write(self._ws.send(data))

    def ping_nowait(self) -> None:
        self._writer.write(self._ws.ping())

    def close_nowait(self, code: int = 1000, reason: str = "") -> None:
        """Send the close (if this side may still send one)."""
        self._writer.write(self._ws.close(code, reason))

    async def drain(self) -> None:
        """Wait until the transport's buffer is low; a lost connection is the reader's news."""
        with contextlib.suppress(OSError, RuntimeError):
            await self._writer.drain()

    async def send(self, data: bytes | bytearray | memoryview | str) -> None:
        self.send_nowait(data)
        await self.drain()

    def abort(self) -> None:
        """Drop the connection at once."""
        self._ws.end(ABNORMAL_CLOSURE, "connection dropped")
        self._writer.transport.abort()

    def shutdown(self, code: int = 1000, reason: str = "") -> None:
        """Send the close, if one may go, then close the transport once its buffer is out."""
        self.close_nowait(code, reason)
        self._ws.end(code, reason)
        self._writer.close()

    async def receive(self) -> list[BytesMessage | TextMessage]:
        """The data fragments the next read brings; raises :class:`ConnectionClosed` once the
        WebSocket has ended (after every fragment that came before its end)."""
        ws = self._ws
        while True:
            closed = ws.closed
            if closed is not None:
                # A new one each time: the one kept would, raised, hold this connection's
                # frames in its traceback, and they hold it (a cycle for the cyclic collector).
                raise ConnectionClosed(closed.code, closed.reason)
            data, self._pending = self._pending, b""
            if not data and not ws.holds_more:
                try:
                    data = await self._reader.read(_READ)
                except OSError:
                    data = b""
                if not data:
                    ws.connection_lost()
                    self._writer.transport.abort()
                    continue
                self.last_received = asyncio.get_running_loop().time()
            received = ws.receive_data(data)
            if ws.closed is not None:  # the peer's close, answered
                self._writer.write(received.to_send)
                self._writer.close()
            elif received.to_send:
                self._writer.write(received.to_send)
            if received.messages:
                return received.messages


def payload(event: BytesMessage | TextMessage) -> bytes | str:
    """A received fragment's data as ``bytes`` or ``str``."""
    data = event.data
    return data if isinstance(data, str) else bytes(data)
