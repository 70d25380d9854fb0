"""Local proxies: any TCP service (SSH, HTTP, …) through a device stream.

* The **device-side proxy** registers one stream name per target (``--map ssh=127.0.0.1:22``).
  For every accepted stream it connects to that target and pipes bytes both ways. A target
  that cannot be reached makes the proxy **reset** the stream (it was already accepted) with
  error 502901 and a reason naming the target, which the service side logs; the proxy keeps
  serving.
* The **service-side proxy** listens on local ports (``--forward 127.0.0.1:2222=ssh``); every
  TCP connection it accepts opens its own stream, so any number of connections are open at
  once, each independent of the others. When the stream cannot be opened (device offline,
  rejected, …) the TCP connection is closed at once and one log line says why.
* The **standard-I/O proxy** (:func:`serve_stdio`) opens one stream and joins it to a pair of
  streams, the process's standard input and output in ``devstream proxy stdio`` (see
  :mod:`.stdio`): what OpenSSH's ``ProxyCommand`` runs, so no local port is needed at all.

Both use devstream.v1 streams, so a TCP half-close on either end reaches the other end as a
half-close, a TCP reset as a stream reset (and back as a TCP reset), and a dropped WebSocket
resumes without the TCP connections noticing. Each stream gets one log line at info level when
it closes (stream id, name, TCP peer or target, bytes each way, duration); opening is logged at
debug level, failures at warning level.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass

import trio

from devstream_core.errors import DevstreamError, ErrorCode

from ..transport import io as _io
from ..transport.connect import open_tcp
from .device import DeviceClient, Handler
from .framed import FramedStream
from .service import AnyStream, ServiceClient

__all__ = [
    "Forward",
    "StdioError",
    "Target",
    "join_stdio",
    "parse_forward",
    "parse_map",
    "pipe",
    "serve_device_proxy",
    "serve_service_proxy",
    "serve_stdio",
]

log = logging.getLogger("devstream.proxy")

_CHUNK = 262144


@dataclass(frozen=True, kw_only=True)
class Target:
    """Where the device-side proxy sends one stream name: ``NAME=HOST:PORT``."""

    name: str
    host: str
    port: int


@dataclass(frozen=True, kw_only=True)
class Forward:
    """One local port of the service-side proxy: ``[BIND:]LOCALPORT=NAME``."""

    bind: str
    port: int
    name: str


def _host_port(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what} must end in :PORT, not {text!r}")
    return host.strip("[]"), int(port)


def parse_map(text: str) -> Target:
    """Parse ``NAME=HOST:PORT``; raise ValueError naming the problem."""
    name, sep, rest = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--map must be NAME=HOST:PORT, not {text!r}")
    host, port = _host_port(rest, "--map target")
    if not host or port == 0:
        raise ValueError(f"--map target must be HOST:PORT with a port, not {rest!r}")
    return Target(name=name, host=host, port=port)


def parse_forward(text: str) -> Forward:
    """Parse ``[BIND:]LOCALPORT=NAME``; the bind address defaults to 127.0.0.1."""
    where, sep, name = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--forward must be [BIND:]LOCALPORT=NAME, not {text!r}")
    if where.isdigit():
        bind, port = "127.0.0.1", int(where)
        if port > 65535:
            raise ValueError(f"--forward port out of range in {text!r}")
    else:
        bind, port = _host_port(where, "--forward")
    return Forward(bind=bind or "127.0.0.1", port=port, name=name)


def _abort_with_rst(tcp: trio.SocketStream) -> None:
    """Make the coming close send a TCP reset instead of a FIN."""
    with contextlib.suppress(OSError):
        tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def pipe(tcp: trio.SocketStream, stream: AnyStream) -> tuple[int, int]:
    """Copy bytes both ways until both directions have ended.

    Returns ``(tcp_to_stream, stream_to_tcp)`` byte counts. EOF on either side is passed on as
    a half-close; a TCP reset becomes a stream reset and a stream reset becomes a TCP reset.
    """
    counts = [0, 0]
    broken = False

    async def tcp_to_stream(cancel: trio.CancelScope) -> None:
        nonlocal broken
        drained = False
        try:
            # A read that drained the socket makes the next one wait for data first (_io).
            while data := await _io.receive_some(tcp, _CHUNK, wait_first=drained):
                drained = len(data) < _CHUNK
                await stream.send_all(data)
                counts[0] += len(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            broken = True
            if isinstance(stream, FramedStream):
                await stream.reset(ErrorCode.STREAM_RESET, "the TCP connection was reset")
            cancel.cancel()
        except trio.ClosedResourceError:
            cancel.cancel()

    async def stream_to_tcp(cancel: trio.CancelScope) -> None:
        nonlocal broken
        try:
            while data := await stream.receive_some(_CHUNK):
                # Not a schedule point when the kernel takes it all: receive_some is one.
                await _io.send_all(tcp, data)
                counts[1] += len(data)
            await tcp.send_eof()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if cause is not None and not broken:  # not the reset this side just sent
                log.warning("stream %s: ended: %s", stream.stream_id, cause)
            broken = True
            _abort_with_rst(tcp)
            cancel.cancel()
        except trio.ClosedResourceError:
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(tcp_to_stream, nursery.cancel_scope)
        nursery.start_soon(stream_to_tcp, nursery.cancel_scope)
    if broken:
        _abort_with_rst(tcp)
    await trio.aclose_forcefully(tcp)
    return counts[0], counts[1]


def _connect_error(exc: OSError) -> str:
    """Why a connection failed: trio hides the errno (``Connection refused``, …) in a group."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        reasons = {
            os.strerror(e.errno) for e in cause.exceptions if isinstance(e, OSError) and e.errno
        }
        if reasons:
            return "; ".join(sorted(reasons))
    return exc.strerror or str(exc)


