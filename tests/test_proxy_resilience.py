"""The local proxies ride out trouble at the hub: a hub restart, and WebSockets cut mid-stream.

A hub, a device running ``serve_device_proxy`` and a service running ``serve_service_proxy``
run in the test's event loop over real loopback sockets, with plain TCP programs (small trio
servers and clients) at both ends:

* the hub stops and a new one starts on the same port and SQLite file: while it is down the
  service proxy closes new connections at once and keeps listening; once the device is back
  online the same proxies carry a new connection again;
* a TCP relay in front of the hub cuts every WebSocket of one side (service or device) several
  times during a large transfer each way; the devstream.v1 streams resume and the TCP programs
  at the ends see neither a reset nor an early EOF;
* a relay in front of each side resets a connection (TCP RST) every time it has carried
  another MiB, at independent points: a 32 MiB transfer and the answer after its EOF arrive
  intact, in a few seconds; also when the relays reset only the socket they read the cut
  byte from, so that the other end of the connection hears nothing more; and 16 MiB each
  way at once, with both windows full, through the same relays.

Test rules: loopback only; port 0 everywhere except the restarted hub, which needs the same
port twice (a just-released one); every test body runs under ``trio.fail_after`` and waits on
events (bytes arriving, a resume counted, a log record of the device), never on time.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from devstream_core.errors import ErrorCode
from devstream_core.framing import DEFAULT_WINDOW
from devstream_core.registry import Policy
from devstream_trio.client.device import DeviceClient, Handler
from devstream_trio.client.framed import FramedStream, StreamOptions
from devstream_trio.client.proxy import Forward, Target, serve_device_proxy, serve_service_proxy
from devstream_trio.client.service import AnyStream, ServiceClient
from devstream_trio.server.hub import Hub, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore

from ._helpers import closed_promptly, free_port, policy_cs, start_tcp_server
from ._relay import CuttingRelay, Relay

MIB = 1024 * 1024
DEVICE_ID = "resilient-device"
NAME = "sink"
#: How long a refused connection may stay open before the client sees it closed.
PROMPT = 5


# -- helpers ----------------------------------------------------------------------------------


@asynccontextmanager
async def running_hub(path: Path | None, port: int = 0) -> AsyncIterator[tuple[Hub, Policy]]:
    """A hub on 127.0.0.1:*port* with its registry at *path* (None: in memory), for the block.

    Leaving the block stops the hub (every connection to it is closed) and closes the store.
    """
    async with await RegistryStore.open(path) as store:
        owner, _ = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            hub: Hub = await nursery.start(partial(serve_hub, store, host="127.0.0.1", port=port))
            yield hub, owner
            nursery.cancel_scope.cancel()


@dataclass
class Received:
    """What one end of a TCP connection read, and how the connection ended."""

    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0
    #: "eof", or "reset" when reading raised (a reset, or the connection closed under it).
    end: str = ""


async def send_then_eof(tcp: trio.SocketStream, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(data), MIB):
        await tcp.send_all(view[start : start + MIB])
    await tcp.send_eof()


async def receive_to_end(
    tcp: trio.SocketStream, into: Received, on_chunk: Callable[[], None] = lambda: None
) -> None:
    try:
        while chunk := await tcp.receive_some(65536):
            into.digest.update(chunk)
            into.size += len(chunk)
            on_chunk()
    except trio.BrokenResourceError:
        into.end = "reset"
        return
    into.end = "eof"


async def exchange(tcp: trio.SocketStream, data: bytes, into: Received) -> None:
    """Send *data* then EOF while reading everything the other end sends; then close."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(send_then_eof, tcp, data)
        nursery.start_soon(receive_to_end, tcp, into)
    await tcp.aclose()


class DeviceLog(logging.Handler):
    """Wakes the test when the device logs that it came online or lost its control channel.

    The device has no event for either; its log records are what a user watches, and the test
    checks the device's public attributes once woken.
    """

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.online = trio.Event()
        self.lost = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.name != "devstream.device":
            return
        message = record.getMessage()
        if " online, serving " in message:
            self.online.set()
        elif "reconnecting" in message:
            self.lost.set()


@asynccontextmanager
async def watching_device() -> AsyncIterator[DeviceLog]:
    logger = logging.getLogger("devstream.device")
    handler = DeviceLog()
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


