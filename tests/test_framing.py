"""Tests of devstream.v1 framing: the frame codec, and one endpoint driven from both sides.

Rules: pure core tests, no I/O and no clock. Two endpoints talk through :class:`Pipe`, which
keeps the bytes each side's ``data_to_send()`` produced in a queue per direction and delivers
them when a test says so (all of it, or a given number of bytes), so every interleaving is
spelled out. Every ``data_to_send()`` goes through the pipe, which checks
``unacked <= window`` after each one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import struct
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from devstream_core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from devstream_core.framing import (
    CONNECTION_TRANSITIONS,
    DEFAULT_WINDOW,
    FIRST_MESSAGE_SIZE,
    HEADER_SIZE,
    MAX_FRAME_PAYLOAD,
    MAX_FRAME_SIZE,
    MAX_MESSAGE_SIZE,
    MAX_REASON_SIZE,
    MIN_SEND_LIMIT,
    RECV_TRANSITIONS,
    SEND_TRANSITIONS,
    SUBPROTOCOL,
    Ack,
    ConnectionInput,
    ConnectionState,
    Data,
    DataAvailable,
    EndpointState,
    Eof,
    EofReceived,
    Event,
    Frame,
    FrameDecoder,
    RecvInput,
    RecvState,
    Reset,
    ResetReceived,
    Resume,
    Resumed,
    SendInput,
    SendState,
    StreamDone,
    StreamEndpoint,
    WindowOpened,
    encode_frame,
)

# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------

u64 = st.integers(min_value=0, max_value=2**64 - 1)
reasons = st.text(max_size=40).filter(lambda s: len(s.encode("utf-8")) <= MAX_REASON_SIZE)
frames: st.SearchStrategy[Frame] = st.one_of(
    st.builds(Data, offset=u64, payload=st.binary(min_size=1, max_size=300)),
    st.builds(Ack, offset=u64),
    st.builds(Eof, offset=u64),
    st.builds(Reset, code=st.integers(0, 2**32 - 1), reason=reasons),
    st.builds(Resume, received=u64, reply=st.booleans()),
)


def test_constants() -> None:
    assert SUBPROTOCOL == "devstream.v1"
    assert DEFAULT_WINDOW == 2 * 1024 * 1024
    assert MAX_FRAME_PAYLOAD == 64 * 1024
    assert MAX_FRAME_SIZE == MAX_FRAME_PAYLOAD + 16


@pytest.mark.parametrize(
    ("frame", "wire"),
    [
        (Data(offset=1, payload=b"hi"), b"\x01\x00\x00\x00\x0a" + (1).to_bytes(8, "big") + b"hi"),
        (Ack(offset=258), b"\x02\x00\x00\x00\x08" + (258).to_bytes(8, "big")),
        (Eof(offset=0), b"\x03\x00\x00\x00\x08" + bytes(8)),
        (
            Reset(code=410901, reason="é"),
            b"\x04\x00\x00\x00\x06" + struct.pack(">I", 410901) + "é".encode(),
        ),
        (
            Resume(received=5, reply=True),
            b"\x05\x00\x00\x00\x09" + (5).to_bytes(8, "big") + b"\x01",
        ),
        (
            Resume(received=5, reply=False),
            b"\x05\x00\x00\x00\x09" + (5).to_bytes(8, "big") + b"\x00",
        ),
    ],
)
def test_wire_format(frame: Frame, wire: bytes) -> None:
    assert encode_frame(frame) == wire
    assert FrameDecoder().feed(wire) == [frame]


@given(frame=frames)
def test_round_trip(frame: Frame) -> None:
    decoder = FrameDecoder()
    assert decoder.feed(encode_frame(frame)) == [frame]
    assert decoder.buffered == 0


def test_round_trip_of_the_largest_frames() -> None:
    biggest: list[Frame] = [
        Data(offset=2**64 - 1, payload=b"\xff" * MAX_FRAME_PAYLOAD),
        Reset(code=2**32 - 1, reason="x" * MAX_REASON_SIZE),
    ]
    wire = b"".join(encode_frame(frame) for frame in biggest)
    assert FrameDecoder().feed(wire) == biggest


def test_an_error_code_is_stored_as_a_plain_int() -> None:
    frame = Reset(code=ErrorCode.PEER_LOST, reason="gone")
    assert type(frame.code) is int and frame.code == 504902


@pytest.mark.parametrize(
    "make",
    [
        lambda: Data(offset=-1, payload=b"x"),
        lambda: Data(offset=2**64, payload=b"x"),
        lambda: Data(offset=True, payload=b"x"),
        lambda: Data(offset=0, payload=b""),
        lambda: Data(offset=0, payload=b"x" * (MAX_FRAME_PAYLOAD + 1)),
        lambda: Data(offset=0, payload="text"),  # type: ignore[arg-type]
        lambda: Ack(offset=-1),
        lambda: Ack(offset=1.5),  # type: ignore[arg-type]
        lambda: Eof(offset=2**64),
        lambda: Reset(code=-1, reason=""),
        lambda: Reset(code=2**32, reason=""),
        lambda: Reset(code=1, reason="x" * (MAX_REASON_SIZE + 1)),
        lambda: Reset(code=1, reason="é" * 62),
        lambda: Reset(code=1, reason="\ud800"),
        lambda: Reset(code=1, reason=b"bytes"),  # type: ignore[arg-type]
        lambda: Resume(received=0, reply=1),  # type: ignore[arg-type]
        lambda: Resume(received=-5, reply=False),
    ],
)
def test_invalid_frames_are_refused(make: Callable[[], Frame]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        make()
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_encode_frame_refuses_what_is_not_a_frame() -> None:
    with pytest.raises(LocalProtocolError):
        encode_frame(DataAvailable())  # type: ignore[arg-type]


def header(kind: int, length: int) -> bytes:
    return struct.pack(">BI", kind, length)


BAD_FRAMES = [
    # (header + body, code, what the header alone already tells)
    pytest.param(header(0x00, 8) + bytes(8), ErrorCode.PROTOCOL_ERROR, True, id="type 0"),
    pytest.param(header(0x06, 8) + bytes(8), ErrorCode.PROTOCOL_ERROR, True, id="type 6"),
    pytest.param(header(0xFF, 0), ErrorCode.PROTOCOL_ERROR, True, id="type ff"),
    pytest.param(header(0x01, 8) + bytes(8), ErrorCode.PROTOCOL_ERROR, True, id="empty data"),
    pytest.param(header(0x01, 3) + bytes(3), ErrorCode.PROTOCOL_ERROR, True, id="short data"),
    pytest.param(
        header(0x01, 8 + MAX_FRAME_PAYLOAD + 1) + bytes(8 + MAX_FRAME_PAYLOAD + 1),
        ErrorCode.PROTOCOL_ERROR,
        True,
        id="data payload over 64 KiB",
    ),
    pytest.param(header(0x02, 7) + bytes(7), ErrorCode.PROTOCOL_ERROR, True, id="short ack"),
    pytest.param(header(0x02, 9) + bytes(9), ErrorCode.PROTOCOL_ERROR, True, id="long ack"),
    pytest.param(header(0x03, 0), ErrorCode.PROTOCOL_ERROR, True, id="empty eof"),
    pytest.param(header(0x03, 16) + bytes(16), ErrorCode.PROTOCOL_ERROR, True, id="long eof"),
    pytest.param(header(0x04, 3) + bytes(3), ErrorCode.PROTOCOL_ERROR, True, id="short reset"),
    pytest.param(
        header(0x04, 4 + MAX_REASON_SIZE + 1) + bytes(4) + b"x" * (MAX_REASON_SIZE + 1),
        ErrorCode.PROTOCOL_ERROR,
        True,
        id="long reset reason",
    ),
    pytest.param(
        header(0x04, 6) + bytes(4) + b"\xc3\x28", ErrorCode.PROTOCOL_ERROR, False, id="bad utf-8"
    ),
    pytest.param(
        header(0x04, 7) + bytes(4) + b"\xed\xa0\x80",
        ErrorCode.PROTOCOL_ERROR,
        False,
        id="surrogate",
    ),
    pytest.param(header(0x05, 8) + bytes(8), ErrorCode.PROTOCOL_ERROR, True, id="short resume"),
    pytest.param(
        header(0x05, 9) + bytes(8) + b"\x02", ErrorCode.PROTOCOL_ERROR, False, id="resume flag 2"
    ),
    pytest.param(
        header(0x05, 9) + bytes(8) + b"\x81", ErrorCode.PROTOCOL_ERROR, False, id="resume flag 80"
    ),
    pytest.param(
        header(0x01, MAX_FRAME_SIZE + 1), ErrorCode.PAYLOAD_TOO_LARGE, True, id="over the cap"
    ),
    pytest.param(
        header(0x09, 2**32 - 1), ErrorCode.PAYLOAD_TOO_LARGE, True, id="huge, unknown type"
    ),
]


@pytest.mark.parametrize(("wire", "code", "from_header"), BAD_FRAMES)
def test_decoder_errors(wire: bytes, code: ErrorCode, from_header: bool) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        FrameDecoder().feed(wire)
    assert info.value.code is code
    # Byte by byte, the error comes as soon as the header (or the whole frame) is in.
    decoder = FrameDecoder()
    for i in range(len(wire)):
        try:
            decoder.feed(wire[i : i + 1])
        except RemoteProtocolError as exc:
            assert exc.code is code
            assert i + 1 == (HEADER_SIZE if from_header else len(wire))
            break
    else:
        raise AssertionError("no error")
    # After an error the decoder is poisoned, even for nothing at all.
    for data in (b"", encode_frame(Ack(offset=1))):
        with pytest.raises(LocalProtocolError) as poisoned:
            decoder.feed(data)
        assert poisoned.value.code is ErrorCode.PROTOCOL_ERROR
    assert decoder.poisoned and decoder.buffered == 0


def test_frames_before_a_bad_one_are_dropped_with_it() -> None:
    good = encode_frame(Ack(offset=1))
    with pytest.raises(RemoteProtocolError):
        FrameDecoder().feed(good + header(0x07, 0))


def test_size_cap_detected_from_the_header_alone() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    assert decoder.feed(header(0x01, 100)[:4]) == []
    assert decoder.buffered == 4
    with pytest.raises(RemoteProtocolError) as info:
        decoder.feed(header(0x01, 101)[4:])
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    # At the cap exactly, the header is fine and the body is awaited.
    ok = FrameDecoder(max_frame_size=8 + 92)
    assert ok.feed(header(0x01, 100) + b"\x00" * 50) == []
    assert ok.buffered == HEADER_SIZE + 50


def test_reset_drops_a_partial_frame_and_clears_the_poison() -> None:
    decoder = FrameDecoder()
    wire = encode_frame(Data(offset=7, payload=b"abc"))
    assert decoder.feed(wire[:9]) == []
    assert decoder.buffered == 9
    decoder.reset()
    assert decoder.buffered == 0
    assert decoder.feed(wire) == [Data(offset=7, payload=b"abc")]
    with pytest.raises(RemoteProtocolError):
        decoder.feed(header(0, 0))
    decoder.reset()
    assert not decoder.poisoned
    assert decoder.feed(wire) == [Data(offset=7, payload=b"abc")]


def test_decoder_refuses_a_negative_cap() -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_frame_size=-1)


def feed_in_pieces(
    wire: bytes, cuts: list[int], max_frame_size: int = MAX_FRAME_SIZE
) -> list[Frame]:
    decoder = FrameDecoder(max_frame_size)
    out: list[Frame] = []
    start = 0
    for cut in [*sorted(cuts), len(wire)]:
        out += decoder.feed(wire[start:cut])
        assert decoder.buffered <= HEADER_SIZE + max_frame_size
        start = cut
    assert decoder.buffered == 0
    return out


@given(stream=st.lists(frames, max_size=12), data=st.data())
def test_chunking_equivalence(stream: list[Frame], data: st.DataObject) -> None:
    wire = b"".join(map(encode_frame, stream))
    assert FrameDecoder().feed(wire) == stream
    assert feed_in_pieces(wire, list(range(len(wire)))) == stream
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=20))
    assert feed_in_pieces(wire, cuts) == stream


@given(stream=st.lists(frames, max_size=12), data=st.data())
def test_views_of_a_larger_buffer_decode_like_bytes(
    stream: list[Frame], data: st.DataObject
) -> None:
    # A client hands the decoder views of what its reads brought (devstream_core.websocket).
    wire = b"".join(map(encode_frame, stream))
    read = b"before" + wire + b"after"
    view = memoryview(read)[6 : 6 + len(wire)]
    cuts = sorted(set(data.draw(st.lists(st.integers(0, len(wire)), max_size=8))))
    decoder = FrameDecoder()
    got: list[Frame] = []
    for start, end in itertools.pairwise([0, *cuts, len(wire)]):
        got += decoder.feed(view[start:end])
    assert got == stream
    assert all(isinstance(f.payload, bytes) for f in got if isinstance(f, Data))


@given(wire=st.binary(max_size=200), cuts=st.lists(st.integers(0, 200), max_size=10))
@settings(max_examples=200)
def test_garbage_parses_or_raises_the_same_in_any_split(wire: bytes, cuts: list[int]) -> None:
    def result_of(pieces: list[int]) -> object:
        try:
            return feed_in_pieces(wire, [c for c in pieces if c <= len(wire)], 64)
        except RemoteProtocolError as exc:
            return exc.code
        except AssertionError:
            return "partial"

    assert result_of([]) == result_of(cuts)


# --------------------------------------------------------------------------------------------
# Two endpoints and a pipe
# --------------------------------------------------------------------------------------------

A, B = "a", "b"
OTHER = {A: B, B: A}


class Pipe:
    """Two connected endpoints; bytes from each side wait in a queue until delivered."""

    def __init__(self, *, window: int = 64, max_payload: int = 16) -> None:
        self.window = window
        self.ep = {side: StreamEndpoint(window=window, max_payload=max_payload) for side in (A, B)}
        self.queue = {A: bytearray(), B: bytearray()}  # bytes in flight *from* each side
        self.events: dict[str, list[Event]] = {A: [], B: []}
        for endpoint in self.ep.values():
            endpoint.connection_made(resumed=False)

    def flush(self, side: str) -> bytes:
        """Move what *side* wants to send into its queue."""
        endpoint = self.ep[side]
        out = endpoint.data_to_send()
        assert endpoint.unacked <= endpoint.window
        assert not endpoint.has_output
        self.queue[side] += out
        return out

    def deliver(self, side: str, size: int | None = None) -> list[Event]:
        """Deliver *size* bytes (all when None) of what *side* sent to its peer."""
        queue = self.queue[side]
        size = len(queue) if size is None else size
        chunk = bytes(queue[:size])
        del queue[:size]
        events = self.ep[OTHER[side]].receive_data(chunk)
        self.events[OTHER[side]] += events
        return events

    def pump(self) -> None:
        """Exchange everything until neither side has anything to send."""
        for _ in range(1000):
            moved = False
            for side in (A, B):
                if self.flush(side):
                    moved = True
                if self.queue[side]:
                    self.deliver(side)
                    moved = True
            if not moved:
                return
        raise AssertionError("the endpoints never went quiet")

    def drop(self, *sides: str) -> None:
        """The connections of *sides* (default: both) drop; each learns of it.

        Bytes on their way to a dropped side are lost. Bytes a dropped side sent reached the
        hub whole (WebSocket messages), so a peer that stays connected still gets them.
        """
        for side in sides or (A, B):
            self.queue[OTHER[side]].clear()
            self.ep[side].connection_lost()

    def reconnect(self, *sides: str) -> None:
        for side in sides or (A, B):
            self.ep[side].connection_made(resumed=True)

    def read_all(self, side: str) -> bytes:
        return self.ep[side].read()


def pattern(size: int, seed: int = 0) -> bytes:
    return bytes((seed * 31 + i * 7 + i // 251) % 256 for i in range(size))


def transfer(pipe: Pipe, sender: str, data: bytes) -> bytes:
    """Write all of *data* on *sender*, reading on the other side as it flows."""
    receiver = OTHER[sender]
    got = bytearray()
    view = memoryview(data)
    for _ in range(10_000):
        if view:
            taken = pipe.ep[sender].write(bytes(view))
            view = view[taken:]
        pipe.pump()
        got += pipe.read_all(receiver)
        if not view and len(got) == len(data):
            pipe.pump()
            return bytes(got)
    raise AssertionError("transfer stalled")


# --------------------------------------------------------------------------------------------
# Writing, reading, EOF
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sender", [A, B])
def test_write_and_read(sender: str) -> None:
    pipe = Pipe()
    data = pattern(1000)
    assert transfer(pipe, sender, data) == data
    receiver = pipe.ep[OTHER[sender]]
    assert receiver.received == receiver.consumed == 1000
    assert DataAvailable() in pipe.events[OTHER[sender]]
    assert WindowOpened() in pipe.events[sender]
    assert pipe.ep[sender].written_end == 1000


@settings(max_examples=80, deadline=None)
@given(
    writes=st.lists(st.integers(min_value=1, max_value=40_000), min_size=1, max_size=8),
    reads=st.lists(st.integers(min_value=100, max_value=70_000), min_size=1, max_size=12),
    deliveries=st.lists(st.integers(min_value=100, max_value=30_000), min_size=1, max_size=8),
    max_payload=st.integers(min_value=1000, max_value=70_000),
    flush_every=st.integers(min_value=1, max_value=4),
)
@example(
    writes=[20_000, 3, 40_000, 5_000, 17],
    reads=[7_000],
    deliveries=[3_001],
    max_payload=65_536,
    flush_every=3,
)
@example(writes=[100] * 8, reads=[250], deliveries=[90_000], max_payload=1_000, flush_every=1)
def test_any_writes_any_splits_any_reads(
    writes: list[int],
    reads: list[int],
    deliveries: list[int],
    max_payload: int,
    flush_every: int,
) -> None:
    """Writes of any size (small ones gathered into one chunk of the send queue, large ones a
    chunk each), frames delivered in pieces of any size (whole frames read straight from a
    piece, a partial one completed from the next), reads of any size between the writes (so
    Acks drop parts of chunks): the reader gets exactly the bytes written, never more than it
    asked for."""
    pipe = Pipe(window=64 * 1024, max_payload=min(max_payload, MAX_FRAME_PAYLOAD))
    data = pattern(sum(writes), seed=3)
    view = memoryview(data)
    got = bytearray()
    turn = 0

    def exchange() -> None:
        nonlocal turn
        pipe.flush(A)
        while True:
            if pipe.queue[A]:
                pipe.deliver(A, deliveries[turn % len(deliveries)])
            want = reads[turn % len(reads)]
            chunk = pipe.ep[B].read(want)
            assert len(chunk) <= want
            got.extend(chunk)
            turn += 1
            if not chunk and not pipe.queue[A]:
                break
        pipe.flush(B)  # Acks
        while pipe.queue[B]:
            pipe.deliver(B)

    for number, size in enumerate(writes, 1):
        piece = view[:size]
        view = view[size:]
        while piece:
            taken = pipe.ep[A].write(piece)
            piece = piece[taken:]
            if piece or number % flush_every == 0:
                exchange()
    exchange()
    while len(got) < len(data):
        chunk = pipe.ep[B].read(reads[turn % len(reads)])
        assert chunk
        got += chunk
        turn += 1
        exchange()
    assert bytes(got) == data
    assert pipe.ep[B].read(10) == b""
    assert pipe.ep[B].consumed == len(data)


@pytest.mark.parametrize("closer", [A, B])
def test_half_close(closer: str) -> None:
    pipe = Pipe()
    other = OTHER[closer]
    transfer(pipe, closer, b"last words")
    pipe.ep[closer].write_eof()
    pipe.pump()
    assert pipe.ep[other].readable and not pipe.ep[other].at_eof
    assert EofReceived() in pipe.events[other]
    assert pipe.ep[other].read() == b""
    assert pipe.ep[other].at_eof
    pipe.pump()
    assert pipe.ep[closer].eof_acked and pipe.ep[closer].send_state is SendState.CLOSED
    assert not pipe.ep[closer].done
    # The other direction still flows, and the closer keeps reading until the other's EOF.
    data = pattern(500, 3)
    assert transfer(pipe, other, data) == data
    with pytest.raises(LocalProtocolError):
        pipe.ep[closer].write(b"x")
    assert not pipe.ep[closer].at_eof
    pipe.ep[other].write_eof()
    pipe.pump()
    assert pipe.ep[closer].read() == b"" and pipe.ep[closer].at_eof
    assert not pipe.ep[closer].done  # its Ack of the EOF is not out yet
    pipe.flush(closer)
    assert pipe.ep[closer].done and pipe.ep[closer].state is EndpointState.DONE
    assert not pipe.ep[other].done
    events = pipe.deliver(closer)
    assert events == [StreamDone()]
    assert pipe.ep[other].done
    assert pipe.ep[other].read() == b""  # reading after the EOF keeps returning b""


def test_eof_is_reached_by_the_read_that_takes_the_last_byte() -> None:
    pipe = Pipe()
    pipe.ep[A].write(b"abcdef")
    pipe.ep[A].write_eof()
    pipe.pump()
    b = pipe.ep[B]
    assert b.recv_state is RecvState.EOF_RECEIVED
    assert b.read(4) == b"abcd" and not b.at_eof
    assert b.read(4) == b"ef" and b.at_eof
    assert b.has_output  # the Ack of the EOF goes out at once


def test_done_only_when_both_eofs_are_acknowledged() -> None:
    pipe = Pipe()
    a, b = pipe.ep[A], pipe.ep[B]
    a.write_eof()
    b.write_eof()
    pipe.pump()
    assert not a.done and not b.done  # neither has read the other's EOF
    assert a.read() == b""
    pipe.pump()
    assert b.eof_acked and not b.done and not a.done
    assert b.read() == b""
    assert not b.done
    pipe.flush(B)
    assert b.done and not a.done
    assert pipe.deliver(B) == [StreamDone()]
    assert a.done and a.state is b.state is EndpointState.DONE


def test_a_reused_write_buffer_changes_nothing_already_written() -> None:
    # A bytearray (or a view of one) may be reused by the writer: the endpoint keeps a copy.
    # bytes cannot change, and are kept as they are.
    pipe = Pipe(window=1 << 20)
    a, b = pipe.ep[A], pipe.ep[B]
    buffer = bytearray(b"first " * 5000)
    kept = b"second" * 5000
    a.write(buffer)
    a.write(memoryview(kept))
    a.write(memoryview(buffer)[:20_000])
    expected = bytes(buffer) + kept + bytes(buffer[:20_000])
    buffer[:] = b"X" * len(buffer)  # reused before anything was sent
    pipe.pump()
    assert b.read() == expected


def test_data_is_split_into_max_payload_frames() -> None:
    pipe = Pipe(window=1000, max_payload=7)
    pipe.ep[A].write(b"x" * 20)
    frames = FrameDecoder().feed(pipe.flush(A))
    assert [len(f.payload) for f in frames if isinstance(f, Data)] == [7, 7, 6]
    assert [f.offset for f in frames if isinstance(f, Data)] == [0, 7, 14]


def test_data_to_send_with_a_limit_gives_whole_frames() -> None:
    pipe = Pipe(window=4096, max_payload=100)
    a = pipe.ep[A]
    a.write(pattern(1000))
    a.write_eof()
    pieces = []
    for _ in range(100):
        if not a.has_output:
            break
        out = a.data_to_send(MIN_SEND_LIMIT)
        assert 0 < len(out) <= MIN_SEND_LIMIT
        FrameDecoder().feed(out)  # whole frames: a fresh decoder takes each piece alone
        pieces.append(out)
    assert a.data_to_send(MIN_SEND_LIMIT) == b""
    b = pipe.ep[B]
    for piece in pieces:
        b.receive_data(piece)
    assert b.read() == pattern(1000) and b.at_eof
    with pytest.raises(LocalProtocolError):
        a.data_to_send(MIN_SEND_LIMIT - 1)


@pytest.mark.parametrize("max_bytes", [None, MAX_MESSAGE_SIZE, 2 * MAX_MESSAGE_SIZE, 2**40])
def test_no_message_exceeds_the_hubs_limit_whatever_the_argument(max_bytes: int | None) -> None:
    """The hub refuses a WebSocket message over MAX_MESSAGE_SIZE (close 1009): a full 2 MiB
    window, with its EOF, comes out in messages within it, whole frames each, whether the
    caller gives no limit or a larger one."""
    window = 2 * MAX_MESSAGE_SIZE
    pipe = Pipe(window=window, max_payload=MAX_FRAME_PAYLOAD)
    a, b = pipe.ep[A], pipe.ep[B]
    data = pattern(window)
    assert a.write(data) == window
    a.write_eof()
    sizes = []
    while out := a.data_to_send(max_bytes):
        sizes.append(len(out))
        b.receive_data(out)
    assert sizes and max(sizes) <= MAX_MESSAGE_SIZE
    assert len(sizes) == 3  # two full messages and the rest (headers, the EOF)
    assert not a.has_output
    assert b.read() == data and b.at_eof


def test_duplicates_and_gaps_are_ignored() -> None:
    pipe = Pipe()
    b = pipe.ep[B]
    b.receive_data(encode_frame(Data(offset=0, payload=b"abcd")))
    assert b.receive_data(encode_frame(Data(offset=0, payload=b"abcd"))) == []  # duplicate
    assert b.receive_data(encode_frame(Data(offset=6, payload=b"gh"))) == []  # gap
    assert b.receive_data(encode_frame(Eof(offset=9))) == []  # gap
    events = b.receive_data(encode_frame(Data(offset=2, payload=b"cdef")))  # overlap
    assert events == [DataAvailable()]
    assert b.received == 6 and b.read() == b"abcdef"


# --------------------------------------------------------------------------------------------
# Flow control
# --------------------------------------------------------------------------------------------


def test_a_reader_that_stops_reading_stops_the_writer() -> None:
    pipe = Pipe(window=64, max_payload=16)
    a, b = pipe.ep[A], pipe.ep[B]
    written = 0
    for _ in range(20):
        written += a.write(pattern(30, written))
        pipe.pump()
        assert a.unacked <= a.window and b.received - b.consumed <= b.window
    assert a.send_capacity == 0 and a.write(b"more") == 0
    assert written == 64 and b.received == 64
    # Reading a little (below a quarter window) frees nothing yet.
    assert len(b.read(10)) == 10
    pipe.pump()
    assert a.send_capacity == 0
    # A quarter window read: the Ack goes out and the writer may write again.
    assert len(b.read(6)) == 6
    pipe.pump()
    assert a.send_capacity == 16
    assert WindowOpened() in pipe.events[A]


def test_window_is_never_exceeded() -> None:
    pipe = Pipe(window=50, max_payload=9)
    a = pipe.ep[A]
    for step in range(200):
        a.write(pattern(step % 23, step))
        pipe.flush(A)  # asserts unacked <= window
        pipe.deliver(A, step % 17)
        if step % 3 == 0:
            pipe.ep[B].read(step % 11 + 1)
        pipe.flush(B)
        pipe.deliver(B)
        assert a.written_end - min(a.acked, a.written_end) <= a.window


def test_data_past_the_window_is_a_protocol_error() -> None:
    pipe = Pipe(window=10)
    b = pipe.ep[B]
    b.receive_data(encode_frame(Data(offset=0, payload=b"x" * 10)))
    with pytest.raises(RemoteProtocolError) as info:
        b.receive_data(encode_frame(Data(offset=10, payload=b"y")))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_ack_policy_quarter_window_and_eof_at_once() -> None:
    pipe = Pipe(window=40, max_payload=40)
    a, b = pipe.ep[A], pipe.ep[B]
    a.write(b"x" * 30)
    pipe.pump()
    b.read(9)
    assert not b.has_output
    b.read(1)  # 10 = window / 4
    assert b.has_output
    pipe.pump()
    assert a.acked == 10
    b.read(1)
    a.write_eof()
    pipe.pump()
    assert not b.has_output
    b.read()
    assert b.at_eof and b.has_output
    frames = FrameDecoder().feed(pipe.flush(B))
    assert frames == [Ack(offset=31)]


# --------------------------------------------------------------------------------------------
# Reset
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("origin", [A, B])
def test_reset_is_seen_by_both_sides(origin: str) -> None:
    pipe = Pipe()
    other = OTHER[origin]
    pipe.ep[other].write(b"unread")
    pipe.pump()
    pipe.ep[origin].reset(4242, "bye now")
    start = pipe.ep[origin]
    assert start.state is EndpointState.RESET and not start.reset_confirmed
    assert start.readable
    with pytest.raises(LocalProtocolError):
        start.read()  # a reset discards what was buffered
    pipe.flush(origin)
    events = pipe.deliver(origin)
    assert events == [ResetReceived(code=4242, reason="bye now")]
    peer = pipe.ep[other]
    assert peer.state is EndpointState.RESET and peer.reset_info == (4242, "bye now")
    assert peer.reset_confirmed and not peer.reset_settled  # its answer is not out yet
    pipe.pump()
    assert peer.reset_settled and start.reset_confirmed and start.reset_settled
    assert start.reset_info == (4242, "bye now")
    for endpoint in (start, peer):
        assert endpoint.send_capacity == 0 and not endpoint.has_output
        with pytest.raises(LocalProtocolError):
            endpoint.write(b"x")
        with pytest.raises(LocalProtocolError):
            endpoint.write_eof()
        with pytest.raises(LocalProtocolError):
            endpoint.read()
        endpoint.reset(1, "again")  # over already: nothing happens
        assert endpoint.reset_info == (4242, "bye now") and not endpoint.has_output


def test_frames_after_a_reset_are_ignored() -> None:
    pipe = Pipe()
    pipe.ep[A].write(b"in flight")
    pipe.flush(A)
    pipe.ep[B].reset(1, "")
    assert pipe.deliver(A) == []
    assert pipe.ep[B].received == 0


def test_crossing_resets_agree_on_the_smaller_code() -> None:
    pipe = Pipe()
    pipe.ep[A].reset(9, "nine")
    pipe.ep[B].reset(3, "three")
    pipe.pump()
    for side in (A, B):
        assert pipe.ep[side].reset_info == (3, "three")
        assert pipe.ep[side].reset_settled
    # Neither answered the other (each had sent its own): one Reset each way, no ping-pong.
    assert pipe.events[A] == pipe.events[B] == []


def test_reset_is_sent_again_after_reconnecting_until_confirmed() -> None:
    pipe = Pipe()
    a, b = pipe.ep[A], pipe.ep[B]
    a.reset(77, "lost once")
    pipe.flush(A)
    pipe.drop()  # the Reset is lost
    assert b.state is EndpointState.OPEN
    pipe.reconnect()
    pipe.pump()
    assert b.reset_info == (77, "lost once")
    assert a.reset_confirmed and b.reset_settled
    # Confirmed: the next connection carries no Reset.
    pipe.drop()
    pipe.reconnect()
    out = FrameDecoder().feed(pipe.flush(A))
    assert not any(isinstance(frame, Reset) for frame in out)


def test_a_lost_answer_is_answered_again() -> None:
    pipe = Pipe()
    a, b = pipe.ep[A], pipe.ep[B]
    a.reset(5, "five")
    pipe.flush(A)
    pipe.deliver(A)
    pipe.flush(B)  # B's answer ...
    pipe.drop(A)  # ... is lost; only A's connection dropped, B stays (the hub holds A)
    assert b.reset_settled and not a.reset_confirmed
    pipe.reconnect(A)
    pipe.pump()
    assert a.reset_confirmed and a.reset_info == b.reset_info == (5, "five")


def test_a_hub_reset_reaches_a_lone_side() -> None:
    endpoint = StreamEndpoint()
    endpoint.connection_made(resumed=False)
    events = endpoint.receive_data(encode_frame(Reset(code=ErrorCode.PEER_LOST, reason="gone")))
    assert events == [ResetReceived(code=504902, reason="gone")]
    assert endpoint.data_to_send() == encode_frame(Reset(code=504902, reason="gone"))
    assert endpoint.reset_settled


def test_reset_after_done_is_answered_and_ignored() -> None:
    pipe = Pipe()
    for side in (A, B):
        pipe.ep[side].write_eof()
    pipe.pump()
    for side in (A, B):
        pipe.ep[side].read()
    pipe.pump()
    assert pipe.ep[A].done and pipe.ep[B].done
    a = pipe.ep[A]
    assert a.receive_data(encode_frame(Reset(code=1, reason="late"))) == []
    assert a.state is EndpointState.DONE and a.reset_info is None
    assert FrameDecoder().feed(a.data_to_send()) == [Reset(code=1, reason="late")]
    a.reset(2, "no effect")
    assert a.state is EndpointState.DONE and not a.has_output


def test_reset_arguments() -> None:
    endpoint = StreamEndpoint()
    endpoint.reset(ErrorCode.STREAM_REJECTED, "é" * 100)
    info = endpoint.reset_info
    assert info is not None and info[0] == 403903
    assert info[1] == "é" * 61 and len(info[1].encode()) <= MAX_REASON_SIZE
    for code in (-1, 2**32, True):
        with pytest.raises(LocalProtocolError):
            StreamEndpoint().reset(code, "")
    with pytest.raises(LocalProtocolError):
        StreamEndpoint().reset(1, "\ud800")
    with pytest.raises(LocalProtocolError):
        StreamEndpoint().reset(1, b"x")  # type: ignore[arg-type]
    # A reset before the first connection goes out with it.
    endpoint.connection_made(resumed=False)
    assert FrameDecoder().feed(endpoint.data_to_send()) == [Reset(code=403903, reason="é" * 61)]


# --------------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------------


def finish(pipe: Pipe, expected: dict[str, bytes], got: dict[str, bytearray]) -> None:
    """Write EOF on both sides, run to the end; each side must have read exactly *expected*."""
    for side in (A, B):
        if pipe.ep[side].send_state is SendState.OPEN:
            pipe.ep[side].write_eof()
    for _ in range(100):
        pipe.pump()
        for side in (A, B):
            got[side] += pipe.read_all(side)
        if all(pipe.ep[side].done for side in (A, B)):
            break
    for side in (A, B):
        assert bytes(got[side]) == expected[side]
        assert pipe.ep[side].done


def write_all(pipe: Pipe, side: str, data: bytes, got: dict[str, bytearray]) -> None:
    """Write what *side* has not written yet of *data*, while its peer reads."""
    endpoint = pipe.ep[side]
    for _ in range(1000):
        if endpoint.send_state is not SendState.OPEN or endpoint.written_end == len(data):
            return
        endpoint.write(data[endpoint.written_end :])
        pipe.pump()
        got[OTHER[side]] += pipe.read_all(OTHER[side])
    raise AssertionError("the writer never got its data out")


DROP_POINTS = ["before anything", "mid-frame", "after data", "after eof", "after both eofs"]


@pytest.mark.parametrize("point", DROP_POINTS)
@pytest.mark.parametrize("who", ["both", A, B])
def test_resume_after_a_drop(point: str, who: str) -> None:
    pipe = Pipe(window=64, max_payload=10)
    a, b = pipe.ep[A], pipe.ep[B]
    got = {A: bytearray(), B: bytearray()}
    to_b, to_a = pattern(150, 1), pattern(90, 2)
    if point != "before anything":
        a.write(to_b[:40])
        b.write(to_a[:30])
        pipe.flush(A)
        pipe.flush(B)
        if point == "mid-frame":
            pipe.deliver(A, 17)
            pipe.deliver(B, 3)
        else:
            pipe.pump()
            got[B] += b.read(25)
            got[A] += a.read()
            if point in ("after eof", "after both eofs"):
                a.write(to_b[40:50])
                a.write_eof()
                to_b = to_b[:50]
                if point == "after both eofs":
                    b.write_eof()
                    to_a = to_a[:30]
                pipe.pump()
                pipe.flush(B)
                pipe.deliver(B, 5)
    sides = (A, B) if who == "both" else (who,)
    pipe.drop(*sides)
    pipe.reconnect(*sides)
    for side in sides:
        assert pipe.ep[side].connection_state is ConnectionState.RESUMING
    pipe.pump()
    assert all(pipe.ep[side].connection_state is ConnectionState.CONNECTED for side in (A, B))
    for side in sides:
        assert Resumed() in pipe.events[side]
    # Everything written so far, then the rest, arrives once and in order.
    write_all(pipe, A, to_b, got)
    write_all(pipe, B, to_a, got)
    finish(pipe, {A: to_a, B: to_b}, got)


def test_resume_after_a_reset() -> None:
    pipe = Pipe()
    pipe.ep[A].write(b"data")
    pipe.flush(A)
    pipe.ep[A].reset(12, "abort")
    pipe.flush(A)
    pipe.deliver(A, 6)  # the Data frame is cut, the Reset never arrives
    pipe.drop()
    pipe.reconnect()
    pipe.pump()
    for side in (A, B):
        assert pipe.ep[side].reset_info == (12, "abort")
        assert pipe.ep[side].reset_settled


def test_nothing_but_resume_and_ack_before_the_peers_resume() -> None:
    pipe = Pipe()
    a = pipe.ep[A]
    a.write(b"abc")
    pipe.flush(A)
    pipe.drop()
    a.write(b"def")
    a.write_eof()
    assert a.data_to_send() == b""  # disconnected: nothing
    pipe.reconnect(A)
    out = FrameDecoder().feed(a.data_to_send())
    assert out == [Resume(received=0, reply=True), Ack(offset=0)]
    assert not a.has_output and a.data_to_send() == b""
    events = a.receive_data(encode_frame(Resume(received=2, reply=False)))
    assert events == [Resumed()]
    assert FrameDecoder().feed(a.data_to_send()) == [Data(offset=2, payload=b"cdef"), Eof(offset=6)]


def test_both_sides_drop_at_once_with_bytes_in_flight_both_ways() -> None:
    pipe = Pipe(window=100, max_payload=8)
    got = {A: bytearray(), B: bytearray()}
    to_b, to_a = pattern(300, 5), pattern(300, 6)
    sent = {A: 0, B: 0}
    for round_ in range(12):
        for side, data in ((A, to_b), (B, to_a)):
            sent[side] += pipe.ep[side].write(data[sent[side] : sent[side] + 37])
            pipe.flush(side)
            pipe.deliver(side, 11 + round_)
            got[OTHER[side]] += pipe.read_all(OTHER[side])
        if round_ % 4 == 3:
            pipe.drop()
            pipe.reconnect()
    write_all(pipe, A, to_b, got)
    write_all(pipe, B, to_a, got)
    finish(pipe, {A: to_a, B: to_b}, got)


def test_a_drop_while_resuming() -> None:
    pipe = Pipe()
    got = {A: bytearray(), B: bytearray()}
    pipe.ep[A].write(b"hello")
    pipe.flush(A)
    pipe.drop()
    pipe.reconnect()
    pipe.flush(A)
    pipe.flush(B)
    pipe.deliver(A)  # B has A's Resume; A never gets B's
    pipe.drop()
    pipe.reconnect()
    pipe.pump()
    finish(pipe, {A: b"", B: b"hello"}, got)


def test_resume_on_a_connection_that_never_dropped() -> None:
    # The hub keeps B attached while A reconnects, and drops B's frames meanwhile.
    pipe = Pipe(window=64, max_payload=10)
    got = {A: bytearray(), B: bytearray()}
    pipe.ep[B].write(b"x" * 30)
    pipe.drop(A)
    pipe.flush(B)
    pipe.queue[B].clear()  # dropped by the hub: A is away
    pipe.reconnect(A)
    pipe.flush(A)
    pipe.ep[B].write(b"y" * 10)
    pipe.flush(B)  # Data at 30.. reaches A before B sees A's Resume: a gap, ignored
    pipe.deliver(B)
    assert pipe.ep[A].received == 0
    pipe.pump()
    assert pipe.ep[B].connection_state is ConnectionState.CONNECTED
    assert Resumed() in pipe.events[B]
    finish(pipe, {A: b"x" * 30 + b"y" * 10, B: b""}, got)


def test_a_resume_moves_where_sending_restarts_but_not_how_far_it_went() -> None:
    """next_send goes back to what the peer says it received; sent_end keeps the furthest
    offset ever sent, and sending picks up from next_send."""
    pipe = Pipe(window=64, max_payload=10)
    sender = pipe.ep[A]
    sender.write(b"z" * 40)
    pipe.flush(A)
    assert (sender.next_send, sender.sent_end) == (40, 40)
    pipe.deliver(A, 23 + 1)  # the first Data frame (5 + 8 + 10 bytes) and a byte of the next
    pipe.drop(A, B)
    pipe.reconnect(A, B)
    pipe.flush(A)
    pipe.flush(B)
    pipe.deliver(B)  # B's Resume says it received 10 (the first frame; the second was cut)
    assert sender.next_send == 10
    assert sender.sent_end == 40
    pipe.pump()
    assert sender.next_send == sender.sent_end == 40
    assert pipe.read_all(B) == b"z" * 40


def message_sizes(endpoint: StreamEndpoint) -> list[int]:
    """The sizes of the messages *endpoint* hands out, each of at most its message_size."""
    sizes = []
    while data := endpoint.data_to_send(endpoint.message_size):
        sizes.append(len(data))
    return sizes


def test_messages_start_small_on_every_new_connection() -> None:
    """The hub relays whole messages, so a connection that drops mid-message delivers none
    of it: after a (re)connection, and after the peer's Resume, messages start at 64 KiB and
    double up to 1 MiB, and a connection that lives for less than 1 MiB still brings some."""
    window = 4 * MAX_MESSAGE_SIZE
    pipe = Pipe(window=window, max_payload=MAX_FRAME_PAYLOAD)
    sender = pipe.ep[A]
    assert sender.message_size == FIRST_MESSAGE_SIZE
    sender.write(bytes(window))
    sizes = message_sizes(sender)
    kib = 1024
    assert sizes[:5] == [64 * kib, 128 * kib, 256 * kib, 512 * kib, MAX_MESSAGE_SIZE]
    assert set(sizes[5:-1]) == {MAX_MESSAGE_SIZE}
    assert sender.message_size == MAX_MESSAGE_SIZE

    # Dropped and back: this side's messages start small again, and so do the peer's once
    # this side's Resume reaches it.
    peer = pipe.ep[B]
    peer.write(bytes(window))
    message_sizes(peer)
    assert peer.message_size == MAX_MESSAGE_SIZE
    pipe.drop(A)
    pipe.reconnect(A)
    assert sender.message_size == FIRST_MESSAGE_SIZE
    resume_and_ack = sender.data_to_send(sender.message_size)
    assert len(resume_and_ack) == HEADER_SIZE + 9 + HEADER_SIZE + 8
    assert sender.message_size == FIRST_MESSAGE_SIZE  # control frames alone do not count
    pipe.queue[A] += resume_and_ack
    pipe.deliver(A)
    assert Resumed() in pipe.events[B]
    assert peer.message_size == FIRST_MESSAGE_SIZE
    # The answer to the Resume, and the window sent again from the start: small first.
    assert len(peer.data_to_send(peer.message_size)) == FIRST_MESSAGE_SIZE
    assert peer.message_size == 2 * FIRST_MESSAGE_SIZE


# --------------------------------------------------------------------------------------------
# Protocol errors
# --------------------------------------------------------------------------------------------


def connected(window: int = 64) -> StreamEndpoint:
    endpoint = StreamEndpoint(window=window, max_payload=16)
    endpoint.connection_made(resumed=False)
    return endpoint


def sent(endpoint: StreamEndpoint, data: bytes, *, eof: bool = False) -> StreamEndpoint:
    endpoint.write(data)
    if eof:
        endpoint.write_eof()
    endpoint.data_to_send()
    return endpoint


def receiving_eof() -> StreamEndpoint:
    endpoint = connected()
    endpoint.receive_data(encode_frame(Data(offset=0, payload=b"abc")))
    endpoint.receive_data(encode_frame(Eof(offset=3)))
    return endpoint


def acked_three() -> StreamEndpoint:
    endpoint = sent(connected(), b"abcde")
    endpoint.receive_data(encode_frame(Ack(offset=3)))
    return endpoint


REMOTE_ERRORS: list[tuple[str, Callable[[], StreamEndpoint], Frame | bytes]] = [
    ("ack beyond sent", lambda: sent(connected(), b"abc"), Ack(offset=4)),
    ("ack beyond written", connected, Ack(offset=1)),
    ("ack beyond eof", lambda: sent(connected(), b"abc", eof=True), Ack(offset=5)),
    ("data past window", lambda: connected(16), Data(offset=10, payload=b"x" * 7)),
    ("eof past window", lambda: connected(16), Eof(offset=17)),
    ("resume above sent", lambda: sent(connected(), b"abc"), Resume(received=4, reply=False)),
    ("resume below acked", acked_three, Resume(received=2, reply=True)),
    ("data past eof", receiving_eof, Data(offset=3, payload=b"d")),
    ("data across eof", receiving_eof, Data(offset=1, payload=b"bcd")),
    ("eof moved back", receiving_eof, Eof(offset=2)),
    ("eof moved on", receiving_eof, Eof(offset=4)),
    ("garbage", connected, b"\x07\x00\x00\x00\x00"),
    ("too large", connected, b"\x01\xff\xff\xff\xff"),
]


@pytest.mark.parametrize(
    ("name", "make", "frame"), REMOTE_ERRORS, ids=[e[0] for e in REMOTE_ERRORS]
)
def test_protocol_errors(
    name: str, make: Callable[[], StreamEndpoint], frame: Frame | bytes
) -> None:
    endpoint = make()
    wire = frame if isinstance(frame, bytes) else encode_frame(frame)
    with pytest.raises(RemoteProtocolError) as info:
        endpoint.receive_data(wire)
    code = info.value.code
    # The stream is reset with the error's code, and the Reset is queued for the peer.
    assert endpoint.state is EndpointState.RESET
    assert endpoint.reset_info is not None and endpoint.reset_info[0] == code
    assert endpoint.connection_state is ConnectionState.BROKEN
    reset = Reset(code=int(code), reason=endpoint.reset_info[1])
    assert FrameDecoder().feed(endpoint.data_to_send()) == [reset]
    with pytest.raises(LocalProtocolError):
        endpoint.receive_data(b"")
    # On the next connection the Reset goes out again (the peer has not confirmed it).
    endpoint.connection_lost()
    endpoint.connection_made(resumed=True)
    assert reset in FrameDecoder().feed(endpoint.data_to_send())


def test_old_acks_are_ignored() -> None:
    endpoint = acked_three()
    assert endpoint.receive_data(encode_frame(Ack(offset=1))) == []
    assert endpoint.acked == 3 and endpoint.state is EndpointState.OPEN


def test_eof_before_received_bytes_is_an_error() -> None:
    endpoint = connected()
    endpoint.receive_data(encode_frame(Data(offset=0, payload=b"abc")))
    with pytest.raises(RemoteProtocolError):
        endpoint.receive_data(encode_frame(Eof(offset=2)))


# What a peer may send an endpoint with a window of 64: offsets around the bytes received so
# far (in order, repeated, overlapping, past a gap, past the window), Eofs, Acks, Resets, and
# messages that are not one whole frame (two frames, a frame and a byte, a bad header).
shifts = st.sampled_from([0, 0, 0, -1, -3, 1, 5])
peer_sends = st.one_of(
    st.tuples(st.just("data"), shifts, st.integers(1, 80)),
    st.tuples(st.just("eof"), shifts, st.just(0)),
    st.tuples(st.just("ack"), st.integers(0, 2), st.just(0)),
    st.tuples(st.just("reset"), st.integers(0, 3), st.just(0)),
    st.tuples(st.just("resume"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("two"), st.integers(0, 4), st.integers(1, 20)),
    st.tuples(st.just("three"), shifts, st.integers(1, 30)),
    st.tuples(st.just("gap"), st.integers(0, 4), st.integers(1, 20)),
    st.tuples(st.just("data+eof"), shifts, st.integers(1, 20)),
    st.tuples(st.just("data+ack"), shifts, st.integers(1, 20)),
    st.tuples(st.just("extra"), st.integers(0, 4), st.integers(1, 20)),
    st.tuples(st.just("bad"), st.integers(0, 2), st.integers(1, 20)),
    st.tuples(st.just("read"), st.integers(1, 40), st.just(0)),
)


def peer_message(endpoint: StreamEndpoint, step: tuple[str, int, int]) -> bytes:
    kind, shift, size = step
    at = max(0, endpoint.received + shift)
    payload = bytes(range(at, at + size)) if size else b""
    payload = bytes(b % 256 for b in payload)
    if kind == "data":
        return encode_frame(Data(offset=at, payload=payload))
    if kind == "eof":
        return encode_frame(Eof(offset=at))
    if kind == "ack":
        return encode_frame(Ack(offset=shift))
    if kind == "reset":
        return encode_frame(Reset(code=shift, reason="r"))
    if kind == "resume":  # as long as a 1-byte Data frame, its first 8 bytes an offset of 0
        return encode_frame(Resume(received=0, reply=bool(shift)))
    data = encode_frame(Data(offset=at, payload=payload))
    if kind == "two":
        return data + encode_frame(Data(offset=at + size, payload=payload))
    if kind == "three":  # whole Data frames only, in order (one more byte in each)
        second = encode_frame(Data(offset=at + size, payload=payload + b"y"))
        return data + second + encode_frame(Data(offset=at + 2 * size + 1, payload=b"z"))
    if kind == "gap":  # the second frame a byte past the first's end
        return data + encode_frame(Data(offset=at + size + 1, payload=payload))
    if kind == "data+eof":
        return data + encode_frame(Eof(offset=at + size))
    if kind == "data+ack":
        return data + encode_frame(Ack(offset=0))
    if kind == "extra":
        return data + b"\x01"
    return b"\x01" + struct.pack(">I", 8 + size + shift + 1) + data[5:]  # length that lies


def result_or_error(call: Callable[..., object], *args: object) -> object:
    try:
        return call(*args)
    except (LocalProtocolError, RemoteProtocolError) as exc:
        return (type(exc), exc.code)


class GeneralPathEndpoint(StreamEndpoint):
    """Takes every message by the general path (decode, then one frame at a time), never by
    the short one for whole Data frames."""

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        return self._receive_frames(data)


@given(steps=st.lists(peer_sends, max_size=25))
@example(steps=[("eof", 0, 0), ("data", 0, 1)])  # past the peer's EOF
@example(steps=[("reset", 1, 0), ("data", 0, 1)])  # after a reset: ignored
@example(steps=[("data", 0, 60), ("data", 0, 5)])  # past the window
@example(steps=[("data", 0, 60), ("read", 40, 0), ("data", 0, 44)])  # up to its edge
@example(steps=[("bad", 0, 1), ("data", 0, 1)])  # after a partial frame
@example(steps=[("resume", 0, 0)])  # not a Data frame
@example(steps=[("three", 0, 20), ("read", 40, 0), ("three", 0, 20)])  # the last one's edge
@example(steps=[("three", 0, 21), ("read", 40, 0), ("three", 0, 9)])  # past it
@example(steps=[("gap", 0, 5), ("data", 0, 5)])
@settings(max_examples=300)
def test_whole_data_frames_are_taken_as_the_general_path_takes_them(
    steps: list[tuple[str, int, int]],
) -> None:
    # The usual message, whole Data frames in order, has a shorter path: an endpoint that
    # takes it agrees with one that never does on every event, error, read and state.
    short, general = connected(), GeneralPathEndpoint(window=64, max_payload=16)
    general.connection_made(resumed=False)
    for step in steps:
        if step[0] == "read":
            assert result_or_error(short.read, step[1]) == result_or_error(general.read, step[1])
        else:
            message = peer_message(short, step)
            assert peer_message(general, step) == message
            assert result_or_error(short.receive_data, message) == result_or_error(
                general.receive_data, message
            )
        assert (short.state, short.recv_state, short.connection_state) == (
            general.state,
            general.recv_state,
            general.connection_state,
        )
        assert (short.received, short.consumed, short.readable, short.at_eof) == (
            general.received,
            general.consumed,
            general.readable,
            general.at_eof,
        )
        assert short.data_to_send() == general.data_to_send()
        if short.connection_state is ConnectionState.BROKEN:
            break


def test_a_data_frame_too_large_is_refused_within_the_window() -> None:
    endpoint = StreamEndpoint()  # a window far larger than a frame
    endpoint.connection_made(resumed=False)
    body = struct.pack(">Q", 0) + b"x" * (MAX_FRAME_PAYLOAD + 1)
    with pytest.raises(RemoteProtocolError) as info:
        endpoint.receive_data(struct.pack(">BI", 1, len(body)) + body)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR  # a Data body the format does not allow
    assert endpoint.received == 0 and endpoint.state is EndpointState.RESET


def lost(endpoint: StreamEndpoint) -> StreamEndpoint:
    endpoint.connection_lost()
    return endpoint


LOCAL_ERRORS: list[tuple[str, Callable[[], object]]] = [
    ("bad window", lambda: StreamEndpoint(window=0)),
    ("bool window", lambda: StreamEndpoint(window=True)),
    ("bad max_payload", lambda: StreamEndpoint(max_payload=MAX_FRAME_PAYLOAD + 1)),
    ("zero max_payload", lambda: StreamEndpoint(max_payload=0)),
    ("read zero", lambda: connected().read(0)),
    ("write text", lambda: connected().write("text")),  # type: ignore[arg-type]
    ("small send limit", lambda: connected().data_to_send(10)),
    ("made twice", lambda: connected().connection_made(resumed=False)),
    ("resumed first", lambda: StreamEndpoint().connection_made(resumed=True)),
    ("receive before connecting", lambda: StreamEndpoint().receive_data(b"")),
    ("new after lost", lambda: lost(connected()).connection_made(resumed=False)),
    ("receive after lost", lambda: lost(connected()).receive_data(b"")),
]


@pytest.mark.parametrize(("name", "call"), LOCAL_ERRORS, ids=[e[0] for e in LOCAL_ERRORS])
def test_local_errors(name: str, call: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError):
        call()


def test_connection_lost_without_a_connection_does_nothing() -> None:
    endpoint = StreamEndpoint()
    endpoint.connection_lost()
    states = [endpoint.connection_state]
    endpoint.connection_made(resumed=False)
    endpoint.connection_lost()
    endpoint.connection_lost()
    states.append(endpoint.connection_state)
    assert states == [ConnectionState.IDLE, ConnectionState.DISCONNECTED]


# --------------------------------------------------------------------------------------------
# Every (state, input) pair of every table
# --------------------------------------------------------------------------------------------

LOCAL, REMOTE, SAME = "local error", "remote error", "unchanged"


def outcome(apply: Callable[[], object], state: Callable[[], object]) -> object:
    """What *apply* did: LOCAL (the state is unchanged), REMOTE, or the state afterwards."""
    before = state()
    try:
        apply()
    except LocalProtocolError:
        assert state() == before
        return LOCAL
    except RemoteProtocolError:
        return REMOTE
    return state()


def expected_outcome(table: Mapping[Any, Any], missing: Mapping[Any, Any], pair: Any) -> object:
    """The table's next state for *pair*, or what the pair does instead (SAME: no change)."""
    if pair in table:
        return table[pair]
    return pair[0] if missing[pair] == SAME else missing[pair]


