"""devstream.v1 streams over real loopback sockets: resume through a cut relay, bounded memory.

Test rules: loopback only (127.0.0.1), port 0 everywhere; real sockets run on the real clock,
so every test body runs under ``trio.fail_after`` and waits on events (bytes arriving, a resume
counted), never on time. The one bounded wait (``trio.move_on_after``) lets a writer fill every
buffer it can reach; the test asserts on what it found, not on how long it took.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from devstream_core.common import Role
from devstream_core.framing import DEFAULT_WINDOW, EndpointState
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream, StreamOptions
from devstream_trio.client.service import AnyStream, ServiceClient
from devstream_trio.server.hub import Hub
from devstream_trio.server.store import RegistryStore
from devstream_trio.server.streaming import HUB_PONG_INTERVAL, MAX_FRAMED_MESSAGE
from devstream_trio.transport.connect import HubAddress, Opener

from ._helpers import start_hub
from ._relay import Relay

TIMEOUT = 120
MIB = 1024 * 1024


@dataclass
class Pair:
    """Both sides of one devstream.v1 stream, the hub, and the relay if there is one."""

    service: FramedStream
    device: FramedStream
    hub: Hub
    relay: Relay | None


@pytest.fixture
async def store() -> AsyncIterator[RegistryStore]:
    async with await RegistryStore.open(None) as s:
        yield s


async def open_pair(
    nursery: trio.Nursery,
    store: RegistryStore,
    *,
    relay_side: str | None = None,
    options: StreamOptions | None = None,
    relay: Relay | None = None,
    service_opener: Opener | None = None,
) -> Pair:
    """A stream over a real hub; *relay_side*'s connections go through a :class:`Relay`
    (*relay*, or a new one)."""
    hub, service_cs = await start_hub(nursery, store)
    assert hub.listen_address is not None
    if relay is not None:
        relay.target_port = hub.listen_address[1]
        await nursery.start(relay.run)
    elif relay_side is not None:
        relay = Relay(hub.listen_address[1])
        await nursery.start(relay.run)
    admin = ServiceClient(service_cs)
    device_cs = admin.device_connection_string(await admin.create_device("d1"))
    inbox_send, inbox_receive = trio.open_memory_channel[AnyStream](1)

    async def hand_over(stream: AnyStream) -> None:
        await inbox_send.send(stream)
        await trio.sleep_forever()

    device = DeviceClient(
        device_cs,
        opener=relay.open if relay and relay_side == "device" else None,
        stream_options=options,
    )
    await nursery.start(device.serve, {"pipe": hand_over})
    service = ServiceClient(
        service_cs,
        opener=relay.open if relay and relay_side == "service" else service_opener,
        nursery=nursery,
        stream_options=options,
    )
    service_stream = await service.open_stream("d1", "pipe")
    device_stream = await inbox_receive.receive()
    assert isinstance(service_stream, FramedStream)
    assert isinstance(device_stream, FramedStream)
    return Pair(service_stream, device_stream, hub, relay)


async def close_both(one: FramedStream, other: FramedStream) -> None:
    """Finish a stream whose EOFs were read both ways; both ends must complete cleanly."""
    await one.aclose()
    await other.aclose()
    for stream in (one, other):
        assert stream.endpoint.state is EndpointState.DONE


class Heard(trio.abc.Stream):
    """A client's connection to the hub that notes when bytes arrived from it."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.arrivals: list[float] = []

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        self.arrivals.append(trio.current_time())
        return bytes(data)

    async def aclose(self) -> None:
        await self.inner.aclose()


class HeardOpener:
    """A service's opener: every connection a :class:`Heard`."""

    def __init__(self) -> None:
        self.connections: list[Heard] = []

    async def __call__(self, address: HubAddress) -> trio.abc.Stream:
        heard = Heard(await trio.open_tcp_stream(address.host, address.port))
        self.connections.append(heard)
        return heard


@pytest.mark.parametrize("relay_side", ["service", "device"])
async def test_every_byte_arrives_through_a_relay_that_cuts(
    store: RegistryStore, relay_side: str
) -> None:
    """64 MiB each way, with every connection of one side cut several times on the way."""
    size = 64 * MIB
    step = 8 * MIB
    last_cut = size - DEFAULT_WINDOW - step
    to_device = os.urandom(size)
    to_service = os.urandom(size)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await open_pair(nursery, store, relay_side=relay_side)
            service, device, relay = pair.service, pair.device, pair.relay
            assert relay is not None
            cut_side = service if relay_side == "service" else device
            other_side = device if relay_side == "service" else service

            async def send(stream: FramedStream, data: bytes) -> None:
                view = memoryview(data)
                for start in range(0, len(data), MIB):
                    await stream.send_all(view[start : start + MIB])
                await stream.send_eof()

            async def receive(stream: FramedStream, into: hashlib._Hash) -> None:
                received = 0
                next_cut = step
                while chunk := await stream.receive_some():
                    into.update(chunk)
                    received += len(chunk)
                    # Cut once the last cut was resumed; stop while the reader still needs
                    # more than a window, so every cut has to be resumed.
                    if next_cut <= received < last_cut and cut_side.resumes == relay.cuts:
                        next_cut = received + step
                        assert relay.cut() >= 1

            at_device = hashlib.sha256()
            at_service = hashlib.sha256()
            async with trio.open_nursery() as transfer:
                transfer.start_soon(send, service, to_device)
                transfer.start_soon(send, device, to_service)
                transfer.start_soon(receive, device, at_device)
                transfer.start_soon(receive, service, at_service)
            assert at_device.digest() == hashlib.sha256(to_device).digest()
            assert at_service.digest() == hashlib.sha256(to_service).digest()
            assert relay.cuts >= 8
            assert relay.connections > relay.cuts
            assert cut_side.resumes == relay.cuts
            assert other_side.resumes == 0
            await close_both(service, device)
            nursery.cancel_scope.cancel()


