"""The device client: keep a control channel to the hub and hand accepted streams to code.

::

    async def echo(stream: AnyStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async with devstream_trio.open_device(connection_string) as device:
        await device.serve({"echo": echo})

* The control channel is kept up: the device pings every ``ping_interval`` seconds and treats a
  hub silent for ``ping_interval + ping_timeout`` as gone; after a drop it reconnects with
  exponential backoff and full jitter (``backoff_min`` doubling up to ``backoff_max``).
* A stream request for a registered name is accepted and its handler runs in its own task; a
  handler that raises is logged and its stream closed, and the device keeps serving. A stream
  that cannot be joined, or that ends under its handler (``trio.BrokenResourceError``: the peer
  never came, was lost, or reset it), is logged in one line, without a traceback.
* A request for a name with no handler is rejected with a reason the service can read.
* The control channel's SAS token lives ``sas_lifetime`` seconds (an hour); at 85 % of that
  (:func:`~devstream_core.credentials.sas_renewal_time`) the device opens a new channel with
  a fresh token and registers on it while the old one still takes requests. From then the
  hub sends new requests to the new channel; the old one answers those the hub sent it
  before, until the hub closes it (at most ``ping_timeout`` later, then the device closes it),
  and the device goes on on the new one: no request is lost to the hand-over, well before
  the hub would close the old one at the expiry. Streams run in their own tasks, outside any
  one channel's: they carry on across it.
* The hub refusing the device itself (wrong key, unknown or disabled device) is not retried:
  ``serve`` raises the matching exception (``Unauthorized``, ``DeviceNotFound``,
  ``DeviceDisabled``). A channel the hub closes with 401002 once open (an expired token, a
  key replaced) is reconnected with a fresh token, and ``serve`` raises if that is refused.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from devstream_core import control
from devstream_core.common import Role
from devstream_core.credentials import ConnectionString, sas_renewal_time
from devstream_core.errors import DevstreamError, ErrorCode, parse_close_reason
from devstream_core.websocket import BytesMessage, TextMessage

from ._connect import HubAddress, Opener, connection_string_for, hub_opener
from ._http import HttpStatusError, websocket_connect
from ._ws import ConnectionClosed, WebSocket, payload
from .exceptions import HubError, HubUnreachable, error_for
from .framed import StreamOptions
from .service import AnyStream, join_stream, open_transport

__all__ = ["DeviceClient", "Handler", "open_device"]

log = logging.getLogger("devstream.device")

#: How long the SAS token of each control channel lives, by default (seconds).
SAS_LIFETIME = 3600

#: What a device runs for each accepted stream.
Handler = Callable[[AnyStream], Awaitable[None]]

#: Errors that mean "this device may not connect": retrying would not help.
PERMANENT = frozenset(
    {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.DEVICE_NOT_FOUND,
        ErrorCode.DEVICE_DISABLED,
        ErrorCode.INVALID_CONNECTION_STRING,
        # A malformed setting, e.g. an http_proxy / HTTPS_PROXY that is not a proxy URL.
        ErrorCode.ARGUMENT_INVALID,
    }
)


class _SessionLost(Exception):
    """The control channel ended; reconnect."""


@dataclasses.dataclass
class _Channel:
    """A control channel just opened (handshake done), registered or not yet."""

    ws: WebSocket
    #: When to renew its token, on the trio clock.
    renew_at: float
    #: Its control machine once it has registered (the renewal does that), else None.
    machine: control.DeviceControl | None = None


@dataclasses.dataclass
class _Handover:
    """A channel's renewal, as its keepalive goes about it."""

    #: The keepalive is opening and registering the successor.
    started: bool = False
    #: Set when that is done: ``successor`` is the registered channel, or None if it failed.
    settled: trio.Event = dataclasses.field(default_factory=trio.Event)
    successor: _Channel | None = None


@dataclasses.dataclass(frozen=True)
class _Serving:
    """What a control channel serves: the handlers, the streams' nursery, the ready call."""

    handlers: Mapping[str, Handler]
    streams: trio.Nursery
    ready: Callable[[], None]


class _Renewal(Exception):
    """The control channel's SAS token is due for renewal: go on with *successor*, a channel
    already opened with a fresh token and registered (or, if that failed, open one the usual
    way)."""

    def __init__(self, successor: _Channel | None) -> None:
        super().__init__("SAS token renewal")
        self.successor = successor


