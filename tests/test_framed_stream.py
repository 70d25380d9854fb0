"""devstream.v1 streams end to end over in-memory connections: hub, device and service.

Test rules: no sockets; everything runs on the ``autojump_clock`` (``hub_env`` wires the clients
to a hub through in-memory streams), and every test body runs under ``trio.fail_after``.
Transports are cut, stalled or refused through :class:`Tap`, a wrapper the clients' opener puts
around every connection, so a test decides which WebSocket drops and when.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import math
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from devstream_core import control
from devstream_core.bridge import StreamState
from devstream_core.common import Role
from devstream_core.errors import ErrorCode
from devstream_core.framing import DEFAULT_WINDOW, EndpointState
from devstream_core.streamdriver import (
    ACK_DELAY,
    ACK_PROBE,
    IDLE_ACK,
    PROBE_TIMEOUT,
    Outcome,
    OutcomeKind,
    StreamPhase,
)
from devstream_trio.client import framed
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream, StreamOptions
from devstream_trio.client.service import AnyStream, ServiceClient, join_stream, open_service
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import (
    HubError,
    HubUnreachable,
    PeerLost,
    PeerNeverConnected,
    StreamReset,
)
from devstream_trio.server import streaming
from devstream_trio.server.hub import Hub, HubConfig, ensure_owner_policy, load_or_create_secret
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpStatusError, http_request, websocket_connect
from devstream_trio.transport.websocket import ConnectionClosed, WebSocket

from ._helpers import until_closed
from .conftest import PUBLIC_URL, HubEnv, random_payload

HUB = HubAddress.from_url(PUBLIC_URL)
TIMEOUT = 600


# -- transports a test can cut, stall or refuse ------------------------------------------------


async def send_paced(
    stream: trio.abc.SendStream, data: bytes | bytearray | memoryview, rate: float
) -> None:
    """Send *data* as a slow link of *rate* bytes a second carries it: 4 KiB at a time, each
    after its time on the link."""
    view = memoryview(data)
    for start in range(0, len(view), 4096):
        piece = view[start : start + 4096]
        await trio.sleep(len(piece) / rate)
        await stream.send_all(piece)


class Tap(trio.abc.Stream):
    """A client's connection to the hub that a test can cut or stall."""

    def __init__(self, inner: trio.abc.Stream, server: trio.abc.Stream) -> None:
        self.inner = inner
        #: The hub's end of the same connection.
        self.server = server
        #: The first bytes of the client's first request, or of its request to the streaming
        #: endpoint (the service joins over its initiate's connection): tells a stream
        #: WebSocket from a control channel.
        self.head = b""
        self.stalled_in = False
        self.stalled_out = False
        #: When true, the hub does not hear of this end closing (only a later event tells it).
        self.close_silently = False
        #: When set, the connection is cut once it has carried this many bytes (both ways,
        #: from its first byte): the bytes up to that point are delivered, then both ends end.
        self.budget: int | None = None
        #: The connection was cut because its budget ran out.
        self.cut_by_budget = False
        #: When set, a budget that runs out on bytes coming from the hub cuts the hub's end
        #: only, as a relay that resets the socket it was reading from: the client hears
        #: nothing more, and its end stays open until it sends something (then it is cut).
        self.one_sided = False
        #: When set, the hub's end is cut (one-sidedly) once this many bytes came from it.
        self.incoming_budget: int | None = None
        self._half_cut = False
        self._closed = trio.Event()
        #: When each read of the client's took bytes from the hub.
        self.arrivals: list[float] = []
        #: When set, what the client sends goes at this many bytes a second (a slow uplink).
        self.uplink_rate: float | None = None

    @property
    def closed(self) -> bool:
        """The client closed (or the test cut) this connection."""
        return self._closed.is_set()

    @property
    def is_stream(self) -> bool:
        # A side's stream connection: a join, or a service's one-step open (GET /twins/...).
        return self.head.startswith((b"GET /bridges/", b"GET /twins/"))

    def cut(self) -> None:
        """Drop the connection without a WebSocket close (both ends see it end)."""
        self._closed.set()

    def stall(self, *, incoming: bool = True, outgoing: bool = True) -> None:
        """The network goes silent: stop delivering bytes, swallow what the client sends.

        When both ways are stalled, the hub does not hear of the client closing either.
        """
        self.stalled_in = self.stalled_in or incoming
        self.stalled_out = self.stalled_out or outgoing

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.head or bytes(data[:13]) in (b"GET /bridges/", b"GET /twins/d"):
            self.head = bytes(data[:64])
        if self._half_cut:
            self.cut()  # what the client sends meets the reset: its end is cut too
        if self._closed.is_set():
            await trio.lowlevel.checkpoint()
            raise trio.ClosedResourceError("cut")
        if self.stalled_out:
            await trio.lowlevel.checkpoint()
            return
        data = self._spend(data)
        if self.uplink_rate is not None:
            await send_paced(self.inner, data, self.uplink_rate)
            return
        await self.inner.send_all(data)
        if self.budget == 0:
            await self._cut_at_budget()

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        result: bytes | None = None
        try:
            async with trio.open_nursery() as nursery:

                async def read() -> None:
                    nonlocal result
                    if self.stalled_in:
                        await trio.sleep_forever()
                    data = await self.inner.receive_some(max_bytes)
                    while self.stalled_in:
                        await trio.sleep_forever()
                    result = bytes(data)
                    nursery.cancel_scope.cancel()

                async def watch() -> None:
                    await self._closed.wait()
                    nursery.cancel_scope.cancel()

                nursery.start_soon(read)
                nursery.start_soon(watch)
        except* trio.Cancelled:
            # Cancelled from outside once the read had taken its bytes: they are handed over
            # (as a socket's receive would have), and the cancellation reaches the caller at
            # its next checkpoint. Dropping them would lose part of the stream.
            if result is None:
                raise
        if result is None:
            raise trio.ClosedResourceError("cut")
        result = bytes(self._spend(result))
        self.arrivals.append(trio.current_time())
        if self.incoming_budget is not None:
            result = result[: self.incoming_budget]
            self.incoming_budget -= len(result)
            if self.incoming_budget == 0:
                self.one_sided, self.budget = True, 0
        if self.budget == 0:
            await self._cut_at_budget(incoming=True)
        return result

    def _spend(self, data: bytes | bytearray | memoryview) -> bytes | bytearray | memoryview:
        """What of *data* the budget lets through (all of it without a budget)."""
        if self.budget is None or not self.is_stream:
            return data
        data = data[: self.budget]
        self.budget -= len(data)
        return data

    async def _cut_at_budget(self, *, incoming: bool = False) -> None:
        """The budget is spent: both ends see the connection end (the hub's end at once);
        with :attr:`one_sided`, on bytes from the hub (*incoming*), only the hub's end."""
        self.budget = None
        self.cut_by_budget = True
        if self.one_sided and incoming:
            self._half_cut = self.stalled_in = True
        else:
            self.cut()
        await trio.aclose_forcefully(self.server)

    async def cut_hub_end(self) -> None:
        """Reset the hub's end now, between messages, as a relay that resets the socket it
        was reading from: the hub sees the drop; the client hears nothing more, and its end
        is cut when it next sends something."""
        self._half_cut = self.stalled_in = True
        await trio.aclose_forcefully(self.server)

    async def aclose(self) -> None:
        self._closed.set()
        if self.close_silently or (self.stalled_in and self.stalled_out):
            await trio.lowlevel.checkpoint()
        else:
            await trio.aclose_forcefully(self.inner)


class HubEnd(trio.abc.Stream):
    """The hub's end of a connection, with test hooks.

    *before_answer* runs before the hub's first bytes. With *slow*, every write goes out in two
    halves with a pause between them, like a write into a busy socket: a write cancelled in
    the pause leaves half of it on the wire, as a real socket does.
    """

    def __init__(
        self,
        inner: trio.abc.Stream,
        opener: Opener,
        *,
        before_answer: Callable[[], Awaitable[None]] | None = None,
        slow: bool = False,
    ) -> None:
        self.inner = inner
        self.opener = opener
        self._before_answer = before_answer
        self.slow = slow

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        hook, self._before_answer = self._before_answer, None
        if hook is not None:
            await hook()
        if self.opener.link_rate is not None:
            await send_paced(self.inner, data, self.opener.link_rate)
            return
        if self.slow and len(data) > 1:
            half = len(data) // 2
            await self.inner.send_all(data[:half])
            if len(data) > 1024:  # data, not a pong
                pause_hook, self.opener.in_pause = self.opener.in_pause, None
                if pause_hook is not None:
                    pause_hook()
            try:
                await trio.sleep(0.001)
            except trio.Cancelled:
                self.opener.cut_writes += 1
                raise
            data = data[half:]
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def aclose(self) -> None:
        await self.inner.aclose()


