"""The core WebSocket codec (``devstream_core.websocket``): one test per rule, both roles.

Test rules: no I/O at all. Frames are built by hand (:func:`frame`), so a test can break any
rule on purpose; wsproto's ``Connection`` is the reference for what a peer accepts and
refuses: the hypothesis tests feed it and the codec the same reads and compare the events and
the close code, and wsproto reads back what the codec writes. The documented differences:
the codec refuses a header it can already tell is bad before all of it has come (wsproto
waits for the rest), and it takes close code 1014 (registered with IANA after RFC 6455;
wsproto refuses it).
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection as WsprotoClose

import devstream_core
from devstream_core.errors import LocalProtocolError
from devstream_core.websocket import (
    MAX_BATCH_FRAMES,
    TRANSITIONS,
    BytesMessage,
    CloseConnection,
    CloseInput,
    Connection,
    ConnectionState,
    Ping,
    Pong,
    TextMessage,
    is_valid_close_code,
    native_apply_mask,
    pure_apply_mask,
)

KEY = b"\x01\x02\x03\x04"


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
        return head + key + pure_apply_mask(payload, key)
    return head + payload


def close_frame(code: int, reason: bytes = b"", *, masked: bool = True) -> bytes:
    return frame(0x8, struct.pack("!H", code) + reason, masked=masked)


def describe(events: list[object]) -> list[tuple[object, ...]]:
    """Events of either library as comparable tuples (a close by its code)."""
    out: list[tuple[object, ...]] = []
    for event in events:
        name = type(event).__name__
        if name in ("BytesMessage", "TextMessage"):
            data = event.data  # type: ignore[attr-defined]
            data = data if isinstance(data, str) else bytes(data)
            flags = (event.frame_finished, event.message_finished)  # type: ignore[attr-defined]
            out.append((name, data, *flags))
        elif name in ("Ping", "Pong"):
            out.append((name, bytes(event.payload)))  # type: ignore[attr-defined]
        elif name == "CloseConnection":
            out.append(("close", int(event.code)))  # type: ignore[attr-defined]
        else:
            raise AssertionError(f"unexpected event {event!r}")
    return out


def receive_all(conn: Connection, reads: list[bytes], *, borrowed: bool = False) -> list[object]:
    """Feed *reads* to *conn* as the adapter does (each batch it holds parsed before the
    next read); *borrowed* lends each read in one buffer, scribbled over after the call."""
    events: list[object] = []
    buffer = bytearray(max(map(len, reads), default=0))
    for data in reads:
        if borrowed:
            buffer[: len(data)] = data
            events.extend(conn.receive_data(memoryview(buffer)[: len(data)], borrowed=True))
            buffer[:] = b"\xee" * len(buffer)
        else:
            events.extend(conn.receive_data(data))
        while conn.holds_more:
            events.extend(conn.receive_data(b""))
    return events


def run_both(
    reads: list[bytes], *, server: bool, borrowed: bool = False, max_frames: int = 512
) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The codec's and wsproto's events for the same reads, described. wsproto's refusal of
    a code it does not know (1014) is described as ``("close", 1002, "reserved")``."""
    ours = receive_all(
        Connection(client=not server, max_frames=max_frames), reads, borrowed=borrowed
    )
    reference = WsprotoConnection(ConnectionType.SERVER if server else ConnectionType.CLIENT)
    theirs: list[object] = []
    for data in reads:
        if any(isinstance(e, WsprotoClose) for e in theirs):
            break
        reference.receive_data(data)
        theirs.extend(reference.events())
    described = describe(theirs)
    last = theirs[-1] if theirs else None
    if isinstance(last, WsprotoClose) and last.reason == WSPROTO_UNKNOWN_CODE:
        described[-1] = ("close", 1002, "reserved")
    return describe(ours), described


#: wsproto's reason when it refuses a close code below 3000 it does not know (1014).
WSPROTO_UNKNOWN_CODE = "CLOSE with unknown reserved code"


