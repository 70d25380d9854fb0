"""Tests of the wire contract (``devstream_core.wire``) and the client exceptions' table.

Rules of this module: pure function calls, no I/O. Each builder is checked against its parser
(build, then parse, gives back the inputs), and each parser against malformed input: it
answers, or raises the documented exception, and nothing else.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import devstream_core.wire
import devstream_trio.exceptions
import devstream_trio.transport.connect
import devstream_trio.transport.http
from devstream_core import exceptions, wire
from devstream_core.common import Role
from devstream_core.control import MAX_WINDOW, MIN_WINDOW, MODE_FRAMED, MODE_RAW
from devstream_core.credentials import ConnectionString
from devstream_core.errors import DevstreamError, ErrorCode, RemoteProtocolError
from devstream_core.exceptions import (
    DeviceNotFound,
    DeviceNotOnline,
    HubError,
    HubUnreachable,
    StreamJoinRefused,
    StreamNameNotRegistered,
    StreamRejected,
    StreamReset,
    Unauthorized,
    error_for,
)
from devstream_core.framing import MAX_MESSAGE_SIZE
from devstream_core.routes import (
    BridgeJoin,
    ControlChannel,
    DeviceItem,
    DeviceKeyRotation,
    Initiate,
    PolicyItem,
    PolicyKeyRotation,
    parse_route,
)
from devstream_core.wire import (
    HubAddress,
    InitiateAccepted,
    InitiateRejected,
    OneStepUnsupported,
)

from ._helpers import load_fuzz_harness

DEVICE_IDS = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.+%_#*?!(),:=@$'",
    min_size=1,
    max_size=128,
)
STREAM_NAMES = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-", min_size=1, max_size=64
)
STREAM_IDS = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=64
)
TOKENS = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.", min_size=1, max_size=200
)
MESSAGES = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=300)
ACCEPTED_URL = "wss://hub.example.com/bridges/abc?role=service"

# --- the names -------------------------------------------------------------------------------


def test_header_names_are_lower_case_and_spelled_as_azure_and_devstream_do() -> None:
    assert wire.HEADER_CONNECT_TIMEOUT == b"iothub-streaming-connect-timeout-in-seconds"
    assert wire.HEADER_RESPONSE_TIMEOUT == b"iothub-streaming-response-timeout-in-seconds"
    assert wire.HEADER_IS_ACCEPTED == b"iothub-streaming-is-accepted"
    assert wire.HEADER_STREAM_URL == b"iothub-streaming-url"
    assert wire.HEADER_AUTH_TOKEN == b"iothub-streaming-auth-token"
    assert wire.HEADER_STREAM_MODE == b"devstream-stream-mode"
    assert wire.HEADER_STREAM_WINDOW == b"devstream-stream-window"
    assert wire.HEADER_RESUME_TOKEN == b"devstream-resume-token"
    assert (wire.ACCEPTED, wire.NOT_ACCEPTED) == (b"True", b"False")


def test_limits_are_the_core_modules_own() -> None:
    # The hub relays, and a client accepts, every message a side may send.
    assert wire.MAX_FRAMED_MESSAGE_SIZE == MAX_MESSAGE_SIZE == 1024 * 1024
    assert wire.MAX_CONTROL_MESSAGE_SIZE == 64 * 1024
    assert (wire.DEFAULT_CONNECT_TIMEOUT, wire.DEFAULT_RESPONSE_TIMEOUT) == (60, 60)
    assert wire.DEFAULT_SAS_LIFETIME == 3600


def test_trio_modules_name_the_core_objects() -> None:
    # Same objects, so every existing import and ``except`` keeps working.
    for name in devstream_trio.exceptions.__all__:
        assert getattr(devstream_trio.exceptions, name) is getattr(exceptions, name)
    for name in devstream_core.wire.__all__:
        assert getattr(devstream_core.wire, name) is getattr(wire, name)
    assert devstream_trio.transport.connect.HubAddress is HubAddress
    assert devstream_trio.transport.http.error_body is wire.build_error_body


# --- the exceptions --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        (ErrorCode.UNAUTHORIZED, Unauthorized),
        (ErrorCode.DEVICE_NOT_FOUND, DeviceNotFound),
        (ErrorCode.DEVICE_NOT_ONLINE, DeviceNotOnline),
        (ErrorCode.STREAM_REJECTED, StreamRejected),
        (ErrorCode.STREAM_NAME_NOT_REGISTERED, StreamNameNotRegistered),
        (ErrorCode.STREAM_TOKEN_REUSED, StreamJoinRefused),
        (ErrorCode.STREAM_TOKEN_EXPIRED, StreamJoinRefused),
        (ErrorCode.HUB_UNREACHABLE, HubUnreachable),
        (ErrorCode.STREAM_RESET, StreamReset),
        (ErrorCode.THROTTLED, HubError),
        (ErrorCode.SERVER_ERROR, HubError),
    ],
)
def test_error_for_picks_the_class_of_the_code(code: ErrorCode, cls: type[HubError]) -> None:
    error = error_for(code, "why")
    assert type(error) is cls
    assert (error.code, error.message) == (code, "why")


@pytest.mark.parametrize("code", list(ErrorCode))
def test_error_for_every_code_is_a_hub_error_with_that_code(code: ErrorCode) -> None:
    error = error_for(code)
    assert isinstance(error, HubError) and isinstance(error, DevstreamError)
    assert error.code is code and error.message == code.message
    assert str(error) == f"{code.message} (error {int(code)})"


def test_a_name_not_registered_is_caught_as_a_rejection() -> None:
    with pytest.raises(StreamRejected):
        raise error_for(ErrorCode.STREAM_NAME_NOT_REGISTERED)


def test_stream_reset_carries_the_peers_number() -> None:
    assert StreamReset(ErrorCode.STREAM_RESET).reset_code == 410901
    assert StreamReset(ErrorCode.STREAM_RESET, "x", reset_code=7).reset_code == 7


@pytest.mark.parametrize(
    ("code", "reason", "cls", "error_code", "reset_code"),
    [
        (4242, "changed my mind", StreamReset, ErrorCode.STREAM_RESET, 4242),
        (0, "", StreamReset, ErrorCode.STREAM_RESET, 0),
        (int(ErrorCode.STREAM_RESET), "x", StreamReset, ErrorCode.STREAM_RESET, 410901),
        (int(ErrorCode.PEER_LOST), "gone", HubError, ErrorCode.PEER_LOST, None),
    ],
)
def test_reset_error_is_the_class_for_a_resets_code(
    code: int, reason: str, cls: type[HubError], error_code: ErrorCode, reset_code: int | None
) -> None:
    error = exceptions.reset_error(code, reason)
    assert isinstance(error, cls) and error.code is error_code
    assert type(error) is type(error_for(error_code))
    if reset_code is not None:
        assert isinstance(error, StreamReset) and error.reset_code == reset_code
    assert error.message == (reason or error_code.message)


def test_connection_string_for_checks_the_role() -> None:
    device = "HostName=hub.test;DeviceId=d1;SharedAccessKey=a2V5"
    service = "HostName=hub.test;SharedAccessKeyName=owner;SharedAccessKey=a2V5"
    assert wire.connection_string_for(Role.DEVICE, device).device_id == "d1"
    parsed = wire.connection_string_for(Role.SERVICE, service)
    assert wire.connection_string_for(Role.SERVICE, parsed) is parsed
    for role, value in ((Role.DEVICE, service), (Role.SERVICE, device)):
        with pytest.raises(HubError) as caught:
            wire.connection_string_for(role, value)
        assert caught.value.code is ErrorCode.INVALID_CONNECTION_STRING
    assert devstream_trio.transport.connect.connection_string_for is wire.connection_string_for


def test_resume_token_is_read_from_the_101() -> None:
    headers = [(b"upgrade", b"websocket"), (wire.HEADER_RESUME_TOKEN, b"tok.en-1")]
    assert wire.resume_token(headers) == "tok.en-1"
    assert wire.resume_token([(b"upgrade", b"websocket")]) == ""


# --- where the hub is ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("http://hub.example.com", ("hub.example.com", 80, False, "hub.example.com")),
        ("https://hub.example.com", ("hub.example.com", 443, True, "hub.example.com")),
        ("ws://hub.example.com/x", ("hub.example.com", 80, False, "hub.example.com")),
        ("wss://hub.example.com/x?y", ("hub.example.com", 443, True, "hub.example.com")),
        ("http://hub:8080", ("hub", 8080, False, "hub:8080")),
        ("https://Hub.Example.COM:8443/", ("hub.example.com", 8443, True, "Hub.Example.COM:8443")),
        ("http://127.0.0.1:9", ("127.0.0.1", 9, False, "127.0.0.1:9")),
        ("http://[::1]:8080", ("::1", 8080, False, "[::1]:8080")),
        ("wss://[2001:db8::1]/bridges/s", ("2001:db8::1", 443, True, "[2001:db8::1]")),
        ("http://hub:0", ("hub", 80, False, "hub:0")),
    ],
)
def test_hub_address_from_url(url: str, address: tuple[str, int, bool, str]) -> None:
    parsed = HubAddress.from_url(url)
    assert (parsed.host, parsed.port, parsed.tls, parsed.host_header) == address


@pytest.mark.parametrize(
    "url",
    [
        "",
        "hub.example.com",
        "ftp://hub.example.com",
        "http://",
        "http://:80",
        "http://hub:99999",
        "http://hub:port",
        "https://[::1",
        "wss://hub:-1",
    ],
)
def test_hub_address_refuses_what_names_no_hub(url: str) -> None:
    with pytest.raises(HubUnreachable) as info:
        HubAddress.from_url(url)
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert info.value.message == f"not a hub URL: {url!r}"


@pytest.mark.parametrize(
    ("host_name", "use_tls", "address"),
    [
        ("hub.example.com", True, ("hub.example.com", 443, True, "hub.example.com")),
        ("hub.example.com:8080", False, ("hub.example.com", 8080, False, "hub.example.com:8080")),
        ("[::1]:8443", True, ("::1", 8443, True, "[::1]:8443")),
    ],
)
def test_hub_address_from_connection_string(
    host_name: str, use_tls: bool, address: tuple[str, int, bool, str]
) -> None:
    cs = ConnectionString(
        host_name=host_name, device_id="d", shared_access_key="a2V5a2V5", use_tls=use_tls
    )
    parsed = HubAddress.from_connection_string(cs)
    assert (parsed.host, parsed.port, parsed.tls, parsed.host_header) == address


# --- targets ---------------------------------------------------------------------------------


def test_targets_quote_every_reserved_character() -> None:
    assert wire.control_target("a/b c%") == "/devices/a%2Fb%20c%25/streams"
    assert wire.device_target("a/b") == "/devices/a%2Fb"
    assert wire.device_target() == "/devices"
    assert wire.initiate_target("d?1", "ssh") == "/twins/d%3F1/streams/ssh?api-version=2020-09-30"
    assert wire.stream_url("ws://h:1", "s1", Role.DEVICE) == "ws://h:1/bridges/s1?role=device"


@given(DEVICE_IDS)
def test_control_and_device_targets_round_trip_through_the_hubs_routes(device_id: str) -> None:
    target = wire.control_target(device_id).encode()
    assert parse_route(b"GET", target) == ControlChannel(device_id=device_id)
    target = wire.device_target(device_id).encode()
    assert parse_route(b"PUT", target) == DeviceItem(device_id=device_id)


@given(DEVICE_IDS, st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True), st.booleans())
def test_policy_and_rotate_key_targets_round_trip_through_the_hubs_routes(
    device_id: str, name: str, secondary: bool
) -> None:
    assert wire.policy_target() == "/policies"
    assert parse_route(b"GET", wire.policy_target(name).encode()) == PolicyItem(name=name)
    target = wire.rotate_key_target(wire.policy_target(name), secondary=secondary).encode()
    assert parse_route(b"POST", target) == PolicyKeyRotation(name=name, secondary=secondary)
    target = wire.rotate_key_target(wire.device_target(device_id), secondary=secondary).encode()
    assert parse_route(b"POST", target) == DeviceKeyRotation(
        device_id=device_id, secondary=secondary
    )


@given(STREAM_IDS, st.sampled_from(list(Role)), st.sampled_from(["ws://h", "wss://[::1]:9"]))
def test_stream_url_round_trips(stream_id: str, role: Role, base: str) -> None:
    url = wire.stream_url(base, stream_id, role)
    parsed = wire.parse_stream_url(url)
    assert parsed.stream_id == stream_id
    assert parsed.address == HubAddress.from_url(base)
    assert parse_route(b"GET", parsed.target.encode()) == BridgeJoin(stream_id=stream_id, role=role)


def test_stream_url_without_a_query_or_a_port() -> None:
    parsed = wire.parse_stream_url("wss://hub.example.com/bridges/s-1")
    assert parsed.target == "/bridges/s-1" and parsed.stream_id == "s-1"
    assert (parsed.address.port, parsed.address.tls) == (443, True)


def _parsed_by_urlsplit(url: str) -> wire.StreamUrl:
    """What parse_stream_url makes of *url* with urlsplit alone (it reads most URLs faster)."""
    try:
        parts = urllib.parse.urlsplit(url)
        address = HubAddress.from_url(f"{parts.scheme}://{parts.netloc}")
    except (ValueError, HubUnreachable):
        raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, "not a hub URL") from None
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    return wire.StreamUrl(address, target, parts.path.rsplit("/", 1)[-1])


def _url_part(*choices: str) -> st.SearchStrategy[str]:
    """One part of a URL: one of *choices* (the good and the bad), or any of a few
    characters that matter to how a URL splits."""
    return st.one_of(st.sampled_from(choices), st.sampled_from(" \t\n\x00\x7f\u00e9#?@:/[]"))


_URLS = st.tuples(
    _url_part("ws", "wss", "WSS", "http", ""),
    _url_part("://", ":/", ""),
    _url_part("h", "h.example", "127.0.0.1", "[::1]", "[::1", "u@h", "h-1.x", ""),
    _url_part(":8080", ":", ":x", ""),
    _url_part("/bridges/s-1", "/", "/a b", "/%2F/s", "/\u00e9", ""),
    _url_part("?role=device", "?", "?a=b&c", ""),
    _url_part("#f", "#", ""),
    _url_part("", " "),
).map("".join)


@given(_URLS)
def test_a_stream_url_is_read_as_urlsplit_reads_it(url: str) -> None:
    try:
        expected = _parsed_by_urlsplit(url)
    except HubUnreachable:
        with pytest.raises(HubUnreachable):
            wire.parse_stream_url(url)
    else:
        assert wire.parse_stream_url(url) == expected


@pytest.mark.parametrize(
    "url",
    [
        "ws://h.example:8080/bridges/s-1?role=device",
        "wss://h/b/s?r#f",
        "wss://h/b/s#f",
        "wss://u@h/b/s",
        "ws://h/b\ts",
        "ws://h:/b/s?",
        " ws://h/b/s",
    ],
)
def test_a_stream_url_is_read_as_urlsplit_reads_it_examples(url: str) -> None:
    assert wire.parse_stream_url(url) == _parsed_by_urlsplit(url)


@pytest.mark.parametrize("url", ["/bridges/s-1", "wss://[::1/bridges/s-1", "ws://h:x/bridges/s"])
def test_stream_url_that_names_no_hub(url: str) -> None:
    with pytest.raises(HubUnreachable):
        wire.parse_stream_url(url)


@given(TOKENS)
def test_bearer_round_trips(token: str) -> None:
    assert wire.parse_bearer(wire.bearer(token).encode()) == token


@pytest.mark.parametrize(
    ("value", "token"),
    [
        (b"bearer abc", "abc"),
        (b"BEARER  abc ", "abc"),
        (b"Bearer", None),
        (b"Bearer   ", None),
        (b"Basic abc", None),
        (b"SharedAccessSignature sr=x", None),
        (None, None),
    ],
)
def test_parse_bearer(value: bytes | None, token: str | None) -> None:
    assert wire.parse_bearer(value) == token


# --- the JSON error body ---------------------------------------------------------------------


def test_error_body_shape() -> None:
    assert json.loads(wire.build_error_body(ErrorCode.DEVICE_NOT_ONLINE)) == {
        "errorCode": 404103,
        "message": "device not online",
    }
    assert wire.build_error_body(ErrorCode.THROTTLED, "slow") == (
        b'{"errorCode": 429001, "message": "slow"}'
    )


@given(st.sampled_from(list(ErrorCode)), MESSAGES)
def test_error_body_round_trips(code: ErrorCode, message: str) -> None:
    assert wire.parse_error_body(wire.build_error_body(code, message)) == (code, message)


@pytest.mark.parametrize(
    ("body", "parsed"),
    [
        (b"<html>bad gateway</html>", (None, "<html>bad gateway</html>")),
        (b"", (None, "")),
        (b"[404001]", (None, "[404001]")),
        (b"null", (None, "null")),
        (b'"404001"', (None, '"404001"')),
        (b'{"message": "no code"}', (None, '{"message": "no code"}')),
        (b'{"errorCode": "abc"}', (None, '{"errorCode": "abc"}')),
        (b'{"errorCode": null}', (None, '{"errorCode": null}')),
        (b'{"errorCode": [1]}', (None, '{"errorCode": [1]}')),
        (b'{"errorCode": 123456}', (None, '{"errorCode": 123456}')),
        (b'{"errorCode": true}', (None, '{"errorCode": true}')),
        (b'{"errorCode": 1e999}', (None, '{"errorCode": 1e999}')),
        (b'{"errorCode": NaN}', (None, '{"errorCode": NaN}')),
        (b'{"errorCode": ' + b"9" * 5000 + b"}", (None, ('{"errorCode": ' + "9" * 5000)[:200])),
        (b"\xff\xfe{", (None, "\ufffd\ufffd{")),
        (b'{"errorCode": 404001}', (ErrorCode.DEVICE_NOT_FOUND, "")),
        (b'{"errorCode": "404001", "message": 5}', (ErrorCode.DEVICE_NOT_FOUND, "5")),
    ],
)
def test_parse_error_body_is_tolerant(body: bytes, parsed: tuple[ErrorCode | None, str]) -> None:
    assert wire.parse_error_body(body) == parsed


def test_parse_error_body_keeps_the_start_of_a_long_text() -> None:
    code, text = wire.parse_error_body(b"x" * 5000)
    assert code is None and text == "x" * wire.MAX_ERROR_TEXT


def test_parse_error_body_survives_deep_nesting() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert wire.parse_error_body(body) == (None, "[" * wire.MAX_ERROR_TEXT)


def test_error_from_response() -> None:
    error = wire.error_from_response(404, wire.build_error_body(ErrorCode.DEVICE_NOT_ONLINE))
    assert type(error) is DeviceNotOnline and error.message == "device not online"
    error = wire.error_from_response(502, b"<html>")
    assert type(error) is HubError and error.code is ErrorCode.SERVER_ERROR
    assert error.message == "hub answered HTTP 502"
    # An empty message reads as the code's own.
    error = wire.error_from_response(401, b'{"errorCode": 401002, "message": ""}')
    assert type(error) is Unauthorized and error.message == ErrorCode.UNAUTHORIZED.message


# --- the initiate request --------------------------------------------------------------------


def test_initiate_request_raw_and_framed() -> None:
    raw = wire.build_initiate_request("dev 1", "ssh", connect_timeout=5, response_timeout=7)
    assert raw == (
        "POST",
        "/twins/dev%201/streams/ssh?api-version=2020-09-30",
        [
            ("iothub-streaming-connect-timeout-in-seconds", "5"),
            ("iothub-streaming-response-timeout-in-seconds", "7"),
        ],
    )
    framed = wire.build_initiate_request("d", "ssh", mode=MODE_FRAMED, window=4096)
    assert framed.headers == [
        ("iothub-streaming-connect-timeout-in-seconds", "60"),
        ("iothub-streaming-response-timeout-in-seconds", "60"),
        ("devstream-stream-mode", "devstream.v1"),
        ("devstream-stream-window", "4096"),
    ]


def _as_received(headers: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), value.encode()) for name, value in headers]


@given(
    device_id=DEVICE_IDS,
    name=STREAM_NAMES,
    connect=st.integers(1, 300),
    response=st.integers(1, 300),
    mode=st.sampled_from([MODE_RAW, MODE_FRAMED]),
    window=st.none() | st.integers(MIN_WINDOW, MAX_WINDOW),
    api_version=st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=20),
)
def test_initiate_request_round_trips_through_the_hubs_reading(
    device_id: str,
    name: str,
    connect: int,
    response: int,
    mode: str,
    window: int | None,
    api_version: str,
) -> None:
    method, target, headers = wire.build_initiate_request(
        device_id,
        name,
        connect_timeout=connect,
        response_timeout=response,
        mode=mode,
        window=window,
        api_version=api_version,
    )
    assert parse_route(method.encode(), target.encode()) == Initiate(
        device_id=device_id, stream_name=name, api_version=api_version
    )
    asked = wire.parse_initiate_headers(
        _as_received(headers), default_timeout=60.0, max_timeout=300.0
    )
    assert asked == wire.InitiateHeaders(
        connect_timeout=connect, response_timeout=response, mode=mode, window=window
    )


def test_initiate_headers_absent_take_the_defaults() -> None:
    asked = wire.parse_initiate_headers([], default_timeout=42.0, max_timeout=300.0)
    assert asked == wire.InitiateHeaders(
        connect_timeout=42.0, response_timeout=42.0, mode=MODE_RAW, window=None
    )


def test_initiate_headers_are_read_among_others_and_mode_is_stripped() -> None:
    asked = wire.parse_initiate_headers(
        [
            (b"x-other", b"1"),
            (wire.HEADER_RESPONSE_TIMEOUT, b"5"),
            (b"x-other", b"2"),
            (wire.HEADER_STREAM_MODE, b" devstream.v1 "),
        ],
        default_timeout=60.0,
        max_timeout=300.0,
    )
    assert (asked.response_timeout, asked.mode) == (5.0, MODE_FRAMED)


SECONDS = "must be a whole number of seconds from 1 to 300"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            [(wire.HEADER_CONNECT_TIMEOUT, b"0")],
            f"{wire.HEADER_CONNECT_TIMEOUT.decode()} {SECONDS}",
        ),
        (
            [(wire.HEADER_CONNECT_TIMEOUT, b"ten")],
            f"{wire.HEADER_CONNECT_TIMEOUT.decode()} {SECONDS}",
        ),
        (
            [(wire.HEADER_RESPONSE_TIMEOUT, b"301")],
            f"{wire.HEADER_RESPONSE_TIMEOUT.decode()} {SECONDS}",
        ),
        (
            [(wire.HEADER_RESPONSE_TIMEOUT, b"1.5")],
            f"{wire.HEADER_RESPONSE_TIMEOUT.decode()} {SECONDS}",
        ),
        (
            [(wire.HEADER_RESPONSE_TIMEOUT, b"\xff")],
            f"{wire.HEADER_RESPONSE_TIMEOUT.decode()} {SECONDS}",
        ),
        (
            [(wire.HEADER_STREAM_MODE, b"tcp")],
            "devstream-stream-mode must be one of devstream.v1, raw",
        ),
        (
            [(wire.HEADER_STREAM_MODE, b"RAW")],
            "devstream-stream-mode must be one of devstream.v1, raw",
        ),
        (
            [(wire.HEADER_STREAM_WINDOW, b"big")],
            f"devstream-stream-window must be a whole number of bytes from {MIN_WINDOW} to "
            f"{MAX_WINDOW}",
        ),
        (
            [(wire.HEADER_STREAM_WINDOW, str(MIN_WINDOW - 1).encode())],
            f"devstream-stream-window must be a whole number of bytes from {MIN_WINDOW} to "
            f"{MAX_WINDOW}",
        ),
        (
            # The checks run in order: the connect timeout is named first.
            [(wire.HEADER_STREAM_MODE, b"tcp"), (wire.HEADER_CONNECT_TIMEOUT, b"-1")],
            f"{wire.HEADER_CONNECT_TIMEOUT.decode()} {SECONDS}",
        ),
        *(
            # Given twice, even with the same value: which one counts is no one's guess.
            (
                [(name, value), (b"x-other", b"1"), (name, value)],
                f"{name.decode()} may appear once",
            )
            for name, value in (
                (wire.HEADER_CONNECT_TIMEOUT, b"5"),
                (wire.HEADER_RESPONSE_TIMEOUT, b"5"),
                (wire.HEADER_STREAM_MODE, b"raw"),
                (wire.HEADER_STREAM_WINDOW, b"65536"),
            )
        ),
        (
            # A repeat is found before any value is read.
            [
                (wire.HEADER_CONNECT_TIMEOUT, b"-1"),
                (wire.HEADER_STREAM_MODE, b"raw"),
                (wire.HEADER_STREAM_MODE, b"devstream.v1"),
            ],
            "devstream-stream-mode may appear once",
        ),
    ],
)
def test_initiate_headers_refused(headers: list[tuple[bytes, bytes]], message: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        wire.parse_initiate_headers(headers, default_timeout=60.0, max_timeout=300.0)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert info.value.message == message


# --- the initiate's answer -------------------------------------------------------------------


def test_accepted_answer_as_the_hub_sends_it() -> None:
    answer = wire.build_initiate_answer(
        InitiateAccepted(url=ACCEPTED_URL, token="tok", mode=MODE_FRAMED, window=4096)
    )
    assert answer == (
        200,
        [
            (b"iothub-streaming-is-accepted", b"True"),
            (b"iothub-streaming-url", ACCEPTED_URL.encode()),
            (b"iothub-streaming-auth-token", b"tok"),
            (b"devstream-stream-mode", b"devstream.v1"),
            (b"devstream-stream-window", b"4096"),
        ],
        b"",
    )
    assert wire.accepted_headers(ACCEPTED_URL, "tok", MODE_FRAMED, 4096) == answer.headers
    assert wire.accepted_headers(ACCEPTED_URL, None, MODE_RAW, None) == [
        (b"iothub-streaming-is-accepted", b"True"),
        (b"iothub-streaming-url", ACCEPTED_URL.encode()),
        (b"devstream-stream-mode", b"raw"),
    ]


def test_rejected_answer_as_the_hub_sends_it() -> None:
    answer = wire.build_initiate_answer(
        InitiateRejected(code=ErrorCode.STREAM_REJECTED, message="busy")
    )
    assert answer == (
        200,
        [
            (b"iothub-streaming-is-accepted", b"False"),
            (b"content-type", b"application/json; charset=utf-8"),
        ],
        b'{"errorCode": 403903, "message": "busy"}',
    )


ACCEPTED_OUTCOMES = st.builds(
    InitiateAccepted,
    url=st.sampled_from([ACCEPTED_URL, "ws://[::1]:8080/bridges/x-y?role=service"]),
    token=TOKENS,
    mode=st.sampled_from([MODE_RAW, MODE_FRAMED]),
    window=st.none() | st.integers(MIN_WINDOW, MAX_WINDOW),
)
REJECTED_OUTCOMES = st.builds(
    InitiateRejected, code=st.sampled_from(list(ErrorCode)), message=MESSAGES
)


@given(ACCEPTED_OUTCOMES | REJECTED_OUTCOMES)
def test_initiate_answer_round_trips(outcome: InitiateAccepted | InitiateRejected) -> None:
    status, headers, body = wire.build_initiate_answer(outcome)
    assert wire.parse_initiate_answer(status, headers, body) == outcome


@given(ACCEPTED_OUTCOMES)
def test_one_step_answer_round_trips(outcome: InitiateAccepted) -> None:
    one_step = InitiateAccepted(
        url=outcome.url, token=None, mode=outcome.mode, window=outcome.window
    )
    _, headers, _ = wire.build_initiate_answer(one_step)
    assert (
        wire.parse_initiate_answer(101, headers, b"", one_step=True, mode=outcome.mode) == one_step
    )


def _accepted_headers(**changes: bytes | None) -> list[tuple[bytes, bytes]]:
    fields: dict[str, bytes | None] = {
        "iothub-streaming-is-accepted": b"True",
        "iothub-streaming-url": ACCEPTED_URL.encode(),
        "iothub-streaming-auth-token": b"tok",
        "devstream-stream-mode": b"devstream.v1",
    }
    fields.update({name.replace("_", "-"): value for name, value in changes.items()})
    return [(name.encode(), value) for name, value in fields.items() if value is not None]


def test_answer_without_mode_is_raw_and_bad_window_is_ignored() -> None:
    headers = [
        *_accepted_headers(devstream_stream_mode=None),
        (b"devstream-stream-window", b"lots"),
    ]
    answer = wire.parse_initiate_answer(200, headers, b"")
    assert answer == InitiateAccepted(url=ACCEPTED_URL, token="tok", mode=MODE_RAW, window=None)


@pytest.mark.parametrize("spelling", [b"true", b"TRUE", b"True ", b"1", b"yes", None])
def test_only_true_spelled_so_accepts(spelling: bytes | None) -> None:
    answer = wire.parse_initiate_answer(
        200, _accepted_headers(iothub_streaming_is_accepted=spelling), b""
    )
    assert answer == InitiateRejected(
        code=ErrorCode.STREAM_REJECTED, message=ErrorCode.STREAM_REJECTED.message
    )


def test_first_is_accepted_counts() -> None:
    headers = [(b"iothub-streaming-is-accepted", b"False"), *_accepted_headers()]
    assert isinstance(wire.parse_initiate_answer(200, headers, b""), InitiateRejected)


@pytest.mark.parametrize(
    "changes",
    [
        {"iothub_streaming_url": None},
        {"iothub_streaming_url": b""},
        {"iothub_streaming_auth_token": None},
        {"iothub_streaming_auth_token": b""},
        {"iothub_streaming_url": b"wss://h/\xff"},
        {"devstream_stream_mode": b"\xc3"},
    ],
)
def test_incomplete_accepted_answer_is_a_protocol_error(changes: dict[str, bytes | None]) -> None:
    with pytest.raises(HubError) as info:
        wire.parse_initiate_answer(200, _accepted_headers(**changes), b"")
    assert type(info.value) is HubError
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert info.value.message == "the hub's answer is incomplete"


@pytest.mark.parametrize(
    ("body", "rejected"),
    [
        (
            b'{"errorCode": 404901, "message": "no ssh here"}',
            InitiateRejected(code=ErrorCode.STREAM_NAME_NOT_REGISTERED, message="no ssh here"),
        ),
        (
            b'{"errorCode": 403903, "message": ""}',
            InitiateRejected(
                code=ErrorCode.STREAM_REJECTED, message=ErrorCode.STREAM_REJECTED.message
            ),
        ),
        (
            b"not json",
            InitiateRejected(
                code=ErrorCode.STREAM_REJECTED, message=ErrorCode.STREAM_REJECTED.message
            ),
        ),
    ],
)
def test_rejected_answer_reads_the_body(body: bytes, rejected: InitiateRejected) -> None:
    headers = [(b"iothub-streaming-is-accepted", b"False")]
    answer = wire.parse_initiate_answer(200, headers, body)
    assert answer == rejected
    assert isinstance(answer, InitiateRejected)
    error = answer.error()
    assert isinstance(error, StreamRejected) and error.code is rejected.code
    assert error.message == rejected.message


@pytest.mark.parametrize("one_step", [False, True])
def test_error_answer_raises_the_class_of_its_code(one_step: bool) -> None:
    body = wire.build_error_body(ErrorCode.DEVICE_NOT_FOUND, "no such device")
    with pytest.raises(DeviceNotFound) as info:
        wire.parse_initiate_answer(404, [], body, one_step=one_step)
    assert info.value.message == "no such device"
    with pytest.raises(HubError) as other:
        wire.parse_initiate_answer(503, [], b"<html>", one_step=one_step)
    assert other.value.code is ErrorCode.SERVER_ERROR
    assert other.value.message == "hub answered HTTP 503"


def test_a_101_to_a_post_is_not_an_answer() -> None:
    with pytest.raises(HubError) as info:
        wire.parse_initiate_answer(101, _accepted_headers(), b"")
    assert info.value.code is ErrorCode.SERVER_ERROR


@pytest.mark.parametrize(
    ("status", "body"),
    [(405, b""), (404, b"<html>not found</html>"), (404, b'{"errorCode": 1}')],
)
def test_one_step_unsupported(status: int, body: bytes) -> None:
    answer = wire.parse_initiate_answer(status, [], body, one_step=True, mode=MODE_RAW)
    assert answer == OneStepUnsupported()


def test_one_step_refusal_is_a_rejection_whatever_its_headers() -> None:
    body = wire.build_error_body(ErrorCode.STREAM_REJECTED, "not now")
    answer = wire.parse_initiate_answer(200, _accepted_headers(), body, one_step=True)
    assert answer == InitiateRejected(code=ErrorCode.STREAM_REJECTED, message="not now")


@pytest.mark.parametrize(
    "changes",
    [
        {"iothub_streaming_is_accepted": b"true"},
        {"iothub_streaming_is_accepted": None},
        {"iothub_streaming_url": None},
        {"devstream_stream_mode": b"raw"},
        {"devstream_stream_mode": None},
    ],
)
def test_incomplete_one_step_answer_is_a_protocol_error(changes: dict[str, bytes | None]) -> None:
    with pytest.raises(HubError) as info:
        wire.parse_initiate_answer(
            101, _accepted_headers(**changes), b"", one_step=True, mode=MODE_FRAMED
        )
    assert info.value.code is ErrorCode.PROTOCOL_ERROR
    assert info.value.message == "the hub's one-step answer is incomplete"


def test_one_step_answer_needs_no_token() -> None:
    headers = _accepted_headers(iothub_streaming_auth_token=None)
    answer = wire.parse_initiate_answer(101, headers, b"", one_step=True, mode=MODE_FRAMED)
    assert answer == InitiateAccepted(url=ACCEPTED_URL, token=None, mode=MODE_FRAMED)


# --- the fuzz harness, run briefly in-process ------------------------------------------------


def test_fuzz_harness_fallback_loop(capsys: pytest.CaptureFixture[str]) -> None:
    harness = load_fuzz_harness("fuzz_wire")
    harness.run_fallback(2000, seed=1)
    assert harness.main(["--iterations", "200", "--seed", "2"]) == 0
    assert "ok: " in capsys.readouterr().out


def test_fuzz_harness_seeds_reach_every_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = load_fuzz_harness("fuzz_wire")
    seen: set[type] = set()
    real = harness.parse_initiate_answer

    def spy(*args: object, **kwargs: object) -> object:
        try:
            answer = real(*args, **kwargs)
        except HubError as exc:
            seen.add(type(exc))
            raise
        seen.add(type(answer))
        return answer

    monkeypatch.setattr(harness, "parse_initiate_answer", spy)
    for seed in harness.SEEDS:
        harness.check(seed)
    assert {InitiateAccepted, InitiateRejected, OneStepUnsupported, HubError} <= seen


def test_the_wire_contract_needs_no_event_loop() -> None:
    # What a port to another I/O layer imports pulls in neither trio nor devstream_trio.
    code = (
        "import sys, devstream_core.wire, devstream_core.exceptions; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'devstream_trio', "
        "'asyncio', 'socket', 'h11', 'wsproto')))"
    )
    src = Path(__file__).resolve().parent.parent / "src"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(src)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "[]"
