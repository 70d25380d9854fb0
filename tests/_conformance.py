"""What the client conformance suite runs on: a real trio hub in a thread, a tap in front of it,
and one small facade per client driver (trio, asyncio) that the tests are written against.

* :class:`HubThread` runs ``serve_hub`` (in-memory registry) with its own ``trio.run`` in a
  background thread, on 127.0.0.1 port 0, behind a :class:`Tap`: every client connects to
  the tap (the hub's public URL names it, so stream URLs do too). A pool of devices is
  registered at start, so a test never has to reach into the hub's thread to create one.
* :class:`Tap` relays TCP to the hub, counts the WebSocket pings each device sends on its
  control channel (frames are read client to hub, after an upgrade request's head), and cuts
  every connection through it on :meth:`HubThread.cut`.
* :class:`TrioDriver` and :class:`AsyncioDriver` give the tests one vocabulary: devices that
  serve in the background, services, background tasks, waiting on a predicate with a
  timeout (never a fixed sleep), and the core exception a failed call raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
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

DEVICE_POOL = 48


class _PingCounter:
    """Reads one client-to-hub byte stream: the request head, then WebSocket frames."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap
        self.head = b""
        self.key: str | None = None  # the device id of a control channel, once known
        self.frames = False
        self.buffer = b""
        self.skip = 0

    def feed(self, data: bytes) -> None:
        if not self.frames:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            head, data = self.head[:end], self.head[end + 4 :]
            target = head.split(b" ", 2)[1].decode() if b" " in head else ""
            if b"upgrade: websocket" not in head.lower():
                self.frames, self.skip = True, 1 << 62  # not a WebSocket: count nothing
                return
            parts = target.split("/")
            if len(parts) == 4 and parts[1] == "devices" and parts[3] == "streams":
                self.key = parts[2]
            self.frames = True
        self.buffer += data
        while True:
            if self.skip:
                taken = min(self.skip, len(self.buffer))
                self.skip -= taken
                self.buffer = self.buffer[taken:]
                if self.skip:
                    return
            if len(self.buffer) < 2:
                return
            first, second = self.buffer[0], self.buffer[1]
            length, at = second & 0x7F, 2
            if length == 126:
                if len(self.buffer) < 4:
                    return
                length, at = struct.unpack("!H", self.buffer[2:4])[0], 4
            elif length == 127:
                if len(self.buffer) < 10:
                    return
                length, at = struct.unpack("!Q", self.buffer[2:10])[0], 10
            at += 4 if second & 0x80 else 0
            if len(self.buffer) < at:
                return
            if first & 0x0F == 0x9 and self.key is not None:
                self.tap.pings[self.key] += 1
            self.buffer = self.buffer[at:]
            self.skip = length


class Tap:
    """A TCP relay on 127.0.0.1 in front of the hub: counts control-channel pings, cuts."""

    def __init__(self) -> None:
        self.target_port = 0
        self.port = 0
        self.pings: Counter[str] = Counter()
        self.cuts = 0
        self._live: set[trio.CancelScope] = set()

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
                try:
                    async with trio.open_nursery() as nursery:
                        counter = _PingCounter(self)
                        nursery.start_soon(self._pipe, client, hub, nursery, counter.feed)
                        nursery.start_soon(self._pipe, hub, client, nursery, None)
                finally:
                    await trio.aclose_forcefully(hub)
        finally:
            self._live.discard(scope)
            await trio.aclose_forcefully(client)

    @staticmethod
    async def _pipe(
        source: trio.SocketStream,
        sink: trio.SocketStream,
        nursery: trio.Nursery,
        tap: Callable[[bytes], None] | None,
    ) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await source.receive_some(256 * 1024):
                if tap is not None:
                    tap(data)
                await sink.send_all(data)
        nursery.cancel_scope.cancel()

    def cut(self) -> None:
        """Drop every connection through the tap (clients see them lost, as the hub does)."""
        self.cuts += 1
        for scope in list(self._live):
            scope.cancel()


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

    def set_device_status(self, device_id: str, status: str) -> None:
        """Enable or disable a device (from a thread with no event loop: ``Driver.in_thread``;
        waits for the answer)."""
        assert self._token is not None and self._service is not None
        trio.from_thread.run(
            self._service.set_device_status, device_id, status, trio_token=self._token
        )

    def pings(self, device_id: str) -> int:
        return self.tap.pings[device_id]

    def stop(self) -> None:
        if self._token is not None and self._scope is not None:
            self._token.run_sync_soon(self._scope.cancel)
        self._thread.join(10)