def assert_same_decisions(ours: list[tuple[object, ...]], theirs: list[tuple[object, ...]]) -> None:
    """The codec decided as wsproto did, but for the documented differences."""
    if theirs and theirs[-1] == ("close", 1002, "reserved"):
        # A close code wsproto does not know: the codec refuses the same ones, but takes
        # 1014 (or refuses its reason, when that is not UTF-8).
        assert ours[:-1] == theirs[:-1]
        assert ours[-1] in (("close", 1002), ("close", 1014), ("close", 1007))
        return
    if ours == theirs:
        return
    # A header can be refused here before all of it has come; wsproto waits for the rest.
    assert ours and ours[-1][0] == "close" and not (theirs and theirs[-1][0] == "close")
    assert ours[:-1] == theirs


def split(wire: bytes, cuts: list[int]) -> list[bytes]:
    bounds = sorted({0, len(wire), *(c % (len(wire) + 1) for c in cuts)})
    return [wire[a:b] for a, b in itertools.pairwise(bounds)]


# -- frames the codec takes --------------------------------------------------------------------


@pytest.mark.parametrize("server", [True, False])
def test_binary_and_text_messages_in_fragments(server: bool) -> None:
    wire = (
        frame(0x2, b"ab", fin=False, masked=server)
        + frame(0x0, b"cd", masked=server)
        + frame(0x1, "zü".encode(), masked=server)
    )
    events = Connection(client=not server).receive_data(wire)
    assert describe(events) == [
        ("BytesMessage", b"ab", True, False),
        ("BytesMessage", b"cd", True, True),
        ("TextMessage", "zü", True, True),
    ]


@pytest.mark.parametrize("length", [0, 125, 126, 65535, 65536])
def test_lengths_at_each_encoding_edge(length: int) -> None:
    events = Connection(client=False).receive_data(frame(0x2, b"z" * length, masked=True))
    assert describe(events) == [("BytesMessage", b"z" * length, True, True)]


def test_a_frame_in_pieces_is_handed_on_as_it_arrives() -> None:
    conn = Connection(client=False)
    wire = frame(0x2, b"0123456789", masked=True, key=KEY)
    assert conn.receive_data(wire[:3]) == []  # the header is not all here
    assert conn.in_message
    assert describe(conn.receive_data(wire[3:10])) == [("BytesMessage", b"0123", False, False)]
    assert describe(conn.receive_data(wire[10:])) == [("BytesMessage", b"456789", True, True)]
    assert not conn.in_message


def test_a_server_unmasks_into_a_copy_and_a_client_reads_into_views() -> None:
    server = Connection(client=False)
    wire = frame(0x2, b"first", masked=True) + frame(0x2, b"second", masked=True)
    for event in server.receive_data(wire):
        assert isinstance(event, BytesMessage) and type(event.data) is bytes
    client = Connection(client=True)
    wire = frame(0x2, b"first", masked=False) + frame(0x2, b"second" * 1000, masked=False)
    events = client.receive_data(wire)
    assert [bytes(e.data) for e in events if isinstance(e, BytesMessage)] == [
        b"first",
        b"second" * 1000,
    ]
    for event in events:
        assert isinstance(event, BytesMessage) and isinstance(event.data, memoryview)
        assert event.data.obj is wire


def test_a_whole_read_of_payload_is_handed_on_as_it_is_on_a_client() -> None:
    body = b"x" * 100_000
    wire = frame(0x2, body, masked=False)
    client = Connection(client=True)
    assert client.receive_data(wire[:10]) == []
    [event] = client.receive_data(wire[10:])
    assert isinstance(event, BytesMessage) and event.data is not None
    assert bytes(event.data) == body


def test_borrowed_bytes_are_never_kept() -> None:
    wire = frame(0x2, b"payload", masked=False) + frame(0x2, b"tail", masked=False)
    buffer = bytearray(wire)
    client = Connection(client=True, max_frames=1)
    events = client.receive_data(memoryview(buffer)[:-2], borrowed=True)
    assert client.holds_more
    buffer[:] = b"\xee" * len(buffer)
    events += client.receive_data(b"")
    events += client.receive_data(wire[-2:])
    assert b"".join(bytes(e.data) for e in events if isinstance(e, BytesMessage)) == (
        b"payloadtail"
    )