@dataclass
class Opener:
    """A client's opener: in-memory connections to the hub, each wrapped in a :class:`Tap`."""

    env: HubEnv
    taps: list[Tap] = field(default_factory=list)
    #: When set, new connections are refused as if the hub were unreachable.
    refuse: bool = False
    #: When each refused connection was asked for.
    refused_at: list[float] = field(default_factory=list)
    #: When set, the hub learns that a stream connection ended only while it takes the
    #: client's next connection, between accepting the resume and switching to it.
    late_drops: bool = False
    #: When set, the hub does not hear of the client closing a connection at all.
    silent_drops: bool = False
    #: When set, the hub writes to this client's connections slowly (see :class:`HubEnd`).
    slow_hub_writes: bool = False
    #: Called (once) in the pause of the hub's next slow write of more than 1 KiB.
    in_pause: Callable[[], None] | None = None
    #: Slow writes of the hub cancelled half-way (half of their bytes went out).
    cut_writes: int = 0
    #: When set, what the client sends on a new connection goes at this many bytes a second.
    uplink_rate: float | None = None
    #: When set, the hub's writes to this client's connections go at this many bytes a second
    #: (a slow link to the client: 4 KiB at a time, each after its time on the link).
    link_rate: float | None = None
    #: When set, every new stream connection is cut once it has carried this many bytes (see
    #: :attr:`Tap.budget`); the first one after ``first_budget`` bytes, when that is set. After
    #: ``max_budget_cuts`` such cuts, new connections are left alone.
    budget: int | None = None
    first_budget: int | None = None
    max_budget_cuts: int = 1000
    #: Budget cuts on bytes from the hub cut the hub's end only (see :attr:`Tap.one_sided`).
    one_sided: bool = False
    #: The next new connection gets this :attr:`Tap.incoming_budget` (then it is cleared).
    next_incoming_budget: int | None = None

    async def __call__(self, address: HubAddress) -> trio.abc.Stream:
        if self.refuse:
            self.refused_at.append(trio.current_time())
            await trio.lowlevel.checkpoint()
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, "refused by the test")
        assert (address.host, address.port) == (HUB.host, HUB.port), address
        client, server = trio.testing.memory_stream_pair()
        self.env.server_streams.append(server)
        tap = Tap(client, server)
        tap.close_silently = self.late_drops or self.silent_drops
        hub_end = HubEnd(
            server,
            self,
            before_answer=self._end_previous_stream if self.late_drops else None,
            slow=self.slow_hub_writes,
        )
        if self.budget is not None and self.budget_cuts < self.max_budget_cuts:
            tap.budget = self.budget
            tap.one_sided = self.one_sided
            if self.first_budget is not None:
                tap.budget, self.first_budget = self.first_budget, None
        tap.incoming_budget, self.next_incoming_budget = self.next_incoming_budget, None
        tap.uplink_rate = self.uplink_rate
        self.taps.append(tap)
        self.env.nursery.start_soon(self.env.hub.handle_connection, hub_end)
        return tap

    async def _end_previous_stream(self) -> None:
        taps = self.stream_taps()
        if len(taps) >= 2:
            await trio.aclose_forcefully(taps[-2].server)
            # Let the hub act on that end before it answers the new connection.
            await trio.testing.wait_all_tasks_blocked()

    @property
    def budget_cuts(self) -> int:
        """Connections cut because they carried their budget."""
        return sum(tap.cut_by_budget for tap in self.taps)

    def stream_taps(self) -> list[Tap]:
        return [tap for tap in self.taps if tap.is_stream]

    def latest_stream(self) -> Tap:
        return self.stream_taps()[-1]


# -- helpers -----------------------------------------------------------------------------------


async def env_with(nursery: trio.Nursery, config: HubConfig) -> HubEnv:
    """Like the ``hub_env`` fixture, with a hub configured by *config*."""
    store = await RegistryStore.open(None)
    owner, _ = await ensure_owner_policy(store)
    secret = await load_or_create_secret(store)
    hub = Hub(store, public_url=PUBLIC_URL, secret=secret, config=config)
    await nursery.start(hub.run)
    return HubEnv(hub=hub, store=store, owner=owner, nursery=nursery)


@dataclass
class Streams:
    """Both sides of one devstream.v1 stream, and the openers under them."""

    service: FramedStream
    device: FramedStream
    service_opener: Opener
    device_opener: Opener


