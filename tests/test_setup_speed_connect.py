"""``_connect.open_tcp``: an IP address is connected to directly, a name through trio.

Test rules: loopback sockets on port 0; nothing waits on time.
"""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing

from devstream_trio.transport import connect as _connect
from devstream_trio.transport.connect import open_tcp


async def echo_listener(
    nursery: trio.Nursery, host: str = "127.0.0.1"
) -> tuple[int, list[tuple[str, int]]]:
    """A listener on *host* that echoes one message per connection; the peers it saw."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    [listener] = await trio.open_tcp_listeners(0, host=host)
    assert listener.socket.family == family
    port = listener.socket.getsockname()[1]
    peers: list[tuple[str, int]] = []

    async def serve(stream: trio.SocketStream) -> None:
        peers.append(stream.socket.getpeername()[:2])
        async with stream:
            await stream.send_all(await stream.receive_some())

    nursery.start_soon(trio.serve_listeners, serve, [listener])
    return port, peers


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
async def test_an_ip_address_is_connected_to_without_trios_resolver(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    if host == "::1" and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    try:
        port, peers = await echo_listener(nursery, host)
    except OSError:
        pytest.skip(f"cannot listen on {host}")

    async def refuse(*args: object, **kwargs: object) -> trio.SocketStream:
        raise AssertionError("open_tcp_stream was used for an IP address")

    monkeypatch.setattr(_connect.trio, "open_tcp_stream", refuse)
    stream = await open_tcp(host, port)
    assert isinstance(stream, trio.SocketStream)
    # trio's SocketStream sets TCP_NODELAY: small frames are not held back.
    assert stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    await stream.send_all(b"hello")
    assert await stream.receive_some() == b"hello"
    await stream.aclose()
    assert len(peers) == 1


async def test_a_name_goes_through_trio(nursery: trio.Nursery) -> None:
    port, peers = await echo_listener(nursery)
    stream = await open_tcp("localhost", port)
    await stream.send_all(b"by name")
    assert await stream.receive_some() == b"by name"
    await stream.aclose()
    assert peers and peers[0][0] == "127.0.0.1"


async def test_a_refused_connection_is_an_oserror_saying_so() -> None:
    # A port that was just free: nothing listens there.
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    with pytest.raises(OSError) as info:
        await open_tcp("127.0.0.1", port)
    assert info.value.errno is not None
    assert info.value.strerror == "Connection refused"


class TaskSteps(trio.abc.Instrument):
    """Counts the times one task is resumed: each is a trip through the scheduler."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.resumed = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.resumed += 1


async def open_counting_resumes(host: str, port: int) -> tuple[trio.SocketStream, int]:
    """``open_tcp(host, port)``, and how many times the calling task was resumed in it."""
    steps = TaskSteps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        stream = await open_tcp(host, port)
    finally:
        trio.lowlevel.remove_instrument(steps)
    return stream, steps.resumed


async def test_a_connection_the_kernel_completes_at_once_is_used_without_a_schedule_point(
    nursery: trio.Nursery,
) -> None:
    # On loopback the kernel finishes the handshake inside connect(): open_tcp does not wait
    # for the socket to turn writable, so the task never goes back to the scheduler.
    port, peers = await echo_listener(nursery)
    stream, resumed = await open_counting_resumes("127.0.0.1", port)
    assert resumed == 0
    await stream.send_all(b"at once")
    assert await stream.receive_some() == b"at once"
    await stream.aclose()
    assert len(peers) == 1


async def test_a_connection_still_in_progress_is_waited_for(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As on a network: right after connect() the socket is not connected yet.
    port, _ = await echo_listener(nursery)
    asked: list[int] = []

    class NotYet(socket.socket):
        def getpeername(self) -> object:
            asked.append(1)
            raise OSError(107, "Transport endpoint is not connected")

    monkeypatch.setattr(_connect.socket, "socket", NotYet)
    stream, resumed = await open_counting_resumes("127.0.0.1", port)
    monkeypatch.undo()
    assert asked == [1]
    assert resumed == 1  # it waited for the socket to turn writable
    await stream.send_all(b"waited")
    assert await stream.receive_some() == b"waited"
    await stream.aclose()


async def test_a_cancelled_connect_opens_nothing(nursery: trio.Nursery) -> None:
    port, peers = await echo_listener(nursery)
    with trio.CancelScope() as scope:
        scope.cancel()
        await open_tcp("127.0.0.1", port)
    assert scope.cancelled_caught
    await trio.testing.wait_all_tasks_blocked()
    assert peers == []