def test_text_split_inside_a_character_is_decoded_whole() -> None:
    text = "zürich → 東京".encode()
    wire = frame(0x1, text[:2], fin=False, masked=True) + frame(0x0, text[2:], masked=True)
    for cut in range(len(wire) + 1):
        events = receive_all(Connection(client=False), [wire[:cut], wire[cut:]])
        assert "".join(e.data for e in events if isinstance(e, TextMessage)) == text.decode()


@pytest.mark.parametrize("server", [True, False])
def test_pings_and_pongs_between_fragments(server: bool) -> None:
    wire = (
        frame(0x2, b"a", fin=False, masked=server)
        + frame(0x9, b"p" * 125, masked=server)
        + frame(0xA, b"", masked=server)
        + frame(0x0, b"b", masked=server)
    )
    events = Connection(client=not server).receive_data(wire)
    assert describe(events) == [
        ("BytesMessage", b"a", True, False),
        ("Ping", b"p" * 125),
        ("Pong", b""),
        ("BytesMessage", b"b", True, True),
    ]
    ping = events[1]
    assert isinstance(ping, Ping) and ping.response() == Pong(payload=b"p" * 125)


@pytest.mark.parametrize("server", [True, False])
def test_pings_one_after_another_come_as_the_last(server: bool) -> None:
    """A run of pings in one call is handed on as its last ping (the one a pong answers,
    RFC 6455 §5.5.3); pings apart (data or a pong between) each come."""
    pings = b"".join(frame(0x9, b"%d" % i, masked=server) for i in range(100))
    wire = (
        pings
        + frame(0x2, b"a", masked=server)
        + frame(0x9, b"x", masked=server)
        + frame(0xA, b"", masked=server)
        + frame(0x9, b"y", masked=server)
        + frame(0x9, b"z", masked=server)
    )
    events = Connection(client=not server).receive_data(wire)
    assert describe(events) == [
        ("Ping", b"99"),
        ("BytesMessage", b"a", True, True),
        ("Ping", b"x"),
        ("Pong", b""),
        ("Ping", b"z"),
    ]


def test_binary_only_refuses_a_text_message_with_1003() -> None:
    """``binary_only`` (a devstream.v1 side): binary messages, pings and pongs come as ever; a
    text frame starting a message is refused with 1003 and nothing after it is read."""
    conn = Connection(client=False, binary_only=True)
    wire = (
        frame(0x2, b"ab", fin=False, masked=True)
        + frame(0x9, b"p", masked=True)
        + frame(0x0, b"cd", masked=True)
        + frame(0x1, b"text", masked=True)
        + frame(0x2, b"after", masked=True)
    )
    events = conn.receive_data(wire)
    assert describe(events[:-1]) == [
        ("BytesMessage", b"ab", True, False),
        ("Ping", b"p"),
        ("BytesMessage", b"cd", True, True),
    ]
    assert events[-1] == CloseConnection(
        code=1003, reason="a text message where only binary ones are taken"
    )
    assert conn.failed
    assert conn.receive_data(frame(0x2, b"more", masked=True)) == []
    # Without it, the same text is taken.
    text = Connection(client=False).receive_data(frame(0x1, b"text", masked=True))
    assert describe(text) == [("TextMessage", "text", True, True)]


def test_a_control_frame_in_pieces_comes_whole() -> None:
    conn = Connection(client=False)
    wire = frame(0x9, b"hello", masked=True)
    events = [event for byte in wire for event in conn.receive_data(bytes([byte]))]
    assert events == [Ping(payload=b"hello")]


def test_a_close_without_a_code_is_1005() -> None:
    conn = Connection(client=False)
    assert conn.receive_data(frame(0x8, b"", masked=True)) == [CloseConnection(code=1005)]
    assert conn.state is ConnectionState.REMOTE_CLOSING


@pytest.mark.parametrize("code", [1000, 1001, 1003, 1007, 1011, 1014, 3000, 4000, 4999])
def test_close_codes_a_peer_may_send(code: int) -> None:
    conn = Connection(client=False)
    events = conn.receive_data(close_frame(code, "bye ✓".encode()))
    assert events == [CloseConnection(code=code, reason="bye ✓")]
    assert not conn.failed
    # Answered with the same code and reason, as RFC 6455 §5.5.1 suggests.
    (close,) = events
    assert isinstance(close, CloseConnection)
    assert close.response() == CloseConnection(code=code, reason="bye ✓")


