"""The hub's HTTP front: each request of a connection, routed to the part that answers it.

:class:`Requests` reads a served connection's requests one after the other (``serve``) and
answers each from its route (:func:`devstream_core.routes.parse_route`): health and metrics
here, the registry routes by :class:`~.registry_api.RegistryApi`, an initiate by
:class:`~.initiation.Initiations`, a device's control channel by
:class:`~.control_channels.ControlChannels` (returned to the caller, which runs it once the
HTTP side is let go) and a stream's WebSocket by :class:`~.streaming.StreamingEndpoint`. A
connection past the hub's limit gets one answer (``answer_over_limit``). A refused request
is answered with its documented error code, and the registry failing under one with 500001;
neither reaches another connection.
"""

from __future__ import annotations

import logging
from typing import Protocol

import trio

from devstream_core.admission import ConnectionLimits, Tally
from devstream_core.bridge import Bridge
from devstream_core.coordinator import Coordinator
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.routes import (
    BridgeJoin,
    ControlChannel,
    DeviceItem,
    DeviceKeyRotation,
    DeviceList,
    Health,
    Initiate,
    MethodNotAllowed,
    PolicyItem,
    PolicyKeyRotation,
    PolicyList,
    StreamList,
    parse_route,
)
from devstream_core.routes import Metrics as MetricsRoute

from ..transport.http import HttpError, HttpRequest, HttpServerConnection
from .config import HubConfig
from .control_channels import ControlChannels, Session
from .initiation import Initiations
from .metrics import Metrics
from .registry_api import RegistryApi
from .store import StoreError
from .streaming import StreamingEndpoint

__all__ = ["OVER_LIMIT_REQUEST_TIME", "Requests", "RequestsHost"]

log = logging.getLogger("devstream.hub")

#: The most time a connection past ``max_connections`` has to send the request it is answered.
OVER_LIMIT_REQUEST_TIME = 2.0


class RequestsHost(Protocol):
    """What :class:`Requests` uses of the hub that runs it (:class:`~.hub.Hub`): its
    configuration, connection limits and counters, the parts that answer the routes (control
    channels, initiations, registry API, streaming endpoint), and the coordinator and bridge
    whose figures ``GET /metrics`` shows."""

    config: HubConfig
    limits: ConnectionLimits
    metrics: Metrics
    channels: ControlChannels
    initiations: Initiations
    registry: RegistryApi
    streaming: StreamingEndpoint
    coordinator: Coordinator
    bridge: Bridge


