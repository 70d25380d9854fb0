"""The devices' control channels at the hub: opening one, reading it, closing it.

A device's control channel is one task reading its WebSocket (:meth:`ControlChannels.run`);
what the device says goes to the core's ``HubControl`` machine and the coordinator. The
channel's silence is watched by the core's ``SilenceWatch`` from the hub's timer; its token's
expiry is a deadline of the coordinator's; a registry change asks the registry again whether
it may stay open (:meth:`ControlChannels.close_refused`), and so does a change of the policy
whose token opened it (:meth:`ControlChannels.close_refused_by_policy`). Every close for an
error sends an ``error`` message, then closes with ``4000 + status`` and the code in the
reason.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import trio

from devstream_core import control
from devstream_core.authorization import (
    Credential,
    authorize_control_channel,
    authorize_policy,
    read_credential,
)
from devstream_core.coordinator import Coordinator, CoordinatorEvent, DeviceReplaced
from devstream_core.credentials import SasToken, device_resource
from devstream_core.errors import DevstreamError, ErrorCode, close_reason_for
from devstream_core.registry import Device, Permission, Policy, check_device_access
from devstream_core.routes import ControlChannel
from devstream_core.silence import SilenceWatch
from devstream_core.websocket import BytesMessage, TextMessage

from ..transport.http import HttpError, HttpRequest, HttpServerConnection
from ..transport.websocket import ABNORMAL_CLOSURE, ConnectionClosed, WebSocket, payload
from .config import HubConfig
from .metrics import Metrics
from .store import RegistryStore

__all__ = ["ChannelsHost", "ControlChannels", "Session"]

log = logging.getLogger("devstream.hub")


@dataclass(slots=True)
class Session:
    """One device's control channel."""

    device_id: str
    connection_id: int
    ws: WebSocket
    machine: control.HubControl
    #: When the SAS token that opened it expires, in ``trio.current_time()``'s clock.
    expires_at: float
    #: That token, if it was the device's own (checked again when the device changes); None
    #: when it was a policy's.
    device_token: SasToken | None
    #: That token, if it was a policy's (checked again when the policy changes).
    policy_credential: Credential | None = None
    #: The device's change count (ControlChannels.device_changes) before its access was checked.
    changes_seen: int = 0
    #: The same for the policy of a policy token (ControlChannels.policy_changes).
    policy_changes_seen: int = 0
    #: The device's address (``host:port``), or ``"?"`` when the transport has none.
    peer: str = "?"
    #: When the channel opened, on the hub's timer clock.
    opened_at: float = 0.0
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    close_code: ErrorCode | None = None
    close_message: str | None = None
    #: Why the hub closes the channel, for its "device … left" line (None: it did not).
    leave_reason: str | None = None

    def close(self, code: ErrorCode, message: str | None = None) -> None:
        """End the channel: its task tells the device *code* (and *message*) and closes."""
        self.close_code = code
        self.close_message = message
        self.cancel_scope.cancel()

    async def send(self, message: control.ControlMessage) -> None:
        await self.ws.send_text(self.machine.send(message))

    async def send_by(self, message: control.ControlMessage, deadline: float) -> bool:
        """Send *message*, giving up at *deadline* (``send_text_by``'s rules): False when it
        did not go out in time."""
        return await self.ws.send_text_by(self.machine.send(message), deadline)


def peer_address(stream: trio.abc.Stream) -> str:
    """The address at the other end of *stream* (``host:port``, ``[v6]:port``), or ``"?"``
    when it is not a socket (or no longer connected)."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        try:
            host, port = stream.socket.getpeername()[:2]
        except (OSError, ValueError):
            return "?"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return "?"


class ChannelsHost(Protocol):
    """What :class:`ControlChannels` uses of the hub that runs it (:class:`~.hub.Hub`): its
    configuration, registry, coordinator and counters, the host name and wall clock a SAS
    token is checked with, and what it does with the coordinator's events, with a device's
    changed record, and when the coordinator has a new deadline."""

    config: HubConfig
    store: RegistryStore
    coordinator: Coordinator
    metrics: Metrics
    host_name: str
    wall_clock: Callable[[], float]

    def wake(self) -> None:
        """The coordinator has a new deadline: the hub's timer looks again."""

    def dispatch(self, events: list[CoordinatorEvent]) -> None:
        """Carry out what the coordinator decided."""

    def check_device(self, device_id: str, device: Device | None) -> None:
        """Close what *device* (the record of *device_id*, None when deleted) no longer lets
        in."""


