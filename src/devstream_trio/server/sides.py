"""What the hub's two relays share: closing one side of a stream for a reason (an error
code), and :class:`RelayHost`, what a relay needs of the streaming endpoint that runs it."""

from __future__ import annotations

import contextlib
import logging
from typing import Protocol

import trio

from devstream_core.bridge import Bridge
from devstream_core.errors import ErrorCode, close_reason_for
from devstream_core.framing import Reset, encode_frame

from ..transport.websocket import ConnectionClosed, WebSocket
from .metrics import Metrics

__all__ = ["RelayHost", "close_quietly", "close_with"]

log = logging.getLogger("devstream.hub")


class RelayHost(Protocol):
    """What the raw and devstream.v1 relays use of the streaming endpoint that runs them
    (:class:`~.streaming.StreamingEndpoint`): its bridge and counters, its close timeout, and
    what it does when a side leaves, a stream is over, or a deadline was added."""

    bridge: Bridge
    metrics: Metrics
    close_timeout: float
    #: Where a relay starts a short task of its own (a pong the side's stream does not take
    #: at once); None while the hub's timer does not run.
    tasks: trio.Nursery | None

    def wake(self, due: float | None) -> None:
        """A machine added a deadline (*due*: its next one): the hub's timer looks again."""

    def leave(self, stream_id: str, connection_id: int) -> None:
        """Connection *connection_id*, a side of *stream_id*, left."""

    def close_side(
        self, stream_id: str, connection_id: int, code: int, reason: str, messages: list[bytes]
    ) -> None:
        """Connection *connection_id*, a devstream.v1 side of *stream_id*, closed with *code*
        and *reason* after *messages* (see ``Bridge.close``)."""

    def settle(self, stream_id: str) -> None:
        """Stream *stream_id*'s line is written if the bridge says it is over."""


async def close_with(
    ws: WebSocket, code: ErrorCode, close_timeout: float, *, reset: bool = False
) -> None:
    """Close *ws* because of *code* (within *close_timeout*); a framed side gets a Reset frame
    first."""
    log.debug("closing a stream side: %s", code.message)
    with trio.move_on_after(close_timeout):
        if reset:
            with contextlib.suppress(ConnectionClosed):
                await ws.send_bytes(encode_frame(Reset(code=int(code), reason=code.message)))
        await ws.aclose(code.close_code, close_reason_for(code))


async def close_quietly(ws: WebSocket, code: ErrorCode, close_timeout: float) -> None:
    """:func:`close_with`, for a side whose connection may be broken already."""
    with contextlib.suppress(ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
        await close_with(ws, code, close_timeout)
