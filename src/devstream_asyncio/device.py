"""The device client over asyncio: keep a control channel to the hub, run handlers on streams.

::

    async def echo(stream):
        while data := await stream.receive_some():
            await stream.send_all(data)
        await stream.aclose()

    async with devstream_asyncio.open_device(connection_string) as device:
        await device.serve({"echo": echo})

Every decision about the control channel (pings, a dead channel, SAS renewal and its
hand-over, reconnect backoff, which errors are final, which refusals are retried, what a
replacement by another client with the same device id does) is
:class:`devstream_core.session.DeviceSession`'s; this module runs its loop (see that module's
docstring) with asyncio: one task per control channel, one loop for the session's deadlines,
one task per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

from devstream_core import control, session
from devstream_core.client_websocket import ConnectionClosed
from devstream_core.common import Role
from devstream_core.credentials import ConnectionString
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.exceptions import HubError, error_for
from devstream_core.initiator import close_error
from devstream_core.streamdriver import StreamOptions
from devstream_core.wire import (
    DEFAULT_SAS_LIFETIME,
    HubAddress,
    connection_string_for,
    control_target,
)

from ._ws import WebSocket, join, payload
from .service import join_stream
from .stream import Stream

__all__ = ["DeviceClient", "Handler", "open_device"]

log = logging.getLogger("devstream.asyncio.device")

#: What a device runs for each accepted stream.
Handler = Callable[[Stream], Awaitable[None]]


@dataclasses.dataclass(eq=False)
class _Channel:
    number: int
    task: asyncio.Task[None] | None = None
    ws: WebSocket | None = None
    machine: control.DeviceControl = dataclasses.field(default_factory=control.DeviceControl)
    #: What ``serve`` raises if the session gives up on this channel's error.
    error: HubError | None = None


class DeviceClient:
    """A device's handle on a hub, holding a device connection string."""

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval: float = session.DEFAULT_PING_INTERVAL,
        ping_timeout: float = session.DEFAULT_PING_TIMEOUT,
        backoff_min: float = session.DEFAULT_BACKOFF_BASE,
        backoff_max: float = session.DEFAULT_BACKOFF_CAP,
        sas_lifetime: int = DEFAULT_SAS_LIFETIME,
        stream_options: StreamOptions | None = None,
        rng: random.Random | None = None,
        refusal_backoff: session.RefusalBackoff | None = None,
        keep_trying_when_replaced: bool = False,
        replaced_window: float = session.DEFAULT_REPLACED_WINDOW,
    ) -> None:
        self.connection_string = connection_string_for(Role.DEVICE, connection_string)
        assert self.connection_string.device_id is not None
        self.device_id: str = self.connection_string.device_id
        self.address = HubAddress.from_connection_string(self.connection_string)
        self.ssl_context = ssl_context
        self.stream_options = stream_options or StreamOptions()
        self._new_session = functools.partial(
            session.DeviceSession,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            backoff_base=backoff_min,
            backoff_cap=backoff_max,
            sas_lifetime=sas_lifetime,
            refusal_backoff=refusal_backoff,
            keep_trying_when_replaced=keep_trying_when_replaced,
            replaced_window=replaced_window,
            token_expires_at=self.connection_string.signature_expiry,
        )
        self._rng = rng or random.Random()
        #: True while the control channel is up and registered.
        self.online = False
        #: How many times the control channel has been (re)established.
        self.connections = 0
        self._online = asyncio.Event()
        self._session: session.DeviceSession | None = None
        self._channels: dict[int, _Channel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._wakeup = asyncio.Event()
        self._fatal: HubError | None = None
        self._handlers: Mapping[str, Handler] = {}

    async def wait_online(self) -> None:
        """Return once the device is online (its Register confirmed)."""
        await self._online.wait()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self, handlers: Mapping[str, Handler]) -> None:
        """Register the names in *handlers* (``"*"``: every other name) and serve stream
        requests until cancelled, or until the hub refuses the device for good (then the
        exception for its error: ``Unauthorized``, ``DeviceNotFound``, …)."""
        if not handlers:
            raise ValueError("serve() needs at least one handler")
        self._handlers = handlers
        self._fatal = None
        machine = self._session = self._new_session()
        try:
            self._apply(machine.start(self._now()))
            while self._fatal is None:
                self._wakeup.clear()
                deadline = machine.next_deadline()
                now = self._now()
                if deadline is None or now < deadline:
                    timeout = None if deadline is None else deadline - now
                    # asyncio.timeout, not wait_for: a wake-up that comes with a cancellation
                    # must not swallow it (Python 3.11's wait_for can).
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout):
                            await self._wakeup.wait()
                    continue
                channels = self._channels.values()
                received = {c.number: c.ws.last_received for c in channels if c.ws is not None}
                self._apply(
                    machine.timer(now, random_fraction=self._rng.random(), last_received=received)
                )
        finally:
            self.online = False
            self._online.clear()
            tasks = [c.task for c in self._channels.values() if c.task] + list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._channels.clear()
        assert self._fatal is not None
        raise self._fatal

    def _apply(self, actions: list[session.Action]) -> None:
        """Carry out what the session decided."""
        machine = self._session
        assert machine is not None
        for action in actions:
            if isinstance(action, session.OpenChannel):
                channel = _Channel(action.channel)
                self._channels[action.channel] = channel
                channel.task = asyncio.ensure_future(self._run_channel(channel))
            elif isinstance(action, session.SendRegister):
                channel = self._channels[action.channel]
                assert channel.ws is not None
                text = channel.machine.send(control.Register(names=tuple(self._handlers)))
                with contextlib.suppress(ConnectionClosed):
                    channel.ws.send_nowait(text)
            elif isinstance(action, session.SendPing):
                ws = self._channels[action.channel].ws
                assert ws is not None
                with contextlib.suppress(ConnectionClosed):
                    ws.ping_nowait()
            elif isinstance(action, session.CloseChannel):
                channel = self._channels.pop(action.channel)
                assert channel.task is not None
                channel.task.cancel()
            elif isinstance(action, session.Online):
                self.connections += 1
                self._online.set()
            elif isinstance(action, session.Reconnect):
                if action.code is None:  # a long wait is told by _lost, in one line
                    log.info("device %r: reconnecting in %.3f s", self.device_id, action.after)
            elif action.message:  # GiveUp, with the session's own word on it
                self._fatal = error_for(action.code, action.message)
            else:  # GiveUp
                self._fatal = self._channels[action.channel].error
                assert self._fatal is not None
        self.online = machine.online
        if not self.online:
            self._online.clear()
        self._wakeup.set()

    def _lost(self, channel: _Channel, code: ErrorCode | None) -> None:
        assert self._session is not None
        actions = self._session.channel_lost(
            channel.number, self._now(), code=code, random_fraction=self._rng.random()
        )
        wait = next((a for a in actions if isinstance(a, session.Reconnect)), None)
        if wait is not None and wait.code is not None:
            message = "" if channel.error is None else channel.error.message
            log.warning(
                "device %r: %s; connecting again in %.1f s (attempt %d)",
                self.device_id,
                session.long_wait_cause(wait.code, message),
                wait.after,
                wait.attempt,
            )
        self._apply(actions)

    async def _run_channel(self, channel: _Channel) -> None:
        """Open *channel*, read it and answer its requests until it ends or is closed."""
        machine = self._session
        assert machine is not None
        number = channel.number
        try:
            expiry = machine.token_expiry(number, now=self._now(), wall_time=time.time())
        except HubError as exc:  # a token given in the connection string expired
            channel.error = exc
            self._lost(channel, exc.code)
            return
        token = self.connection_string.sas_token(expiry=expiry)
        try:
            try:
                got = await join(
                    self.address,
                    self.ssl_context,
                    control_target(self.device_id),
                    [("authorization", token)],
                    [control.CONTROL_SUBPROTOCOL],
                )
            except HubError as exc:
                channel.error = exc
                self._lost(channel, exc.code)
                return
            except DevstreamError:  # a 101 that breaks the handshake's rules
                self._lost(channel, None)
                return
            channel.ws = got
            self._apply(machine.channel_opened(number, self._now()))
            try:
                while True:
                    for event in await got.receive():
                        for message in channel.machine.receive(
                            payload(event),
                            message_finished=event.message_finished,
                            frame_finished=event.frame_finished,
                        ):
                            self._handle(channel, got, message)
            except ConnectionClosed as exc:
                channel.error = close_error(exc.reason)
                self._lost(channel, None if channel.error is None else channel.error.code)
            except DevstreamError:  # the hub broke the control protocol: start afresh
                self._lost(channel, None)
        finally:
            if channel.ws is not None:
                channel.ws.shutdown()

    def _handle(self, channel: _Channel, ws: WebSocket, message: control.ControlMessage) -> None:
        """Act on one message from the hub on *channel*."""
        assert self._session is not None
        if isinstance(message, control.Registered):
            self._apply(self._session.registered(channel.number, self._now()))
        elif isinstance(message, control.StreamRequest):
            answer, key = channel.machine.answer(message, self._handlers)
            ws.send_nowait(answer)
            if key is not None:
                self._spawn(self._run_stream(message, self._handlers[key]))
        elif isinstance(message, control.ErrorMessage):
            log.info("device %r: hub reports %s: %s", self.device_id, message.code, message.message)

    async def _run_stream(self, request: control.StreamRequest, handler: Handler) -> None:
        options = self.stream_options.for_window(request.window)
        try:
            stream = await join_stream(
                request.url, request.token, request.mode, self.ssl_context, options
            )
        except DevstreamError as exc:
            log.warning("device %r: could not join %r: %s", self.device_id, request.name, exc)
            return
        try:
            await handler(stream)
        except asyncio.CancelledError:
            stream.abort()  # serve() ends: no graceful close to wait for
            raise
        except DevstreamError as exc:
            log.warning("device %r: stream %r ended: %s", self.device_id, request.name, exc)
        except Exception:
            log.exception("device %r: handler for %r failed", self.device_id, request.name)
        await stream.aclose()


@asynccontextmanager
async def open_device(
    connection_string: str | ConnectionString, **options: object
) -> AsyncIterator[DeviceClient]:
    """A :class:`DeviceClient` for the block (keyword options as the class takes them); call
    ``serve`` on it to go online."""
    yield DeviceClient(connection_string, **options)  # type: ignore[arg-type]