async def test_a_stalled_reader_holds_memory_bounded(store: RegistryStore) -> None:
    """The device stops reading while the service keeps writing.

    What bounds memory is end-to-end flow control: ``send_all`` returns only once the service's
    endpoint has taken the bytes, and it takes no more than ``window`` bytes beyond what the
    device's application has read. So the total the service hands over while the device reads
    nothing is at most ``window``, and every buffer on the way (the service's send buffer, the
    kernel's socket buffers, the hub, the device's receive buffer) holds some part of
    those same bytes: the hub cannot hold more than the writer produced. The test checks that
    bound exactly (no allowance for kernel buffers is needed), checks that the whole window
    reached the device (so nothing is parked in the hub), and, as a coarse second look, that
    the process's traced Python memory (service, hub and device all run here) grew by less than
    four windows: one window in the service's send buffer, one in the device's receive buffer,
    and transient copies on the way (frames, WebSocket messages); without flow control the
    writer would have handed over all eight windows of the payload, and they would be somewhere.
    """
    total = 16 * MIB
    payload = os.urandom(total)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await open_pair(nursery, store)
            service, device = pair.service, pair.device
            window = service.window
            assert window == device.window == DEFAULT_WINDOW
            handed_over = 0

            async def write() -> None:
                nonlocal handed_over
                view = memoryview(payload)
                for start in range(0, total, MIB):
                    await service.send_all(view[start : start + MIB])
                    handed_over = start + MIB
                await service.send_eof()

            tracemalloc.start()
            try:
                before, _ = tracemalloc.get_traced_memory()
                tracemalloc.reset_peak()
                nursery.start_soon(write)
                with trio.move_on_after(2):
                    await trio.sleep_forever()
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()

            sender = service.endpoint
            receiver = device.endpoint
            assert handed_over <= window
            assert sender.written_end == window
            assert sender.acked == 0
            assert sender.unacked <= window
            assert sender.written_end - sender.acked <= window  # what its send queue holds
            # What the device's receive buffer holds: received and not yet read.
            assert receiver.received - receiver.consumed <= window
            # The whole window made it to the device: nothing is parked on the way.
            assert receiver.received == window
            assert peak - before <= 4 * window, (peak - before) / MIB
            # And the hub's WebSockets of the stream hold nothing back (one message at most).
            sides = pair.hub.streaming.framed_sides(service.stream_id)
            assert set(sides) == {Role.SERVICE, Role.DEVICE}
            for ws in sides.values():
                assert ws is not None
                assert ws.buffered <= MAX_FRAMED_MESSAGE

            digest = hashlib.sha256()
            while chunk := await device.receive_some():
                digest.update(chunk)
                assert sender.unacked <= window
            assert digest.digest() == hashlib.sha256(payload).digest()
            assert handed_over == total
            await device.send_eof()
            assert await service.receive_some() == b""
            await close_both(service, device)
            nursery.cancel_scope.cancel()


async def test_a_writer_whose_peer_is_on_a_slow_link_keeps_hearing_from_the_hub(
    store: RegistryStore,
) -> None:
    """The device's connections come through a relay that carries the hub's bytes at 400 kB/s,
    over real sockets: the hub's writes of the service's messages wait for it, and the hub
    reads nothing from the service meanwhile. The window (16 MiB) is larger than the transfer,
    so the device's Acks do not come while the bytes move. The hub's own pongs, written on
    the service's socket from the timer every ``HUB_PONG_INTERVAL``, are what the
    service hears: never 1.8 s without a byte (real time, on a shared machine), and no
    resume. Without them, the service hears from the hub only between its writes of a MiB
    each, 2.6 s apart."""
    size = 2 * MIB
    payload = os.urandom(size)
    options = StreamOptions(window=16 * MIB)
    heard = HeardOpener()
    relay = Relay(0, to_client_rate=400_000)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            pair = await open_pair(
                nursery,
                store,
                relay_side="device",
                relay=relay,
                options=options,
                service_opener=heard,
            )
            connection = heard.connections[-1]
            start = trio.current_time()

            async def send() -> None:
                await pair.service.send_all(payload)
                await pair.service.send_eof()

            got = bytearray()
            async with trio.open_nursery() as transfer:
                transfer.start_soon(send)
                while chunk := await pair.device.receive_some():
                    got += chunk
            end = trio.current_time()
            assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
            assert end - start >= 2.5  # the link's pace: the hub's writes waited
            times = [start, *[t for t in connection.arrivals if start < t < end], end]
            gaps = [b - a for a, b in itertools.pairwise(times)]
            assert max(gaps) < HUB_PONG_INTERVAL + 0.8, gaps
            assert pair.service.resumes == 0 and pair.device.resumes == 0
            await pair.device.send_eof()
            assert await pair.service.receive_some() == b""
            await close_both(pair.service, pair.device)
            nursery.cancel_scope.cancel()
