"""The service client: initiate streams to devices, and manage the registry.

::

    async with devstream_trio.open_service(connection_string) as service:
        stream = await service.open_stream("my-device", "ssh")

``open_stream`` speaks only the documented HTTP API, and raises one exception class per error
code (:mod:`devstream_trio.exceptions`). It opens a stream in one step where the hub offers it:
the initiate is itself a WebSocket upgrade (``GET`` on the initiate path), and the hub answers
``101`` once the device has accepted, the connection then being the service's side of the
stream. A hub that does not know it (answering ``405``, or ``404`` without a devstream error
code) is asked the Azure way from then on: ``POST`` the initiate, then a WebSocket to the
streaming endpoint.
"""

from __future__ import annotations

import json
import math
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from devstream_core.common import Role
from devstream_core.control import MODE_RAW
from devstream_core.credentials import ConnectionString
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.wire import (
    API_VERSION,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_SAS_LIFETIME,
    MIN_SAS_LIFETIME,
    InitiateRejected,
    OneStepUnsupported,
    bearer,
    build_initiate_request,
    device_target,
    error_from_response,
    parse_initiate_answer,
    parse_stream_url,
)

from ._connect import HubAddress, Opener, connection_string_for, hub_opener
from ._http import (
    HttpResponse,
    HttpStatusError,
    close_forcefully,
    http_request,
    websocket_connect,
)
from ._ws import WebSocket
from .exceptions import HubError, HubUnreachable, error_for
from .framed import FramedStream, StreamOptions
from .stream import HubStream

__all__ = ["API_VERSION", "AnyStream", "ServiceClient", "join_stream", "open_service"]

#: What ``open_stream`` returns and device handlers receive.
AnyStream = HubStream | FramedStream

#: How long the SAS tokens a client signs live, by default (seconds).
SAS_LIFETIME = DEFAULT_SAS_LIFETIME


