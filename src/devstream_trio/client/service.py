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
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from devstream_core.common import Role
from devstream_core.control import MODE_RAW
from devstream_core.credentials import ConnectionString, RequestTokens
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.initiator import Initiator, answer_timeout, no_answer, stream_subprotocols
from devstream_core.wire import (
    API_VERSION,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    DEFAULT_SAS_LIFETIME,
    MIN_SAS_LIFETIME,
    STREAMS_TARGET,
    device_target,
    error_from_response,
    parse_stream_url,
    policy_target,
    rotate_key_target,
)

from ..exceptions import HubError
from ..transport.connect import HubAddress, Opener, connection_string_for, hub_opener
from ..transport.http import (
    HttpResponse,
    HttpStatusError,
    close_forcefully,
    http_request,
    websocket_connect,
)
from .framed import StreamOptions
from .join import AnyStream, closed_on_failure, join_stream, open_transport, stream_over
from .watchdog import handshake_deadline

__all__ = ["API_VERSION", "AnyStream", "ServiceClient", "join_stream", "open_service"]

#: How long the SAS tokens a client signs live, by default (seconds).
SAS_LIFETIME = DEFAULT_SAS_LIFETIME

_DEFAULT_OPTIONS = StreamOptions()


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
        #: How initiates go (in one step or with a POST) and what their answers mean.
        self.initiator = Initiator()
        #: The SAS token requests carry (one for many requests).
        self._tokens = RequestTokens(self.connection_string, self.sas_lifetime)

    @property
    def one_step(self) -> bool | None:
        """Whether the hub opens streams in one step: None until the first stream says."""
        return self.initiator.one_step

    @one_step.setter
    def one_step(self, value: bool | None) -> None:
        self.initiator.one_step = value

    def _authorization(self) -> tuple[str, str]:
        """The Authorization header (the core's :class:`RequestTokens` decides when to sign)."""
        return ("authorization", self._tokens.token(self.wall_clock()))

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
        async with closed_on_failure(stream):
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
        initiator = self.initiator
        # The device adopts this side's window, so both ends agree on it.
        initiate = initiator.request(
            device_id,
            name,
            mode=mode,
            window=(self.stream_options or _DEFAULT_OPTIONS).window,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
        )
        target, headers = initiate.target, initiate.headers
        # The device has response_timeout to answer; a hub silent past that (a connection
        # that went dead without a reset) is given up.
        waited = answer_timeout(response_timeout)
        if initiator.tries_one_step and (mode == MODE_RAW or self.nursery is not None):
            stream = await self._open_in_one_step(target, headers, mode, waited)
            if stream is not None:
                return stream
        # The initiate's connection is kept: when the stream's URL names the same hub, the
        # service side joins over it (one connection, one TCP handshake, per stream).
        with trio.move_on_after(waited) as scope:
            response, spare = await self._exchange(
                "POST", target, headers=headers, body=b"", keep=True
            )
        if scope.cancelled_caught:
            raise no_answer("initiate", waited)
        transport: trio.abc.Stream | None = None
        try:
            answer = initiator.post_answer(response.status, response.headers, response.body)
            assert answer.token is not None
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
        self, target: str, headers: list[tuple[str, str]], mode: str, waited: float
    ) -> AnyStream | None:
        """Initiate with a WebSocket upgrade; the stream, or None if the hub cannot. The hub
        has *waited* seconds to answer once connected."""
        transport = await open_transport(self.address, self.ssl_context, self.opener)
        deadline = trio.current_time() + waited
        try:
            async with closed_on_failure(transport):
                with handshake_deadline(
                    self.nursery, transport, deadline, lambda: no_answer("initiate", waited)
                ):
                    ws = await websocket_connect(
                        transport,
                        host=self.address.host_header,
                        target=target,
                        headers=[self._authorization(), *headers],
                        subprotocols=stream_subprotocols(mode),
                    )
        except HttpStatusError as exc:
            refusal: HttpResponse | None = exc.response
        else:
            refusal = None
        if refusal is not None:
            # Refused the Azure way (200: iothub-streaming-is-accepted: False and the
            # reason), an error (both raise), or a hub that cannot open streams in one step.
            self.initiator.one_step_answer(refusal.status, refusal.headers, refusal.body, mode=mode)
            return None
        try:
            answer = self.initiator.one_step_answer(101, ws.handshake_headers, b"", mode=mode)
        except HubError:
            await ws.abort()
            raise
        assert answer is not None
        return await stream_over(
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

    async def list_streams(self) -> dict[str, Any]:
        """The devices online and the streams open (``GET /streams``, ``RegistryRead``):
        ``{"devices": [...], "streams": [...]}``."""
        result: dict[str, Any] = await self._json("GET", STREAMS_TARGET)
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

    async def rotate_device_key(self, device_id: str, *, secondary: bool = False) -> dict[str, Any]:
        """Replace the device's primary key (or secondary) with a fresh one made by the hub;
        the answer is its registry entry with the new key. Tokens signed with the old key stop
        working at once, and a control channel opened with one is closed."""
        result: dict[str, Any] = await self._json(
            "POST", rotate_key_target(device_target(device_id), secondary=secondary)
        )
        return result

    def device_connection_string(
        self, device: dict[str, Any], *, secondary: bool = False
    ) -> ConnectionString:
        """The connection string a device uses, from its registry entry (with its primary key,
        or its secondary)."""
        keys = device["authentication"]["symmetricKey"]
        return ConnectionString(
            host_name=self.connection_string.host_name,
            device_id=device["deviceId"],
            shared_access_key=keys["secondaryKey" if secondary else "primaryKey"],
            use_tls=self.connection_string.use_tls,
        )

    # -- shared-access policies (every permission needed, as the owner policy holds) --------

    async def list_policies(self) -> list[dict[str, Any]]:
        """Every shared-access policy: ``{"keyName", "primaryKey", "secondaryKey", "rights"}``."""
        result: list[dict[str, Any]] = await self._json("GET", policy_target())
        return result

    async def get_policy(self, name: str) -> dict[str, Any]:
        """One shared-access policy."""
        result: dict[str, Any] = await self._json("GET", policy_target(name))
        return result

    async def create_policy(self, name: str, rights: str) -> dict[str, Any]:
        """Create policy *name* granting *rights* (``"ServiceConnect, RegistryRead"``); the
        answer holds its generated keys."""
        result: dict[str, Any] = await self._json(
            "PUT", policy_target(name), {"keyName": name, "rights": rights}
        )
        return result

    async def set_policy_rights(self, name: str, rights: str) -> dict[str, Any]:
        """Change the rights of the existing policy *name* (its keys are kept)."""
        result: dict[str, Any] = await self._json(
            "PUT",
            policy_target(name),
            {"keyName": name, "rights": rights},
            headers=[("if-match", "*")],
        )
        return result

    async def delete_policy(self, name: str) -> None:
        """Remove a shared-access policy (not the owner's)."""
        await self._json("DELETE", policy_target(name))

    async def rotate_policy_key(self, name: str, *, secondary: bool = False) -> dict[str, Any]:
        """Replace the policy's primary key (or secondary) with a fresh one made by the hub.
        Tokens signed with the old key stop working at once."""
        result: dict[str, Any] = await self._json(
            "POST", rotate_key_target(policy_target(name), secondary=secondary)
        )
        return result

    def policy_connection_string(
        self, policy: dict[str, Any], *, secondary: bool = False
    ) -> ConnectionString:
        """The service connection string of *policy* (as :meth:`get_policy` answers it)."""
        return ConnectionString(
            host_name=self.connection_string.host_name,
            shared_access_key_name=policy["keyName"],
            shared_access_key=policy["secondaryKey" if secondary else "primaryKey"],
            use_tls=self.connection_string.use_tls,
        )


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
