"""devstream.v1 streams for application code: half-close, flow control, resume.

:class:`FramedStream` is a ``trio.abc.HalfCloseableStream`` that carries out what the core's
:class:`~devstream_core.streamdriver.StreamDriver` decides (the driver owns the
:class:`~devstream_core.framing.StreamEndpoint`): when acknowledgements go, when to ping, when a
connection counts as lost, when to reconnect and when to give up, how a close proceeds, how
big each message is. This module holds the trio side only: the WebSocket, the tasks, the
timers. One background task (in the nursery the client owns) keeps the WebSocket under it: it
reads frames, pings, and when the WebSocket drops without a close it reconnects to the
streaming endpoint with the stream's resume credential and lets the endpoint resend what the
peer is missing. That task starts only when something needs it: while
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

import dataclasses
import heapq
import logging
import math
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from devstream_core.common import Role
from devstream_core.errors import DevstreamError, ErrorCode, RemoteProtocolError
from devstream_core.framing import MAX_MESSAGE_SIZE, EndpointState, StreamEndpoint
from devstream_core.initiator import attempt_failure
from devstream_core.streamdriver import (
    ACK_DELAY,
    DIRECT_READ_TIME,
    STALL_PROBE,
    Action,
    DropConnection,
    Flush,
    Outcome,
    SendPing,
    StreamDriver,
    StreamOptions,
    StreamPhase,
)
from devstream_core.wire import MAX_FRAMED_MESSAGE_SIZE, resume_token

from ..transport.websocket import ABNORMAL_CLOSURE, ConnectionClosed, WebSocket

__all__ = [
    "ACK_DELAY",
    "DIRECT_READ_TIME",
    "STALL_PROBE",
    "FramedStream",
    "Reconnect",
    "StreamOptions",
]

log = logging.getLogger("devstream.stream")

#: The largest WebSocket message a FramedStream sends (whole frames only); each message is
#: as large as the endpoint's ``message_size`` says (smaller on a new connection).
MESSAGE_LIMIT = MAX_MESSAGE_SIZE
#: The largest WebSocket message it accepts.
MAX_MESSAGE = MAX_FRAMED_MESSAGE_SIZE

#: Opens a new WebSocket to the stream with a resume token; the new token is in its
#: ``handshake_headers``.
Reconnect = Callable[[str], Awaitable[WebSocket]]


def resume_token_of(ws: WebSocket) -> str:
    """The resume token the hub sent with the handshake, or ``""``."""
    return resume_token(ws.handshake_headers)


_DEFAULT_OPTIONS: Final = StreamOptions()
_OPEN: Final = StreamPhase.OPEN

#: Resume delays' jitter, for streams not given a generator of their own.
_JITTER = random.Random()


class FramedStream(trio.abc.HalfCloseableStream):
    """One side of a devstream.v1 stream.

    Every decision of the stream's life (acknowledgement delay, keepalive, stall probe,
    resume attempts and when to give up, the close procedure, message sizes) is made by its
    :class:`~devstream_core.streamdriver.StreamDriver`; this class carries them out with
    trio: the WebSocket, the tasks, the timers.
    """

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
        now = trio.current_time()
        self._driver = driver = StreamDriver(options, now=now)
        self._endpoint = driver.endpoint
        self._reconnect = reconnect
        self._resume_token = resume_token_of(ws)
        self._rng = rng or _JITTER
        self._ws = ws
        self._changed = trio.lowlevel.ParkingLot()
        self._send_wanted = trio.Event()
        #: The exception the stream's end is reported with, once made (see _error).
        self._failure: DevstreamError | None = None
        self._local_closed = False
        self._sending = False
        self._receiving = False
        self._scope = trio.CancelScope()
        self._writer_idle = self._stop_writer = self._ping_wanted = False
        #: The writer task runs only once something needs it (see _wake_writer).
        self._writer_running = False
        self._writer_ever_started = False
        self._writer_nursery: trio.Nursery | None = None
        #: The connection task's timer while it reads, the deadline it was armed for, and
        #: whether a deferred acknowledgement brought it forward (see _defer_ack).
        self._read_timer: trio.CancelScope | None = None
        self._read_wake = math.inf
        self._ack_due = False
        #: Until the connection task starts, the application's own tasks read (see
        #: _read_directly). It starts when something needs it, or when the driver's
        #: direct_read_until passes (see _need_reader, _Starter), and never for a stream over
        #: sooner.
        self._nursery = nursery
        self._task_started = False
        self._app_reading = False
        self._direct_read: trio.CancelScope | None = None
        # Connected from the start: what the application sends before the connection task
        # first runs goes out at once (see _send_now).
        driver.connection_made(now)
        self._starter = _starter_for(nursery)
        self._starter.add(self, driver.direct_read_until)

    # -- settings (the driver's options; a change applies to deadlines set after it) -----------

    @property
    def ping_interval(self) -> float:
        return self._driver.options.ping_interval

    @ping_interval.setter
    def ping_interval(self, value: float) -> None:
        self._driver.options = dataclasses.replace(self._driver.options, ping_interval=value)

    @property
    def ping_timeout(self) -> float:
        return self._driver.options.ping_timeout

    @ping_timeout.setter
    def ping_timeout(self, value: float) -> None:
        self._driver.options = dataclasses.replace(self._driver.options, ping_timeout=value)

    @property
    def resume_timeout(self) -> float:
        return self._driver.options.resume_timeout

    @resume_timeout.setter
    def resume_timeout(self, value: float) -> None:
        self._driver.options = dataclasses.replace(self._driver.options, resume_timeout=value)

    @property
    def close_timeout(self) -> float:
        return self._driver.options.close_timeout

    @close_timeout.setter
    def close_timeout(self, value: float) -> None:
        self._driver.options = dataclasses.replace(self._driver.options, close_timeout=value)

    # -- application side --------------------------------------------------------------------

    @property
    def window(self) -> int:
        """The flow-control window: the most bytes in flight towards the peer."""
        return self._endpoint.window

    @property
    def phase(self) -> StreamPhase:
        """Where the stream is in its life (see :class:`~devstream_core.streamdriver.StreamPhase`):
        ``CLOSED`` once nothing more travels and the WebSocket is let go."""
        return self._driver.phase

    @property
    def outcome(self) -> Outcome | None:
        """How the stream ended (completed, reset, closed by the peer, failed), once known."""
        return self._driver.outcome

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
        if not self._driver.eof_written:
            self._check_can_send()
            self._driver.write_eof()
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
        no connection task has started, and feed it to the driver. A young stream's bytes
        thus reach the application with no trip through the scheduler and no task start:
        the connection task starts only when a second task waits on the stream, a send needs
        the writer, or the driver's ``direct_read_until`` passes (a read still waiting then
        stops, and the task takes over). A stream that ends sooner never starts it.

        The other end's close is given to the driver as the connection task would give it;
        a lost connection, or a broken frame, starts the task (it resumes, or closes)."""
        ws = self._ws
        driver = self._driver
        self._app_reading = True
        try:
            with trio.move_on_at(driver.direct_read_until) as self._direct_read:
                try:
                    messages = await ws.receive_messages(MAX_MESSAGE)
                except ConnectionClosed as exc:
                    driver.connection_closed(exc.code, exc.reason, trio.current_time())
                    if driver.wants_connection:
                        self._need_reader()  # resume
                    return
                now = trio.current_time()
                try:
                    for parts in messages:
                        for part in parts:
                            driver.receive(part, now)
                except RemoteProtocolError:
                    self._need_reader()  # it closes the WebSocket with the error
                if self._endpoint.has_output or driver.closing is not None:
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
        streams read their first message without it) or when the stream stops being young:
        a new stream pays for no task start on its way to its first bytes."""
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
        try:
            data = self._driver.take(max_bytes, trio.current_time())
        except DevstreamError:
            self._check_broken()  # raises, with the first failure reported
            raise
        if data is None:
            return None
        if endpoint.at_eof:
            # Read up to the peer's EOF: the driver defers the acknowledgement a moment, so
            # that the send_eof() or aclose() that usually follows takes it along, in one
            # message with this side's EOF.
            if self._driver.ack_deferred:
                self._defer_ack()
            self._changed.unpark_all()
        elif endpoint.has_output:
            self._send_now()  # an acknowledgement that is due
        return data

    async def reset(self, code: int = ErrorCode.STREAM_RESET, reason: str = "") -> None:
        """Abort the stream; the peer sees a reset with *code* and *reason*."""
        await trio.lowlevel.checkpoint()
        if self._endpoint.state is EndpointState.OPEN:
            self._driver.reset(int(code), reason, trio.current_time())
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
                    await self._end()
            elif closing:
                # The connection task reads the peer's answer to the close, then drops the
                # transport: no cancellation. It gives up waiting at the driver's deadline,
                # and a transport lost meanwhile is not resumed.
                self._scope.deadline = min(
                    self._scope.deadline, trio.current_time() + self.close_timeout
                )
            else:
                self._scope.cancel()
                self._start_task()  # its end drops the WebSocket

    async def _end(self) -> None:
        """The stream is over for this side: nothing more travels; drop the transport."""
        self._driver.abort(trio.current_time())
        self._changed.unpark_all()
        await self._ws.abort()

    async def _read_until_closed(self) -> None:
        """Read (and drop) what comes until the WebSocket's closing handshake is over, for up
        to ``close_timeout``."""
        ws = self._ws
        with trio.move_on_after(self.close_timeout):
            while ws.closed is None:
                try:
                    await ws.receive_messages(MAX_MESSAGE)
                except ConnectionClosed as exc:
                    self._driver.connection_closed(exc.code, exc.reason, trio.current_time())
                    return

    async def _finish(self) -> bool:
        """Finish the stream as the driver's close procedure says; True when the connection
        task ends by itself: the closing handshake is under way (this side's close went out
        on a connection not known to be lost), or the peer closed."""
        driver = self._driver
        # The acknowledgement of a peer's EOF, if any, goes out with this side's EOF.
        driver.close(trio.current_time())
        self._send_now()
        if driver.phase is StreamPhase.CLOSING:
            with trio.move_on_at(driver.close_deadline):
                while driver.phase is StreamPhase.CLOSING:
                    await self._wait_or_read()
            if driver.phase is StreamPhase.CLOSING:
                # Not acknowledged in time: the driver resets the stream.
                self._carry_out(driver.timer(trio.current_time(), self._ws.last_received))
        if driver.phase is not StreamPhase.FINISHING:
            return self._driver.peer_closed
        with trio.move_on_at(driver.close_deadline):
            # The last frames go out (what the socket does not take, by the writer task),
            # then the close.
            self._send_now()
            while not driver.over and self._endpoint.has_output:
                await self._wait_changed()
            ws = self._ws
            close = driver.closing
            if close is not None and ws.is_open:
                await ws.send_close(close.code, close.reason)
                driver.close_sent(trio.current_time())
            lost = ws.closed is not None and ws.closed.code == ABNORMAL_CLOSURE
            return (ws.close_sent and not lost) or self._driver.peer_closed
        return False

    def _check_can_send(self) -> None:
        if self._driver.eof_written or self._local_closed:
            raise trio.ClosedResourceError("send_eof() or aclose() was called")
        self._check_broken()

    def _check_broken(self) -> None:
        """Raise ``trio.BrokenResourceError`` once the stream cannot carry on; its cause is
        the driver's :meth:`~devstream_core.streamdriver.StreamDriver.failure` (the first
        one, on every later call too)."""
        error = self._failure
        if error is None:
            error = self._failure = self._driver.failure()
        if error is not None:
            raise trio.BrokenResourceError(f"the stream ended: {error}") from error

    def _send_now(self) -> None:
        """Put what the driver has to send on the wire from the calling task, where the
        WebSocket takes it at once (no hand-off to the writer task, and nothing a
        cancellation could cut), and the close once the driver owes it; wake the writer task
        only for the rest (a full socket, a send in progress, TLS); wake waiting callers."""
        ws, driver, endpoint = self._ws, self._driver, self._endpoint
        output = endpoint.has_output
        while output and ws.can_send_nowait:
            ws.send_bytes_nowait(driver.next_message())
            output = endpoint.has_output
        phase = driver.phase
        if phase is _OPEN:
            # The usual case, in fewer steps: nothing to close.
            wake = output or ws.has_backlog
        else:
            close = driver.closing
            if close is not None and ws.is_open and ws.send_close_nowait(close.code, close.reason):
                driver.close_sent(trio.current_time())
                close = None
            wake = (
                output
                or ws.has_backlog
                or (close is not None and ws.is_open)
                or phase is StreamPhase.RESETTING
            )
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
        """Leave what the driver has to send until its acknowledgement deadline: the
        connection task sends it then, unless a send from the application took it first."""
        timer = self._read_timer
        deadline = self._driver.ack_deadline
        if timer is None:
            if self._task_started:
                self._wake_writer()  # no connection task reading: the writer sends it
            else:
                # A young stream: its task starts at the deadline, unless a send took the
                # acknowledgement along first, and sends what is due first.
                self._starter.add(self, deadline)
            return
        self._ack_due = True
        timer.deadline = min(timer.deadline, deadline)

    def _wake_writer(self) -> None:
        """Have the writer task write what the driver has; start it if it is not running.
        Most streams never need it: what they send goes out from the calling task."""
        self._send_wanted.set()
        if self._writer_nursery is None:
            self._need_reader()  # the writer starts with the connection task's first read
        elif not self._writer_running:
            self._writer_running = self._writer_ever_started = True
            self._writer_idle = False
            self._writer_nursery.start_soon(self._write_loop, self._ws)

    def _carry_out(self, actions: list[Action]) -> bool:
        """Do what the driver's timer asked; True when it asked to drop the connection."""
        drop = False
        for action in actions:
            if isinstance(action, Flush):
                self._send_now()
            elif isinstance(action, SendPing):
                self._ping_wanted = True
                self._wake_writer()
            elif isinstance(action, DropConnection):
                drop = True
        return drop

    # -- the nursery's starter ---------------------------------------------------------------

    @property
    def endpoint(self) -> StreamEndpoint:
        """For observability (tests, diagnostics): the core endpoint this stream drives, to
        read its state and counters (``state``, ``received``, ``eof_acked``...). Only its
        read-only properties are meant for use here: calling its methods would bypass the
        stream, which sends and wakes tasks for what the endpoint does."""
        return self._endpoint

    @property
    def writer_started(self) -> bool:
        """For observability (tests, diagnostics): whether the writer task ever started.
        Most streams never need it; what they send goes out from the calling task."""
        return self._writer_ever_started

    @property
    def background_started(self) -> bool:
        """Whether the stream's connection task started (or will never start)."""
        return self._task_started

    def start_if_due(self, when: float) -> None:
        """The nursery's starter calls this at *when*, a time this stream asked for: start the
        connection task, unless it started already, or what it was asked for went out
        meanwhile (a deferred acknowledgement taken along by a send)."""
        if self._task_started:
            return
        if when < self._driver.direct_read_until and not self._endpoint.has_output:
            return
        self._need_reader()

    async def abandon(self) -> None:
        """The nursery's starter calls this when it is cancelled (the nursery is): a stream
        whose connection task never started is over, as that task's end would have made it."""
        if not self._task_started:
            self._task_started = True
            await self._end()

    # -- the connection task -----------------------------------------------------------------

    async def _run(self) -> None:
        driver = self._driver
        try:
            with self._scope:
                while self._app_reading:  # a read of the application's, told to stop
                    await self._changed.park()
                if self._endpoint.has_output or driver.closing is not None:
                    self._send_now()  # (the application's tasks sent the rest)
                while True:
                    await self._serve(self._ws)
                    if not driver.wants_connection:
                        return
                    await self._ws.abort()  # release the dead transport before the next one
                    log.info(
                        "stream %s (%s): connection dropped; resuming",
                        self.stream_id,
                        self.role.value,
                    )
                    ws = await self._resume()
                    if ws is None:
                        return
                    self._ws = ws
                    self.resumes += 1
                    log.info(
                        "stream %s (%s): resumed (%d)",
                        self.stream_id,
                        self.role.value,
                        self.resumes,
                    )
                    self._send_now()
        finally:
            await self._end()

    async def _serve(self, ws: WebSocket) -> None:
        """Run one WebSocket until the stream ends or the WebSocket drops (the driver knows
        which).

        This task reads, and keeps the WebSocket alive as the driver's deadlines say (pings
        by way of the writer task; a WebSocket silent too long is dropped). The writer task,
        started when first needed, writes what the calling tasks could not write at once. A
        stream that ends normally ends both tasks without a cancellation."""
        if not self._driver.connected:
            return  # lost before this task started: resume
        self._stop_writer = self._ping_wanted = False
        async with trio.open_nursery() as nursery:
            self._writer_nursery = nursery
            if self._send_wanted.is_set():
                self._wake_writer()  # wanted before this connection was up
            try:
                await self._read_loop(ws)
            except ConnectionClosed as exc:
                self._driver.connection_closed(exc.code, exc.reason, trio.current_time())
            finally:
                self._writer_nursery = None
                if self._writer_running and self._writer_idle:
                    self._stop_writer = True
                    self._send_wanted.set()
                elif self._writer_running:
                    nursery.cancel_scope.cancel()  # stop a write in progress

    async def _read_loop(self, ws: WebSocket) -> None:
        """Feed what arrives to the driver until the WebSocket closes (ConnectionClosed), the
        peer breaks the protocol (the error's close goes out), or the driver's timer says
        the WebSocket went silent (dropped)."""
        driver = self._driver
        while not driver.over:
            self._read_wake = driver.next_deadline(ws.last_received)
            # One timer per deadline, not per read: a read cancelled while it waits loses
            # nothing. A deferred acknowledgement brings it forward (_defer_ack).
            try:
                with trio.move_on_at(self._read_wake) as self._read_timer:
                    while True:
                        messages = await ws.receive_messages(
                            MAX_MESSAGE, stall_timeout=driver.stall_timeout(ws.last_received)
                        )
                        now = trio.current_time()
                        if not messages:
                            # A message stopped half-way: is the connection still there?
                            self._carry_out(driver.message_stalled(ws.last_received, now))
                            continue
                        try:
                            for parts in messages:
                                for part in parts:
                                    driver.receive(part, now)
                        except RemoteProtocolError:
                            break
                        self._send_now()  # acknowledgements, from this task where it can
            finally:
                self._read_timer = None
                self._ack_due = False
            if driver.over:
                break
            if self._carry_out(driver.timer(trio.current_time(), ws.last_received)):
                if driver.phase is not StreamPhase.CLOSED:
                    log.info(
                        "stream %s (%s): no answer to pings; dropping the connection",
                        self.stream_id,
                        self.role.value,
                    )
                await ws.abort()
                driver.connection_lost(trio.current_time())
                return
        # Broken by the peer: the Reset goes out if it can, then the error's close.
        self._send_now()
        close = driver.closing
        if close is not None and ws.is_open:
            await ws.send_close(close.code, close.reason)
            driver.close_sent(trio.current_time())

    async def _write_loop(self, ws: WebSocket) -> None:
        driver = self._driver
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
                    while data := driver.next_message():
                        await ws.send_bytes(data)
                    if self._ping_wanted:
                        self._ping_wanted = False
                        await ws.ping()
                except ConnectionClosed:
                    return  # the reader sees the drop and resumes
                self._changed.unpark_all()
                close = driver.closing
                if close is not None:
                    await ws.send_close(close.code, close.reason)
                    driver.close_sent(trio.current_time())
                    return
        finally:
            self._writer_running = False
            self._writer_idle = True  # nothing left to stop

    async def _resume(self) -> WebSocket | None:
        """A new WebSocket to the stream, with attempts, their deadlines and the delays
        between them as the driver says; None when the driver gave up."""
        driver = self._driver
        while True:
            deadline = driver.connect_started(trio.current_time())
            ws: WebSocket | None = None
            error: DevstreamError | None = None
            try:
                with trio.move_on_at(deadline):
                    ws = await self._reconnect(self._resume_token)
            except DevstreamError as exc:
                error = exc
            if ws is not None:
                self._resume_token = resume_token_of(ws)
                driver.connection_made(trio.current_time())
                return ws
            code, message = attempt_failure(error)
            retry_at = driver.connect_failed(
                trio.current_time(), self._rng.random(), code=code, message=message
            )
            if retry_at is None:
                return None
            await trio.sleep_until(retry_at)


