"""Raw (Azure-compatible) streams at the hub: once both sides are in, one task per direction
forwards each WebSocket message fragment as it arrives; a close on one side closes the other
with the same code; the first subprotocol a client offers is accepted."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import trio

from devstream_core.common import Role
from devstream_core.errors import ErrorCode

from ..transport.http import HttpRequest, HttpServerConnection
from ..transport.websocket import ABNORMAL_CLOSURE, ConnectionClosed, WebSocket, close_forcefully
from .ledger import Flow, StreamRecord
from .sides import RelayHost, close_quietly, close_with

__all__ = ["RawRelays"]

log = logging.getLogger("devstream.hub")


@dataclass
class _RawSlot:
    """The sides of one raw stream that have joined."""

    sides: dict[int, WebSocket] = field(default_factory=dict)
    done: trio.Event = field(default_factory=trio.Event)
    #: Why the hub ends the stream on its own (a peer that never came, a revoked device).
    lone_close: ErrorCode | None = None
    #: The relay of the paired stream, once both sides are in (cancelled to end it).
    relay_scope: trio.CancelScope | None = None


class RawRelays:
    """The raw streams of one hub, by stream id."""

    def __init__(self, endpoint: RelayHost) -> None:
        self.endpoint = endpoint
        self.metrics = endpoint.metrics
        self.close_timeout = endpoint.close_timeout
        self.slots: dict[str, _RawSlot] = {}

    def end(self, stream_id: str, code: ErrorCode) -> None:
        """The hub ends raw stream *stream_id* with *code* (its sides are closed with it)."""
        slot = self.slots.get(stream_id)
        if slot is not None:
            slot.lone_close = code
            if slot.relay_scope is not None:
                slot.relay_scope.cancel()  # its task closes both sides, then sets done
            else:
                slot.done.set()

    async def join(
        self,
        http: HttpServerConnection,
        request: HttpRequest,
        record: StreamRecord,
        role: Role,
        connection_id: int,
        offered: list[str],
        extra_headers: list[tuple[bytes, bytes]],
    ) -> None:
        stream_id = record.stream_id
        slot = self.slots.setdefault(stream_id, _RawSlot())
        try:
            ws = await http.accept_websocket(
                request,
                subprotocol=offered[0] if offered else None,
                extra_headers=extra_headers,
            )
        except BaseException:
            self.endpoint.leave(stream_id, connection_id)
            raise
        peer_id = next(iter(slot.sides), None)
        slot.sides[connection_id] = ws
        log.debug("stream %s: %s joined", stream_id, role.value)
        try:
            if peer_id is not None:
                peer = slot.sides[peer_id]
                self.metrics.streams_total += 1
                record.paired = True
                slot.relay_scope = trio.CancelScope()
                with slot.relay_scope:
                    await self._relay(ws, role, peer, record)
                if slot.lone_close is not None:
                    # The hub ended the stream (its device was disabled or deleted).
                    async with trio.open_nursery() as nursery:
                        for side in (ws, peer):
                            nursery.start_soon(
                                close_quietly, side, slot.lone_close, self.close_timeout
                            )
                slot.done.set()
            else:
                await slot.done.wait()
                if slot.lone_close is not None and slot.relay_scope is None:
                    await close_with(ws, slot.lone_close, self.close_timeout)
        finally:
            self.endpoint.leave(stream_id, connection_id)
            slot.sides.pop(connection_id, None)
            if not slot.sides:
                self.slots.pop(stream_id, None)

    async def _relay(
        self, one: WebSocket, role: Role, other: WebSocket, record: StreamRecord
    ) -> None:
        """Forward fragments both ways until one side closes, then close the other. *one* is
        side *role*'s WebSocket; *record* counts the bytes and notes the end."""
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(self._pump, other, role.other, one, record, scope)
            # This task pumps the other way itself: one task fewer per stream.
            await self._pump(one, role, other, record, scope)
        for side in (one, other):
            await close_forcefully(side.stream)

    async def _pump(
        self,
        source: WebSocket,
        role: Role,
        sink: WebSocket,
        record: StreamRecord,
        scope: trio.CancelScope,
    ) -> None:
        """Forward what side *role* sends (on *source*) to its peer's *sink*."""
        flow: Flow = record.toward(role.other)
        try:
            while True:
                # Everything already parsed goes out in one write.
                batch = [await source.receive(), *source.take_queued()]
                await sink.send_messages(batch)
                flow.count += sum(len(event.data) for event in batch)
        except ConnectionClosed:
            if source.closed is not None:
                # The source closed (or vanished): pass its close on to the sink.
                code, reason = source.closed.code, source.closed.reason
                target = sink
                record.note_close(role, code)
            else:
                # The sink vanished while we wrote to it: tell the source.
                code, reason = ABNORMAL_CLOSURE, ""
                target = source
                record.note_close(role.other, code)
            if code == ABNORMAL_CLOSURE:
                code, reason = 1001, "peer connection lost"
            with trio.move_on_after(self.close_timeout):
                await target.send_close(code, reason)
        # Give the other direction a bounded time to see the close, then stop both.
        scope.deadline = min(scope.deadline, trio.current_time() + self.close_timeout)
