"""The WebSocket opening handshake's decisions (``devstream_core.handshake``), one by one.

Rules of this module: pure function calls, no I/O. Every check of the module's list has a
test of its refusal; the adapters' tests (``test_http_adapter.py``) show that both ways of
reading a request or a ``101`` reach these checks, and the fuzz harnesses hold them to
wsproto's decisions.
"""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.handshake import (
    WEBSOCKET_VERSION,
    accept_token,
    asks_for_websocket,
    check_request,
    check_response,
    client_key,
    field_values,
    header_line,
    request_head,
    upgrade_fields,
)

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
Fields = list[tuple[bytes, bytes]]

REQUEST: Fields = [
    (b"host", b"hub.test"),
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-key", KEY),
    (b"sec-websocket-version", b"13"),
]


def without(fields: Fields, name: bytes) -> Fields:
    return [(k, v) for k, v in fields if k != name]


def replaced(fields: Fields, name: bytes, *values: bytes) -> Fields:
    return without(fields, name) + [(name, value) for value in values]


def test_accept_token_matches_rfc_6455_example() -> None:
    assert accept_token(KEY) == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- the hub's checks of an upgrade request ----------------------------------------------------


def test_a_well_formed_request_gives_its_key() -> None:
    assert check_request(b"GET", b"1.1", REQUEST) == KEY
    assert asks_for_websocket(REQUEST)


@pytest.mark.parametrize(
    "fields",
    [
        replaced(REQUEST, b"upgrade", b"h2c, WebSocket"),
        replaced(REQUEST, b"upgrade", b"h2c", b"websocket"),
        replaced(REQUEST, b"connection", b"keep-alive, UPGRADE"),
        replaced(REQUEST, b"connection", b"upgrade", b"keep-alive"),
        replaced(REQUEST, b"sec-websocket-key", base64.b64encode(bytes(range(16)))),
    ],
    ids=["upgrade-token", "upgrade-lines", "connection-token", "connection-lines", "any-key"],
)
def test_lists_are_read_across_their_lines(fields: Fields) -> None:
    assert check_request(b"GET", b"1.1", fields)


@pytest.mark.parametrize(
    ("method", "version", "fields", "code", "words"),
    [
        (b"POST", b"1.1", REQUEST, ErrorCode.MALFORMED_REQUEST, "GET"),
        (b"get", b"1.1", REQUEST, ErrorCode.MALFORMED_REQUEST, "GET"),
        (b"GET", b"1.0", REQUEST, ErrorCode.MALFORMED_REQUEST, "HTTP/1.1"),
        (b"GET", b"1.1", without(REQUEST, b"host"), ErrorCode.MALFORMED_REQUEST, "Host"),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"host", b"a", b"b"),
            ErrorCode.MALFORMED_REQUEST,
            "one Host",
        ),
        (b"GET", b"1.1", without(REQUEST, b"upgrade"), ErrorCode.UPGRADE_REQUIRED, "Upgrade"),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"upgrade", b"h2c"),
            ErrorCode.UPGRADE_REQUIRED,
            "Upgrade: websocket",
        ),
        (
            b"GET",
            b"1.1",
            without(REQUEST, b"connection"),
            ErrorCode.UPGRADE_REQUIRED,
            "Connection: Upgrade",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"connection", b"keep-alive"),
            ErrorCode.UPGRADE_REQUIRED,
            "Connection: Upgrade",
        ),
        (
            b"GET",
            b"1.1",
            without(REQUEST, b"sec-websocket-version"),
            ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED,
            "13",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-version", b"8"),
            ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED,
            "13",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-version", b"13, 8"),
            ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED,
            "13",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-version", b"13", b"13"),
            ErrorCode.MALFORMED_REQUEST,
            "one Sec-WebSocket-Version",
        ),
        (
            b"GET",
            b"1.1",
            without(REQUEST, b"sec-websocket-key"),
            ErrorCode.MALFORMED_REQUEST,
            "Sec-WebSocket-Key",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-key", b"not-base64!!"),
            ErrorCode.MALFORMED_REQUEST,
            "Sec-WebSocket-Key",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-key", b"AAAA"),
            ErrorCode.MALFORMED_REQUEST,
            "Sec-WebSocket-Key",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-key", base64.b64encode(bytes(17))),
            ErrorCode.MALFORMED_REQUEST,
            "Sec-WebSocket-Key",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-key", KEY.rstrip(b"=")),
            ErrorCode.MALFORMED_REQUEST,
            "Sec-WebSocket-Key",
        ),
        (
            b"GET",
            b"1.1",
            replaced(REQUEST, b"sec-websocket-key", KEY, KEY),
            ErrorCode.MALFORMED_REQUEST,
            "one Sec-WebSocket-Key",
        ),
    ],
    ids=[
        "post",
        "lower-case-get",
        "http-1.0",
        "no-host",
        "two-hosts",
        "no-upgrade",
        "upgrade-h2c",
        "no-connection",
        "connection-keep-alive",
        "no-version",
        "version-8",
        "two-versions-in-one",
        "version-twice",
        "no-key",
        "key-not-base64",
        "key-of-3-bytes",
        "key-of-17-bytes",
        "key-without-padding",
        "key-twice",
    ],
)
def test_every_check_of_a_request_refuses(
    method: bytes, version: bytes, fields: Fields, code: ErrorCode, words: str
) -> None:
    for values in (None, field_values(fields)):  # the caller's lookup table, or none
        with pytest.raises(RemoteProtocolError) as info:
            check_request(method, version, fields, values=values)
        assert info.value.code is code
        assert words in info.value.message
        assert KEY.decode() not in info.value.message


