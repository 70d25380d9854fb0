"""Fuzz control-channel messages: every input decodes, or is refused with RemoteProtocolError.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_control.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_control.py --iterations 100000 [--seed 0]

Each input goes through ``decode_message`` (as bytes and, when it is UTF-8, as text), through
a ``MessageAssembler`` in fragments, and into a device and a hub control machine that are
ready for anything. Any exception other than ``RemoteProtocolError`` is a crash, and so is
a disagreement: bytes vs text vs fragments (as many as the assembler takes) must give the
same message or the same error code, one fragment more than it takes must be refused with
``PAYLOAD_TOO_LARGE``,
and a decoded message must survive ``decode_message(encode_message(msg)) == msg``. On a crash
the input's ``repr`` is printed and the exit status is 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash

from devstream_core.control import (
    MAX_CONTROL_MESSAGE_SIZE,
    ControlMessage,
    DeviceControl,
    HubControl,
    MessageAssembler,
    Register,
    Registered,
    StreamRequest,
    decode_message,
    encode_message,
)
from devstream_core.errors import ErrorCode, RemoteProtocolError

SEEDS: list[bytes] = [
    b'{"type":"register","names":["ssh","echo"]}',
    b'{"type":"register","names":["*"]}',
    b'{"type":"registered","names":["ssh"]}',
    b'{"type":"streamRequest","requestId":"r1","name":"ssh",'
    b'"url":"wss://hub.example.com/bridges/abc","authorizationToken":"tok.en","mode":"raw"}',
    b'{"type":"streamRequest","requestId":"r2","name":"ssh",'
    b'"url":"ws://127.0.0.1:8080/bridges/x","authorizationToken":"t"}',
    b'{"type":"streamResponse","requestId":"r1","accepted":true,"reason":""}',
    b'{"type":"streamResponse","requestId":"p1","accepted":false,"reason":"busy \xc3\xa9"}',
    b'{"type":"streamResponse","requestId":"p1","accepted":1}',
    b'{"type":"error","errorCode":404103,"message":"device not online"}',
    b'{"type":"error","errorCode":true,"message":""}',
    b'{"type":"error","errorCode":4e5,"message":""}',
    b'{"type":"register","names":[]}',
    b'{"type":"register","names":["a b"]}',
    b'{"type":"register","names":["ssh","ssh"]}',
    b'{"type":"register","type":"registered","names":["x"]}',
    b'{"type":"nope"}',
    b'{"type":null}',
    b'{"names":["x"]}',
    b'["register"]',
    b'{"type":"error","errorCode":NaN,"message":""}',
    b'{"type":"registered","names":["\\ud800"]}',
    b"\xef\xbb\xbf{}",
    b"\xff\xfe{}",
    b"",
    b"[" * 3000,
    b"1" * 5000,
]

# Fragments the mutator splices in, so the loop reaches deeper than random bytes would.
_TOKENS: list[bytes] = [
    b"{",
    b"}",
    b"[",
    b"]",
    b'"',
    b",",
    b":",
    b"\\u0000",
    b"\\ud83d\\ude00",
    b"true",
    b"null",
    b"-0",
    b"1e999",
    b'"type"',
    b'"register"',
    b'"streamResponse"',
    b'"requestId":"p1"',
    b'"requestId":"r1"',
    b'"*"',
    b"\x00",
    b"\xff",
    b"\xc3",
    b"\xed\xa0\x80",
    b"[" * 100,
]

_SMALL_LIMIT = 64


def _decode(
    data: str | bytes, max_size: int = MAX_CONTROL_MESSAGE_SIZE
) -> ControlMessage | ErrorCode:
    """The message ``decode_message`` returns, or the code of its RemoteProtocolError."""
    try:
        return decode_message(data, max_size=max_size)
    except RemoteProtocolError as exc:
        return exc.code


def _assemble(
    data: bytes, chunk: int, max_size: int, max_fragments: int, *, one_frame: bool = False
) -> ControlMessage | ErrorCode | None:
    """*data* fed in *chunk*-byte fragments, or (*one_frame*) as the pieces of one frame."""
    assembler = MessageAssembler(max_size, max_fragments)
    try:
        for start in range(0, max(len(data), 1), chunk):
            finished = start + chunk >= len(data)
            msg = assembler.feed(
                data[start : start + chunk],
                message_finished=finished,
                frame_finished=finished or not one_frame,
            )
            if finished:
                return msg
    except RemoteProtocolError as exc:
        return exc.code
    raise AssertionError("assembler never finished the message")


def _ready_device() -> DeviceControl:
    device = DeviceControl()
    device.send(Register(names=("*",)))
    device.receive(encode_message(Registered(names=("*",))))
    device.send(Register(names=("ssh",)))
    device.receive(
        encode_message(
            StreamRequest(request_id="p1", name="ssh", url="wss://h/bridges/a", token="t")
        )
    )
    return device


def _ready_hub() -> HubControl:
    hub = HubControl()
    hub.receive(encode_message(Register(names=("*",))))
    hub.send(Registered(names=("*",)))
    hub.send(StreamRequest(request_id="r1", name="ssh", url="wss://h/bridges/a", token="t"))
    hub.send(StreamRequest(request_id="r2", name="ssh", url="wss://h/bridges/b", token="t"))
    hub.forget_request("r2")
    return hub


def check(data: bytes) -> None:
    """One fuzz case; anything but RemoteProtocolError, or any disagreement, is a crash."""
    for max_size in (MAX_CONTROL_MESSAGE_SIZE, _SMALL_LIMIT):
        whole = _decode(data, max_size)
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            pass
        else:
            as_text = _decode(text, max_size)
            if as_text != whole:
                raise AssertionError(f"bytes gave {whole!r}, text gave {as_text!r}")
        chunk = 1 + (data[0] % 7 if data else 0)
        for size in (1, chunk, len(data) or 1):
            count = max(1, -(-len(data) // size))
            pieces = _assemble(data, size, max_size, count)
            if pieces != whole:
                raise AssertionError(f"whole gave {whole!r}, {size}-byte pieces gave {pieces!r}")
            # The same pieces as one frame: one fragment, however many pieces.
            frame = _assemble(data, size, max_size, 1, one_frame=True)
            if frame != whole:
                raise AssertionError(f"whole gave {whole!r}, one frame in pieces gave {frame!r}")
            if count > 1:
                # One fragment more than the assembler takes: refused, whatever the bytes.
                over = _assemble(data, size, max_size, count - 1)
                if over != ErrorCode.PAYLOAD_TOO_LARGE:
                    raise AssertionError(f"{count} fragments past a bound of {count - 1}: {over!r}")
        if not isinstance(whole, ErrorCode):
            again = decode_message(encode_message(whole))
            if again != whole:
                raise AssertionError(f"round trip changed {whole!r} into {again!r}")
    # Text with lone surrogates, as a broken adapter might pass it.
    _decode(data.decode("utf-8", errors="surrogateescape"))
    for machine in (_ready_device(), _ready_hub()):
        try:
            events = machine.receive(data)
        except RemoteProtocolError:
            continue
        if not isinstance(events, list) or len(events) > 1:
            raise AssertionError(f"receive returned {events!r}")


_ABOUT = "fuzz control-channel decoding"


def run_fallback(iterations: int, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
