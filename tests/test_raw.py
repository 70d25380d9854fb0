"""devstream_core.raw: what a raw stream's receive returns, sans-IO."""

from __future__ import annotations

import pytest

from devstream_core.errors import ErrorCode
from devstream_core.exceptions import PeerLost, PeerNeverConnected
from devstream_core.raw import RawReceiver, end_error


def test_nothing_yet_then_the_bytes_received_as_asked() -> None:
    raw = RawReceiver()
    assert raw.take() is None
    raw.data_received(b"abc")
    raw.data_received(memoryview(b"de"))
    raw.data_received("fé")
    assert raw.take(2) == b"ab"
    assert raw.take() == "cdefé".encode()
    assert raw.take(10) is None


def test_a_normal_close_is_the_eof_after_every_byte() -> None:
    raw = RawReceiver()
    raw.data_received(b"last")
    raw.ended(1000, "")
    raw.ended(1006, "connection lost")  # the first end counts
    assert raw.take(3) == b"las"
    assert raw.take() == b"t"
    assert raw.take() == b""
    assert raw.take() == b""


def test_a_close_with_the_hubs_error_raises_it() -> None:
    raw = RawReceiver()
    raw.data_received(b"x")
    raw.ended(4504, "504901 the other side of the stream never connected")
    assert raw.take() == b"x"
    for _ in range(2):
        with pytest.raises(PeerNeverConnected) as info:
            raw.take()
        assert info.value.code is ErrorCode.PEER_NEVER_CONNECTED


def test_any_other_end_is_the_peer_lost() -> None:
    raw = RawReceiver()
    raw.ended(1006, "connection lost")
    with pytest.raises(PeerLost) as info:
        raw.take()
    assert info.value.message == "the stream ended: 1006 connection lost"
    assert end_error(1001, "").message == "the stream ended: 1001"
