"""Reads and writes on a plain ``trio.SocketStream`` with fewer trips through the scheduler.

trio's socket methods try the system call and then, when it worked, yield to the scheduler;
a read that finds nothing waits and tries again. The WebSocket and HTTP adapters here read and
write the socket's file descriptor themselves (``os.read``, ``os.writev``):

* :func:`receive_plain` is always a checkpoint, like ``receive_some``; told that the last read
  drained the socket, it waits for data before reading rather than try a read bound to fail.
* :func:`send_vectored` and :func:`send_all` are not schedule points when the kernel takes
  every byte at once; they wait for the socket to be writable otherwise. A caller that loops
  on sends must have a schedule point elsewhere in the loop (every loop in the hub reads).

Other streams (TLS, memory streams in tests) go through their own ``send_all`` and
``receive_some``. A socket closed meanwhile has ``fileno() == -1``, so a descriptor number a
newer socket reuses is never read or written.

:class:`UnsentLimit` sizes what a socket that carries bulk data may hold written but not
yet sent (``TCP_NOTSENT_LOWAT``) to what it sends in a moment, rather than trio's fixed
16 KiB.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

__all__ = [
    "MAX_NOTSENT_LOWAT",
    "RATE_SPAN",
    "TRIO_NOTSENT_LOWAT",
    "UNSENT_TIME",
    "UnsentLimit",
    "read_when_ready",
    "receive_plain",
    "receive_ready",
    "receive_some",
    "send_all",
    "send_vectored",
    "set_unsent_limit",
    "write_nowait",
]

#: The most buffers one writev takes (Linux's IOV_MAX is 1024).
_IOV_MAX = 512

#: What trio sets ``TCP_NOTSENT_LOWAT`` to on every socket it makes: the bytes a socket may
#: hold written but not yet sent before a write waits.
TRIO_NOTSENT_LOWAT = 16 * 1024

#: The most :class:`UnsentLimit` lets a socket hold unsent: one whole WebSocket message.
MAX_NOTSENT_LOWAT = 1024 * 1024

#: Seconds of sending that :class:`UnsentLimit` lets a socket hold unsent: how long a frame
#: written now (a pong, a close) may wait behind the bytes written before it.
UNSENT_TIME = 0.05

#: The shortest time (the socket full) over which :class:`UnsentLimit` measures a rate.
RATE_SPAN = 0.02

_TCP_NOTSENT_LOWAT: int | None = getattr(socket, "TCP_NOTSENT_LOWAT", None)

A = TypeVar("A")
R = TypeVar("R")


def _stream_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    """What trio's socket streams raise for a failed system call on the socket."""
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("socket was already closed")
    return trio.BrokenResourceError(f"socket connection broken: {exc}")


def set_unsent_limit(stream: trio.SocketStream, limit: int) -> bool:
    """Let *stream*'s TCP socket hold up to *limit* bytes written and not yet sent
    (``TCP_NOTSENT_LOWAT``). True when it was set; False on a platform without the option, or
    for a socket that refused it (not TCP, or already closed)."""
    if _TCP_NOTSENT_LOWAT is None:
        return False
    try:
        stream.socket.setsockopt(socket.IPPROTO_TCP, _TCP_NOTSENT_LOWAT, limit)
    except OSError:
        return False
    return True


