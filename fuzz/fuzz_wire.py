"""Fuzz the wire contract's parsers: the initiate's answer, its request headers, error bodies
and hub URLs. Every input is read, or refused with the documented error.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_wire.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_wire.py --iterations 100000 [--seed 0]

An input is an answer as a hub might send it: the first byte picks the status and whether it
answers a one-step open (:data:`_STATUSES`), then header lines ``name: value`` up to an empty
line, then the body. Each input goes to:

* ``parse_error_body(body)``: never raises; a code, or ``None`` and at most
  ``MAX_ERROR_TEXT`` bytes of the text;
* ``parse_initiate_answer``: an ``InitiateAccepted`` (with a URL; with a token exactly when not
  one-step), an ``InitiateRejected`` or ``OneStepUnsupported`` (one-step only), or a
  ``HubError``; an accepted or rejected answer, built again by ``build_initiate_answer``,
  reads back the same;
* ``parse_initiate_headers`` on the same headers: ``InitiateHeaders`` or
  ``RemoteProtocolError`` with ``ARGUMENT_INVALID``;
* ``HubAddress.from_url`` and ``parse_stream_url`` on each header value: an address or
  ``HubUnreachable``.

Any other exception, or a broken check (``AssertionError``), is a crash.
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
from devstream_core.exceptions import HubError, HubUnreachable
from devstream_core.wire import (
    MAX_ERROR_TEXT,
    HubAddress,
    InitiateAccepted,
    InitiateRejected,
    OneStepUnsupported,
    build_initiate_answer,
    parse_error_body,
    parse_initiate_answer,
    parse_initiate_headers,
    parse_stream_url,
)

#: What the first byte of an input picks (its value modulo the length): status, one-step.
_STATUSES: list[tuple[int, bool]] = [
    (200, False),
    (101, True),
    (200, True),
    (404, True),
    (405, True),
    (404, False),
    (401, False),
    (502, False),
    (101, False),
]

_ACCEPTED = (
    b"iothub-streaming-is-accepted: True\n"
    b"iothub-streaming-url: wss://hub.example.com:8443/bridges/s-1?role=service\n"
    b"iothub-streaming-auth-token: v1.abc.def\n"
    b"devstream-stream-mode: devstream.v1\n"
    b"devstream-stream-window: 65536\n\n"
)

SEEDS: list[bytes] = [
    b"\x00" + _ACCEPTED,
    b"\x01" + _ACCEPTED,
    b"\x00iothub-streaming-is-accepted: False\n\n"
    b'{"errorCode": 404901, "message": "no handler for ssh"}',
    b'\x02iothub-streaming-is-accepted: False\n\n{"errorCode": 403903}',
    b'\x03\n\n{"errorCode": 404103, "message": "device not online"}',
    b"\x03\n\n<html>Not Found</html>",
    b"\x04\n\n",
    b'\x05\n\n{"errorCode": "404001", "message": 7}',
    b'\x06\n\n{"errorCode": 401002.5}',
    b"\x07\n\n[[[[[[[[]]]]]]]]",
    b"\x00iothub-streaming-is-accepted: true\niothub-streaming-url: ws://[::1]:8080/b/x\n\n",
    b"\x00iothub-streaming-is-accepted: True\niothub-streaming-url: ws://[::1/x\n"
    b"iothub-streaming-auth-token: t\n\n",
    b"\x01iothub-streaming-is-accepted: True\niothub-streaming-url: ws://h:99999/x\n\n",
    b"\x00iothub-streaming-connect-timeout-in-seconds: 30\n"
    b"iothub-streaming-response-timeout-in-seconds: 0\ndevstream-stream-mode: raw\n\n",
    b"\x00devstream-stream-window: 1023\ndevstream-stream-mode:  devstream.v1 \n\n",
    b"\x08" + _ACCEPTED,
]

_TOKENS: list[bytes] = [
    b"\n",
    b": ",
    b"True",
    b"False",
    b"iothub-streaming-is-accepted: ",
    b"iothub-streaming-url: ",
    b"iothub-streaming-auth-token: ",
    b"devstream-stream-mode: ",
    b"devstream-stream-window: ",
    b"iothub-streaming-response-timeout-in-seconds: ",
    b"wss://",
    b"[::1]",
    b":0",
    b'"errorCode"',
    b'"message"',
    b"403903",
    b"\xff",
    b"\\ud800",
]


def _split(data: bytes) -> tuple[int, bool, list[tuple[bytes, bytes]], bytes]:
    if not data:
        return 200, False, [], b""
    status, one_step = _STATUSES[data[0] % len(_STATUSES)]
    head, _, body = data[1:].partition(b"\n\n")
    headers = []
    for line in head.split(b"\n"):
        name, colon, value = line.partition(b":")
        if colon:
            headers.append((name.strip().lower(), value.strip()))
    return status, one_step, headers, body


def check(data: bytes) -> None:
    """One fuzz case (see the module docstring)."""
    status, one_step, headers, body = _split(data)

    code, text = parse_error_body(body)
    if code is None:
        assert len(text.encode("utf-8")) <= 3 * MAX_ERROR_TEXT
    else:
        assert isinstance(code, ErrorCode) and isinstance(text, str)

    try:
        answer = parse_initiate_answer(
            status, headers, body, one_step=one_step, mode="devstream.v1"
        )
    except HubError:
        pass
    else:
        if isinstance(answer, OneStepUnsupported):
            assert one_step and status in (404, 405)
        elif isinstance(answer, InitiateRejected):
            assert status == 200 and answer.message
            again = build_initiate_answer(answer)
            assert parse_initiate_answer(*again) == answer
        else:
            assert isinstance(answer, InitiateAccepted) and answer.url
            assert (answer.token is None) == one_step
            again = build_initiate_answer(answer)
            if one_step:
                reread = parse_initiate_answer(
                    101, again.headers, b"", one_step=True, mode=answer.mode
                )
            else:
                reread = parse_initiate_answer(*again)
            assert reread == answer

    try:
        asked = parse_initiate_headers(headers, default_timeout=60.0, max_timeout=300.0)
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.ARGUMENT_INVALID
    else:
        assert 1 <= asked.connect_timeout <= 300 and 1 <= asked.response_timeout <= 300

    for _, value in headers:
        url = value.decode("utf-8", "surrogateescape")
        try:
            address = HubAddress.from_url(url)
        except HubUnreachable:
            continue
        assert address.host and 1 <= address.port <= 65535
        assert parse_stream_url(url).address == address


_ABOUT = "fuzz the wire contract's parsers (initiate answers and headers, error bodies, URLs)"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