class Task:
    """A background task's end: ``done``, and its result or the exception it raised."""

    def __init__(self) -> None:
        self.done = False
        self.result: Any = None
        self.error: Exception | None = None

    async def run(self, work: Callable[[], Awaitable[Any]]) -> None:
        try:
            self.result = await work()
        except Exception as exc:
            self.error = exc
        finally:
            self.done = True


Body = Callable[["Driver"], Awaitable[None]]


class Driver:
    """What a conformance test may do, the same for every client driver."""

    name = ""

    def __init__(self, hub: HubThread) -> None:
        self.hub = hub

    # -- time ---------------------------------------------------------------------------

    async def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def event(self) -> Any:
        """An event with ``set()`` and ``await wait()``."""
        raise NotImplementedError

    async def wait_for(self, predicate: Callable[[], object], timeout: float = 5.0) -> None:
        """Return once *predicate* holds; fail after *timeout* seconds."""
        for _ in range(int(timeout / 0.005)):
            if predicate():
                return
            await self.sleep(0.005)
        assert predicate(), f"still false after {timeout} s"

    async def wait_quiet(self, value: Callable[[], int], quiet: float, timeout: float = 5.0) -> int:
        """The value once it has not changed for *quiet* seconds."""
        last, still = value(), 0
        for _ in range(int(timeout / 0.01)):
            await self.sleep(0.01)
            now = value()
            still = still + 1 if now == last else 0
            last = now
            if still * 0.01 >= quiet:
                return now
        raise AssertionError(f"still changing after {timeout} s")

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
        self, cs: ConnectionString | None = None, window: int | None = None
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


def _options(window: int | None) -> StreamOptions | None:
    return None if window is None else StreamOptions(window=window)


class TrioDriver(Driver):
    name = "trio"
    nursery: trio.Nursery

    def run(self, body: Body, timeout: float) -> None:
        async def main() -> None:
            with trio.fail_after(timeout):
                async with trio.open_nursery() as self.nursery:
                    await body(self)
                    self.nursery.cancel_scope.cancel()

        trio.run(main)

    async def sleep(self, seconds: float) -> None:
        await trio.sleep(seconds)

    def event(self) -> Any:
        return trio.Event()

    async def in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(work, *args)

    def start(self, work: Callable[[], Awaitable[Any]]) -> Task:
        task = Task()
        self.nursery.start_soon(task.run, work)
        return task

    @asynccontextmanager
    async def device(
        self, cs: ConnectionString, handlers: Mapping[str, Any], **options: Any
    ) -> AsyncIterator[Any]:
        client = TrioDevice(cs, ssl_context=self.hub.client_ssl, **options)
        async with trio.open_nursery() as nursery:
            await nursery.start(client.serve, handlers)
            yield client
            nursery.cancel_scope.cancel()

    def client(self, cs: ConnectionString, **options: Any) -> Any:
        return TrioDevice(cs, ssl_context=self.hub.client_ssl, **options)

    async def serve_error(self, cs: ConnectionString, handlers: Mapping[str, Any]) -> Exception:
        with trio.fail_after(5):
            try:
                await TrioDevice(cs, ssl_context=self.hub.client_ssl).serve(handlers)
            except Exception as exc:
                return exc
        raise AssertionError("serve returned")

    @asynccontextmanager
    async def service(
        self, cs: ConnectionString | None = None, window: int | None = None
    ) -> AsyncIterator[Any]:
        async with devstream_trio.open_service(
            cs or self.hub.service_cs,
            stream_options=_options(window),
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
            try:
                async with asyncio.timeout(timeout):
                    await body(self)
            finally:
                for task in self._tasks:
                    task.cancel()
                await asyncio.gather(*self._tasks, return_exceptions=True)

        asyncio.run(main())

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def event(self) -> Any:
        return asyncio.Event()

    async def in_thread(self, work: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(work, *args)

    def start(self, work: Callable[[], Awaitable[Any]]) -> Task:
        task = Task()
        self._tasks.add(asyncio.ensure_future(task.run(work)))
        return task

    @asynccontextmanager
    async def device(
        self, cs: ConnectionString, handlers: Mapping[str, Any], **options: Any
    ) -> AsyncIterator[Any]:
        async with devstream_asyncio.open_device(
            cs, ssl_context=self.hub.client_ssl, **options
        ) as client:
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
        return devstream_asyncio.DeviceClient(cs, ssl_context=self.hub.client_ssl, **options)

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
        self, cs: ConnectionString | None = None, window: int | None = None
    ) -> AsyncIterator[Any]:
        async with devstream_asyncio.open_service(
            cs or self.hub.service_cs,
            stream_options=_options(window),
            ssl_context=self.hub.client_ssl,
        ) as service:
            yield service


DRIVERS: dict[str, type[TrioDriver] | type[AsyncioDriver]] = {
    "trio": TrioDriver,
    "asyncio": AsyncioDriver,
}