class ServiceClient:
    """A service's handle on a hub, holding a policy connection string."""

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        ssl_context: ssl.SSLContext | None = None,
        wall_clock: Callable[[], float] = time.time,
        opener: Opener | None = None,
        http_proxy: str | None = None,
        nursery: trio.Nursery | None = None,
        stream_options: StreamOptions | None = None,
        sas_lifetime: int = SAS_LIFETIME,
    ) -> None:
        cs = connection_string_for(Role.SERVICE, connection_string)
        if sas_lifetime < MIN_SAS_LIFETIME:
            raise ValueError(f"sas_lifetime must be at least {MIN_SAS_LIFETIME} seconds")
        #: How long each SAS token it signs lives (a hub's ``max_sas_lifetime`` may cap it).
        self.sas_lifetime = sas_lifetime
        self.connection_string = cs
        self.address = HubAddress.from_connection_string(cs)
        self.ssl_context = ssl_context
        self.wall_clock = wall_clock
        #: How connections to the hub are opened: directly, or through an HTTP proxy
        #: (``http_proxy`` URL; None takes ``HTTPS_PROXY`` and ``NO_PROXY`` from the
        #: environment; ``""`` means no proxy).
        self.opener = opener or hub_opener(ssl_context, http_proxy)
        #: Where devstream.v1 streams run their connection tasks; without one, streams are raw.
        self.nursery = nursery
        self.stream_options = stream_options
        #: Whether the hub opens streams in one step: None until the first stream says.
        self.one_step: bool | None = None
        #: The SAS token requests carry, and when it expires.
        self._sas: tuple[str, float] = ("", -math.inf)

    def _authorization(self) -> tuple[str, str]:
        """The Authorization header: one SAS token for many requests, renewed at half its
        lifetime (signing one costs about as much as the rest of a request's head)."""
        now = self.wall_clock()
        token, expiry = self._sas
        lifetime = self.sas_lifetime
        if not expiry - lifetime <= now < expiry - lifetime / 2:
            expiry = int(now) + lifetime
            token = self.connection_string.sas_token(expiry=expiry)
            self._sas = (token, expiry)
        return ("authorization", token)

    async def request(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
    ) -> HttpResponse:
        """Send one authorised request to the hub and return its response."""
        response, _ = await self._exchange(method, target, headers=headers, body=body)
        return response

    async def _exchange(
        self,
        method: str,
        target: str,
        *,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        keep: bool = False,
    ) -> tuple[HttpResponse, trio.abc.Stream | None]:
        """Like :meth:`request`; with *keep*, also the open connection when it can be reused."""
        stream = await open_transport(self.address, self.ssl_context, self.opener)
        async with _closed_on_failure(stream):
            response = await http_request(
                stream,
                method=method,
                host=self.address.host_header,
                target=target,
                headers=[self._authorization(), *(headers or [])],
                body=body,
                keep_alive=keep,
            )
        if response.reusable:
            return response, stream
        await close_forcefully(stream)
        return response, None

    async def _json(self, method: str, target: str, body: object = None, **kw: Any) -> Any:
        data = None if body is None else json.dumps(body).encode()
        headers = [("content-type", "application/json")] if data is not None else []
        headers += kw.get("headers", [])
        response = await self.request(method, target, headers=headers, body=data)
        if response.status >= 300:
            raise error_from_response(response.status, response.body)
        return json.loads(response.body) if response.body else None

    # -- streams -----------------------------------------------------------------------------

    async def open_stream(
        self,
        device_id: str,
        name: str,
        *,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        response_timeout: int = DEFAULT_RESPONSE_TIMEOUT,
        mode: str | None = None,
    ) -> AnyStream:
        """Initiate a stream to *device_id*'s *name* and return it once both sides are in.

        *mode* is ``"devstream.v1"`` (half-close, flow control, resume) or ``"raw"``
        (Azure's behaviour); by default devstream.v1 when the client has a nursery (as from
        :func:`open_service`), raw otherwise. Raises
        :class:`~devstream_trio.exceptions.StreamRejected` when the device says no, and the
        exception for the hub's error code otherwise (``DeviceNotOnline``, …).
        """
        if mode is None:
            mode = FRAMED_SUBPROTOCOL if self.nursery is not None else MODE_RAW
        # The device adopts this side's window, so both ends agree on it.
        window = None if mode == MODE_RAW else (self.stream_options or StreamOptions()).window
        initiate = build_initiate_request(
            device_id,
            name,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
            mode=mode,
            window=window,
        )
        target, headers = initiate.target, initiate.headers
        if self.one_step is not False and (mode == MODE_RAW or self.nursery is not None):
            stream = await self._open_in_one_step(target, headers, mode)
            if stream is not None:
                self.one_step = True
                return stream
            self.one_step = False
        # The initiate's connection is kept: when the stream's URL names the same hub, the
        # service side joins over it (one connection, one TCP handshake, per stream).
        response, spare = await self._exchange("POST", target, headers=headers, body=b"", keep=True)
        transport: trio.abc.Stream | None = None
        try:
            answer = parse_initiate_answer(response.status, response.headers, response.body)
            if isinstance(answer, InitiateRejected):
                raise answer.error()
            assert not isinstance(answer, OneStepUnsupported) and answer.token is not None
            if spare is not None and parse_stream_url(answer.url).address == self.address:
                transport, spare = spare, None
        finally:
            if spare is not None:
                await close_forcefully(spare)
        return await join_stream(
            answer.url,
            answer.token,
            role=Role.SERVICE,
            ssl_context=self.ssl_context,
            opener=self.opener,
            mode=answer.mode,
            nursery=self.nursery,
            options=self.stream_options,
            transport=transport,
        )

    async def _open_in_one_step(
        self, target: str, headers: list[tuple[str, str]], mode: str
    ) -> AnyStream | None:
        """Initiate with a WebSocket upgrade; the stream, or None if the hub cannot."""
        transport = await open_transport(self.address, self.ssl_context, self.opener)
        try:
            async with _closed_on_failure(transport):
                ws = await websocket_connect(
                    transport,
                    host=self.address.host_header,
                    target=target,
                    headers=[self._authorization(), *headers],
                    subprotocols=[FRAMED_SUBPROTOCOL] if mode != MODE_RAW else [],
                )
        except HttpStatusError as exc:
            response = exc.response
            # Refused the Azure way (200: iothub-streaming-is-accepted: False and the
            # reason), an error, or a hub that cannot open streams in one step.
            refusal = parse_initiate_answer(
                response.status, response.headers, response.body, one_step=True, mode=mode
            )
            if isinstance(refusal, OneStepUnsupported):
                return None
            assert isinstance(refusal, InitiateRejected)
            raise refusal.error() from None
        try:
            answer = parse_initiate_answer(101, ws.handshake_headers, b"", one_step=True, mode=mode)
        except HubError:
            await ws.abort()
            raise
        assert not isinstance(answer, (InitiateRejected, OneStepUnsupported))
        return await _stream_over(
            ws,
            answer.url,
            role=Role.SERVICE,
            ssl_context=self.ssl_context,
            opener=self.opener,
            mode=answer.mode,
            nursery=self.nursery,
            options=self.stream_options,
        )

    # -- registry ----------------------------------------------------------------------------

    async def create_device(self, device_id: str, *, status: str = "enabled") -> dict[str, Any]:
        """Register a device; the answer holds its generated keys."""
        result: dict[str, Any] = await self._json(
            "PUT", device_target(device_id), {"deviceId": device_id, "status": status}
        )
        return result

    async def get_device(self, device_id: str) -> dict[str, Any]:
        """The registry entry of a device (Azure device-identity JSON)."""
        result: dict[str, Any] = await self._json("GET", device_target(device_id))
        return result

    async def list_devices(self) -> list[dict[str, Any]]:
        """Every registered device."""
        result: list[dict[str, Any]] = await self._json("GET", device_target())
        return result

    async def set_device_status(self, device_id: str, status: str) -> dict[str, Any]:
        """Enable or disable a device (``"enabled"`` / ``"disabled"``)."""
        result: dict[str, Any] = await self._json(
            "PUT",
            device_target(device_id),
            {"deviceId": device_id, "status": status},
            headers=[("if-match", "*")],
        )
        return result

    async def delete_device(self, device_id: str) -> None:
        """Remove a device from the registry."""
        await self._json("DELETE", device_target(device_id))

    def device_connection_string(self, device: dict[str, Any]) -> ConnectionString:
        """The connection string a device uses, from its registry entry."""
        key = device["authentication"]["symmetricKey"]["primaryKey"]
        return ConnectionString(
            host_name=self.connection_string.host_name,
            device_id=device["deviceId"],
            shared_access_key=key,
            use_tls=self.connection_string.use_tls,
        )


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
    if mode == MODE_RAW:
        ws = await _stream_websocket(url, token, ssl_context, opener, [], transport)
    elif mode != FRAMED_SUBPROTOCOL or nursery is None:
        if transport is not None:
            await close_forcefully(transport)
        if mode != FRAMED_SUBPROTOCOL:
            raise HubError(ErrorCode.ARGUMENT_INVALID, f"unknown stream mode {mode!r}")
        raise HubError(
            ErrorCode.ARGUMENT_INVALID,
            f"{FRAMED_SUBPROTOCOL} streams need a nursery (use open_service / open_device)",
        )
    else:
        ws = await _stream_websocket(
            url, token, ssl_context, opener, [FRAMED_SUBPROTOCOL], transport
        )
    return await _stream_over(
        ws,
        url,
        role=role,
        ssl_context=ssl_context,
        opener=opener,
        mode=mode,
        nursery=nursery,
        options=options,
    )