class RecordingService(ServiceClient):
    """A service client that keeps every stream it opens, so the test can count resumes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list[AnyStream] = []

    async def open_stream(self, device_id: str, name: str, **kwargs: Any) -> AnyStream:
        stream = await super().open_stream(device_id, name, **kwargs)
        self.streams.append(stream)
        return stream


class RecordingDevice(DeviceClient):
    """A device client that keeps every stream it hands to a handler."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.streams: list[AnyStream] = []

    async def serve(
        self,
        handlers: Mapping[str, Handler],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        def recording(handler: Handler) -> Handler:
            async def handle(stream: AnyStream) -> None:
                self.streams.append(stream)
                await handler(stream)

            return handle

        wrapped = {name: recording(handler) for name, handler in handlers.items()}
        await super().serve(wrapped, task_status=task_status)


async def start_device_proxy(nursery: trio.Nursery, device: DeviceClient, sink_port: int) -> None:
    target = Target(name=NAME, host="127.0.0.1", port=sink_port)
    await nursery.start(partial(serve_device_proxy, device, [target]))


async def start_service_proxy(nursery: trio.Nursery, service: ServiceClient) -> int:
    forward = Forward(bind="127.0.0.1", port=0, name=NAME)
    bound: list[tuple[str, int]] = await nursery.start(
        partial(serve_service_proxy, service, DEVICE_ID, [forward])
    )
    ((host, port),) = bound
    assert host == "127.0.0.1" and port != 0
    return port


# -- a hub restart ----------------------------------------------------------------------------


async def digest_reply_sink(tcp: trio.SocketStream) -> None:
    """Read to EOF, answer with the SHA-256 of what arrived, close."""
    digest = hashlib.sha256()
    async for chunk in tcp:
        digest.update(chunk)
    await tcp.send_all(digest.digest())
    await tcp.aclose()


async def transfer(port: int, size: int) -> None:
    """Send *size* random bytes through the proxy at *port*; the sink's digest must match."""
    payload = os.urandom(size)
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    reply = bytearray()
    await tcp.send_all(payload)
    await tcp.send_eof()
    async for chunk in tcp:
        reply += chunk
    await tcp.aclose()
    assert bytes(reply) == hashlib.sha256(payload).digest()


async def test_the_proxies_carry_on_after_the_hub_restarts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="devstream.proxy")
    registry = tmp_path / "registry.sqlite3"
    hub_port = free_port()
    service_proxy_ended = trio.Event()
    with trio.fail_after(20):
        async with watching_device() as device_log, trio.open_nursery() as nursery:
            sink_port = await start_tcp_server(nursery, digest_reply_sink)

            async with running_hub(registry, hub_port) as (hub, owner):
                assert hub.listen_address == ("127.0.0.1", hub_port)
                service = ServiceClient(policy_cs(hub.host_name, owner), nursery=nursery)
                device_cs = service.device_connection_string(await service.create_device(DEVICE_ID))
                device = DeviceClient(device_cs, backoff_min=0.05, backoff_max=0.5)
                await start_device_proxy(nursery, device, sink_port)
                assert device.online and device.connections == 1

                async def service_proxy(
                    task_status: trio.TaskStatus[list[tuple[str, int]]],
                ) -> None:
                    try:
                        forward = Forward(bind="127.0.0.1", port=0, name=NAME)
                        await serve_service_proxy(
                            service, DEVICE_ID, [forward], task_status=task_status
                        )
                    finally:
                        service_proxy_ended.set()

                ((_, proxy_port),) = await nursery.start(service_proxy)
                await transfer(proxy_port, 3 * MIB)
                device_log.online = trio.Event()

            # The hub is gone: the device notices, and the service proxy turns connections away.
            await device_log.lost.wait()
            assert not device.online
            for _ in range(2):
                assert await closed_promptly(proxy_port, PROMPT) == b""
            refusals = [
                r.getMessage()
                for r in caplog.records
                if r.name == "devstream.proxy"
                and "cannot reach the hub" in r.getMessage()
                and f"(error {int(ErrorCode.HUB_UNREACHABLE)})" in r.getMessage()
            ]
            assert len(refusals) == 2, refusals
            assert not service_proxy_ended.is_set()

            # A new hub on the same port and registry file: same owner key, same device.
            async with running_hub(registry, hub_port) as (hub2, owner2):
                assert owner2 == owner
                await device_log.online.wait()
                assert device.online and device.connections == 2
                await transfer(proxy_port, 3 * MIB)
                # Once more: the proxies' listener and the device keep serving.
                await transfer(proxy_port, 1 * MIB)
                assert hub2.metrics.streams_total == 2
                assert not service_proxy_ended.is_set()
                nursery.cancel_scope.cancel()


