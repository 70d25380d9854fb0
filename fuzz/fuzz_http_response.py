"""Fuzz the client's reading of a ``101``: it reads the head as h11 does, and takes or refuses
the answer as wsproto's client does.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_http_response.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_http_response.py --iterations 100000 [--seed 0]

An input is the bytes a hub answers a WebSocket upgrade with. Two invariants:

* **The reading.** The client's ``_http.parse_101`` reads the head (everything before the
  first ``\\r\\n\\r\\n``) or returns ``None`` to hand the answer to h11; whenever it reads a
  head, h11 must read the same answer as a ``101`` with the same header fields, and the
  WebSocket bytes after the head must be the same for both.
* **The decision.** The client's whole handshake (``websocket_connect``, on a memory stream
  that carries the input and then ends) takes the answer exactly when a wsproto client
  (``H11Handshake``) that sent the same key and offered the same subprotocols takes it, and
  then with the same subprotocol and the same other header fields. Each input is tried with
  no subprotocol offered and with :data:`OFFERED`. wsproto makes its own random key: the
  harness reads it from wsproto's request, gives the client the same one, and puts its accept
  value wherever the input has the accept value of the RFC 6455 example key
  (:data:`SAMPLE_ACCEPT`), so that mutations of a good answer keep reaching the later checks.
  (The key changes from run to run; whether an answer holds the right accept value does
  not, so a run with a given seed makes the same decisions.)

Where the two may differ, on purpose (``devstream_core.handshake`` says why):

* ``Connection`` is a list across all its lines (RFC 9110 §5.3), its items separated by
  commas with spaces or tabs around them (§5.6.1): the client takes an ``upgrade`` item on
  any line; wsproto reads only the last line, and strips any whitespace (``str.strip``: also
  ``\x0b``, ``\x0c``, ``\x1c``-``\x1f``, which h11 lets through) around an item. So the
  decision the client must match is wsproto's on the same answer with its ``Connection``
  lines joined into one, each item written ``upgrade`` if the client reads it so and ``x``
  otherwise (wsproto's decision on the answer as it came must agree whenever it takes it
  and the client reads no ``Connection`` item differently).
* A repeated ``Upgrade``, ``Sec-WebSocket-Accept`` or ``Sec-WebSocket-Protocol`` field: the
  client refuses it, naming it (RFC 9110 §5.3 joins the lines into a list, never a valid
  value); wsproto reads the last line. So where wsproto takes such an answer, the client
  refuses it, and only then.
* wsproto raises ``UnicodeDecodeError`` (its own failure, not a decision) on a non-ASCII
  ``Connection``, ``Sec-WebSocket-Protocol`` or ``Sec-WebSocket-Extensions`` value: no
  decision to compare with. The client refuses such a protocol or extension; only its reading
  of ``Connection`` tokens goes unchecked there.

Anything else is a crash: the input's ``repr`` is printed and the exit status is 1.
"""

from __future__ import annotations

import base64
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
from wsproto.events import AcceptConnection, RejectConnection, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsprotoRefusal

from devstream_core.errors import DevstreamError
from devstream_trio.transport.http import (
    _BLANK_LINE,
    HttpStatusError,
    accept_token,
    parse_101,
    websocket_connect,
)

#: The accept value of the RFC 6455 example key; the harness swaps in the one for its key.
SAMPLE_ACCEPT = b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
#: The subprotocols a client offers in the second try of each input.
OFFERED = ("devstream.v1", "chat")

_GOOD = (
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
    b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
)

