"""The native masker gives wsproto the same bytes as its own, at any split, both ways."""

from __future__ import annotations

import itertools

import pytest
import wsproto.frame_protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage

from devstream_trio import _mask


@pytest.fixture
def restore_masker() -> object:
    before = wsproto.frame_protocol.XorMaskerSimple
    yield before
    wsproto.frame_protocol.XorMaskerSimple = before  # type: ignore[misc]


def test_native_masker_is_in_use() -> None:
    # websockets (with its C part) is a dependency: importing devstream_trio installs it.
    assert _mask.native_apply_mask is not None
    assert _mask.masker_in_use() == "native"
    assert wsproto.frame_protocol.XorMaskerSimple is _mask.NativeMasker


@settings(max_examples=200)
@given(
    key=st.binary(min_size=4, max_size=4),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6),
)
def test_same_bytes_as_pure_python_at_any_split(key: bytes, data: bytes, cuts: list[int]) -> None:
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    chunks = [data[a:b] for a, b in itertools.pairwise(bounds)]
    native = _mask.NativeMasker(key)
    pure = _mask._original_masker(bytearray(key))
    native_out = b"".join(native.process(chunk) for chunk in chunks)
    pure_out = b"".join(bytes(pure.process(bytearray(chunk))) for chunk in chunks)
    assert native_out == pure_out
    assert len(native_out) == len(data)
    # Masking twice with the same key from the start gives the data back.
    assert _mask.NativeMasker(key).process(native_out) == data


def test_environment_keeps_pure_python(
    monkeypatch: pytest.MonkeyPatch, restore_masker: object
) -> None:
    _mask.uninstall()
    monkeypatch.setenv(_mask.PURE_PYTHON_ENV, "1")
    assert _mask.install() == "pure-python"
    assert wsproto.frame_protocol.XorMaskerSimple is _mask._original_masker
    monkeypatch.setenv(_mask.PURE_PYTHON_ENV, "0")
    assert _mask.install() == "native"


@pytest.mark.parametrize("native", [True, False])
def test_wsproto_round_trip(native: bool, restore_masker: object) -> None:
    if not native:
        _mask.uninstall()
    client = Connection(ConnectionType.CLIENT)
    server = Connection(ConnectionType.SERVER)
    payload = bytes(range(256)) * 301 + b"odd"
    wire = client.send(BytesMessage(data=payload[:1001], message_finished=False))
    wire += client.send(BytesMessage(data=payload[1001:], message_finished=True))
    # The masked bytes on the wire are not the payload.
    assert payload[:64] not in wire
    for start in range(0, len(wire), 7000):
        server.receive_data(wire[start : start + 7000])
    received = b"".join(bytes(event.data) for event in server.events())
    assert received == payload
