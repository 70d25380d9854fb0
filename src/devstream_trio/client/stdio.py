"""The process's standard input and output as trio streams, for ``devstream proxy stdio``.

* A pipe, a socket or a regular file is read and written through
  ``trio.lowlevel.FdStream`` on a duplicate of the descriptor: non-blocking I/O that the event
  loop waits on (a regular file never makes it wait). FdStream restores the blocking mode when
  it closes.
* A terminal is shared with the shell that started the program, and a terminal in
  non-blocking mode would surprise the shell if this process ended without restoring it, so a
  terminal is read and written by worker threads in blocking mode instead; it is never
  switched to non-blocking mode.
* Closing standard output (the stream's EOF) also points descriptor 1 at ``/dev/null``: the
  program reading the output sees its EOF at once, not only when this process exits, and a
  stray write can never reach a file opened later under number 1.

Nothing but the stream's bytes is ever written to standard output; logs go to standard error.
"""

from __future__ import annotations

import errno
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

__all__ = ["open_standard_streams"]

_READ_SIZE = 65536


def _os_error(exc: OSError) -> trio.ClosedResourceError | trio.BrokenResourceError:
    if exc.errno == errno.EBADF:
        return trio.ClosedResourceError("file was already closed")
    return trio.BrokenResourceError(str(exc))


class _TerminalReader(trio.abc.ReceiveStream):
    """Reads a terminal in blocking mode in a worker thread (left waiting when cancelled)."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._fd < 0:
            raise trio.ClosedResourceError("file was already closed")
        fd = self._fd
        try:
            return await trio.to_thread.run_sync(
                os.read, fd, max_bytes or _READ_SIZE, abandon_on_cancel=True
            )
        except OSError as exc:
            raise _os_error(exc) from exc

    async def aclose(self) -> None:
        # The descriptor is a duplicate; a read still waiting in a thread (abandoned on
        # cancellation) keeps the terminal open until it returns, which does no harm.
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        await trio.lowlevel.checkpoint()


class _TerminalWriter(trio.abc.SendStream):
    """Writes a terminal in blocking mode in a worker thread."""

    def __init__(self, fd: int) -> None:
        self._fd = fd

    @staticmethod
    def _write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._fd < 0:
            raise trio.ClosedResourceError("file was already closed")
        try:
            await trio.to_thread.run_sync(self._write_all, self._fd, data)
        except OSError as exc:
            raise _os_error(exc) from exc

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
        await trio.lowlevel.checkpoint()


class _StandardOutput(trio.abc.SendStream):
    """Descriptor 1: closing it leaves ``/dev/null`` in its place (see the module's text)."""

    def __init__(self, inner: trio.abc.SendStream, fd: int) -> None:
        self._inner = inner
        self._fd = fd
        self._closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            null = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(null, self._fd)
            finally:
                os.close(null)
        await self._inner.aclose()


def _receive_stream(fd: int) -> trio.abc.ReceiveStream:
    copy = os.dup(fd)
    return _TerminalReader(copy) if os.isatty(copy) else trio.lowlevel.FdStream(copy)


def _send_stream(fd: int) -> trio.abc.SendStream:
    copy = os.dup(fd)
    return _TerminalWriter(copy) if os.isatty(copy) else trio.lowlevel.FdStream(copy)


@asynccontextmanager
async def open_standard_streams(
    stdin_fd: int = 0, stdout_fd: int = 1
) -> AsyncIterator[tuple[trio.abc.ReceiveStream, trio.abc.SendStream]]:
    """Standard input and output (descriptors *stdin_fd* and *stdout_fd*) as trio streams,
    closed on the way out. Raises OSError when either descriptor is not open."""
    stdin = _receive_stream(stdin_fd)
    try:
        stdout = _StandardOutput(_send_stream(stdout_fd), stdout_fd)
    except BaseException:
        await trio.aclose_forcefully(stdin)
        raise
    try:
        yield stdin, stdout
    finally:
        await trio.aclose_forcefully(stdin)
        await trio.aclose_forcefully(stdout)
