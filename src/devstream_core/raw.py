"""A raw stream's receiving side on a client (Azure's data plane), sans-IO.

Raw mode has no frames of devstream's: each binary message is a piece of the stream, and
the WebSocket's close is its end. What ``receive_some`` returns is the same over any I/O
layer, and :class:`RawReceiver` decides it: the bytes received so far (at most what the
caller asked for), ``b""`` once the peer closed normally (1000), or the error for any other
end (:func:`end_error`). The driver reads a WebSocket only when :meth:`RawReceiver.take`
says None::

    while (data := raw.take(max_bytes)) is None:
        try:
            for fragment in read():
                raw.data_received(fragment.data)
        except ConnectionClosed as exc:
            raw.ended(exc.code, exc.reason)

Rules every change must keep:

* **Bytes before the end**: every byte received before the close is returned before the
  close's EOF or error; after it, every call returns the same (``b""``, or raises the same
  error).
* **Bounded**: the receiver holds what one read brought, since a driver reads again only
  once :meth:`RawReceiver.take` has returned it all.
"""

from __future__ import annotations

from .errors import DevstreamError, ErrorCode
from .exceptions import error_for
from .initiator import close_error

__all__ = ["NORMAL_CLOSURE", "RawReceiver", "end_error"]

#: The close code of a normal end: the stream's EOF.
NORMAL_CLOSURE = 1000


def end_error(code: int, reason: str) -> DevstreamError:
    """The error for a raw stream whose WebSocket ended with *code* and *reason*: the hub's
    error when the reason carries one (``"504901 the other side never connected"``), else
    ``PeerLost`` naming the code and the reason."""
    return close_error(reason) or error_for(
        ErrorCode.PEER_LOST, f"the stream ended: {code} {reason}".rstrip()
    )


class RawReceiver:
    """What a raw stream has received, and how it ended."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        #: The close that ended it, unless a normal one: a new error is raised from it on
        #: each receive (one kept and raised would hold, by its traceback, the frames that
        #: hold this receiver: a cycle only Python's cyclic collector frees).
        self._end: tuple[int, str] | None = None
        self._ended = False

    def data_received(self, data: bytes | bytearray | memoryview | str) -> None:
        """A received fragment's data (text as UTF-8)."""
        self._buffer += data.encode() if isinstance(data, str) else data

    def ended(self, code: int, reason: str) -> None:
        """The WebSocket ended with *code* and *reason* (1006: lost without a close)."""
        if not self._ended:
            self._ended = True
            self._end = None if code == NORMAL_CLOSURE else (code, reason)

    def take(self, max_bytes: int | None = None) -> bytes | None:
        """What a receive returns now: received bytes (at most *max_bytes*), ``b""`` after a
        normal end, None while there is nothing yet; raises the error of any other end."""
        buffer = self._buffer
        if not buffer:
            if not self._ended:
                return None
            if self._end is not None:
                raise end_error(*self._end)
            return b""
        size = len(buffer) if max_bytes is None else min(max_bytes, len(buffer))
        chunk = bytes(buffer[:size])
        del buffer[:size]
        return chunk
