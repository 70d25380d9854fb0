"""Fuzz the WebSocket codec against wsproto: same events, same close code.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_ws_frames.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_ws_frames.py --iterations 100000 [--seed 0]

The input's first byte chooses the role (its low bit: server or client), whether the codec
only borrows each read (the next bit: a view of one buffer, scribbled over after each call, as
on a plain socket), and where the rest is cut into reads (its other bits); the rest is what the
peer sent. ``devstream_core.websocket.Connection`` (the codec) and wsproto's ``Connection`` get
the same reads, the codec in batches of one to three frames (the length of the input picks
how many; what a batch leaves is parsed before the next read). The codec must give the same
events as wsproto (pings one after another counted as their last, which is all the codec
hands on of such a run), or the same ones and then a close where wsproto is still waiting for the
rest of a header it would refuse; when wsproto ends with a close, the codec ends with the
same close code, except that it takes close code 1014 (registered with IANA after RFC 6455),
which wsproto refuses with 1002 (the codec may then also refuse the close's reason, 1007).
A codec that refused the input says so (``failed``), and one that did not has not. The same
input in one read gives the same decision, and the same frames (their pieces joined) when it
takes the input; refused, the frames before the bad one may differ, as a read may end inside
a text frame whose bad byte comes later. Anything else, or any exception, is a crash.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType
from wsproto.events import CloseConnection as WsprotoClose

from devstream_core.websocket import Connection as Codec

_KEY = b"\x11\x22\x33\x44"


def _masked(first: int, payload: bytes) -> bytes:
    masked = bytes(b ^ _KEY[i & 3] for i, b in enumerate(payload))
    return bytes((first, 0x80 | len(payload))) + _KEY + masked


SEEDS: list[bytes] = [
    b"\x00" + _masked(0x82, b"hello"),
    b"\x00" + _masked(0x01, b"z\xc3") + _masked(0x89, b"ping") + _masked(0x80, b"\xbcrich"),
    b"\x01\x82\x05hello\x81\x02ok\x8a\x00",
    b"\x00" + _masked(0x88, struct.pack("!H", 1000) + b"bye") + _masked(0x82, b"after"),
    b"\x00" + _masked(0x88, struct.pack("!H", 1014) + b"gateway"),
    b"\x00" + _masked(0x8A, b"pong") + _masked(0x88, struct.pack("!H", 1004)),
    b"\x01\x88\x00\x82\x01x",
    b"\x01\x82\x7e\x00\x7dxyz",
    b"\x01\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00abc",
    b"\x00" + _masked(0xC2, b"rsv"),
    b"\x00" + _masked(0x03, b"op"),
    b"\x02\x02\x03ab\x80\x01c",
    # Reads of 64 bytes, borrowed, each holding several frames: batches end inside a read.
    b"\xfe\x02\x02ab\x00\x01c\x00\x00\x80\x00\x89\x01p\x82\x03xyz\x81\x02ok",
    # Pings one after another, split across reads, then data: the codec hands on the last.
    b"\x08"
    + _masked(0x89, b"p1")
    + _masked(0x89, b"p2")
    + _masked(0x89, b"p3")
    + _masked(0x82, b"d"),
    b"\xff"
    + _masked(0x02, b"ab")
    + _masked(0x00, b"")
    + _masked(0x00, b"c")
    + _masked(0x89, b"p")
    + _masked(0x80, b"de")
    + _masked(0x81, b"ok"),
]

# Fragments the mutator splices in: header bytes of every kind.
_TOKENS: list[bytes] = [
    b"\x80",
    b"\x81",
    b"\x82",
    b"\x00",
    b"\x01",
    b"\x02",
    b"\x88",
    b"\x89",
    b"\x8a",
    b"\x7e",
    b"\x7f",
    b"\xfe",
    _KEY,
    b"\x03\xe8",
    b"\x03\xf6",
    b"\x03\xec",
    b"\xc3\xbc",
    b"\xff",
]


def describe(events: Sequence[object]) -> list[tuple[object, ...]]:
    """Events of the codec or of wsproto (the same class names) as comparable tuples."""
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


def _last_pings(events: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """Described events with each run of pings one after another reduced to its last: the
    codec hands on only the last of the pings that follow one another in one call's events
    (the one a pong answers, RFC 6455 §5.5.3); wsproto hands on each. Runs that calls split
    are reduced alike, so both sides compare."""
    out: list[tuple[object, ...]] = []
    for event in events:
        if out and event[0] == "Ping" and out[-1][0] == "Ping":
            out[-1] = event
        else:
            out.append(event)
    return out


def _joined(events: list[tuple[object, ...]]) -> list[tuple[object, ...]]:
    """Described events with the pieces of each data frame joined into one."""
    out: list[tuple[object, ...]] = []
    for event in events:
        last = out[-1] if out else None
        if last is not None and last[0] == event[0] and len(event) == 4 and last[2] is False:
            out[-1] = (event[0], last[1] + event[1], event[2], event[3])  # type: ignore[operator]
        else:
            out.append(event)
    return out


def _codec_reads(
    codec: Codec, reads: Sequence[bytes], *, borrowed: bool, lent_size: int
) -> list[object]:
    events: list[object] = []
    lent = bytearray(lent_size)
    for chunk in reads:
        if borrowed:
            lent[: len(chunk)] = chunk
            events.extend(codec.receive_data(memoryview(lent)[: len(chunk)], borrowed=True))
            lent[:] = b"\xee" * lent_size
        else:
            events.extend(codec.receive_data(chunk))
        while codec.holds_more:
            events.extend(codec.receive_data(b""))
    return events


#: wsproto's reason when it refuses a close code below 3000 it does not know (1014).
_WSPROTO_UNKNOWN_CODE = "CLOSE with unknown reserved code"


def _same_decisions(
    mine: list[tuple[object, ...]], theirs: list[tuple[object, ...]], unknown_code: bool
) -> bool:
    if unknown_code:
        # wsproto refused a code it does not know: the codec refuses the same ones, but takes
        # 1014 (or refuses its reason, when that is not UTF-8).
        return mine[:-1] == theirs[:-1] and mine[-1:] in (
            [("close", 1002)],
            [("close", 1014)],
            [("close", 1007)],
        )
    if mine == theirs:
        return True
    ends_with_close = bool(mine) and mine[-1][0] == "close"
    they_close = bool(theirs) and theirs[-1][0] == "close"
    return ends_with_close and not they_close and mine[:-1] == theirs


def check(data: bytes) -> None:
    """One fuzz case (see the module's docstring); a mismatch raises AssertionError."""
    if not data:
        return
    control, wire = data[0], data[1:]
    server = bool(control & 1)
    kind = ConnectionType.SERVER if server else ConnectionType.CLIENT
    borrowed = bool(control & 2)
    step = (control >> 2) + 1
    reads = [wire[i : i + step] for i in range(0, len(wire), step)]
    # Batches of one to three frames; what a batch leaves is parsed before the next read, as
    # the WebSocket does.
    codec = Codec(client=not server, max_frames=1 + len(wire) % 3)
    ours = _codec_reads(codec, reads, borrowed=borrowed, lent_size=step)
    reference = WsprotoConnection(kind)
    theirs: list[object] = []
    for chunk in reads:
        if any(isinstance(e, WsprotoClose) for e in theirs):
            break
        reference.receive_data(chunk)
        theirs.extend(reference.events())
    mine, reference_events = _last_pings(describe(ours)), _last_pings(describe(theirs))
    last = theirs[-1] if theirs else None
    unknown_code = isinstance(last, WsprotoClose) and last.reason == _WSPROTO_UNKNOWN_CODE
    if not _same_decisions(mine, reference_events, unknown_code):
        raise AssertionError(f"codec gave {mine!r}, wsproto gave {reference_events!r}")
    refused = bool(mine) and mine[-1][0] == "close" and codec.state.value == "open"
    if codec.failed != refused:
        raise AssertionError(f"failed is {codec.failed} after {mine!r}")
    whole = Codec(client=not server)
    at_once = _last_pings(describe(_codec_reads(whole, [wire], borrowed=False, lent_size=0)))
    if whole.failed != codec.failed or (at_once[-1:] if whole.failed else _joined(at_once)) != (
        mine[-1:] if codec.failed else _joined(mine)
    ):
        raise AssertionError(f"in one read {at_once!r}, in reads of {step}: {mine!r}")


_ABOUT = "fuzz the WebSocket codec against wsproto"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