def test_nothing_is_read_after_a_close() -> None:
    conn = Connection(client=False)
    wire = frame(0x2, b"before", masked=True) + close_frame(1001)
    events = conn.receive_data(wire + frame(0x2, b"after", masked=True))
    assert describe(events) == [("BytesMessage", b"before", True, True), ("close", 1001)]
    assert conn.receive_data(frame(0x2, b"later", masked=True)) == []


# -- frames the codec refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "code"),
    [
        pytest.param(frame(0x2, b"a", masked=True, rsv=0x40), 1002, id="reserved bit"),
        pytest.param(frame(0x3, b"a", masked=True), 1002, id="unknown data opcode"),
        pytest.param(frame(0xB, b"a", masked=True), 1002, id="unknown control opcode"),
        pytest.param(frame(0x2, b"a", masked=False), 1002, id="unmasked to a server"),
        pytest.param(frame(0x0, b"a", masked=True), 1002, id="continuation outside a message"),
        pytest.param(
            frame(0x2, b"a", fin=False, masked=True) + frame(0x2, b"b", masked=True),
            1002,
            id="new message inside a message",
        ),
        pytest.param(frame(0x9, b"a", fin=False, masked=True), 1002, id="fragmented ping"),
        pytest.param(frame(0x8, b"", fin=False, masked=True), 1002, id="fragmented close"),
        pytest.param(frame(0x9, b"a" * 126, masked=True), 1002, id="ping of 126 bytes"),
        pytest.param(frame(0xA, b"a" * 126, masked=True), 1002, id="pong of 126 bytes"),
        pytest.param(frame(0x2, b"a", masked=True, length_form=126), 1002, id="long 16-bit"),
        pytest.param(
            frame(0x2, b"a" * 125, masked=True, length_form=126), 1002, id="16-bit for 125"
        ),
        pytest.param(
            frame(0x2, b"a" * 65535, masked=True, length_form=127), 1002, id="64-bit for 65535"
        ),
        pytest.param(b"\x82\xff" + struct.pack("!Q", 1 << 63) + b"keyk", 1002, id="length top bit"),
        pytest.param(frame(0x1, b"\xff\xfe", masked=True), 1007, id="text not UTF-8"),
        pytest.param(frame(0x8, b"\x03", masked=True), 1002, id="close of 1 byte"),
        pytest.param(close_frame(1000, b"\xff"), 1007, id="close reason not UTF-8"),
    ],
)
def test_protocol_errors_end_with_the_close_code_to_send(wire: bytes, code: int) -> None:
    ours, theirs = run_both([wire, frame(0x2, b"more", masked=True)], server=True)
    assert ours == theirs
    assert ours[-1] == ("close", code)


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (frame(0x1, b"ok \xff", masked=True), "text that is not UTF-8"),
        (close_frame(1000, b"bye \xff"), "a close reason that is not UTF-8"),
    ],
    ids=["text", "close-reason"],
)
def test_the_reason_for_refusing_bad_utf8_is_plain(wire: bytes, reason: str) -> None:
    """The close reason goes to the peer (and to the other side of a stream): plain words,
    not the decoder's account of the bytes."""
    conn = Connection(client=False)
    assert conn.receive_data(wire)[-1] == CloseConnection(code=1007, reason=reason)


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535])
def test_close_codes_a_peer_must_not_send(code: int) -> None:
    conn = Connection(client=False)
    [event] = conn.receive_data(close_frame(code))
    assert event == CloseConnection(code=1002, reason=f"a close frame with code {code}")
    assert conn.failed and conn.state is ConnectionState.OPEN  # this side's close is owed
    assert not is_valid_close_code(code)


def test_a_masked_frame_to_a_client_is_refused() -> None:
    client = Connection(client=True)
    assert describe(client.receive_data(frame(0x2, b"ok", masked=False))) == [
        ("BytesMessage", b"ok", True, True)
    ]
    assert describe(client.receive_data(frame(0x2, b"no", masked=True))) == [("close", 1002)]
    assert client.failed
    assert client.receive_data(frame(0x2, b"ok", masked=False)) == []