def _target_handler(target: Target) -> Handler:
    async def handle(stream: AnyStream) -> None:
        started = trio.current_time()
        where = f"{target.host}:{target.port}"
        try:
            tcp = await open_tcp(target.host, target.port)
        except OSError as exc:
            reason = f"target {where} unreachable: {_connect_error(exc)}"
            log.warning("stream %s (%s): %s; resetting it", stream.stream_id, target.name, reason)
            if isinstance(stream, FramedStream):
                await stream.reset(ErrorCode.TARGET_UNREACHABLE, reason)
            return
        log.debug("stream %s (%s): opened to %s", stream.stream_id, target.name, where)
        to_device, to_target = await pipe(tcp, stream)
        log.info(
            "stream %s (%s): closed; %d bytes to %s, %d bytes back, %.1f s",
            stream.stream_id,
            target.name,
            to_target,
            where,
            to_device,
            trio.current_time() - started,
        )

    return handle


async def serve_device_proxy(
    device: DeviceClient,
    targets: Sequence[Target],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Register every target's name and pipe each accepted stream to its target."""
    handlers: Mapping[str, Handler] = {t.name: _target_handler(t) for t in targets}
    await device.serve(handlers, task_status=task_status)


async def serve_service_proxy(
    service: ServiceClient,
    device_id: str,
    forwards: Sequence[Forward],
    *,
    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on every forward's port; each accepted connection gets its own stream.

    ``task_status.started()`` receives the bound ``(host, port)`` of every forward, in order
    (useful with port 0). A port that cannot be listened on raises ``OSError`` (its
    ``strerror`` names the address), before any forward serves.
    """
    opened: list[list[trio.SocketListener]] = []
    try:
        for forward in forwards:
            try:
                opened.append(await trio.open_tcp_listeners(forward.port, host=forward.bind))
            except OSError as exc:
                where = f"{forward.bind}:{forward.port}"
                raise OSError(exc.errno, f"cannot listen on {where}: {exc.strerror}") from exc
    except BaseException:
        for listener in itertools.chain.from_iterable(opened):
            await trio.aclose_forcefully(listener)
        raise
    async with trio.open_nursery() as nursery:
        bound: list[tuple[str, int]] = []
        for forward, listeners in zip(forwards, opened, strict=True):
            sockname = listeners[0].socket.getsockname()
            bound.append((sockname[0], sockname[1]))
            log.info(
                "forwarding %s:%d to %r on device %r",
                sockname[0],
                sockname[1],
                forward.name,
                device_id,
            )
            nursery.start_soon(
                trio.serve_listeners, _connection_handler(service, device_id, forward), listeners
            )
        task_status.started(bound)


def _connection_handler(
    service: ServiceClient, device_id: str, forward: Forward
) -> Callable[[trio.SocketStream], Awaitable[None]]:
    async def handle(tcp: trio.SocketStream) -> None:
        started = trio.current_time()
        try:
            peer = tcp.socket.getpeername()
            client = f"{peer[0]}:{peer[1]}"
        except OSError:
            client = "?"
        try:
            stream = await service.open_stream(device_id, forward.name)
        except DevstreamError as exc:
            log.warning(
                "connection from %s to %r on %r: %s (error %d); closing it",
                client,
                forward.name,
                device_id,
                exc.message,
                exc.code,
            )
            await trio.aclose_forcefully(tcp)
            return
        log.debug("stream %s (%s): opened for %s", stream.stream_id, forward.name, client)
        async with stream:
            sent, received = await pipe(tcp, stream)
        log.info(
            "stream %s (%s) for %s: closed; %d bytes sent, %d bytes received, %.1f s",
            stream.stream_id,
            forward.name,
            client,
            sent,
            received,
            trio.current_time() - started,
        )

    return handle


# -- standard input and output ---------------------------------------------------------------


class StdioError(Exception):
    """Standard input or output failed while the stream was open (the reader of standard
    output went away, a read error on standard input); the stream was reset."""


def _stream_failure(exc: trio.BrokenResourceError) -> DevstreamError:
    """Why a stream broke: the error it carries (a reset, a peer lost, …)."""
    cause = exc.__cause__
    if isinstance(cause, DevstreamError):
        return cause
    return DevstreamError(ErrorCode.STREAM_RESET, str(exc) or ErrorCode.STREAM_RESET.message)


async def join_stdio(
    stream: FramedStream,
    stdin: trio.abc.ReceiveStream,
    stdout: trio.abc.SendStream,
    *,
    hangup: trio.Event | None = None,
) -> tuple[int, int]:
    """Copy *stdin* to *stream* and *stream* to *stdout* until both directions have ended.

    EOF on *stdin* becomes the stream's half-close (``send_eof``), and reading goes on until
    the stream's EOF, which closes *stdout* (``aclose``); the other order works the same way.
    Returns ``(stdin_to_stream, stream_to_stdout)`` byte counts once both ended cleanly.

    Raises the stream's :class:`~devstream_core.errors.DevstreamError` when the stream breaks
    (reset by the other side, peer lost, …), and :class:`StdioError` after resetting the
    stream when *stdin* or *stdout* fails. *stdin* is left open, and so is *stdout* unless the
    stream's EOF closed it: the caller owns them.

    *hangup*, once set, means the program at the other end of *stdin* and *stdout* has gone
    (OpenSSH sends its ``ProxyCommand`` a SIGHUP as it exits): both directions stop at once,
    without error, and the caller's close of the stream tells the other side.
    """
    counts = [0, 0]
    #: The first failure, and the reason to reset the stream with when it was local.
    failure: list[tuple[BaseException, str | None]] = []

    def fail(cancel: trio.CancelScope, error: BaseException, reset: str | None = None) -> None:
        if not failure:
            failure.append((error, reset))
        cancel.cancel()

    async def stdin_to_stream(cancel: trio.CancelScope) -> None:
        while True:
            try:
                data = await stdin.receive_some(_CHUNK)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                reason = f"standard input failed: {exc.__cause__ or exc}"
                return fail(cancel, StdioError(reason), reason)
            try:
                if not data:
                    return await stream.send_eof()
                await stream.send_all(data)
            except trio.BrokenResourceError as exc:
                return fail(cancel, _stream_failure(exc))
            counts[0] += len(data)

    async def stream_to_stdout(cancel: trio.CancelScope) -> None:
        while True:
            try:
                data = await stream.receive_some(_CHUNK)
            except trio.BrokenResourceError as exc:
                return fail(cancel, _stream_failure(exc))
            try:
                if not data:
                    return await stdout.aclose()
                await stdout.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                reason = "standard output was closed before the stream's end"
                return fail(cancel, StdioError(reason), reason)
            counts[1] += len(data)

    async def watch(event: trio.Event, cancel: trio.CancelScope) -> None:
        await event.wait()
        cancel.cancel()

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as directions:
            directions.start_soon(stdin_to_stream, directions.cancel_scope)
            directions.start_soon(stream_to_stdout, directions.cancel_scope)
            if hangup is not None:
                nursery.start_soon(watch, hangup, directions.cancel_scope)
        nursery.cancel_scope.cancel()
    if failure:
        error, reset = failure[0]
        if reset is not None:
            await stream.reset(ErrorCode.STREAM_RESET, reset)
        raise error
    return counts[0], counts[1]


async def serve_stdio(
    service: ServiceClient,
    device_id: str,
    name: str,
    stdin: trio.abc.ReceiveStream,
    stdout: trio.abc.SendStream,
    *,
    hangup: trio.Event | None = None,
) -> tuple[int, int]:
    """Open one devstream.v1 stream to *device_id*'s *name* and join it to *stdin* and
    *stdout* as :func:`join_stdio` says (*hangup* too); close the stream when both directions
    have ended.

    *service* needs a nursery (as from :func:`~devstream_trio.client.service.open_service`):
    half-close exists only on devstream.v1 streams. Raises the service client's error when
    the stream cannot be opened (``DeviceNotOnline``, ``StreamNameNotRegistered``, …).
    """
    if service.nursery is None:
        raise ValueError("serve_stdio needs a service client with a nursery")
    started = trio.current_time()
    stream = await service.open_stream(device_id, name)
    if not isinstance(stream, FramedStream):
        await stream.aclose()
        raise DevstreamError(
            ErrorCode.PROTOCOL_ERROR, "the hub opened a raw stream: no half-close, no stdio proxy"
        )
    log.debug("stream %s (%s): opened for standard input and output", stream.stream_id, name)
    async with stream:
        sent, received = await join_stdio(stream, stdin, stdout, hangup=hangup)
    log.info(
        "stream %s (%s) on %r: closed; %d bytes sent, %d bytes received, %.1f s",
        stream.stream_id,
        name,
        device_id,
        sent,
        received,
        trio.current_time() - started,
    )
    return sent, received