class _Starter:
    """Starts the connection tasks of one nursery's young streams when they are due: one
    task for all of them, running while any wait.

    A stream is due when it stops being young (its driver's ``direct_read_until``), and
    earlier when an acknowledgement it deferred is still waiting at its deadline (see
    FramedStream._defer_ack); a stream whose task started meanwhile, or that ended, is
    skipped. A task that wakes starts every stream due within the next half ``ACK_DELAY``,
    so under many streams it wakes at most about once per half ``ACK_DELAY``. Cancelled (its
    nursery is), it abandons the streams it never started, as their own tasks would have.
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
                if due[0][2].background_started:
                    heapq.heappop(due)
                    continue
                with trio.CancelScope(deadline=due[0][0]) as self._sleep:
                    await trio.sleep_forever()
                self._sleep = None
                soon = trio.current_time() + ACK_DELAY / 2
                while due and due[0][0] <= soon:
                    when, _, stream = heapq.heappop(due)
                    stream.start_if_due(when)
        finally:
            self._running = False
            self._sleep = None
            while due:
                await heapq.heappop(due)[2].abandon()


#: Each nursery's starter (see _Starter), for as long as the nursery lives.
_STARTERS: weakref.WeakKeyDictionary[trio.Nursery, _Starter] = weakref.WeakKeyDictionary()


def _starter_for(nursery: trio.Nursery) -> _Starter:
    starter = _STARTERS.get(nursery)
    if starter is None:
        starter = _STARTERS[nursery] = _Starter(nursery)
    return starter