SEEDS: list[bytes] = [
    _GOOD + b"\r\n\x82\x02hi",
    _GOOD + b"sec-websocket-protocol: devstream.v1\r\n"
    b"devstream-resume-token: r1.abc.service.AAAA.sig\r\nX-Empty:\r\n\r\n",
    b"HTTP/1.1 101\r\nA:b\r\nB: \t c d \t\r\n\r\n",
    b"HTTP/1.1 101 \xe9t\xe9\r\nX: caf\xc3\xa9\r\n\r\n",
    b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}",
    b"HTTP/1.0 101 Switching Protocols\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\nX-Fold: a\r\n folded\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\n\r\n",
    b"HTTP/1.1 101 Switching\r\nBad Name: v\r\n\r\n",
    b"HTTP/1.1 101 Switching\r\n: v\r\n\r\n",
    # What the client must refuse: no Upgrade and Connection, a subprotocol never offered.
    b"HTTP/1.1 101 Switching Protocols\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"
    b"sec-websocket-protocol: evil.v9\r\n\r\n",
    _GOOD.replace(b"upgrade: websocket", b"upgrade: WebSocket, h2c") + b"\r\n",
    _GOOD + b"sec-websocket-extensions: permessage-deflate\r\n\r\n",
    _GOOD + b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n",
    _GOOD + b"sec-websocket-protocol: chat\r\nsec-websocket-protocol: devstream.v1\r\n\r\n",
    _GOOD + b"connection: keep-alive\r\n\r\n",
    _GOOD.replace(b"connection: Upgrade", b"connection: close") + b"\r\n",
    _GOOD.replace(b"Switching Protocols", b"X") + b"sec-websocket-protocol: chat\n\n",
    b"HTTP/1.1 100 Continue\r\n\r\n" + _GOOD + b"\r\n",
    # wsproto strips \x1d around a Connection item; the client does not (found by fuzzing).
    b"HTTP/1.1 101 X\r\nupgrade: websocket\r\nconnection: Upgrade\x1d\n"
    b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nsec-websocket-protocol: chat\n\n",
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
    b"HTTP/1.1 101",
    b"HTTP/1.1 101 ",
    b"upgrade: websocket",
    b"\r\nupgrade: websocket",
    b"\r\nconnection: upgrade",
    b"\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=",
    b"\r\nsec-websocket-protocol: devstream.v1",
    b"\r\nsec-websocket-protocol: evil.v9",
    b"\r\nsec-websocket-extensions: permessage-deflate",
    b"content-length: 0",
    b"transfer-encoding: chunked",
]


#: How many inputs the client read itself (a run that never gets here tests nothing).
ACCEPTED = [0]
#: How many answers the client took, and how many of those wsproto took too.
TAKEN = [0, 0]

#: The fields read as one value: repeated, the client refuses them (wsproto reads the last).
_SINGLE = (b"upgrade", b"sec-websocket-accept", b"sec-websocket-protocol")
#: The fields that wsproto's client keeps out of the headers it hands over.
_HANDSHAKE = frozenset({*_SINGLE, b"connection", b"sec-websocket-extensions"})


