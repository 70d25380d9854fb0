"""The codec's frame parser gives the events wsproto gives for the same bytes, split the same
way.

wsproto's own ``Connection.receive_data`` + ``events()`` is the reference: every test feeds the
same reads to both and compares what comes out, for well-formed streams (any frames, any
splits, both roles) and for bytes that break the protocol (same events, then the same close
code). ``test_websocket_codec`` tests the codec rule by rule.
"""

from __future__ import annotations

import itertools
import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection as WsprotoClose

from devstream_core.websocket import (
    MAX_BATCH_FRAMES,
    BytesMessage,
    CloseConnection,
    TextMessage,
    default_apply_mask,
)
from devstream_core.websocket import Connection as Codec

from ._helpers import load_fuzz_harness


def frame(
    opcode: int,
    payload: bytes,
    *,
    fin: bool = True,
    masked: bool,
    rsv: int = 0,
    key: bytes | None = None,
    length_form: int | None = None,
) -> bytes:
    """One frame as a peer would send it; ``length_form`` forces 126 or 127 encoding."""
    first = (0x80 if fin else 0) | rsv | opcode
    length = len(payload)
    form = length_form or (length if length < 126 else 126 if length < 65536 else 127)
    mask_bit = 0x80 if masked else 0
    if form < 126:
        head = bytes((first, mask_bit | length))
    elif form == 126:
        head = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, length)
    if masked:
        key = key if key is not None else os.urandom(4)
        return head + key + default_apply_mask(payload, key)
    return head + payload


#: The fuzz harness, whose comparison of the two parsers these tests share.
WS_FRAMES_HARNESS = load_fuzz_harness("fuzz_ws_frames")
#: Events as comparable tuples (payload bytes, flags; a close by its code).
describe = WS_FRAMES_HARNESS.describe


def run_both(
    reads: list[bytes],
    *,
    server: bool,
    borrowed: bool = False,
    max_frames: int = MAX_BATCH_FRAMES,
) -> tuple[list[object], list[object]]:
    """Feed *reads* to the codec and to wsproto; return both event lists.

    *borrowed*: each read reaches the reader as a view of one buffer, lent for the call and
    scribbled over afterwards, as the WebSocket's reads on a plain socket are. The reader
    parses at most *max_frames* frames a call; what it holds is parsed before the next read,
    as the WebSocket does.
    """
    kind = ConnectionType.SERVER if server else ConnectionType.CLIENT
    reader = Codec(client=not server, max_frames=max_frames)
    reference = Connection(kind)
    ours: list[object] = []
    theirs: list[object] = []
    buffer = bytearray(max(map(len, reads), default=0))
    for data in reads:
        if borrowed:
            buffer[: len(data)] = data
            ours.extend(reader.receive_data(memoryview(buffer)[: len(data)], borrowed=True))
            buffer[:] = b"\xee" * len(buffer)
        else:
            ours.extend(reader.receive_data(data))
        while reader.holds_more:
            ours.extend(reader.receive_data(b""))
        if not any(isinstance(e, WsprotoClose) for e in theirs):
            reference.receive_data(data)
            theirs.extend(reference.events())
    return ours, theirs


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


text_or_bytes = st.one_of(
    st.binary(max_size=300).map(lambda b: ("binary", b)),
    st.text(max_size=120).map(lambda t: ("text", t.encode())),
)


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> bytes:
    """A well-formed stream: messages in fragments, pings and pongs between, maybe a close."""
    wire = b""
    for kind, payload in draw(st.lists(text_or_bytes, max_size=6)):
        cuts = sorted(set(draw(st.lists(st.integers(0, len(payload)), max_size=3))))
        bounds = [0, *cuts, len(payload)]
        pieces = [payload[a:b] for a, b in itertools.pairwise(bounds)]
        for i, piece in enumerate(pieces):
            opcode = (0x1 if kind == "text" else 0x2) if i == 0 else 0x0
            wire += frame(opcode, piece, fin=i == len(pieces) - 1, masked=masked)
            if draw(st.booleans()) and draw(st.booleans()):
                control = draw(st.sampled_from([0x9, 0xA]))
                wire += frame(control, draw(st.binary(max_size=125)), masked=masked)
    if draw(st.booleans()):
        wire += frame(0x8, struct.pack("!H", 1000) + b"bye", masked=masked)
        wire += frame(0x2, b"after the close", masked=masked)
    return wire