def test_bad_text_is_refused_at_the_first_bad_byte() -> None:
    """The fragments before the bad one stand; the message is refused before its end."""
    conn = Connection(client=False)
    wire = frame(0x1, b"good", fin=False, masked=True) + frame(0x0, b"\xc3(", masked=True)
    assert describe(conn.receive_data(wire)) == [
        ("TextMessage", "good", True, False),
        ("close", 1007),
    ]


def test_a_header_is_refused_before_the_rest_of_it_arrives() -> None:
    conn = Connection(client=False)
    assert describe(conn.receive_data(b"\x82\xfe\x00")) == []  # a length still to come
    conn = Connection(client=False)
    assert describe(conn.receive_data(b"\xc2")) == []  # one byte: nothing to tell yet
    assert describe(conn.receive_data(b"\x85")) == [("close", 1002)]


# -- batches -----------------------------------------------------------------------------------


def fragments(count: int) -> tuple[bytes, list[bytes]]:
    """One binary message in *count* masked fragments of 0 to 4 bytes: its wire and pieces."""
    pieces = [bytes([index % 256]) * (index % 5) for index in range(count)]
    wire = b"".join(
        frame(0x2 if index == 0 else 0x0, piece, fin=index == count - 1, masked=True)
        for index, piece in enumerate(pieces)
    )
    return wire, pieces


@pytest.mark.parametrize("borrowed", [False, True])
def test_a_read_of_many_frames_is_parsed_in_batches(borrowed: bool) -> None:
    count = 2 * MAX_BATCH_FRAMES + 100
    wire, pieces = fragments(count)
    conn = Connection(client=False)
    buffer = bytearray(wire)
    batches = [conn.receive_data(memoryview(buffer) if borrowed else wire, borrowed=borrowed)]
    buffer[:] = b"\xee" * len(buffer)
    while conn.holds_more:
        batches.append(conn.receive_data(b""))
    assert [len(batch) for batch in batches] == [MAX_BATCH_FRAMES, MAX_BATCH_FRAMES, 100]
    assert [bytes(e.data) for b in batches for e in b if isinstance(e, BytesMessage)] == pieces


def test_control_frames_count_in_a_batch() -> None:
    conn = Connection(client=False, max_frames=2)
    wire = b"".join(frame(0x9, bytes([i]), masked=True) for i in range(5))
    batches = [conn.receive_data(wire)]
    while conn.holds_more:
        batches.append(conn.receive_data(b""))
    # Two frames a call: pings 0 and 1, 2 and 3, then 4 (each call's run of pings comes as
    # its last).
    assert batches == [[Ping(payload=b"\x01")], [Ping(payload=b"\x03")], [Ping(payload=b"\x04")]]


def test_a_batch_of_no_frames_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Connection(client=False, max_frames=0)


# -- the closing handshake ---------------------------------------------------------------------


@pytest.mark.parametrize(("state", "what"), list(itertools.product(ConnectionState, CloseInput)))
def test_every_pair_of_the_closing_handshake(state: ConnectionState, what: CloseInput) -> None:
    """Drive a connection to *state*, then feed it *what*: the table decides, and a pair
    missing from it is refused (sending) or cannot happen (nothing is read after a close)."""
    conn = Connection(client=False)
    steps = {
        ConnectionState.OPEN: [],
        ConnectionState.LOCAL_CLOSING: [CloseInput.SEND_CLOSE],
        ConnectionState.REMOTE_CLOSING: [CloseInput.RECEIVE_CLOSE],
        ConnectionState.CLOSED: [CloseInput.SEND_CLOSE, CloseInput.RECEIVE_CLOSE],
    }[state]
    for step in steps:
        if step is CloseInput.SEND_CLOSE:
            conn.send_close(1000)
        else:
            conn.receive_data(close_frame(1000))
    assert conn.state is state
    expected = TRANSITIONS.get((state, what))
    if what is CloseInput.SEND_CLOSE:
        if expected is None:
            with pytest.raises(LocalProtocolError):
                conn.send_close(1000)
        else:
            assert conn.send_close(1000) == b"\x88\x02\x03\xe8"
    else:
        events = conn.receive_data(close_frame(1000))
        if expected is None:
            assert events == []  # the peer's close already came
        else:
            assert events == [CloseConnection(code=1000)]
    assert conn.state is (expected or state)