class DeviceClient:
    """A device's handle on a hub, holding a device connection string."""

    def __init__(
        self,
        connection_string: str | ConnectionString,
        *,
        ssl_context: ssl.SSLContext | None = None,
        ping_interval: float = 20.0,
        ping_timeout: float = 20.0,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        opener: Opener | None = None,
        http_proxy: str | None = None,
        stream_options: StreamOptions | None = None,
        sas_lifetime: int = SAS_LIFETIME,
    ) -> None:
        cs = connection_string_for(Role.DEVICE, connection_string)
        if sas_lifetime < 2:
            raise ValueError("sas_lifetime must be at least 2 seconds")
        #: How long the SAS token of each control channel lives (a hub's
        #: ``max_sas_lifetime`` may cap it).
        self.sas_lifetime = sas_lifetime
        assert cs.device_id is not None
        self.connection_string = cs
        self.device_id: str = cs.device_id
        self.address = HubAddress.from_connection_string(cs)
        self.ssl_context = ssl_context
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.wall_clock = wall_clock
        self._rng = rng or random.Random()
        #: How connections to the hub are opened: directly, or through an HTTP proxy
        #: (``http_proxy`` URL; None takes ``HTTPS_PROXY`` and ``NO_PROXY`` from the
        #: environment; ``""`` means no proxy).
        self.opener = opener or hub_opener(ssl_context, http_proxy)
        self.stream_options = stream_options
        #: True while the control channel is up and registered.
        self.online = False
        #: How many times the control channel has been (re)established.
        self.connections = 0

    async def serve(
        self,
        handlers: Mapping[str, Handler],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Register the names in *handlers* and serve stream requests until cancelled.

        ``task_status.started()`` is called once the first registration is confirmed. The key
        ``"*"`` accepts every name not listed.
        """
        if not handlers:
            raise ValueError("serve() needs at least one handler")
        started = False
        failures = 0
        successor: _Channel | None = None

        def ready() -> None:
            nonlocal started, failures
            failures = 0
            if not started:
                started = True
                task_status.started()

        # Errors leave the nursery by hand: trio would wrap them in an ExceptionGroup.
        fatal: HubError | None = None
        async with trio.open_nursery() as streams:
            while True:
                try:
                    channel, successor = successor, None
                    await self._session(handlers, streams, ready, channel)
                except HubError as exc:
                    if exc.code in PERMANENT:
                        fatal = exc
                        streams.cancel_scope.cancel()
                        break
                    log.warning("device %r: %s; reconnecting", self.device_id, exc.message)
                except _SessionLost as exc:
                    log.info(
                        "device %r: control channel lost (%s); reconnecting", self.device_id, exc
                    )
                except _Renewal as renewal:
                    # Not a failure: on at once, on the channel opened with a fresh token
                    # while the old one still served. The streams carry on in their own
                    # nursery meanwhile.
                    log.info("device %r: renewed its SAS token on a new channel", self.device_id)
                    successor = renewal.successor
                    continue
                finally:
                    self.online = False
                failures += 1
                ceiling = min(self.backoff_max, self.backoff_min * 2 ** min(failures - 1, 16))
                await trio.sleep(self._rng.uniform(self.backoff_min / 2, ceiling))
        if fatal is not None:
            raise fatal

    async def _open_channel(self) -> _Channel:
        """Open a control channel with a fresh SAS token (the handshake; no Register yet)."""
        transport = await open_transport(self.address, self.ssl_context, self.opener)
        issued_at = self.wall_clock()
        expiry = int(issued_at) + self.sas_lifetime
        token = self.connection_string.sas_token(expiry=expiry)
        # The hub closes the channel at the token's expiry; reconnect with a new one before.
        renew_at = trio.current_time() + (
            sas_renewal_time(issued_at=issued_at, expiry=expiry) - issued_at
        )
        try:
            ws = await websocket_connect(
                transport,
                host=self.address.host_header,
                target=f"/devices/{urllib.parse.quote(self.device_id, safe='')}/streams",
                headers=[("authorization", token)],
                subprotocols=[control.CONTROL_SUBPROTOCOL],
            )
        except HttpStatusError as exc:
            await trio.aclose_forcefully(transport)
            raise error_for(exc.code or ErrorCode.SERVER_ERROR, exc.message) from None
        except DevstreamError as exc:
            await trio.aclose_forcefully(transport)
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, exc.message) from exc
        except BaseException:
            await trio.aclose_forcefully(transport)
            raise
        return _Channel(ws=ws, renew_at=renew_at)

    async def _session(
        self,
        handlers: Mapping[str, Handler],
        streams: trio.Nursery,
        ready: Callable[[], None],
        channel: _Channel | None = None,
    ) -> None:
        """Serve one control channel (*channel*, or one opened now) until it ends."""
        if channel is None:
            channel = await self._open_channel()
        ws = channel.ws
        machine = channel.machine
        if machine is not None:
            self.online = True  # registered by the renewal that opened it
        serving = _Serving(handlers, streams, ready)
        handover = _Handover()
        try:
            # The reader's error leaves the nursery by hand (trio would wrap it in a group).
            failure: ConnectionClosed | DevstreamError | None = None
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(
                        self._keepalive,
                        ws,
                        nursery.cancel_scope,
                        channel.renew_at,
                        handover,
                        serving,
                    )
                    try:
                        if machine is None:
                            machine = control.DeviceControl()
                            await ws.send_text(
                                machine.send(control.Register(names=tuple(handlers)))
                            )
                        await self._read_loop(ws, machine, serving)
                    except (ConnectionClosed, DevstreamError) as exc:
                        failure = exc
                        if handover.started:
                            # The hub closes this channel once the successor's Register
                            # reached it, maybe before the successor hears back: let that
                            # finish.
                            await handover.settled.wait()
                        nursery.cancel_scope.cancel()
            except BaseException:
                # Cancelled from outside: the successor goes too.
                if handover.successor is not None:
                    await handover.successor.ws.abort()
                raise
            if handover.successor is not None:
                raise _Renewal(handover.successor)
            if failure is not None:
                raise failure
            if handover.settled.is_set():
                raise _Renewal(None)
            raise _SessionLost("no answer to keepalive pings")
        except ConnectionClosed as exc:
            code, message = parse_close_reason(exc.reason)
            if code is ErrorCode.UNAUTHORIZED:
                # The hub closed a channel it had let in: its token expired (this clock runs
                # behind the hub's) or the device's keys changed. A fresh token settles the
                # first; the second is refused at the next connect, which ends serve().
                raise _SessionLost(f"{message} (error {int(code)})") from None
            if code is not None:
                raise error_for(code, message) from None
            raise _SessionLost(f"closed {exc.code} {exc.reason}".rstrip()) from None
        except DevstreamError as exc:
            if isinstance(exc, HubError):
                raise
            # The hub broke the control protocol: drop the channel and start afresh.
            raise _SessionLost(exc.message) from exc
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await ws.send_close(1000, "")
            await ws.abort()

    async def _read_loop(
        self, ws: WebSocket, machine: control.DeviceControl, serving: _Serving
    ) -> None:
        while True:
            event = await ws.receive()
            for message in _messages(machine, event):
                await self._handle(ws, machine, message, serving)

    async def _handle(
        self,
        ws: WebSocket,
        machine: control.DeviceControl,
        message: control.ControlMessage,
        serving: _Serving,
    ) -> None:
        """Act on one message from the hub on control channel *ws*."""
        if isinstance(message, control.Registered):
            self.online = True
            self.connections += 1
            log.info("device %r online, serving %s", self.device_id, list(message.names))
            serving.ready()
        elif isinstance(message, control.StreamRequest):
            handler = serving.handlers.get(message.name) or serving.handlers.get("*")
            if handler is None:
                await ws.send_text(
                    machine.send(
                        control.StreamResponse(
                            request_id=message.request_id,
                            accepted=False,
                            reason=f"no handler for stream name {message.name!r}",
                        )
                    )
                )
                return
            await ws.send_text(
                machine.send(control.StreamResponse(request_id=message.request_id, accepted=True))
            )
            serving.streams.start_soon(self._run_stream, message, handler, serving.streams)
        elif isinstance(message, control.ErrorMessage):
            # DEVICE_NOT_ONLINE is how the hub ends a channel this device replaced.
            level = logging.INFO if message.code == ErrorCode.DEVICE_NOT_ONLINE else logging.WARNING
            log.log(
                level,
                "device %r: hub reports error %s: %s",
                self.device_id,
                message.code,
                message.message,
            )

    async def _keepalive(
        self,
        ws: WebSocket,
        scope: trio.CancelScope,
        renew_at: float,
        handover: _Handover,
        serving: _Serving,
    ) -> None:
        # Ping every ping_interval; give up the moment the hub has been silent for
        # ping_interval + ping_timeout (not at the next ping, which could be later). At
        # renew_at, open the next channel with a fresh token and register on it while this
        # one still serves requests; then this one answers what the hub had sent it until
        # the hub closes it, for at most ping_timeout.
        next_ping = trio.current_time() + self.ping_interval
        while True:
            give_up_at = ws.last_received + self.ping_interval + self.ping_timeout
            await trio.sleep_until(min(next_ping, give_up_at, renew_at))
            now = trio.current_time()
            if now >= renew_at:
                handover.started = True
                handover.successor = await self._register_successor(serving)
                handover.settled.set()
                if handover.successor is not None:
                    await trio.sleep(self.ping_timeout)
                scope.cancel()
                return
            if now >= ws.last_received + self.ping_interval + self.ping_timeout:
                scope.cancel()
                return
            if now >= next_ping:
                next_ping = now + self.ping_interval
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return

    async def _register_successor(self, serving: _Serving) -> _Channel | None:
        """Open a channel with a fresh token and register on it; None if that fails (the
        serve loop then opens one the usual way, and reports what goes wrong)."""
        try:
            channel = await self._open_channel()
        except (DevstreamError, OSError) as exc:
            log.info("device %r: cannot open a new channel yet: %s", self.device_id, exc)
            return None
        ws = channel.ws
        machine = control.DeviceControl()
        registered = False
        try:
            with trio.move_on_after(self.ping_timeout):
                await ws.send_text(machine.send(control.Register(names=tuple(serving.handlers))))
                while not registered:
                    event = await ws.receive()
                    for message in _messages(machine, event):
                        registered = registered or isinstance(message, control.Registered)
                        await self._handle(ws, machine, message, serving)
        except (ConnectionClosed, DevstreamError) as exc:
            log.info("device %r: cannot register on a new channel yet: %s", self.device_id, exc)
        except BaseException:
            await ws.abort()
            raise
        if not registered:
            await ws.abort()
            return None
        channel.machine = machine
        return channel

    def _options_for(self, request: control.StreamRequest) -> StreamOptions:
        """This device's stream options, with the window the service chose for the stream."""
        options = self.stream_options or StreamOptions()
        if request.window is not None and request.window != options.window:
            options = dataclasses.replace(options, window=request.window)
        return options

    async def _run_stream(
        self, request: control.StreamRequest, handler: Handler, streams: trio.Nursery
    ) -> None:
        try:
            stream = await join_stream(
                request.url,
                request.token,
                role=Role.DEVICE,
                ssl_context=self.ssl_context,
                opener=self.opener,
                mode=request.mode,
                nursery=streams,
                options=self._options_for(request),
            )
        except (DevstreamError, OSError) as exc:  # HubError, the hub lost mid-handshake, …
            log.warning(
                "device %r: could not join stream %r: %s",
                self.device_id,
                request.name,
                exc.message if isinstance(exc, DevstreamError) else exc,
            )
            return
        stream.name = request.name
        log.debug(
            "device %r: stream %s (%r) opened", self.device_id, stream.stream_id, request.name
        )
        try:
            await handler(stream)
        except trio.BrokenResourceError as exc:
            # The stream ended under the handler (its peer never came, was lost, or reset
            # it): that is the stream's fate, not a bug of the handler's. One line says why.
            log.warning(
                "device %r: stream %s (%r) ended: %s",
                self.device_id,
                stream.stream_id,
                request.name,
                exc.__cause__ or exc,
            )
        except Exception:
            log.exception("device %r: handler for %r failed", self.device_id, request.name)
        finally:
            await stream.aclose()
            log.debug("device %r: stream %s closed", self.device_id, stream.stream_id)


def _messages(
    machine: control.DeviceControl, event: BytesMessage | TextMessage
) -> list[control.ControlMessage]:
    """The control messages that the received fragment *event* completes."""
    return machine.receive(
        payload(event),
        message_finished=event.message_finished,
        frame_finished=event.frame_finished,
    )


@asynccontextmanager
async def open_device(
    connection_string: str | ConnectionString,
    *,
    ssl_context: ssl.SSLContext | None = None,
    ping_interval: float = 20.0,
    ping_timeout: float = 20.0,
    opener: Opener | None = None,
    http_proxy: str | None = None,
    stream_options: StreamOptions | None = None,
    sas_lifetime: int = SAS_LIFETIME,
) -> AsyncIterator[DeviceClient]:
    """A :class:`DeviceClient` for the block; call ``serve`` on it to go online."""
    yield DeviceClient(
        connection_string,
        ssl_context=ssl_context,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        opener=opener,
        http_proxy=http_proxy,
        stream_options=stream_options,
        sas_lifetime=sas_lifetime,
    )