@settings(max_examples=300)
@given(
    data=st.data(),
    server=st.booleans(),
    borrowed=st.booleans(),
    max_frames=st.sampled_from([1, 2, 3, MAX_BATCH_FRAMES]),
)
def test_same_events_as_wsproto_for_well_formed_streams(
    data: st.DataObject, server: bool, borrowed: bool, max_frames: int
) -> None:
    wire = data.draw(streams(masked=server))
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=8))
    ours, theirs = run_both(
        split(wire, cuts), server=server, borrowed=borrowed, max_frames=max_frames
    )
    # Compared after the lent buffer was scribbled over: no payload refers to it.
    assert describe(ours) == describe(theirs)
    # Nothing is a protocol error in a well-formed stream.
    assert all(not isinstance(e, CloseConnection) or e.code == 1000 for e in ours), describe(ours)


@settings(max_examples=500)
@given(
    wire=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0), max_size=5),
    server=st.booleans(),
    borrowed=st.booleans(),
)
def test_same_events_and_close_code_as_wsproto_for_any_bytes(
    wire: bytes, cuts: list[int], server: bool, borrowed: bool
) -> None:
    ours, theirs = run_both(split(wire, cuts), server=server, borrowed=borrowed)
    ours_d, theirs_d = describe(ours), describe(theirs)
    if ours_d and ours_d[-1][0] == "close" and not (theirs_d and theirs_d[-1][0] == "close"):
        # A header can be refused here before all of it has come; wsproto waits for the rest.
        assert ours_d[:-1] == theirs_d
    else:
        assert ours_d == theirs_d


def test_a_large_masked_frame_split_at_every_offset_in_the_key() -> None:
    payload = bytes(range(256)) * 257
    wire = frame(0x2, payload, masked=True, key=b"\x01\x02\x03\x04")
    for first_cut, borrowed in itertools.product(range(14, 20), (False, True)):
        reads = [wire[:first_cut], *split(wire[first_cut:], list(range(7, len(wire), 4099)))]
        ours, theirs = run_both(reads, server=True, borrowed=borrowed)
        assert describe(ours) == describe(theirs)
        assert b"".join(bytes(e.data) for e in ours if isinstance(e, BytesMessage)) == payload
        assert [e.message_finished for e in ours].count(True) == 1


def test_a_whole_read_of_payload_is_handed_on_without_a_copy_on_a_client() -> None:
    payload = b"x" * 100_000
    wire = frame(0x2, payload, masked=False)
    reader = Codec(client=True)
    header, body = wire[:10], wire[10:]
    assert reader.receive_data(header) == []
    [event] = reader.receive_data(body)
    assert isinstance(event, BytesMessage)
    assert event.data is body


def test_payloads_on_a_client_are_views_of_the_read_not_copies() -> None:
    wire = frame(0x2, b"first", masked=False) + frame(0x2, b"second" * 1000, masked=False)
    reader = Codec(client=True)
    events = reader.receive_data(wire)
    assert [bytes(e.data) for e in events if isinstance(e, BytesMessage)] == [
        b"first",
        b"second" * 1000,
    ]
    for event in events:
        assert isinstance(event, BytesMessage)
        assert isinstance(event.data, memoryview)
        assert event.data.obj is wire


def test_text_split_inside_a_character() -> None:
    text = "zürich → 東京".encode()
    wire = frame(0x1, text[:2], fin=False, masked=True) + frame(0x0, text[2:], masked=True)
    for cut in range(len(wire) + 1):
        ours, theirs = run_both([wire[:cut], wire[cut:]], server=True)
        assert describe(ours) == describe(theirs)
        assert "".join(str(e.data) for e in ours if isinstance(e, TextMessage)) == text.decode()


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        (frame(0x2, b"a", masked=True, rsv=0x40), 1002),
        (frame(0x3, b"a", masked=True), 1002),
        (frame(0xB, b"a", masked=True), 1002),
        (frame(0x2, b"a", masked=False), 1002),
        (frame(0x0, b"a", masked=True), 1002),
        (frame(0x2, b"a", fin=False, masked=True) + frame(0x2, b"b", masked=True), 1002),
        (frame(0x9, b"a", fin=False, masked=True), 1002),
        (frame(0x9, b"a" * 126, masked=True), 1002),
        (frame(0x2, b"a", masked=True, length_form=126), 1002),
        (frame(0x2, b"a" * 125, masked=True, length_form=126), 1002),
        (frame(0x2, b"a" * 65535, masked=True, length_form=127), 1002),
        (b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"keyk", 1002),
        (frame(0x1, b"\xff\xfe", masked=True), 1007),
        (frame(0x8, b"\x03", masked=True), 1002),
        (frame(0x8, struct.pack("!H", 999), masked=True), 1002),
        (frame(0x8, struct.pack("!H", 1000) + b"\xff", masked=True), 1007),
    ],
    # Named, not shown: the frames are masked with random keys, and every process running the
    # suite must collect the same test ids.
    ids=[
        "rsv1",
        "reserved-opcode",
        "reserved-control-opcode",
        "unmasked",
        "continuation-first",
        "data-inside-fragmented-message",
        "fragmented-ping",
        "ping-over-125",
        "short-length-in-16-bits",
        "125-in-16-bits",
        "65535-in-64-bits",
        "length-top-bit-set",
        "text-not-utf8",
        "close-of-one-byte",
        "close-code-999",
        "close-reason-not-utf8",
    ],
)
def test_protocol_errors_end_with_the_close_code_wsproto_gives(wire: bytes, code: int) -> None:
    ours, theirs = run_both([wire, frame(0x2, b"more", masked=True)], server=True)
    assert describe(ours) == describe(theirs)
    assert isinstance(ours[-1], CloseConnection)
    assert ours[-1].code == code


