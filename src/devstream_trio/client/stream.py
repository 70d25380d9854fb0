"""The stream handed to application code: a ``trio.abc.HalfCloseableStream`` over a WebSocket.

This is raw mode, the Azure-compatible data plane: each ``send_all`` goes out as binary
WebSocket messages of at most ``max_message_size`` bytes, and ``receive_some`` returns the
payload of the messages the peer sent, in order.

* ``receive_some`` returns ``b""`` once the peer has closed its side normally (close code 1000).
* A stream that ends any other way (the peer's connection was lost, the hub closed the stream
  with an error code such as ``4504 504901 the other side of the stream never connected``)
  raises ``trio.BrokenResourceError`` whose ``__cause__`` is the
  :class:`~devstream_trio.exceptions.HubError` for the code; ``close_code`` and
  ``close_reason`` keep what the hub sent.
* ``send_eof()`` sends a WebSocket close. Raw mode has no half-close on the wire: after it,
  bytes the peer had already sent are still delivered, but once the hub has relayed the close
  the peer can send no more.
* ``receive_some`` is safe to cancel: nothing received is lost.
* A ``send_all`` cancelled while it waits for the socket either sent none of its current
  message (the stream carries on) or cut it on the wire: then the connection is closed at
  once, and the stream is broken (the peer sees the connection lost), so that no later byte
  is read as part of the cut message.
"""

from __future__ import annotations

import trio

from devstream_core.common import Role
from devstream_core.initiator import close_error
from devstream_core.wire import RAW_MESSAGE_SIZE

from ..exceptions import HubError
from ..transport.websocket import NORMAL_CLOSURE, ConnectionClosed, WebSocket

__all__ = ["HubStream"]


class HubStream(trio.abc.HalfCloseableStream):
    """One side of a device stream."""

    def __init__(
        self,
        ws: WebSocket,
        *,
        stream_id: str,
        role: Role,
        max_message_size: int = RAW_MESSAGE_SIZE,
    ) -> None:
        self._ws = ws
        self.stream_id = stream_id
        self.role = role
        #: The stream name, when known (the device side sets it).
        self.name = ""

        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._eof = False
        self._send_closed = False
        self._receiving = False
        self._sending = False
        #: The close code and reason of the WebSocket, once it has closed.
        self.close_code: int | None = None
        self.close_reason: str = ""

    @property
    def subprotocol(self) -> str | None:
        """The WebSocket subprotocol the hub chose, if any."""
        return self._ws.subprotocol

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send *data*; raise ``trio.BrokenResourceError`` if the stream has ended."""
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this stream")
        if self._send_closed:
            raise trio.ClosedResourceError("send_eof() or aclose() was called")
        self._sending = True
        try:
            view = memoryview(data)
            await trio.lowlevel.checkpoint_if_cancelled()
            for start in range(0, len(view), self.max_message_size):
                chunk = bytes(view[start : start + self.max_message_size])
                try:
                    await self._ws.send_bytes(chunk)
                except ConnectionClosed as exc:
                    raise trio.BrokenResourceError("the stream has ended") from self._error(exc)
            # A WebSocket write the kernel takes at once is not a schedule point; send_all is,
            # as trio's own are, so that a loop of sends lets other tasks run.
            await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        """Return at once: sends block only for the transport's own flow control."""
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Close the sending direction (a WebSocket close in raw mode)."""
        if self._send_closed:
            await trio.lowlevel.checkpoint()
            return
        self._send_closed = True
        await self._ws.send_close(NORMAL_CLOSURE, "")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return some received bytes, or ``b""`` after the peer's normal close."""
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this stream")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            while not self._buffer:
                if self._eof:
                    await trio.lowlevel.checkpoint()
                    if self.close_code != NORMAL_CLOSURE:
                        raise self._broken()
                    return b""
                try:
                    event = await self._ws.receive()
                except ConnectionClosed as exc:
                    self._eof = True
                    self.close_code, self.close_reason = exc.code, exc.reason
                    continue
                data = event.data
                self._buffer += data.encode() if isinstance(data, str) else data
            size = len(self._buffer) if max_bytes is None else min(max_bytes, len(self._buffer))
            chunk = bytes(self._buffer[:size])
            del self._buffer[:size]
            return chunk
        finally:
            self._receiving = False

    async def aclose(self) -> None:
        """Close both directions and release the connection."""
        self._send_closed = True
        try:
            # Shielded, for a second at most: one scope does both (each costs about as much
            # as the close itself).
            with trio.CancelScope(shield=True, deadline=trio.current_time() + 1):
                await self._ws.send_close(NORMAL_CLOSURE, "")
        finally:
            await self._ws.abort()

    def _broken(self) -> trio.BrokenResourceError:
        """The error for a stream that ended abnormally (raised on every later receive)."""
        exc = ConnectionClosed(self.close_code or 1006, self.close_reason)
        broken = trio.BrokenResourceError(f"the stream ended: {exc.code} {exc.reason}".rstrip())
        broken.__cause__ = self._error(exc)
        return broken

    def _error(self, exc: ConnectionClosed) -> HubError | ConnectionClosed:
        return close_error(exc.reason) or exc
