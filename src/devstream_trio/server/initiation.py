"""Initiations at the hub: a service asks for a stream, the device's control channel carries
the request, and the answer (accepted, rejected, failed) goes back: as the Azure-compatible
``POST`` answer, or, for a one-step open, as the service side's join of the stream.

The coordinator decides every step and deadline (a response timeout covers sending the
request too); this module carries them out and keeps, per request, the event its answer
waits on.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from devstream_core import control, wire
from devstream_core.bridge import Bridge
from devstream_core.common import Role
from devstream_core.coordinator import (
    Coordinator,
    CoordinatorEvent,
    InitiationAccepted,
    InitiationFailed,
    InitiationRejected,
    SendStreamRequest,
)
from devstream_core.errors import DevstreamError, ErrorCode, RemoteProtocolError
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.registry import Device, Permission, Policy
from devstream_core.routes import BridgeJoin, Initiate

from ..transport.http import HttpError, HttpRequest, HttpServerConnection
from ..transport.websocket import ConnectionClosed
from .config import HubConfig
from .control_channels import ControlChannels
from .metrics import Metrics
from .streaming import StreamingEndpoint

__all__ = ["Initiations", "InitiationsHost"]

log = logging.getLogger("devstream.hub")

_OUTCOME_NAMES = {
    ErrorCode.UNAUTHORIZED: "unauthorized",
    ErrorCode.PERMISSION_DENIED: "unauthorized",
    ErrorCode.DEVICE_NOT_FOUND: "device_not_found",
    ErrorCode.DEVICE_DISABLED: "device_disabled",
    ErrorCode.DEVICE_NOT_ONLINE: "device_not_online",
    ErrorCode.DEVICE_RESPONSE_TIMEOUT: "timeout",
    ErrorCode.THROTTLED: "throttled",
    ErrorCode.STREAM_REJECTED: "rejected",
    ErrorCode.STREAM_NAME_NOT_REGISTERED: "name_not_registered",
}


@dataclass
class Outcome:
    """One initiation waiting for its device's answer (``result``, set with ``event``)."""

    event: trio.Event = field(default_factory=trio.Event)
    result: CoordinatorEvent | None = None
    request_id: str = ""
    stream_id: str = ""
    service_token: str = ""


class InitiationsHost(Protocol):
    """What :class:`Initiations` uses of the hub that runs it (:class:`~.hub.Hub`): its
    configuration, coordinator, bridge, streaming endpoint, control channels and counters, the
    streaming endpoint's URL and a source of random bytes; how it authorises a service and
    checks a device, what it does with the coordinator's events, with a deadline added and
    with a refusal for a limit."""

    config: HubConfig
    coordinator: Coordinator
    bridge: Bridge
    streaming: StreamingEndpoint
    channels: ControlChannels
    metrics: Metrics
    ws_url: str
    random_bytes: Callable[[int], bytes]

    async def authorize_policy(self, request: HttpRequest, needed: Permission) -> Policy:
        """The policy whose SAS token *request* carries, if it grants *needed*; HttpError
        otherwise."""

    async def usable_device(self, device_id: str) -> Device:
        """The device *device_id*, if it exists and is enabled; HttpError otherwise."""

    def dispatch(self, events: list[CoordinatorEvent]) -> None:
        """Carry out what the coordinator decided."""

    def wake(self, due: float | None) -> None:
        """A machine added a deadline (*due*: its next one): the hub's timer looks again."""

    def limit_reached(self, limit: str, message: str) -> None:
        """A request was refused for *limit* (*message* says which, for whom)."""


