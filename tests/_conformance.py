"""What the client conformance suite runs on: a real trio hub in a thread, a tap in front of it,
and one small facade per client driver (trio, asyncio) that the tests are written against.

* :class:`HubThread` runs ``serve_hub`` (in-memory registry) with its own ``trio.run`` in a
  background thread, on 127.0.0.1 port 0, behind a :class:`Tap`: every client connects to
  the tap (the hub's public URL names it, so stream URLs do too). A pool of devices is
  registered at start, so a test never has to reach into the hub's thread to create one.
* :class:`Tap` relays TCP to the hub and reads the devices' control channels both ways (after
  the request head and the 101): it counts the WebSocket pings each device sends and the
  hub's confirmations of its registration, and cuts every connection through it on
  :meth:`HubThread.cut`. Each of those wakes the tests' waits (:meth:`HubThread.watch`).
* :class:`TrioDriver` and :class:`AsyncioDriver` give the tests one vocabulary: devices that
  serve in the background, services, background tasks, waiting on a predicate that is
  checked again at each change a test can see (never a sleep, never a poll), and the core
  exception a failed call raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import socket
import ssl
import struct
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import trio
import trustme

import devstream_asyncio
import devstream_trio
from devstream_core.credentials import ConnectionString
from devstream_core.streamdriver import StreamOptions
from devstream_trio.client.device import DeviceClient as TrioDevice
from devstream_trio.client.service import ServiceClient as TrioService
from devstream_trio.server.hub import HubConfig, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore

from ._helpers import policy_cs
from ._relay import Pace

DEVICE_POOL = 64


class _Connection:
    """What the tap reads of one connection: its request head, whether it is a device's
    control channel (and whose), and that channel's WebSocket frames both ways."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        #: The device id of a control channel, once its request head is read.
        self.device: str | None = None
        #: The client's request head, once read.
        self.head = b""
        #: Set when the network under this connection goes silent: nothing more is passed on,
        #: either way (what comes is swallowed), and neither end hears of it.
        self.silent = False
        #: When set, the hub's bytes go on to the client (``to_client``), or the client's to
        #: the hub (``to_hub``), at this many bytes a second (a slow link): the tap reads them
        #: only as fast, so the writes of the end that sends them wait.
        self.rate: dict[str, float] = {}
        #: The client's socket, once the tap has it.
        self.client: trio.SocketStream | None = None
        self.to_hub = _Frames(self._request_head, self._from_device)
        self.to_device = _Frames(self._answer_head, self._from_hub)

    def _request_head(self, head: bytes) -> bool:
        self.head = head
        target = head.split(b" ", 2)[1].decode() if b" " in head else ""
        parts = target.split("/")
        if b"upgrade: websocket" in head.lower() and len(parts) == 4 and parts[1] == "devices":
            self.device = parts[2]
        return self.device is not None

    def _answer_head(self, head: bytes) -> bool:
        return self.device is not None

    def _from_device(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x9 and self.device is not None:
            self.tap.pings[self.device] += 1
            self.tap.changed()

    def _from_hub(self, opcode: int, payload: bytes) -> None:
        if opcode == 0x1 and self.device is not None:
            with contextlib.suppress(ValueError):
                if json.loads(payload).get("type") == "registered":
                    self.tap.registered[self.device] += 1
                    self.tap.changed()


class _Frames:
    """Reads one direction of a connection: the HTTP head (``on_head`` says whether to read
    on), then WebSocket frames, each given whole to ``on_frame(opcode, payload)`` (a masked
    payload is passed as it came: only the hub's, unmasked, are read)."""

    def __init__(
        self, on_head: Callable[[bytes], bool], on_frame: Callable[[int, bytes], None]
    ) -> None:
        self.on_head = on_head
        self.on_frame = on_frame
        self.head: bytes | None = b""
        self.buffer = b""
        self.done = False

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        if self.head is not None:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data, self.head = self.head[:end], self.head[end + 4 :], None
            if not self.on_head(head):
                self.done = True  # not a control channel: nothing to read
                return
        self.buffer += data
        while len(self.buffer) >= 2:
            first, second = self.buffer[0], self.buffer[1]
            length, at = second & 0x7F, 2
            if length >= 126:
                at = 4 if length == 126 else 10
                if len(self.buffer) < at:
                    return
                length = int.from_bytes(self.buffer[2:at], "big")
            at += 4 if second & 0x80 else 0
            if len(self.buffer) < at + length:
                return
            self.on_frame(first & 0x0F, self.buffer[at : at + length])
            self.buffer = self.buffer[at + length :]


class Tap:
    """A TCP relay on 127.0.0.1 in front of the hub: counts control-channel pings and the
    hub's confirmations of a device's registration, cuts every connection on demand, and
    calls ``changed`` (from the hub's thread) after each of those."""

    def __init__(self) -> None:
        self.target_port = 0
        self.port = 0
        self.pings: Counter[str] = Counter()
        self.registered: Counter[str] = Counter()
        self.cuts = 0
        self.changed: Callable[[], None] = lambda: None
        self._live: set[trio.CancelScope] = set()
        #: Each live connection: what is read of it, the hub's socket, and the scope of its
        #: direction towards the client.
        self._links: dict[_Connection, tuple[trio.SocketStream, trio.CancelScope]] = {}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._serve, listeners, task_status=task_status)

    async def _serve(self, client: trio.SocketStream) -> None:
        scope = trio.CancelScope()
        self._live.add(scope)
        try:
            with scope:
                hub = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                seen = _Connection(self)
                seen.client = client
                toward_client = trio.CancelScope()
                self._links[seen] = (hub, toward_client)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, hub, nursery, seen, seen.to_hub.feed)
                        nursery.start_soon(
                            self._pipe_within, toward_client, hub, client, nursery, seen
                        )
                finally:
                    del self._links[seen]
                    await trio.aclose_forcefully(hub)
        finally:
            self._live.discard(scope)
            await trio.aclose_forcefully(client)

    @staticmethod
    async def _pipe(
        source: trio.SocketStream,
        sink: trio.SocketStream,
        nursery: trio.Nursery,
        seen: _Connection,
        tap: Callable[[bytes], None],
        *,
        toward_client: bool = False,
    ) -> None:
        direction = "to_client" if toward_client else "to_hub"
        pace: Pace | None = None
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(2048 if direction in seen.rate else 256 * 1024):
                if seen.silent:
                    continue
                rate = seen.rate.get(direction)
                if rate is not None:
                    # No sooner than the slow link would have carried them, a little at a
                    # time: the bytes keep coming, with no pause a client would act on.
                    pace = pace or Pace(rate)
                    await pace.carry(len(data))
                tap(data)
                await sink.send_all(data)
        nursery.cancel_scope.cancel()

    async def _pipe_within(
        self,
        scope: trio.CancelScope,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        nursery: trio.Nursery,
        seen: _Connection,
    ) -> None:
        with scope:
            await self._pipe(source, sink, nursery, seen, seen.to_device.feed, toward_client=True)

    def cut_at_the_hub(self, match: Callable[[bytes], bool]) -> int:
        """Reset, at the hub's end only, every connection whose request head *match* takes,
        as a middlebox that resets the socket it was reading from: the hub
        sees the reset at once; the client hears nothing more, and its connection ends when
        it next sends something. Returns how many were cut."""
        cut = 0
        for seen, (hub, toward_client) in list(self._links.items()):
            if match(seen.head):
                toward_client.cancel()
                with contextlib.suppress(OSError):
                    hub.socket.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                hub.socket.close()
                cut += 1
        self.cuts += cut
        self.changed()
        return cut

    def silence(self, match: Callable[[bytes], bool]) -> int:
        """Make the network go silent under every connection whose request head *match*
        takes (a NAT that forgot it): nothing more passes either way, and no end hears of
        it. Returns how many."""
        silenced = 0
        for seen in list(self._links):
            if match(seen.head):
                seen.silent = True
                silenced += 1
        self.changed()
        return silenced

    def slow_down(self, match: Callable[[bytes], bool], rate: float, direction: str) -> int:
        """Carry the bytes of every connection whose request head *match* takes at *rate*
        bytes a second one way (*direction*: ``to_client``, the hub's; ``to_hub``, the
        client's), read from a socket with a small receive buffer (a slow link). Returns how
        many."""
        slowed = 0
        for seen, (hub, _) in list(self._links.items()):
            if match(seen.head):
                source = hub if direction == "to_client" else seen.client
                assert source is not None
                source.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                seen.rate[direction] = rate
                slowed += 1
        return slowed

    def cut(self) -> None:
        """Drop every connection through the tap (clients see them lost, as the hub does)."""
        self.cuts += 1
        for scope in list(self._live):
            scope.cancel()
        self.changed()