# -- WebSockets cut during a proxied transfer -------------------------------------------------


@pytest.mark.parametrize("cut_side", ["service", "device"])
async def test_a_proxied_transfer_survives_cut_websockets(cut_side: str) -> None:
    """32 MiB up and 16 MiB back through both proxies while one side's WebSockets are cut."""
    up_size, down_size = 32 * MIB, 16 * MIB
    step = 4 * MIB
    # Cut only while more than a window is still to come, so every cut has to be resumed.
    last_cut = up_size - DEFAULT_WINDOW - step
    up = os.urandom(up_size)
    down = os.urandom(down_size)
    at_client, at_sink = Received(), Received()
    sink_done = trio.Event()
    with trio.fail_after(30):
        async with (
            watching_device() as device_log,
            running_hub(None) as (hub, owner),
            trio.open_nursery() as nursery,
        ):
            assert hub.listen_address is not None
            relay = Relay(hub.listen_address[1])
            await nursery.start(relay.run)
            cs = policy_cs(hub.host_name, owner)
            admin = ServiceClient(cs)
            device_cs = admin.device_connection_string(await admin.create_device(DEVICE_ID))
            service = RecordingService(
                cs, nursery=nursery, opener=relay.open if cut_side == "service" else None
            )
            device = RecordingDevice(
                device_cs,
                backoff_min=0.05,
                backoff_max=0.5,
                opener=relay.open if cut_side == "device" else None,
            )
            cut_streams = service.streams if cut_side == "service" else device.streams
            next_cut = step

            def maybe_cut() -> None:
                # Cut once the previous cut was resumed by the side whose WebSockets are cut.
                nonlocal next_cut
                if not cut_streams or not next_cut <= at_sink.size < last_cut:
                    return
                (stream,) = cut_streams
                assert isinstance(stream, FramedStream)
                if stream.resumes == relay.cuts:
                    next_cut = at_sink.size + step
                    assert relay.cut() >= 1

            async def sink(tcp: trio.SocketStream) -> None:
                if sink_done.is_set():  # the connection after the big one
                    await digest_reply_sink(tcp)
                    return
                async with trio.open_nursery() as both:
                    both.start_soon(send_then_eof, tcp, down)
                    both.start_soon(receive_to_end, tcp, at_sink, maybe_cut)
                await tcp.aclose()
                sink_done.set()

            sink_port = await start_tcp_server(nursery, sink)
            await start_device_proxy(nursery, device, sink_port)
            proxy_port = await start_service_proxy(nursery, service)

            client = await trio.open_tcp_stream("127.0.0.1", proxy_port)
            await exchange(client, up, at_client)
            await sink_done.wait()

            assert (at_sink.end, at_sink.size) == ("eof", up_size)
            assert at_sink.digest.digest() == hashlib.sha256(up).digest()
            assert (at_client.end, at_client.size) == ("eof", down_size)
            assert at_client.digest.digest() == hashlib.sha256(down).digest()

            (service_stream,) = service.streams
            (device_stream,) = device.streams
            assert isinstance(service_stream, FramedStream)
            assert isinstance(device_stream, FramedStream)
            cut_stream, other_stream = (
                (service_stream, device_stream)
                if cut_side == "service"
                else (device_stream, service_stream)
            )
            assert relay.cuts >= 4
            assert cut_stream.resumes == relay.cuts
            assert other_stream.resumes == 0
            assert hub.metrics.resumes_total == relay.cuts

            # The same proxies carry the next connection (once the device's control channel,
            # cut along with its streams on the device side, is back).
            while not device.online:
                device_log.online = trio.Event()
                await device_log.online.wait()
            await transfer(proxy_port, MIB)
            assert len(service.streams) == len(device.streams) == 2
            nursery.cancel_scope.cancel()


# -- connections reset every MiB on both sides -------------------------------------------------


@dataclass
class CutProxies:
    """Both proxies, each of their clients behind a relay that resets a connection every MiB."""

    port: int
    service: RecordingService
    device: RecordingDevice
    relays: tuple[CuttingRelay, CuttingRelay]

    def streams(self) -> tuple[FramedStream, FramedStream]:
        (service_stream,) = self.service.streams
        (device_stream,) = self.device.streams
        assert isinstance(service_stream, FramedStream)
        assert isinstance(device_stream, FramedStream)
        return service_stream, device_stream


