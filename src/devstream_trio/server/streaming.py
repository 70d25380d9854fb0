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
  send the waiting side a ``Reset`` frame (504902) and close it with 4504. A side's close
  1000 is passed on, and the stream kept until the other side answers it: a side lost
  before it answers is held, and its resume gets the closing side's last messages and close
  (``Bridge.close``). A side that stays connected without answering the close gets
  ``close_timeout``, from when it was given the close (the close, or its resume), then the
  hub drops its connection (``CloseUnanswered``): the stream ended normally, by the closing
  side, and is recorded so. While a side's bytes keep arriving, and while the hub's write of
  its messages to the other side waits, the hub sends it a pong of its own every
  ``HUB_PONG_INTERVAL``: its pings are answered only once what came before them is read.

When the hub revokes a device (disabled or deleted), the bridge ends its streams at once:
each attached side of a devstream.v1 stream gets a ``Reset`` frame and a close with the code
(403902 or 404001), a raw side the close.

Before the first pairing nothing is read from a lone side, so no byte is dropped before both
sides can hold the other's unacknowledged data.

Each stream has a :class:`~.ledger.StreamRecord` in :attr:`StreamingEndpoint.ledger`, from its
initiation (or first join) to its end: its name and mode, the bytes relayed each way (counted
by the relays, one addition per batch forwarded) and how it ended, noted by whoever sees it
first. Once the bridge says the stream is over (:meth:`StreamingEndpoint.settle`) its
``stream … ended`` line is written and the record forgotten.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from devstream_core.bridge import (
    NORMAL_CLOSURE,
    Bridge,
    BridgeEvent,
    CloseLoneSide,
    CloseUnanswered,
    Joined,
    ResetPeer,
    Resumed,
    StreamExpired,
    StreamRevoked,
    StreamState,
)
from devstream_core.common import Role
from devstream_core.control import MODE_RAW
from devstream_core.errors import DevstreamError, ErrorCode, StreamTokenError
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.routes import BridgeJoin
from devstream_core.tokens import is_resume_token
from devstream_core.wire import HEADER_RESUME_TOKEN, parse_bearer

from ..transport.http import HttpError, HttpRequest, HttpServerConnection
from ..transport.websocket import WebSocket
from .framed_relay import (
    HUB_PONG_INTERVAL,
    LONE_PING_INTERVAL,
    MAX_FRAMED_MESSAGE,
    FramedRelays,
)
from .ledger import END_CLOSED, END_RESET, END_TIMEOUT, END_VANISHED, StreamLedger
from .metrics import Metrics
from .raw_relay import RawRelays

__all__ = [
    "HUB_PONG_INTERVAL",
    "LONE_PING_INTERVAL",
    "MAX_FRAMED_MESSAGE",
    "StreamingEndpoint",
]

