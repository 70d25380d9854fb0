"""WebSocket masking at native speed.

Every byte a WebSocket client sends is masked (XOR with a 4-byte key) and every byte a server
receives is unmasked, so masking is on every hop of a stream: the service's proxy masks what it
sends, the hub unmasks it, the device's acks are masked and unmasked the same way. wsproto does
this in pure Python (about 1.3 GB/s on the machine ``bench/`` ran on, a quarter of the hub's
time relaying 64 KiB messages). The ``websockets`` package ships a C ``apply_mask`` in its wheels
(tens of GB/s); this module builds a masker on it with wsproto's masker interface and gives it
to wsproto when ``devstream_trio`` is imported.

Rules:

* The bytes are the same either way; only the speed differs (``tests/test_mask.py``).
* ``DEVSTREAM_PURE_PYTHON_MASK=1`` in the environment keeps wsproto's own masker; the relay
  benchmark runs both to show the difference.
* If ``websockets`` or its C part is missing, or wsproto no longer has the masker class this
  replaces, nothing is replaced and wsproto masks as it always did.
* The replacement is process-wide: wsproto connections made by other code in the same process
  mask faster too, with the same bytes.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import wsproto.frame_protocol

__all__ = [
    "NativeMasker",
    "apply_mask",
    "install",
    "masker_in_use",
    "native_apply_mask",
    "unmasker",
]

#: The environment variable that keeps wsproto's pure-Python masker.
PURE_PYTHON_ENV = "DEVSTREAM_PURE_PYTHON_MASK"

_original_masker = wsproto.frame_protocol.XorMaskerSimple


def _load_native() -> Callable[[bytes | bytearray, bytes | bytearray], bytes] | None:
    try:
        from websockets.speedups import apply_mask
    except ImportError:
        return None
    return apply_mask


#: The C masking function, or ``None`` where it is not installed.
native_apply_mask = _load_native()


class NativeMasker:
    """wsproto's masker interface over a C ``apply_mask``: one key, continued across calls."""

    __slots__ = ("_key",)

    def __init__(self, masking_key: bytes | bytearray) -> None:
        self._key = bytes(masking_key)

    def process(self, data: bytes | bytearray) -> bytes:
        """Mask (or unmask) *data*, carrying on where the previous call stopped in the key."""
        assert native_apply_mask is not None
        masked = native_apply_mask(data, self._key)
        turn = len(data) & 3
        if turn:
            self._key = self._key[turn:] + self._key[:turn]
        return masked


def apply_mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
    """*data* masked with the 4-byte *key*, by the masker wsproto uses (see :func:`install`)."""
    if native_apply_mask is not None and masker_in_use() == "native":
        return native_apply_mask(data, key)  # type: ignore[arg-type]
    return bytes(_original_masker(key).process(bytearray(data)))


def unmasker() -> Callable[[bytes | bytearray | memoryview, bytes], bytes]:
    """The function :func:`apply_mask` calls now: the C one while it is in use."""
    if native_apply_mask is not None and masker_in_use() == "native":
        return native_apply_mask  # type: ignore[return-value]
    return apply_mask


def install() -> str:
    """Give wsproto the native masker where possible; return :func:`masker_in_use`."""
    if (
        native_apply_mask is not None
        and os.environ.get(PURE_PYTHON_ENV, "") in ("", "0")
        and wsproto.frame_protocol.XorMaskerSimple is _original_masker
    ):
        wsproto.frame_protocol.XorMaskerSimple = NativeMasker  # type: ignore[misc,assignment]
    return masker_in_use()


def masker_in_use() -> str:
    """``"native"`` when wsproto masks with :class:`NativeMasker`, else ``"pure-python"``."""
    current: object = wsproto.frame_protocol.XorMaskerSimple
    return "native" if current is NativeMasker else "pure-python"


def uninstall() -> None:
    """Give wsproto its own masker back (for tests that compare the two)."""
    wsproto.frame_protocol.XorMaskerSimple = _original_masker  # type: ignore[misc]
