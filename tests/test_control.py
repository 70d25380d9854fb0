"""Tests of the control channel: codec, assembler, and both state machines from both sides.

Rules of this module: no I/O, no clock; a device and a hub machine are wired to each other by
handing one the exact text the other produced.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstream_core.control import (
    DEVICE_RECEIVE_TRANSITIONS,
    DEVICE_SEND_TRANSITIONS,
    HUB_RECEIVE_TRANSITIONS,
    HUB_SEND_TRANSITIONS,
    MAX_CONTROL_MESSAGE_FRAGMENTS,
    MAX_CONTROL_MESSAGE_SIZE,
    MAX_ERROR_MESSAGE_LENGTH,
    MAX_FORGOTTEN_REQUESTS,
    MAX_OUTSTANDING_REQUESTS,
    MAX_PENDING_REQUESTS,
    MAX_REASON_LENGTH,
    MAX_REGISTERED_NAMES,
    MAX_REQUEST_ID_LENGTH,
    MAX_TOKEN_LENGTH,
    MAX_URL_LENGTH,
    MAX_WINDOW,
    MODE_FRAMED,
    ControlMessage,
    ControlState,
    DeviceControl,
    ErrorMessage,
    HubControl,
    MessageAssembler,
    Register,
    Registered,
    StreamRequest,
    StreamResponse,
    decode_message,
    encode_message,
    is_valid_stream_name,
)
from devstream_core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
VISIBLE_CHARS = "".join(chr(c) for c in range(0x21, 0x7F))

names_st = st.text(NAME_CHARS, min_size=1, max_size=64)
name_lists_st = st.lists(names_st | st.just("*"), min_size=1, max_size=64, unique=True).map(tuple)
request_ids_st = st.text(VISIBLE_CHARS, min_size=1, max_size=128)
# Any character that UTF-8 can carry (no lone surrogates).
utf8_chars = st.characters(codec="utf-8")

register_st = st.builds(Register, names=name_lists_st)
registered_st = st.builds(Registered, names=name_lists_st)
stream_request_st = st.builds(
    StreamRequest,
    request_id=request_ids_st,
    name=names_st,
    url=st.sampled_from(["ws://", "wss://"]).flatmap(
        lambda scheme: st.text(VISIBLE_CHARS, max_size=200).map(lambda rest: scheme + rest)
    ),
    token=st.text(VISIBLE_CHARS, min_size=1, max_size=300),
    mode=names_st,
)
stream_response_st = st.builds(
    StreamResponse,
    request_id=request_ids_st,
    accepted=st.booleans(),
    reason=st.text(utf8_chars, max_size=256),
)
error_message_st = st.builds(
    ErrorMessage,
    code=st.integers(100000, 999999),
    message=st.text(utf8_chars, max_size=1024),
)
messages_st = st.one_of(
    register_st, registered_st, stream_request_st, stream_response_st, error_message_st
)

TOKEN = "SECRET-stream-token-value"


def request(request_id: str = "r1", name: str = "ssh") -> StreamRequest:
    return StreamRequest(
        request_id=request_id, name=name, url="wss://hub.example.com/bridges/s1", token=TOKEN
    )


# --------------------------------------------------------------------------------------------
# Messages and codec
# --------------------------------------------------------------------------------------------


@settings(max_examples=300)
@given(messages_st)
def test_every_message_round_trips(msg: ControlMessage) -> None:
    text = encode_message(msg)
    assert decode_message(text) == msg
    assert decode_message(text.encode("utf-8")) == msg
    # Compact JSON: no whitespace between tokens.
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)


@pytest.mark.parametrize(
    ("msg", "expected"),
    [
        (Register(names=("ssh", "*")), {"type": "register", "names": ["ssh", "*"]}),
        (Registered(names=("ssh",)), {"type": "registered", "names": ["ssh"]}),
        (
            StreamRequest(request_id="r1", name="ssh", url="wss://h/b", token="t", mode="raw"),
            {
                "type": "streamRequest",
                "requestId": "r1",
                "name": "ssh",
                "url": "wss://h/b",
                "authorizationToken": "t",
                "mode": "raw",
            },
        ),
        (
            StreamResponse(request_id="r1", accepted=False, reason="busy"),
            {"type": "streamResponse", "requestId": "r1", "accepted": False, "reason": "busy"},
        ),
        (
            ErrorMessage(code=404103, message="gone"),
            {"type": "error", "errorCode": 404103, "message": "gone"},
        ),
    ],
)
def test_wire_shape(msg: ControlMessage, expected: dict[str, object]) -> None:
    text = encode_message(msg)
    assert json.loads(text) == expected
    assert ", " not in text and ": " not in text


def test_stream_request_repr_hides_token() -> None:
    req = request()
    assert TOKEN not in repr(req)
    assert "<hidden>" in repr(req)
    assert "r1" in repr(req)


@pytest.mark.parametrize(
    ("names", "key"),
    [(["ssh", "*"], "ssh"), (["echo", "*"], "*"), (["echo"], None), ({"ssh": 1}, "ssh")],
)
def test_handler_key_prefers_the_name_then_the_wildcard(names: object, key: str | None) -> None:
    assert request(name="ssh").handler_key(names) == key  # type: ignore[arg-type]


def test_an_unhandled_request_is_rejected_with_its_name() -> None:
    response = request(name="ssh").unhandled()
    assert response == StreamResponse(
        request_id="r1", accepted=False, reason="no handler for stream name 'ssh'"
    )


def test_defaults_when_optional_members_are_absent() -> None:
    msg = decode_message(
        '{"type":"streamRequest","requestId":"r","name":"n","url":"ws://h/","authorizationToken":"t"}'
    )
    assert isinstance(msg, StreamRequest)
    assert msg.mode == "raw"
    resp = decode_message('{"type":"streamResponse","requestId":"r","accepted":true}')
    assert resp == StreamResponse(request_id="r", accepted=True, reason="")


def test_unknown_members_are_ignored() -> None:
    msg = decode_message('{"type":"register","names":["a"],"future":{"x":[1,2]}}')
    assert msg == Register(names=("a",))


def test_helpers() -> None:
    req = request()
    assert req.accept() == StreamResponse(request_id="r1", accepted=True)
    assert req.reject("no") == StreamResponse(request_id="r1", accepted=False, reason="no")
    err = ErrorMessage.from_code(ErrorCode.DEVICE_NOT_ONLINE)
    assert err.code == 404103 and type(err.code) is int
    assert err.message == ErrorCode.DEVICE_NOT_ONLINE.message
    assert err.error_code is ErrorCode.DEVICE_NOT_ONLINE
    assert ErrorMessage(code=999999, message="").error_code is None
    assert is_valid_stream_name("*", allow_wildcard=True)
    assert not is_valid_stream_name("*")
    assert not is_valid_stream_name(5)


@pytest.mark.parametrize(
    "build",
    [
        lambda: Register(names=()),
        lambda: Register(names=["ssh"]),  # type: ignore[arg-type]
        lambda: Register(names=("a b",)),
        lambda: Register(names=("x" * 65,)),
        lambda: Register(names=("ssh", "ssh")),
        lambda: Register(names=tuple(f"n{i}" for i in range(65))),
        lambda: Registered(names=("**",)),
        lambda: StreamRequest(request_id="", name="ssh", url="wss://h", token="t"),
        lambda: StreamRequest(request_id="a b", name="ssh", url="wss://h", token="t"),
        lambda: StreamRequest(request_id="r", name="*", url="wss://h", token="t"),
        lambda: StreamRequest(request_id="r", name="ssh", url="https://h", token="t"),
        lambda: StreamRequest(request_id="r", name="ssh", url="wss://h", token=""),
        lambda: StreamRequest(request_id="r", name="ssh", url="wss://h", token="a\nb"),
        lambda: StreamRequest(request_id="r", name="ssh", url="wss://h", token="t", mode=""),
        lambda: StreamResponse(request_id="r", accepted=1),  # type: ignore[arg-type]
        lambda: StreamResponse(request_id="r", accepted=True, reason="x" * 257),
        lambda: StreamResponse(request_id="r", accepted=True, reason="\ud800"),
        lambda: ErrorMessage(code=True, message=""),
        lambda: ErrorMessage(code=99999, message=""),
        lambda: ErrorMessage(code=1000000, message=""),
        lambda: ErrorMessage(code=400904, message="x" * 1025),
    ],
)
def test_invalid_messages_cannot_be_built(build: Callable[[], object]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        build()
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_token_never_in_validation_errors() -> None:
    with pytest.raises(LocalProtocolError) as info:
        StreamRequest(request_id="r", name="ssh", url="wss://h", token=TOKEN + " ")
    assert TOKEN not in str(info.value)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(LocalProtocolError) as info:
        encode_message("hello")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


@pytest.mark.parametrize(
    ("data", "code"),
    [
        # Not UTF-8, not JSON, not an object.
        (b"\xff", ErrorCode.INVALID_JSON),
        (b'{"type":"register","names":["\xc3"]}', ErrorCode.INVALID_JSON),
        ("{\ud800}", ErrorCode.INVALID_JSON),
        ("", ErrorCode.INVALID_JSON),
        ("{", ErrorCode.INVALID_JSON),
        ("[]", ErrorCode.INVALID_JSON),
        ('"register"', ErrorCode.INVALID_JSON),
        ("null", ErrorCode.INVALID_JSON),
        ('{"type":"error","errorCode":NaN,"message":""}', ErrorCode.INVALID_JSON),
        ('{"type":"error","errorCode":Infinity,"message":""}', ErrorCode.INVALID_JSON),
        ('{"type":"register","type":"register","names":["a"]}', ErrorCode.INVALID_JSON),
        ("[" * 50000, ErrorCode.INVALID_JSON),
        ('{"type":"error","errorCode":' + "1" * 5000 + ',"message":""}', ErrorCode.INVALID_JSON),
        # Unknown type, missing or wrong-typed members.
        ("{}", ErrorCode.PROTOCOL_ERROR),
        ('{"type":1}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"Register","names":["a"]}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"register"}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"register","names":"ssh"}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"register","names":[1]}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"register","names":[]}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"register","names":["a b"]}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"register","names":["\\ud800"]}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"registered","names":null}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"streamResponse","requestId":"r","accepted":1}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"streamResponse","requestId":"r","accepted":"true"}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"streamResponse","requestId":5,"accepted":true}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"streamResponse","accepted":true}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"streamResponse","requestId":"r","accepted":true,"reason":null}', 400904),
        ('{"type":"error","errorCode":true,"message":""}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"error","errorCode":400904.0,"message":""}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"error","errorCode":400904}', ErrorCode.PROTOCOL_ERROR),
        ('{"type":"error","errorCode":12,"message":""}', ErrorCode.PROTOCOL_ERROR),
        (
            '{"type":"streamRequest","requestId":"r","name":"*","url":"ws://h/",'
            '"authorizationToken":"t"}',
            ErrorCode.PROTOCOL_ERROR,
        ),
        (
            '{"type":"streamRequest","requestId":"r","name":"n","url":"ws://h/"}',
            ErrorCode.PROTOCOL_ERROR,
        ),
        (
            '{"type":"streamRequest","requestId":"r","name":"n","url":"ws://h/",'
            '"authorizationToken":"t","mode":7}',
            ErrorCode.PROTOCOL_ERROR,
        ),
    ],
)
def test_decode_errors(data: str | bytes, code: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(data)
    assert info.value.code == code


def test_size_limit_is_checked_before_parsing() -> None:
    # Garbage that is too big is reported as too big, not as bad JSON.
    for data in ("x" * (MAX_CONTROL_MESSAGE_SIZE + 1), b"\xff" * (MAX_CONTROL_MESSAGE_SIZE + 1)):
        with pytest.raises(RemoteProtocolError) as info:
            decode_message(data)
        assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_size_limit_counts_utf8_bytes() -> None:
    msg = StreamResponse(request_id="r", accepted=False, reason="\u00e9" * 40)
    text = encode_message(msg)
    size = len(text.encode("utf-8"))
    assert size > len(text)
    assert decode_message(text, max_size=size) == msg
    for data in (text, text.encode("utf-8")):
        with pytest.raises(RemoteProtocolError) as info:
            decode_message(data, max_size=size - 1)
        assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


@settings(max_examples=300)
@given(st.text() | st.binary())
def test_decode_returns_or_raises_remote_protocol_error(data: str | bytes) -> None:
    try:
        msg = decode_message(data)
    except RemoteProtocolError as exc:
        assert exc.code in {
            ErrorCode.INVALID_JSON,
            ErrorCode.PROTOCOL_ERROR,
            ErrorCode.PAYLOAD_TOO_LARGE,
        }
    else:
        assert decode_message(encode_message(msg)) == msg


@settings(max_examples=100)
@given(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["register", "registered", "streamRequest", "error"])},
        optional={
            "names": st.lists(st.text(max_size=3) | st.integers(), max_size=3),
            "requestId": st.text(max_size=3) | st.none(),
            "name": st.text(max_size=3),
            "url": st.text(max_size=8),
            "authorizationToken": st.text(max_size=3) | st.booleans(),
            "errorCode": st.integers() | st.floats(allow_nan=False, allow_infinity=False),
            "message": st.text(max_size=3),
        },
    )
)
def test_decode_of_json_objects_returns_or_raises_protocol_error(obj: dict[str, object]) -> None:
    try:
        decode_message(json.dumps(obj))
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.PROTOCOL_ERROR


# --------------------------------------------------------------------------------------------
# Assembler: chunking equivalence and bounded memory
# --------------------------------------------------------------------------------------------


def feed_all(assembler: MessageAssembler, pieces: list[str] | list[bytes]) -> ControlMessage:
    for piece in pieces[:-1]:
        assert assembler.feed(piece, message_finished=False) is None
    msg = assembler.feed(pieces[-1], message_finished=True)
    assert msg is not None
    return msg


@settings(max_examples=100)
@given(messages_st)
def test_chunking_equivalence(msg: ControlMessage) -> None:
    text = encode_message(msg)
    raw = text.encode("utf-8")
    assembler = MessageAssembler()
    whole = feed_all(assembler, [text])
    assert whole == msg
    assert feed_all(assembler, list(text)) == whole
    assert feed_all(assembler, [raw[i : i + 1] for i in range(len(raw))]) == whole
    assert assembler.buffered == 0


@settings(max_examples=100)
@given(messages_st, st.data())
def test_chunking_at_random_cuts(msg: ControlMessage, data: st.DataObject) -> None:
    raw = encode_message(msg).encode("utf-8")
    cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    bounds = [0, *cuts, len(raw)]
    pieces = [raw[a:b] for a, b in itertools.pairwise(bounds)]
    assert feed_all(MessageAssembler(), pieces) == msg


def test_assembler_reuses_across_messages() -> None:
    assembler = MessageAssembler()
    first = encode_message(Register(names=("a",)))
    second = encode_message(Registered(names=("b",)))
    assert feed_all(assembler, [first[:5], first[5:]]) == Register(names=("a",))
    assert feed_all(assembler, [second]) == Registered(names=("b",))


@pytest.mark.parametrize("as_bytes", [False, True])
def test_oversize_detected_while_fragments_arrive(as_bytes: bool) -> None:
    assembler = MessageAssembler(max_size=100)
    piece: str | bytes = b"x" * 30 if as_bytes else "x" * 30
    for _ in range(3):
        assert assembler.feed(piece, message_finished=False) is None
    assert assembler.buffered == 90
    with pytest.raises(RemoteProtocolError) as info:
        assembler.feed(piece, message_finished=False)  # 120 > 100, before the message ends
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert assembler.buffered == 0


def test_oversize_counts_utf8_bytes_of_text_fragments() -> None:
    assembler = MessageAssembler(max_size=10)
    assert assembler.feed("\u00e9" * 5, message_finished=False) is None
    assert assembler.buffered == 10
    with pytest.raises(RemoteProtocolError) as info:
        assembler.feed("a", message_finished=False)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


def test_default_limit_is_64_kib() -> None:
    assert MAX_CONTROL_MESSAGE_SIZE == 64 * 1024
    assembler = MessageAssembler()
    assembler.feed(b" " * MAX_CONTROL_MESSAGE_SIZE, message_finished=False)
    with pytest.raises(RemoteProtocolError) as info:
        assembler.feed(b" ", message_finished=False)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


@pytest.mark.parametrize("empty", [b"", ""], ids=["bytes", "text"])
def test_fragments_are_counted_empty_ones_too(empty: str | bytes) -> None:
    """A message may come in MAX_CONTROL_MESSAGE_FRAGMENTS fragments; once that many came
    without the end, PAYLOAD_TOO_LARGE, whatever their size (the assembler starts afresh)."""
    limit = MAX_CONTROL_MESSAGE_FRAGMENTS
    assembler = MessageAssembler()
    text = encode_message(Register(names=("a",)))
    assert assembler.feed(text, message_finished=False) is None
    for _ in range(limit - 2):
        assert assembler.feed(empty, message_finished=False) is None
    assert assembler.feed(empty, message_finished=True) == Register(names=("a",))
    for _ in range(limit - 1):
        assert assembler.feed(empty, message_finished=False) is None
    with pytest.raises(RemoteProtocolError) as info:
        assembler.feed(empty, message_finished=False)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert info.value.message == f"control message in more than {limit} fragments"
    assert feed_all(assembler, [text]) == Register(names=("a",))


@pytest.mark.parametrize("kind", [bytes, str])
def test_a_frame_fed_in_pieces_is_one_fragment(kind: type) -> None:
    """Frames are counted, not pieces: a MAX_CONTROL_MESSAGE_SIZE message in one frame, fed
    in 16-byte pieces (as the reads of a slow link bring it, far more than
    MAX_CONTROL_MESSAGE_FRAGMENTS of them), is accepted; so is one in MAX_CONTROL_MESSAGE_FRAGMENTS
    frames fed in pieces. One frame more without the end is refused when it ends."""
    limit = MAX_CONTROL_MESSAGE_FRAGMENTS
    text = encode_message(Register(names=("a",)))
    text = text[:-1] + " " * (MAX_CONTROL_MESSAGE_SIZE - len(text)) + "}"
    data = text if kind is str else text.encode()
    pieces = [data[start : start + 16] for start in range(0, len(data), 16)]
    assert len(pieces) > limit
    hub = HubControl()
    for piece in pieces[:-1]:
        assert hub.receive(piece, message_finished=False, frame_finished=False) == []
    assert hub.receive(pieces[-1]) == [Register(names=("a",))]
    assembler = MessageAssembler()
    empty = data[:0]
    # limit - 1 frames without the end, the first in pieces, then a last frame in pieces.
    for piece in pieces[:-1]:
        assert assembler.feed(piece, message_finished=False, frame_finished=False) is None
    assert assembler.feed(pieces[-1], message_finished=False) is None
    for _ in range(limit - 2):
        assert assembler.feed(empty, message_finished=False) is None
    assert assembler.feed(empty, message_finished=False, frame_finished=False) is None
    assert assembler.feed(empty, message_finished=True) == Register(names=("a",))
    # The frame that reaches the bound without the end is refused as it ends, not before.
    for _ in range(limit - 1):
        assert assembler.feed(empty, message_finished=False) is None
    assert assembler.feed(pieces[0], message_finished=False, frame_finished=False) is None
    with pytest.raises(RemoteProtocolError) as info:
        assembler.feed(empty, message_finished=False)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert info.value.message == f"control message in more than {limit} fragments"


def test_a_frame_in_tiny_pieces_keeps_little() -> None:
    """The pieces of a frame are joined as they come, not all kept: a MAX_CONTROL_MESSAGE_SIZE
    message fed in 2-byte pieces never holds much more memory than its bytes."""
    text = encode_message(Register(names=("a",)))
    data = (text[:-1] + " " * (MAX_CONTROL_MESSAGE_SIZE - len(text)) + "}").encode()
    assembler = MessageAssembler()
    tracemalloc.start()
    try:
        for start in range(0, len(data) - 2, 2):
            # A fresh object per piece, as each read brings.
            piece = data[start : start + 2]
            assembler.feed(piece, message_finished=False, frame_finished=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # 32,767 pieces kept would be about 1.5 MB (a bytes object each, and the list).
    assert peak < 6 * MAX_CONTROL_MESSAGE_SIZE
    assert assembler.feed(data[-2:], message_finished=True) == Register(names=("a",))


def test_hub_machine_refuses_a_message_in_too_many_fragments() -> None:
    hub = HubControl()
    for _ in range(MAX_CONTROL_MESSAGE_FRAGMENTS - 1):
        assert hub.receive("", message_finished=False) == []
    with pytest.raises(RemoteProtocolError) as info:
        hub.receive("", message_finished=False)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert hub.state is ControlState.ERROR


def test_assembler_bad_text_fragment() -> None:
    assembler = MessageAssembler()
    with pytest.raises(RemoteProtocolError) as info:
        assembler.feed("\ud800", message_finished=False)
    assert info.value.code is ErrorCode.INVALID_JSON


# --------------------------------------------------------------------------------------------
# State machines, wired to each other
# --------------------------------------------------------------------------------------------


def deliver(text: str, to: DeviceControl | HubControl) -> list[ControlMessage]:
    return to.receive(text)


def registered_pair(names: tuple[str, ...] = ("ssh", "echo")) -> tuple[DeviceControl, HubControl]:
    device, hub = DeviceControl(), HubControl()
    assert deliver(device.send(Register(names=names)), hub) == [Register(names=names)]
    assert (hub.state, device.state) == (ControlState.READY, ControlState.AWAITING_REGISTER)
    assert deliver(hub.send(Registered(names=names)), device) == [Registered(names=names)]
    assert (hub.state, device.state) == (ControlState.READY, ControlState.READY)
    return device, hub


def test_the_device_answers_a_request_by_its_names() -> None:
    device, hub = registered_pair(("ssh", "*"))
    for rid, name in (("r1", "ssh"), ("r2", "http")):
        deliver(hub.send(request(rid, name)), device)
    text, key = device.answer(request("r1", "ssh"), ["ssh", "*"])
    assert key == "ssh"
    assert deliver(text, hub) == [StreamResponse(request_id="r1", accepted=True)]
    text, key = device.answer(request("r2", "http"), ["ssh"])
    assert key is None
    assert deliver(text, hub) == [request("r2", "http").unhandled()]
    assert device.pending_requests == frozenset()


def test_conversation() -> None:
    device, hub = registered_pair()
    assert hub.names == ("ssh", "echo") and device.names == ("ssh", "echo")
    assert hub.accepts("ssh") and not hub.accepts("http")

    for rid in ("r1", "r2"):
        assert deliver(hub.send(request(rid)), device) == [request(rid)]
    assert hub.outstanding_requests == {"r1", "r2"}
    assert device.pending_requests == {"r1", "r2"}

    events = deliver(device.send(request("r2").reject("busy")), hub)
    assert events == [StreamResponse(request_id="r2", accepted=False, reason="busy")]
    events = deliver(device.send(request("r1").accept()), hub)
    assert events == [StreamResponse(request_id="r1", accepted=True)]
    assert hub.outstanding_requests == frozenset() and device.pending_requests == frozenset()

    # The same id may be used again once it is settled.
    assert deliver(hub.send(request("r1")), device) == [request("r1")]

    # The hub ends the conversation.
    err = ErrorMessage.from_code(ErrorCode.SERVICE_UNAVAILABLE)
    assert deliver(hub.send(err), device) == [err]
    assert hub.state is ControlState.CLOSED and device.state is ControlState.CLOSED


def test_device_sends_error() -> None:
    device, hub = registered_pair()
    err = ErrorMessage(code=400904, message="bye")
    assert deliver(device.send(err), hub) == [err]
    assert device.state is ControlState.CLOSED and hub.state is ControlState.CLOSED


def test_re_register() -> None:
    device, hub = registered_pair(("ssh",))
    assert deliver(hub.send(request("r1")), device) == [request("r1")]
    assert deliver(device.send(Register(names=("*",))), hub) == [Register(names=("*",))]
    assert hub.names == ("*",) and hub.accepts("anything")
    # A request crossing the re-registration is fine on both sides.
    assert deliver(hub.send(request("r2", "other")), device) == [request("r2", "other")]
    assert deliver(hub.send(Registered(names=("*",))), device) == [Registered(names=("*",))]
    assert device.names == ("*",)
    assert device.state is ControlState.READY and hub.state is ControlState.READY
    assert device.pending_requests == {"r1", "r2"}


def test_register_twice_before_registered() -> None:
    device, hub = DeviceControl(), HubControl()
    for names in (("a",), ("b",)):
        deliver(device.send(Register(names=names)), hub)
    deliver(hub.send(Registered(names=("a",))), device)
    deliver(hub.send(Registered(names=("b",))), device)
    assert device.names == ("b",) and hub.names == ("b",)
    with pytest.raises(LocalProtocolError):
        hub.send(Registered(names=("b",)))  # nothing left to answer


def test_forget_request_drops_late_response() -> None:
    device, hub = registered_pair()
    deliver(hub.send(request("r1")), device)
    assert hub.forget_request("r1") is True
    assert hub.forget_request("r1") is False  # no longer outstanding
    assert hub.forget_request("never") is False
    assert hub.outstanding_requests == frozenset()
    assert deliver(device.send(request("r1").accept()), hub) == []
    assert hub.state is ControlState.READY
    # A second response to the same id is a protocol error.
    with pytest.raises(RemoteProtocolError) as info:
        hub.receive(encode_message(StreamResponse(request_id="r1", accepted=True)))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_forgotten_ids_cannot_be_reused() -> None:
    device, hub = registered_pair()
    deliver(hub.send(request("r1")), device)
    hub.forget_request("r1")
    with pytest.raises(LocalProtocolError):
        hub.send(request("r1"))
    assert hub.state is ControlState.ERROR


def test_forgotten_ids_are_bounded_oldest_dropped() -> None:
    _device, hub = registered_pair()
    count = MAX_FORGOTTEN_REQUESTS + 1
    for i in range(count):
        hub.send(request(f"r{i}"))
        assert hub.forget_request(f"r{i}")
    # The newest forgotten id is still known: its late response is dropped.
    newest = encode_message(StreamResponse(request_id=f"r{count - 1}", accepted=True))
    assert hub.receive(newest) == []
    # The oldest fell out: its response now looks like one to a request never sent.
    oldest = encode_message(StreamResponse(request_id="r0", accepted=True))
    with pytest.raises(RemoteProtocolError) as info:
        hub.receive(oldest)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_response_to_unknown_request_poisons_hub() -> None:
    _, hub = registered_pair()
    with pytest.raises(RemoteProtocolError) as info:
        hub.receive(encode_message(StreamResponse(request_id="zz", accepted=True)))
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert hub.state is ControlState.ERROR
    with pytest.raises(LocalProtocolError) as later:
        hub.send(request("r9"))
    assert later.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        hub.receive(encode_message(Register(names=("a",))))


def test_device_may_not_answer_unknown_or_twice() -> None:
    device, hub = registered_pair()
    deliver(hub.send(request("r1")), device)
    device.send(request("r1").accept())
    with pytest.raises(LocalProtocolError) as info:
        device.send(request("r1").accept())
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert device.state is ControlState.ERROR
    with pytest.raises(LocalProtocolError):
        device.send(Register(names=("a",)))


def test_duplicate_pending_request_poisons_device() -> None:
    device, hub = registered_pair()
    text = hub.send(request("r1"))
    device.receive(text)
    with pytest.raises(RemoteProtocolError) as info:
        device.receive(text)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        device.receive(encode_message(Registered(names=("a",))))


def test_unsolicited_registered_poisons_device() -> None:
    device, _hub = registered_pair()
    with pytest.raises(RemoteProtocolError):
        device.receive(encode_message(Registered(names=("x",))))
    assert device.state is ControlState.ERROR


def test_hub_may_not_request_before_registered() -> None:
    hub = HubControl()
    hub.receive(encode_message(Register(names=("ssh",))))
    with pytest.raises(LocalProtocolError):
        hub.send(request())
    assert hub.state is ControlState.ERROR


def test_hub_registered_needs_register() -> None:
    with pytest.raises(LocalProtocolError):
        HubControl().send(Registered(names=("a",)))


def test_hub_throttles_without_poisoning() -> None:
    _device, hub = registered_pair()
    for i in range(MAX_OUTSTANDING_REQUESTS):
        hub.send(request(f"r{i}"))
    with pytest.raises(LocalProtocolError) as info:
        hub.send(request("one-too-many"))
    assert info.value.code is ErrorCode.THROTTLED
    assert hub.state is ControlState.READY
    assert len(hub.outstanding_requests) == MAX_OUTSTANDING_REQUESTS
    # Freeing one slot makes room again.
    hub.forget_request("r0")
    hub.send(request("one-more"))
    assert "one-more" in hub.outstanding_requests


def test_device_pending_requests_are_bounded() -> None:
    device, _ = registered_pair()
    for i in range(MAX_PENDING_REQUESTS):
        device.receive(encode_message(request(f"r{i}")))
    with pytest.raises(RemoteProtocolError) as info:
        device.receive(encode_message(request("over")))
    assert info.value.code is ErrorCode.THROTTLED
    assert device.state is ControlState.ERROR


def test_fragments_through_the_machine() -> None:
    device, hub = registered_pair()
    text = hub.send(StreamRequest(request_id="r1", name="ssh", url="ws://h/", token="t"))
    for ch in text[:-1]:
        assert device.receive(ch, message_finished=False) == []
    [msg] = device.receive(text[-1], message_finished=True)
    assert isinstance(msg, StreamRequest) and msg.mode == "raw"
    assert device.pending_requests == {"r1"}


def test_garbage_poisons_with_codec_error() -> None:
    device = DeviceControl()
    with pytest.raises(RemoteProtocolError) as info:
        device.receive("not json")
    assert info.value.code is ErrorCode.INVALID_JSON
    assert device.state is ControlState.ERROR
    hub = HubControl(max_message_size=10)
    with pytest.raises(RemoteProtocolError) as info:
        hub.receive(b"x" * 11, message_finished=False)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert hub.state is ControlState.ERROR


def test_closed_machine_refuses_everything() -> None:
    device, _hub = registered_pair()
    device.send(ErrorMessage(code=400904, message="x"))
    states = [device.state]
    with pytest.raises(LocalProtocolError):
        device.receive(encode_message(request()))
    states.append(device.state)
    with pytest.raises(LocalProtocolError):
        device.send(Register(names=("a",)))
    states.append(device.state)
    assert states == [ControlState.CLOSED, ControlState.ERROR, ControlState.ERROR]


def test_modes_are_carried() -> None:
    device, hub = registered_pair()
    req = StreamRequest(request_id="f", name="ssh", url="wss://h/", token="t", mode=MODE_FRAMED)
    assert deliver(hub.send(req), device) == [req]


# --------------------------------------------------------------------------------------------
# Every (state, message type) pair of every table
# --------------------------------------------------------------------------------------------

MESSAGE_TYPES: list[type[ControlMessage]] = [
    Register,
    Registered,
    StreamRequest,
    StreamResponse,
    ErrorMessage,
]


def sample(kind: type[ControlMessage]) -> ControlMessage:
    """A message of *kind* that satisfies every guard in the machines built below."""
    samples: dict[type[ControlMessage], ControlMessage] = {
        Register: Register(names=("ssh",)),
        Registered: Registered(names=("ssh",)),
        StreamRequest: request("fresh"),
        StreamResponse: StreamResponse(request_id="r1", accepted=True),
        ErrorMessage: ErrorMessage(code=400904, message="bye"),
    }
    return samples[kind]


def device_in(state: ControlState) -> DeviceControl:
    """A device in *state* where every guarded transition of the tables is allowed."""
    device = DeviceControl()
    hub = HubControl()
    deliver(device.send(Register(names=("ssh",))), hub)
    if state is ControlState.AWAITING_REGISTER:
        return device
    deliver(hub.send(Registered(names=("ssh",))), device)
    deliver(hub.send(request("r1")), device)  # pending: StreamResponse(r1) is legal
    device.send(Register(names=("ssh",)))  # unanswered: Registered is legal
    if state is ControlState.CLOSED:
        device.send(ErrorMessage(code=400904, message="x"))
    elif state is ControlState.ERROR:
        with pytest.raises(RemoteProtocolError):
            device.receive("garbage")
    assert device.state is state
    return device


def hub_in(state: ControlState) -> HubControl:
    """A hub in *state* where every guarded transition of the tables is allowed."""
    hub = HubControl()
    if state is ControlState.AWAITING_REGISTER:
        return hub
    hub.receive(encode_message(Register(names=("ssh",))))
    hub.send(Registered(names=("ssh",)))
    hub.receive(encode_message(Register(names=("ssh",))))  # unanswered: Registered is legal
    hub.send(request("r1"))  # outstanding: StreamResponse(r1) is legal
    if state is ControlState.CLOSED:
        hub.send(ErrorMessage(code=400904, message="x"))
    elif state is ControlState.ERROR:
        with pytest.raises(RemoteProtocolError):
            hub.receive("garbage")
    assert hub.state is state
    return hub


MACHINES = {
    "device-send": (device_in, DEVICE_SEND_TRANSITIONS, True),
    "device-receive": (device_in, DEVICE_RECEIVE_TRANSITIONS, False),
    "hub-send": (hub_in, HUB_SEND_TRANSITIONS, True),
    "hub-receive": (hub_in, HUB_RECEIVE_TRANSITIONS, False),
}


@pytest.mark.parametrize("which", sorted(MACHINES))
@pytest.mark.parametrize("state", list(ControlState))
@pytest.mark.parametrize("kind", MESSAGE_TYPES, ids=lambda k: k.__name__)
def test_every_table_pair(which: str, state: ControlState, kind: type[ControlMessage]) -> None:
    build, table, sending = MACHINES[which]
    machine = build(state)
    msg = sample(kind)
    expected = table.get((state, kind))
    try:
        if sending:
            text = machine.send(msg)
            assert decode_message(text) == msg
        else:
            assert machine.receive(encode_message(msg)) == [msg]
    except (LocalProtocolError, RemoteProtocolError) as exc:
        assert expected is None, f"{which} refused a legal {kind.__name__} in {state}"
        assert exc.code is ErrorCode.PROTOCOL_ERROR
        assert machine.state is ControlState.ERROR
        if sending or state in (ControlState.CLOSED, ControlState.ERROR):
            assert isinstance(exc, LocalProtocolError)
        else:
            assert isinstance(exc, RemoteProtocolError)
    else:
        assert expected is not None, f"{which} allowed {kind.__name__} in {state}"
        assert machine.state is expected


def test_tables_spell_out_the_protocol() -> None:
    # Written out independently of the module, so an edit to a table fails here.
    aw, ready, closed = ControlState.AWAITING_REGISTER, ControlState.READY, ControlState.CLOSED
    assert {
        (aw, Register): aw,
        (aw, ErrorMessage): closed,
        (ready, Register): ready,
        (ready, StreamResponse): ready,
        (ready, ErrorMessage): closed,
    } == DEVICE_SEND_TRANSITIONS
    assert {
        (aw, Registered): ready,
        (aw, ErrorMessage): closed,
        (ready, Registered): ready,
        (ready, StreamRequest): ready,
        (ready, ErrorMessage): closed,
    } == DEVICE_RECEIVE_TRANSITIONS
    assert {
        (aw, Register): ready,
        (aw, ErrorMessage): closed,
        (ready, Register): ready,
        (ready, StreamResponse): ready,
        (ready, ErrorMessage): closed,
    } == HUB_RECEIVE_TRANSITIONS
    assert {
        (aw, ErrorMessage): closed,
        (ready, Registered): ready,
        (ready, StreamRequest): ready,
        (ready, ErrorMessage): closed,
    } == HUB_SEND_TRANSITIONS


def test_tables_never_leave_closed_or_error() -> None:
    for table in (
        DEVICE_SEND_TRANSITIONS,
        DEVICE_RECEIVE_TRANSITIONS,
        HUB_SEND_TRANSITIONS,
        HUB_RECEIVE_TRANSITIONS,
    ):
        for state, _ in table:
            assert state not in (ControlState.CLOSED, ControlState.ERROR)
        # Every table lets either side end the conversation from every live state.
        assert table[(ControlState.AWAITING_REGISTER, ErrorMessage)] is ControlState.CLOSED
        assert table[(ControlState.READY, ErrorMessage)] is ControlState.CLOSED


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


def test_fuzz_control_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    fuzz = load_fuzz_module("fuzz_control")
    fuzz.run_fallback(2000, seed=1)

    # The loop does report a crash, with the input that caused it.
    def broken_check(data: bytes) -> None:
        raise ValueError("boom")

    monkeypatch.setattr(fuzz, "check", broken_check)
    with pytest.raises(fuzz.Crash) as info:
        fuzz.run_fallback(1, seed=1)
    assert info.value.data == fuzz.SEEDS[0]
    assert fuzz.main(["--fallback", "--iterations", "1"]) == 1


def test_fuzz_control_main_fallback(capsys: pytest.CaptureFixture[str]) -> None:
    fuzz = load_fuzz_module("fuzz_control")
    assert fuzz.main(["--fallback", "--iterations", "50", "--seed", "3"]) == 0
    assert "ok:" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# Edges of the codec and the machines
# --------------------------------------------------------------------------------------------


def test_a_stream_requests_window_round_trips_and_is_checked() -> None:
    request = StreamRequest(
        request_id="r1", name="ssh", url="wss://h/b", token="t", mode=MODE_FRAMED, window=4096
    )
    text = encode_message(request)
    assert json.loads(text)["window"] == 4096
    assert decode_message(text) == request
    for window in (1023, 64 * 1024 * 1024 + 1, 4096.0, True):
        with pytest.raises(LocalProtocolError) as info:
            StreamRequest(request_id="r", name="ssh", url="wss://h", token="t", window=window)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.PROTOCOL_ERROR
        assert "window" in info.value.message


def test_the_largest_message_of_each_type_fits_the_message_limit() -> None:
    """The field limits keep every message under MAX_CONTROL_MESSAGE_SIZE, with the widest
    characters (4 bytes of UTF-8) and the widest escapes (6 bytes) JSON allows."""
    widest = ["\U0001f600", "\x01"]
    longest: list[ControlMessage] = [
        Register(names=tuple(f"{i:02d}" + "n" * 62 for i in range(MAX_REGISTERED_NAMES))),
        Registered(names=tuple(f"{i:02d}" + "n" * 62 for i in range(MAX_REGISTERED_NAMES))),
        StreamRequest(
            request_id="r" * MAX_REQUEST_ID_LENGTH,
            name="n" * 64,
            url="wss://" + "u" * (MAX_URL_LENGTH - 6),
            token="t" * MAX_TOKEN_LENGTH,
            mode="m" * 64,
            window=MAX_WINDOW,
        ),
    ]
    for char in widest:
        longest.append(
            StreamResponse(
                request_id="r" * MAX_REQUEST_ID_LENGTH,
                accepted=False,
                reason=char * MAX_REASON_LENGTH,
            )
        )
        longest.append(ErrorMessage(code=999999, message=char * MAX_ERROR_MESSAGE_LENGTH))
    for message in longest:
        text = encode_message(message)
        assert len(text.encode("utf-8")) <= MAX_CONTROL_MESSAGE_SIZE // 4
        assert decode_message(text) == message


@pytest.mark.parametrize("machine", [DeviceControl, HubControl])
def test_a_machine_refuses_to_send_what_is_no_control_message(
    machine: Callable[[], DeviceControl | HubControl],
) -> None:
    side = machine()
    with pytest.raises(LocalProtocolError) as info:
        side.send("register")  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        encode_message({"type": "register"})  # type: ignore[arg-type]
