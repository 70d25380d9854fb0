"""A stream's objects are freed by reference counting when it ends, not by the cyclic collector.

A hub sets up and ends thousands of streams a second. Whatever a stream leaves in a reference
cycle (a WebSocket holding the exception it raised, whose traceback holds the WebSocket's own
frames; a stream holding a bound method of itself) stays in memory, sockets and buffers
included, until Python's cyclic collector walks it, and that walk cost the hub about a twentieth
of its CPU time in ``bench/stream_setup.py``. These tests run streams with the collector off and
then ask it what it would have had to free.

Test rules: loopback only (127.0.0.1), port 0; real sockets on the real clock, every test body
under ``trio.fail_after``; the end of the hub's work is awaited with
``trio.testing.wait_all_tasks_blocked``, never with a sleep.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
import trio.testing

from devstream_core.client_websocket import ClientWebSocket
from devstream_core.client_websocket import ConnectionClosed as ClientConnectionClosed
from devstream_core.errors import DevstreamError
from devstream_core.exceptions import StreamReset
from devstream_core.raw import RawReceiver
from devstream_core.websocket import Connection
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream
from devstream_trio.client.service import AnyStream, ServiceClient
from devstream_trio.server.hub import Hub
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.websocket import ConnectionClosed, WebSocket

from ._helpers import start_hub
from .test_streamdriver import Link

TIMEOUT = 60


def _ours(obj: object) -> str | None:
    """What *obj* is, when it is devstream's: an instance of one of its classes, or a frame
    or coroutine of its code."""
    code = getattr(obj, "f_code", None) or getattr(obj, "cr_code", None)
    if code is not None and "devstream" in code.co_filename:
        return f"{type(obj).__name__} {code.co_name}"
    module = type(obj).__module__
    if module.startswith("devstream"):
        return f"{module}.{type(obj).__qualname__}"
    return None


@contextmanager
def collector_off() -> Iterator[list[str]]:
    """Run the block with the cyclic collector off; then fill the list with devstream's
    objects that only the collector could free (found in reference cycles)."""
    found: list[str] = []
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield found
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        found.extend(name for name in map(_ours, gc.garbage) if name is not None)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()


async def cycles_left_by(
    one_stream: Callable[[], Awaitable[None]],
    count: int,
    settle: Callable[[], Awaitable[None]] | None = None,
) -> list[str]:
    """Run *one_stream* once (what stays for later streams is made then), then *count* times
    with the collector off; return devstream's objects the collector would then have had to
    free. *settle*, after each part, lets the other tasks finish their share of the streams
    (trio's ``wait_all_tasks_blocked`` on loopback)."""
    await one_stream()
    if settle is not None:
        await settle()
    with collector_off() as found:
        for _ in range(count):
            await one_stream()
        if settle is not None:
            await settle()
    return found


@asynccontextmanager
async def hub_and_clients(
    handlers: dict[str, Callable[[AnyStream], Awaitable[None]]],
) -> AsyncIterator[tuple[Hub, ServiceClient]]:
    """A hub on loopback, device ``d1`` serving *handlers* with devstream's trio client, and
    a service client; all stopped when the block ends."""
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        hub, service_cs = await start_hub(nursery, store)
        admin = ServiceClient(service_cs)
        device_cs = admin.device_connection_string(await admin.create_device("d1"))
        await nursery.start(DeviceClient(device_cs).serve, handlers)
        yield hub, ServiceClient(service_cs, nursery=nursery)
        nursery.cancel_scope.cancel()


async def echo(stream: AnyStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.aclose()


async def hang_up(stream: AnyStream) -> None:
    """A device application that drops its stream's connection as soon as it has it."""
    ws = stream._ws  # type: ignore[union-attr]  # a raw stream's WebSocket
    assert isinstance(ws, WebSocket)
    await ws.abort()


@pytest.mark.parametrize("mode", ["raw", "devstream.v1"])
async def test_a_stream_that_ends_leaves_no_cycle_in_the_hub_or_the_clients(mode: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with hub_and_clients({"echo": echo}) as (hub, service):

            async def one_stream() -> None:
                stream = await service.open_stream("d1", "echo", mode=mode)
                await stream.send_all(b"x")
                assert await stream.receive_some(1) == b"x"
                await stream.aclose()

            # Settled: the hub's side of the streams ends too.
            assert await cycles_left_by(one_stream, 5, trio.testing.wait_all_tasks_blocked) == []
            assert hub.bridge.stream_count() == 0  # all ended in the hub too


async def test_a_raw_stream_whose_peer_vanished_leaves_no_cycle() -> None:
    """The error path: the service's reads raise the stream's end, again and again."""
    with trio.fail_after(TIMEOUT):
        async with hub_and_clients({"gone": hang_up}) as (_hub, service):
            with collector_off() as found:
                stream = await service.open_stream("d1", "gone", mode="raw")
                for _ in range(2):
                    with pytest.raises(trio.BrokenResourceError):
                        await stream.receive_some(1)
                await stream.aclose()
                del stream
                await trio.testing.wait_all_tasks_blocked()
            assert found == []


def test_a_raw_receiver_that_raised_its_end_is_freed_without_the_collector() -> None:
    receiver = RawReceiver()
    receiver.ended(1011, "504901 the other side never connected")
    for _ in range(2):
        with pytest.raises(DevstreamError) as info:
            receiver.take()
        assert info.value.code == 504901
    del info
    alive = weakref.ref(receiver)
    with collector_off() as found:
        del receiver
        assert alive() is None
    assert found == []


async def _socket_pair() -> tuple[WebSocket, WebSocket]:
    a, b = trio.socket.socketpair()
    return (
        WebSocket(trio.SocketStream(a), Connection(client=True)),
        WebSocket(trio.SocketStream(b), Connection(client=False)),
    )


async def _peer_closes(client: WebSocket) -> None:
    await client.send_close(4000, "done for today")


async def _connection_lost(client: WebSocket) -> None:
    await client.abort()


async def _message_too_big(client: WebSocket) -> None:
    await client.send_bytes(b"x" * 100)


@pytest.mark.parametrize(
    "end",
    [_peer_closes, _connection_lost, _message_too_big],
    ids=["peer-closes", "connection-lost", "message-too-big"],
)
async def test_a_websocket_that_raised_its_end_is_freed_without_the_collector(
    end: Callable[[WebSocket], Awaitable[None]],
) -> None:
    with trio.fail_after(TIMEOUT):
        client, server = await _socket_pair()
        await end(client)
        codes = []
        for _ in range(2):  # the end is raised on every read after it
            with pytest.raises(ConnectionClosed) as info:
                await server.receive_message(10)
            codes.append(info.value.code)
        del info
        assert server.closed is not None and codes == [server.closed.code] * 2
        alive = weakref.ref(server)
        with collector_off() as found:
            del server
            assert alive() is None
        assert found == []
        await client.abort()


# -- the core's sans-IO objects, on the error paths an adapter reports again and again --------


def test_a_driver_whose_reads_raised_its_reset_is_freed_without_the_collector() -> None:
    link = Link()
    link.a.reset(4242, "changed my mind", 0.0)
    link.flush(link.a)
    link.deliver(link.a, 0.0)
    reader = link.b
    alive = weakref.ref(reader)
    with collector_off() as found:  # raised with the collector off: it frees nothing between
        for _ in range(2):
            with pytest.raises(StreamReset):
                reader.take(None, 0.0)
        del link, reader
        assert alive() is None
    assert found == []


def test_a_client_websocket_that_raised_its_end_is_freed_without_the_collector() -> None:
    ws = ClientWebSocket(lambda: b"\x01\x02\x03\x04")
    ws.end(1006, "connection lost")
    alive = weakref.ref(ws)
    with collector_off() as found:
        for _ in range(2):
            with pytest.raises(ClientConnectionClosed):
                ws.send(b"more")
            with pytest.raises(ClientConnectionClosed) as info:
                ws.receive_data(b"")
            assert (info.value.code, info.value.reason) == (1006, "connection lost")
        del info, ws
        assert alive() is None
    assert found == []


async def reads_until_reset(stream: AnyStream) -> None:
    """A device application that reads until its stream fails, then tries once more each way
    (each attempt raises again), and closes."""
    for attempt in (stream.receive_some, stream.receive_some):
        with pytest.raises(trio.BrokenResourceError):
            while await attempt(100):
                pass
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"too late")
    await stream.aclose()


async def test_a_reset_stream_leaves_no_cycle() -> None:
    with trio.fail_after(TIMEOUT):
        async with hub_and_clients({"read": reads_until_reset}) as (hub, service):

            async def one_stream() -> None:
                stream = await service.open_stream("d1", "read", mode="devstream.v1")
                assert isinstance(stream, FramedStream)
                await stream.send_all(b"x")
                await stream.reset(4242, "changed my mind")
                await stream.aclose()

            assert await cycles_left_by(one_stream, 3, trio.testing.wait_all_tasks_blocked) == []
            assert hub.bridge.stream_count() == 0