async def open_streams(
    env: HubEnv,
    *,
    options: StreamOptions | None = None,
    device_options: StreamOptions | None = None,
    device_id: str = "d1",
) -> Streams:
    """Start a device that hands each stream to the test, and open one stream to it."""
    device_opener = Opener(env)
    service_opener = Opener(env)
    cs = await env.create_device(device_id)
    inbox_send, inbox_receive = trio.open_memory_channel[AnyStream](1)

    async def hand_over(stream: AnyStream) -> None:
        await inbox_send.send(stream)
        await trio.sleep_forever()

    device = DeviceClient(cs, opener=device_opener, stream_options=device_options or options)
    await env.nursery.start(device.serve, {"pipe": hand_over})
    service = ServiceClient(
        env.service_cs(), opener=service_opener, nursery=env.nursery, stream_options=options
    )
    service_stream = await service.open_stream(device_id, "pipe")
    device_stream = await inbox_receive.receive()
    assert isinstance(service_stream, FramedStream)
    assert isinstance(device_stream, FramedStream)
    return Streams(service_stream, device_stream, service_opener, device_opener)


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    """Everything up to the peer's EOF."""
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def read_exactly(stream: trio.abc.ReceiveStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some(size - len(data))
        assert chunk, f"EOF after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def metrics(env: HubEnv) -> dict[str, float]:
    stream = await env.open(HUB)
    try:
        response = await http_request(stream, method="GET", host=HUB.host_header, target="/metrics")
    finally:
        await trio.aclose_forcefully(stream)
    assert response.status == 200
    values: dict[str, float] = {}
    for line in response.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- half-close --------------------------------------------------------------------------------


async def test_half_close_each_way_then_clean_finish(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        request = random_payload(300_000)
        await pair.service.send_all(request)
        await pair.service.send_eof()
        with pytest.raises(trio.ClosedResourceError):
            await pair.service.send_all(b"more")
        await pair.service.send_eof()  # a second EOF is harmless

        # The device reads up to the EOF, then keeps talking: half-close is one way only.
        assert await read_all(pair.device) == request
        assert await pair.device.receive_some() == b""
        answer = random_payload(500_000)
        for start in range(0, len(answer), 70_000):
            await pair.device.send_all(answer[start : start + 70_000])
        await pair.device.send_eof()

        received = await read_all(pair.service)
        assert sha(received) == sha(answer)
        assert await pair.service.receive_some() == b""
        assert await pair.service.receive_some() == b""

        await pair.device.aclose()
        await pair.service.aclose()
        for stream in (pair.service, pair.device):
            assert stream.endpoint.state is EndpointState.DONE
            assert stream.endpoint.reset_info is None
            assert stream.resumes == 0
        while (await metrics(hub_env))["devstream_streams_open"] != 0:
            await trio.sleep(0.1)
        values = await metrics(hub_env)
        assert values["devstream_streams_total"] == 1
        assert values["devstream_resumes_total"] == 0
        # The hub counts the messages it relayed: the bytes, their frames' headers, the acks.
        payload = len(request) + len(answer)
        assert payload < values["devstream_relayed_bytes_total"] < payload * 1.01


# -- reset -------------------------------------------------------------------------------------


@pytest.mark.parametrize("resetter", [Role.SERVICE, Role.DEVICE])
async def test_reset_reaches_the_other_side(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, resetter: Role
) -> None:
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        one, other = (
            (pair.service, pair.device) if resetter is Role.SERVICE else (pair.device, pair.service)
        )
        await one.send_all(b"before the reset")
        assert await read_exactly(other, 16) == b"before the reset"
        await one.reset(4242, "enough of this")
        for _ in range(2):  # and again: the stream stays broken
            with pytest.raises(trio.BrokenResourceError) as info:
                await other.receive_some()
            cause = info.value.__cause__
            assert isinstance(cause, StreamReset)
            assert cause.reset_code == 4242
            assert cause.code is ErrorCode.STREAM_RESET
            assert cause.message == "enough of this"
        with pytest.raises(trio.BrokenResourceError):
            await other.send_all(b"after")
        # The side that reset sees its own reset too.
        with pytest.raises(trio.BrokenResourceError) as info:
            await one.receive_some()
        assert isinstance(info.value.__cause__, StreamReset)
        await one.aclose()
        await other.aclose()
        while (await metrics(hub_env))["devstream_streams_open"] != 0:
            await trio.sleep(0.1)


async def test_reset_with_a_known_code_maps_to_its_exception(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        await pair.device.reset()
        with pytest.raises(trio.BrokenResourceError) as info:
            await pair.service.receive_some()
        cause = info.value.__cause__
        assert isinstance(cause, StreamReset)
        assert cause.reset_code == ErrorCode.STREAM_RESET


# -- flow control ------------------------------------------------------------------------------


async def test_a_reader_that_stops_stops_the_writer(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    window = 64 * 1024
    options = StreamOptions(window=window)
    payload = random_payload(1024 * 1024)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env, options=options)
        assert pair.service.window == pair.device.window == window
        handed_over = 0

        async def write() -> None:
            nonlocal handed_over
            for start in range(0, len(payload), 4096):
                await pair.service.send_all(payload[start : start + 4096])
                handed_over = start + 4096
            await pair.service.send_eof()

        sender = pair.service.endpoint
        receiver = pair.device.endpoint
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            # The device reads nothing: once everything is blocked, the writer is stuck with
            # exactly one window handed over and nothing more.
            await trio.sleep(30)
            await trio.testing.wait_all_tasks_blocked()
            assert sender.written_end == window
            assert handed_over == window
            assert sender.unacked <= window
            assert sender.acked == 0
            assert receiver.received == window
            assert receiver.consumed == 0

            # The bytes came long ago (more than IDLE_ACK): what the first read after the
            # pause takes is acknowledged at once, and the writer moves on by that much.
            read_at = trio.current_time()
            first = await pair.device.receive_some(window // 4)
            await trio.testing.wait_all_tasks_blocked()
            assert trio.current_time() == read_at  # at once, not at a timer
            assert 0 < len(first) <= window // 4
            assert sender.acked == len(first)
            assert sender.written_end == window + len(first)
            assert sender.unacked <= window

            rest = await read_all(pair.device)
        assert sha(first + rest) == sha(payload)
        assert sender.unacked <= window


# -- resume ------------------------------------------------------------------------------------


async def test_resume_after_many_drops_loses_nothing(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Connections are cut on both sides, at the client's end and at the hub's, in the middle
    of a multi-MiB transfer each way; every byte arrives once and in order."""
    size = 16 * 1024 * 1024
    step = 256 * 1024
    last_cut = size - DEFAULT_WINDOW - step
    to_device = random_payload(size)
    to_service = random_payload(size)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        cuts: list[str] = []

        def resumes() -> int:
            return pair.service.resumes + pair.device.resumes

        async def cut_next() -> None:
            plan = ["service", "device-at-hub", "device", "service-at-hub"]
            what = plan[len(cuts) % len(plan)]
            opener = pair.service_opener if what.startswith("service") else pair.device_opener
            tap = opener.latest_stream()
            cuts.append(what)
            if what.endswith("at-hub"):
                await trio.aclose_forcefully(tap.server)
            else:
                tap.cut()

        async def send(stream: FramedStream, data: bytes) -> None:
            for start in range(0, len(data), 256 * 1024):
                await stream.send_all(data[start : start + 256 * 1024])
            await stream.send_eof()

        async def receive(stream: FramedStream, into: bytearray) -> None:
            # Cut again once the last cut has been resumed and enough has arrived; stop while
            # the reader still needs more than a window, so that every cut must be resumed.
            next_cut = step
            while chunk := await stream.receive_some():
                into += chunk
                if next_cut <= len(into) < last_cut and resumes() == len(cuts):
                    next_cut = len(into) + step
                    await cut_next()

        at_device = bytearray()
        at_service = bytearray()
        started = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send, pair.service, to_device)
            nursery.start_soon(send, pair.device, to_service)
            nursery.start_soon(receive, pair.device, at_device)
            nursery.start_soon(receive, pair.service, at_service)
        assert sha(at_device) == sha(to_device)
        assert sha(at_service) == sha(to_service)
        assert len(cuts) >= 12, cuts
        # Each resume's first attempt succeeds at once: a few milliseconds per drop at most,
        # never a wait for the next ping.
        assert trio.current_time() - started <= 0.005 * len(cuts)
        assert set(cuts) == {"service", "device", "service-at-hub", "device-at-hub"}
        await pair.service.aclose()
        await pair.device.aclose()
        assert resumes() == len(cuts)
        assert pair.service.resumes >= 4 and pair.device.resumes >= 4
        values = await metrics(hub_env)
        assert values["devstream_resumes_total"] == len(cuts)
        for stream in (pair.service, pair.device):
            assert stream.endpoint.state is EndpointState.DONE
        # Every dead connection was released by its client, whichever end was cut.
        for opener in (pair.service_opener, pair.device_opener):
            assert all(tap.closed for tap in opener.stream_taps())


async def request_then_answer(pair: Streams, request: bytes, answer: bytes) -> None:
    """The service sends *request* (256 KiB at a time) and its EOF; the device reads it all,
    checks it, and sends *answer* and its EOF; the service reads the answer."""

    async def device() -> None:
        assert sha(await read_all(pair.device)) == sha(request)
        await pair.device.send_all(answer)
        await pair.device.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device)
        for start in range(0, len(request), 256 * 1024):
            await pair.service.send_all(request[start : start + 256 * 1024])
        await pair.service.send_eof()
        assert await read_all(pair.service) == answer


@pytest.mark.parametrize("young", [False, True])
async def test_a_stream_cut_every_mebibyte_keeps_moving(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, young: bool
) -> None:
    """Every stream connection of both sides is cut once it has carried 1 MiB (both ways
    counted, the sides cut at independent points) while the service sends 16 MiB and EOF and
    the device answers after reading it all. The hub relays whole messages, so each
    connection must deliver some whole message before its cut: the transfer completes while
    the cuts go on (a connection that only ever carries part of a 1 MiB message would be cut
    for ever, until the test's cap on cuts), and each drop costs no virtual time beyond a few
    milliseconds (the first resume attempt is immediate and nothing here is slow). *young*:
    the transfer starts at once, while the application's tasks read the sockets themselves
    (the first cuts come then); otherwise past DIRECT_READ_TIME, with the connection tasks
    running."""
    mib = 1024 * 1024
    request, answer = random_payload(16 * mib), random_payload(64 * 1024)
    cap = 400
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        if not young:
            await trio.sleep(2 * framed.DIRECT_READ_TIME)
        for opener, first in ((pair.service_opener, mib // 4), (pair.device_opener, 3 * mib // 4)):
            opener.budget, opener.max_budget_cuts = mib, cap
            opener.latest_stream().budget = first
        started = trio.current_time()

        await request_then_answer(pair, request, answer)
        took = trio.current_time() - started
        cuts = pair.service_opener.budget_cuts + pair.device_opener.budget_cuts
        assert pair.service_opener.budget_cuts < cap and pair.device_opener.budget_cuts < cap
        assert pair.service_opener.budget_cuts >= 16 and pair.device_opener.budget_cuts >= 16
        assert pair.service.resumes + pair.device.resumes == cuts
        assert took <= 0.005 * cuts, (took, cuts)
        await finish_closing(pair)


async def test_a_connection_cut_on_the_hubs_side_only_is_noticed_at_once(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The device's stream connections are cut every MiB the way a relay that resets only the
    socket it was reading from cuts them: the hub's end, in the middle of a message towards
    the device. The hub holds the stream at once; the device hears nothing more (its end stays
    open) until it sends something. It notices the cut by the message that stopped half-way,
    pings, and resumes: each cut costs a few milliseconds of virtual time (not the wait for
    the next ping, 10 s) and the 16 MiB and the answer arrive intact."""
    mib = 1024 * 1024
    request, answer = random_payload(16 * mib), random_payload(64 * 1024)
    cap = 100
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        opener = pair.device_opener
        opener.budget, opener.max_budget_cuts, opener.one_sided = mib, cap, True
        tap = opener.latest_stream()
        tap.budget, tap.one_sided = 3 * mib // 4, True
        started = trio.current_time()

        await request_then_answer(pair, request, answer)
        took = trio.current_time() - started
        cuts = opener.budget_cuts
        assert 16 <= cuts < cap
        assert pair.device.resumes == cuts
        # At most the wait before the probe (framed.STALL_PROBE, 50 ms) and a few ms per cut.
        assert took <= 0.06 * cuts, (took, cuts)
        await finish_closing(pair)


@pytest.mark.parametrize("young", [False, True])
async def test_a_silent_cut_between_messages_to_a_reader_is_found_by_its_acknowledgement(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, young: bool
) -> None:
    """The device reads a message, and its connection is then reset at the hub's end only,
    between two messages: nothing arrives half-way, and the device hears nothing more. It
    owes an Ack for what it read (below the Ack rule's quarter window); IDLE_ACK after the
    arrival it sends it, the write meets the reset, and the device resumes and gets what the
    service sent meanwhile: within the young stream's first DIRECT_READ_TIME (no connection
    task yet) or IDLE_ACK, not at the next ping (10 s)."""
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        if not young:
            await trio.sleep(2 * framed.DIRECT_READ_TIME)
        await pair.service.send_all(b"a" * 1000)
        assert await read_exactly(pair.device, 1000) == b"a" * 1000
        read_at = trio.current_time()
        await pair.device_opener.latest_stream().cut_hub_end()
        await pair.service.send_all(b"b" * 1000)
        assert await read_exactly(pair.device, 1000) == b"b" * 1000
        took = trio.current_time() - read_at
        assert pair.device.resumes == 1
        assert took <= (framed.DIRECT_READ_TIME if young else IDLE_ACK) + 0.01, took
        await finish(pair)


async def test_a_silent_cut_between_messages_to_a_writer_is_found_by_a_probe(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The device writes, the service reads; the device's connection is then reset at the
    hub's end only, before the service's Ack comes back: the Ack is lost with it, and the
    device hears nothing more. Its bytes wait for their acknowledgement: ACK_PROBE after they
    went out it pings, the write meets the reset, and the resume learns that the service has
    them. Not at the next ping (10 s)."""
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        await trio.sleep(2 * framed.DIRECT_READ_TIME)
        sent_at = trio.current_time()
        await pair.device.send_all(b"a" * 1000)
        assert await read_exactly(pair.service, 1000) == b"a" * 1000
        assert trio.current_time() == sent_at
        await pair.device_opener.latest_stream().cut_hub_end()  # before the service's Ack
        while pair.device.resumes == 0:
            await trio.sleep(0.001)
        took = trio.current_time() - sent_at
        assert ACK_PROBE <= took <= ACK_PROBE + 0.01, took
        while pair.device.endpoint.awaiting_ack:
            await trio.sleep(0.001)
        assert pair.device.endpoint.acked == 1000  # the service's, by way of the resume
        assert trio.current_time() - sent_at <= ACK_PROBE + IDLE_ACK + 0.01
        await pair.service.send_all(b"b" * 10)
        assert await read_exactly(pair.device, 10) == b"b" * 10
        await finish(pair)


async def test_a_resume_whose_answer_stops_half_way_is_tried_again(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The device's connection drops; the connection of its first resume attempt is cut at
    the hub's end only, in the middle of the 101 (the hub took the resume, the device hears
    nothing more). The attempt gives up after ``ping_timeout`` without an answer, and the next
    one resumes the stream (with the token the device still holds): the bytes arrive, about
    ``ping_timeout`` late, where before the stream waited for ever."""
    options = StreamOptions(ping_timeout=3)
    payload = random_payload(256 * 1024)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env, options=options)
        await trio.sleep(2 * framed.DIRECT_READ_TIME)
        pair.device_opener.next_incoming_budget = 40
        started = trio.current_time()
        pair.device_opener.latest_stream().cut()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.service.send_all, payload)
            assert await read_exactly(pair.device, len(payload)) == payload
        took = trio.current_time() - started
        assert pair.device.resumes == 1
        first_attempt, second_attempt = pair.device_opener.stream_taps()[-2:]
        assert first_attempt.cut_by_budget and first_attempt.closed  # released, not leaked
        assert not second_attempt.closed
        assert options.ping_timeout <= took <= options.ping_timeout + 0.1, took
        await finish(pair)


async def finish_closing(pair: Streams) -> None:
    """Both sides sent their EOF and read the other's: closing completes the stream."""
    await pair.service.aclose()
    await pair.device.aclose()
    for stream in (pair.service, pair.device):
        assert stream.endpoint.state is EndpointState.DONE


# -- grace period ------------------------------------------------------------------------------


@pytest.mark.parametrize("lost", [Role.DEVICE, Role.SERVICE])
async def test_a_side_that_never_comes_back_is_lost(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, lost: Role
) -> None:
    grace, resume_timeout = 5.0, 12.0
    env = await env_with(nursery, HubConfig(grace_period=grace))
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(env, options=StreamOptions(resume_timeout=resume_timeout))
        gone, waiting = (
            (pair.device, pair.service) if lost is Role.DEVICE else (pair.service, pair.device)
        )
        opener = pair.device_opener if lost is Role.DEVICE else pair.service_opener
        await gone.send_all(b"x" * 1000)
        assert await read_exactly(waiting, 1000) == b"x" * 1000
        failures: dict[str, tuple[float, BaseException | None]] = {}

        async def watch(name: str, stream: FramedStream) -> None:
            with pytest.raises(trio.BrokenResourceError) as info:
                await stream.receive_some()
            failures[name] = (trio.current_time(), info.value.__cause__)

        opener.refuse = True
        dropped_at = trio.current_time()
        await trio.aclose_forcefully(opener.latest_stream().server)
        async with trio.open_nursery() as watchers:
            watchers.start_soon(watch, "waiting", waiting)
            watchers.start_soon(watch, "gone", gone)
        when, cause = failures["waiting"]
        assert isinstance(cause, PeerLost)
        assert cause.code is ErrorCode.PEER_LOST
        assert grace <= when - dropped_at <= grace + 0.1
        when, cause = failures["gone"]
        assert isinstance(cause, HubUnreachable)
        assert resume_timeout <= when - dropped_at <= resume_timeout + 0.1
        assert gone.resumes == 0
        values = await metrics(env)
        assert values["devstream_streams_open"] == 0
        assert values["devstream_resumes_total"] == 0
        # Both sides can still be closed; they stay broken.
        await gone.aclose()
        await waiting.aclose()
    await env.store.aclose()


async def test_coming_back_after_the_grace_period_is_refused_at_once(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    env = await env_with(nursery, HubConfig(grace_period=3))
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(env, options=StreamOptions(resume_timeout=60))
        pair.service_opener.refuse = True
        await trio.aclose_forcefully(pair.service_opener.latest_stream().server)
        with pytest.raises(trio.BrokenResourceError) as info:
            await pair.device.receive_some()
        assert isinstance(info.value.__cause__, PeerLost)
        pair.service_opener.refuse = False
        came_back_at = trio.current_time()
        with pytest.raises(trio.BrokenResourceError) as info:
            await pair.service.receive_some()
        cause = info.value.__cause__
        assert isinstance(cause, HubError) and cause.code is ErrorCode.NOT_FOUND
        # Refused as final: no retrying until resume_timeout.
        assert trio.current_time() - came_back_at < 10
    await env.store.aclose()


# -- keepalive ---------------------------------------------------------------------------------


async def transfer_across(pair: Streams, event: Callable[[], Awaitable[None]]) -> None:
    """Send bytes each way, run *event* in the middle, and check every byte arrived."""
    first, second = random_payload(200_000), random_payload(300_000)
    back = random_payload(250_000)
    await pair.service.send_all(first)
    assert await read_exactly(pair.device, len(first)) == first
    await event()
    await pair.service.send_all(second)
    await pair.device.send_all(back)
    assert await read_exactly(pair.device, len(second)) == second
    assert await read_exactly(pair.service, len(back)) == back
    await finish(pair)


async def finish(pair: Streams) -> None:
    """Both sides send EOF, read the other's, and close: the stream completes."""
    for one, other in ((pair.service, pair.device), (pair.device, pair.service)):
        await one.send_eof()
        assert await other.receive_some() == b""
    await pair.service.aclose()
    await pair.device.aclose()
    for stream in (pair.service, pair.device):
        assert stream.endpoint.state is EndpointState.DONE


async def service_resume_across(pair: Streams, event: Callable[[], Awaitable[None]]) -> float:
    """:func:`transfer_across` *event* while watching the service; return when it resumed."""
    resumed_at: list[float] = []

    async def watch() -> None:
        resumed_at.append(await wait_for_resume(pair.service))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        await transfer_across(pair, event)
    return resumed_at[0]


async def wait_for_resume(stream: FramedStream, count: int = 1) -> float:
    """Wait (on the test's clock) until *stream* has resumed *count* times; return when."""
    while stream.resumes < count:
        await trio.sleep(0.01)
    return trio.current_time()


async def test_client_detects_a_silent_connection_and_resumes(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The network goes silent both ways under the service (the hub hears nothing, not even
    the client giving up): the service's pings go unanswered, it drops the connection after
    ``ping_interval + ping_timeout`` and resumes; the hub replaces the old connection."""
    options = StreamOptions(ping_interval=2, ping_timeout=3)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env, options=options)
        stalled_at = 0.0

        async def stall() -> None:
            nonlocal stalled_at
            pair.service_opener.latest_stream().stall()
            stalled_at = trio.current_time()

        resumed_at = await service_resume_across(pair, stall)
        assert 0 < resumed_at - stalled_at <= 5 + 0.1
        assert pair.service.resumes == 1 and pair.device.resumes == 0
        assert (await metrics(hub_env))["devstream_resumes_total"] == 1


async def test_a_writer_leaves_a_silent_connection_within_the_probe_timeout(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """With the default options, the network goes silent both ways under the service (a NAT
    that forgot the connection) while it sends: its bytes wait for their acknowledgement, its
    probe ping (ACK_PROBE) goes unanswered, and PROBE_TIMEOUT later it drops the connection
    and resumes; every byte arrives. Before, it waited for the keepalive's 20 s of silence.
    (Something came on the connection first: until then the hub may not be reading the side,
    and the keepalive's rule alone applies.)"""
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        stalled_at = 0.0

        async def stall() -> None:
            nonlocal stalled_at
            await pair.device.send_all(b"!")
            assert await read_exactly(pair.service, 1) == b"!"
            pair.service_opener.latest_stream().stall()
            stalled_at = trio.current_time()

        took = await service_resume_across(pair, stall) - stalled_at
        assert PROBE_TIMEOUT <= took <= ACK_PROBE + PROBE_TIMEOUT + 0.1, took
        assert pair.service.resumes == 1 and pair.device.resumes == 0


async def test_hub_detects_a_silent_side_and_holds_it(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """The service's bytes stop reaching the hub (it never pings by itself here): the hub
    drops its connection after ``stream_idle_timeout``, and the service resumes."""
    idle = 4.0
    env = await env_with(nursery, HubConfig(stream_idle_timeout=idle))
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(
            env,
            options=StreamOptions(ping_interval=1000, ping_timeout=1000),
            device_options=StreamOptions(ping_interval=1),
        )
        stalled_at = 0.0

        async def stall() -> None:
            nonlocal stalled_at
            # Something from the service reaches the hub just before the silence starts.
            await pair.service.send_all(b"!")
            assert await read_exactly(pair.device, 1) == b"!"
            pair.service_opener.latest_stream().stall(incoming=False)
            stalled_at = trio.current_time()
            resumed_at = await wait_for_resume(pair.service)
            assert idle - 0.1 <= resumed_at - stalled_at <= idle + 0.1

        await transfer_across(pair, stall)
        assert pair.service.resumes == 1 and pair.device.resumes == 0
        # The device, which pings every second, was never dropped by the hub.
        assert len(pair.device_opener.stream_taps()) == 1
    await env.store.aclose()


async def test_pings_keep_a_quiet_stream_without_losing_a_byte(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Both sides ping every second and give up after two seconds of silence. A stream quiet
    for longer than that between its messages stays on its first connection, and every byte
    arrives in order: the timer that wakes the reader to ping cancels only a read that waits."""
    options = StreamOptions(ping_interval=1, ping_timeout=1)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env, options=options)
        sent_out, sent_back = bytearray(), bytearray()
        got_out, got_back = bytearray(), bytearray()
        for round_ in range(12):
            out, back = random_payload(1000 + round_ * 5000), random_payload(2000 + round_ * 3000)
            await pair.service.send_all(out)
            await pair.device.send_all(back)
            sent_out += out
            sent_back += back
            got_out += await read_exactly(pair.device, len(out))
            got_back += await read_exactly(pair.service, len(back))
            await trio.sleep(2.7)
        assert got_out == sent_out and got_back == sent_back
        assert pair.service.resumes == 0 and pair.device.resumes == 0
        assert len(pair.service_opener.stream_taps()) == 1
        assert len(pair.device_opener.stream_taps()) == 1
        await finish(pair)


async def send_to_device_timed(pair: Streams, size: int) -> tuple[float, float]:
    """The service sends *size* random bytes and its EOF; the device reads them all, which
    must be what was sent. Returns when the sending started and how long it took."""
    data = random_payload(size)
    start = trio.current_time()

    async def send() -> None:
        await pair.service.send_all(data)
        await pair.service.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        got = await read_all(pair.device)
    assert got == data
    return start, trio.current_time() - start


def longest_silence(tap: Tap, start: float, end: float) -> float:
    """The longest time between *start* and the last read before *end* during which *tap*'s
    client read nothing from the hub."""
    heard = [start, *[t for t in tap.arrivals if start < t <= end]]
    return max(b - a for a, b in itertools.pairwise(heard))


async def test_a_writer_on_a_slow_uplink_keeps_its_connection(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """What the service sends goes to the hub at 1 Mbit/s (its pings too, after what it sent
    before them: a message of up to 1 MiB takes 8 s), and nothing comes back but the device's
    Acks, once per message. The hub sends the service a pong of its own every
    ``HUB_PONG_INTERVAL`` while its bytes keep arriving: its probe pings, unanswered for
    seconds, do not make it take a working connection as lost. The transfer goes at the
    link's pace, on its first connection (before the pongs, five resumes and 41 s)."""
    rate = 125_000.0
    size = 3 * 1024 * 1024
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        await pair.device.send_all(b"hi")
        assert await read_exactly(pair.service, 2) == b"hi"
        pair.service_opener.uplink_rate = rate
        pair.service_opener.latest_stream().uplink_rate = rate
        start, took = await send_to_device_timed(pair, size)
        assert pair.service.resumes == 0 and pair.device.resumes == 0
        assert size / rate <= took <= size / rate + 1
        # A pong goes with the first bytes read once the interval is over (33 ms apart here).
        silence = longest_silence(pair.service_opener.latest_stream(), start, start + took)
        assert silence <= streaming.HUB_PONG_INTERVAL + 0.04
        pair.service_opener.uplink_rate = pair.service_opener.latest_stream().uplink_rate = None
        await pair.device.send_eof()
        assert await pair.service.receive_some() == b""
        await pair.service.aclose()
        await pair.device.aclose()


async def test_a_writer_whose_peer_is_on_a_slow_link_hears_from_the_hub_while_it_waits(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The hub's writes to the device take as long as a 1 Mbit/s link would. The service's
    messages wait for them, and the hub reads nothing more from the service meanwhile (its
    pings wait too; the device acknowledges once per quarter window, 4 s apart at that rate).
    The hub sends the service a pong of its own every ``HUB_PONG_INTERVAL`` while a
    write waits: the service hears from the hub at least that often, and the transfer goes at
    the link's pace on its first connections."""
    rate = 125_000.0
    size = 3 * 1024 * 1024
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        pair.device_opener.link_rate = rate
        start, took = await send_to_device_timed(pair, size)
        assert size / rate <= took <= size / rate + 2
        # From the first write to the last byte's arrival, the service heard from the hub
        # every second or sooner (a pong, or an Ack).
        silence = longest_silence(pair.service_opener.latest_stream(), start, start + took)
        assert silence <= streaming.HUB_PONG_INTERVAL + 0.01
        assert pair.service.resumes == 0 and pair.device.resumes == 0
        pair.device_opener.link_rate = None
        await pair.device.send_eof()
        assert await pair.service.receive_some() == b""
        await pair.service.aclose()
        await pair.device.aclose()


@pytest.mark.parametrize("then", ["cut", "stall"])
async def test_a_closed_stream_waits_for_the_close_answer_and_never_resumes(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, then: str
) -> None:
    """``aclose`` waits for the hub's answer to its close, for up to ``close_timeout``. A
    connection lost meanwhile makes one attempt to resume (the close may not have arrived),
    which the hub, having the close, refuses (``404902``): the stream ends at once,
    completed. An answer that never comes ends it after ``close_timeout``."""
    options = StreamOptions(close_timeout=3)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env, options=options)
        await pair.service.send_all(b"last words")
        await pair.service.send_eof()
        assert await read_all(pair.device) == b"last words"
        while not pair.service.endpoint.eof_acked:
            await trio.sleep(0.01)
        tap = pair.service_opener.latest_stream()
        tap.stall(outgoing=False)  # the hub's answer to the close never arrives
        closed_at = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pair.service.aclose)
            while pair.service.phase is not StreamPhase.FINISHING:
                await trio.sleep(0.001)
            if then == "cut":
                tap.cut()
        await until_closed(pair.service)
        took = trio.current_time() - closed_at
        if then == "cut":
            assert took < 0.1
        else:
            assert 3 - 0.01 <= took <= 3 + 0.1
        await trio.sleep(10)
        assert pair.service.resumes == 0
        assert len(pair.service_opener.stream_taps()) == (2 if then == "cut" else 1)
        assert pair.service.outcome is not None
        assert pair.service.outcome.kind is OutcomeKind.COMPLETED


@pytest.mark.parametrize("how", ["lost-on-the-way", "write-fails"])
@pytest.mark.parametrize("first_side", ["service", "device"])
async def test_a_last_acknowledgement_lost_with_its_connection_is_sent_again(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, first_side: str, how: str
) -> None:
    """The side that closes first finishes when the peer's EOF comes with the Ack of its own;
    it owes one message then, the Ack of the peer's EOF, with its close. Lost with the
    connection before the hub read it, the peer would wait its close_timeout and reset the
    stream ("closed before the peer read all"), and the hub would hold the stream 30 s for a
    resume. The side resumes once more and sends them again: both ends complete at once."""
    options = StreamOptions(close_timeout=5)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env, options=options, device_options=options)
        first, last = (
            (pair.service, pair.device) if first_side == "service" else (pair.device, pair.service)
        )
        opener = pair.service_opener if first_side == "service" else pair.device_opener
        tap = opener.latest_stream()
        await first.send_all(b"first words")
        async with trio.open_nursery() as nursery:
            first_closed = trio.Event()

            async def close_first() -> None:
                await first.aclose()  # its EOF; then, once acknowledged, the Ack and close
                first_closed.set()

            nursery.start_soon(close_first)
            assert await read_all(last) == b"first words"
            if how == "lost-on-the-way":
                tap.stall(incoming=False)  # what `first` sends from now on is lost...
            else:
                # The connection is reset right after `last`'s EOF and Ack (one 28-byte
                # message) reach `first`: its answer meets the reset.
                tap.incoming_budget = 28
            start = trio.current_time()
            nursery.start_soon(last.aclose)  # its EOF and the Ack of first's
            if how == "lost-on-the-way":
                while first.phase is not StreamPhase.FINISHING:
                    await trio.sleep(0.001)
                tap.cut()  # ...with the connection, before the hub read it
            await first_closed.wait()
        for stream in (first, last):
            await until_closed(stream)
            assert stream.outcome is not None
            assert stream.outcome.kind is OutcomeKind.COMPLETED, stream.outcome
        took = trio.current_time() - start
        assert took < 0.5  # not last's close_timeout (5 s)
        assert first.resumes == 1 and last.resumes == 0
        await trio.sleep(0.1)
        assert hub_env.hub.bridge.device_stream_count("d1") == 0  # not held for a resume


@pytest.mark.parametrize("first_side", ["service", "device"])
async def test_a_stream_closed_after_its_connection_dropped_still_sends_its_last_ack(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, first_side: str
) -> None:
    """The drop comes right after the peer's EOF (and the Ack of this side's) arrived, before
    the application closes: the stream completes while resuming, and the resume under way
    sends the Ack of the peer's EOF and the close."""
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        first, last = (
            (pair.service, pair.device) if first_side == "service" else (pair.device, pair.service)
        )
        opener = pair.service_opener if first_side == "service" else pair.device_opener
        tap = opener.latest_stream()
        await first.send_all(b"first words")
        await first.send_eof()
        assert await read_all(last) == b"first words"
        tap.incoming_budget = 28  # cut right after `last`'s EOF and Ack reach `first`
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(last.aclose)  # waits for the Ack of its EOF
            assert await read_all(first) == b""
            await first.aclose()
        for stream in (first, last):
            await until_closed(stream)
            assert stream.outcome is not None
            assert stream.outcome.kind is OutcomeKind.COMPLETED, stream.outcome
        assert trio.current_time() - start < 0.5  # not last's close_timeout
        assert tap.cut_by_budget and first.resumes == 1
        await trio.sleep(0.1)
        assert hub_env.hub.bridge.device_stream_count("d1") == 0


@pytest.mark.parametrize("cut_at", [200, 400], ids=["request-lost", "101-lost"])
async def test_a_join_lost_on_the_way_is_tried_again_and_the_stream_goes_on(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, cut_at: int
) -> None:
    """The device's join is cut after *cut_at* bytes both ways: in its request (the hub never
    read it), or in the 101 (the hub joined it, and the device lost its answer and first
    resume token). The device tries again with the same stream token: a join, or a rejoin
    the hub takes while the lost connection brought nothing. What the service sent in the
    meantime arrives, once."""
    device_opener, service_opener = Opener(hub_env), Opener(hub_env)
    cs = await hub_env.create_device("d1")
    inbox_send, inbox_receive = trio.open_memory_channel[AnyStream](1)

    async def hand_over(stream: AnyStream) -> None:
        await inbox_send.send(stream)
        await trio.sleep_forever()

    with trio.fail_after(TIMEOUT):
        device = DeviceClient(cs, opener=device_opener)
        await hub_env.nursery.start(device.serve, {"pipe": hand_over})
        device_opener.budget, device_opener.max_budget_cuts = cut_at, 1
        service = ServiceClient(
            hub_env.service_cs(), opener=service_opener, nursery=hub_env.nursery
        )
        start = trio.current_time()
        service_stream = await service.open_stream("d1", "pipe")
        assert isinstance(service_stream, FramedStream)
        await service_stream.send_all(b"sent while the device joined")
        await service_stream.send_eof()
        device_stream = await inbox_receive.receive()
        assert isinstance(device_stream, FramedStream)
        assert await read_all(device_stream) == b"sent while the device joined"
        await device_stream.send_all(b"and back")
        await device_stream.send_eof()
        assert await read_all(service_stream) == b"and back"
        took = trio.current_time() - start
        await service_stream.aclose()
        await device_stream.aclose()
    joins = device_opener.stream_taps()
    assert len(joins) == 2 and joins[0].cut_by_budget and not joins[1].cut_by_budget
    # The hub took the second as a join (it never read the first), or as a rejoin.
    assert hub_env.hub.metrics.resumes_total == (1 if cut_at == 400 else 0)
    assert took < 1  # a retry 25-50 ms later, not a timeout
    assert device_stream.outcome is not None
    assert device_stream.outcome.kind is OutcomeKind.COMPLETED


# -- raw mode and the subprotocol --------------------------------------------------------------


async def echo(stream: AnyStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def start_device(env: HubEnv, handler: Callable[[AnyStream], Awaitable[None]]) -> None:
    cs = await env.create_device("d1")
    device = DeviceClient(cs, opener=env.open, ping_interval=1000)
    await env.nursery.start(device.serve, {"echo": handler})


async def initiate(env: HubEnv, headers: list[tuple[str, str]]) -> tuple[str, str]:
    """The Azure initiate request by hand; return the stream URL and the service token."""
    response = await env.service().request(
        "POST", "/twins/d1/streams/echo?api-version=2020-09-30", headers=headers, body=b""
    )
    assert response.status == 200
    assert response.header(b"iothub-streaming-is-accepted") == b"True"
    url = (response.header(b"iothub-streaming-url") or b"").decode()
    token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
    return url, token


async def connect(env: HubEnv, url: str, token: str, subprotocols: list[str]) -> WebSocket:
    address = HubAddress.from_url(url)
    parts = urllib.parse.urlsplit(url)
    return await websocket_connect(
        await env.open(address),
        host=address.host_header,
        target=f"{parts.path}?{parts.query}",
        headers=[("authorization", f"Bearer {token}")],
        subprotocols=subprotocols,
    )


async def test_open_service_gives_framed_streams_by_default(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    kinds: list[type] = []

    async def handler(stream: AnyStream) -> None:
        kinds.append(type(stream))
        await echo(stream)

    await start_device(hub_env, handler)
    with trio.fail_after(TIMEOUT):
        async with open_service(hub_env.service_cs(), opener=hub_env.open) as service:
            stream = await service.open_stream("d1", "echo")
            assert isinstance(stream, FramedStream)
            await stream.send_all(b"framed")
            assert await read_exactly(stream, 6) == b"framed"
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
            assert stream.endpoint.state is EndpointState.DONE
    assert kinds == [FramedStream]


async def test_a_service_without_a_nursery_gets_a_raw_stream(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    kinds: list[type] = []

    async def handler(stream: AnyStream) -> None:
        kinds.append(type(stream))
        await echo(stream)

    await start_device(hub_env, handler)
    with trio.fail_after(TIMEOUT):
        stream = await ServiceClient(hub_env.service_cs(), opener=hub_env.open).open_stream(
            "d1", "echo"
        )
        assert isinstance(stream, HubStream)
        payload = random_payload(100_000)
        await stream.send_all(payload)
        assert await read_exactly(stream, len(payload)) == payload
        await stream.aclose()
    assert kinds == [HubStream]


async def test_an_azure_style_client_gets_raw_messages_intact(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_device(hub_env, echo)
    with trio.fail_after(TIMEOUT):
        url, token = await initiate(hub_env, [])
        ws = await connect(hub_env, url, token, ["some.protocol"])
        assert ws.subprotocol == "some.protocol"
        for message in (b"one", random_payload(40_000), b"three"):
            await ws.send_bytes(message)
            received = bytearray()
            while len(received) < len(message):
                event = await ws.receive()
                # Binary messages (a client may get a view of what a read brought).
                assert isinstance(event.data, bytes | bytearray | memoryview)
                received += event.data
            assert received == message
        await ws.aclose()


async def test_a_framed_stream_refuses_a_join_without_its_subprotocol(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    device_streams: list[AnyStream] = []
    outcome: list[BaseException] = []

    async def handler(stream: AnyStream) -> None:
        device_streams.append(stream)
        try:
            await stream.receive_some()
        except trio.BrokenResourceError as exc:
            outcome.append(exc)

    await start_device(hub_env, handler)
    with trio.fail_after(TIMEOUT):
        url, token = await initiate(hub_env, [("devstream-stream-mode", "devstream.v1")])
        with pytest.raises(HttpStatusError) as info:
            await connect(hub_env, url, token, ["other.protocol"])
        assert info.value.response.status == 400
        assert info.value.code is ErrorCode.ARGUMENT_INVALID
        assert "devstream.v1" in info.value.message
        # The device's side, already in, does not wait for a peer that cannot come.
        refused_at = trio.current_time()
        while not outcome:
            await trio.sleep(0.01)
        assert trio.current_time() - refused_at < 1
    assert isinstance(device_streams[0], FramedStream)
    assert isinstance(outcome[0].__cause__, PeerNeverConnected)
    values = await metrics(hub_env)
    assert values["devstream_streams_open"] == 0
    assert values["devstream_streams_waiting"] == 0


# -- drops that overlap ------------------------------------------------------------------------


async def test_a_resume_that_overtakes_the_drop_replaces_the_connection(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The service resumes before the hub noticed its old connection end, and the hub learns
    of that end while it is still taking the resume: the stream goes on over the new one."""
    payload = random_payload(8 * 1024 * 1024)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        pair.service_opener.late_drops = True
        cuts = 0

        async def cut_many() -> None:
            nonlocal cuts
            while cuts < 24:
                await wait_for_resume(pair.service, cuts)
                await trio.sleep(0.02)
                cuts += 1
                pair.service_opener.latest_stream().cut()

        async def receive_slowly() -> bytes:
            data = bytearray()
            while chunk := await pair.device.receive_some(64 * 1024):
                data += chunk
                await trio.sleep(0.01)
            return bytes(data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, pair.service, payload)
            nursery.start_soon(cut_many)
            received = await receive_slowly()
        assert sha(received) == sha(payload)
        assert cuts == pair.service.resumes == 24
        assert (await metrics(hub_env))["devstream_resumes_total"] == 24
        await pair.device.send_eof()
        assert await pair.service.receive_some() == b""
        await pair.service.aclose()
        await pair.device.aclose()
        assert pair.service.endpoint.state is EndpointState.DONE


async def test_a_replaced_connection_never_cuts_a_message_in_half(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The hub is still forwarding what the service's old connection brought, into a slow
    device connection, when the service resumes and replaces that connection: the message
    being forwarded must go out whole (or the device's connection must end), never half."""
    payload = random_payload(16 * 1024 * 1024)
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        # Reconnect the device so that its stream connection is one the hub writes slowly to.
        pair.device_opener.slow_hub_writes = True
        await trio.aclose_forcefully(pair.device_opener.latest_stream().server)
        await wait_for_resume(pair.device)
        pair.service_opener.silent_drops = True
        cuts = 0

        def cut() -> None:
            nonlocal cuts
            cuts += 1
            pair.service_opener.latest_stream().cut()

        async def cut_many() -> None:
            while cuts < 6:
                armed = cuts
                pair.device_opener.in_pause = cut
                while cuts == armed:
                    await trio.sleep(0.001)
                await wait_for_resume(pair.service, cuts)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_then_eof, pair.service, payload)
            nursery.start_soon(cut_many)
            received = await read_all(pair.device)
        assert sha(received) == sha(payload)
        assert pair.service.resumes == cuts == 6
        # The forwards in progress went out whole, and the device's connection carried on.
        assert pair.device_opener.cut_writes == 0
        assert pair.device.resumes == 1


async def send_then_eof(stream: FramedStream, data: bytes) -> None:
    for start in range(0, len(data), 64 * 1024):
        await stream.send_all(data[start : start + 64 * 1024])
    await stream.send_eof()


async def test_both_sides_dropped_at_once_both_resume(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)

        lifted_at = math.inf

        async def drop_both() -> None:
            nonlocal lifted_at
            # The device cannot come back for a while: the hub holds both sides.
            pair.device_opener.refuse = True
            for opener in (pair.service_opener, pair.device_opener):
                await trio.aclose_forcefully(opener.latest_stream().server)
            await wait_for_resume(pair.service)
            await trio.sleep(3)
            pair.device_opener.refuse = False
            lifted_at = trio.current_time()

        await transfer_across(pair, drop_both)
        # The device's next attempt comes within one resume delay (50 ms doubling: at most
        # 3.2 s after 3 s of refusals), and the transfer then completes in no time: not at a
        # ping, 10 s later.
        assert trio.current_time() - lifted_at < 3.3
        assert pair.service.resumes == 1 and pair.device.resumes == 1
        assert (await metrics(hub_env))["devstream_resumes_total"] == 2


async def test_a_reset_made_while_the_peer_is_away_reaches_it_after_its_resume(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        await pair.service.send_all(b"abc")
        pair.device_opener.refuse = True
        await trio.aclose_forcefully(pair.device_opener.latest_stream().server)
        await trio.sleep(1)
        await pair.service.reset(77, "gone while you were away")
        await trio.sleep(1)
        pair.device_opener.refuse = False
        with pytest.raises(trio.BrokenResourceError) as info:
            while True:
                await pair.device.receive_some()
        cause = info.value.__cause__
        assert isinstance(cause, StreamReset)
        assert (cause.reset_code, cause.message) == (77, "gone while you were away")
        assert pair.device.resumes == 1
        await pair.service.aclose()
        await pair.device.aclose()
        while (await metrics(hub_env))["devstream_streams_open"] != 0:
            await trio.sleep(0.1)


async def test_a_side_waiting_long_for_its_peer_needs_no_resume(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The device joins at once; the service joins only after the device's keepalive limit."""
    device_streams: list[AnyStream] = []

    async def handler(stream: AnyStream) -> None:
        device_streams.append(stream)
        await echo(stream)

    await start_device(hub_env, handler)
    with trio.fail_after(TIMEOUT):
        url, token = await initiate(hub_env, [("devstream-stream-mode", "devstream.v1")])
        # Longer than the device's keepalive limit (20 s) and the hub's idle timeout (45 s).
        await trio.sleep(50)
        stream = await join_stream(
            url,
            token,
            role=Role.SERVICE,
            opener=hub_env.open,
            mode="devstream.v1",
            nursery=hub_env.nursery,
        )
        assert isinstance(stream, FramedStream)
        await stream.send_all(b"late but fine")
        assert await read_exactly(stream, 13) == b"late but fine"
        (device_stream,) = device_streams
        assert isinstance(device_stream, FramedStream)
        assert device_stream.resumes == 0
        assert stream.resumes == 0


def test_messages_sent_fit_what_every_receiver_takes() -> None:
    # A FramedStream's messages go through the hub's relay (which takes whole messages of up
    # to MAX_FRAMED_MESSAGE) to the peer's FramedStream (MAX_MESSAGE): a larger one is a 1009.
    assert framed.MESSAGE_LIMIT <= streaming.MAX_FRAMED_MESSAGE
    assert framed.MESSAGE_LIMIT <= framed.MAX_MESSAGE


async def test_closing_a_finished_stream_while_it_resumes_stops_the_resume(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Both EOFs went through, then the service's connection is lost and every reconnection
    fails: ``aclose`` stops the resuming at once, with no attempt after it."""
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        await pair.service.send_eof()
        assert await pair.device.receive_some() == b""
        await pair.device.send_eof()
        assert await pair.service.receive_some() == b""
        attempts = pair.service_opener.refused_at
        pair.service_opener.refuse = True
        pair.service_opener.latest_stream().cut()
        while len(attempts) < 2:
            await trio.sleep(0.01)
        await pair.service.aclose()
        closed_at = trio.current_time()
        await until_closed(pair.service)
        assert trio.current_time() - closed_at < 0.01
        count = len(attempts)
        await trio.sleep(30)
        assert len(attempts) == count
        assert pair.service.resumes == 0


# -- a connection cut during the closing handshake ---------------------------------------------


@pytest.mark.parametrize("first", [Role.SERVICE, Role.DEVICE])
@pytest.mark.parametrize("cut", ["noticed first", "met by the write", "silent"])
@pytest.mark.parametrize("ack_alone", [False, True])
async def test_a_side_cut_while_the_peers_close_passes_resumes_and_ends_cleanly(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, first: Role, cut: str, ack_alone: bool
) -> None:
    """Both sides sent their EOF. The side that closes first (*first*) reads the other's EOF
    and closes: its Ack of that EOF goes out with its close, in one write (or, *ack_alone*,
    on its own ACK_DELAY after the read, and the close later). The other side's connection
    is cut right then: reset at the hub's end, which the hub notices before it passes the
    close on, or which its write meets; or silently (*cut* ``silent``: nothing arrives
    either way, and the hub does not notice). The other side never hears that its EOF was
    read. The hub holds it with the closing side's last message and close; the other side
    finds the cut (its EOF waits for its acknowledgement: the ACK_PROBE ping's write meets
    the reset; a silent cut leaves that ping unanswered for PROBE_TIMEOUT, within the close's
    ``close_timeout``, with the default options), resumes, gets them, and ends cleanly within
    milliseconds of the resume: not with a failure (404902, the stream ended), not reset by
    its close's timeout, and not after a grace period."""
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(hub_env)
        closer, other = (
            (pair.service, pair.device) if first is Role.SERVICE else (pair.device, pair.service)
        )
        other_opener = pair.device_opener if first is Role.SERVICE else pair.service_opener
        await closer.send_all(b"request")
        await closer.send_eof()
        assert await read_all(other) == b"request"
        await other.send_all(b"answer")
        await other.send_eof()
        assert await read_all(closer) == b"answer"
        assert closer.endpoint.eof_acked and not other.endpoint.eof_acked
        if ack_alone:
            await trio.sleep(ACK_DELAY)
            assert not closer.endpoint.owes_ack
        tap = other_opener.latest_stream()
        cut_at = trio.current_time()
        if cut == "silent":
            tap.stall()
        else:
            await tap.cut_hub_end()
            if cut == "noticed first":
                await trio.testing.wait_all_tasks_blocked()
        await closer.aclose()
        await other.aclose()
        await until_closed(other)
        took = trio.current_time() - cut_at
        assert other.resumes == 1
        for stream in (closer, other):
            assert stream.outcome == Outcome(kind=OutcomeKind.COMPLETED)
            assert stream.endpoint.state is EndpointState.DONE
        if cut == "silent":
            assert PROBE_TIMEOUT <= took <= ACK_PROBE + PROBE_TIMEOUT + 0.01, took
        else:
            assert took <= ACK_PROBE + 0.01, took
        while hub_env.hub.bridge.stream_count():
            await trio.sleep(0.001)
        assert trio.current_time() - cut_at - took <= 0.01


async def test_a_side_cut_during_the_close_that_never_comes_back_ends_at_the_grace_period(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    """As above, but the device cannot reach the hub again: its close times out
    (``close_timeout``: a reset, as for any close whose EOF is not acknowledged); the hub
    holds it with the service's last words for the grace period, then forgets the stream
    (its line written, nothing of it left)."""
    grace = 8.0
    env = await env_with(nursery, HubConfig(grace_period=grace))
    with trio.fail_after(TIMEOUT):
        pair = await open_streams(env)
        await pair.service.send_eof()
        assert await read_all(pair.device) == b""
        await pair.device.send_eof()
        assert await read_all(pair.service) == b""
        stream_id = pair.service.stream_id
        pair.device_opener.refuse = True
        await pair.device_opener.latest_stream().cut_hub_end()
        cut_at = trio.current_time()
        await pair.service.aclose()
        assert pair.service.outcome == Outcome(kind=OutcomeKind.COMPLETED)
        await pair.device.aclose()
        closed = trio.current_time() - cut_at
        assert pair.device.close_timeout <= closed <= pair.device.close_timeout + 0.1, closed
        assert pair.device.outcome is not None
        assert pair.device.outcome.kind is OutcomeKind.RESET
        await trio.sleep_until(cut_at + grace - 0.01)
        assert env.hub.bridge.stream_state(stream_id) is StreamState.CLOSING_HELD
        assert env.hub.streaming.framed_sides(stream_id) != {}
        await trio.sleep(0.02)
        assert env.hub.bridge.stream_count() == 0
        assert env.hub.streaming.framed_sides(stream_id) == {}
        assert (await metrics(env))["devstream_streams_open"] == 0
    await env.store.aclose()


# -- a side that never answers the close -------------------------------------------------------


async def control_channel(env: HubEnv, device_id: str) -> WebSocket:
    """A device's control channel, made by hand, registered for ``echo``."""
    cs = await env.create_device(device_id)
    channel = await websocket_connect(
        await env.open(HUB),
        host=HUB.host_header,
        target=f"/devices/{device_id}/streams",
        headers=[("authorization", cs.sas_token(expiry=int(time.time()) + 3600))],
        subprotocols=[control.CONTROL_SUBPROTOCOL],
    )
    await channel.send_text(control.encode_message(control.Register(names=("echo",))))
    registered = control.decode_message(await channel.receive_message(1 << 16))
    assert isinstance(registered, control.Registered)
    return channel


@dataclass
class PlainPair:
    """Both sides of one devstream.v1 stream as plain WebSockets (no devstream client: the
    hub relays whole messages without reading them), and the service side's transport."""

    stream_id: str
    device: WebSocket
    service: WebSocket
    service_transport: trio.abc.Stream


async def plain_pair(env: HubEnv, channel: WebSocket) -> PlainPair:
    answers: list[tuple[str, str]] = []

    async def ask() -> None:
        answers.append(await initiate(env, [("devstream-stream-mode", "devstream.v1")]))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        request = control.decode_message(await channel.receive_message(1 << 16))
        assert isinstance(request, control.StreamRequest)
        await channel.send_text(control.encode_message(request.accept()))
    ((url, token),) = answers
    device = await connect(env, request.url, request.token, ["devstream.v1"])
    parts = urllib.parse.urlsplit(url)
    transport = await env.open(HubAddress.from_url(url))
    service = await websocket_connect(
        transport,
        host=HUB.host_header,
        target=f"{parts.path}?{parts.query}",
        headers=[("authorization", f"Bearer {token}")],
        subprotocols=["devstream.v1"],
    )
    return PlainPair(parts.path.rsplit("/", 1)[-1], device, service, transport)


def logged(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", "") == event]


async def test_a_side_that_never_answers_a_close_is_dropped_after_close_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """The device's side closes normally after a last message; the service's side keeps its
    connection up (a ping every second) and never reads, so never answers the close. The
    hub gives it ``close_timeout`` from the close, then aborts its connection (it was sent
    everything, the close last) and forgets the stream: the device's one stream slot
    (``max_streams_per_device=1``) is free for the next stream, which works."""
    caplog.set_level(logging.INFO, logger="devstream")
    close_timeout = 3.0
    env = await env_with(nursery, HubConfig(close_timeout=close_timeout, max_streams_per_device=1))
    with trio.fail_after(TIMEOUT):
        channel = await control_channel(env, "d1")
        pair = await plain_pair(env, channel)
        received = bytearray()
        cut = trio.Event()
        cut_at: list[float] = []

        async def read_below_the_websocket() -> None:
            # Reads the transport, never the WebSocket: nothing answers the hub's close.
            while chunk := await pair.service_transport.receive_some():
                received.extend(chunk)
            cut_at.append(trio.current_time())
            cut.set()

        async def keep_pinging() -> None:
            with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError):
                while not cut.is_set():
                    await pair.service.ping()
                    await trio.sleep(1)

        nursery.start_soon(read_below_the_websocket)
        nursery.start_soon(keep_pinging)
        await trio.sleep(2)
        await pair.device.send_bytes(b"last")
        closed_at = trio.current_time()
        await pair.device.aclose()  # the hub answers it at once
        assert trio.current_time() == closed_at
        with trio.move_on_after(close_timeout + 2):
            await cut.wait()
        assert cut.is_set(), "the hub kept the side that never answered the close"
        took = cut_at[0] - closed_at
        assert close_timeout <= took <= close_timeout + 0.01, took
        # Sent everything: the device's last message, then its close, and nothing after.
        assert b"\x82\x04last" in received
        assert received.endswith(b"\x88\x02\x03\xe8")
        await trio.testing.wait_all_tasks_blocked()  # the hub's task lets the stream go
        assert trio.current_time() == cut_at[0]
        hub = env.hub
        assert hub.bridge.stream_state(pair.stream_id) is StreamState.ENDED
        assert hub.bridge.stream_count() == 0
        assert hub.streaming.framed_sides(pair.stream_id) == {}
        listed = await env.service().list_streams()
        assert [s["streamId"] for s in listed["streams"]] == []
        (dropped,) = logged(caplog, "stream_close_unanswered")
        assert dropped.levelno == logging.INFO
        assert dropped.getMessage() == (
            f"stream {pair.stream_id}: the service did not answer the close within 3 s; "
            "dropping its connection"
        )
        (ended,) = logged(caplog, "stream_ended")
        assert (ended.end, ended.by, ended.code) == ("closed", "device", 1000)  # type: ignore[attr-defined]

        # The device's slot is free: the next stream works, and ends at once when answered.
        again = await plain_pair(env, channel)
        await again.device.send_bytes(b"again")
        assert await again.service.receive_message(100) == b"again"
        closed_at = trio.current_time()
        await again.device.aclose()
        with pytest.raises(ConnectionClosed) as info:
            await again.service.receive_message(100)
        assert info.value.code == 1000
        while hub.bridge.stream_count():
            await trio.sleep(0.001)
        assert trio.current_time() - closed_at <= 0.01
        await again.service.aclose()
        await channel.aclose()
    await env.store.aclose()
