"""devstream.v1 streams for application code: half-close, flow control, resume.

:class:`FramedStream` is a ``trio.abc.HalfCloseableStream`` driven by the core's
:class:`~devstream_core.framing.StreamEndpoint`. One background task (in the nursery the client
owns) keeps the WebSocket under it: it reads frames, pings, and when the WebSocket drops without
a close it reconnects to the streaming endpoint with the stream's resume credential and lets the
endpoint resend what the peer is missing. That task starts only when something needs it: while
a stream is young (``DIRECT_READ_TIME``, 100 ms), the application's own ``receive_some`` and
``aclose`` read the socket, so a stream's first bytes reach the application without a task
start or a trip through the scheduler, and a short stream (a request, its answer, the close)
never starts a task at all. The connection task starts when a second task waits on the
stream, when a send leaves bytes the socket did not take, or ``DIRECT_READ_TIME`` after the
stream opened (one task per nursery starts those). Frames go out from the task that made
them when the socket takes them at once; a second task, started only when needed, writes the
rest (a full socket, TLS). Application code sees none of that, except in logs and in
``resumes``.

A connection lost on the way may be reset at the hub's end only (a relay or a middlebox
resets the socket it was reading from): the hub holds the stream, and this end, waiting for
bytes, hears nothing. The hub writes each message whole, so a message that stops half-way for
``STALL_PROBE`` (50 ms) makes the connection task ping at once: the write meets the reset and
the stream resumes, instead of at the next ping, up to ``ping_interval`` later.

Meaning of the trio methods:

* ``send_all`` returns once the endpoint has taken every byte; it waits while the flow-control
  window is full (a reader that stops makes the writer stop).
* ``send_eof`` half-closes: the peer reads ``b""`` after the last byte, and can still send.
* ``receive_some`` returns ``b""`` after the peer's EOF; it raises ``trio.BrokenResourceError``
  (``__cause__``: :class:`~devstream_trio.exceptions.StreamReset` or the hub's error) when the
  stream was reset, the peer vanished for good, or the hub could not be reached again. The
  acknowledgement of the peer's EOF waits up to ``ACK_DELAY`` (5 ms) to go out with this
  side's own EOF or close.
* ``aclose`` sends EOF if it was not sent, waits up to ``close_timeout`` for the peer to
  acknowledge every byte, resets the stream if it does not, and closes the WebSocket (the
  last frames and the close get up to ``close_timeout`` more). A peer's EOF that arrives
  after the last byte the application read is acknowledged meanwhile, as reading it would
  have done, so two sides that close at once without reading to EOF finish at once. Bytes
  left unread are never acknowledged. The answer to the close is read before the transport
  is dropped: by ``aclose`` itself on a stream whose connection task never started (so it
  returns a round trip later), by that task otherwise.
* :meth:`FramedStream.reset` aborts the stream; the peer sees a reset with the code and reason.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import trio

from devstream_core.common import Role
from devstream_core.errors import DevstreamError, ErrorCode, parse_close_reason
from devstream_core.framing import (
    DEFAULT_WINDOW,
    MAX_MESSAGE_SIZE,
    EndpointState,
    RecvState,
    StreamEndpoint,
)
from devstream_core.wire import HEADER_RESUME_TOKEN, MAX_FRAMED_MESSAGE_SIZE

from ._ws import ABNORMAL_CLOSURE, NORMAL_CLOSURE, ConnectionClosed, WebSocket
from .exceptions import HubError, HubUnreachable, StreamReset, error_for

__all__ = ["FramedStream", "Reconnect", "StreamOptions"]

log = logging.getLogger("devstream.stream")

#: The largest WebSocket message a FramedStream sends (whole frames only); each message is
#: as large as the endpoint's ``message_size`` says (smaller on a new connection).
MESSAGE_LIMIT = MAX_MESSAGE_SIZE
#: The largest WebSocket message it accepts.
MAX_MESSAGE = MAX_FRAMED_MESSAGE_SIZE

#: Opens a new WebSocket to the stream with a resume token; the new token is in its
#: ``handshake_headers``.
Reconnect = Callable[[str], Awaitable[WebSocket]]

#: Errors that end resuming at once: the hub will never take this stream back.
_FINAL = frozenset(
    {
        ErrorCode.NOT_FOUND,
        ErrorCode.STREAM_TOKEN_INVALID,
        ErrorCode.STREAM_TOKEN_REUSED,
        ErrorCode.STREAM_TOKEN_WRONG_ROLE,
        ErrorCode.STREAM_TOKEN_WRONG_STREAM,
        ErrorCode.STREAM_TOKEN_EXPIRED,
        ErrorCode.ARGUMENT_INVALID,
        ErrorCode.UNAUTHORIZED,
    }
)


def resume_token_of(ws: WebSocket) -> str:
    """The resume token the hub sent with the handshake, or ``""``."""
    for key, value in ws.handshake_headers:
        if key == HEADER_RESUME_TOKEN:
            return value.decode("ascii", "replace")
    return ""


@dataclass(frozen=True, kw_only=True)
class StreamOptions:
    """Settings of devstream.v1 streams, shared by every stream a client opens."""

    #: The most unacknowledged bytes in flight towards the peer, and the most this side
    #: buffers from the peer. Both sides of a stream use one window: the service's, sent at
    #: initiation (``devstream-stream-window``); a device adopts it for that stream.
    window: int = DEFAULT_WINDOW
    #: Ping the hub this often; a WebSocket silent for ``ping_interval + ping_timeout``
    #: counts as dropped and the stream resumes over a new one.
    ping_interval: float = 10.0
    ping_timeout: float = 10.0
    #: Give up resuming after this long (the hub holds a stream 30 s by default).
    resume_timeout: float = 30.0
    #: How long ``aclose`` waits for the peer to acknowledge everything.
    close_timeout: float = 5.0


_DEFAULT_OPTIONS: Final = StreamOptions()

#: How long an acknowledgement of the peer's EOF may wait for this side's own EOF (or other
#: frames) to go out with it.
ACK_DELAY = 0.005

#: How long a stream stays young: its application's own tasks read the socket while they wait
#: on it, and no connection task of its own runs unless something needs one (see
#: FramedStream._read_directly). Most request-and-answer streams end within it without ever
#: starting that task; past it, the stream reads and pings from its task as usual.
DIRECT_READ_TIME = 0.1

#: How long a WebSocket message may stop arriving half-way before the stream pings the hub
#: to find out whether its connection still works. The hub writes each message whole, so on
#: a healthy connection its rest follows at once; a message cut off means a connection lost
#: on the way, and where only the hub's end was reset (a relay, a middlebox) this end would
#: otherwise hear of it only with its next ping, up to ``ping_interval`` later. The ping's
#: write meets the reset (and resumes the stream), or its answer shows the connection alive.
STALL_PROBE = 0.05

#: Resume delays' jitter, for streams not given a generator of their own.
_JITTER = random.Random()


class _Dropped(Exception):
    """The WebSocket under the stream ended without a close: resume."""


class FramedStream(trio.abc.HalfCloseableStream):
    """One side of a devstream.v1 stream."""

    def __init__(
        self,
        ws: WebSocket,
        *,
        stream_id: str,
        role: Role,
        reconnect: Reconnect,
        nursery: trio.Nursery,
        options: StreamOptions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        options = options or _DEFAULT_OPTIONS
        self.stream_id = stream_id
        self.role = role
        #: The stream name, when known (the device side sets it).
        self.name = ""
        #: How many times the stream resumed over a new WebSocket.
        self.resumes = 0
        self.ping_interval = options.ping_interval
        self.ping_timeout = options.ping_timeout
        self.resume_timeout = options.resume_timeout
        self.close_timeout = options.close_timeout
        self._endpoint = StreamEndpoint(window=options.window)
        self._reconnect = reconnect
        self._resume_token = resume_token_of(ws)
        self._rng = rng or _JITTER
        self._ws = ws
        self._changed = trio.lowlevel.ParkingLot()
        self._send_wanted = trio.Event()
        self._failure: DevstreamError | None = None
        self._peer_closed = False
        self._finished = trio.Event()
        self._local_closed = False
        self._eof_sent = False
        self._sending = False
        self._receiving = False
        self._scope = trio.CancelScope()
        self._writer_idle = self._stop_writer = self._ping_wanted = False
        #: The writer task runs only once something needs it (see _wake_writer).
        self._writer_running = False
        self._writer_nursery: trio.Nursery | None = None
        #: The connection task's timer while it reads, and its keepalive deadline; whether
        #: an acknowledgement waits for it (see _defer_ack).
        self._read_timer: trio.CancelScope | None = None
        self._read_wake = math.inf
        self._ack_due = False
        self._closing = False
        #: Until the connection task starts, the application's own tasks read (see
        #: _read_directly). It starts when something needs it, or DIRECT_READ_TIME after the
        #: stream opened (see _need_reader, _Starter), and never for a stream over sooner.
        self._nursery = nursery
        self._task_started = False
        self._dormant_until = trio.current_time() + DIRECT_READ_TIME
        self._app_reading = False
        self._direct_read: trio.CancelScope | None = None
        #: A frame the application's own read found broken, for the connection task to act on.
        self._early_failure: DevstreamError | None = None
        # Connected from the start: what the application sends before the connection task
        # first runs goes out at once (see _send_now).
        self._endpoint.connection_made(resumed=False)
        self._starter = _starter_for(nursery)
        self._starter.add(self, self._dormant_until)

    # -- application side --------------------------------------------------------------------

    @property
    def window(self) -> int:
        """The flow-control window: the most bytes in flight towards the peer."""
        return self._endpoint.window

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Hand *data* to the stream, waiting while the window is full."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        self._sending = True
        try:
            view = memoryview(data)
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            # Nothing else runs between two writes that do not wait: one check before the
            # first, and one after each wait.
            self._check_can_send()
            while view:
                taken = self._endpoint.write(view)
                if taken:
                    view = view[taken:]
                    self._send_now()
                else:
                    await self._wait_changed()
                    waited = True
                    self._check_can_send()
            if not waited:
                # Other tasks run after the bytes went out, not before.
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Wait until the window has room."""
        while self._endpoint.send_capacity == 0:
            self._check_can_send()
            await self._wait_changed()
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Half-close: the peer reads EOF after the last byte; this side can still receive."""
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._eof_sent:
            self._check_can_send()
            self._eof_sent = True
            self._endpoint.write_eof()
            self._send_now()
        # Other tasks run after the EOF went out, not before (an acknowledgement waiting for
        # it goes with it).
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return received bytes, or ``b""`` after the peer's EOF."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if self._local_closed:
            raise trio.ClosedResourceError("the stream was closed")
        self._receiving = True
        try:
            # A checkpoint: the wait for data is the schedule point, or, when there was no
            # wait, one taken before returning (not one before looking and another to wait).
            await trio.lowlevel.checkpoint_if_cancelled()
            waited = False
            while True:
                try:
                    data = self._take_received(max_bytes)
                except trio.BrokenResourceError:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    raise
                if data is not None:
                    if not waited:
                        await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if not self._task_started and not self._app_reading:
                    waited = waited or not self._ws.has_queued_events
                    await self._read_directly()
                else:
                    await self._wait_changed()
                    waited = True
        finally:
            self._receiving = False

    async def _read_directly(self) -> None:
        """Read the next message from the calling task (a receive_some's, or aclose's), while
        no connection task has started, and feed it to the endpoint. A young stream's bytes
        thus reach the application with no trip through the scheduler and no task start:
        the connection task starts only when a second task waits on the stream, a send needs
        the writer, or ``DIRECT_READ_TIME`` after the stream opened (a read still waiting
        then stops, and the task takes over). A stream that ends sooner never starts it.

        The peer's close ends the stream here as the connection task would end it. A lost
        connection is left on the WebSocket, and a broken frame for the connection task
        (``_early_failure``): it starts at once, finds them and resumes or fails."""
        ws = self._ws
        self._app_reading = True
        try:
            with trio.move_on_at(self._dormant_until) as self._direct_read:
                try:
                    messages = await ws.receive_messages(MAX_MESSAGE)
                except ConnectionClosed as exc:
                    if exc.code == ABNORMAL_CLOSURE:
                        self._need_reader()  # resume
                    else:
                        self._on_close(exc)
                    return
                try:
                    for parts in messages:
                        for part in parts:
                            self._endpoint.receive_data(part)
                except DevstreamError as exc:
                    self._early_failure = exc
                    self._need_reader()  # it closes the WebSocket with the error
                if self._endpoint.has_output:
                    self._send_now()
        finally:
            self._app_reading = False
            self._direct_read = None
            self._changed.unpark_all()

    async def _wait_or_read(self) -> None:
        """Wait for the stream to change: read the next message from this task while no
        connection task runs (see _read_directly), else wait for what it reads."""
        if not self._task_started and not self._app_reading:
            await self._read_directly()
        else:
            await self._wait_changed()

    def _need_reader(self) -> None:
        """Have the connection task read: start it, if it has not started. A read of the
        application's that waits meanwhile stops (nothing read is lost): the connection task
        also starts the writer, which the peer may be waiting on to send what that read
        waits for."""
        if not self._task_started:
            self._start_task()
        if self._direct_read is not None:
            self._direct_read.cancel()

    def _start_task(self) -> None:
        """Start the connection task, once. It starts only when something needs it (most
        streams read their first message without it) or DIRECT_READ_TIME after the stream
        opened: a new stream pays for no task start on its way to its first bytes."""
        if not self._task_started:
            self._task_started = True
            self._nursery.start_soon(self._run)

    async def _wait_changed(self) -> None:
        """Wait for the stream to change; something the connection task reads is awaited."""
        self._need_reader()
        await self._changed.park()

    def _take_received(self, max_bytes: int | None) -> bytes | None:
        """What ``receive_some`` returns now: bytes, or ``b""`` at the peer's EOF; None while
        there is nothing yet. Raises ``trio.BrokenResourceError`` once the stream is broken."""
        endpoint = self._endpoint
        if endpoint.state is not EndpointState.RESET:
            data = endpoint.read(max_bytes)
            if endpoint.at_eof:
                # Read up to the peer's EOF: the acknowledgement waits a moment, so that the
                # send_eof() or aclose() that usually follows takes it along, in one message
                # with this side's EOF.
                if endpoint.has_output:
                    self._defer_ack()
                self._changed.unpark_all()
                return data
            if data:
                if endpoint.has_output:
                    self._send_now()  # an acknowledgement that is due
                return data
        self._check_broken()
        if self._peer_closed:
            raise trio.BrokenResourceError("the peer closed the stream before its EOF")
        return None

    async def reset(self, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        """Abort the stream; the peer sees a reset with *code* and *reason*."""
        await trio.lowlevel.checkpoint()
        if self._endpoint.state is EndpointState.OPEN:
            self._endpoint.reset(int(code), reason)
            self._send_now()

    async def aclose(self) -> None:
        """Finish the stream (EOF, wait for acknowledgement) and close the WebSocket.

        If the calling task is cancelled meanwhile, the stream is closed at once instead
        (trio's rule for ``aclose``): the WebSocket is dropped without finishing.
        """
        if self._local_closed:
            await trio.lowlevel.checkpoint()
            return
        self._local_closed = True
        closing = False
        try:
            closing = await self._finish()
        finally:
            if not self._task_started:
                # No connection task ever ran: this task ends the stream itself, reading
                # the peer's answer to the close first (as the task would have).
                self._task_started = True  # none will start now
                try:
                    if closing:
                        await self._read_until_closed()
                finally:
                    self._finished.set()
                    self._changed.unpark_all()
                    await self._ws.abort()
            elif closing:
                # The connection task reads the peer's answer to the close, then drops the
                # transport: no cancellation. It gives up waiting after close_timeout, and
                # a transport lost meanwhile is not resumed.
                self._closing = True
                self._scope.deadline = min(
                    self._scope.deadline, trio.current_time() + self.close_timeout
                )
            else:
                self._scope.cancel()
                self._start_task()  # its end drops the WebSocket

    async def _read_until_closed(self) -> None:
        """Read (and drop) what comes until the WebSocket's closing handshake is over, for up
        to ``close_timeout``."""
        ws = self._ws
        with trio.move_on_after(self.close_timeout):
            while ws.closed is None:
                try:
                    await ws.receive_messages(MAX_MESSAGE)
                except ConnectionClosed:
                    return

    def _over(self) -> bool:
        """True once nothing more can travel: failed, closed by the peer, or no task left."""
        return self._failure is not None or self._peer_closed or self._finished.is_set()

    async def _finish(self) -> bool:
        """Finish the stream; True when the connection task ends by itself: the closing
        handshake is under way (this side's close went out on a connection not known to be
        lost; a lost one is being resumed), or the peer closed."""
        endpoint = self._endpoint
        with trio.move_on_after(self.close_timeout):
            if endpoint.state is EndpointState.OPEN and not self._over():
                # The acknowledgement, if any, goes out with this side's EOF.
                to_send = self._take_peer_eof()
                if not self._eof_sent:
                    self._eof_sent = to_send = True
                    endpoint.write_eof()
                if to_send:
                    self._send_now()
                while not (endpoint.eof_acked or self._over()):
                    if endpoint.state is not EndpointState.OPEN and not endpoint.done:
                        break
                    await self._wait_or_read()
                    # Acknowledged while this side still waits for its own (the peer may be
                    # waiting too); after that, the close that follows tells the peer all it
                    # needs, in one message.
                    if not endpoint.eof_acked and self._take_peer_eof():
                        self._send_now()
        if endpoint.state is EndpointState.OPEN and not endpoint.eof_acked and not self._over():
            # Not acknowledged in time: the peer learns that not all was read.
            endpoint.reset(int(ErrorCode.STREAM_RESET), "closed before the peer read all")
        with trio.move_on_after(self.close_timeout):
            # The last frames go out (what the socket does not take, by the writer task),
            # then the close.
            self._send_now()
            while not self._over() and endpoint.has_output:
                await self._wait_changed()
            ws = self._ws
            if ws.is_open:
                await ws.send_close(NORMAL_CLOSURE, "")
            lost = ws.closed is not None and ws.closed.code == ABNORMAL_CLOSURE
            return (ws.close_sent and not lost) or self._peer_closed
        return False

    def _take_peer_eof(self) -> bool:
        """While closing: read the peer's EOF if it came after the last byte the application
        read (True: its acknowledgement is to be sent). The application reads no more and
        missed nothing, so the EOF is acknowledged, as reading it would have done: a peer
        closing at the same time, which did not read this side's EOF either, is not left
        waiting for ``close_timeout``. An EOF behind unread bytes stays unacknowledged, as an
        acknowledgement means "read"."""
        endpoint = self._endpoint
        if (
            endpoint.state is EndpointState.OPEN
            and endpoint.recv_state is RecvState.EOF_RECEIVED
            and endpoint.consumed == endpoint.received
        ):
            endpoint.read()
            return True
        return False

    def _check_can_send(self) -> None:
        if self._eof_sent or self._local_closed:
            raise trio.ClosedResourceError("send_eof() or aclose() was called")
        self._check_broken()
        if self._peer_closed:
            raise trio.BrokenResourceError("the peer closed the stream")

    def _check_broken(self) -> None:
        if self._endpoint.state is EndpointState.RESET and self._failure is None:
            info = self._endpoint.reset_info
            code, reason = info if info is not None else (int(ErrorCode.STREAM_RESET), "")
            self._failure = _reset_error(code, reason)
        if self._failure is not None:
            raise trio.BrokenResourceError(f"the stream ended: {self._failure}") from self._failure

    def _send_now(self) -> None:
        """Put what the endpoint has to send on the wire from the calling task, where the
        WebSocket takes it at once (no hand-off to the writer task, and nothing a
        cancellation could cut), and the close once the stream is done; wake the writer task
        only for the rest (a full socket, a send in progress, TLS); wake waiting callers."""
        ws, endpoint = self._ws, self._endpoint
        output = endpoint.has_output
        while output and ws.can_send_nowait:
            ws.send_bytes_nowait(endpoint.data_to_send(endpoint.message_size))
            output = endpoint.has_output
        state = endpoint.state
        if state is EndpointState.OPEN:
            # The usual case, in fewer steps: nothing to close.
            wake = output or ws.has_backlog
        else:
            reset = state is EndpointState.RESET
            finished = state is EndpointState.DONE or (reset and endpoint.reset_settled)
            if finished and ws.is_open and not output:
                ws.send_close_nowait(NORMAL_CLOSURE)  # the stream is over: close the WebSocket
            wake = output or ws.has_backlog or (finished and ws.is_open) or (reset and not finished)
        if wake:
            self._wake_writer()
        elif self._ack_due:
            # A deferred acknowledgement went out with this: the connection task's timer
            # goes back to its keepalive deadline.
            self._ack_due = False
            if self._read_timer is not None:
                self._read_timer.deadline = self._read_wake
        self._changed.unpark_all()

    def _defer_ack(self) -> None:
        """Leave what the endpoint has to send for up to ``ACK_DELAY``: the connection task
        sends it then, unless a send from the application took it along first."""
        timer = self._read_timer
        if timer is None:
            if self._task_started:
                self._wake_writer()  # no connection task reading: the writer sends it
            else:
                # A young stream: its task starts in ACK_DELAY, unless a send took the
                # acknowledgement along first, and sends what is due first.
                self._starter.add(self, trio.current_time() + ACK_DELAY)
            return
        self._ack_due = True
        timer.deadline = min(timer.deadline, trio.current_time() + ACK_DELAY)

    def _wake_writer(self) -> None:
        """Have the writer task write what the endpoint has; start it if it is not running.
        Most streams never need it: what they send goes out from the calling task."""
        self._send_wanted.set()
        if self._writer_nursery is None:
            self._need_reader()  # the writer starts with the connection task's first read
        elif not self._writer_running:
            self._writer_running = True
            self._writer_idle = False
            self._writer_nursery.start_soon(self._write_loop, self._ws)

    # -- the connection task -----------------------------------------------------------------

    async def _run(self) -> None:
        first = True
        try:
            with self._scope:
                while self._app_reading:  # a read of the application's, told to stop
                    await self._changed.park()
                while True:
                    if not first:
                        self._endpoint.connection_made(resumed=True)
                        self._send_now()
                    elif self._endpoint.has_output:
                        self._send_now()  # (the application's tasks sent the rest)
                    first = False
                    try:
                        await self._serve(self._ws)
                        return
                    except _Dropped:
                        if self._closing:
                            return  # lost while closing: nothing left to resume for
                    self._endpoint.connection_lost()
                    await self._ws.abort()  # release the dead transport before the next one
                    log.info(
                        "stream %s (%s): connection dropped; resuming",
                        self.stream_id,
                        self.role.value,
                    )
                    self._ws = await self._resume()
                    self.resumes += 1
                    log.info(
                        "stream %s (%s): resumed (%d)",
                        self.stream_id,
                        self.role.value,
                        self.resumes,
                    )
        except DevstreamError as exc:
            self._failure = exc
        finally:
            self._finished.set()
            self._changed.unpark_all()
            await self._ws.abort()

    async def _serve(self, ws: WebSocket) -> None:
        """Run one WebSocket until the stream ends (return) or the WebSocket drops.

        This task reads, and keeps the WebSocket alive: it pings every ``ping_interval`` (by
        way of the writer task) and drops a WebSocket silent for ``ping_interval +
        ping_timeout``. The writer task, started when first needed, writes what the calling
        tasks could not write at once. A stream that ends normally ends both tasks without a
        cancellation."""
        # The drop leaves the nursery by hand: trio would wrap it in an ExceptionGroup.
        dropped = False
        self._stop_writer = self._ping_wanted = False
        async with trio.open_nursery() as nursery:
            self._writer_nursery = nursery
            if self._send_wanted.is_set():
                self._wake_writer()  # wanted before this connection was up
            try:
                dropped = await self._read_loop(ws)
            except ConnectionClosed as exc:
                if exc.code == ABNORMAL_CLOSURE:
                    dropped = True
                else:
                    self._on_close(exc)
            finally:
                self._writer_nursery = None
                if self._writer_running and self._writer_idle:
                    self._stop_writer = True
                    self._send_wanted.set()
                elif self._writer_running:
                    nursery.cancel_scope.cancel()  # stop a write in progress
        if dropped:
            raise _Dropped

    async def _read_loop(self, ws: WebSocket) -> bool:
        """Feed what arrives to the endpoint until the WebSocket closes (ConnectionClosed) or
        the endpoint fails (return False); return True when the WebSocket went silent."""
        limit = self.ping_interval + self.ping_timeout
        failure, self._early_failure = self._early_failure, None
        next_ping = trio.current_time() + self.ping_interval
        # When a message stopped half-way, the connection is probed once (a ping), and again
        # only after more bytes came (see STALL_PROBE).
        probed = -math.inf
        while failure is None:
            self._read_wake = min(ws.last_received + limit, next_ping)
            # One timer per ping interval, not per read: a read cancelled while it waits
            # loses nothing. A deferred acknowledgement brings it forward (_defer_ack).
            try:
                with trio.move_on_at(self._read_wake) as self._read_timer:
                    if self._ack_due:
                        self._read_timer.deadline = trio.current_time() + ACK_DELAY
                    while True:
                        messages = await ws.receive_messages(
                            MAX_MESSAGE,
                            stall_timeout=STALL_PROBE if ws.last_received != probed else None,
                        )
                        if not messages:
                            # A message stopped half-way: is the connection still there?
                            probed = ws.last_received
                            self._ping_wanted = True
                            self._wake_writer()
                            continue
                        try:
                            for parts in messages:
                                for part in parts:
                                    self._endpoint.receive_data(part)
                        except DevstreamError as exc:
                            failure = exc
                            break
                        self._send_now()  # acknowledgements, from this task where it can
            finally:
                self._read_timer = None
            if failure is not None:
                break
            if self._ack_due:
                self._ack_due = False
                self._send_now()
            now = trio.current_time()
            if now >= ws.last_received + limit:
                log.info(
                    "stream %s (%s): no answer to pings; dropping the connection",
                    self.stream_id,
                    self.role.value,
                )
                await ws.abort()
                return True
            if now >= next_ping:
                next_ping = now + self.ping_interval
                self._ping_wanted = True
                self._wake_writer()
        self._failure = failure
        await ws.send_close(failure.code.close_code, failure.message[:100])
        return False

    def _on_close(self, exc: ConnectionClosed) -> None:
        if exc.code == NORMAL_CLOSURE:
            self._peer_closed = True
            return
        code, message = parse_close_reason(exc.reason)
        if code is not None:
            self._failure = error_for(code, message)
        else:
            self._failure = HubError(
                ErrorCode.PROTOCOL_ERROR, f"stream closed: {exc.code} {exc.reason}".rstrip()
            )

    async def _write_loop(self, ws: WebSocket) -> None:
        try:
            while True:
                self._writer_idle = True
                await self._send_wanted.wait()
                self._writer_idle = False
                self._send_wanted = trio.Event()
                if self._stop_writer:
                    return
                try:
                    if ws.has_backlog:
                        await ws.flush()  # what _send_now could not write at once
                    while True:
                        data = self._endpoint.data_to_send(self._endpoint.message_size)
                        if not data:
                            break
                        await ws.send_bytes(data)
                    if self._ping_wanted:
                        self._ping_wanted = False
                        await ws.ping()
                except ConnectionClosed:
                    return  # the reader sees the drop and resumes
                self._changed.unpark_all()
                if self._endpoint.done or (
                    self._endpoint.state is EndpointState.RESET and self._endpoint.reset_settled
                ):
                    await ws.send_close(NORMAL_CLOSURE, "")
                    return
        finally:
            self._writer_running = False
            self._writer_idle = True  # nothing left to stop

    async def _resume(self) -> WebSocket:
        """A new WebSocket to the stream. Each attempt waits up to ``ping_timeout`` for its
        answer (a connection lost on the way may never end on this side: one reset only at
        the hub's end, a relay that stopped forwarding); the next one starts after a short,
        growing delay, until ``resume_timeout`` has passed."""
        deadline = trio.current_time() + self.resume_timeout
        delay = 0.05
        while True:
            ws: WebSocket | None = None
            try:
                with trio.move_on_at(min(trio.current_time() + self.ping_timeout, deadline)):
                    ws = await self._reconnect(self._resume_token)
            except HubError as exc:
                if exc.code in _FINAL:
                    raise
                problem: DevstreamError = exc
            except DevstreamError as exc:
                problem = exc
            else:
                if ws is not None:
                    self._resume_token = resume_token_of(ws)
                    return ws
                problem = HubUnreachable(ErrorCode.HUB_UNREACHABLE, "no answer from the hub")
            if trio.current_time() >= deadline:
                raise HubUnreachable(
                    ErrorCode.HUB_UNREACHABLE, f"could not resume the stream: {problem.message}"
                )
            await trio.sleep(
                min(self._rng.uniform(delay / 2, delay), max(0.0, deadline - trio.current_time()))
            )
            delay = min(delay * 2, 5.0)


class _Starter:
    """Starts the connection tasks of one nursery's young streams when they are due: one
    task for all of them, running while any wait.

    A stream is due ``DIRECT_READ_TIME`` after it opened, and earlier when an
    acknowledgement it deferred is still waiting ``ACK_DELAY`` later (see
    FramedStream._defer_ack); a stream whose task started meanwhile, or that ended, is
    skipped. A task that wakes starts every stream due within the next half ``ACK_DELAY``,
    so under many streams it wakes at most about once per half ``ACK_DELAY``. Cancelled (its
    nursery is), it drops the WebSockets of the streams it never started, as their own tasks
    would have.
    """

    __slots__ = ("_added", "_due", "_nursery", "_running", "_sleep")

    def __init__(self, nursery: trio.Nursery) -> None:
        #: Weakly: the starter is kept in a WeakKeyDictionary by its nursery, which a
        #: strong reference from here would keep alive for ever.
        self._nursery = weakref.ref(nursery)
        #: (when, order added, stream): a heap.
        self._due: list[tuple[float, int, FramedStream]] = []
        self._added = 0
        self._running = False
        #: The task's wait for the first one due.
        self._sleep: trio.CancelScope | None = None

    def add(self, stream: FramedStream, when: float) -> None:
        """Start *stream*'s connection task at *when*, if nothing started it sooner."""
        if not self._running:
            nursery = self._nursery()
            assert nursery is not None  # the stream's own reference keeps it
            nursery.start_soon(self._run)  # raises as FramedStream's own start would
            self._running = True
        self._added += 1
        heapq.heappush(self._due, (when, self._added, stream))
        if self._sleep is not None and when < self._sleep.deadline:
            self._sleep.deadline = when

    async def _run(self) -> None:
        due = self._due
        try:
            while due:
                if due[0][2]._task_started:
                    heapq.heappop(due)
                    continue
                with trio.CancelScope(deadline=due[0][0]) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
                soon = trio.current_time() + ACK_DELAY / 2
                while due and due[0][0] <= soon:
                    when, _, stream = heapq.heappop(due)
                    if stream._task_started:
                        continue
                    if when < stream._dormant_until and not stream._endpoint.has_output:
                        continue  # the acknowledgement went out with a send meanwhile
                    stream._need_reader()
        finally:
            self._running = False
            self._sleep = None
            while due:
                stream = heapq.heappop(due)[2]
                if not stream._task_started:
                    stream._task_started = True
                    stream._finished.set()
                    stream._changed.unpark_all()
                    await stream._ws.abort()


#: Each nursery's starter (see _Starter), for as long as the nursery lives.
_STARTERS: weakref.WeakKeyDictionary[trio.Nursery, _Starter] = weakref.WeakKeyDictionary()


def _starter_for(nursery: trio.Nursery) -> _Starter:
    starter = _STARTERS.get(nursery)
    if starter is None:
        starter = _STARTERS[nursery] = _Starter(nursery)
    return starter


def _reset_error(code: int, reason: str) -> DevstreamError:
    try:
        known = ErrorCode(code)
    except ValueError:
        return StreamReset(ErrorCode.STREAM_RESET, reason or None, reset_code=code)
    if known is ErrorCode.STREAM_RESET:
        return StreamReset(ErrorCode.STREAM_RESET, reason or None, reset_code=code)
    return error_for(known, reason or None)