class UnsentLimit:
    """Sizes a socket's ``TCP_NOTSENT_LOWAT`` to the bytes it sends in :data:`UNSENT_TIME`,
    between trio's 16 KiB and :data:`MAX_NOTSENT_LOWAT`, from how fast it drains.

    Why: with trio's 16 KiB, a socket takes what the receiver has room for plus 16 KiB, and
    a hub relaying 1 MiB messages on loopback made about seven writes per message, most of
    them after a wait for the socket (a wake-up and an epoll registration). A fixed larger
    limit would let a slow link hold seconds of bytes ahead of a pong, and a peer probing the
    connection would take it for lost. So the limit follows the rate: on loopback it reaches
    1 MiB within the first few dozen milliseconds of a transfer; on a link slower than about
    650 kB/s (where 50 ms of sending is less than twice 16 KiB) it stays at 16 KiB. A frame
    written waits behind about 50 ms of sending at the measured rate, up to twice that before
    a slower rate brings the limit down; a link that turns far slower at once holds what the
    limit let in until it drains.

    The writer calls :meth:`filled` when a write left bytes over, and :meth:`sent` after each
    write that followed a wait for the socket. The socket was full before and after such a
    wait, so what the write took is what went out in between. The rate is measured over
    spans of at least :data:`RATE_SPAN` seconds of that (time the socket was not full does
    not count). The limit rises only when two spans in a row ask for it (a link that
    catches up in a burst after a stall does not raise it) and falls after one; it moves
    only for a rate that says half or twice as much (one system call then).
    """

    __slots__ = ("_asked", "_full_since", "_span_bytes", "_span_time", "limit")

    def __init__(self) -> None:
        #: The socket's limit now (trio's, until the first change).
        self.limit = TRIO_NOTSENT_LOWAT
        self._full_since: float | None = None
        self._span_bytes = 0
        self._span_time = 0.0
        #: What the last whole span asked for.
        self._asked = TRIO_NOTSENT_LOWAT

    def filled(self, now: float) -> None:
        """A write at *now* left bytes over: the socket is full."""
        self._full_since = now

    def sent(self, stream: trio.SocketStream, count: int, now: float, *, full: bool) -> None:
        """A write after a wait for the socket took *count* bytes at *now*; *full*: it left
        bytes over (the socket is full again)."""
        since = self._full_since
        self._full_since = now if full else None
        if since is None or now <= since:
            return  # no full interval to measure (or a clock that did not move)
        self._span_bytes += count
        self._span_time += now - since
        if self._span_time < RATE_SPAN:
            return
        asked = round(self._span_bytes / self._span_time * UNSENT_TIME)
        asked = min(max(asked, TRIO_NOTSENT_LOWAT), MAX_NOTSENT_LOWAT)
        self._span_bytes, self._span_time = 0, 0.0
        wanted = min(asked, self._asked)  # up: both spans asked for it; down: this one did
        self._asked = asked
        limit = self.limit
        if (wanted >= 2 * limit or 2 * wanted <= limit) and set_unsent_limit(stream, wanted):
            self.limit = wanted


async def send_vectored(
    stream: trio.SocketStream, buffers: Sequence[bytes | bytearray | memoryview]
) -> None:
    """Write *buffers* to a plain socket with as few ``writev`` calls as the kernel allows:
    the payloads go out without being copied into one buffer first. Errors as ``send_all``'s.

    Not a schedule point when the kernel takes everything at once; it waits for the socket
    to be writable otherwise.
    """
    rest = write_nowait(stream, buffers)
    while rest:
        await trio.lowlevel.wait_writable(stream.socket)
        rest = write_nowait(stream, rest)


def write_nowait(
    stream: trio.SocketStream, buffers: Sequence[bytes | bytearray | memoryview]
) -> list[memoryview]:
    """Write as much of *buffers* as a plain socket takes now, without waiting (not a
    checkpoint); return what is left, in order (empty when all of it went). Errors as
    ``send_all``'s."""
    sock = stream.socket
    if sock.did_shutdown_SHUT_WR:
        raise trio.ClosedResourceError("can't send data after sending EOF")
    if 0 < len(buffers) <= _IOV_MAX:
        # The usual case: one writev takes everything, and nothing needs slicing.
        try:
            # fileno() is -1 once the socket is closed: never a number another socket reuses.
            sent = os.writev(sock.fileno(), buffers)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _stream_error(exc) from exc
        if sent == sum(map(len, buffers)):
            return []
        return _rest(buffers, sent)
    views = [memoryview(buffer) for buffer in buffers]
    first = 0
    while first < len(views):
        try:
            # fileno() is -1 once the socket is closed: never a number another socket reuses.
            sent = os.writev(sock.fileno(), views[first : first + _IOV_MAX])
        except BlockingIOError:
            break
        except OSError as exc:
            raise _stream_error(exc) from exc
        while sent:
            size = len(views[first])
            if sent >= size:
                sent -= size
                first += 1
            else:
                views[first] = views[first][sent:]
                sent = 0
    return views[first:]