def send_pipe(state: SendState) -> Pipe:
    pipe = Pipe()
    a = pipe.ep[A]
    if state is SendState.EOF_PENDING:
        a.write(b"ab")
        a.write_eof()
        pipe.flush(A)
    elif state is SendState.CLOSED:
        a.write_eof()
        pipe.pump()
        pipe.ep[B].read()
        pipe.pump()
    elif state is SendState.RESET:
        a.reset(1, "")
    assert a.send_state is state and a.state is not EndpointState.DONE
    return pipe


SEND_INPUTS: dict[SendInput, list[Callable[[StreamEndpoint], object]]] = {
    SendInput.WRITE: [lambda e: e.write(b"x")],
    SendInput.WRITE_EOF: [lambda e: e.write_eof()],
    SendInput.EOF_ACKED: [lambda e: e.receive_data(encode_frame(Ack(offset=e.written_end + 1)))],
    SendInput.RESET: [
        lambda e: e.reset(1, ""),
        lambda e: e.receive_data(encode_frame(Reset(code=1, reason=""))),
    ],
}

#: What each pair missing from SEND_TRANSITIONS does instead.
SEND_MISSING: dict[tuple[SendState, SendInput], object] = {
    (SendState.OPEN, SendInput.EOF_ACKED): REMOTE,  # Ack beyond what was sent
    (SendState.EOF_PENDING, SendInput.WRITE): LOCAL,
    (SendState.EOF_PENDING, SendInput.WRITE_EOF): LOCAL,
    (SendState.CLOSED, SendInput.WRITE): LOCAL,
    (SendState.CLOSED, SendInput.WRITE_EOF): LOCAL,
    (SendState.CLOSED, SendInput.EOF_ACKED): SAME,  # an old Ack again
    (SendState.RESET, SendInput.WRITE): LOCAL,
    (SendState.RESET, SendInput.WRITE_EOF): LOCAL,
    (SendState.RESET, SendInput.EOF_ACKED): SAME,  # ignored after a reset
}


