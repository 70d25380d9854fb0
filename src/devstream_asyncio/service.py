"""The service client over asyncio: initiate streams to devices.

::

    async with devstream_asyncio.open_service(connection_string) as service:
        stream = await service.open_stream("my-device", "echo")

A stream opens in one step where the hub offers it (the initiate is a WebSocket upgrade; the
``101`` comes once the device accepted); a hub that does not is asked the Azure way (``POST``,
then a WebSocket to the streaming endpoint).
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from devstream_core.common import Role
from devstream_core.control import MODE_FRAMED
from devstream_core.credentials import ConnectionString, RequestTokens
from devstream_core.errors import DevstreamError
from devstream_core.initiator import (
    JOIN_TIMEOUT,
    Initiator,
    answer_timeout,
    check_joined,
    join_may_retry,
    join_retry_delay,
    no_answer,
    stream_subprotocols,
)
from devstream_core.streamdriver import StreamOptions
from devstream_core.wire import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_SAS_LIFETIME,
    HubAddress,
    bearer,
    connection_string_for,
    parse_stream_url,
)

from ._ws import WebSocket, join, request, websocket_connect
from .stream import FramedStream, RawStream, Stream

__all__ = ["ServiceClient", "join_stream", "open_service"]

#: Join retries' jitter.
_JITTER = random.Random()


class ServiceClient:
    """A service's handle on a hub, holding a policy connection string."""

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        ssl_context: ssl.SSLContext | None = None,
        stream_options: StreamOptions | None = None,
        sas_lifetime: int = DEFAULT_SAS_LIFETIME,
    ) -> None:
        self.connection_string = connection_string_for(Role.SERVICE, connection_string)
        self.address = HubAddress.from_connection_string(self.connection_string)
        self.ssl_context = ssl_context
        self.stream_options = stream_options or StreamOptions()
        self.sas_lifetime = sas_lifetime
        #: The SAS token requests carry (one for many requests).
        self._tokens = RequestTokens(self.connection_string, sas_lifetime)
        self._streams: list[Stream] = []
        #: How initiates go (in one step or with a POST) and what their answers mean.
        self.initiator = Initiator()

    @property
    def one_step(self) -> bool | None:
        """Whether the hub opens streams in one step (None until the first stream says;
        False: initiate with a POST, the Azure way)."""
        return self.initiator.one_step

    @one_step.setter
    def one_step(self, value: bool | None) -> None:
        self.initiator.one_step = value

    def _authorization(self) -> tuple[str, str]:
        return ("authorization", self._tokens.token(time.time()))

    async def open_stream(
        self,
        device_id: str,
        name: str,
        *,
        mode: str = MODE_FRAMED,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        response_timeout: int = DEFAULT_RESPONSE_TIMEOUT,
    ) -> Stream:
        """Initiate a stream to *device_id*'s *name*; return it once both sides are in.

        *mode* is ``"devstream.v1"`` (half-close, flow control, resume) or ``"raw"``.
        Raises ``StreamRejected`` when the device says no, and the exception for the hub's
        error code otherwise (``DeviceNotOnline``, ``DeviceNotFound``, ``Unauthorized``, …).
        """
        initiator = self.initiator
        initiate = initiator.request(
            device_id,
            name,
            mode=mode,
            window=self.stream_options.window,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
        )
        headers = [self._authorization(), *initiate.headers]
        stream: Stream | None = None
        # The device has response_timeout to answer; a hub silent past that is given up.
        waited = answer_timeout(response_timeout)
        if initiator.tries_one_step:
            try:
                async with asyncio.timeout(waited):
                    got = await websocket_connect(
                        self.address,
                        self.ssl_context,
                        initiate.target,
                        headers,
                        stream_subprotocols(mode),
                    )
            except TimeoutError:
                raise no_answer("initiate", waited) from None
            if isinstance(got, WebSocket):
                try:
                    answer = initiator.one_step_answer(101, got.headers, b"", mode=mode)
                except BaseException:
                    got.abort()
                    raise
                assert answer is not None
                stream = stream_over(got, answer.url, mode, self.ssl_context, self.stream_options)
            else:
                initiator.one_step_answer(got.status, got.headers, got.body, mode=mode)
        if stream is None:
            try:
                async with asyncio.timeout(waited):
                    response = await request(
                        self.address, self.ssl_context, "POST", initiate.target, headers, b""
                    )
            except TimeoutError:
                raise no_answer("initiate", waited) from None
            answer = initiator.post_answer(response.status, response.headers, response.body)
            assert answer.token is not None
            stream = await join_stream(
                answer.url, answer.token, answer.mode, self.ssl_context, self.stream_options
            )
        self._streams.append(stream)
        return stream

    def close(self) -> None:
        """Drop the streams still open."""
        for stream in self._streams:
            stream.abort()
        self._streams.clear()


def stream_over(
    ws: WebSocket,
    url: str,
    mode: str,
    ssl_context: ssl.SSLContext | None,
    options: StreamOptions,
    *,
    rejoined: bool = False,
) -> Stream:
    """The stream a joined WebSocket carries; a devstream.v1 side resumes at *url*.
    *rejoined*: the join was tried again (see StreamDriver.connection_made)."""
    address, target, stream_id = parse_stream_url(url)
    try:
        check_joined(mode, ws.subprotocol)
    except BaseException:
        ws.abort()
        raise
    if mode != MODE_FRAMED:
        return RawStream(ws, stream_id)

    async def reconnect(token: str) -> WebSocket:
        return await _join_with(address, target, token, ssl_context, mode)

    return FramedStream(ws, stream_id, reconnect, options, rejoined=rejoined)


async def _join_with(
    address: HubAddress, target: str, token: str, ssl_context: ssl.SSLContext | None, mode: str
) -> WebSocket:
    headers = [("authorization", bearer(token))]
    return await join(address, ssl_context, target, headers, stream_subprotocols(mode))


async def join_stream(
    url: str, token: str, mode: str, ssl_context: ssl.SSLContext | None, options: StreamOptions
) -> Stream:
    """Join a stream at *url* with its stream *token*."""
    address, target, _ = parse_stream_url(url)
    # The hub answers a join at once: a connection silent past JOIN_TIMEOUT went dead. One
    # lost on the way is tried again (the hub takes the token again while the connection it
    # opened has brought nothing), until then.
    attempts = 0
    lost: BaseException | None = None
    try:
        async with asyncio.timeout(JOIN_TIMEOUT):
            while True:
                attempts += 1
                try:
                    ws = await _join_with(address, target, token, ssl_context, mode)
                    break
                except (DevstreamError, OSError) as exc:
                    if not join_may_retry(exc):
                        raise
                    lost = exc
                await asyncio.sleep(join_retry_delay(attempts, _JITTER.random()))
    except TimeoutError:
        raise (lost or no_answer("join", JOIN_TIMEOUT)) from None
    return stream_over(ws, url, mode, ssl_context, options, rejoined=attempts > 1)


@asynccontextmanager
async def open_service(
    connection_string: str | ConnectionString,
    *,
    ssl_context: ssl.SSLContext | None = None,
    stream_options: StreamOptions | None = None,
) -> AsyncIterator[ServiceClient]:
    """A :class:`ServiceClient` for the block; streams still open at its end are dropped."""
    client = ServiceClient(
        connection_string, ssl_context=ssl_context, stream_options=stream_options
    )
    try:
        yield client
    finally:
        client.close()