def test_field_values_keep_every_value_in_order() -> None:
    fields = [(b"a", b"1"), (b"b", b"2"), (b"a", b"3")]
    assert field_values(fields) == {b"a": [b"1", b"3"], b"b": [b"2"]}
    assert check_request(b"GET", b"1.1", REQUEST, values=field_values(REQUEST)) == KEY
    assert asks_for_websocket(REQUEST, values=field_values(REQUEST))
    assert not asks_for_websocket(REQUEST, values={})  # the table is what is read


def test_the_version_refusal_names_the_version_the_hub_speaks() -> None:
    assert WEBSOCKET_VERSION == b"13"
    assert ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED.http_status == 426
    assert "13" in ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED.message


# -- a client's checks of a 101 ---------------------------------------------------------------

ANSWER: Fields = [
    (b"upgrade", b"websocket"),
    (b"connection", b"Upgrade"),
    (b"sec-websocket-accept", accept_token(KEY)),
]
OFFERED = ["devstream.v1", "devstream.control.v1"]


@pytest.mark.parametrize(
    ("fields", "chosen"),
    [
        (ANSWER, None),
        ([*ANSWER, (b"sec-websocket-protocol", b"devstream.control.v1")], "devstream.control.v1"),
        (replaced(ANSWER, b"upgrade", b"WebSocket"), None),
        (replaced(ANSWER, b"connection", b"keep-alive, upgrade"), None),
        (replaced(ANSWER, b"connection", b"keep-alive", b"Upgrade"), None),
        ([*ANSWER, (b"x-other", b"kept")], None),
    ],
    ids=["plain", "subprotocol", "upgrade-case", "connection-token", "connection-lines", "extra"],
)
def test_a_good_101_is_taken(fields: Fields, chosen: str | None) -> None:
    assert check_response(fields, key=KEY, subprotocols=OFFERED) == chosen


