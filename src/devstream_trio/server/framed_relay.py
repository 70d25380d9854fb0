"""devstream.v1 streams at the hub: each side's connection task reads *whole* messages (each
holds whole frames; at most ``MAX_FRAMED_MESSAGE`` bytes) and forwards them to the other side's
current WebSocket without parsing them; a side that drops is held for the grace period (the
bridge decides), and its silence is watched from the hub's timer (the core's SilenceWatch).

A side's normal close (1000) goes to the other side, with the messages that came with it in
one write. The bridge keeps the side's latest messages (when small) and the close
(``Bridge.close``) until the other side answers. When that side's connection is lost first,
it is held, and its resume gets them again before anything else (``Resumed.farewell``): it
learns that its peer got everything. A side that stays connected without answering the close
is dropped once the bridge says its time is over (``CloseUnanswered``, ``close_timeout``
after it was given the close): it was sent everything, so its connection is aborted.

A side's pings are read, and answered, after what it sent before them: behind a slow uplink
they come late, and while the hub's write of the side's messages to the other side waits (a
slow link to the other side), the hub reads nothing from the side at all. So that a side
whose connection works hears from the hub, the hub sends it a pong of its own every
``HUB_PONG_INTERVAL`` while bytes keep arriving from it (``WebSocket.beat_while_receiving``)
and while such a write waits (the hub's timer, ``FramedRelays.check_idle``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import trio

from devstream_core.bridge import MAX_FAREWELL_SIZE, Farewell, SideHeld, StreamState
from devstream_core.common import Role
from devstream_core.errors import ErrorCode
from devstream_core.silence import SilenceWatch, WaitingWriters
from devstream_core.wire import MAX_FRAMED_MESSAGE_SIZE

from ..transport.websocket import ABNORMAL_CLOSURE, ConnectionClosed, WebSocket
from .ledger import StreamRecord
from .sides import RelayHost, close_with

__all__ = [
    "HUB_PONG_INTERVAL",
    "LONE_PING_INTERVAL",
    "MAX_FRAMED_MESSAGE",
    "FramedRelay",
    "FramedRelays",
]

log = logging.getLogger("devstream.hub")

#: The largest devstream.v1 WebSocket message the hub relays. It may come in at most
#: ``MAX_MESSAGE_FRAGMENTS`` fragments (the default of ``receive_messages``).
MAX_FRAMED_MESSAGE = MAX_FRAMED_MESSAGE_SIZE
#: How often the hub pings a devstream.v1 side that waits for its peer (clients give up on a
#: silent hub after ``ping_interval + ping_timeout``, 20 s by default).
LONE_PING_INTERVAL = 5.0
#: How often the hub sends a devstream.v1 side a pong of its own (RFC 6455 §5.5.3: a
#: heartbeat, not answered) while bytes keep arriving from it, and while its write of that
#: side's messages to the other side waits: the side's own pings are answered only once what
#: came before them is read (behind a slow uplink, or after such a write), and a client that
#: hears nothing for a few seconds after a probe ping takes its connection as lost.
HUB_PONG_INTERVAL = 1.0


@dataclass
class FramedRelay:
    """One devstream.v1 stream: the current WebSocket of each side, if attached."""

    stream_id: str
    #: What the hub records of the stream (bytes each way, how it ends).
    record: StreamRecord
    sides: dict[Role, WebSocket | None] = field(
        default_factory=lambda: {Role.DEVICE: None, Role.SERVICE: None}
    )
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)
    paired: trio.Event = field(default_factory=trio.Event)
    #: Where a side waiting for its peer parks: woken by the pairing, or to ping (made when
    #: a side first waits; most peers come within milliseconds).
    waiting: trio.lowlevel.ParkingLot | None = None
    ended: bool = False
    #: Why the hub ends the stream on its own (a peer that never came back, never came).
    end_code: ErrorCode | None = None
    #: The bridge ended the stream because the side left did not answer its peer's close in
    #: time: that side's connection, sent everything already, is aborted.
    unanswered: bool = False


@dataclass(slots=True)
class _IdleWatch:
    """A devstream.v1 side whose silence the hub's timer watches (instead of a task each)."""

    ws: WebSocket
    #: The side's scope, cancelled to end its read when it has been silent too long.
    scope: trio.CancelScope
    connection_id: int
    relays: FramedRelays
    #: True while the side's task waits for bytes (a send in progress is never cut).
    receiving: bool = False
    #: Set when the silence cancelled the scope (which a resume or the stream's end may too).
    fired: bool = False
    #: The latest messages read from the side, when they were small (at most the bridge's
    #: MAX_FAREWELL_SIZE in all; the bridge keeps them should the side close next).
    last_words: list[list[bytes | memoryview]] | None = None
    #: True while a task sends the side a pong (a stream that cannot take one at once).
    ponging: bool = False

    def write_waits(self) -> None:
        """The side's write of its messages to the other side waits for that side's
        transport: the hub's timer sends the side a pong while it does."""
        self.relays.write_waits(self)

    def write_done(self) -> None:
        self.relays.write_done(self.connection_id)

    def beat(self) -> None:
        """Bytes keep arriving from the side: it gets a pong (see HUB_PONG_INTERVAL)."""
        self.relays.pong(self)


