"""Fuzz the WebSocket frame reader against wsproto: same events, same close code.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_ws_frames.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_ws_frames.py --iterations 100000 [--seed 0]

The input's first byte chooses the role (its low bit: server or client), whether the reader
only borrows each read (the next bit: a view of one buffer, scribbled over after each call, as
on a plain socket), and where the rest is cut into reads (its other bits); the rest is what the
peer sent. ``devstream_trio``'s ``FrameReader`` and wsproto's ``Connection`` get the same
reads, the reader in batches of one to three frames (the length of the input picks how
many; what a batch leaves is parsed before the next read). The reader must give the same
events as wsproto, or the same ones and then a close where wsproto is still waiting for the
rest of a header it would refuse; when wsproto ends with a close, the reader ends with the
same close code. Anything else, or any exception, is a crash.
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
from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Event, Ping, Pong, TextMessage

from devstream_trio._frames import FrameReader

_KEY = b"\x11\x22\x33\x44"


def _masked(first: int, payload: bytes) -> bytes:
    masked = bytes(b ^ _KEY[i & 3] for i, b in enumerate(payload))
    return bytes((first, 0x80 | len(payload))) + _KEY + masked


SEEDS: list[bytes] = [
    b"\x00" + _masked(0x82, b"hello"),
    b"\x00" + _masked(0x01, b"z\xc3") + _masked(0x89, b"ping") + _masked(0x80, b"\xbcrich"),
    b"\x01\x82\x05hello\x81\x02ok\x8a\x00",
    b"\x00" + _masked(0x88, struct.pack("!H", 1000) + b"bye") + _masked(0x82, b"after"),
    b"\x01\x82\x7e\x00\x7dxyz",
    b"\x01\x82\x7f\x00\x00\x00\x00\x00\x01\x00\x00abc",
    b"\x00" + _masked(0xC2, b"rsv"),
    b"\x00" + _masked(0x03, b"op"),
    b"\x02\x02\x03ab\x80\x01c",
    # Reads of 64 bytes, borrowed, each holding several frames: batches end inside a read.
    b"\xfe\x02\x02ab\x00\x01c\x00\x00\x80\x00\x89\x01p\x82\x03xyz\x81\x02ok",
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
    b"\xc3\xbc",
    b"\xff",
]


def _describe(events: list[Event]) -> list[tuple[object, ...]]:
    out: list[tuple[object, ...]] = []
    for event in events:
        if isinstance(event, (BytesMessage, TextMessage)):
            data = bytes(event.data) if isinstance(event.data, bytearray) else event.data
            out.append((type(event).__name__, data, event.frame_finished, event.message_finished))
        elif isinstance(event, (Ping, Pong)):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", int(event.code)))
        else:
            raise AssertionError(f"unexpected event {event!r}")
    return out


def check(data: bytes) -> None:
    """One fuzz case (see the module's docstring); a mismatch raises AssertionError."""
    if not data:
        return
    control, wire = data[0], data[1:]
    kind = ConnectionType.SERVER if control & 1 else ConnectionType.CLIENT
    borrowed = bool(control & 2)
    step = (control >> 2) + 1
    reads = [wire[i : i + step] for i in range(0, len(wire), step)]
    # Batches of one to three frames; what a batch leaves is parsed before the next read, as
    # the WebSocket does.
    reader = FrameReader(Connection(kind), max_frames=1 + len(wire) % 3)
    reference = Connection(kind)
    ours: list[Event] = []
    theirs: list[Event] = []
    lent = bytearray(step)
    for chunk in reads:
        if borrowed:
            lent[: len(chunk)] = chunk
            ours.extend(reader.receive(memoryview(lent)[: len(chunk)], borrowed=True))
            lent[:] = b"\xee" * step
        else:
            ours.extend(reader.receive(chunk))
        while reader.holds_more:
            ours.extend(reader.receive(b""))
        if not any(isinstance(e, CloseConnection) for e in theirs):
            reference.receive_data(chunk)
            theirs.extend(reference.events())
    mine, reference_events = _describe(ours), _describe(theirs)
    if mine == reference_events:
        return
    ends_with_close = bool(mine) and mine[-1][0] == "close"
    they_close = bool(reference_events) and reference_events[-1][0] == "close"
    if ends_with_close and not they_close and mine[:-1] == reference_events:
        return
    raise AssertionError(f"reader gave {mine!r}, wsproto gave {reference_events!r}")


_ABOUT = "fuzz the WebSocket frame reader against wsproto"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
