"""Masking: the native and pure-Python functions give the same bytes, at any split, both ways;
the adapter picks one without touching any other library."""

from __future__ import annotations

import itertools

import pytest
import wsproto.frame_protocol
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage as WsprotoBytes

import devstream_trio
from devstream_core.websocket import BytesMessage, Connection, pure_apply_mask
from devstream_trio.transport import mask as _mask


def test_native_masker_is_in_use() -> None:
    # websockets (with its C part) is a dependency: the adapter's WebSockets use it.
    assert _mask.native_apply_mask is not None
    assert _mask.masker() is _mask.native_apply_mask
    assert _mask.masker_in_use() == "native"


def test_no_library_is_patched() -> None:
    """wsproto (a test dependency only) keeps its own masker once devstream is imported."""
    assert devstream_trio is not None
    masker = wsproto.frame_protocol.XorMaskerSimple
    assert masker.__module__ == "wsproto.frame_protocol"


@settings(max_examples=200)
@given(
    key=st.binary(min_size=4, max_size=4),
    data=st.binary(max_size=300),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=6),
)
def test_same_bytes_as_pure_python_at_any_split(key: bytes, data: bytes, cuts: list[int]) -> None:
    """A frame in reads cut anywhere: both functions unmask it into the same payload (the
    codec turns the key between pieces), the one wsproto's own masker wrote."""
    assert _mask.native_apply_mask is not None
    size = len(data)
    length = bytes((0x80 | size,)) if size < 126 else bytes((0x80 | 126,)) + size.to_bytes(2, "big")
    wire = b"\x82" + length + key
    wire += bytes(wsproto.frame_protocol.XorMaskerSimple(key).process(bytearray(data)))
    bounds = sorted({0, len(wire), *(c for c in cuts if c <= len(wire))})
    reads = [wire[a:b] for a, b in itertools.pairwise(bounds)]
    for function in (_mask.native_apply_mask, pure_apply_mask):
        server = Connection(client=False, apply_mask=function)
        events = [event for read in reads for event in server.receive_data(read)]
        assert b"".join(bytes(e.data) for e in events if isinstance(e, BytesMessage)) == data
    assert _mask.native_apply_mask(data, key) == pure_apply_mask(data, key)


def test_environment_keeps_pure_python(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_mask.PURE_PYTHON_ENV, "1")
    assert _mask.masker() is pure_apply_mask
    assert _mask.masker_in_use() == "pure-python"
    monkeypatch.setenv(_mask.PURE_PYTHON_ENV, "0")
    assert _mask.masker_in_use() == "native"


@pytest.mark.parametrize("native", [True, False])
def test_wsproto_reads_what_the_codec_masks(native: bool) -> None:
    function = _mask.native_apply_mask if native else pure_apply_mask
    client = Connection(client=True, apply_mask=function)
    server = WsprotoConnection(ConnectionType.SERVER)
    payload = bytes(range(256)) * 301 + b"odd"
    wire = b"".join(client.send_data(payload[:1001], message_finished=False, mask_key=b"k3y!"))
    wire += b"".join(client.send_data(payload[1001:], mask_key=b"\x00\xff\x10\x7f"))
    # The masked bytes on the wire are not the payload.
    assert payload[:64] not in wire
    for start in range(0, len(wire), 7000):
        server.receive_data(wire[start : start + 7000])
    events = list(server.events())
    assert all(isinstance(event, WsprotoBytes) for event in events)
    assert b"".join(bytes(event.data) for event in events) == payload


def test_mask_keys_come_fresh_from_the_pool_and_never_twice() -> None:
    """Keys are 4 bytes each, taken in order from a pool of os.urandom bytes: across several
    refills of the pool no key (or run of keys) is handed out twice, and a request larger than
    the pool is served whole."""
    from devstream_trio.transport.mask import KEY_POOL_SIZE, mask_keys

    taken = [mask_keys() for _ in range(3 * KEY_POOL_SIZE // 4 + 7)]
    assert all(len(key) == 4 for key in taken)
    # 4-byte random keys: a repeat among a few thousand would mean the pool was reused.
    assert len(set(taken)) == len(taken)
    batch = mask_keys(5)
    assert len(batch) == 20 and batch[:4] not in taken
    big = mask_keys(KEY_POOL_SIZE)  # more than one pool's worth
    assert len(big) == 4 * KEY_POOL_SIZE


def test_mask_keys_are_drawn_afresh_in_a_forked_child() -> None:
    """A child process after fork does not hand out the keys its parent's pool holds."""
    import os

    from devstream_trio.transport.mask import mask_keys

    mask_keys()  # the pool is filled
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: send its next key to the parent
        os.write(write, mask_keys())
        os._exit(0)
    os.close(write)
    child_key = os.read(read, 4)
    os.close(read)
    os.waitpid(pid, 0)
    assert len(child_key) == 4
    assert child_key != mask_keys()  # the parent's next key from the same pool position