def test_data_arrives_while_this_sides_close_waits_for_the_answer() -> None:
    conn = Connection(client=False)
    conn.send_close(1000)
    events = conn.receive_data(frame(0x2, b"late", masked=True) + close_frame(1000))
    assert describe(events) == [("BytesMessage", b"late", True, True), ("close", 1000)]
    assert conn.state is ConnectionState.CLOSED


@pytest.mark.parametrize("state", list(ConnectionState))
def test_what_may_be_sent_in_each_state(state: ConnectionState) -> None:
    conn = Connection(client=False)
    if state in (ConnectionState.LOCAL_CLOSING, ConnectionState.CLOSED):
        conn.send_close(1000)
    if state in (ConnectionState.REMOTE_CLOSING, ConnectionState.CLOSED):
        conn.receive_data(close_frame(1000))
    assert conn.state is state
    sends = [
        lambda: conn.send_data(b"x"),
        lambda: conn.send_message([b"x"]),
        lambda: conn.send_ping(b"p"),
        lambda: conn.send_pong(b"p"),
    ]
    for send in sends:
        if state is ConnectionState.OPEN:
            send()
        else:
            with pytest.raises(LocalProtocolError):
                send()


# -- the encoder -------------------------------------------------------------------------------


def wsproto_reads(wire: bytes, *, server: bool) -> list[tuple[object, ...]]:
    """What a wsproto peer of the other role reads from *wire*."""
    peer = WsprotoConnection(ConnectionType.CLIENT if server else ConnectionType.SERVER)
    peer.receive_data(wire)
    return describe(list(peer.events()))


