"""Fuzz devstream.v1 frames: every input decodes, or is refused with RemoteProtocolError.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_frames.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_frames.py --iterations 100000 [--seed 0]

Each input goes through a ``FrameDecoder`` (whole, byte by byte, and in pieces whose size the
input picks; with the default cap and a small one), and into ``StreamEndpoint.receive_data`` of
endpoints in a few states (fresh, sending with its EOF out, receiving, resuming). Any exception
other than ``RemoteProtocolError`` is a crash, and so is a disagreement or a broken invariant:
every split gives the same frames or the same error code; the decoded frames re-encode to
exactly the bytes they came from; an endpoint that took the input keeps ``unacked <= window``
and its receive buffer within the window, and still answers ``data_to_send`` and ``read``. On a
crash the input's ``repr`` is printed and the exit status is 1. ``receive_data`` takes a
whole in-order Data frame by a short path: each endpoint's twin takes the same input by the
general path only, and the two must agree on the result, the state and what they send.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash

from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.framing import (
    MAX_FRAME_SIZE,
    Ack,
    Data,
    EndpointState,
    Eof,
    Frame,
    FrameDecoder,
    Reset,
    Resume,
    StreamEndpoint,
    encode_frame,
)


def _wire(*frames: Frame) -> bytes:
    return b"".join(encode_frame(frame) for frame in frames)


SEEDS: list[bytes] = [
    _wire(Data(offset=0, payload=b"hello"), Ack(offset=3)),
    _wire(Data(offset=0, payload=b"abc"), Eof(offset=3)),
    _wire(Data(offset=0, payload=b"abcdef"), Data(offset=3, payload=b"defgh"), Eof(offset=8)),
    _wire(Data(offset=5, payload=b"gap")),
    _wire(Ack(offset=40), Ack(offset=101)),
    _wire(Ack(offset=2**64 - 1)),
    _wire(Eof(offset=0)),
    _wire(Reset(code=410901, reason="the stream was reset"), Data(offset=0, payload=b"x")),
    _wire(Reset(code=504902, reason="é" * 61)),
    _wire(Resume(received=0, reply=True), Ack(offset=0)),
    _wire(Resume(received=101, reply=False), Ack(offset=101)),
    _wire(Resume(received=50, reply=True), Data(offset=0, payload=b"z" * 40)),
    _wire(Data(offset=0, payload=b"w" * 300)),
    b"\x01\x00\x00\x00\x08" + bytes(8),
    b"\x04\x00\x00\x00\x06\x00\x00\x00\x01\xc3\x28",
    b"\x05\x00\x00\x00\x09" + bytes(8) + b"\x03",
    b"\x06\x00\x00\x00\x00",
    b"\x01\xff\xff\xff\xff",
    b"\x02\x00\x00",
    b"",
]

# Fragments the mutator splices in: headers of every type and interesting u64 values.
_TOKENS: list[bytes] = [
    b"\x01\x00\x00\x00\x09",
    b"\x01\x00\x00\x00\x10",
    b"\x02\x00\x00\x00\x08",
    b"\x03\x00\x00\x00\x08",
    b"\x04\x00\x00\x00\x04",
    b"\x04\x00\x00\x00\x7f",
    b"\x05\x00\x00\x00\x09",
    bytes(8),
    b"\xff" * 8,
    (3).to_bytes(8, "big"),
    (64).to_bytes(8, "big"),
    (101).to_bytes(8, "big"),
    (102).to_bytes(8, "big"),
    b"\x00\x01\x00\x10",
    b"\x01",
    b"\xc3",
    b"\xed\xa0\x80",
]

_SMALL_CAP = 24
_WINDOW = 64


def _decode(data: bytes, chunk: int, cap: int) -> tuple[list[Frame], int] | ErrorCode:
    """The frames and leftover bytes of *data* fed in *chunk*-byte pieces, or the error code."""
    decoder = FrameDecoder(cap)
    frames: list[Frame] = []
    try:
        for start in range(0, len(data), chunk):
            frames += decoder.feed(data[start : start + chunk])
            if decoder.buffered > 5 + cap:
                raise AssertionError(f"decoder holds {decoder.buffered} bytes, cap {cap}")
    except RemoteProtocolError as exc:
        if not decoder.poisoned:
            raise AssertionError("an error did not poison the decoder") from None
        return exc.code
    return frames, decoder.buffered


def _fresh() -> StreamEndpoint:
    endpoint = StreamEndpoint(window=_WINDOW, max_payload=16)
    endpoint.connection_made(resumed=False)
    return endpoint


def _sending() -> StreamEndpoint:
    endpoint = _fresh()
    endpoint.write(b"s" * 60)
    endpoint.data_to_send()
    endpoint.receive_data(encode_frame(Ack(offset=40)))
    endpoint.write(b"t" * 40)
    endpoint.write_eof()
    endpoint.data_to_send()
    return endpoint


def _receiving() -> StreamEndpoint:
    endpoint = _fresh()
    endpoint.receive_data(encode_frame(Data(offset=0, payload=b"r" * 10)))
    endpoint.read(4)
    return endpoint


def _resuming() -> StreamEndpoint:
    endpoint = _sending()
    endpoint.connection_lost()
    endpoint.connection_made(resumed=True)
    return endpoint


_ENDPOINTS: list[Callable[[], StreamEndpoint]] = [_fresh, _sending, _receiving, _resuming]


def _check_endpoint(endpoint: StreamEndpoint, data: bytes) -> None:
    try:
        events = endpoint.receive_data(data)
    except RemoteProtocolError:
        if endpoint.state is EndpointState.OPEN:
            raise AssertionError("a protocol error left the stream open") from None
        endpoint.data_to_send()
        return
    if not isinstance(events, list):
        raise AssertionError(f"receive_data returned {events!r}")
    if endpoint.unacked > endpoint.window:
        raise AssertionError("more than a window unacknowledged")
    if endpoint.received - endpoint.consumed > endpoint.window:
        raise AssertionError("more than a window buffered")
    endpoint.data_to_send()
    if endpoint.state is not EndpointState.RESET:
        endpoint.read()
        endpoint.data_to_send()


def _outcome(endpoint: StreamEndpoint, receive: Callable[[bytes], object], data: bytes) -> object:
    """What taking *data* gives: the events or the error code, then the endpoint's state and
    what it sends and reads."""
    try:
        result: object = receive(data)
    except RemoteProtocolError as exc:
        result = exc.code
    after = (endpoint.state, endpoint.received, endpoint.consumed, endpoint.data_to_send())
    read = endpoint.read() if endpoint.state is not EndpointState.RESET else None
    return result, after, read, endpoint.data_to_send()


def _check_short_path(make: Callable[[], StreamEndpoint], data: bytes) -> None:
    short, general = make(), make()
    got = _outcome(short, short.receive_data, data)
    expected = _outcome(general, general._receive_frames, data)
    if got != expected:
        raise AssertionError(f"the short path gave {got!r}, the general one {expected!r}")


def check(data: bytes) -> None:
    """One fuzz case; anything but RemoteProtocolError, or any disagreement, is a crash."""
    for cap in (MAX_FRAME_SIZE, _SMALL_CAP):
        whole = _decode(data, max(len(data), 1), cap)
        chunk = 1 + (data[0] % 13 if data else 0)
        for size in (1, chunk):
            pieces = _decode(data, size, cap)
            if pieces != whole:
                raise AssertionError(f"whole gave {whole!r}, {size}-byte pieces {pieces!r}")
        if not isinstance(whole, ErrorCode):
            frames, leftover = whole
            again = b"".join(encode_frame(frame) for frame in frames)
            if again != data[: len(data) - leftover]:
                raise AssertionError(f"frames {frames!r} re-encode differently")
    for make in _ENDPOINTS:
        _check_endpoint(make(), data)
        _check_short_path(make, data)


_ABOUT = "fuzz devstream.v1 frame decoding and StreamEndpoint.receive_data"


def run_fallback(iterations: int, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
