"""Fuzz the hub's reading of a plain upgrade request: it reads it as h11 does, or leaves it.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_http_request.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_http_request.py --iterations 100000 [--seed 0]

An input is the first bytes a client sends on a connection to the hub. The hub's
``_http._parse_upgrade`` reads a request from them or returns ``None`` to hand them to h11;
whenever it reads one, h11 must read the same request (method, target, header fields), end
it there, wait for the protocol switch, and leave the same bytes after it. Any exception from
``_parse_upgrade`` is a crash, and so is a disagreement: the input's ``repr`` is printed and
the exit status is 1.
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

from devstream_trio._http import _parse_upgrade

#: The head size limit the fuzzed reader is given (small, so that the limit is reached).
LIMIT = 600

SEEDS: list[bytes] = [
    b"GET /bridges/s1?role=device HTTP/1.1\r\nhost: 127.0.0.1:4000\r\nupgrade: websocket\r\n"
    b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"sec-websocket-version: 13\r\nauthorization: Bearer abc.def\r\n"
    b"sec-websocket-protocol: devstream.v1\r\n\r\n\x82\x85abcd",
    b"GET /devices/d1/streams HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nX-Empty:\r\nX-Tab:\ta\tb\t\r\n\r\n",
    b"POST /twins/d1/streams/ssh HTTP/1.1\r\nhost: h\r\ncontent-length: 0\r\n\r\n",
    b"GET / HTTP/1.0\r\nhost: h\r\nupgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: h\r\nhost: h\r\nupgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nupgrade: websocket\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: h\r\nupgrade: ,\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\nx-fold: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost: h\r\nupgrade: websocket\n\r\n",
    b"\r\nGET / HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\n\r\n",
    b"GET /\xc3\xa9 HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\n\r\n",
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
    b",",
    b"\x00",
    b"\x7f",
    b"\xff",
    b"GET / HTTP/1.1",
    b"host: h",
    b"upgrade: websocket",
    b"content-length: 0",
    b"transfer-encoding: chunked",
]

#: How many inputs the hub read itself (a run that never gets here tests nothing).
ACCEPTED = [0]

#: h11's state of a client that asked to switch protocols (not in its ``__all__``).
_MIGHT_SWITCH_PROTOCOL: object = h11.MIGHT_SWITCH_PROTOCOL  # type: ignore[attr-defined]


def h11_reads(data: bytes) -> tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes] | None:
    """The method, target, header fields (names lower-cased) and bytes after the head that
    h11 reads from *data* as an upgrade request it waits to switch for; None otherwise."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=LIMIT)
    conn.receive_data(data)
    try:
        request = conn.next_event()
        end = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
        return None
    if conn.their_state is not _MIGHT_SWITCH_PROTOCOL:
        return None
    fields = [(bytes(name), bytes(value)) for name, value in request.headers]
    return bytes(request.method), bytes(request.target), fields, bytes(conn.trailing_data[0])


def check(data: bytes) -> None:
    """One fuzz case: where ``_parse_upgrade`` reads a request, h11 must read the same."""
    read = _parse_upgrade(data, LIMIT)
    if read is None:
        return
    ACCEPTED[0] += 1
    request, end = read
    theirs = h11_reads(data)
    if theirs is None:
        raise AssertionError("the hub read an upgrade request that h11 does not")
    ours = (request.method, request.target, request.headers, data[end:])
    if theirs != ours:
        raise AssertionError(f"the hub read {ours!r}; h11 read {theirs!r}")
    if request.body:
        raise AssertionError("a request read without h11 has no body")


_ABOUT = "fuzz the hub's reading of a plain upgrade request against h11"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