@pytest.mark.parametrize(
    ("fields", "offered", "words"),
    [
        (without(ANSWER, b"upgrade"), OFFERED, "Upgrade: websocket"),
        (replaced(ANSWER, b"upgrade", b"h2c"), OFFERED, "Upgrade: websocket"),
        (replaced(ANSWER, b"upgrade", b"websocket, h2c"), OFFERED, "Upgrade: websocket"),
        (replaced(ANSWER, b"upgrade", b"websocket", b"websocket"), OFFERED, "one Upgrade"),
        (without(ANSWER, b"connection"), OFFERED, "Connection: Upgrade"),
        (replaced(ANSWER, b"connection", b"keep-alive"), OFFERED, "Connection: Upgrade"),
        (without(ANSWER, b"sec-websocket-accept"), OFFERED, "Sec-WebSocket-Accept"),
        (
            replaced(ANSWER, b"sec-websocket-accept", accept_token(b"another key")),
            OFFERED,
            "Sec-WebSocket-Accept",
        ),
        (
            replaced(ANSWER, b"sec-websocket-accept", accept_token(KEY), accept_token(KEY)),
            OFFERED,
            "one Sec-WebSocket-Accept",
        ),
        (
            [*ANSWER, (b"sec-websocket-protocol", b"evil.v9")],
            OFFERED,
            "Sec-WebSocket-Protocol",
        ),
        (
            [*ANSWER, (b"sec-websocket-protocol", b"devstream.v1")],
            [],
            "Sec-WebSocket-Protocol",
        ),
        (
            [*ANSWER, (b"sec-websocket-protocol", b"DEVSTREAM.V1")],
            OFFERED,
            "Sec-WebSocket-Protocol",
        ),
        (
            [*ANSWER, (b"sec-websocket-protocol", b"devstream.v1, devstream.control.v1")],
            OFFERED,
            "Sec-WebSocket-Protocol",
        ),
        (
            ANSWER + [(b"sec-websocket-protocol", b"devstream.v1")] * 2,
            OFFERED,
            "one Sec-WebSocket-Protocol",
        ),
        (
            [*ANSWER, (b"sec-websocket-extensions", b"permessage-deflate")],
            OFFERED,
            "Sec-WebSocket-Extensions",
        ),
        ([*ANSWER, (b"sec-websocket-extensions", b"")], OFFERED, "Sec-WebSocket-Extensions"),
    ],
    ids=[
        "no-upgrade",
        "upgrade-h2c",
        "upgrade-list",
        "upgrade-twice",
        "no-connection",
        "connection-keep-alive",
        "no-accept",
        "wrong-accept",
        "accept-twice",
        "protocol-not-offered",
        "protocol-when-none-offered",
        "protocol-other-case",
        "protocol-list",
        "protocol-twice",
        "extension",
        "empty-extension",
    ],
)
def test_every_check_of_a_101_refuses(fields: Fields, offered: list[str], words: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        check_response(fields, key=KEY, subprotocols=offered)
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert info.value.message.startswith("bad answer to the WebSocket handshake: ")
    assert words in info.value.message


# -- the client's request --------------------------------------------------------------------


def test_the_clients_request_is_one_the_hub_takes_and_its_answer_one_the_client_takes() -> None:
    key = client_key(b"the sample nonce")
    assert key == KEY  # RFC 6455 section 1.3's example
    for offered in ([], ["devstream.v1"]):
        fields = upgrade_fields("hub.test", key, [("authorization", "Bearer t")], offered)
        head = request_head("/bridges/s1", fields)
        assert head.startswith(b"GET /bridges/s1 HTTP/1.1\r\nhost: hub.test\r\n")
        assert b"authorization: Bearer t\r\n" in head
        raw = [(k.encode(), v.encode()) for k, v in fields]
        assert check_request(b"GET", b"1.1", raw) == key
        answer = [
            (b"upgrade", b"websocket"),
            (b"connection", b"Upgrade"),
            (b"sec-websocket-accept", accept_token(key)),
            *[(b"sec-websocket-protocol", name.encode()) for name in offered],
        ]
        assert check_response(answer, key=key, subprotocols=offered) == (
            offered[0] if offered else None
        )
        assert (b"sec-websocket-protocol" in dict(raw)) is bool(offered)


@pytest.mark.parametrize("size", [0, 15, 17])
def test_a_key_is_made_of_sixteen_random_bytes(size: int) -> None:
    with pytest.raises(ValueError):
        client_key(bytes(size))


#: Names and values, good and bad, with the characters that matter to a header line's checks.
_NAMES = st.sampled_from(["a", "a-Z~", "a:a", "a a", "", "a\n", "a:", "\x7f"])
_VALUES = st.sampled_from(
    ["", "v", "v w", " v", "v ", "v\nw", "v\rw", "v\r\nw", "v\tw", "\x00", "a: b"]
)


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=4))
def test_a_request_head_takes_the_fields_that_each_pass_on_its_own(
    fields: list[tuple[str, str]],
) -> None:
    """request_head checks all the fields at once; it takes exactly the lists whose every
    field header_line takes alone, and writes the same lines."""
    try:
        lines = [header_line(name.encode(), value.encode()) for name, value in fields]
    except ValueError:
        with pytest.raises(ValueError, match="not a valid header: "):
            request_head("/t", fields)
    else:
        assert request_head("/t", fields) == b"GET /t HTTP/1.1\r\n" + b"".join(lines) + b"\r\n"
