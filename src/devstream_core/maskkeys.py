"""Masking keys for a client's frames, cut from random bytes drawn in blocks.

Every frame a WebSocket client sends is masked with a fresh 4-byte key taken from a strong
source of entropy (RFC 6455 §5.3). Drawing each key with ``os.urandom(4)`` costs a system
call per frame; a :class:`MaskKeyPool` draws ``block`` bytes at a time with the function the
driver gives (``os.urandom``) and hands them out 4 at a time, never the same bytes twice.
Nothing random here: the bytes are the driver's.

Rules for a driver:

* One pool per thread (an event loop runs in one): a pool is not locked.
* A process that forks calls :meth:`MaskKeyPool.forget` in the child (``os.register_at_fork``),
  or parent and child would hand out the same keys.
"""

from __future__ import annotations

from collections.abc import Callable

from .errors import ErrorCode, LocalProtocolError

__all__ = ["DEFAULT_BLOCK", "KEY_SIZE", "MaskKeyPool"]

#: The size of a masking key.
KEY_SIZE = 4
#: How many random bytes a pool draws at once by default: a system call per 1,024 keys.
DEFAULT_BLOCK = 4096


class MaskKeyPool:
    """Masking keys from blocks of random bytes (see the module's rules)."""

    __slots__ = ("_block", "_data", "_draw", "_used")

    def __init__(self, draw: Callable[[int], bytes], block: int = DEFAULT_BLOCK) -> None:
        if block < KEY_SIZE or block % KEY_SIZE:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, f"block must be a positive multiple of {KEY_SIZE}"
            )
        self._draw = draw
        self._block = block
        self._data = b""
        self._used = 0

    def take(self, count: int = 1) -> bytes:
        """*count* fresh keys, one after the other (``4 * count`` bytes); more than a block's
        worth is drawn on its own."""
        size = KEY_SIZE * count
        used = self._used
        if used + size > len(self._data):
            if size > self._block:
                return self._draw(size)
            self._data, used = self._draw(self._block), 0
        self._used = used + size
        return self._data[used : used + size]

    def key(self) -> bytes:
        """One fresh key (what :class:`~devstream_core.client_websocket.ClientWebSocket` takes
        as its key function)."""
        return self.take(1)

    def forget(self) -> None:
        """Drop the bytes not handed out yet: the next key comes from a new draw."""
        self._data, self._used = b"", 0
