"""Fuzz a client's reading of the hub's HTTP answer: ``devstream_core.response.ResponseReader``.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_http_answer.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_http_answer.py --iterations 100000 [--seed 0]

Each input is the hub's answer to a ``GET``, read as a plain request's answer and as a
WebSocket handshake's (``upgrade=True``), with a body limit of 64 bytes, fed whole, byte by
byte and in reads of 7 bytes, then the hub's hang-up. The documented errors are
``HubUnreachable`` and ``RemoteProtocolError`` with ``PAYLOAD_TOO_LARGE``; anything else is
a crash. Every way of feeding gives the same answer (after an answer that ends at its head,
the same bytes after it: those the reader kept and those not yet fed, together) or an error
of the same class and code.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash

from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.exceptions import HubUnreachable
from devstream_core.response import ResponseReader

FIELDS = [("host", "hub.example.com:8443"), ("connection", "close")]
MAX_BODY = 64

SEEDS: list[bytes] = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}",
    b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 38\r\n\r\n"
    b'{"errorCode":404001,"message":"gone"}\n',
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    b"\x82\x01x",
    b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
    b"HTTP/1.0 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100,
    b"\x15\x03\x03\x00\x02\x02\x46",
    b"SSH-2.0-OpenSSH_9.2p1\r\n\r\n",
    b"",
]

# Fragments the mutator splices in, so the loop reaches deeper than random bytes would.
_TOKENS: list[bytes] = [
    b"\r\n",
    b"\r\n\r\n",
    b"HTTP/1.1 ",
    b"101 ",
    b"Content-Length: ",
    b"Transfer-Encoding: chunked",
    b"Connection: close",
    b": ",
    b"0\r\n\r\n",
    b"\n",
    b"\x00",
    b"\xff",
]


def _read(data: bytes, size: int, upgrade: bool) -> object:
    """What the reader makes of *data* fed in reads of *size* bytes, then the hang-up."""
    reader = ResponseReader(
        "GET", "/x", FIELDS, where="hub.example.com:8443", tls=False,
        max_body=MAX_BODY, upgrade=upgrade,
    )  # fmt: skip
    try:
        for start in range(0, len(data), size):
            answer = reader.receive_data(data[start : start + size])
            if answer is not None:
                # An answer that ends at its head (a 101, or any 1xx to a handshake) is
                # followed by the bytes after it; a whole message by nothing of its own.
                rest = answer.trailing + data[start + size :] if answer.status < 200 else b""
                break
        else:
            answer, rest = reader.receive_data(b""), b""
            if answer is None:
                raise AssertionError("the reader wants more after the hang-up")
    except HubUnreachable as exc:
        return (type(exc), exc.code)
    except RemoteProtocolError as exc:
        if exc.code is not ErrorCode.PAYLOAD_TOO_LARGE:
            raise
        return (type(exc), exc.code)
    if not 100 <= answer.status <= 999 or len(answer.body) > MAX_BODY:
        raise AssertionError(f"an answer out of bounds: {answer}")
    if any(name != name.lower() for name, _ in answer.headers):
        raise AssertionError("a header name not lower-cased")
    return (answer.status, answer.headers, answer.body, rest)


def check(data: bytes) -> None:
    """One fuzz case: every way of feeding *data* gives the same outcome."""
    for upgrade in (False, True):
        whole = _read(data, max(len(data), 1), upgrade)
        for size in (1, 7):
            other = _read(data, size, upgrade)
            if other != whole:
                raise AssertionError(f"in reads of {size}: {other!r}, whole: {whole!r}")


_ABOUT = "fuzz ResponseReader (a client's reading of the hub's HTTP answer)"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
