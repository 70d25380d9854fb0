"""Fuzz the client's reading of a ``101``: it reads the head as h11 does, or leaves it to h11.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_http_response.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_http_response.py --iterations 100000 [--seed 0]

An input is the bytes a hub answers a WebSocket upgrade with. The client's
``_http._parse_101`` reads the head (everything before the first ``\\r\\n\\r\\n``) or returns
``None`` to hand the answer to h11; whenever it reads a head, h11 must read the same answer
as a ``101`` with the same header fields, and the WebSocket bytes after the head must be the
same for both. Any exception from ``_parse_101`` is a crash, and so is a disagreement: the
input's ``repr`` is printed and the exit status is 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
import h11
from _harness import Crash as Crash

from devstream_trio._http import _BLANK_LINE, _parse_101

SEEDS: list[bytes] = [
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n\x82\x02hi",
    b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-protocol: devstream.v1\r\n"
    b"devstream-resume-token: r1.abc.service.AAAA.sig\r\nX-Empty:\r\n\r\n",
    b"HTTP/1.1 101\r\nA:b\r\nB: \t c d \t\r\n\r\n",
    b"HTTP/1.1 101 \xe9t\xe9\r\nX: caf\xc3\xa9\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.0 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\nX-Fold: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\n\r\n",
    b"HTTP/1.1 101 Switching\r\nBad Name: v\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\n: v\r\n\r\n",
]

# Fragments the mutator splices in, so the loop reaches deeper than random bytes would.
_TOKENS: list[bytes] = [
    b"\r\n",
    b"\r\n\r\n",
    b"\n",
    b"\r",
    b":",
    b" ",
    b"\t",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"HTTP/1.1 101",
    b"HTTP/1.1 101 ",
    b"upgrade: websocket",
    b"content-length: 0",
    b"transfer-encoding: chunked",
]


#: How many inputs the client read itself (a run that never gets here tests nothing).
ACCEPTED = [0]


def _h11_reads(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    """The header fields and trailing bytes h11 reads from *data* as the answer to an
    upgrade, or None if it reads no 101 there."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(
        h11.Request(
            method="GET",
            target="/",
            headers=[("host", "h"), ("upgrade", "websocket"), ("connection", "Upgrade")],
        )
    )
    conn.send(h11.EndOfMessage())
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.InformationalResponse) or event.status_code != 101:
        return None
    return [(bytes(k), bytes(v)) for k, v in event.headers], bytes(conn.trailing_data[0])


def check(data: bytes) -> None:
    """One fuzz case: where ``_parse_101`` reads a head, h11 must read the same."""
    _parse_101(data)  # must not raise on any bytes
    blank = _BLANK_LINE.search(data)
    if blank is None or blank[0] != b"\n\r\n" or data[blank.start() - 1 : blank.start()] != b"\r":
        return  # as the client does: no head yet, or one that h11 reads
    end = blank.start() - 1
    ours = _parse_101(data[:end])
    if ours is None:
        return
    ACCEPTED[0] += 1
    theirs = _h11_reads(data)
    if theirs is None:
        raise AssertionError("the client read a 101 that h11 refuses")
    if theirs != (ours, data[end + 4 :]):
        raise AssertionError(f"the client read {ours!r}; h11 read {theirs!r}")


_ABOUT = "fuzz the client's reading of a 101 against h11"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
