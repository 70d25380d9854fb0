"""The hub's streaming endpoint: ``GET /bridges/{streamId}``, pairing and relaying.

The sans-IO :class:`~devstream_core.bridge.Bridge` decides who may join, pairs the sides, and
says when a lone side or a held side has waited long enough; this module moves the bytes.

Two relays, chosen by the stream's mode at initiation:

* **raw** (Azure-compatible): once both sides are in, one task per direction forwards each
  WebSocket message fragment as it arrives; a close on one side closes the other with the same
  code; the first subprotocol a client offers is accepted.
* **devstream.v1**: each side's connection task reads *whole* messages (each holds whole frames;
  at most ``MAX_FRAMED_MESSAGE`` bytes) and forwards them to the other side's current
  WebSocket, without parsing them; every whole message already received goes out in one
  write. When a side's WebSocket drops without a close, the bridge holds the stream for the
  grace period; frames for the missing side are dropped (its peer still holds them
  unacknowledged and sends them again after the resume). The side comes back with its resume
  token (``Authorization: Bearer``) and gets a fresh one in the ``devstream-resume-token``
  header of the 101 response. The token it came with is spent only when its first message
  arrives on the new connection (``Bridge.confirm``): a side whose 101 was lost on the way
  tries again with the same token. A held side that does not come back in time makes the hub
  send the waiting side a ``Reset`` frame (504902) and close it with 4504.

When the hub revokes a device (disabled or deleted), the bridge ends its streams at once:
each attached side of a devstream.v1 stream gets a ``Reset`` frame and a close with the code
(403902 or 404001), a raw side the close.

Before the first pairing nothing is read from a lone side, so no byte is dropped before both
sides can hold the other's unacknowledged data.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from devstream_core.bridge import (
    Bridge,
    BridgeEvent,
    CloseLoneSide,
    ResetPeer,
    SideHeld,
    StreamRevoked,
    StreamState,
)
from devstream_core.common import Role
from devstream_core.control import MODE_RAW
from devstream_core.errors import DevstreamError, ErrorCode, close_reason_for
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.framing import Reset, encode_frame
from devstream_core.routes import BridgeJoin
from devstream_core.silence import SilenceWatch
from devstream_core.tokens import is_resume_token
from devstream_core.wire import HEADER_RESUME_TOKEN, MAX_FRAMED_MESSAGE_SIZE, parse_bearer

from ..transport.http import HttpError, HttpRequest, HttpServerConnection
from ..transport.websocket import ABNORMAL_CLOSURE, ConnectionClosed, WebSocket, close_forcefully
from .metrics import Metrics

__all__ = ["MAX_FRAMED_MESSAGE", "StreamingEndpoint"]

log = logging.getLogger("devstream.hub")

#: The largest devstream.v1 WebSocket message the hub relays. It may come in at most
#: ``_ws.MAX_MESSAGE_FRAGMENTS`` fragments (the default of ``receive_messages``).
MAX_FRAMED_MESSAGE = MAX_FRAMED_MESSAGE_SIZE
#: How often the hub pings a devstream.v1 side that waits for its peer (clients give up on a
#: silent hub after ``ping_interval + ping_timeout``, 20 s by default).
LONE_PING_INTERVAL = 5.0


@dataclass
class _RawSlot:
    """The sides of one raw stream that have joined."""

    sides: dict[int, WebSocket] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    #: Why the hub ends the stream on its own (a peer that never came, a revoked device).
    lone_close: ErrorCode | None = None
    #: The relay of the paired stream, once both sides are in (cancelled to end it).
    relay_scope: trio.CancelScope | None = None


@dataclass
class _FramedRelay:
    """One devstream.v1 stream: the current WebSocket of each side, if attached."""

    stream_id: str
    sides: dict[Role, WebSocket | None] = field(
        default_factory=lambda: {Role.DEVICE: None, Role.SERVICE: None}
    )
    scopes: dict[int, trio.CancelScope] = field(default_factory=dict)
    paired: trio.Event = field(default_factory=trio.Event)
    ended: bool = False
    #: Why the hub ends the stream on its own (a peer that never came back, never came).
    end_code: ErrorCode | None = None


@dataclass(slots=True)
class _IdleWatch:
    """A devstream.v1 side whose silence the hub's timer watches (instead of a task each)."""

    ws: WebSocket
    #: The side's scope, cancelled to end its read when it has been silent too long.
    scope: trio.CancelScope
    #: True while the side's task waits for bytes (a send in progress is never cut).
    receiving: bool = False
    #: Set when the silence cancelled the scope (which a resume or the stream's end may too).
    fired: bool = False


