"""devstream.v1 streams for application code: half-close, flow control, resume.

:class:`FramedStream` is a ``trio.abc.HalfCloseableStream`` that carries out what the core's
:class:`~devstream_core.streamdriver.StreamDriver` decides (the driver owns the
:class:`~devstream_core.framing.StreamEndpoint`): when acknowledgements go, when to ping, when a
connection counts as lost, when to reconnect and when to give up, how a close proceeds, how big
each message is; the trio side (the WebSocket, the tasks, the timers) is its base class,
:class:`~devstream_trio.client.framed_connection.FramedConnection`. One background task (in the
nursery the client owns) keeps the WebSocket under it: it reads frames, pings, and when the
WebSocket drops without a close it reconnects to the streaming endpoint with the stream's resume
credential and lets the endpoint resend what the peer is missing. That task starts only when
something needs it: while a stream is young (``DIRECT_READ_TIME``, 100 ms), the application's
own ``receive_some`` and ``aclose`` read the socket, so a stream's first bytes reach the
application without a task start or a trip through the scheduler, and a short stream (a request,
its answer, the close) never starts a task at all. The connection task starts when a second task
waits on the stream, when a send leaves bytes the socket did not take, or ``DIRECT_READ_TIME``
after the stream opened (one task per nursery starts those). Frames go out from the task that
made them when the socket takes them at once; a second task, started only when needed, writes
the rest (a full socket, TLS). Application code sees none of that, except in logs and in
``resumes``.

A connection lost on the way may be reset at the hub's end only (a relay or a middlebox
resets the socket it was reading from): the hub holds the stream, and this end, waiting for
bytes, hears nothing. The hub writes each message whole, so a message that stops half-way for
``STALL_PROBE`` (50 ms) makes the connection task ping at once: the write meets the reset and
the stream resumes, instead of at the next ping, up to ``ping_interval`` later. A cut between
two messages is found the same way while something is in flight: what the application read
is acknowledged ``IDLE_ACK`` (50 ms) after the last bytes arrived, and frames that have waited
``ACK_PROBE`` (200 ms) for their acknowledgement, with nothing arriving, make it ping (then
twice as long after each answer). A stream with nothing in flight hears of such a cut at its
next ping, or when it next writes. A probe ping answered by nothing at all for
``PROBE_TIMEOUT`` (3 s) drops the connection, and the stream resumes: a connection that
went silent both ways (a NAT that forgot it) is left within seconds of the write that waits.

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

import contextlib
import dataclasses
import math

import trio

from devstream_core.errors import DevstreamError, ErrorCode, RemoteProtocolError
from devstream_core.framing import EndpointState
from devstream_core.streamdriver import (
    ACK_DELAY,
    ACK_PROBE,
    DIRECT_READ_TIME,
    IDLE_ACK,
    PROBE_TIMEOUT,
    STALL_PROBE,
    Outcome,
    StreamOptions,
    StreamPhase,
)

from ..transport.websocket import ABNORMAL_CLOSURE, ConnectionClosed
from .framed_connection import (
    MAX_MESSAGE,
    MESSAGE_LIMIT,
    FramedConnection,
    Reconnect,
    resume_token_of,
)

__all__ = [
    "ACK_DELAY",
    "ACK_PROBE",
    "DIRECT_READ_TIME",
    "IDLE_ACK",
    "MAX_MESSAGE",
    "MESSAGE_LIMIT",
    "PROBE_TIMEOUT",
    "STALL_PROBE",
    "FramedStream",
    "Reconnect",
    "StreamOptions",
    "resume_token_of",
]


class FramedStream(FramedConnection, trio.abc.HalfCloseableStream):
    """One side of a devstream.v1 stream.

    Every decision of the stream's life (acknowledgement delay, keepalive, stall probe,
    resume attempts and when to give up, the close procedure, message sizes) is made by its
    :class:`~devstream_core.streamdriver.StreamDriver`; this class carries them out with
    trio: the WebSocket, the tasks, the timers.
    """

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

    async def _read_directly(self, deadline: float = math.inf) -> None:
        """Read the next message from the calling task (a receive_some's, or aclose's), while
        no connection task has started, and feed it to the driver. A young stream's bytes
        thus reach the application with no trip through the scheduler and no task start:
        the connection task starts only when a second task waits on the stream, a send needs
        the writer, or the driver's ``direct_read_until`` passes (a read still waiting then
        stops, and the task takes over). A stream that ends sooner never starts it.

        The other end's close is given to the driver as the connection task would give it;
        a lost connection, or a broken frame, starts the task (it resumes, or closes).

        The read has no deadline of its own: at ``direct_read_until`` the nursery's starter
        starts the connection task, which stops a read still waiting (``_need_reader``). A
        timer per read would cost more than the read. A caller that waits with a deadline
        of its own (aclose's, for the peer's acknowledgement) gives it as *deadline*: one
        cancel scope, not two (each costs about as much as the read's own Python)."""
        ws = self._ws
        driver = self._driver
        self._app_reading = True
        try:
            with trio.CancelScope(deadline=deadline) as self._direct_read:
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
            if self._changed:
                self._changed.unpark_all()

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
            if self._changed:
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
        closing = finished = redeliver = False
        try:
            closing = await self._finish()
            finished = True
        finally:
            if not self._task_started:
                # No connection task ever ran: this task ends the stream itself, reading
                # the peer's answer to the close first (as the task would have).
                self._task_started = True  # none will start now
                self._starter.drop_ended()
                try:
                    if closing:
                        await self._read_until_closed()
                    redeliver = finished and self._lost_under_close()
                finally:
                    if redeliver:
                        self._task_started = False
                        self._start_task()  # it resumes (see _await_closed)
                    else:
                        await self._end()
            elif closing:
                # The connection task reads the peer's answer to the close, then drops the
                # transport: no cancellation. It gives up waiting at the driver's deadline,
                # and a transport lost meanwhile is resumed once to send the last frames
                # again (see StreamDriver.connection_lost). This call waits for that, as it
                # waits where no task runs (_read_until_closed).
                self._scope.deadline = min(
                    self._scope.deadline, trio.current_time() + self.close_timeout
                )
                redeliver = finished
            elif finished and self._lost_under_close():
                redeliver = True  # the connection task finds the loss too, and resumes
            else:
                self._scope.cancel()
                self._start_task()  # its end drops the WebSocket
        if redeliver:
            await self._await_closed()

    def _lost_under_close(self) -> bool:
        """Whether the connection was lost under the close (the driver is told), and the
        driver resumes to send its last frames and its close again."""
        driver, closed = self._driver, self._ws.closed
        if driver.connected and closed is not None and closed.code == ABNORMAL_CLOSURE:
            driver.connection_lost(trio.current_time())
        return driver.wants_connection

    async def _await_closed(self) -> None:
        """Wait, until the driver's close deadline, while the connection task reads the
        answer to the close, or resumes to send the last frames and the close again.
        ``aclose`` waits, as it waits for the peer's acknowledgement: a program that ends
        once it returned would cut a resume short, and the peer would wait its
        close_timeout, then reset a stream that completed."""
        driver = self._driver
        deadline = driver.close_deadline
        self._scope.deadline = min(self._scope.deadline, deadline)
        with trio.move_on_at(deadline):
            while driver.phase is not StreamPhase.CLOSED:
                await self._changed.park()

    async def _read_until_closed(self) -> None:
        """Read (and drop) what comes until the WebSocket's closing handshake is over, for up
        to ``close_timeout``."""
        ws = self._ws
        # The peer's close may have come with its last frames: answered at once, with no
        # timer, when the socket takes the answer.
        closed = ws.answer_queued_close_nowait()
        if closed is not None:
            self._driver.connection_closed(closed.code, closed.reason, trio.current_time())
            if ws.has_backlog:  # the socket took part of the answer: the rest, in time
                with trio.move_on_after(self.close_timeout), contextlib.suppress(ConnectionClosed):
                    await ws.flush()
            return
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
            deadline = driver.close_deadline
            while driver.phase is StreamPhase.CLOSING:
                if self._task_started or self._app_reading:
                    # The connection task reads (or another task of the application's does,
                    # and the task takes over): wait for what it reads.
                    with trio.move_on_at(deadline):
                        while driver.phase is StreamPhase.CLOSING:
                            await self._wait_changed()
                    break
                # Read from this task (see _read_directly), until the deadline.
                await self._read_directly(deadline)
                if trio.current_time() >= deadline:
                    break
            if driver.phase is StreamPhase.CLOSING:
                # Not acknowledged in time: the driver resets the stream.
                self._carry_out(driver.timer(trio.current_time(), self._ws.last_received))
        if driver.phase is not StreamPhase.FINISHING:
            return self._driver.peer_closed
        # The last frames go out (what the socket does not take, by the writer task), then
        # the close; usually all of it from this task at once, with nothing to wait for.
        self._send_now()
        ws = self._ws
        if (driver.over or not self._endpoint.has_output) and (
            driver.closing is None or not (ws.is_open or ws.sending)
        ):
            # Nothing owed, or the close is out (or the peer's, read, is answered by the read
            # that follows, without a timer): nothing to wait for. A close the writer task is
            # still writing is waited for below: an application that lets the stream's
            # nursery go once aclose returned would cut it.
            return self._closing_under_way()
        with trio.move_on_at(driver.close_deadline):
            while not driver.over and self._endpoint.has_output:
                await self._wait_changed()
            close = driver.closing
            if close is not None:
                # Sends the close, or (the writer task writing it) waits until it is written
                # (the other side would wait for it, or be held for its resume).
                await ws.send_close(close.code, close.reason)
                driver.close_sent(trio.current_time())
            return self._closing_under_way()
        return False

    def _closing_under_way(self) -> bool:
        """_finish's answer once the close is out: this side's close went out on a connection
        not known to be lost, or the peer closed (its close may have come with its last
        frames, read but not yet answered: the read that follows answers it)."""
        ws = self._ws
        lost = ws.closed is not None and ws.closed.code == ABNORMAL_CLOSURE
        return (
            (ws.close_sent and not lost) or self._driver.peer_closed or ws.queued_close is not None
        )

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
