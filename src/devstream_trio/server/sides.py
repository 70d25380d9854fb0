"""Closing one side of a stream at the hub, for a reason (an error code)."""

from __future__ import annotations

import contextlib
import logging

import trio

from devstream_core.errors import ErrorCode, close_reason_for
from devstream_core.framing import Reset, encode_frame

from ..transport.websocket import ConnectionClosed, WebSocket

__all__ = ["close_quietly", "close_with"]

log = logging.getLogger("devstream.hub")


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
