"""Fuzz the hub's request targets: every input routes, or is refused with RemoteProtocolError.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_http_path.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_http_path.py --iterations 100000 [--seed 0]

An input is ``METHOD SP TARGET`` (without a space, the whole input is the target of a
``GET``). It goes through ``parse_route`` with its own method and with every method the hub
knows. Any exception other than ``RemoteProtocolError`` is a crash, and so are these
disagreements: a route returned for a method it does not allow, an id in a route that its own
validator refuses, or a target whose ``MALFORMED_REQUEST``/``NOT_FOUND`` verdict depends on
the method. On a crash the input's ``repr`` is printed and the exit status is 1.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash

from devstream_core.control import is_valid_stream_name
from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.routes import (
    ALLOWED_METHODS,
    BridgeJoin,
    ControlChannel,
    DeviceItem,
    Initiate,
    Route,
    is_valid_device_id,
    is_valid_stream_id,
    parse_route,
)

SEEDS: list[bytes] = [
    b"POST /twins/dev-1/streams/ssh?api-version=2020-09-30",
    b"POST /twins/a%25b%23c%3F%2F/streams/echo",
    b"POST /twins/x/streams/s?api-version=1&api-version=2",
    b"GET /devices/d1/streams",
    b"GET /devices/%40home:1$'()*+,=!/streams",
    b"GET /bridges/abc_DEF-123?role=device",
    b"GET /bridges/abc?role=service&x=%ff",
    b"GET /bridges/abc?role=client",
    b"PUT /devices/new-device",
    b"DELETE /devices/old%2edevice",
    b"GET /devices",
    b"GET /devices/",
    b"GET /healthz",
    b"GET /metrics?x=1",
    b"POST /healthz",
    b"GET /nope",
    b"GET //devices",
    b"GET /devices/%zz",
    b"GET /devices/%c3%a9",
    b"GET /devices/%ff",
    b"GET *",
    b"GET http://hub/devices",
    b"GET /devices/a#b",
    b"GET /" + b"a" * 9000,
    b"",
]

# Fragments the mutator splices in, so the loop reaches deeper than random bytes would.
_TOKENS: list[bytes] = [
    b"/",
    b"?",
    b"&",
    b"=",
    b"%",
    b"%2F",
    b"%25",
    b"%00",
    b"%c3",
    b"#",
    b" ",
    b"devices",
    b"twins",
    b"streams",
    b"bridges",
    b"role=device",
    b"api-version=",
    b"\x00",
    b"\xff",
]

_METHODS: tuple[bytes, ...] = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"get")
_PATH_VERDICTS = (ErrorCode.MALFORMED_REQUEST, ErrorCode.NOT_FOUND)


def _route(method: bytes, target: bytes) -> Route | ErrorCode:
    """The route ``parse_route`` returns, or the code of its RemoteProtocolError."""
    try:
        route = parse_route(method, target)
    except RemoteProtocolError as exc:
        return exc.code
    if method not in ALLOWED_METHODS[type(route)]:
        raise AssertionError(f"{type(route).__name__} returned for method {method!r}")
    if isinstance(route, Initiate | ControlChannel | DeviceItem) and not is_valid_device_id(
        route.device_id
    ):
        raise AssertionError("route holds an invalid device id")
    if isinstance(route, Initiate) and not is_valid_stream_name(route.stream_name):
        raise AssertionError("route holds an invalid stream name")
    if isinstance(route, BridgeJoin) and not is_valid_stream_id(route.stream_id):
        raise AssertionError("route holds an invalid stream id")
    return route


def check(data: bytes) -> None:
    """One fuzz case; anything but RemoteProtocolError, or any disagreement, is a crash."""
    method, space, target = data.partition(b" ")
    if not space:
        method, target = b"GET", data
    _route(method, target)
    verdicts = {_route(m, target) for m in _METHODS}
    path_verdicts = verdicts & set(_PATH_VERDICTS)
    if path_verdicts and (verdicts != path_verdicts or len(verdicts) != 1):
        raise AssertionError(f"path verdict depends on the method: {verdicts!r}")


_ABOUT = "fuzz parse_route"


def run_fallback(iterations: int, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