def test_send_table_walk() -> None:
    pairs = set(itertools.product(SendState, SendInput))
    assert set(SEND_TRANSITIONS) | set(SEND_MISSING) == pairs
    assert not set(SEND_TRANSITIONS) & set(SEND_MISSING)
    for state, event in sorted(pairs, key=str):
        for apply in SEND_INPUTS[event]:
            a = send_pipe(state).ep[A]
            result = outcome(partial(apply, a), partial(getattr, a, "send_state"))
            if result == REMOTE:
                assert a.send_state is SendState.RESET  # a remote error resets the stream
            expected = expected_outcome(SEND_TRANSITIONS, SEND_MISSING, (state, event))
            assert result == expected, (state, event)


def recv_pipe(state: RecvState) -> Pipe:
    pipe = Pipe()
    a, b = pipe.ep[A], pipe.ep[B]
    b.write(b"hello")
    if state is not RecvState.OPEN and state is not RecvState.RESET:
        b.write_eof()
    pipe.pump()
    if state in (RecvState.EOF_READ, RecvState.CLOSED):
        a.read()
    if state is RecvState.CLOSED:
        pipe.flush(A)
    if state is RecvState.RESET:
        a.reset(1, "")
    assert a.recv_state is state and a.state is not EndpointState.DONE
    return pipe


