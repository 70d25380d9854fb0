"""The connection under a devstream.v1 stream, with trio: :class:`FramedConnection`.

:class:`~devstream_trio.client.framed.FramedStream` is the stream the application uses; this
module is what it stands on, the part that carries out its
:class:`~devstream_core.streamdriver.StreamDriver`'s decisions on the wire:

* what the driver has to send goes out from the calling task when the WebSocket takes it at
  once (``_send_now``); the rest, the pings and the close go out from a writer task
  (:class:`_Writer`) that starts only when something needs it;
* the connection task (``_run``) reads, keeps the WebSocket alive, and when it drops without a
  close resumes the stream over a new one (:func:`resume_connection`); it starts only when
  something needs it, or once the stream is no longer young (:class:`_Starter`, one task per
  nursery for all young streams), so that a short stream never starts a task.

See :mod:`devstream_trio.client.framed` for the behaviour the application sees.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import weakref
from collections.abc import Awaitable, Callable
from typing import Final

import trio

from devstream_core.common import Role
from devstream_core.errors import DevstreamError, RemoteProtocolError
from devstream_core.framing import MAX_MESSAGE_SIZE, StreamEndpoint
from devstream_core.initiator import attempt_failure
from devstream_core.streamdriver import (
    ACK_DELAY,
    Action,
    DropConnection,
    Flush,
    SendPing,
    StreamDriver,
    StreamOptions,
    StreamPhase,
)
from devstream_core.wire import MAX_FRAMED_MESSAGE_SIZE, resume_token

from ..transport.websocket import ConnectionClosed, WebSocket

__all__ = ["MAX_MESSAGE", "MESSAGE_LIMIT", "FramedConnection", "Reconnect", "resume_token_of"]

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


class FramedConnection:
    """The connection side of one devstream.v1 stream: its driver, its WebSocket, the tasks
    that read and write it and resume the stream when it drops. :class:`FramedStream` adds
    what the application calls."""

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
        rejoined: bool = False,
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
        #: The exception the stream's end is reported with, once made (see _error).
        self._failure: DevstreamError | None = None
        self._local_closed = False
        self._sending = False
        self._receiving = False
        self._scope = trio.CancelScope()
        #: The writer task runs only once something needs it (see _wake_writer).
        self._writer = _Writer(driver, self._changed)
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
        driver.connection_made(now, rejoined=rejoined)
        self._starter = _starter_for(nursery)
        self._starter.add(self, driver.direct_read_until)

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

    async def _end(self) -> None:
        """The stream is over for this side: nothing more travels; drop the transport."""
        self._driver.abort(trio.current_time())
        if self._changed:
            self._changed.unpark_all()
        await self._ws.abort()

    def _send_now(self) -> None:
        """Put what the driver has to send on the wire from the calling task, where the
        WebSocket takes it at once (no hand-off to the writer task, and nothing a
        cancellation could cut), and the close once the driver owes it; wake the writer task
        only for the rest (a full socket, a send in progress, TLS); wake waiting callers."""
        ws, driver, endpoint = self._ws, self._driver, self._endpoint
        output = endpoint.has_output
        now = trio.current_time() if output else 0.0
        while output and ws.can_send_nowait:
            message = driver.next_message(now)
            output = endpoint.has_output
            # The close, once due after the last frames, goes out in the same write.
            close = None if output or driver.phase is _OPEN else driver.closing
            ws.send_bytes_nowait(message, then_close=close)
            if close is not None:
                driver.close_sent(trio.current_time())
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
        self._timer_forward()
        if self._changed:  # (an empty lot's unpark_all costs more than this look)
            self._changed.unpark_all()

    def _timer_forward(self) -> None:
        """Bring the connection task's timer forward to the driver's next deadline, if that
        is sooner: what arrived or went out may have made one (an idle Ack, a probe of frames
        waiting for their acknowledgement)."""
        timer = self._read_timer
        if timer is not None:
            due = self._driver.next_deadline(self._ws.last_received)
            if due < timer.deadline:
                timer.deadline = due

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
        writer = self._writer
        writer.wanted.set()
        if writer.nursery is None:
            self._need_reader()  # the writer starts with the connection task's first read
        else:
            writer.start(self._ws, self._timer_forward)

    def _carry_out(self, actions: list[Action]) -> bool:
        """Do what the driver's timer asked; True when it asked to drop the connection."""
        drop = False
        for action in actions:
            if isinstance(action, Flush):
                self._send_now()
            elif isinstance(action, SendPing):
                self._writer.ping_wanted = True
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
        return self._writer.ever_started

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
                    ws = await resume_connection(
                        driver, self._reconnect, self._resume_token, self._rng
                    )
                    if ws is None:
                        return
                    self._ws = ws
                    self._resume_token = resume_token_of(ws)
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
        writer = self._writer
        writer.stop = writer.ping_wanted = False
        async with trio.open_nursery() as nursery:
            writer.nursery = nursery
            if writer.wanted.is_set():
                self._wake_writer()  # wanted before this connection was up
            try:
                await self._read_loop(ws)
            except ConnectionClosed as exc:
                self._driver.connection_closed(exc.code, exc.reason, trio.current_time())
            finally:
                writer.nursery = None
                if writer.running and writer.idle:
                    writer.stop = True
                    writer.wanted.set()
                elif writer.running:
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