class FramedRelays:
    """The devstream.v1 streams of one hub, by stream id, and their sides' silence."""

    def __init__(self, endpoint: RelayHost, idle_timeout: float) -> None:
        self.endpoint = endpoint
        self.bridge = endpoint.bridge
        self.metrics = endpoint.metrics
        self.close_timeout = endpoint.close_timeout
        self.relays: dict[str, FramedRelay] = {}
        #: The sides' silence, watched from one schedule, not a task each.
        self._silence = SilenceWatch(idle_timeout)
        self._idle_watches: dict[int, _IdleWatch] = {}
        #: The sides waiting for their peer, by connection: each is woken to ping it every
        #: LONE_PING_INTERVAL, from the same schedule (no timer of its own).
        self._lone_watch = SilenceWatch(LONE_PING_INTERVAL)
        self._lone: dict[int, FramedRelay] = {}
        #: The sides whose write to the other side waits, by connection: each gets a pong
        #: every HUB_PONG_INTERVAL, from the same schedule.
        self._waiting = WaitingWriters(HUB_PONG_INTERVAL)
        self._writers: dict[int, _IdleWatch] = {}

    def relay(self, record: StreamRecord) -> FramedRelay:
        """The relay of *record*'s stream, made on its first side's arrival."""
        relay = self.relays.get(record.stream_id)
        if relay is None:
            relay = self.relays[record.stream_id] = FramedRelay(
                stream_id=record.stream_id, record=record
            )
        return relay

    def end(self, stream_id: str, code: ErrorCode) -> None:
        """The hub ends devstream.v1 stream *stream_id* with *code* (a Reset, then the close)."""
        relay = self.relays.get(stream_id)
        if relay is not None:
            relay.ended = True
            relay.end_code = code
            for scope in relay.scopes.values():
                scope.cancel()

    def drop_unanswered(self, stream_id: str, role: Role) -> None:
        """Side *role* of devstream.v1 stream *stream_id* did not answer its peer's close
        within ``close_timeout`` (the bridge ended the stream): abort its connection, which
        was sent the close already and is owed nothing more."""
        relay = self.relays.get(stream_id)
        if relay is None:
            return
        log.info(
            "stream %s: the %s did not answer the close within %g s; dropping its connection",
            stream_id,
            role.value,
            self.close_timeout,
            extra={"event": "stream_close_unanswered", "stream_id": stream_id, "role": role.value},
        )
        relay.ended = True
        relay.unanswered = True
        for scope in relay.scopes.values():
            scope.cancel()

    def forget(self, stream_id: str) -> None:
        """Stream *stream_id* ended with no side attached (its holds ran out): let its relay
        go."""
        relay = self.relays.get(stream_id)
        if relay is not None and not any(relay.sides.values()):
            self.relays.pop(stream_id)

    def next_idle_check(self) -> float | None:
        """When :meth:`check_idle` has something to look at next, if ever."""
        first = self._silence.next_deadline()
        for due in (self._lone_watch.next_deadline(), self._waiting.next_deadline()):
            if due is not None and (first is None or due < first):
                first = due
        return first

    def check_idle(self, now: float) -> None:
        """Wake every side waiting for its peer whose next ping is due (it pings from its own
        task); end the read of every devstream.v1 side silent (no frame, no ping) for
        ``idle_timeout``, which then counts as dropped. A side in the middle of sending to its
        peer is looked at again later: the send is never cut; once that send has waited
        ``HUB_PONG_INTERVAL``, and every interval after, the side gets a pong."""
        writers = self._writers
        for connection_id in self._waiting.due(now):
            self.pong(writers[connection_id])
        lone = self._lone
        for connection_id in self._lone_watch.silent(now, _never):
            waiting = lone[connection_id].waiting
            assert waiting is not None  # it parks there
            waiting.unpark_all()  # time to ping it
        watches = self._idle_watches
        for connection_id in self._silence.silent(
            now,
            lambda c: watches[c].ws.last_received,
            lambda c: not watches[c].receiving,
        ):
            watch = watches[connection_id]
            watch.fired = True
            watch.scope.cancel()

    def write_waits(self, watch: _IdleWatch) -> None:
        """*watch*'s side's write to the other side waits: pong the side while it does."""
        self._writers[watch.connection_id] = watch
        if self._waiting.waits(watch.connection_id, trio.current_time()):
            self.endpoint.wake(self._waiting.next_deadline())

    def write_done(self, connection_id: int) -> None:
        """The write that waited is over."""
        del self._writers[connection_id]
        self._waiting.done(connection_id)

    def pong(self, watch: _IdleWatch) -> None:
        """Send *watch*'s side a pong: at once on a plain socket with nothing else being sent
        to it; nothing while something else is (the side hears that); else from a task of
        its own (a TLS stream; one at a time)."""
        ws = watch.ws
        if ws.pong_nowait() or ws.sending or watch.ponging:
            return
        tasks = self.endpoint.tasks
        if tasks is not None:
            watch.ponging = True
            tasks.start_soon(_send_pong, watch)

    def _watch_idle(self, connection_id: int, ws: WebSocket, scope: trio.CancelScope) -> _IdleWatch:
        watch = _IdleWatch(ws=ws, scope=scope, connection_id=connection_id, relays=self)
        self._idle_watches[connection_id] = watch
        ws.beat_while_receiving(HUB_PONG_INTERVAL, watch.beat)
        if self._silence.watch(connection_id, since=trio.current_time()):
            self.endpoint.wake(self._silence.next_deadline())
        return watch

    async def serve_side(
        self,
        relay: FramedRelay,
        role: Role,
        ws: WebSocket,
        connection_id: int,
        farewell: Farewell | None = None,
    ) -> None:
        """Relay one side's messages to the other side's current WebSocket. A side that
        resumed after its peer closed gets the peer's last messages and close (*farewell*)
        first."""
        relay.sides[role] = ws
        if relay.sides[role.other] is not None and not relay.paired.is_set():
            relay.paired.set()
            if relay.waiting is not None:
                relay.waiting.unpark_all()
            relay.record.paired = True
            self.metrics.streams_total += 1
        # One scope for the side: a resume that replaces it, the stream's end and the side's
        # silence (the idle watch's ``fired``) all cancel it.
        scope = relay.scopes[connection_id] = trio.CancelScope()
        if relay.unanswered:
            scope.cancel()  # a resume whose time to answer the close ran out before it got here
        dropped = False
        closed: ConnectionClosed | None = None
        watch: _IdleWatch | None = None
        try:
            with scope:
                if farewell is not None:
                    await _send_farewell(ws, farewell)
                await self._wait_for_peer(relay, ws, connection_id)
                # Nothing was read before the pairing: silence counts from when reading starts.
                watch = self._watch_idle(connection_id, ws, scope)
                try:
                    await self._pump_framed(relay, role, ws, connection_id, watch)
                except ConnectionClosed as exc:
                    # Kept without its traceback, whose frames (this one too) would hold it.
                    closed = exc.with_traceback(None)
                    dropped = exc.code == ABNORMAL_CLOSURE
                finally:
                    self._idle_watches.pop(connection_id, None)
                    self._silence.forget(connection_id)
                    ws.beat_while_receiving(HUB_PONG_INTERVAL, None)
            if watch is not None and watch.fired and scope.cancelled_caught:
                log.info(
                    "stream %s: the %s was silent too long; dropping it",
                    relay.stream_id,
                    role.value,
                    extra={"event": "stream_side_silent", "stream_id": relay.stream_id},
                )
                await ws.abort()
                dropped = True
        finally:
            del relay.scopes[connection_id]
            current = relay.sides[role] is ws
            if current:
                relay.sides[role] = None
            await self._after_framed_side(
                relay,
                role,
                ws,
                connection_id,
                current=current,
                dropped=dropped,
                closed=closed,
                last_words=watch.last_words if watch is not None else None,
            )

    async def _pump_framed(
        self,
        relay: FramedRelay,
        role: Role,
        ws: WebSocket,
        connection_id: int,
        watch: _IdleWatch,
    ) -> None:
        watch.receiving = True
        messages = await ws.receive_messages(MAX_FRAMED_MESSAGE)
        watch.receiving = False
        # The side sends nothing before it read the 101 and the resume token in it: from now on
        # the token that opened this connection is spent (see Bridge.confirm).
        self.bridge.confirm(
            stream_id=relay.stream_id, connection_id=connection_id, now=trio.current_time()
        )
        sides = relay.sides
        other = role.other
        flow = relay.record.toward(other)
        while True:
            if sides[role] is not ws:
                return  # replaced by a resume: what this connection still brings is stale
            # Every whole message already received goes out in one write, and the side's close
            # with them when it came in the same read (a stream's last Ack and its close): the
            # peer reads both at once. The close is the stream's end from this side, whatever
            # the peer's answer to it.
            close = ws.queued_close
            if close is not None:
                relay.record.note_close(role, close.code)
            # A peer that is away gets nothing: it asks for this again when it resumes.
            peer = sides[other]
            size = -1
            if peer is not None:
                # Not contextlib.suppress: that is an object and two calls on every write.
                try:
                    size = await peer.send_whole_messages(messages, then_close=close, waits=watch)
                    flow.count += size
                except ConnectionClosed:
                    pass  # a peer that vanished mid-write is noticed by its own connection task
            # The side's latest messages, when small, are what it said last should it close
            # next: kept with its close (Bridge.close) for a peer that is lost before it
            # answers, or away now. Only the latest: an older one may be stale.
            if size < 0:  # not passed on: measured here (not on the usual path)
                size = sum([len(part) for parts in messages for part in parts])
            watch.last_words = messages if size <= MAX_FAREWELL_SIZE else None
            watch.receiving = True
            messages = await ws.receive_messages(MAX_FRAMED_MESSAGE)
            watch.receiving = False

    async def _after_framed_side(
        self,
        relay: FramedRelay,
        role: Role,
        ws: WebSocket,
        connection_id: int,
        *,
        current: bool,
        dropped: bool,
        closed: ConnectionClosed | None,
        last_words: list[list[bytes | memoryview]] | None,
    ) -> None:
        now = trio.current_time()
        if not current:
            # Replaced by a resume: the new connection carries on.
            await ws.abort()
            return
        if relay.unanswered:
            # Sent the close, it never answered; the bridge has ended the stream.
            await ws.abort()
        elif relay.end_code is not None:
            # The hub ends the stream: the peer never came (back).
            self.endpoint.leave(relay.stream_id, connection_id)
            await close_with(ws, relay.end_code, self.close_timeout, reset=relay.paired.is_set())
        elif dropped and not relay.ended:
            self._handle_drop(relay, role, connection_id, now)
            await ws.abort()
        else:
            if closed is not None:
                relay.record.note_close(role, closed.code)
                # A normal close waits for the other side's answer (or resume) in the bridge.
                messages = [b"".join(parts) for parts in last_words or ()]
                self.endpoint.close_side(
                    relay.stream_id, connection_id, closed.code, closed.reason, messages
                )
            else:
                self.endpoint.leave(relay.stream_id, connection_id)
            relay.ended = self.bridge.stream_state(relay.stream_id) is StreamState.ENDED
            peer = relay.sides[role.other]
            if peer is not None and closed is not None and not peer.close_sent:
                code, reason = closed.code, closed.reason
                with trio.move_on_after(self.close_timeout):
                    await peer.send_close(code, reason)
            await ws.aclose(timeout=self.close_timeout)
        if (
            relay.sides[Role.DEVICE] is None
            and relay.sides[Role.SERVICE] is None
            and (relay.ended or relay.end_code is not None)
        ):
            self.relays.pop(relay.stream_id, None)

    def _handle_drop(self, relay: FramedRelay, role: Role, connection_id: int, now: float) -> None:
        events = self.bridge.drop(stream_id=relay.stream_id, connection_id=connection_id, now=now)
        self.endpoint.wake(self.bridge.next_deadline())
        if any(isinstance(event, SideHeld) for event in events):
            relay.record.held = role
            log.info(
                "stream %s: the %s dropped; holding the stream for its resume",
                relay.stream_id,
                role.value,
                extra={"event": "stream_held", "stream_id": relay.stream_id, "role": role.value},
            )
        elif self.bridge.stream_state(relay.stream_id) is not StreamState.ENDED:
            # The bridge ignored the drop: a resume replaced this connection before its end
            # was noticed here, and the new connection carries on.
            pass
        else:
            # Not held (the stream was not paired yet, or already over): it ends here.
            relay.ended = True
            relay.record.note_close(role, ABNORMAL_CLOSURE)
            self.endpoint.settle(relay.stream_id)
            peer = relay.sides[role.other]
            if peer is not None:
                for scope in relay.scopes.values():
                    scope.cancel()

    async def _wait_for_peer(self, relay: FramedRelay, ws: WebSocket, connection_id: int) -> None:
        """Wait for the pairing, pinging the side every ``LONE_PING_INTERVAL``: nothing is read
        from it before then, so its own pings go unanswered, and without a sign of life it
        would drop and resume. No task and no timer of its own: the hub's timer wakes it to
        ping (:meth:`check_idle`), and most peers come within milliseconds."""
        pinging = True
        while not relay.paired.is_set():
            if relay.waiting is None:
                relay.waiting = trio.lowlevel.ParkingLot()
            self._lone[connection_id] = relay
            if self._lone_watch.watch(connection_id, since=trio.current_time()):
                self.endpoint.wake(self._lone_watch.next_deadline())
            try:
                await relay.waiting.park()
            finally:
                del self._lone[connection_id]
                self._lone_watch.forget(connection_id)
            if pinging and not relay.paired.is_set():
                try:
                    await ws.ping()
                except ConnectionClosed:
                    pinging = False  # its connection task finds out when it reads


async def _send_farewell(ws: WebSocket, farewell: Farewell) -> None:
    """Send a side that resumed after its peer closed the peer's last messages and close, in
    one write (a connection lost meanwhile is found by the side's read)."""
    try:  # noqa: SIM105
        await ws.send_whole_messages(
            [[message] for message in farewell.messages], then_close=farewell
        )
    except ConnectionClosed:
        pass


async def _send_pong(watch: _IdleWatch) -> None:
    """Send *watch*'s side a pong from a task (its stream takes none at once)."""
    try:
        await watch.ws.pong()
    except ConnectionClosed:
        pass  # its own task finds out
    finally:
        watch.ponging = False


def _never(connection_id: int) -> float:
    """A lone side's last received time, for its ping schedule: pings go every interval
    from when it started waiting, whatever it sends (nothing is read from it meanwhile)."""
    return -math.inf