class ControlChannels:
    """Every device control channel of one hub."""

    def __init__(self, hub: ChannelsHost) -> None:
        self.hub = hub
        self.sessions: dict[int, Session] = {}
        #: The channels' silence, watched from one schedule, not a task each.
        self.silence = SilenceWatch(hub.config.control_idle_timeout)
        #: How many times each device's registry record changed (see Hub.device_changed): a
        #: channel whose handshake spanned a change is checked again once it is listed.
        self.device_changes: dict[str, int] = {}
        #: The same for each policy (see Hub.policy_changed), for channels opened with its token.
        self.policy_changes: dict[str, int] = {}

    async def open(
        self,
        http: HttpServerConnection,
        request: HttpRequest,
        route: ControlChannel,
        connection_id: int,
    ) -> Session:
        """Check the device's credentials, answer the upgrade, and return the new session."""
        changes_seen = self.device_changes.get(route.device_id, 0)
        try:
            credential = read_credential(request.header(b"authorization"))
            name = credential.policy_name
            policy_changes_seen = 0 if name is None else self.policy_changes.get(name, 0)
            grant = authorize_control_channel(
                credential,
                device_id=route.device_id,
                device=await self.hub.store.get_device(route.device_id),
                policy=None if name is None else await self.hub.store.get_policy(name),
                host_name=self.hub.host_name,
                now=self.hub.wall_clock(),
                max_lifetime=self.hub.config.max_sas_lifetime,
            )
        except HttpError:
            raise
        except DevstreamError as exc:
            raise HttpError(exc.code, exc.message) from None
        # The channel lives until its token expires: se is Unix time, the timer's clock is not.
        expires_at = trio.current_time() + (grant.expires_at - self.hub.wall_clock())
        offered = request.subprotocols
        ws = await http.accept_websocket(
            request,
            subprotocol=control.CONTROL_SUBPROTOCOL
            if control.CONTROL_SUBPROTOCOL in offered
            else None,
        )
        return Session(
            device_id=route.device_id,
            connection_id=connection_id,
            ws=ws,
            machine=control.HubControl(max_message_size=self.hub.config.max_control_message_size),
            expires_at=expires_at,
            device_token=grant.device_token,
            changes_seen=changes_seen,
            policy_credential=credential if grant.device_token is None else None,
            policy_changes_seen=policy_changes_seen,
            peer=peer_address(ws.stream),
        )

    async def run(self, session: Session) -> None:
        """Read control messages until the device leaves, is dropped or replaced; then close.

        An idle channel is this one task waiting in ``ws.receive()`` and nothing else: its
        silence is watched by the hub's timer (:meth:`drop_idle`), which cancels
        ``session.cancel_scope`` once the device has been silent for ``control_idle_timeout``.
        """
        connection_id = session.connection_id
        ws = session.ws
        self.sessions[connection_id] = session
        self.hub.coordinator.channel_opened(
            device_id=session.device_id,
            connection_id=connection_id,
            expires_at=session.expires_at,
            now=trio.current_time(),
        )
        self.hub.wake()  # its expiry is a deadline of the coordinator's
        if self.silence.watch(connection_id, since=ws.last_received):
            self.hub.wake()  # the earliest look now: the timer may have to look sooner
        self.hub.metrics.control_connections_total += 1
        session.opened_at = trio.current_time()
        log.info(
            "device %r connected from %s (control channel %d)",
            session.device_id,
            session.peer,
            connection_id,
            extra={
                "event": "device_connected",
                "device_id": session.device_id,
                "peer": session.peer,
                "connection_id": connection_id,
            },
        )
        close_code: ErrorCode | None = None
        #: Why it left, unless the hub says (session.leave_reason).
        why = "its connection ended"
        try:
            with session.cancel_scope:
                try:
                    if self.device_changes.get(session.device_id, 0) != session.changes_seen:
                        # The device changed (keys, status, deleted) after its access was
                        # checked, while the handshake went on: check again, now that a
                        # further change would find this channel.
                        device = await self.hub.store.get_device(session.device_id)
                        self.hub.check_device(session.device_id, device)
                    credential = session.policy_credential
                    name = None if credential is None else credential.policy_name
                    if (
                        name is not None
                        and self.policy_changes.get(name, 0) != session.policy_changes_seen
                    ):
                        # Likewise for the policy whose token opened it.
                        self.close_refused_by_policy(name, await self.hub.store.get_policy(name))
                    while True:
                        # No local keeps the last fragment or message alive while idle.
                        await self._fragment(session, await ws.receive())
                except ConnectionClosed as exc:
                    why = (
                        "its connection was lost"
                        if exc.code == ABNORMAL_CLOSURE
                        else f"it closed its channel (code {exc.code})"
                    )
                except DevstreamError as exc:
                    why = f"it broke the protocol: {exc.message}"
                    close_code = exc.code
            close_message: str | None = None
            if session.close_code is not None:
                close_code, close_message = session.close_code, session.close_message
        finally:
            del self.sessions[connection_id]
            self.silence.forget(connection_id)
            self.hub.dispatch(
                self.hub.coordinator.device_disconnected(
                    connection_id=connection_id, now=trio.current_time()
                )
            )
            online = trio.current_time() - session.opened_at
            reason = session.leave_reason or why
            log.info(
                "device %r left (control channel %d, from %s) after %.1f s online: %s",
                session.device_id,
                connection_id,
                session.peer,
                online,
                reason,
                extra={
                    "event": "device_left",
                    "device_id": session.device_id,
                    "peer": session.peer,
                    "connection_id": connection_id,
                    "online_seconds": round(online, 3),
                    "reason": reason,
                },
            )
        if close_code is not None:
            with trio.move_on_after(self.hub.config.close_timeout):
                with contextlib.suppress(ConnectionClosed, DevstreamError):
                    # Encoded directly: after the device broke the protocol the machine is
                    # poisoned and would refuse to send the error that explains why.
                    await ws.send_text(
                        control.encode_message(
                            control.ErrorMessage.from_code(close_code, close_message)
                        )
                    )
                await ws.aclose(close_code.close_code, close_reason_for(close_code, close_message))
        else:
            await ws.aclose(timeout=self.hub.config.close_timeout)

    def close_replaced(self, event: DeviceReplaced) -> None:
        """Close the control channel the coordinator found replaced by a newer one of the same
        device, with the code it chose (``DEVICE_REPLACED``)."""
        session = self.sessions.get(event.connection_id)
        if session is not None:
            # Its "device … left" line says so (once the channel's task is over). The hub
            # cannot tell a client renewing its token (it opens its next channel before it
            # leaves this one) from another client with the same id: the line says both.
            session.leave_reason = (
                "replaced by a newer connection of the device (its own, renewing its token, "
                "or another client's)"
            )
            session.close(event.code)

    def drop_idle(self, now: float) -> None:
        """Close every control channel silent (no message, no ping) for
        ``control_idle_timeout`` with ``CONNECTION_IDLE``."""
        timeout = self.silence.timeout
        sessions = self.sessions
        for connection_id in self.silence.silent(now, lambda c: sessions[c].ws.last_received):
            sessions[connection_id].leave_reason = f"silent for {timeout:g} s"
            sessions[connection_id].close(
                ErrorCode.CONNECTION_IDLE, f"no message or ping for {timeout:g} s; closing"
            )

    async def _fragment(self, session: Session, event: BytesMessage | TextMessage) -> None:
        """Feed one received fragment to the machine and act on the messages it completes."""
        messages = session.machine.receive(
            payload(event),
            message_finished=event.message_finished,
            frame_finished=event.frame_finished,
        )
        for message in messages:
            await self._message(session, message)

    async def _message(self, session: Session, message: control.ControlMessage) -> None:
        now = trio.current_time()
        if isinstance(message, control.Register):
            self.hub.dispatch(
                self.hub.coordinator.device_registered(
                    device_id=session.device_id,
                    connection_id=session.connection_id,
                    names=message.names,
                    now=now,
                )
            )
            await session.send(control.Registered(names=message.names))
        elif isinstance(message, control.StreamResponse):
            self.hub.dispatch(
                self.hub.coordinator.device_responded(
                    connection_id=session.connection_id,
                    request_id=message.request_id,
                    accepted=message.accepted,
                    reason=message.reason,
                    now=now,
                )
            )
        elif isinstance(message, control.ErrorMessage):
            log.info(
                "device %r reports error %s: %s",
                session.device_id,
                message.code,
                message.message,
            )

    def close_refused_by_policy(self, name: str, policy: Policy | None) -> None:
        """Close each channel opened with a token of policy *name* that *policy* (its registry
        record, None when deleted) no longer lets in (the core's :func:`authorize_policy` for
        ``DeviceConnect``: a rotated key or a lost permission)."""
        hub = self.hub
        now = hub.wall_clock()
        for session in list(self.sessions.values()):
            credential = session.policy_credential
            if credential is None or credential.policy_name != name:
                continue
            try:
                authorize_policy(
                    credential,
                    policy,
                    Permission.DEVICE_CONNECT,
                    host_name=hub.host_name,
                    now=now,
                )
            except DevstreamError as exc:
                message = f"SAS token no longer valid: the policy changed ({exc.message})"
                self._refuse(session, exc.code, message)

    def close_refused(self, device_id: str, device: Device | None) -> None:
        """Close each channel of *device_id* that *device* (its registry record, None when
        deleted) no longer lets in (the registry's :func:`check_device_access`: its token
        verifies under the device's keys, the device exists and is enabled)."""
        hub = self.hub
        now = hub.wall_clock()
        resource = device_resource(hub.host_name, device_id)
        for session in list(self.sessions.values()):
            if session.device_id != device_id:
                continue
            try:
                check_device_access(
                    device,
                    device_id=device_id,
                    token=session.device_token,
                    resource=resource,
                    now=now,
                    established=True,
                )
            except DevstreamError as exc:
                self._refuse(session, exc.code, exc.message)

    def _refuse(self, session: Session, code: ErrorCode, message: str) -> None:
        """Close *session* for *code*: the registry no longer lets it in."""
        hub = self.hub
        log.info("control channel %d: %s; closing it", session.connection_id, message)
        session.leave_reason = f"refused: {message}"
        session.close(code, message)
        # Offline from now on, not when its task gets to run: no request goes to it.
        hub.dispatch(
            hub.coordinator.device_disconnected(
                connection_id=session.connection_id, now=trio.current_time()
            )
        )