class StreamingEndpoint:
    """Joins, resumes and relays for every stream of one hub."""

    def __init__(
        self,
        bridge: Bridge,
        metrics: Metrics,
        *,
        random_bytes: Callable[[int], bytes],
        close_timeout: float,
        idle_timeout: float,
        wake: Callable[[], None],
    ) -> None:
        self.bridge = bridge
        self.metrics = metrics
        self.random_bytes = random_bytes
        self.close_timeout = close_timeout
        self.idle_timeout = idle_timeout
        self._wake = wake
        self._raw: dict[str, _RawSlot] = {}
        self._framed: dict[str, _FramedRelay] = {}
        #: The devstream.v1 sides' silence, watched from one schedule, not a task each.
        self._silence = SilenceWatch(idle_timeout)
        self._idle_watches: dict[int, _IdleWatch] = {}

    def framed_sides(self, stream_id: str) -> dict[Role, WebSocket | None]:
        """For observability (tests, diagnostics): the WebSocket each side of devstream.v1
        stream *stream_id* is attached by now (``None`` for a side not attached); empty for
        a stream the hub does not know. A copy: changing it changes nothing."""
        relay = self._framed.get(stream_id)
        return {} if relay is None else dict(relay.sides)

    # -- events from the bridge's timer ------------------------------------------------------

    def handle(self, events: list[BridgeEvent]) -> None:
        """Act on what ``Bridge.advance`` returned."""
        for event in events:
            if isinstance(event, (CloseLoneSide, ResetPeer, StreamRevoked)):
                self._end(event.stream_id, event.code)

    def next_idle_check(self) -> float | None:
        """When :meth:`check_idle` has something to look at next, if ever."""
        return self._silence.next_deadline()

    def check_idle(self, now: float) -> None:
        """End the read of every devstream.v1 side silent (no frame, no ping) for
        ``idle_timeout``; the side then counts as dropped. A side in the middle of sending to
        its peer is looked at again later: the send is never cut."""
        watches = self._idle_watches
        for connection_id in self._silence.silent(
            now,
            lambda c: watches[c].ws.last_received,
            lambda c: not watches[c].receiving,
        ):
            watch = watches[connection_id]
            watch.fired = True
            watch.scope.cancel()

    def _watch_idle(self, connection_id: int, ws: WebSocket, scope: trio.CancelScope) -> _IdleWatch:
        watch = _IdleWatch(ws=ws, scope=scope)
        self._idle_watches[connection_id] = watch
        if self._silence.watch(connection_id, since=trio.current_time()):
            self._wake()
        return watch

    def _end(self, stream_id: str, code: ErrorCode) -> None:
        slot = self._raw.get(stream_id)
        if slot is not None:
            slot.lone_close = code
            if slot.relay_scope is not None:
                slot.relay_scope.cancel()  # its task closes both sides, then sets done
            else:
                slot.done.set()
        relay = self._framed.get(stream_id)
        if relay is not None:
            relay.ended = True
            relay.end_code = code
            for scope in relay.scopes.values():
                scope.cancel()

    # -- joining -----------------------------------------------------------------------------

    async def join(
        self,
        http: HttpServerConnection,
        request: HttpRequest,
        route: BridgeJoin,
        connection_id: int,
        *,
        token: str | None = None,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Serve one side's WebSocket on the streaming endpoint until it ends.

        The side's token is the request's ``Authorization: Bearer``, or *token* (a one-step
        open, where the hub has just made it); *extra_headers* go into the ``101``.
        """
        if token is None:
            token = _bearer(request)
        resuming = is_resume_token(token)
        now = trio.current_time()
        offered = request.subprotocols
        try:
            if resuming:
                resumed = self.bridge.resume(
                    stream_id=route.stream_id,
                    token=token,
                    role=route.role,
                    connection_id=connection_id,
                    now=now,
                    resume_nonce=self.random_bytes(16),
                )
                role, mode = resumed.role, FRAMED_SUBPROTOCOL
                resume_token: str | None = resumed.resume_token
                replaced = resumed.replaced_connection_id
            else:
                joined = self.bridge.join(
                    stream_id=route.stream_id,
                    token=token,
                    role=route.role,
                    connection_id=connection_id,
                    now=now,
                    resume_nonce=self.random_bytes(16),
                )
                role, resume_token, mode = joined.role, joined.resume_token, joined.mode
                replaced = None
        except DevstreamError as exc:
            raise HttpError(exc.code, exc.message) from exc
        self._wake()
        extra = extra_headers or []
        if mode == MODE_RAW:
            await self._join_raw(
                http, request, route.stream_id, role, connection_id, offered, extra
            )
            return
        if FRAMED_SUBPROTOCOL not in offered:
            self._leave(route.stream_id, connection_id)
            # The stream is over: a side already in must not wait for a peer that cannot come.
            self._end(route.stream_id, ErrorCode.PEER_NEVER_CONNECTED)
            raise HttpError(
                ErrorCode.ARGUMENT_INVALID,
                f"this stream is {FRAMED_SUBPROTOCOL}; offer that WebSocket subprotocol",
            )
        headers = [(HEADER_RESUME_TOKEN, (resume_token or "").encode()), *extra]
        try:
            ws = await http.accept_websocket(
                request, subprotocol=FRAMED_SUBPROTOCOL, extra_headers=headers
            )
        except BaseException:
            self._leave(route.stream_id, connection_id)
            raise
        relay = self._framed.setdefault(route.stream_id, _FramedRelay(stream_id=route.stream_id))
        if resuming:
            self.metrics.resumes_total += 1
        if replaced is not None:
            old_ws = relay.sides[role]
            old = relay.scopes.get(replaced)
            if old_ws is not None and relay.paired.is_set():
                # Close the replaced connection rather than cancel its task: a cancellation
                # could cut a message it is forwarding to the peer in half, and the peer would
                # read the next frame as the rest of it. It forwards nothing it reads once it
                # is no longer the side's current connection.
                relay.sides[role] = ws
                await old_ws.abort()
            elif old is not None:
                old.cancel()
        log.info(
            "stream %s: %s %s", route.stream_id, role.value, "resumed" if resuming else "joined"
        )
        await self._framed_side(relay, role, ws, connection_id)

    # -- raw ---------------------------------------------------------------------------------

    async def _join_raw(
        self,
        http: HttpServerConnection,
        request: HttpRequest,
        stream_id: str,
        role: Role,
        connection_id: int,
        offered: list[str],
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        slot = self._raw.setdefault(stream_id, _RawSlot())
        try:
            ws = await http.accept_websocket(
                request,
                subprotocol=offered[0] if offered else None,
                extra_headers=extra_headers,
            )
        except BaseException:
            self._leave(stream_id, connection_id)
            raise
        peer_id = next(iter(slot.sides), None)
        slot.sides[connection_id] = ws
        log.info("stream %s: %s joined", stream_id, role.value)
        try:
            if peer_id is not None:
                peer = slot.sides[peer_id]
                self.metrics.streams_total += 1
                slot.relay_scope = trio.CancelScope()
                with slot.relay_scope:
                    await self._relay_raw(ws, peer)
                if slot.lone_close is not None:
                    # The hub ended the stream (its device was disabled or deleted).
                    async with trio.open_nursery() as nursery:
                        for side in (ws, peer):
                            nursery.start_soon(self._close_quietly, side, slot.lone_close)
                slot.done.set()
            else:
                await slot.done.wait()
                if slot.lone_close is not None and slot.relay_scope is None:
                    await self._close_with(ws, slot.lone_close)
        finally:
            self._leave(stream_id, connection_id)
            slot.sides.pop(connection_id, None)
            if not slot.sides:
                self._raw.pop(stream_id, None)

    async def _relay_raw(self, one: WebSocket, other: WebSocket) -> None:
        """Forward fragments both ways until one side closes, then close the other."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._pump_raw, other, one, nursery.cancel_scope)
            # This task pumps the other way itself: one task fewer per stream.
            await self._pump_raw(one, other, nursery.cancel_scope)
        for side in (one, other):
            await close_forcefully(side.stream)

    async def _pump_raw(self, source: WebSocket, sink: WebSocket, scope: trio.CancelScope) -> None:
        try:
            while True:
                # Everything already parsed goes out in one write.
                batch = [await source.receive(), *source.take_queued()]
                await sink.send_messages(batch)
                self.metrics.bytes_relayed += sum(len(event.data) for event in batch)
        except ConnectionClosed:
            if source.closed is not None:
                # The source closed (or vanished): pass its close on to the sink.
                code, reason = source.closed.code, source.closed.reason
                target = sink
            else:
                # The sink vanished while we wrote to it: tell the source.
                code, reason = ABNORMAL_CLOSURE, ""
                target = source
            if code == ABNORMAL_CLOSURE:
                code, reason = 1001, "peer connection lost"
            with trio.move_on_after(self.close_timeout):
                await target.send_close(code, reason)
        # Give the other direction a bounded time to see the close, then stop both.
        scope.deadline = min(scope.deadline, trio.current_time() + self.close_timeout)

    # -- devstream.v1 ------------------------------------------------------------------------

    async def _framed_side(
        self, relay: _FramedRelay, role: Role, ws: WebSocket, connection_id: int
    ) -> None:
        """Relay one side's messages to the other side's current WebSocket."""
        relay.sides[role] = ws
        if relay.sides[role.other] is not None and not relay.paired.is_set():
            relay.paired.set()
            self.metrics.streams_total += 1
        # One scope for the side: a resume that replaces it, the stream's end and the side's
        # silence (the idle watch's ``fired``) all cancel it.
        scope = relay.scopes[connection_id] = trio.CancelScope()
        dropped = False
        closed: ConnectionClosed | None = None
        watch: _IdleWatch | None = None
        try:
            with scope:
                await self._wait_for_peer(relay, ws)
                # Nothing was read before the pairing: silence counts from when reading starts.
                watch = self._watch_idle(connection_id, ws, scope)
                try:
                    await self._pump_framed(relay, role, ws, connection_id, watch)
                except ConnectionClosed as exc:
                    closed = exc
                    dropped = exc.code == ABNORMAL_CLOSURE
                finally:
                    self._idle_watches.pop(connection_id, None)
                    self._silence.forget(connection_id)
            if watch is not None and watch.fired and scope.cancelled_caught:
                log.info("stream %s: %s silent; dropping it", relay.stream_id, role.value)
                await ws.abort()
                dropped = True
        finally:
            del relay.scopes[connection_id]
            current = relay.sides[role] is ws
            if current:
                relay.sides[role] = None
            await self._after_framed_side(
                relay, role, ws, connection_id, current=current, dropped=dropped, closed=closed
            )

    async def _pump_framed(
        self,
        relay: _FramedRelay,
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
        metrics = self.metrics
        while True:
            if sides[role] is not ws:
                return  # replaced by a resume: what this connection still brings is stale
            # A peer that is away gets nothing: it asks for this again when it resumes.
            peer = sides[other]
            if peer is not None:
                # Not contextlib.suppress: that is an object and two calls on every write.
                try:  # noqa: SIM105
                    # Every whole message already received goes out in one write.
                    metrics.bytes_relayed += await peer.send_whole_messages(messages)
                except ConnectionClosed:
                    pass  # a peer that vanished mid-write is noticed by its own connection task
            watch.receiving = True
            messages = await ws.receive_messages(MAX_FRAMED_MESSAGE)
            watch.receiving = False

    async def _after_framed_side(
        self,
        relay: _FramedRelay,
        role: Role,
        ws: WebSocket,
        connection_id: int,
        *,
        current: bool,
        dropped: bool,
        closed: ConnectionClosed | None,
    ) -> None:
        now = trio.current_time()
        if not current:
            # Replaced by a resume: the new connection carries on.
            await ws.abort()
            return
        if relay.end_code is not None:
            # The hub ends the stream: the peer never came (back).
            self.bridge.leave(stream_id=relay.stream_id, connection_id=connection_id, now=now)
            await self._close_with(ws, relay.end_code, reset=relay.paired.is_set())
        elif dropped and not relay.ended:
            self._handle_drop(relay, role, connection_id, now)
            await ws.abort()
        else:
            relay.ended = True
            self.bridge.leave(stream_id=relay.stream_id, connection_id=connection_id, now=now)
            peer = relay.sides[role.other]
            if peer is not None and closed is not None:
                code, reason = closed.code, closed.reason
                with trio.move_on_after(self.close_timeout):
                    await peer.send_close(code, reason)
            await ws.aclose(timeout=self.close_timeout)
        if (
            relay.sides[Role.DEVICE] is None
            and relay.sides[Role.SERVICE] is None
            and (relay.ended or relay.end_code is not None)
        ):
            self._framed.pop(relay.stream_id, None)

    def _handle_drop(self, relay: _FramedRelay, role: Role, connection_id: int, now: float) -> None:
        events = self.bridge.drop(stream_id=relay.stream_id, connection_id=connection_id, now=now)
        self._wake()
        if any(isinstance(event, SideHeld) for event in events):
            log.info("stream %s: %s dropped; holding the stream", relay.stream_id, role.value)
        elif self.bridge.stream_state(relay.stream_id) is not StreamState.ENDED:
            # The bridge ignored the drop: a resume replaced this connection before its end
            # was noticed here, and the new connection carries on.
            pass
        else:
            # Not held (the stream was not paired yet, or already over): it ends here.
            relay.ended = True
            peer = relay.sides[role.other]
            if peer is not None:
                for scope in relay.scopes.values():
                    scope.cancel()

    async def _wait_for_peer(self, relay: _FramedRelay, ws: WebSocket) -> None:
        """Wait for the pairing, pinging the side every ``LONE_PING_INTERVAL``: nothing is read
        from it before then, so its own pings go unanswered, and without a sign of life it
        would drop and resume. No task of its own: most peers come within milliseconds."""
        pinging = True
        while not relay.paired.is_set():
            with trio.move_on_after(LONE_PING_INTERVAL):
                await relay.paired.wait()
            if pinging and not relay.paired.is_set():
                try:
                    await ws.ping()
                except ConnectionClosed:
                    pinging = False  # its connection task finds out when it reads

    # -- shared ------------------------------------------------------------------------------

    async def _close_with(self, ws: WebSocket, code: ErrorCode, *, reset: bool = False) -> None:
        """Close *ws* because of *code*; a framed side gets a Reset frame first."""
        log.info("closing a stream side: %s", code.message)
        with trio.move_on_after(self.close_timeout):
            if reset:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send_bytes(encode_frame(Reset(code=int(code), reason=code.message)))
            await ws.aclose(code.close_code, close_reason_for(code))

    async def _close_quietly(self, ws: WebSocket, code: ErrorCode) -> None:
        """:meth:`_close_with`, for a side whose connection may be broken already."""
        with contextlib.suppress(
            ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError
        ):
            await self._close_with(ws, code)

    def _leave(self, stream_id: str, connection_id: int) -> None:
        # The bridge answers a paired side's leave with ClosePeer; the relays close both
        # sides themselves, so there is nothing more to do with it.
        self.bridge.leave(stream_id=stream_id, connection_id=connection_id, now=trio.current_time())


def _bearer(request: HttpRequest) -> str:
    token = parse_bearer(request.header(b"authorization"))
    if token is not None:
        return token
    raise HttpError(ErrorCode.STREAM_TOKEN_INVALID, "missing Authorization: Bearer token")
