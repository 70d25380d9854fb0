"""The plain-socket reads and writes (``devstream_trio.transport.io``) over a connected
socket pair, and the limit on bytes a socket holds unsent (``UnsentLimit``), over loopback TCP."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from devstream_core.websocket import Connection
from devstream_trio.transport import io as _io
from devstream_trio.transport.websocket import WebSocket


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


async def test_receive_ready_takes_what_is_there_without_waiting() -> None:
    a, b = socket_pair()
    assert _io.receive_ready(b, 100) is None  # nothing yet
    await a.send_all(b"hello")
    with trio.testing.assert_no_checkpoints():
        assert _io.receive_ready(b, 100) == b"hello"
    await a.aclose()
    assert _io.receive_ready(b, 100) == b""  # the end
    b.socket.close()
    with pytest.raises(trio.ClosedResourceError):
        _io.receive_ready(b, 100)


async def test_receive_ready_leaves_other_streams_to_their_own_reads() -> None:
    a, b = trio.testing.memory_stream_pair()
    await a.send_all(b"hello")
    assert _io.receive_ready(b, 100) is None
    assert await _io.receive_some(b, 100) == b"hello"


async def test_receive_some_waits_for_data_and_reports_the_end() -> None:
    a, b = socket_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"late")
        assert await _io.receive_some(b, 100, wait_first=True) == b"late"
    await a.aclose()
    assert await _io.receive_some(b, 100) == b""
    await b.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await _io.receive_some(b, 100, wait_first=True)


async def test_send_all_waits_while_the_peer_is_full_and_keeps_every_byte() -> None:
    a, b = socket_pair()
    for stream in (a, b):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = bytes(range(256)) * 4096  # 1 MiB: many times what the buffers hold
    got = bytearray()

    async def read_all() -> None:
        while len(got) < len(data):
            got.extend(await _io.receive_some(b, 65536))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await _io.send_all(a, memoryview(data))
    assert got == data
    await a.aclose()
    await b.aclose()


async def test_send_all_to_a_closed_or_vanished_socket_raises_trios_errors() -> None:
    a, b = socket_pair()
    await b.aclose()
    with pytest.raises(trio.BrokenResourceError):
        for _ in range(100):  # the first writes may still be taken
            await _io.send_all(a, b"x" * 65536)
    a.socket.close()
    with pytest.raises(trio.ClosedResourceError):
        await _io.send_all(a, b"x")
    c, d = socket_pair()
    await c.send_eof()
    with pytest.raises(trio.ClosedResourceError, match="after sending EOF"):
        await _io.send_all(c, b"x")
    await c.aclose()
    await d.aclose()


def small_buffers(*streams: trio.SocketStream) -> None:
    for stream in streams:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)


@pytest.mark.parametrize("count", [3, 700])  # one writev, and more buffers than one takes
async def test_write_nowait_returns_exactly_what_the_socket_did_not_take(count: int) -> None:
    a, b = socket_pair()
    small_buffers(a, b)
    buffers: list[bytes | bytearray | memoryview] = [
        bytes([i % 251]) * (1 + (i * 7919) % 9000) for i in range(count)
    ]
    data = b"".join(buffers)
    buffers[1] = bytearray(buffers[1])
    buffers[2] = memoryview(buffers[2])
    with trio.testing.assert_no_checkpoints():
        rest = _io.write_nowait(a, buffers)
    taken = len(data) - sum(map(len, rest))
    assert 0 < taken < len(data)  # the socket took some, not all
    got = bytearray()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:

            async def read_all() -> None:
                while len(got) < len(data):
                    got.extend(await _io.receive_some(b, 65536))

            nursery.start_soon(read_all)
            await _io.send_vectored(a, rest)
    assert got == data  # the rest, written after, continues exactly where the socket stopped
    await a.aclose()
    await b.aclose()


async def test_write_nowait_of_nothing_writes_nothing() -> None:
    a, b = socket_pair()
    assert _io.write_nowait(a, []) == []
    a.socket.close()
    assert _io.write_nowait(a, []) == []  # not even to a closed socket
    await b.aclose()


async def test_read_when_ready_waits_reads_and_reports_the_end() -> None:
    a, b = socket_pair()
    buffer = memoryview(bytearray(100))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"late")
        assert await _io.read_when_ready(b, os.readv, [buffer], wait_first=True) == (4, True)
    assert bytes(buffer[:4]) == b"late"
    # Not told to wait, it reads at once what is there...
    await a.send_all(b"now")
    assert await _io.read_when_ready(b, os.readv, [buffer], wait_first=False) == (3, False)
    assert bytes(buffer[:3]) == b"now"
    # ...and waits when nothing is.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.send_all, b"later")
        assert await _io.read_when_ready(b, os.readv, [buffer], wait_first=False) == (5, True)
    await a.aclose()
    assert (await _io.read_when_ready(b, os.readv, [buffer], wait_first=True))[0] == 0  # the end
    b.socket.close()
    with pytest.raises(trio.ClosedResourceError):
        await _io.read_when_ready(b, os.readv, [buffer], wait_first=True)


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of TCP streams on loopback (trio's socket defaults on both)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = trio.socket.socket()
    with listener:
        await client.connect(listener.getsockname())
        server, _ = await listener.accept()
    return trio.SocketStream(client), trio.SocketStream(server)


def unsent_limit(stream: trio.SocketStream) -> int:
    return int(stream.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT))


async def test_set_unsent_limit_sets_tcp_notsent_lowat_on_a_tcp_socket_only() -> None:
    a, b = await tcp_pair()
    assert unsent_limit(a) == _io.TRIO_NOTSENT_LOWAT == 16384  # trio's default
    assert _io.set_unsent_limit(a, 65536)
    assert unsent_limit(a) == 65536
    assert unsent_limit(b) == 16384
    unix_a, unix_b = socket_pair()
    assert not _io.set_unsent_limit(unix_a, 65536)  # no TCP under it: refused
    for stream in (a, b, unix_a, unix_b):
        await stream.aclose()


async def test_unsent_limit_follows_the_rate_the_socket_drains_at() -> None:
    """The limit is what the socket sends in UNSENT_TIME (50 ms), from 16 KiB to 1 MiB,
    measured over spans of at least 20 ms between writes that found the socket full. It
    rises when two spans in a row ask for more, falls after one, and moves only for half or
    twice as much."""
    a, b = await tcp_pair()
    unsent = _io.UnsentLimit()

    def sent(count: int, now: float, *, full: bool = True) -> int:
        unsent.sent(a, count, now, full=full)
        assert unsent.limit == unsent_limit(a)
        return unsent.limit

    unsent.filled(10.0)
    # A slow link: 400 kB/s is 20 kB in 50 ms, not twice 16 KiB: trio's limit stays.
    assert sent(40_000, 10.1) == 16384
    # 2 MB/s (100 kB in 50 ms), measured over 20 ms: the first span asks, the second raises.
    assert sent(20_000, 10.11) == 16384  # 10 ms: not a span yet
    assert sent(30_000, 10.125) == 16384
    assert sent(50_000, 10.15) == 100_000
    # 2.4 MB/s asks for 120 kB: not twice as much, no system call.
    assert sent(60_000, 10.175) == 100_000
    # Loopback's pace, two spans: capped at one whole message.
    assert sent(1_000_000, 10.2) == 100_000
    assert sent(1_000_000, 10.225, full=False) == _io.MAX_NOTSENT_LOWAT == 1024 * 1024
    # The socket was not full after that write: the next one measures nothing...
    assert sent(10, 20.0) == 1024 * 1024
    # ... but from that full write on, it does: the receiver slowed to 10 kB/s; one span
    # lowers the limit.
    assert sent(10_000, 21.0) == 16384
    # A stall of 300 ms, then the link catches up in a burst: one fast span, not two.
    assert sent(16_000, 21.3) == 16384
    assert sent(120_000, 21.301) == 16384
    assert sent(16_000, 21.341) == 16384  # this span asked for 166 kB
    assert sent(16_000, 21.381) == 16384  # this one for 20 kB
    unsent.filled(30.0)
    assert sent(1_000_000, 30.0) == 16384  # a clock that did not move measures nothing
    await a.aclose()
    await b.aclose()


async def test_a_websocket_sizes_the_unsent_limit_once_its_socket_fills() -> None:
    """Small messages leave trio's 16 KiB limit; once sends find the socket full (large
    messages, faster than the peer reads), the limit follows how fast the socket drains: on
    loopback, far more than 16 KiB within a few dozen milliseconds of full socket. Every
    byte still arrives, in order."""
    a, b = await tcp_pair()
    sender, receiver = WebSocket(a, Connection(client=False)), WebSocket(b, Connection(client=True))
    await sender.send_bytes(b"small")
    assert await receiver.receive_message(1 << 20) == b"small"
    assert unsent_limit(a) == 16384
    payload = os.urandom(1 << 20)
    sent: list[int] = []

    async def send() -> None:
        # Until the limit rose (on loopback, a few dozen MiB), at most 512 MiB.
        while unsent_limit(a) == 16384 and len(sent) < 512:
            sent.append(len(sent))
            await sender.send_bytes(len(sent).to_bytes(4, "big") + payload)
        await sender.send_bytes(b"end")

    got = 0
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while (message := await receiver.receive_message(2 << 20)) != b"end":
                got += 1
                assert message == got.to_bytes(4, "big") + payload
    assert got == len(sent)
    # Loopback drains far faster than the 655 kB/s that doubles 16 KiB in 50 ms.
    assert unsent_limit(a) >= 2 * 16384, f"not raised after {got} MiB"
    assert unsent_limit(b) == 16384  # the side that only read keeps trio's limit
    await a.aclose()
    await b.aclose()
