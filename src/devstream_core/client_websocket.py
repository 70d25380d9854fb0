"""A client's open WebSocket, sans-IO: the codec and what every client driver does with it.

:class:`~devstream_core.websocket.Connection` parses and frames. What a client does with what
it parses is the same over any I/O layer, and lives here: a ping is answered with a pong
while the connection is open; the peer's close (or the close owed for a frame the codec
refused) is answered with a close this side may send
(:func:`~devstream_core.websocket.sendable_close_code`) and ends the WebSocket with the
peer's code and reason; a transport that ended without a close ends it with 1006.
:class:`ClientWebSocket` returns the bytes to write and the data fragments; the driver
writes, reads, and keeps the time of the last bytes received.

The driver's reading loop::

    while True:
        if ws.closed is not None:
            raise ws.closed                       # after every fragment before it
        data = read()
        if not data:
            ws.connection_lost()
            continue
        received = ws.receive_data(data)
        write(received.to_send)                   # pongs, the close's answer
        if ws.closed is not None:
            close_transport_once_written()
        if received.messages:
            return received.messages

(``ws.holds_more``: the last read's frames are not all parsed yet; feed ``b""`` instead of
reading.)

Rules every change must keep:

* **Nothing is sent after the end**: once :attr:`ClientWebSocket.closed` is set, a message
  raises it, and a ping or a close gives no bytes; a ping goes only while ``OPEN``, a close
  only while ``OPEN`` or ``REMOTE_CLOSING`` (the codec's table).
* **The first end counts**: :attr:`ClientWebSocket.closed` is set once (the peer's close, a
  loss, or the driver's own :meth:`ClientWebSocket.end`), and never changed after.
* **A fresh masking key per frame**, from the function the driver gives (a
  :class:`~devstream_core.maskkeys.MaskKeyPool`'s ``key``, or ``os.urandom(4)``;
  a test gives a fixed one): nothing random here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .websocket import (
    BytesMessage,
    CloseConnection,
    Connection,
    ConnectionState,
    MaskFunction,
    Ping,
    TextMessage,
    sendable_close_code,
)

__all__ = ["ABNORMAL_CLOSURE", "ClientWebSocket", "ConnectionClosed", "Received"]

#: The close code of a WebSocket whose transport ended without a close (RFC 6455 §7.1.5).
ABNORMAL_CLOSURE = 1006


class ConnectionClosed(Exception):
    """The WebSocket ended: the other end's close (its code and reason), or 1006 when the
    connection was lost without one."""

    def __init__(self, code: int, reason: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class Received:
    """What one read brought: the data fragments, and the bytes to write in answer (pongs,
    the close's answer; ``b""`` for none)."""

    messages: list[BytesMessage | TextMessage]
    to_send: bytes = b""


class ClientWebSocket:
    """The client end of one WebSocket after its ``101``. *mask_key* gives a new 4-byte
    masking key each time it is called; *apply_mask* is the codec's (see
    :class:`~devstream_core.websocket.Connection`)."""

    def __init__(
        self, mask_key: Callable[[], bytes], *, apply_mask: MaskFunction | None = None
    ) -> None:
        self._mask_key = mask_key
        self._conn = (
            Connection(client=True)
            if apply_mask is None
            else Connection(client=True, apply_mask=apply_mask)
        )
        #: How the WebSocket ended, once it has.
        self.closed: ConnectionClosed | None = None

    @property
    def holds_more(self) -> bool:
        """The last read's frames are not all parsed: feed ``b""`` before reading again."""
        return self._conn.holds_more

    def send(self, data: bytes | bytearray | memoryview | str) -> bytes:
        """The bytes of one whole message (``str``: a text message); raises :attr:`closed`
        once the WebSocket has ended."""
        if self.closed is not None:
            raise self._closed_error()
        head, body = self._conn.send_data(data, mask_key=self._mask_key())
        return head + bytes(body)

    def ping(self) -> bytes:
        """A ping's bytes, or ``b""`` when none may go (closing, or ended)."""
        if self.closed is None and self._conn.state is ConnectionState.OPEN:
            return self._conn.send_ping(mask_key=self._mask_key())
        return b""

    def close(self, code: int = 1000, reason: str = "") -> bytes:
        """The close's bytes, or ``b""`` when this side may send none (it did, or the
        WebSocket ended)."""
        if self.closed is None and self._conn.state in _MAY_CLOSE:
            return self._conn.send_close(code, reason, mask_key=self._mask_key())
        return b""

    def end(self, code: int, reason: str) -> None:
        """The driver ends the WebSocket (it drops or closes the transport): later sends
        raise ``ConnectionClosed(code, reason)``, unless it had ended already."""
        if self.closed is None:
            self.closed = ConnectionClosed(code, reason)

    def _closed_error(self) -> ConnectionClosed:
        """A new exception like :attr:`closed`, to raise: the one kept is never raised (its
        traceback would hold frames that hold this object: a cycle that only Python's cyclic
        collector frees)."""
        closed = self.closed
        assert closed is not None
        return ConnectionClosed(closed.code, closed.reason)

    def connection_lost(self) -> None:
        """The transport ended (a read brought nothing, or failed)."""
        self.end(ABNORMAL_CLOSURE, "connection lost")

    def receive_data(self, data: bytes) -> Received:
        """Parse what a read brought (``b""``: the rest of the last one, when
        :attr:`holds_more`); raises :attr:`closed` once the WebSocket has ended."""
        if self.closed is not None:
            raise self._closed_error()
        messages: list[BytesMessage | TextMessage] = []
        answers = bytearray()
        for event in self._conn.receive_data(data):
            if isinstance(event, (BytesMessage, TextMessage)):
                messages.append(event)
            elif isinstance(event, Ping):
                if self._conn.state is ConnectionState.OPEN:
                    answers += self._conn.send_pong(event.payload, mask_key=self._mask_key())
            elif isinstance(event, CloseConnection):  # the peer's, or one owed for a refusal
                answers += self.close(sendable_close_code(event.code), event.reason)
                self.end(event.code, event.reason)
            # A Pong needs nothing: the driver's time of the last bytes received counts it.
        return Received(messages=messages, to_send=bytes(answers))


_MAY_CLOSE = frozenset({ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING})
