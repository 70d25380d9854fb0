"""Fuzz the hub's reading of an upgrade request: it reads a plain one as h11 does (or leaves
it to h11), and takes or refuses the handshake as wsproto's server does.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_http_request.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_http_request.py --iterations 100000 [--seed 0]

An input is the first bytes a client sends on a connection to the hub. Two invariants:

* **The reading.** The hub's ``_http.parse_upgrade_request`` reads a request from them or returns
  ``None`` to hand them to h11; whenever it reads one, h11 must read the same request
  (method, target, header fields), end it there, wait for the protocol switch, and leave the
  same bytes after it.
* **The decision.** The hub's whole handshake (``HttpServerConnection.next_request`` on a
  memory stream that carries the input and then ends, then ``accept_websocket`` if the
  request asks for a WebSocket) answers ``101`` exactly when wsproto's server
  (``H11Handshake``) takes the request, and then with the same target, header fields and
  offered subprotocols. Inputs whose request has not wholly come (h11 waits for more) are not
  compared: the hub reads a request's body before it answers, wsproto decides on the head.

Where the two may differ, on purpose (``devstream_core.handshake`` says why):

* The hub refuses what wsproto takes, and only then, for: an HTTP/1.0 request (RFC 6455
  §4.2.1 asks for HTTP/1.1); a ``Sec-WebSocket-Key`` that is not the base64 of 16 bytes, or
  comes twice (§4.2.1 item 5; wsproto only asks that one be there); a repeated
  ``Sec-WebSocket-Version`` (wsproto reads the last line); a request with both
  ``Content-Length`` and ``Transfer-Encoding`` (RFC 9112 §6.1). Its message names that.
* ``Connection`` and ``Upgrade`` are lists across all their lines (RFC 9110 §5.3, §7.8),
  their items separated by commas with spaces or tabs around them (§5.6.1). wsproto reads
  the last line of each, ``Upgrade`` as one value, and strips any whitespace (``str.strip``:
  also ``\x0b``, ``\x0c``, ``\x1c``-``\x1f``, which h11 lets through) around a
  ``Connection`` item. So the decision the hub must match is wsproto's on the same request
  with its ``Connection`` lines joined into one, each item written ``upgrade`` if the hub
  reads it so and ``x`` otherwise, and its ``Upgrade`` lines one ``websocket`` line if the
  hub reads that item among them (wsproto's decision on the request as it came must agree
  whenever it takes it and the hub reads no ``Connection`` item differently).
* The hub drops empty items from the offered subprotocols (RFC 9110 §5.6.1); wsproto keeps
  them as empty strings.
* wsproto raises ``UnicodeError`` (its own failure, not a decision) on a ``Host`` it cannot
  decode as IDNA and on a non-ASCII ``Connection``, ``Sec-WebSocket-Protocol`` or
  ``Sec-WebSocket-Extensions`` value: no decision to compare with.

Any exception from the hub's side other than its documented ``HttpError`` is a crash, and so
is a disagreement: the input's ``repr`` is printed and the exit status is 1.
"""

from __future__ import annotations

import base64
import binascii
import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
import h11
import trio
import trio.testing
from _harness import Crash as Crash
from wsproto.connection import ConnectionType
from wsproto.events import Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsprotoRefusal

from devstream_trio.transport.http import HttpError, HttpServerConnection, parse_upgrade_request

#: The head size limit the fuzzed reader is given (small, so that the limit is reached).
LIMIT = 600

