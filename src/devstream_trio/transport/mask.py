"""Which masking function the trio adapter's WebSockets use.

Every byte a WebSocket client sends is masked (XOR with a 4-byte key) and every byte a server
receives is unmasked, so masking is on every hop of a stream. The codec
(:class:`devstream_core.websocket.Connection`) calls the function it is given; this module
picks it for the WebSockets the adapter opens: the C ``apply_mask`` of the ``websockets``
wheel (tens of GB/s) where it is installed, else the core's pure-Python one (about 1 GB/s).

Rules:

* The bytes are the same either way; only the speed differs (``tests/test_mask.py``).
* ``DEVSTREAM_PURE_PYTHON_MASK=1`` in the environment of a process keeps the pure-Python
  function for the WebSockets it opens from then on; the relay benchmark runs both to show
  the difference.
* No other library is touched: the function is passed to each codec.

The keys a client masks with come from :func:`mask_keys`: ``os.urandom`` drawn 4 KiB at a
time, so that a client's frames cost one system call per thousand rather than one each. The
pool is per thread, and a child process after ``fork`` draws afresh.
"""

from __future__ import annotations

import os
import threading

from devstream_core.maskkeys import DEFAULT_BLOCK, MaskKeyPool
from devstream_core.websocket import MaskFunction, native_apply_mask, pure_apply_mask

__all__ = ["PURE_PYTHON_ENV", "mask_keys", "masker", "masker_in_use", "native_apply_mask"]

#: The environment variable that keeps the pure-Python masking function.
PURE_PYTHON_ENV = "DEVSTREAM_PURE_PYTHON_MASK"


def masker() -> MaskFunction:
    """The masking function for a WebSocket opened now (see the module's rules)."""
    if native_apply_mask is not None and os.environ.get(PURE_PYTHON_ENV, "") in ("", "0"):
        return native_apply_mask
    return pure_apply_mask


def masker_in_use() -> str:
    """``"native"`` when :func:`masker` gives the C function, else ``"pure-python"``."""
    return "native" if masker() is native_apply_mask else "pure-python"


#: How many random bytes the pool of masking keys draws at once.
KEY_POOL_SIZE = DEFAULT_BLOCK


class _Pools(threading.local):
    """Each thread's pool of masking keys."""

    def __init__(self) -> None:
        self.pool = MaskKeyPool(os.urandom, KEY_POOL_SIZE)


_pools = _Pools()
os.register_at_fork(after_in_child=lambda: _pools.pool.forget())


def mask_keys(count: int = 1) -> bytes:
    """*count* fresh masking keys of 4 bytes each, one after the other, from this thread's
    :class:`~devstream_core.maskkeys.MaskKeyPool` (see the module's rules): no key is ever
    handed out twice."""
    return _pools.pool.take(count)