class HubThread:
    """A hub behind a tap, in a thread of its own; devices ``dev-0`` … registered. With
    *tls*, the hub speaks TLS with a certificate of a test CA that ``client_ssl`` trusts."""

    def __init__(
        self, *, config: HubConfig | None = None, tls: bool = False, devices: int = DEVICE_POOL
    ) -> None:
        self.config = config
        self.pool = devices
        self.server_ssl: ssl.SSLContext | None = None
        #: The context clients verify the hub with (None: plain TCP).
        self.client_ssl: ssl.SSLContext | None = None
        if tls:
            ca = trustme.CA()
            self.server_ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ca.issue_cert("127.0.0.1").configure_cert(self.server_ssl)
            self.client_ssl = ssl.create_default_context()
            ca.configure_trust(self.client_ssl)
        self.tap = Tap()
        self.service_cs: ConnectionString | None = None
        self.devices: list[ConnectionString] = []
        self.readme_device: ConnectionString | None = None
        self._ids = itertools.count()
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._service: TrioService | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)
        self._watchers: set[Callable[[], None]] = set()
        self._watchers_lock = threading.Lock()
        self.tap.changed = self._changed

    def start(self) -> HubThread:
        self._thread.start()
        self._ready.wait(30)
        if self._error is not None or self._token is None:
            raise RuntimeError("the hub did not start") from self._error
        return self

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported by start()
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        store = await RegistryStore.open(None)
        with trio.CancelScope() as self._scope:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.tap.run)
                owner, _ = await ensure_owner_policy(store)
                tls = self.server_ssl is not None
                public = f"{'https' if tls else 'http'}://127.0.0.1:{self.tap.port}"
                hub = await nursery.start(
                    partial(
                        serve_hub,
                        store,
                        host="127.0.0.1",
                        port=0,
                        public_url=public,
                        ssl_context=self.server_ssl,
                        config=self.config,
                    )
                )
                self.tap.target_port = hub.listen_address[1]
                cs = policy_cs(f"127.0.0.1:{self.tap.port}", owner)
                self.service_cs = dataclasses.replace(cs, use_tls=tls)
                service = self._service = TrioService(self.service_cs, ssl_context=self.client_ssl)
                for number in range(self.pool):
                    device = await service.create_device(f"dev-{number}")
                    self.devices.append(service.device_connection_string(device))
                readme = await service.create_device("my-device")  # the README's example
                self.readme_device = service.device_connection_string(readme)
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await trio.sleep_forever()

    def new_device(self) -> ConnectionString:
        """A registered device no other test has used."""
        return self.devices[next(self._ids)]

    def cut(self) -> None:
        """Cut every connection through the tap (from any thread; takes effect soon)."""
        assert self._token is not None
        self._token.run_sync_soon(self.tap.cut)

    def cut_at_the_hub(self, match: Callable[[bytes], bool]) -> None:
        """:meth:`Tap.cut_at_the_hub`, from any thread; takes effect soon."""
        assert self._token is not None
        self._token.run_sync_soon(self.tap.cut_at_the_hub, match)

    def silence(self, match: Callable[[bytes], bool]) -> int:
        """:meth:`Tap.silence`, from a thread with no event loop (``Driver.in_thread``)."""
        assert self._token is not None
        return trio.from_thread.run_sync(self.tap.silence, match, trio_token=self._token)

    def slow_down(self, match: Callable[[bytes], bool], rate: float, direction: str) -> int:
        """:meth:`Tap.slow_down`, from a thread with no event loop (``Driver.in_thread``)."""
        assert self._token is not None
        return trio.from_thread.run_sync(
            self.tap.slow_down, match, rate, direction, trio_token=self._token
        )

    def set_device_status(self, device_id: str, status: str) -> None:
        """Enable or disable a device (from a thread with no event loop: ``Driver.in_thread``;
        waits for the answer)."""
        assert self._token is not None and self._service is not None
        trio.from_thread.run(
            self._service.set_device_status, device_id, status, trio_token=self._token
        )

    def pings(self, device_id: str) -> int:
        """How many pings the device sent on its control channels."""
        return self.tap.pings[device_id]

    def registered(self, device_id: str) -> int:
        """How many times the hub confirmed the device's registration (it is online then)."""
        return self.tap.registered[device_id]

    def watch(self, wake: Callable[[], None]) -> Callable[[], None]:
        """Have *wake* called (from the hub's thread) whenever the tap counts something or
        cuts; return the call that stops it."""
        with self._watchers_lock:
            self._watchers.add(wake)

        def stop() -> None:
            with self._watchers_lock:
                self._watchers.discard(wake)

        return stop

    def _changed(self) -> None:
        with self._watchers_lock:
            watchers = list(self._watchers)
        for wake in watchers:
            wake()

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)