class Requests:
    """The requests of the hub's connections, each answered by the part its route names."""

    def __init__(self, hub: RequestsHost) -> None:
        self.hub = hub
        #: Refused requests, logged per error code at most once per ``limit_log_interval``.
        self._error_reports: dict[int, Tally] = {}

    def _log_error(self, exc: HttpError) -> None:
        """Log a refused request: the first of its error code at once, then at most one line
        per ``limit_log_interval`` with the count since the last. Anyone can send requests the
        hub refuses, so a line per request would let them fill the disk."""
        code = int(exc.code)
        tally = self._error_reports.get(code)
        if tally is None:
            tally = self._error_reports[code] = Tally(self.hub.config.limit_log_interval)
        count = tally.add(trio.current_time())
        if count is None:
            return
        log.info(
            "HTTP error %d: %s%s",
            code,
            exc.message,
            "" if count == 1 else f" ({count} requests refused with {code} since the last report)",
            extra={"event": "http_error", "code": code, "count": count},
        )

    async def answer_over_limit(self, stream: trio.abc.Stream) -> None:
        """Answer one request of a connection the hub does not serve (it serves its most):
        ``GET /healthz`` as usual, anything else with 503901. The caller closes it."""
        wait = min(self.hub.config.header_timeout, OVER_LIMIT_REQUEST_TIME)
        http = HttpServerConnection(
            stream,
            max_header_size=self.hub.config.max_header_size,
            max_body_size=self.hub.config.max_body_size,
            header_timeout=wait,
            idle_timeout=wait,
        )
        try:
            request = await http.next_request()
            if request is None:
                return
            if request.method == b"GET" and not request.is_websocket_upgrade:
                try:
                    route = parse_route(request.method, request.target)
                except DevstreamError:
                    route = None
                if isinstance(route, Health):
                    await http.send_json(200, {"status": "ok"})
                    return
            raise HttpError(
                ErrorCode.SERVICE_UNAVAILABLE,
                f"the hub serves its most connections ({self.hub.limits.max_connections}); "
                "try again later",
            )
        except HttpError as exc:
            self.hub.metrics.http_errors[int(exc.code)] += 1
            await http.send_error(exc.code, exc.message, exc.headers)

    async def serve(self, stream: trio.abc.Stream, connection_id: int) -> Session | None:
        """Answer requests until the connection closes or becomes a WebSocket.

        Returns the session of a device control channel just opened, for the caller to run.
        """
        http = HttpServerConnection(
            stream,
            max_header_size=self.hub.config.max_header_size,
            max_body_size=self.hub.config.max_body_size,
            header_timeout=self.hub.config.header_timeout,
            idle_timeout=self.hub.config.idle_timeout,
        )
        while True:
            try:
                request = await http.next_request()
                if request is None:
                    return None
                result = await self._handle(http, request, connection_id)
            except HttpError as exc:
                self.hub.metrics.http_errors[int(exc.code)] += 1
                self._log_error(exc)
                await http.send_error(exc.code, exc.message, exc.headers)
                return None
            except StoreError as exc:
                # The registry failed under this request (damage, disk full, I/O error): one
                # line in the log, 500001 to the client, and every other request goes on.
                self.hub.metrics.http_errors[int(ErrorCode.SERVER_ERROR)] += 1
                log.error("connection %d: %s", connection_id, exc.message)
                await http.send_error(ErrorCode.SERVER_ERROR, "the hub's registry database failed")
                return None
            if isinstance(result, Session):
                return result
            if result:
                return None

    async def _handle(
        self, http: HttpServerConnection, request: HttpRequest, connection_id: int
    ) -> bool | Session:
        """Answer one request.

        Returns False when the connection may carry another request, True when it became a
        stream's WebSocket (now closed), or the session of the device control channel it
        became (not yet run).
        """
        try:
            route = parse_route(request.method, request.target)
        except MethodNotAllowed as exc:
            raise HttpError(exc.code, exc.message, headers=[(b"allow", exc.allow)]) from exc
        except DevstreamError as exc:
            raise HttpError(exc.code, exc.message) from exc
        if isinstance(route, (ControlChannel, BridgeJoin)):
            if not request.is_websocket_upgrade:
                raise HttpError(ErrorCode.UPGRADE_REQUIRED)
            if isinstance(route, ControlChannel):
                return await self.hub.channels.open(http, request, route, connection_id)
            await self.hub.streaming.join(http, request, route, connection_id)
            return True
        if isinstance(route, Initiate) and request.method == b"GET":
            if not request.is_websocket_upgrade:
                raise HttpError(ErrorCode.UPGRADE_REQUIRED)
            await self.hub.initiations.answer(http, request, route, connection_id=connection_id)
            return True
        if request.is_websocket_upgrade:
            raise HttpError(ErrorCode.NOT_FOUND, "no WebSocket endpoint at this path")
        if isinstance(route, Health):
            await http.send_json(200, {"status": "ok"})
        elif isinstance(route, MetricsRoute):
            text = self.hub.metrics.render(
                devices_online=self.hub.coordinator.online_count(),
                streams_open=self.hub.bridge.paired_count(),
                streams_waiting=self.hub.bridge.stream_count() - self.hub.bridge.paired_count(),
                connections=self.hub.limits.served,
                bytes_relayed=self.hub.streaming.ledger.bytes_relayed(),
            )
            await http.send_response(
                200, body=text.encode(), content_type=b"text/plain; version=0.0.4"
            )
        elif isinstance(route, Initiate):
            await self.hub.initiations.answer(http, request, route)
        elif isinstance(route, DeviceList):
            await self.hub.registry.device_list(http, request)
        elif isinstance(route, DeviceItem):
            await self.hub.registry.device_item(http, request, route)
        elif isinstance(route, DeviceKeyRotation):
            await self.hub.registry.device_key_rotation(http, request, route)
        elif isinstance(route, PolicyList):
            await self.hub.registry.policy_list(http, request)
        elif isinstance(route, PolicyItem):
            await self.hub.registry.policy_item(http, request, route)
        elif isinstance(route, PolicyKeyRotation):
            await self.hub.registry.policy_key_rotation(http, request, route)
        elif isinstance(route, StreamList):
            await self.hub.registry.stream_list(http, request)
        return False
