"""The plain-socket reads and writes (``devstream_trio.transport.io``) over a connected
socket pair."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from devstream_trio.transport import io as _io


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