class _Starter:
    """Starts the connection tasks of one nursery's young streams when they are due: one
    task for all of them, running while any wait.

    A stream is due when it stops being young (its driver's ``direct_read_until``), and
    earlier when an acknowledgement it deferred is still waiting at its deadline (see
    FramedConnection._defer_ack); a stream whose task started meanwhile, or that ended, is
    skipped. A task that wakes starts every stream due within the next half ``ACK_DELAY``,
    so under many streams it wakes at most about once per half ``ACK_DELAY``. Cancelled (its
    nursery is), it abandons the streams it never started, as their own tasks would have.
    """

    __slots__ = ("_added", "_due", "_linger", "_nursery", "_running", "_sleep")

    def __init__(self, nursery: trio.Nursery) -> None:
        #: Weakly: the starter is kept in a WeakKeyDictionary by its nursery, which a
        #: strong reference from here would keep alive for ever.
        self._nursery = weakref.ref(nursery)
        #: (when, order added, stream): a heap.
        self._due: list[tuple[float, int, FramedConnection]] = []
        self._added = 0
        self._running = False
        #: The task's wait for the first one due.
        self._sleep: trio.CancelScope | None = None
        #: Until when the task stays without a stream to start: the latest time a stream that
        #: ended young was due (see _run).
        self._linger = -math.inf

    def add(self, stream: FramedConnection, when: float) -> None:
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

    def drop_ended(self) -> None:
        """A stream ended young: no wake-up for what it asked (its deferred acknowledgement
        went out with its end). The streams that ended are dropped from the front, and the
        task sleeps until the next one due, or lingers (see _run)."""
        due = self._due
        while due and due[0][2].background_started:
            self._linger = max(self._linger, heapq.heappop(due)[0])
        if self._sleep is not None:
            self._sleep.deadline = due[0][0] if due else self._linger

    async def _run(self) -> None:
        due = self._due
        # Streams that ended young are dropped as soon as they come first, whenever they were
        # due; the task stays until the last of them would have been due, so that the next
        # stream (one after another is the usual case) finds it running instead of starting
        # a task of its own.
        try:
            while True:
                self.drop_ended()
                if due:
                    wake = due[0][0]
                elif trio.current_time() < self._linger:
                    wake = self._linger
                else:
                    break
                with trio.CancelScope(deadline=wake) as self._sleep:
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


class _Writer:
    """A stream's writer task, for one WebSocket at a time: it writes what the calling tasks
    could not write at once (a full socket, a write in progress, TLS), the pings the driver
    asks for, and the close. It starts only when first needed (most streams never need it),
    in the nursery of the connection task's WebSocket, and stops with it."""

    __slots__ = (
        "_changed",
        "_driver",
        "ever_started",
        "idle",
        "nursery",
        "ping_wanted",
        "running",
        "stop",
        "wanted",
    )

    def __init__(self, driver: StreamDriver, changed: trio.lowlevel.ParkingLot) -> None:
        self._driver = driver
        self._changed = changed
        #: Set when there is something to write (or the task is to stop).
        self.wanted = trio.Event()
        #: The nursery of the current WebSocket's tasks, while the connection task reads it.
        self.nursery: trio.Nursery | None = None
        self.running = self.ever_started = False
        #: Waiting for ``wanted``: stopping it then cuts nothing.
        self.idle = False
        self.stop = self.ping_wanted = False

    def start(self, ws: WebSocket, sent: Callable[[], None]) -> None:
        """Start the task on *ws*, unless it runs already; it calls *sent* after messages
        went out (the connection task's deadlines may move)."""
        if not self.running:
            assert self.nursery is not None
            self.running = self.ever_started = True
            self.idle = False
            self.nursery.start_soon(self.run, ws, sent)

    async def run(self, ws: WebSocket, sent_messages: Callable[[], None]) -> None:
        """Write what is wanted on *ws* until the close went out, *ws* dropped, or told to
        stop. (*sent_messages* is the stream's: held by the task while it runs, never by
        the writer, which the stream holds: that cycle would leave every stream to Python's
        cyclic collector.)"""
        driver = self._driver
        try:
            while True:
                self.idle = True
                await self.wanted.wait()
                self.idle = False
                self.wanted = trio.Event()
                if self.stop:
                    return
                try:
                    if ws.has_backlog:
                        await ws.flush()  # what _send_now could not write at once
                    sent = False
                    while data := driver.next_message(trio.current_time()):
                        await ws.send_bytes(data)
                        sent = True
                    if sent:
                        sent_messages()
                    if self.ping_wanted:
                        self.ping_wanted = False
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
            self.running = False
            self.idle = True  # nothing left to stop


async def resume_connection(
    driver: StreamDriver, reconnect: Reconnect, token: str, rng: random.Random
) -> WebSocket | None:
    """A new WebSocket to the stream, opened with resume *token*: attempts, their deadlines
    and the delays between them (jittered with *rng*) as *driver* says; None when it gave
    up."""
    while True:
        deadline = driver.connect_started(trio.current_time())
        ws: WebSocket | None = None
        error: DevstreamError | None = None
        try:
            with trio.move_on_at(deadline):
                ws = await reconnect(token)
        except DevstreamError as exc:
            error = exc
        if ws is not None:
            driver.connection_made(trio.current_time())
            return ws
        code, message = attempt_failure(error)
        retry_at = driver.connect_failed(
            trio.current_time(), rng.random(), code=code, message=message
        )
        if retry_at is None:
            return None
        await trio.sleep_until(retry_at)
