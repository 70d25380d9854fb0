"""The device client: keep a control channel to the hub and hand accepted streams to code.

::

    async def echo(stream: AnyStream) -> None:
        async for data in stream:
            await stream.send_all(data)

    async with devstream_trio.open_device(connection_string) as device:
        await device.serve({"echo": echo})

* Every decision about the control channel is :class:`devstream_core.session.DeviceSession`'s
  (the rules are written there); this module carries them out with trio. The channel is kept
  up: the device pings every ``ping_interval`` seconds, one ping in flight at a time, and
  treats a ping unanswered for ``ping_timeout`` as a dead channel; after a drop it
  reconnects with exponential backoff and full jitter (a random fraction of ``backoff_min``
  doubling up to ``backoff_max``).
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
  With ``refusal_backoff`` (a :class:`~devstream_core.session.RefusalBackoff`) the refusals
  it names are retried instead, after a long backoff (5 s growing to 5 minutes by default),
  one warning line per try: the device comes back by itself once it is enabled again.
* Another client registering with the same device id replaces this one: the hub closes its
  channel with 409902 (``DEVICE_REPLACED``). The device logs one warning line and connects
  again after ``(0.5 .. 1) * backoff_max`` seconds, never at once; replaced again within
  ``replaced_window`` (10 minutes), ``serve`` raises ``DeviceReplaced``, unless
  ``keep_trying_when_replaced``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager

import trio

from devstream_core import control, session
from devstream_core.common import Role
from devstream_core.credentials import ConnectionString
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.initiator import close_error
from devstream_core.websocket import BytesMessage, TextMessage
from devstream_core.wire import DEFAULT_SAS_LIFETIME, MIN_SAS_LIFETIME, control_target

from ..exceptions import HubError, HubUnreachable, error_for
from ..transport.connect import HubAddress, Opener, connection_string_for, hub_opener
from ..transport.http import HttpStatusError, websocket_connect
from ..transport.websocket import ConnectionClosed, WebSocket, payload
from .framed import StreamOptions
from .join import AnyStream, join_stream, open_transport

__all__ = ["DeviceClient", "Handler", "open_device"]

log = logging.getLogger("devstream.device")

#: How long the SAS token of each control channel lives, by default (seconds).
SAS_LIFETIME = DEFAULT_SAS_LIFETIME

#: What a device runs for each accepted stream.
Handler = Callable[[AnyStream], Awaitable[None]]

#: Errors that mean "this device may not connect": retrying would not help (the core's table,
#: :data:`devstream_core.session.FINAL_AT_OPEN`).
PERMANENT = session.FINAL_AT_OPEN


@dataclasses.dataclass(eq=False)
class _Channel:
    """The trio side of one control channel the session asked for: the cancel scope of its
    task, its WebSocket once open, its control machine, and the error it ended with."""

    number: int
    scope: trio.CancelScope = dataclasses.field(default_factory=trio.CancelScope)
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
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        opener: Opener | None = None,
        http_proxy: str | None = None,
        stream_options: StreamOptions | None = None,
        sas_lifetime: int = SAS_LIFETIME,
        refusal_backoff: session.RefusalBackoff | None = None,
        keep_trying_when_replaced: bool = False,
        replaced_window: float = session.DEFAULT_REPLACED_WINDOW,
    ) -> None:
        cs = connection_string_for(Role.DEVICE, connection_string)
        if sas_lifetime < MIN_SAS_LIFETIME:
            raise ValueError(f"sas_lifetime must be at least {MIN_SAS_LIFETIME} seconds")
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
        #: The first reconnect's longest wait; it doubles with each failure in a row, up to
        #: ``backoff_max`` (the wait is a random fraction of that: full jitter).
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.wall_clock = wall_clock
        self._rng = rng or random.Random()
        #: How connections to the hub are opened: directly, or through an HTTP proxy
        #: (``http_proxy`` URL; None takes ``HTTPS_PROXY`` and ``NO_PROXY`` from the
        #: environment; ``""`` means no proxy).
        self.opener = opener or hub_opener(ssl_context, http_proxy)
        self.stream_options = stream_options
        #: Which refusals (a disabled, deleted device, a wrong key) are retried, and how
        #: patiently (None: ``serve`` raises them).
        self.refusal_backoff = refusal_backoff
        #: Whether a device replaced again by another connection with its id keeps coming
        #: back (else ``serve`` raises ``DeviceReplaced``), and how close two replacements
        #: must come to count as "again" (seconds).
        self.keep_trying_when_replaced = keep_trying_when_replaced
        self.replaced_window = replaced_window
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

        def ready() -> None:
            nonlocal started
            if not started:
                started = True
                task_status.started()

        machine = session.DeviceSession(
            ping_interval=self.ping_interval,
            ping_timeout=self.ping_timeout,
            backoff_base=self.backoff_min,
            backoff_cap=self.backoff_max,
            sas_lifetime=self.sas_lifetime,
            refusal_backoff=self.refusal_backoff,
            keep_trying_when_replaced=self.keep_trying_when_replaced,
            replaced_window=self.replaced_window,
            token_expires_at=self.connection_string.signature_expiry,
        )
        try:
            async with trio.open_nursery() as streams:
                driver = _SessionDriver(self, machine, self._rng, handlers, streams, ready)
                await driver.run()
                # Given up: the streams end with the session. The error leaves the nursery
                # by hand (trio would wrap it in a group).
                streams.cancel_scope.cancel()
        finally:
            self.online = False
        if driver.fatal is not None:
            raise driver.fatal

    async def _open_channel(self, sign: Callable[[float], int]) -> WebSocket:
        """Open a control channel with a fresh SAS token (the handshake; no Register yet).

        *sign* gives the token's expiry for the Unix time it is signed at.
        """
        # A token given in the connection string that expired raises Unauthorized here.
        token = self.connection_string.sas_token(expiry=sign(self.wall_clock()))
        try:
            transport = await open_transport(self.address, self.ssl_context, self.opener)
        except OSError as exc:  # an opener of the caller's that does not map its errors
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, str(exc)) from exc
        try:
            ws = await websocket_connect(
                transport,
                host=self.address.host_header,
                target=control_target(self.device_id),
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
        return ws

    def _options_for(self, request: control.StreamRequest) -> StreamOptions:
        """This device's stream options, with the window the service chose for the stream."""
        return (self.stream_options or StreamOptions()).for_window(request.window)

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