_HANDSHAKE = (
    b"GET /devices/d1/streams HTTP/1.1\r\nhost: hub\r\nupgrade: websocket\r\n"
    b"connection: Upgrade\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"sec-websocket-version: 13\r\nsec-websocket-protocol: devstream.control.v1\r\n\r\n"
)

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
    # Whole handshakes, good and bad, so that mutations reach every check.
    _HANDSHAKE,
    _HANDSHAKE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"not-base64!!"),
    _HANDSHAKE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"AAAA"),
    _HANDSHAKE.replace(b"version: 13", b"version: 8"),
    _HANDSHAKE.replace(b"HTTP/1.1", b"HTTP/1.0"),
    _HANDSHAKE.replace(b"GET", b"POST"),
    _HANDSHAKE.replace(b"connection: Upgrade", b"connection: Upgrade\r\nconnection: close"),
    _HANDSHAKE.replace(b"upgrade: websocket", b"upgrade: h2c, websocket"),
    _HANDSHAKE.replace(b"\r\n\r\n", b"\r\nsec-websocket-key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n"),
    _HANDSHAKE.replace(b"\r\n\r\n", b"\r\ncontent-length: 2\r\n\r\nab"),
    _HANDSHAKE.replace(
        b"\r\n\r\n", b"\r\ncontent-length: 5\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    _HANDSHAKE.replace(b"\r\n\r\n", b"\r\nsec-websocket-protocol: a, , b\r\n\n"),
    _HANDSHAKE.replace(b"connection: Upgrade", b"connection: Upgrade\x1d"),
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
    b"\r\nconnection: upgrade",
    b"\r\nupgrade: websocket",
    b"\r\nsec-websocket-version: 13",
    b"\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==",
    b"\r\nsec-websocket-protocol: devstream.v1",
    b"\r\nsec-websocket-extensions: permessage-deflate",
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


def _check_reading(data: bytes) -> None:
    """Where ``parse_upgrade_request`` reads a request, h11 must read the same."""
    read = parse_upgrade_request(data, LIMIT)
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


#: How many handshakes the hub took, and how many of those wsproto took too.
TAKEN = [0, 0]

#: A decision: None (none to compare: the request has not wholly come, or wsproto cannot
#: decode it), a refusal (a str: why), or the request taken (target, header fields and the
#: subprotocols offered, as wsproto hands them over).
Taken = tuple[str, list[tuple[bytes, bytes]], list[str]]
Decision = Taken | str | None

#: The fields wsproto's server keeps out of the headers it hands over.
_NOT_HANDED = (b"host", b"sec-websocket-protocol", b"sec-websocket-extensions")


def _whole(data: bytes) -> h11.Request | None:
    """The request in *data* as h11 reads it once it has wholly come (its body included);
    None if h11 waits for more. Raises ``h11.RemoteProtocolError``."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(data)
    request = None
    while True:
        event = conn.next_event()
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.EndOfMessage):
            return request
        elif event is h11.NEED_DATA or isinstance(event, h11.ConnectionClosed):
            return None


def _wsproto_decides(data: bytes) -> Decision:
    handshake = H11Handshake(ConnectionType.SERVER)
    try:
        handshake.receive_data(data)
    except WsprotoRefusal as exc:
        return str(exc)
    except UnicodeError:
        return None
    event = next(handshake.events(), None)
    if not isinstance(event, Request):
        return None
    return event.target, list(event.extra_headers), list(event.subprotocols)


async def _hub_decides(data: bytes) -> Decision:
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(data)
    await client.send_eof()
    http = HttpServerConnection(server)
    try:
        request = await http.next_request()
        if request is None:
            return None
        if not request.is_websocket_upgrade:
            return "not a WebSocket handshake (426901 on a WebSocket path)"
        await http.accept_websocket(request)
    except HttpError as exc:
        return exc.message
    fields = [(name, value) for name, value in request.headers if name not in _NOT_HANDED]
    return request.target.decode("ascii"), fields, request.subprotocols


def _stricter(request: h11.Request) -> set[str]:
    """The messages of the hub's refusals of *request* where wsproto takes it."""
    fields = [(bytes(k), bytes(v)) for k, v in request.headers]
    names = [name for name, _ in fields]
    keys = [value for name, value in fields if name == b"sec-websocket-key"]
    reasons = set()
    if b"content-length" in names and b"transfer-encoding" in names:
        reasons.add("a request with both Content-Length and Transfer-Encoding")
    if request.http_version != b"1.1":
        reasons.add("a WebSocket handshake needs HTTP/1.1")
    if names.count(b"sec-websocket-version") > 1:
        reasons.add("a WebSocket handshake has one Sec-WebSocket-Version field")
    if len(keys) > 1:
        reasons.add("a WebSocket handshake has one Sec-WebSocket-Key field")
    elif keys and not _is_key(keys[0]):
        reasons.add("Sec-WebSocket-Key must be the base64 of 16 bytes")
    return reasons


def _is_key(key: bytes) -> bool:
    """RFC 6455 §4.2.1 item 5: the base64 of 16 bytes."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def _as_lists(request: h11.Request) -> bytes:
    """*request* as wsproto would read it if it read ``Connection`` and ``Upgrade`` as the
    hub does, as lists across their lines whose items are separated by commas, spaces and
    tabs: the ``Connection`` lines one last line, each item ``upgrade`` or ``x``; the
    ``Upgrade`` lines one ``websocket`` line if any of their items is ``websocket``."""
    fields = [(bytes(k), bytes(v)) for k, v in request.headers]
    kept = [(k, v) for k, v in fields if k != b"connection"]
    if b"websocket" in _items(fields, b"upgrade", b"websocket").split(b", "):
        kept = [(k, v) for k, v in kept if k != b"upgrade"] + [(b"upgrade", b"websocket")]
    if any(k == b"connection" for k, _ in fields):
        kept.append((b"connection", _items(fields, b"connection", b"upgrade")))
    head = b"%s %s HTTP/%s\r\n" % (request.method, request.target, request.http_version)
    return head + b"".join(k + b": " + v + b"\r\n" for k, v in kept) + b"\r\n"


def _items(fields: list[tuple[bytes, bytes]], name: bytes, token: bytes) -> bytes:
    """The items of every *name* line on one line, each *token* or ``x``: whether it is
    *token* decided as the hub does (RFC 9110 §5.6.1: commas, spaces and tabs)."""
    items = [i.strip(b" \t").lower() for k, v in fields if k == name for i in v.split(b",")]
    return b", ".join(token if item == token else b"x" for item in items)


def _strips_more(fields: list[tuple[bytes, bytes]], name: bytes) -> bool:
    """True when wsproto's ``str.strip`` would strip more around an item of a *name* line
    than the spaces and tabs the hub strips."""
    items = [i.decode("latin-1") for k, v in fields if k == name for i in v.split(b",")]
    return any(item.strip() != item.strip(" \t") for item in items)


#: The list fields the hub reads across their lines (see _as_lists).
_LISTS = (b"connection", b"upgrade")


def _check_decision(data: bytes) -> None:
    try:
        request = _whole(data)
    except h11.RemoteProtocolError:
        request = None
    theirs = _wsproto_decides(data)
    if theirs is None or (request is None and not isinstance(theirs, str)):
        return  # wsproto cannot tell, or the hub has not wholly read the request yet
    ours = trio.run(_hub_decides, data, clock=trio.testing.MockClock(autojump_threshold=0))
    if request is None:
        if not isinstance(ours, str):
            raise AssertionError(f"the hub took a request h11 refuses: {theirs}")
        return
    # What wsproto decides when it reads the two lists as the hub does.
    expected = _wsproto_decides(_as_lists(request))
    if (
        isinstance(theirs, tuple)
        and not isinstance(expected, tuple)
        and not _strips_more([(bytes(k), bytes(v)) for k, v in request.headers], b"connection")
    ):
        raise AssertionError(f"joining the list fields made wsproto refuse: {expected}")
    if expected is None:
        return
    stricter = _stricter(request)
    if isinstance(ours, tuple):
        TAKEN[0] += 1
        TAKEN[1] += isinstance(theirs, tuple)
        if not isinstance(expected, tuple):
            raise AssertionError(f"the hub took a handshake wsproto refuses: {expected}")
        if stricter:
            raise AssertionError(f"the hub took a handshake it must refuse: {stricter}")
        target, fields, offered = expected
        # The list fields aside, the hub hands over what wsproto hands over.
        if (ours[0], ours[2]) != (target, [p for p in offered if p]) or [
            f for f in ours[1] if f[0] not in _LISTS
        ] != [f for f in fields if f[0] not in _LISTS]:
            raise AssertionError(f"the hub took {ours!r}; wsproto {expected!r}")
        if isinstance(theirs, tuple) and ours[1] != theirs[1]:
            raise AssertionError(f"the hub read {ours[1]!r}; wsproto {theirs[1]!r}")
    elif isinstance(expected, tuple) and ours not in stricter:
        raise AssertionError(f"the hub refused what wsproto takes: {ours} (not in {stricter})")


def check(data: bytes) -> None:
    """One fuzz case: the hub reads a plain request as h11 does, and decides as wsproto."""
    _check_reading(data)
    _check_decision(data)


_ABOUT = "fuzz the hub's reading of an upgrade request against h11, its decision against wsproto"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    status = _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)
    print(f"the hub took {TAKEN[0]} handshakes; wsproto took {TAKEN[1]} of them")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
