"""Joining a stream on the hub's streaming endpoint, for either side.

The device joins a stream it accepted, the service one it initiated: both open a WebSocket to
the stream's URL with ``Authorization: Bearer <stream token>`` and get a raw
:class:`~devstream_trio.client.stream.HubStream` or a devstream.v1
:class:`~devstream_trio.client.framed.FramedStream` over it.
"""

from __future__ import annotations

import contextlib
import random
import ssl
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

from devstream_core.common import Role
from devstream_core.control import MODE_RAW
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.initiator import (
    JOIN_TIMEOUT,
    check_joined,
    join_may_retry,
    join_retry_delay,
    no_answer,
    stream_subprotocols,
)
from devstream_core.wire import bearer, parse_stream_url

from ..exceptions import HubError, HubUnreachable, error_for
from ..transport.connect import HubAddress, Opener, hub_opener
from ..transport.http import HttpStatusError, close_forcefully, websocket_connect
from ..transport.websocket import WebSocket
from .framed import FramedStream, StreamOptions
from .stream import HubStream
from .watchdog import handshake_deadline

__all__ = ["AnyStream", "join_stream", "open_transport"]

#: A stream of either mode.
AnyStream = HubStream | FramedStream

_FRAMED = stream_subprotocols(FRAMED_SUBPROTOCOL)
#: Join retries' jitter.
_JITTER = random.Random()


def _no_answer_to_join() -> HubUnreachable:
    return no_answer("join", JOIN_TIMEOUT)


async def open_transport(
    address: HubAddress, ssl_context: ssl.SSLContext | None, opener: Opener | None
) -> trio.abc.Stream:
    """Open a transport to *address* with *opener*, or directly (TLS with *ssl_context*)."""
    return await (opener or hub_opener(ssl_context))(address)


async def join_stream(
    url: str,
    token: str,
    *,
    role: Role,
    ssl_context: ssl.SSLContext | None = None,
    opener: Opener | None = None,
    mode: str = MODE_RAW,
    nursery: trio.Nursery | None = None,
    options: StreamOptions | None = None,
    transport: trio.abc.Stream | None = None,
) -> AnyStream:
    """Join a stream on the streaming endpoint.

    Raw mode gives a :class:`HubStream`; ``devstream.v1`` a :class:`FramedStream` whose
    connection task runs in *nursery* and resumes over a new WebSocket after a drop.
    *transport*, if given, is an open connection to the hub that *url* names, to join over
    instead of a new one; it is closed if joining fails.
    """
    try:
        subprotocols = stream_subprotocols(mode)
        if mode != MODE_RAW and nursery is None:
            raise HubError(
                ErrorCode.ARGUMENT_INVALID,
                f"{FRAMED_SUBPROTOCOL} streams need a nursery (use open_service / open_device)",
            )
    except HubError:
        if transport is not None:
            await close_forcefully(transport)
        raise
    # The hub answers a join at once: a connection silent past JOIN_TIMEOUT went dead. One
    # lost on the way is tried again (the hub takes the token again while the connection it
    # opened has brought nothing), until then.
    deadline = trio.current_time() + JOIN_TIMEOUT
    attempts = 0
    while True:
        attempts += 1
        try:
            ws = await _stream_websocket(
                url, token, ssl_context, opener, subprotocols, transport, deadline, nursery
            )
            break
        except (DevstreamError, OSError) as exc:
            if not join_may_retry(exc):
                raise
            pause = join_retry_delay(attempts, _JITTER.random())
            if trio.current_time() + pause >= deadline:
                raise
        transport = None  # (closed with the failed attempt)
        await trio.sleep(pause)
    return await stream_over(
        ws,
        url,
        role=role,
        ssl_context=ssl_context,
        opener=opener,
        mode=mode,
        nursery=nursery,
        options=options,
        rejoined=attempts > 1,
    )


async def stream_over(
    ws: WebSocket,
    url: str,
    *,
    role: Role,
    ssl_context: ssl.SSLContext | None,
    opener: Opener | None,
    mode: str,
    nursery: trio.Nursery | None,
    options: StreamOptions | None,
    rejoined: bool = False,
) -> AnyStream:
    """The stream a WebSocket just joined carries; *url* is where a devstream.v1 side resumes.
    *rejoined*: the join was tried again (see StreamDriver.connection_made)."""
    stream_id = parse_stream_url(url).stream_id
    try:
        check_joined(mode, ws.subprotocol)
    except HubError:
        await ws.abort()
        raise
    if mode == MODE_RAW:
        return HubStream(ws, stream_id=stream_id, role=role)
    assert nursery is not None  # (join_stream's check)

    async def reconnect(resume_token: str) -> WebSocket:
        return await _stream_websocket(url, resume_token, ssl_context, opener, _FRAMED)

    return FramedStream(
        ws,
        stream_id=stream_id,
        role=role,
        reconnect=reconnect,
        nursery=nursery,
        options=options,
        rejoined=rejoined,
    )


async def _stream_websocket(
    url: str,
    token: str,
    ssl_context: ssl.SSLContext | None,
    opener: Opener | None,
    subprotocols: Sequence[str],
    transport: trio.abc.Stream | None = None,
    deadline: float | None = None,
    nursery: trio.Nursery | None = None,
) -> WebSocket:
    """Open a WebSocket to the streaming endpoint with ``Authorization: Bearer <token>``.

    Over *transport* if given (it is closed on failure), else over a new connection. With a
    *deadline*, the hub's answer is given up then (by *nursery*'s watchdog, when given).
    """
    try:
        address, target, _ = parse_stream_url(url)
    except BaseException:
        if transport is not None:
            await close_forcefully(transport)
        raise
    if transport is None:
        transport = await open_transport(address, ssl_context, opener)
    try:
        async with closed_on_failure(transport):
            with (
                contextlib.nullcontext()
                if deadline is None
                else handshake_deadline(nursery, transport, deadline, _no_answer_to_join)
            ):
                return await websocket_connect(
                    transport,
                    host=address.host_header,
                    target=target,
                    headers=[("authorization", bearer(token))],
                    subprotocols=subprotocols,
                )
    except HttpStatusError as exc:
        raise error_for(exc.code or ErrorCode.SERVER_ERROR, exc.message) from None


@asynccontextmanager
async def closed_on_failure(transport: trio.abc.Stream) -> AsyncIterator[None]:
    """Close *transport* if the block fails. A failed exchange (the connection lost, an answer
    that is not HTTP) is raised as :class:`HubUnreachable`; the hub's own answer (a
    :class:`HubError`) and anything else go on as they are."""
    try:
        yield
    except BaseException as exc:
        await close_forcefully(transport)
        if isinstance(exc, DevstreamError) and not isinstance(exc, HubError):
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, exc.message) from exc
        raise