class Initiations:
    """The initiations of one hub that wait for their device's answer."""

    def __init__(self, hub: InitiationsHost) -> None:
        self.hub = hub
        self.outcomes: dict[str, Outcome] = {}

    def settle(self, event: InitiationAccepted | InitiationRejected | InitiationFailed) -> None:
        """The coordinator's answer to a request: wake the initiation waiting for it."""
        outcome = self.outcomes.get(event.request_id)
        if outcome is not None:
            outcome.result = event
            outcome.event.set()

    async def answer(
        self,
        http: HttpServerConnection,
        request: HttpRequest,
        route: Initiate,
        *,
        connection_id: int | None = None,
    ) -> None:
        """Initiate a stream and answer: a ``POST`` with the stream's URL and token, a
        one-step open (``GET`` upgrade, *connection_id* given) by joining the stream as its
        service side over this connection. Refusals and errors are answered alike."""
        outcome_name = "error"
        try:
            await self.hub.authorize_policy(request, Permission.SERVICE_CONNECT)
            await self.hub.usable_device(route.device_id)
            try:
                asked = wire.parse_initiate_headers(
                    request.headers,
                    default_timeout=self.hub.config.default_timeout,
                    max_timeout=self.hub.config.max_timeout,
                )
            except RemoteProtocolError as exc:
                raise HttpError(exc.code, exc.message) from None
            mode, window = asked.mode, asked.window
            if (
                connection_id is not None
                and mode == FRAMED_SUBPROTOCOL
                and FRAMED_SUBPROTOCOL not in request.subprotocols
            ):
                # Refused before the device hears of it: this connection could not carry it.
                raise HttpError(
                    ErrorCode.ARGUMENT_INVALID,
                    f"a {FRAMED_SUBPROTOCOL} stream needs that WebSocket subprotocol offered",
                )
            outcome = await self._run(
                route, asked.response_timeout, mode, window, one_step=connection_id is not None
            )
            result = outcome.result
            if isinstance(result, InitiationAccepted):
                outcome_name = "accepted"
                headers = wire.accepted_headers(
                    wire.stream_url(self.hub.ws_url, outcome.stream_id, Role.SERVICE),
                    outcome.service_token if connection_id is None else None,
                    mode,
                    window,
                )
                if connection_id is not None:
                    # Counted now: the join below lasts as long as the stream.
                    self.hub.metrics.initiations[outcome_name] += 1
                    outcome_name = ""
                    await self.hub.streaming.join(
                        http,
                        request,
                        BridgeJoin(stream_id=outcome.stream_id, role=Role.SERVICE),
                        connection_id,
                        opener=True,
                        extra_headers=headers,
                    )
                    return
                await http.send_response(200, headers)
            elif isinstance(result, InitiationRejected):
                outcome_name = _OUTCOME_NAMES.get(result.code, "rejected")
                await http.send_response(
                    *wire.build_initiate_answer(
                        wire.InitiateRejected(
                            code=result.code, message=result.reason or result.code.message
                        )
                    )
                )
            else:
                assert isinstance(result, InitiationFailed)
                raise HttpError(
                    result.code,
                    result.message or f"device {route.device_id!r}: {result.code.message}",
                )
        except HttpError as exc:
            outcome_name = _OUTCOME_NAMES.get(exc.code, "error")
            if exc.code is ErrorCode.THROTTLED:
                self.hub.limit_reached("streams", exc.message)
            raise
        finally:
            if outcome_name:
                self.hub.metrics.initiations[outcome_name] += 1

    async def _run(
        self,
        route: Initiate,
        response_timeout: float,
        mode: str,
        window: int | None,
        *,
        one_step: bool,
    ) -> Outcome:
        now = trio.current_time()
        # The stream's id and its two tokens' nonces, from one draw.
        nonces = self.hub.random_bytes(48)
        events = self.hub.coordinator.initiate(
            device_id=route.device_id,
            name=route.stream_name,
            now=now,
            response_timeout=response_timeout,
            stream_nonce=nonces[:16],
        )
        self.hub.wake(self.hub.coordinator.next_deadline())
        outcome = Outcome()
        for event in events:
            if isinstance(event, SendStreamRequest):
                try:
                    device_token, service_token = self.hub.bridge.create_stream(
                        stream_id=event.stream_id,
                        device_id=event.device_id,
                        now=now,
                        device_nonce=nonces[16:32],
                        service_nonce=nonces[32:],
                        mode=mode,
                        # A one-step open's service joins over this connection, tokenless.
                        service_token=not one_step,
                    )
                except DevstreamError as exc:  # too many streams (THROTTLED)
                    self.hub.dispatch(
                        self.hub.coordinator.withdraw(request_id=event.request_id, now=now)
                    )
                    raise HttpError(exc.code, exc.message) from exc
                # The stream's tokens expire: a deadline of the bridge's.
                self.hub.wake(self.hub.bridge.next_deadline())
                self.hub.streaming.ledger.open(
                    stream_id=event.stream_id,
                    device_id=event.device_id,
                    name=event.name,
                    mode=mode,
                    now=now,
                )
                outcome.request_id = event.request_id
                outcome.stream_id = event.stream_id
                outcome.service_token = service_token
                self.outcomes[event.request_id] = outcome
                session = self.hub.channels.sessions.get(event.connection_id)
                if session is None:  # pragma: no cover - the coordinator only names live ones
                    raise HttpError(ErrorCode.DEVICE_NOT_ONLINE)
                # The response deadline covers the send: a device that does not read its
                # control channel holds the request no longer than one that does not answer.
                in_time = True
                # If the device vanished while we wrote, its disconnect fails the request.
                with contextlib.suppress(ConnectionClosed, DevstreamError):
                    in_time = await session.send_by(
                        control.StreamRequest(
                            request_id=event.request_id,
                            name=event.name,
                            url=wire.stream_url(self.hub.ws_url, event.stream_id, Role.DEVICE),
                            token=device_token,
                            mode=mode,
                            window=window,
                        ),
                        event.deadline,
                    )
                if not in_time:
                    if session.ws.closed is not None:
                        # The request was cut part way: the channel cannot carry another.
                        log.info(
                            "control channel %d: the device did not take a stream request "
                            "within its response timeout (%g s); dropping the channel",
                            session.connection_id,
                            response_timeout,
                        )
                        session.leave_reason = "it did not take a stream request in time"
                        session.cancel_scope.cancel()
                    # (Cancelled while it waited its turn to write, nothing of it went out:
                    # the channel goes on, with the requests queued before it.)
                    # Due now: the coordinator fails it (504101) before the drop is noticed.
                    self.hub.dispatch(self.hub.coordinator.advance(trio.current_time()))
            else:
                outcome.result = event
                outcome.event.set()
        try:
            await outcome.event.wait()
        finally:
            self.outcomes.pop(outcome.request_id, None)
        if outcome.stream_id and not isinstance(outcome.result, InitiationAccepted):
            # Refused or failed: no service will join, and the stream stops counting now.
            self.hub.streaming.ledger.forget(outcome.stream_id)
            self.hub.streaming.handle(
                self.hub.bridge.cancel(stream_id=outcome.stream_id, now=trio.current_time())
            )
        return outcome