class Task:
    """A background task's end: ``done``, and its result or the exception it raised."""

    def __init__(self, notify: Callable[[], None]) -> None:
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None
        self._notify = notify

    async def run(self, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.result = await work()
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True
            self._notify()


class _Notifying:
    """A client's public attribute (``connections``, ``online``) that, when the client sets
    it, wakes the test's waits (``notify`` of the class :func:`observed` made)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"observed {name}"  # a key no attribute access reaches

    def __get__(self, client: Any, owner: type | None = None) -> Any:
        return self if client is None else client.__dict__[self.key]

    def __set__(self, client: Any, value: Any) -> None:
        client.__dict__[self.key] = value
        type(client).notify()


def observed(client_class: type, notify: Callable[[], None]) -> Any:
    """*client_class* (a device client) whose ``connections`` and ``online`` call *notify*
    when they change: a test waits for them without polling."""
    return type(
        f"Observed{client_class.__name__}",
        (client_class,),
        {"connections": _Notifying(), "online": _Notifying(), "notify": staticmethod(notify)},
    )


Body = Callable[["Driver"], Awaitable[None]]


class Driver:
    """What a conformance test may do, the same for every client driver.

    Nothing waits by sleeping: :meth:`wait_for` checks its predicate again at each change a
    test can see (the tap counting or cutting, in the hub's thread; a device client's
    ``connections`` or ``online`` changing; a background task ending; :meth:`notify`). Its
    *timeout* is real time, only a bound on failure: the hub runs in a thread with its own
    event loop and real sockets, so no virtual clock spans both sides.
    """

    name = ""

    def __init__(self, hub: HubThread) -> None:
        self.hub = hub

    # -- waiting ----------------------------------------------------------------------------

    def notify(self) -> None:
        """Wake every :meth:`wait_for` (call from the test's own event loop)."""
        raise NotImplementedError

    def notify_threadsafe(self) -> None:
        """:meth:`notify`, from any thread."""
        raise NotImplementedError

    async def changed(self) -> None:
        """Return at the next :meth:`notify`."""
        raise NotImplementedError

    def event(self) -> Any:
        """An event with ``set()`` and ``await wait()``."""
        raise NotImplementedError

    def time_limit(self, seconds: float) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        """Return once *predicate* holds; fail after *timeout* seconds."""
        try:
            async with self.time_limit(timeout):
                while not predicate():
                    await self.changed()
        except (TimeoutError, trio.TooSlowError):
            raise AssertionError(f"still false after {timeout} s") from None

    def start(self, work: Callable[[], Awaitable[Any]]) -> Task:
        raise NotImplementedError

    async def in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        """``work(*args)`` in a worker thread (a blocking call, such as one into the hub's)."""
        raise NotImplementedError

    # -- clients ------------------------------------------------------------------------

    def device(
        self, cs: ConnectionString, handlers: Mapping[str, Any], **options: Any
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        """A device serving *handlers* in the background, online when the block starts."""
        raise NotImplementedError

    async def serve_error(self, cs: ConnectionString, handlers: Mapping[str, Any]) -> Exception:
        """What ``serve`` raised (it must end, within 5 s)."""
        raise NotImplementedError

    def client(self, cs: ConnectionString, **options: Any) -> Any:
        """A device client with *options*, not serving yet (``serve(handlers)``, ``online``)."""
        raise NotImplementedError

    def service(
        self,
        cs: ConnectionString | None = None,
        window: int | None = None,
        ping_timeout: float | None = None,
    ) -> contextlib.AbstractAsyncContextManager[Any]:
        raise NotImplementedError

    @staticmethod
    def core_error(exc: BaseException) -> BaseException:
        """The core's exception behind what a call raised."""
        return exc

    async def error_of(self, work: Awaitable[Any]) -> BaseException:
        """The (core) exception *work* raises; fails if it returns."""
        try:
            await work
        except Exception as exc:
            return self.core_error(exc)
        raise AssertionError("no exception raised")


@asynccontextmanager
async def _async_of(scope: contextlib.AbstractContextManager[Any]) -> AsyncIterator[None]:
    with scope:
        yield


def _options(window: int | None, ping_timeout: float | None = None) -> StreamOptions | None:
    if window is None and ping_timeout is None:
        return None
    options = StreamOptions() if window is None else StreamOptions(window=window)
    if ping_timeout is not None:
        options = dataclasses.replace(options, ping_timeout=ping_timeout)
    return options


class TrioDriver(Driver):
    name = "trio"
    nursery: trio.Nursery

    def run(self, body: Body, timeout: float) -> None:
        async def main() -> None:
            self._waiting = trio.lowlevel.ParkingLot()
            self._token = trio.lowlevel.current_trio_token()
            stop = self.hub.watch(self.notify_threadsafe)
            try:
                with trio.fail_after(timeout):
                    async with trio.open_nursery() as self.nursery:
                        await body(self)
                        self.nursery.cancel_scope.cancel()
            finally:
                stop()

        trio.run(main)

    def notify(self) -> None:
        self._waiting.unpark_all()

    def notify_threadsafe(self) -> None:
        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(self.notify)

    async def changed(self) -> None:
        await self._waiting.park()

    def time_limit(self, seconds: float) -> contextlib.AbstractAsyncContextManager[Any]:
        return _async_of(trio.fail_after(seconds))

    def event(self) -> Any:
        return trio.Event()

    async def in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(work, *args)

    def start(self, work: Callable[[], Awaitable[Any]]) -> Task:
        task = Task(self.notify)
        self.nursery.start_soon(task.run, work)
        return task

    @asynccontextmanager
    async def device(
        self, cs: ConnectionString, handlers: Mapping[str, Any], **options: Any
    ) -> AsyncIterator[Any]:
        client = observed(TrioDevice, self.notify)(cs, ssl_context=self.hub.client_ssl, **options)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.serve, handlers)
            yield client
            nursery.cancel_scope.cancel()

    def client(self, cs: ConnectionString, **options: Any) -> Any:
        return observed(TrioDevice, self.notify)(cs, ssl_context=self.hub.client_ssl, **options)

    async def serve_error(self, cs: ConnectionString, handlers: Mapping[str, Any]) -> Exception:
        with trio.fail_after(5):
            try:
                await TrioDevice(cs, ssl_context=self.hub.client_ssl).serve(handlers)
            except Exception as exc:
                return exc
        raise AssertionError("serve returned")

    @asynccontextmanager
    async def service(
        self,
        cs: ConnectionString | None = None,
        window: int | None = None,
        ping_timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        async with devstream_trio.open_service(
            cs or self.hub.service_cs,
            stream_options=_options(window, ping_timeout),
            ssl_context=self.hub.client_ssl,
        ) as service:
            yield service

    @staticmethod
    def core_error(exc: BaseException) -> BaseException:
        if isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
            return exc.__cause__
        return exc


class AsyncioDriver(Driver):
    name = "asyncio"

    def run(self, body: Body, timeout: float) -> None:
        async def main() -> None:
            self._tasks: set[asyncio.Task[None]] = set()
            self._waiting = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            stop = self.hub.watch(self.notify_threadsafe)
            try:
                async with asyncio.timeout(timeout):
                    await body(self)
            finally:
                stop()
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run(main())

    def notify(self) -> None:
        self._waiting.set()
        self._waiting = asyncio.Event()

    def notify_threadsafe(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop has closed
            self._loop.call_soon_threadsafe(self.notify)

    async def changed(self) -> None:
        await self._waiting.wait()

    def time_limit(self, seconds: float) -> contextlib.AbstractAsyncContextManager[Any]:
        return asyncio.timeout(seconds)

    def event(self) -> Any:
        return asyncio.Event()

    async def in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(work, *args)

    def start(self, work: Callable[[], Awaitable[Any]]) -> Task:
        task = Task(self.notify)
        self._tasks.add(asyncio.ensure_future(task.run(work)))
        return task

    @asynccontextmanager
    async def device(
        self, cs: ConnectionString, handlers: Mapping[str, Any], **options: Any
    ) -> AsyncIterator[Any]:
        client = observed(devstream_asyncio.DeviceClient, self.notify)(
            cs, ssl_context=self.hub.client_ssl, **options
        )
        serving = asyncio.ensure_future(client.serve(handlers))
        online = asyncio.ensure_future(client.wait_online())
        try:
            await asyncio.wait({serving, online}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done():
                serving.result()  # raises what serve raised
            yield client
        finally:
            online.cancel()
            serving.cancel()
            await asyncio.gather(serving, online, return_exceptions=True)

    def client(self, cs: ConnectionString, **options: Any) -> Any:
        return observed(devstream_asyncio.DeviceClient, self.notify)(
            cs, ssl_context=self.hub.client_ssl, **options
        )

    async def serve_error(self, cs: ConnectionString, handlers: Mapping[str, Any]) -> Exception:
        try:
            client = devstream_asyncio.DeviceClient(cs, ssl_context=self.hub.client_ssl)
            async with asyncio.timeout(5):
                await client.serve(handlers)
        except Exception as exc:
            return exc
        raise AssertionError("serve returned")

    @asynccontextmanager
    async def service(
        self,
        cs: ConnectionString | None = None,
        window: int | None = None,
        ping_timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        async with devstream_asyncio.open_service(
            cs or self.hub.service_cs,
            stream_options=_options(window, ping_timeout),
            ssl_context=self.hub.client_ssl,
        ) as service:
            yield service


DRIVERS: dict[str, type[TrioDriver] | type[AsyncioDriver]] = {
    "trio": TrioDriver,
    "asyncio": AsyncioDriver,
}