RECV_INPUTS: dict[RecvInput, list[Callable[[StreamEndpoint], object]]] = {
    RecvInput.DATA: [lambda e: e.receive_data(encode_frame(Data(offset=e.received, payload=b"z")))],
    RecvInput.READ: [lambda e: e.read(1)],
    RecvInput.EOF: [lambda e: e.receive_data(encode_frame(Eof(offset=e.received)))],
    RecvInput.READ_EOF: [lambda e: e.read()],
    RecvInput.ACK_EOF: [lambda e: e.data_to_send()],
    RecvInput.RESET: [
        lambda e: e.reset(1, ""),
        lambda e: e.receive_data(encode_frame(Reset(code=1, reason=""))),
    ],
}

_RS = RecvState
_RI = RecvInput
#: What each pair missing from RECV_TRANSITIONS does instead ("unreachable" inputs leave the
#: state as it is: a read that does not reach an EOF is a READ, a data_to_send without the
#: Ack of an EOF to give is no ACK_EOF).
RECV_MISSING: dict[tuple[RecvState, RecvInput], object] = {
    (_RS.OPEN, _RI.READ_EOF): SAME,
    (_RS.OPEN, _RI.ACK_EOF): SAME,
    (_RS.EOF_RECEIVED, _RI.DATA): REMOTE,  # data past the EOF
    (_RS.EOF_RECEIVED, _RI.EOF): SAME,  # the same Eof again
    (_RS.EOF_RECEIVED, _RI.ACK_EOF): SAME,
    (_RS.EOF_READ, _RI.DATA): REMOTE,
    (_RS.EOF_READ, _RI.EOF): SAME,
    (_RS.EOF_READ, _RI.READ_EOF): SAME,
    (_RS.CLOSED, _RI.DATA): REMOTE,
    (_RS.CLOSED, _RI.EOF): SAME,
    (_RS.CLOSED, _RI.READ_EOF): SAME,
    (_RS.CLOSED, _RI.ACK_EOF): SAME,
    (_RS.RESET, _RI.DATA): SAME,  # ignored after a reset
    (_RS.RESET, _RI.READ): LOCAL,
    (_RS.RESET, _RI.EOF): SAME,
    (_RS.RESET, _RI.READ_EOF): LOCAL,
    (_RS.RESET, _RI.ACK_EOF): SAME,
}