def h11_reads(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
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


def _check_reading(data: bytes) -> None:
    """Where ``parse_101`` reads a head, h11 must read the same."""
    parse_101(data)  # must not raise on any bytes
    blank = _BLANK_LINE.search(data)
    if blank is None or blank[0] != b"\n\r\n" or data[blank.start() - 1 : blank.start()] != b"\r":
        return  # as the client does: no head yet, or one that h11 reads
    end = blank.start() - 1
    ours = parse_101(data[:end])
    if ours is None:
        return
    ACCEPTED[0] += 1
    theirs = h11_reads(data)
    if theirs is None:
        raise AssertionError("the client read a 101 that h11 refuses")
    if theirs != (ours, data[end + 4 :]):
        raise AssertionError(f"the client read {ours!r}; h11 read {theirs!r}")


#: A decision: None (no decision: wsproto waits for more, or cannot decode), a refusal (a
#: str: why), or the answer taken (the chosen subprotocol and the other header fields).
Taken = tuple[str | None, list[tuple[bytes, bytes]]]
Decision = Taken | str | None


def _wsproto_decides(data: bytes, offered: Sequence[str]) -> tuple[bytes, Decision]:
    """The key a wsproto client sent, and what it makes of the answer *data* (with the
    sample accept value replaced by its own)."""
    handshake = H11Handshake(ConnectionType.CLIENT)
    request = handshake.send(Request(host="h", target="/", subprotocols=list(offered)))
    key = request.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
    try:
        handshake.receive_data(data.replace(SAMPLE_ACCEPT, accept_token(key)))
    except WsprotoRefusal as exc:
        return key, str(exc)
    except UnicodeDecodeError:
        return key, None
    event = next(handshake.events(), None)
    if isinstance(event, RejectConnection):
        return key, f"refused with {event.status_code}"
    if isinstance(event, AcceptConnection):
        return key, (event.subprotocol, [(bytes(k), bytes(v)) for k, v in event.extra_headers])
    return key, None


async def _client_decides(data: bytes, key: bytes, offered: Sequence[str]) -> Decision:
    """What ``websocket_connect`` with *key* and *offered* makes of the answer *data*."""
    client, server = trio.testing.memory_stream_pair()
    await server.send_all(data)
    await server.send_eof()
    try:
        ws = await websocket_connect(
            client,
            host="h",
            target="/",
            subprotocols=offered,
            nonce=base64.b64decode(key),
        )
    except DevstreamError as exc:
        return exc.message
    except HttpStatusError as exc:  # an answer other than 101
        return str(exc)
    others = [(k, v) for k, v in ws.handshake_headers if k not in _HANDSHAKE]
    return ws.subprotocol, others


def _as_list(fields: list[tuple[bytes, bytes]]) -> bytes:
    """A 101 with *fields*, as wsproto would read it if it read ``Connection`` as the client
    does: one list across its lines, each item ``upgrade`` or not once spaces and tabs
    around it are stripped (wsproto reads the last line, and strips any whitespace)."""
    kept = [(k, v) for k, v in fields if k != b"connection"]
    if any(k == b"connection" for k, _ in fields):
        kept.append((b"connection", _items(fields, b"connection", b"upgrade")))
    return b"HTTP/1.1 101 X\r\n" + b"".join(k + b": " + v + b"\r\n" for k, v in kept) + b"\r\n"


def _check_decision(
    data: bytes, key: bytes, offered: Sequence[str], ours: Decision, theirs: Decision
) -> None:
    """Compare the client's decision on *data* (with *key*'s accept value in it) with
    wsproto's, the documented differences aside."""
    if theirs is None:
        return
    read = h11_reads(data)
    if read is None:  # not a 101 (or not one h11 reads): a refusal for both
        if not isinstance(ours, str) or isinstance(theirs, tuple):
            raise AssertionError(f"offering {offered}: no 101, yet {ours!r} / {theirs!r}")
        return
    fields = read[0]
    # What wsproto decides when it reads Connection as the client does (with a key of its
    # own, so the accept value goes back to the sample one for it to replace).
    own_key, expected = _wsproto_decides(
        _as_list(fields).replace(accept_token(key), SAMPLE_ACCEPT), offered
    )
    if isinstance(expected, tuple):  # with the client's accept value in the fields again
        own, accept = accept_token(own_key), accept_token(key)
        expected = (expected[0], [(k, v.replace(own, accept)) for k, v in expected[1]])
    if (
        isinstance(theirs, tuple)
        and not isinstance(expected, tuple)
        and not _strips_more(fields, b"connection")
    ):
        raise AssertionError(f"joining the Connection lines made wsproto refuse: {expected}")
    if expected is None:
        return
    repeated = [name for name in _SINGLE if sum(k == name for k, _ in fields) > 1]
    if isinstance(ours, tuple):
        TAKEN[0] += 1
        TAKEN[1] += isinstance(theirs, tuple)
        if not isinstance(expected, tuple) or repeated or ours != expected:
            raise AssertionError(
                f"offering {offered}: the client took {ours}; wsproto: {expected}"
                + (f" (and {repeated} repeated)" if repeated else "")
            )
    elif isinstance(expected, tuple) and (
        not repeated or ours != f"{_REFUSAL}more than one {_NAMES[repeated[0]]} field"
    ):
        raise AssertionError(f"offering {offered}: the client refused what wsproto takes: {ours}")


def _items(fields: list[tuple[bytes, bytes]], name: bytes, token: bytes) -> bytes:
    """The items of every *name* line on one line, each *token* or ``x``: whether it is
    *token* decided as devstream does (RFC 9110 §5.6.1: commas, spaces and tabs)."""
    items = [i.strip(b" \t").lower() for k, v in fields if k == name for i in v.split(b",")]
    return b", ".join(token if item == token else b"x" for item in items)


def _strips_more(fields: list[tuple[bytes, bytes]], name: bytes) -> bool:
    """True when wsproto's ``str.strip`` would strip more around an item of a *name* line
    than the spaces and tabs devstream strips."""
    items = [i.decode("latin-1") for k, v in fields if k == name for i in v.split(b",")]
    return any(item.strip() != item.strip(" \t") for item in items)


_REFUSAL = "bad answer to the WebSocket handshake: "
_NAMES = {
    b"upgrade": "Upgrade",
    b"sec-websocket-accept": "Sec-WebSocket-Accept",
    b"sec-websocket-protocol": "Sec-WebSocket-Protocol",
}


def check(data: bytes) -> None:
    """One fuzz case: the client reads the head as h11 does, and decides as wsproto does."""
    _check_reading(data)
    tries = [(offered, *_wsproto_decides(data, offered)) for offered in ((), OFFERED)]
    if all(theirs is None for _, _, theirs in tries):
        return  # nothing to compare with (no whole head yet): spare the client's run

    async def decide() -> list[Decision]:
        return [
            await _client_decides(data.replace(SAMPLE_ACCEPT, accept_token(key)), key, offered)
            for offered, key, _ in tries
        ]

    ours = trio.run(decide, clock=trio.testing.MockClock(autojump_threshold=0))
    for (offered, key, theirs), our in zip(tries, ours, strict=True):
        answer = data.replace(SAMPLE_ACCEPT, accept_token(key))
        _check_decision(answer, key, offered, our, theirs)


_ABOUT = "fuzz the client's reading of a 101 against h11, and its decision against wsproto"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    status = _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)
    print(f"the client took {TAKEN[0]} answers; wsproto took {TAKEN[1]} of them")
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