async def _stream_over(
    ws: WebSocket,
    url: str,
    *,
    role: Role,
    ssl_context: ssl.SSLContext | None,
    opener: Opener | None,
    mode: str,
    nursery: trio.Nursery | None,
    options: StreamOptions | None,
) -> AnyStream:
    """The stream a WebSocket just joined carries; *url* is where a devstream.v1 side resumes."""
    stream_id = parse_stream_url(url).stream_id
    if mode == MODE_RAW:
        return HubStream(ws, stream_id=stream_id, role=role)
    if ws.subprotocol != FRAMED_SUBPROTOCOL or nursery is None:
        await ws.abort()
        raise HubError(ErrorCode.PROTOCOL_ERROR, f"the hub did not accept {FRAMED_SUBPROTOCOL}")

    async def reconnect(resume_token: str) -> WebSocket:
        return await _stream_websocket(url, resume_token, ssl_context, opener, [FRAMED_SUBPROTOCOL])

    return FramedStream(
        ws, stream_id=stream_id, role=role, reconnect=reconnect, nursery=nursery, options=options
    )


async def _stream_websocket(
    url: str,
    token: str,
    ssl_context: ssl.SSLContext | None,
    opener: Opener | None,
    subprotocols: list[str],
    transport: trio.abc.Stream | None = None,
) -> WebSocket:
    """Open a WebSocket to the streaming endpoint with ``Authorization: Bearer <token>``.

    Over *transport* if given (it is closed on failure), else over a new connection.
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
        async with _closed_on_failure(transport):
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
async def _closed_on_failure(transport: trio.abc.Stream) -> AsyncIterator[None]:
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


@asynccontextmanager
async def open_service(
    connection_string: str | ConnectionString,
    *,
    ssl_context: ssl.SSLContext | None = None,
    opener: Opener | None = None,
    http_proxy: str | None = None,
    stream_options: StreamOptions | None = None,
    sas_lifetime: int = SAS_LIFETIME,
) -> AsyncIterator[ServiceClient]:
    """A :class:`ServiceClient` whose devstream.v1 streams live inside the block.

    Close the streams before the block ends; any still open are cancelled when it does.
    """
    async with trio.open_nursery() as nursery:
        try:
            yield ServiceClient(
                connection_string,
                ssl_context=ssl_context,
                opener=opener,
                http_proxy=http_proxy,
                nursery=nursery,
                stream_options=stream_options,
                sas_lifetime=sas_lifetime,
            )
        finally:
            nursery.cancel_scope.cancel()
