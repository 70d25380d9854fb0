"""Tests for devstream_core.maskkeys: masking keys cut from blocks of random bytes.

The draw is a counter here (no randomness in the core's tests), so which bytes each key came
from can be checked exactly.
"""

from __future__ import annotations

import itertools

import pytest

from devstream_core.errors import ErrorCode, LocalProtocolError
from devstream_core.maskkeys import DEFAULT_BLOCK, KEY_SIZE, MaskKeyPool


class CountingDraw:
    """Hands out bytes 0, 1, 2, … (mod 256) and records each draw's size."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self._next = itertools.count()

    def __call__(self, size: int) -> bytes:
        self.sizes.append(size)
        return bytes(next(self._next) % 256 for _ in range(size))


def test_keys_are_cut_in_order_from_block_sized_draws_and_never_repeat() -> None:
    draw = CountingDraw()
    pool = MaskKeyPool(draw, block=16)
    keys = [pool.key() for _ in range(10)]
    assert all(len(key) == KEY_SIZE for key in keys)
    # Four keys per 16-byte block; ten keys take three draws, the bytes in draw order.
    assert draw.sizes == [16, 16, 16]
    assert b"".join(keys) == bytes(range(40))
    assert pool.take(2) == bytes(range(40, 48))
    assert draw.sizes == [16, 16, 16]


def test_a_batch_that_does_not_fit_what_is_left_starts_a_new_block() -> None:
    draw = CountingDraw()
    pool = MaskKeyPool(draw, block=16)
    assert pool.take(3) == bytes(range(12))
    # 8 bytes asked, 4 left: a new block, and the 4 left are never handed out.
    assert pool.take(2) == bytes(range(16, 24))
    assert draw.sizes == [16, 16]


def test_more_than_a_block_is_drawn_on_its_own() -> None:
    draw = CountingDraw()
    pool = MaskKeyPool(draw, block=8)
    assert pool.key() == bytes(range(4))
    assert pool.take(5) == bytes(range(8, 28))  # 20 bytes: a draw of their own
    assert pool.key() == bytes(range(4, 8))  # the block's rest is still there
    assert draw.sizes == [8, 20]


def test_forget_drops_what_was_not_handed_out() -> None:
    draw = CountingDraw()
    pool = MaskKeyPool(draw)
    assert pool.key() == bytes(range(4))
    pool.forget()
    assert pool.key() == bytes(i % 256 for i in range(DEFAULT_BLOCK, DEFAULT_BLOCK + 4))
    assert draw.sizes == [DEFAULT_BLOCK, DEFAULT_BLOCK]


@pytest.mark.parametrize("block", [0, 3, 6, -4])
def test_a_block_must_be_a_positive_multiple_of_the_key_size(block: int) -> None:
    with pytest.raises(LocalProtocolError) as info:
        MaskKeyPool(CountingDraw(), block=block)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