@asynccontextmanager
async def proxies_cut_every_mebibyte(
    sink: Callable[[trio.SocketStream], Any], *, one_sided: bool
) -> AsyncIterator[CutProxies]:
    """A hub, the two proxies and *sink* behind the device proxy; a relay in front of each
    client resets a connection every time it has carried another MiB, at independent points.

    The clients ping only every 1000 s, so a side that waited for its ping would never finish
    within a test's limit."""
    options = StreamOptions(ping_interval=1000, ping_timeout=1000)
    async with running_hub(None) as (hub, owner), trio.open_nursery() as nursery:
        assert hub.listen_address is not None
        hub_port = hub.listen_address[1]
        service_relay = CuttingRelay(hub_port, every=MIB, first=MIB // 2, one_sided=one_sided)
        device_relay = CuttingRelay(hub_port, every=MIB, first=MIB, one_sided=one_sided)
        for relay in (service_relay, device_relay):
            await nursery.start(relay.run)
        cs = policy_cs(hub.host_name, owner)
        admin = ServiceClient(cs)
        device_cs = admin.device_connection_string(await admin.create_device(DEVICE_ID))
        service = RecordingService(
            cs, nursery=nursery, opener=service_relay.open, stream_options=options
        )
        device = RecordingDevice(
            device_cs,
            backoff_min=0.05,
            backoff_max=0.5,
            opener=device_relay.open,
            stream_options=options,
        )
        sink_port = await start_tcp_server(nursery, sink)
        await start_device_proxy(nursery, device, sink_port)
        proxy_port = await start_service_proxy(nursery, service)
        yield CutProxies(proxy_port, service, device, (service_relay, device_relay))
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("one_sided", [False, True], ids=["both_ends", "one_end"])
async def test_a_proxied_transfer_survives_a_reset_every_mebibyte_on_both_sides(
    one_sided: bool,
) -> None:
    """32 MiB through both proxies while a relay in front of each side resets (RST) a
    connection every time it has carried another MiB, the two relays at independent points.
    The sink answers the SHA-256 of what it read after the EOF; the client reads it. Each
    resume is quick, so the whole run takes a few seconds (the limit below is a safety net).

    *one_sided*: each relay resets only the socket it read the cut byte from (the hub's end,
    for the device reading the bulk): the hub holds the stream at once, and the client's end
    stays open and silent until the client sends something. The message cut off half-way
    makes it ping at once (FramedStream's STALL_PROBE)."""
    size = 32 * MIB
    with trio.fail_after(30):
        async with proxies_cut_every_mebibyte(digest_reply_sink, one_sided=one_sided) as cut:
            await transfer(cut.port, size)

            service_relay, device_relay = cut.relays
            assert service_relay.cuts >= 32 and device_relay.cuts >= 32
            service_stream, device_stream = cut.streams()
            assert service_stream.resumes >= 16 and device_stream.resumes >= 16


@pytest.mark.parametrize("one_sided", [False, True], ids=["both_ends", "one_end"])
async def test_a_proxied_exchange_both_ways_survives_a_reset_every_mebibyte_on_both_sides(
    one_sided: bool,
) -> None:
    """16 MiB each way at once, both windows full, through the same cutting relays: every
    connection carries both directions' resent messages, and both still get through intact.
    """
    size = 16 * MIB
    up, down = os.urandom(size), os.urandom(size)
    at_client, at_sink = Received(), Received()
    sink_done = trio.Event()

    async def sink(tcp: trio.SocketStream) -> None:
        await exchange(tcp, down, at_sink)
        sink_done.set()

    with trio.fail_after(30):
        async with proxies_cut_every_mebibyte(sink, one_sided=one_sided) as cut:
            client = await trio.open_tcp_stream("127.0.0.1", cut.port)
            await exchange(client, up, at_client)
            await sink_done.wait()

            assert (at_sink.end, at_sink.size) == ("eof", size)
            assert at_sink.digest.digest() == hashlib.sha256(up).digest()
            assert (at_client.end, at_client.size) == ("eof", size)
            assert at_client.digest.digest() == hashlib.sha256(down).digest()
            service_relay, device_relay = cut.relays
            # Both directions pass through both relays: 32 MiB each at the least.
            assert service_relay.cuts >= 32 and device_relay.cuts >= 32
            service_stream, device_stream = cut.streams()
            assert service_stream.resumes >= 16 and device_stream.resumes >= 16