@pytest.mark.parametrize("server", [True, False])
@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536, 70001])
def test_data_frames_at_every_length_read_back_by_wsproto(server: bool, length: int) -> None:
    conn = Connection(client=not server)
    key = b"" if server else KEY
    payload = bytes(range(256)) * (length // 256) + bytes(length % 256)
    head, body = conn.send_data(payload, mask_key=key)
    assert wsproto_reads(head + bytes(body), server=server) == [
        ("BytesMessage", payload, True, True)
    ]


def test_a_server_hands_its_payload_on_without_a_copy() -> None:
    payload = memoryview(b"x" * 1000)
    _, body = Connection(client=False).send_data(payload)
    assert body is payload


@pytest.mark.parametrize("server", [True, False])
def test_fragments_text_and_control_frames_read_back_by_wsproto(server: bool) -> None:
    conn = Connection(client=not server)

    def key() -> bytes:
        return b"" if server else os.urandom(4)

    wire = b"".join(
        [
            *conn.send_data(b"ab", message_finished=False, mask_key=key()),
            *conn.send_data(b"cd", mask_key=key()),
            *conn.send_data("tëxt", message_finished=False, mask_key=key()),
            conn.send_ping(b"ping", mask_key=key()),
            *conn.send_data("!", mask_key=key()),
            conn.send_pong(b"pong", mask_key=key()),
            *conn.send_message([b"one ", memoryview(b"message")], mask_key=key()),
            conn.send_close(4001, "bye", mask_key=key()),
        ]
    )
    assert wsproto_reads(wire, server=server) == [
        ("BytesMessage", b"ab", True, False),
        ("BytesMessage", b"cd", True, True),
        ("TextMessage", "tëxt", True, False),
        ("Ping", b"ping"),
        ("TextMessage", "!", True, True),
        ("Pong", b"pong"),
        ("BytesMessage", b"one message", True, True),
        ("close", 4001),
    ]
    # And the codec of the other role reads it the same.
    other = Connection(client=server)
    assert describe(other.receive_data(wire)) == wsproto_reads(wire, server=server)


def test_mixing_text_into_a_binary_message_is_refused() -> None:
    conn = Connection(client=False)
    conn.send_data(b"ab", message_finished=False)
    assert conn.sending_message
    with pytest.raises(LocalProtocolError):
        conn.send_data("text")
    with pytest.raises(LocalProtocolError):
        conn.send_message([b"whole"])
    conn.send_data(b"end")
    assert not conn.sending_message


@pytest.mark.parametrize(
    ("client", "key"), [(True, b""), (True, b"abc"), (True, b"abcde"), (False, b"abcd")]
)
def test_the_mask_key_matches_the_role(client: bool, key: bytes) -> None:
    conn = Connection(client=client)
    for send in (
        lambda: conn.send_data(b"x", mask_key=key),
        lambda: conn.send_message([b"x"], mask_key=key),
        lambda: conn.send_ping(mask_key=key),
        lambda: conn.send_pong(mask_key=key),
        lambda: conn.send_close(1000, mask_key=key),
    ):
        with pytest.raises(LocalProtocolError):
            send()
    assert conn.state is ConnectionState.OPEN  # a refused close changed nothing


def test_a_client_masks_with_the_key_it_is_given() -> None:
    head, body = Connection(client=True).send_data(b"abcdefgh", mask_key=KEY)
    assert head == b"\x82\x88" + KEY
    assert body == bytes(b ^ KEY[i % 4] for i, b in enumerate(b"abcdefgh"))


def test_close_frames_as_sent() -> None:
    assert Connection(client=False).send_close(1000) == b"\x88\x02\x03\xe8"
    assert Connection(client=False).send_close(None) == b"\x88\x00"
    assert Connection(client=False).send_close(1005) == b"\x88\x00"
    with pytest.raises(LocalProtocolError):
        Connection(client=False).send_close(None, "a reason needs a code")
    for code in (999, 1004, 1006, 1015, 2999, 5000):
        with pytest.raises(LocalProtocolError):
            Connection(client=False).send_close(code)


def test_a_long_close_reason_is_cut_between_characters() -> None:
    reason = "é" * 100  # 200 bytes of UTF-8
    wire = Connection(client=False).send_close(4000, reason)
    assert len(wire) == 2 + 2 + 122  # 61 characters: the 62nd would pass 123 bytes
    [event] = Connection(client=True).receive_data(wire)
    assert event == CloseConnection(code=4000, reason="é" * 61)


def test_a_control_payload_over_125_bytes_is_refused() -> None:
    conn = Connection(client=False)
    assert conn.send_ping(b"p" * 125)[1] == 125
    with pytest.raises(LocalProtocolError):
        conn.send_ping(b"p" * 126)
    with pytest.raises(LocalProtocolError):
        conn.send_pong(b"p" * 126)


# -- masking -----------------------------------------------------------------------------------


@settings(max_examples=200)
@given(data=st.binary(max_size=2000), key=st.binary(min_size=4, max_size=4))
def test_the_pure_masker_gives_the_native_ones_bytes(data: bytes, key: bytes) -> None:
    masked = pure_apply_mask(data, key)
    assert masked == bytes(b ^ key[i % 4] for i, b in enumerate(data))
    assert pure_apply_mask(masked, key) == data
    if native_apply_mask is not None:
        assert native_apply_mask(data, key) == masked


@pytest.mark.parametrize("native", [True, False])
def test_the_mask_function_given_is_the_one_used(native: bool) -> None:
    calls: list[int] = []

    def counting(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
        calls.append(len(data))
        return pure_apply_mask(data, key)

    conn = Connection(client=False, apply_mask=counting)
    wire = frame(0x2, b"12345", masked=True) + frame(0x9, b"pi", masked=True)
    assert describe(conn.receive_data(wire)) == [
        ("BytesMessage", b"12345", True, True),
        ("Ping", b"pi"),
    ]
    assert calls == [5, 2]


# -- the codec against wsproto, on random frames -----------------------------------------------

text_or_bytes = st.one_of(
    st.binary(max_size=300).map(lambda b: ("binary", b)),
    st.text(max_size=120).map(lambda t: ("text", t.encode())),
)
close_codes = st.one_of(
    st.integers(995, 1020), st.integers(2995, 3005), st.integers(4995, 5005), st.integers(0, 65535)
)
close_payloads = st.one_of(
    st.just(b""),
    st.binary(min_size=1, max_size=1),
    st.tuples(
        close_codes, st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=10))
    ).map(lambda cr: struct.pack("!H", cr[0]) + cr[1]),
)