def test_nothing_is_read_after_a_close() -> None:
    reader = Codec(client=False)
    wire = frame(0x2, b"before", masked=True) + frame(0x8, struct.pack("!H", 1001), masked=True)
    events = reader.receive_data(wire + frame(0x2, b"after", masked=True))
    assert describe(events) == [("BytesMessage", b"before", True, True), ("close", 1001)]
    assert reader.receive_data(frame(0x2, b"later", masked=True)) == []


def test_an_unmasked_frame_to_a_client_and_a_masked_one_refused() -> None:
    client = Codec(client=True)
    assert describe(client.receive_data(frame(0x2, b"ok", masked=False))) == [
        ("BytesMessage", b"ok", True, True)
    ]
    assert describe(client.receive_data(frame(0x2, b"no", masked=True))) == [("close", 1002)]


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_lengths_at_each_encoding_edge(length: int) -> None:
    wire = frame(0x2, b"z" * length, masked=True)
    ours, theirs = run_both([wire], server=True)
    assert describe(ours) == describe(theirs) == [("BytesMessage", b"z" * length, True, True)]


def test_zero_length_frames_are_events() -> None:
    wire = frame(0x2, b"", fin=False, masked=True) + frame(0x0, b"", masked=True)
    ours, theirs = run_both([wire], server=True)
    assert describe(ours) == describe(theirs)
    assert describe(ours) == [
        ("BytesMessage", b"", True, False),
        ("BytesMessage", b"", True, True),
    ]


def fragments(count: int, *, masked: bool) -> tuple[bytes, list[bytes]]:
    """One binary message in *count* fragments of 0 to 4 bytes: its wire bytes and pieces."""
    pieces = [bytes([index % 256]) * (index % 5) for index in range(count)]
    wire = b"".join(
        frame(0x2 if index == 0 else 0x0, piece, fin=index == count - 1, masked=masked)
        for index, piece in enumerate(pieces)
    )
    return wire, pieces


@pytest.mark.parametrize("borrowed", [False, True])
def test_a_read_of_many_frames_is_parsed_in_batches(borrowed: bool) -> None:
    """However small the frames, one call makes at most MAX_BATCH_FRAMES events; the rest of
    the read is kept (a borrowed read is scribbled over at once) and parsed by the next calls."""
    count = 2 * MAX_BATCH_FRAMES + 100
    wire, pieces = fragments(count, masked=True)
    reader = Codec(client=False)
    buffer = bytearray(wire)
    batches = [reader.receive_data(memoryview(buffer) if borrowed else wire, borrowed=borrowed)]
    buffer[:] = b"\xee" * len(buffer)
    while reader.holds_more:
        batches.append(reader.receive_data(b""))
    assert [len(batch) for batch in batches] == [MAX_BATCH_FRAMES, MAX_BATCH_FRAMES, 100]
    events = [event for batch in batches for event in batch]
    assert [bytes(event.data) for event in events] == pieces  # type: ignore[attr-defined]
    _, theirs = run_both([wire], server=True)
    assert describe(events) == describe(theirs)


def test_bytes_that_arrive_while_a_batch_waits_come_after_it() -> None:
    wire, pieces = fragments(9, masked=True)
    reader = Codec(client=False, max_frames=2)
    cut = len(wire) - 5  # inside the last frame
    events = reader.receive_data(wire[:cut])
    assert len(events) == 2 and reader.holds_more
    events += reader.receive_data(wire[cut:])
    while reader.holds_more:
        events += reader.receive_data(b"")
    assert b"".join(bytes(event.data) for event in events) == b"".join(pieces)  # type: ignore[attr-defined]
    assert events[-1].message_finished  # type: ignore[attr-defined]


def test_fuzz_harness_fallback_loop(capsys: pytest.CaptureFixture[str]) -> None:
    harness = WS_FRAMES_HARNESS
    harness.run_fallback(2000, seed=1)
    assert harness.main(["--iterations", "200", "--seed", "2"]) == 0
    assert "ok: " in capsys.readouterr().out