class _SessionDriver:
    """One call of :meth:`DeviceClient.serve`: a :class:`~devstream_core.session.DeviceSession`
    decides, and this carries it out: one task per control channel (open, read, answer
    requests), one loop for the session's deadlines, a task per ping or Register sent."""

    def __init__(
        self,
        client: DeviceClient,
        machine: session.DeviceSession,
        rng: random.Random,
        handlers: Mapping[str, Handler],
        streams: trio.Nursery,
        ready: Callable[[], None],
    ) -> None:
        self.client = client
        self.session = machine
        #: Where the session's random fractions (its backoff's jitter) come from.
        self.rng = rng
        self.handlers = handlers
        self.streams = streams
        self.ready = ready
        self.channels: dict[int, _Channel] = {}
        #: Set when the session gave up: what ``serve`` raises.
        self.fatal: HubError | None = None
        self._nursery: trio.Nursery | None = None
        self._wakeup = trio.Event()

    async def run(self) -> None:
        """Serve until the session gives up (``fatal`` is then set) or this is cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._apply(self.session.start(trio.current_time()))
            while True:
                # Wait for the next deadline; a channel's report may move it (``_wakeup``).
                self._wakeup = trio.Event()
                deadline = self.session.next_deadline()
                if deadline is None or trio.current_time() < deadline:
                    with trio.move_on_at(math.inf if deadline is None else deadline):
                        await self._wakeup.wait()
                    continue
                received = {
                    c.number: c.ws.last_received for c in self.channels.values() if c.ws is not None
                }
                self._apply(
                    self.session.timer(
                        trio.current_time(), random_fraction=self._random(), last_received=received
                    )
                )

    def _random(self) -> float:
        return self.rng.random()

    def _apply(self, actions: list[session.Action]) -> None:
        """Carry out what the session decided (without waiting: sends go in their own tasks)."""
        nursery = self._nursery
        assert nursery is not None
        device_id = self.client.device_id
        for action in actions:
            if isinstance(action, session.OpenChannel):
                channel = _Channel(action.channel)
                self.channels[action.channel] = channel
                nursery.start_soon(self._serve_channel, channel)
            elif isinstance(action, session.SendRegister):
                channel = self.channels[action.channel]
                assert channel.ws is not None
                text = channel.machine.send(control.Register(names=tuple(self.handlers)))
                nursery.start_soon(_quietly, functools.partial(channel.ws.send_text, text))
            elif isinstance(action, session.SendPing):
                ws = self.channels[action.channel].ws
                assert ws is not None
                nursery.start_soon(_quietly, ws.ping)
            elif isinstance(action, session.CloseChannel):
                channel = self.channels.pop(action.channel)
                log.log(
                    logging.DEBUG if action.reason in _QUIET_CLOSES else logging.INFO,
                    "device %r: closing control channel %d: %s",
                    device_id,
                    action.channel,
                    action.reason.value,
                )
                channel.scope.cancel()
            elif isinstance(action, session.Online):
                self.client.connections += 1
                if action.replaced is not None:
                    log.info("device %r: renewed its SAS token on a new channel", device_id)
                self.ready()
            elif isinstance(action, session.Reconnect):
                if action.code is None:  # a long wait is told by _lost, in one line
                    log.info(
                        "device %r: reconnecting in %.3f s (attempt %d)",
                        device_id,
                        action.after,
                        action.attempt,
                    )
            else:
                if action.message:
                    self.fatal = error_for(action.code, action.message)
                else:
                    self.fatal = self.channels[action.channel].error
                assert self.fatal is not None  # a final error has a code, hence an error
                nursery.cancel_scope.cancel()
        self.client.online = self.session.online
        self._wakeup.set()

    def _lost(self, channel: _Channel, code: ErrorCode | None, why: str) -> None:
        """Tell the session that *channel* ended, for *why*."""
        actions = self.session.channel_lost(
            channel.number, trio.current_time(), code=code, random_fraction=self._random()
        )
        wait = next((a for a in actions if isinstance(a, session.Reconnect)), None)
        if wait is not None and wait.code is not None:
            message = "" if channel.error is None else channel.error.message
            log.warning(
                "device %r: %s; connecting again in %.1f s (attempt %d)",
                self.client.device_id,
                session.long_wait_cause(wait.code, message),
                wait.after,
                wait.attempt,
            )
        elif actions and not any(isinstance(a, session.GiveUp) for a in actions):
            warn = code is not None and code is not ErrorCode.UNAUTHORIZED
            log.log(
                logging.WARNING if warn else logging.INFO,
                "device %r: control channel %d lost (%s)",
                self.client.device_id,
                channel.number,
                why,
            )
        self._apply(actions)

    async def _serve_channel(self, channel: _Channel) -> None:
        """Open *channel*, read it and answer its requests until it ends or is closed."""
        number = channel.number

        def sign(wall_time: float) -> int:
            return self.session.token_expiry(number, now=trio.current_time(), wall_time=wall_time)

        try:
            with channel.scope:
                try:
                    channel.ws = await self.client._open_channel(sign)
                except HubError as exc:
                    channel.error = exc
                    self._lost(channel, exc.code, f"{exc.message} (error {int(exc.code)})")
                    return
                self._apply(self.session.channel_opened(number, trio.current_time()))
                try:
                    await self._read_loop(channel)
                except ConnectionClosed as exc:
                    error = channel.error = close_error(exc.reason)
                    if error is not None:
                        self._lost(
                            channel, error.code, f"{error.message} (error {int(error.code)})"
                        )
                    else:
                        self._lost(channel, None, f"closed {exc.code} {exc.reason}".rstrip())
                except DevstreamError as exc:
                    # The hub broke the control protocol: drop the channel and start afresh.
                    self._lost(channel, None, exc.message)
        finally:
            if self.channels.get(number) is channel:
                del self.channels[number]
            ws = channel.ws
            if ws is not None:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                    await ws.send_close(1000, "")
                await ws.abort()

    async def _read_loop(self, channel: _Channel) -> None:
        ws = channel.ws
        assert ws is not None
        while True:
            event = await ws.receive()
            for message in _messages(channel.machine, event):
                await self._handle(channel, ws, message)

    async def _handle(
        self, channel: _Channel, ws: WebSocket, message: control.ControlMessage
    ) -> None:
        """Act on one message from the hub on control channel *channel*."""
        client = self.client
        machine = channel.machine
        if isinstance(message, control.Registered):
            log.info("device %r online, serving %s", client.device_id, list(message.names))
            self._apply(self.session.registered(channel.number, trio.current_time()))
        elif isinstance(message, control.StreamRequest):
            answer, key = machine.answer(message, self.handlers)
            await ws.send_text(answer)
            if key is not None:
                handler = self.handlers[key]
                self.streams.start_soon(client._run_stream, message, handler, self.streams)
        elif isinstance(message, control.ErrorMessage):
            # DEVICE_REPLACED (DEVICE_NOT_ONLINE from older hubs) is how the hub ends a channel
            # that this device renewed, or that another client took over: the close that
            # follows is told in one line if it matters.
            level = logging.INFO if message.code in _REPLACED else logging.WARNING
            log.log(
                level,
                "device %r: hub reports error %s: %s",
                client.device_id,
                message.code,
                message.message,
            )


#: The error codes a hub closes a replaced channel with.
_REPLACED = frozenset({int(ErrorCode.DEVICE_REPLACED), int(ErrorCode.DEVICE_NOT_ONLINE)})

#: Closes that are no news: a renewed channel's predecessor, the rest of a session given up.
_QUIET_CLOSES = frozenset({session.CloseReason.REPLACED, session.CloseReason.GIVEN_UP})


async def _quietly(send: Callable[[], Awaitable[None]]) -> None:
    """Send on a control channel; a closed one says so to its reader, which reports it."""
    with contextlib.suppress(ConnectionClosed):
        await send()


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
    refusal_backoff: session.RefusalBackoff | None = None,
    keep_trying_when_replaced: bool = False,
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
        refusal_backoff=refusal_backoff,
        keep_trying_when_replaced=keep_trying_when_replaced,
    )