@st.composite
def streams(draw: st.DrawFn, masked: bool) -> bytes:
    """Messages in fragments, pings and pongs between them, maybe a close and frames after
    it; mostly well-formed, with now and then a frame that breaks a rule."""
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
                size = draw(st.sampled_from([0, 1, 125, 126]))
                wire += frame(
                    control, b"c" * size, fin=draw(st.booleans()) or size != 1, masked=masked
                )
    if draw(st.booleans()):
        wire += frame(0x8, draw(close_payloads), masked=masked)
        wire += frame(0x2, b"after the close", masked=masked)
    return wire


@settings(max_examples=400)
@given(
    data=st.data(),
    server=st.booleans(),
    borrowed=st.booleans(),
    max_frames=st.sampled_from([1, 2, 3, MAX_BATCH_FRAMES]),
)
def test_same_events_and_decisions_as_wsproto_on_random_frames(
    data: st.DataObject, server: bool, borrowed: bool, max_frames: int
) -> None:
    wire = data.draw(streams(masked=server))
    cuts = data.draw(st.lists(st.integers(min_value=0), max_size=8))
    reads = split(wire, cuts)
    ours, theirs = run_both(reads, server=server, borrowed=borrowed, max_frames=max_frames)
    assert_same_decisions(ours, theirs)
    # Chunking equivalence: all at once, the same events (joined per frame).
    whole, _ = run_both([wire], server=server)
    assert joined(ours) == joined(whole)


@settings(max_examples=400)
@given(
    wire=st.binary(max_size=200),
    cuts=st.lists(st.integers(min_value=0), max_size=5),
    server=st.booleans(),
    borrowed=st.booleans(),
)
def test_same_events_and_decisions_as_wsproto_on_any_bytes(
    wire: bytes, cuts: list[int], server: bool, borrowed: bool
) -> None:
    ours, theirs = run_both(split(wire, cuts), server=server, borrowed=borrowed)
    assert_same_decisions(ours, theirs)


def joined(events: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """Described events with the pieces of each data frame joined into one."""
    out: list[tuple[object, ...]] = []
    for event in events:
        previous = out[-1] if out else None
        if (
            previous is not None
            and previous[0] == event[0]
            and event[0] in ("BytesMessage", "TextMessage")
            and previous[2] is False
        ):
            out[-1] = (event[0], previous[1] + event[1], event[2], event[3])  # type: ignore[operator]
        else:
            out.append(event)
    return out


@settings(max_examples=300)
@given(
    code=st.one_of(st.sampled_from([*range(995, 1021), 2999, 3000, 4999, 5000]), close_codes),
    reason=st.one_of(st.text(max_size=40).map(str.encode), st.binary(max_size=10)),
    server=st.booleans(),
)
def test_same_decision_on_a_close_as_wsproto(code: int, reason: bytes, server: bool) -> None:
    wire = frame(0x8, struct.pack("!H", code) + reason, masked=server)
    ours, theirs = run_both([wire], server=server)
    assert_same_decisions(ours, theirs)


def test_wsproto_is_not_on_the_runtime_path() -> None:
    """The hub, the clients and the CLI import no other WebSocket protocol library (wsproto
    is the tests' reference only)."""
    code = (
        "import sys, devstream_trio, devstream_trio.server.hub, devstream_trio.cli, "
        "devstream_trio.client.proxy, devstream_trio.client.framed; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'wsproto'))"
    )
    src = str(Path(devstream_core.__file__).resolve().parent.parent)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("server", [True, False])
def test_a_batch_of_whole_messages_one_frame_each(server: bool) -> None:
    conn = Connection(client=not server)
    messages = [[b"a", b"b"], [memoryview(b"x" * 70000)], [b""]]
    keys = b"" if server else b"k1k2k3k4k5k6"
    wire = b"".join(conn.send_messages(messages, mask_keys=keys))
    assert wsproto_reads(wire, server=server) == [
        ("BytesMessage", b"ab", True, True),
        ("BytesMessage", b"x" * 70000, True, True),
        ("BytesMessage", b"", True, True),
    ]
    with pytest.raises(LocalProtocolError):
        conn.send_messages(messages, mask_keys=keys[:-1] if keys else b"k1k2")
    assert conn.send_messages([], mask_keys=b"") == []
