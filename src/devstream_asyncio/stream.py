"""The streams handed to application code: raw (Azure's data plane) and devstream.v1.

Both have ``send_all``, ``send_eof``, ``receive_some``, ``reset`` and ``aclose``.
``receive_some`` returns ``b""`` after the peer's EOF (raw: its normal close); a stream that
ended any other way raises the core's exception for it (``StreamReset``, ``PeerLost``, …).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable

from devstream_core.client_websocket import ConnectionClosed
from devstream_core.errors import DevstreamError, ErrorCode, close_reason_for
from devstream_core.exceptions import HubError
from devstream_core.framing import EndpointState, StreamEndpoint
from devstream_core.initiator import attempt_failure
from devstream_core.raw import RawReceiver, end_error
from devstream_core.streamdriver import (
    DropConnection,
    SendPing,
    StreamDriver,
    StreamOptions,
)
from devstream_core.wire import RAW_MESSAGE_SIZE, resume_token

from ._ws import WebSocket

__all__ = ["FramedStream", "RawStream", "Stream"]


class RawStream:
    """One side of a raw stream: each ``send_all`` goes out as binary messages; what
    ``receive_some`` returns is :class:`devstream_core.raw.RawReceiver`'s to say."""

    def __init__(self, ws: WebSocket, stream_id: str) -> None:
        self._ws = ws
        self.stream_id = stream_id
        self._received = RawReceiver()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            for start in range(0, len(view), RAW_MESSAGE_SIZE):
                await self._ws.send(view[start : start + RAW_MESSAGE_SIZE])
        except ConnectionClosed as exc:
            raise end_error(exc.code, exc.reason) from None

    async def send_eof(self) -> None:
        """Raw mode has no half-close: this closes the WebSocket normally; what the peer sent
        before is still delivered."""
        self._ws.close_nowait()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while (data := self._received.take(max_bytes)) is None:
            try:
                for event in await self._ws.receive():
                    self._received.data_received(event.data)
            except ConnectionClosed as exc:
                self._received.ended(exc.code, exc.reason)
        return data

    async def reset(self, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        """Abort: the WebSocket closes with ``STREAM_RESET`` and *reason*. Raw mode carries
        no reset code: the peer sees ``StreamReset`` whatever *code*."""
        self._ws.shutdown(
            ErrorCode.STREAM_RESET.close_code,
            close_reason_for(ErrorCode.STREAM_RESET, reason or None),
        )

    async def aclose(self) -> None:
        self._ws.shutdown()

    def abort(self) -> None:
        """Drop the connection at once."""
        self._ws.abort()


class FramedStream:
    """One side of a devstream.v1 stream: its :class:`StreamDriver` decides, this carries it
    out. One task reads the WebSocket, keeps it alive and resumes it over a new one (with the
    resume token of the last ``101``) as the driver says; the application's calls write what
    the driver has to send from their own task."""

    def __init__(
        self,
        ws: WebSocket,
        stream_id: str,
        reconnect: Callable[[str], Awaitable[WebSocket]],
        options: StreamOptions | None = None,
        *,
        rejoined: bool = False,
    ) -> None:
        self.stream_id = stream_id
        #: How many times the stream resumed over a new WebSocket.
        self.resumes = 0
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._driver = StreamDriver(options, now=loop.time())
        self._driver.connection_made(loop.time(), rejoined=rejoined)
        self._endpoint = self._driver.endpoint
        self._ws = ws
        self._token = resume_token(ws.headers)
        self._reconnect = reconnect
        self._rng = random.Random()
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._closed = False
        self._task = loop.create_task(self._run())

    @property
    def endpoint(self) -> StreamEndpoint:
        """For observability (tests, diagnostics): the core endpoint this stream drives, to
        read its state and counters (``send_capacity``, ``received``...); calling its
        methods would bypass the stream."""
        return self._endpoint

    def _now(self) -> float:
        return self._loop.time()

    def _notify(self) -> None:
        """Wake whoever waits on the stream, and the task (a deadline may have moved)."""
        self._changed.set()
        self._changed = asyncio.Event()
        self._wake.set()

    def _flush(self) -> None:
        """Write what the driver has to send, then the close once it is owed."""
        driver, ws = self._driver, self._ws
        if driver.connected and ws.closed is None:
            try:
                while data := driver.next_message(self._now()):
                    ws.send_nowait(data)
                close = driver.closing
                if close is not None:
                    ws.close_nowait(close.code, close.reason)
                    driver.close_sent(self._now())
            except ConnectionClosed:
                pass  # the reader finds the drop out
        self._notify()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    # -- the application's side ----------------------------------------------------------

    def _check_can_send(self) -> None:
        if self._driver.eof_written or self._closed:
            raise HubError(ErrorCode.ARGUMENT_INVALID, "send_eof() or aclose() was called")
        error = self._driver.failure()
        if error is not None:
            try:
                raise error
            finally:
                del error  # this frame would hold it, and its traceback this frame: a cycle

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Hand *data* to the stream, waiting while the flow-control window is full."""
        view = memoryview(data)
        self._check_can_send()
        while view:
            taken = self._endpoint.write(view)
            if taken:
                view = view[taken:]
                self._flush()
                await self._ws.drain()
            else:
                await self._wait_changed()
                self._check_can_send()

    async def send_eof(self) -> None:
        """Half-close: the peer reads ``b""`` after the last byte; this side still receives."""
        if not self._driver.eof_written:
            self._check_can_send()
            self._driver.write_eof()
            self._flush()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Received bytes, or ``b""`` after the peer's EOF."""
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        while (data := self._driver.take(max_bytes, self._now())) is None:
            await self._wait_changed()
        if self._endpoint.at_eof:
            self._notify()  # the acknowledgement's deadline (deferred)
        elif self._endpoint.has_output:
            self._flush()
        return data

    async def reset(self, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        """Abort the stream; the peer sees a reset with *code* and *reason*."""
        if self._endpoint.state is EndpointState.OPEN:
            self._driver.reset(int(code), reason, self._now())
            self._flush()

    async def aclose(self) -> None:
        """Finish the stream as the driver's close procedure says (EOF, its acknowledgement,
        a reset if it does not come in ``close_timeout``, the WebSocket close)."""
        if self._closed:
            return
        self._closed = True
        self._driver.close(self._now())
        self._flush()
        limit = 2 * self._driver.options.close_timeout + 1
        try:
            await asyncio.wait({self._task}, timeout=limit)
        finally:
            self._task.cancel()  # over by now, or given up on (or this call cancelled)

    def abort(self) -> None:
        """Drop the stream at once (its task stops, the WebSocket is dropped)."""
        self._task.cancel()

    # -- the connection task -------------------------------------------------------------

    async def _run(self) -> None:
        driver = self._driver
        try:
            while True:
                await self._serve(self._ws)
                if not driver.wants_connection:
                    return
                self._ws.abort()
                ws = await self._resume()
                if ws is None:
                    return
                self._ws = ws
                self.resumes += 1
                self._flush()
        finally:
            driver.abort(self._now())
            self._ws.abort()
            self._notify()

    async def _serve(self, ws: WebSocket) -> None:
        """Read *ws* and keep it alive until it drops or the stream is over."""
        driver = self._driver
        receiving = asyncio.ensure_future(ws.receive())
        try:
            while not driver.over:
                self._wake.clear()
                deadline = driver.next_deadline(ws.last_received)
                waking = asyncio.ensure_future(self._wake.wait())
                timeout = None if deadline == float("inf") else max(0.0, deadline - self._now())
                done, _ = await asyncio.wait(
                    {receiving, waking}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                waking.cancel()
                if receiving in done:
                    # The end is taken without raising it: raised here, its traceback would
                    # hold this frame, which holds it (in *receiving*): a cycle that leaves
                    # the stream to Python's cyclic collector.
                    ended = receiving.exception()
                    if isinstance(ended, ConnectionClosed):
                        driver.connection_closed(ended.code, ended.reason, self._now())
                        return
                    events = receiving.result()  # raises any other error
                    receiving = asyncio.ensure_future(ws.receive())
                    try:
                        for event in events:
                            data = event.data
                            driver.receive(
                                data.encode() if isinstance(data, str) else data, self._now()
                            )
                    except DevstreamError:
                        self._flush()  # the Reset, then the error's close
                        return
                    self._flush()
                if driver.over or self._now() < driver.next_deadline(ws.last_received):
                    continue
                # Due (also while bytes keep coming): pings, a deferred acknowledgement
                # (Flush), a silent connection dropped, a close's deadline.
                for action in driver.timer(self._now(), ws.last_received):
                    if isinstance(action, SendPing):
                        with contextlib.suppress(ConnectionClosed):
                            ws.ping_nowait()
                    elif isinstance(action, DropConnection):
                        ws.abort()
                        driver.connection_lost(self._now())
                        return
                self._flush()
        finally:
            receiving.cancel()

    async def _resume(self) -> WebSocket | None:
        """A new WebSocket to the stream, attempts and delays as the driver says."""
        driver = self._driver
        while True:
            deadline = driver.connect_started(self._now())
            error: DevstreamError | None = None
            try:
                async with asyncio.timeout(max(0.0, deadline - self._now())):
                    ws = await self._reconnect(self._token)
            except DevstreamError as exc:
                error = exc
            except TimeoutError:
                pass
            else:
                self._token = resume_token(ws.headers)
                driver.connection_made(self._now())
                return ws
            code, message = attempt_failure(error)
            retry_at = driver.connect_failed(
                self._now(), self._rng.random(), code=code, message=message
            )
            if retry_at is None:
                return None
            await asyncio.sleep(max(0.0, retry_at - self._now()))


Stream = RawStream | FramedStream