def _rest(buffers: Sequence[bytes | bytearray | memoryview], sent: int) -> list[memoryview]:
    """What is left of *buffers* once their first *sent* bytes went out."""
    rest: list[memoryview] = []
    for buffer in buffers:
        size = len(buffer)
        if sent >= size:
            sent -= size
        else:
            rest.append(memoryview(buffer)[sent:] if sent else memoryview(buffer))
            sent = 0
    return rest


async def read_when_ready(
    stream: trio.SocketStream, read: Callable[[int, A], R], arg: A, *, wait_first: bool
) -> tuple[R, bool]:
    """``read(fd, arg)`` (``os.read`` or ``os.readv``) on a plain socket once it has data; return
    what it gave and whether it had to wait. *wait_first* (the last read drained the socket)
    waits for data before the first call, rather than make a call bound to fail. Errors as
    ``receive_some``'s. A cancellation point; when it did not wait, the caller owes a schedule
    point (after handling what it read, if that must come first). Every read of the hub's is
    one of these: the system call is passed in, not wrapped in a closure."""
    sock = stream.socket
    if sock.fileno() < 0:
        await trio.lowlevel.checkpoint()
        raise trio.ClosedResourceError("socket was already closed")
    if wait_first:
        await trio.lowlevel.wait_readable(sock)
    else:
        await trio.lowlevel.checkpoint_if_cancelled()
    waited = wait_first
    while True:
        try:
            # fileno() is -1 once the socket is closed: never a number another socket reuses.
            return read(sock.fileno(), arg), waited
        except BlockingIOError:
            pass
        except OSError as exc:
            raise _stream_error(exc) from exc
        await trio.lowlevel.wait_readable(sock)
        waited = True


async def receive_plain(stream: trio.SocketStream, size: int, *, wait_first: bool) -> bytes:
    """Read up to *size* bytes from a plain socket, as ``receive_some`` does, with one
    ``read`` where the socket has data (see :func:`read_when_ready`); a read that did not wait
    is followed by a schedule point, as in trio. Always a checkpoint."""
    data, waited = await read_when_ready(stream, os.read, size, wait_first=wait_first)
    if not waited:
        await trio.lowlevel.cancel_shielded_checkpoint()
    return data


async def send_all(stream: trio.abc.SendStream, data: bytes | bytearray | memoryview) -> None:
    """Write *data*: on a plain socket as :func:`send_vectored`, otherwise ``send_all``."""
    if type(stream) is trio.SocketStream:
        await send_vectored(stream, [data])
    else:
        await stream.send_all(data)


async def receive_some(
    stream: trio.abc.ReceiveStream, size: int, *, wait_first: bool = False
) -> bytes | bytearray:
    """Read up to *size* bytes: on a plain socket as :func:`receive_plain`, otherwise
    ``receive_some``."""
    if type(stream) is trio.SocketStream:
        return await receive_plain(stream, size, wait_first=wait_first)
    return await stream.receive_some(size)


def receive_ready(stream: trio.abc.ReceiveStream, size: int) -> bytes | None:
    """Up to *size* bytes a plain socket already has, without waiting, and not a checkpoint;
    ``None`` when it has none yet, or *stream* is not a plain socket. ``b""`` at its end."""
    if type(stream) is not trio.SocketStream:
        return None
    return _read_nowait(stream, size)


def _read_nowait(stream: trio.SocketStream, size: int) -> bytes | None:
    try:
        # fileno() is -1 once the socket is closed: never a number another socket reuses.
        return os.read(stream.socket.fileno(), size)
    except BlockingIOError:
        return None
    except OSError as exc:
        raise _stream_error(exc) from exc