log = logging.getLogger("devstream.hub")


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
        wake: Callable[[float | None], None],
    ) -> None:
        self.bridge = bridge
        self.metrics = metrics
        self.random_bytes = random_bytes
        self.close_timeout = close_timeout
        self.wake = wake
        #: Where the relays start short tasks of their own: the hub's timer's nursery, while
        #: it runs (``Hub.run``).
        self.tasks: trio.Nursery | None = None
        #: Every live stream's name, mode and bytes each way; its line when it ends.
        self.ledger = StreamLedger()
        self._raw = RawRelays(self)
        self._framed = FramedRelays(self, idle_timeout)
        #: When check_idle has something to look at next, if ever.
        self.next_idle_check = self._framed.next_idle_check
        #: Ping the devstream.v1 sides waiting for their peer when due; end the read of every
        #: one silent for ``idle_timeout``.
        self.check_idle = self._framed.check_idle

    def framed_sides(self, stream_id: str) -> dict[Role, WebSocket | None]:
        """For observability (tests, diagnostics): the WebSocket each side of devstream.v1
        stream *stream_id* is attached by now (``None`` for a side not attached); empty for
        a stream the hub does not know. A copy: changing it changes nothing."""
        relay = self._framed.relays.get(stream_id)
        return {} if relay is None else dict(relay.sides)

    # -- events from the bridge's timer ------------------------------------------------------

    def handle(self, events: list[BridgeEvent]) -> None:
        """Act on what ``Bridge.advance`` (or ``revoke_device``, ``cancel``) returned."""
        records = self.ledger.records
        for event in events:
            if isinstance(event, CloseUnanswered):
                record = records.get(event.stream_id)
                if record is not None:
                    # Everything the closing side sent was passed on with its close: the
                    # stream ended normally, by that side (noted at its close already).
                    record.note_end(END_CLOSED, event.role.other.value, NORMAL_CLOSURE)
                self._framed.drop_unanswered(event.stream_id, event.role)
                self.settle(event.stream_id)
                continue
            if not isinstance(event, (CloseLoneSide, ResetPeer, StreamRevoked, StreamExpired)):
                continue
            record = records.get(event.stream_id)
            if record is not None:
                if isinstance(event, CloseLoneSide):
                    record.note_end(END_TIMEOUT, "hub", int(event.code))
                elif isinstance(event, StreamRevoked):
                    record.note_end(END_RESET, "hub", int(event.code))
                elif isinstance(event, ResetPeer) or record.paired:
                    # A held side did not come back in time.
                    by = record.held.value if record.held is not None else "hub"
                    record.note_end(END_VANISHED, by, int(ErrorCode.PEER_LOST))
                else:
                    record.note_end(END_TIMEOUT, "hub", int(ErrorCode.PEER_NEVER_CONNECTED))
            if not isinstance(event, StreamExpired):
                self._end(event.stream_id, event.code)
            else:
                self._framed.forget(event.stream_id)
            self.settle(event.stream_id)

    def settle(self, stream_id: str) -> None:
        """Write stream *stream_id*'s line if the bridge says it is over."""
        if self.bridge.stream_state(stream_id) is StreamState.ENDED:
            self.ledger.finish(stream_id, trio.current_time())

    def _end(self, stream_id: str, code: ErrorCode) -> None:
        self._raw.end(stream_id, code)
        self._framed.end(stream_id, code)

    def close_side(
        self, stream_id: str, connection_id: int, code: int, reason: str, messages: list[bytes]
    ) -> None:
        """A devstream.v1 side's connection closed with *code* after *messages*: a normal
        close keeps the stream (and them) for the other side's answer or resume."""
        self.bridge.close(
            stream_id=stream_id,
            connection_id=connection_id,
            now=trio.current_time(),
            code=code,
            reason=reason,
            messages=messages,
        )
        self.settle(stream_id)

    def leave(self, stream_id: str, connection_id: int) -> None:
        """A side's connection left (the bridge answers a paired side's leave with ClosePeer;
        the relays close both sides themselves, so there is nothing more to do with it)."""
        self.bridge.leave(stream_id=stream_id, connection_id=connection_id, now=trio.current_time())
        self.settle(stream_id)

    # -- joining -----------------------------------------------------------------------------

    def _join_or_rejoin(
        self, route: BridgeJoin, token: str, connection_id: int, now: float
    ) -> Joined | Resumed:
        """A side's join with its stream token; the same token again, while the connection it
        opened has not brought a message, is a rejoin (:meth:`Bridge.rejoin`)."""
        try:
            return self.bridge.join(
                stream_id=route.stream_id,
                token=token,
                role=route.role,
                connection_id=connection_id,
                now=now,
                resume_nonce=self.random_bytes(16),
            )
        except StreamTokenError as exc:
            if exc.code is not ErrorCode.STREAM_TOKEN_REUSED:
                raise
        return self.bridge.rejoin(
            stream_id=route.stream_id,
            token=token,
            role=route.role,
            connection_id=connection_id,
            now=now,
            resume_nonce=self.random_bytes(16),
        )

    async def join(
        self,
        http: HttpServerConnection,
        request: HttpRequest,
        route: BridgeJoin,
        connection_id: int,
        *,
        opener: bool = False,
        extra_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Serve one side's WebSocket on the streaming endpoint until it ends.

        The side's token is the request's ``Authorization: Bearer``; an *opener* (a one-step
        open: this connection asked for the stream) joins without one. *extra_headers* go into
        the ``101``.
        """
        token = "" if opener else _bearer(request)
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
                farewell = resumed.farewell
                device_id = ""  # known since its join
            else:
                joined: Joined | Resumed
                if opener:
                    assert route.role is not None  # the service's route names its side
                    joined = self.bridge.join_opener(
                        stream_id=route.stream_id,
                        role=route.role,
                        connection_id=connection_id,
                        now=now,
                        resume_nonce=self.random_bytes(16),
                    )
                else:
                    joined = self._join_or_rejoin(route, token, connection_id, now)
                if isinstance(joined, Resumed):
                    # The side joined before, and lost the 101 (and its resume token).
                    resuming = True
                    role, mode = joined.role, FRAMED_SUBPROTOCOL
                    resume_token = joined.resume_token
                    replaced, farewell = joined.replaced_connection_id, joined.farewell
                    device_id = ""  # known since its join
                else:
                    role, resume_token, mode = joined.role, joined.resume_token, joined.mode
                    replaced, farewell = None, None
                    device_id = joined.device_id
        except DevstreamError as exc:
            raise HttpError(exc.code, exc.message) from exc
        self.wake(self.bridge.next_deadline())
        record = self.ledger.get(
            route.stream_id,
            device_id=device_id,
            mode=mode,
            now=now,
        )
        extra = extra_headers or []
        if mode == MODE_RAW:
            await self._raw.join(http, request, record, role, connection_id, offered, extra)
            return
        if FRAMED_SUBPROTOCOL not in offered:
            record.note_end(END_RESET, "hub", int(ErrorCode.ARGUMENT_INVALID))
            self.leave(route.stream_id, connection_id)
            # The stream is over: a side already in must not wait for a peer that cannot come.
            self._end(route.stream_id, ErrorCode.PEER_NEVER_CONNECTED)
            raise HttpError(
                ErrorCode.ARGUMENT_INVALID,
                f"this stream is {FRAMED_SUBPROTOCOL}; offer that WebSocket subprotocol",
            )
        headers = [(HEADER_RESUME_TOKEN, (resume_token or "").encode()), *extra]
        try:
            # devstream.v1 messages are binary: a text one is refused (1003), not relayed as
            # binary for the peer to read as frames.
            ws = await http.accept_websocket(
                request, subprotocol=FRAMED_SUBPROTOCOL, extra_headers=headers, binary_only=True
            )
        except BaseException:
            self.leave(route.stream_id, connection_id)
            raise
        relay = self._framed.relay(record)
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
        log.debug(
            "stream %s: %s %s", route.stream_id, role.value, "resumed" if resuming else "joined"
        )
        await self._framed.serve_side(relay, role, ws, connection_id, farewell)


def _bearer(request: HttpRequest) -> str:
    token = parse_bearer(request.header(b"authorization"))
    if token is not None:
        return token
    raise HttpError(ErrorCode.STREAM_TOKEN_INVALID, "missing Authorization: Bearer token")