def test_read_changes_no_receiving_state() -> None:
    # read() skips the table for READ, which leaves every state as it is (and is refused
    # after a reset): the table says so.
    for state in RecvState:
        if state is RecvState.RESET:
            assert (state, RecvInput.READ) not in RECV_TRANSITIONS
        else:
            assert RECV_TRANSITIONS[(state, RecvInput.READ)] is state


def test_recv_table_walk() -> None:
    pairs = set(itertools.product(RecvState, RecvInput))
    assert set(RECV_TRANSITIONS) | set(RECV_MISSING) == pairs
    assert not set(RECV_TRANSITIONS) & set(RECV_MISSING)
    for state, event in sorted(pairs, key=str):
        for apply in RECV_INPUTS[event]:
            a = recv_pipe(state).ep[A]
            result = outcome(partial(apply, a), partial(getattr, a, "recv_state"))
            if result == REMOTE:
                assert a.recv_state is RecvState.RESET  # a remote error resets the stream
            expected = expected_outcome(RECV_TRANSITIONS, RECV_MISSING, (state, event))
            assert result == expected, (state, event)


def connection_endpoint(state: ConnectionState) -> StreamEndpoint:
    endpoint = StreamEndpoint()
    if state is not ConnectionState.IDLE:
        endpoint.connection_made(resumed=False)
    if state in (ConnectionState.DISCONNECTED, ConnectionState.RESUMING):
        endpoint.connection_lost()
    if state is ConnectionState.RESUMING:
        endpoint.connection_made(resumed=True)
    if state is ConnectionState.BROKEN:
        with pytest.raises(RemoteProtocolError):
            endpoint.receive_data(b"\x00\x00\x00\x00\x00")
    assert endpoint.connection_state is state
    return endpoint


def swallow_remote(call: Callable[[], object]) -> None:
    with contextlib.suppress(RemoteProtocolError):
        call()


CONNECTION_INPUTS: dict[ConnectionInput, Callable[[StreamEndpoint], object]] = {
    ConnectionInput.MADE_NEW: lambda e: e.connection_made(resumed=False),
    ConnectionInput.MADE_RESUMED: lambda e: e.connection_made(resumed=True),
    ConnectionInput.PEER_RESUME: lambda e: e.receive_data(
        encode_frame(Resume(received=0, reply=False))
    ),
    ConnectionInput.ERROR: lambda e: e.receive_data(b"\x00\x00\x00\x00\x00"),
    ConnectionInput.LOST: lambda e: e.connection_lost(),
}

_CS = ConnectionState
_CI = ConnectionInput
CONNECTION_MISSING: dict[tuple[ConnectionState, ConnectionInput], object] = {
    (_CS.IDLE, _CI.MADE_RESUMED): LOCAL,
    (_CS.IDLE, _CI.PEER_RESUME): LOCAL,
    (_CS.IDLE, _CI.ERROR): LOCAL,
    (_CS.CONNECTED, _CI.MADE_NEW): LOCAL,
    (_CS.CONNECTED, _CI.MADE_RESUMED): LOCAL,
    (_CS.RESUMING, _CI.MADE_NEW): LOCAL,
    (_CS.RESUMING, _CI.MADE_RESUMED): LOCAL,
    (_CS.BROKEN, _CI.MADE_NEW): LOCAL,
    (_CS.BROKEN, _CI.MADE_RESUMED): LOCAL,
    (_CS.BROKEN, _CI.PEER_RESUME): LOCAL,
    (_CS.BROKEN, _CI.ERROR): LOCAL,
    (_CS.DISCONNECTED, _CI.MADE_NEW): LOCAL,
    (_CS.DISCONNECTED, _CI.PEER_RESUME): LOCAL,
    (_CS.DISCONNECTED, _CI.ERROR): LOCAL,
}


def test_connection_table_walk() -> None:
    pairs = set(itertools.product(ConnectionState, ConnectionInput))
    assert set(CONNECTION_TRANSITIONS) | set(CONNECTION_MISSING) == pairs
    assert not set(CONNECTION_TRANSITIONS) & set(CONNECTION_MISSING)
    for state, event in sorted(pairs, key=str):
        endpoint = connection_endpoint(state)
        apply = CONNECTION_INPUTS[event]
        if (state, event) in CONNECTION_TRANSITIONS:
            swallow_remote(lambda: apply(endpoint))  # noqa: B023
            assert endpoint.connection_state is CONNECTION_TRANSITIONS[(state, event)]
        else:
            with pytest.raises(LocalProtocolError):
                apply(endpoint)
            assert endpoint.connection_state is state


# --------------------------------------------------------------------------------------------
# The fuzz harness, in its fallback mode
# --------------------------------------------------------------------------------------------


def load_fuzz_module(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "fuzz" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"devstream_fuzz_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_frames_fallback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fuzz = load_fuzz_module("fuzz_frames")
    fuzz.run_fallback(2000, seed=1)
    assert fuzz.main(["--fallback", "--iterations", "50", "--seed", "3"]) == 0
    assert "ok:" in capsys.readouterr().out

    def broken_check(data: bytes) -> None:
        raise ValueError("planted bug")

    monkeypatch.setattr(fuzz, "check", broken_check)
    with pytest.raises(fuzz.Crash) as info:
        fuzz.run_fallback(1, seed=1)
    assert info.value.data == fuzz.SEEDS[0]
