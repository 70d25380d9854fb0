"""Tests of the hub's request-target parsing: every route, percent-encoding, every error code.

Rules of this module: pure function calls, no I/O.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstream_core.common import Role
from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_core.routes import (
    ALLOWED_METHODS,
    MAX_TARGET_LENGTH,
    BridgeJoin,
    ControlChannel,
    DeviceItem,
    DeviceKeyRotation,
    DeviceList,
    Health,
    Initiate,
    MethodNotAllowed,
    Metrics,
    PolicyItem,
    PolicyKeyRotation,
    PolicyList,
    Route,
    StreamList,
    is_valid_device_id,
    parse_route,
)

DEVICE_ID_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.+%_#*?!(),:=@$'"
STREAM_NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-"
METHODS = [b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"PATCH", b"get"]


def refused(method: bytes, target: bytes) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        parse_route(method, target)
    return info.value


@pytest.mark.parametrize(
    ("method", "target", "route"),
    [
        (
            b"POST",
            b"/twins/dev-1/streams/ssh?api-version=2020-09-30",
            Initiate(device_id="dev-1", stream_name="ssh", api_version="2020-09-30"),
        ),
        (
            b"POST",
            b"/twins/dev-1/streams/ssh",
            Initiate(device_id="dev-1", stream_name="ssh", api_version=None),
        ),
        (
            b"POST",
            b"/twins/d/streams/s.v1?x=1&api-version=&y",
            Initiate(device_id="d", stream_name="s.v1", api_version=""),
        ),
        (b"GET", b"/devices/dev-1/streams", ControlChannel(device_id="dev-1")),
        (b"GET", b"/bridges/Ab_9-z", BridgeJoin(stream_id="Ab_9-z", role=None)),
        (b"GET", b"/bridges/s?role=device", BridgeJoin(stream_id="s", role=Role.DEVICE)),
        (
            b"GET",
            b"/bridges/s?other=1&role=service",
            BridgeJoin(stream_id="s", role=Role.SERVICE),
        ),
        (b"PUT", b"/devices/dev-1", DeviceItem(device_id="dev-1")),
        (b"GET", b"/devices/dev-1", DeviceItem(device_id="dev-1")),
        (b"DELETE", b"/devices/dev-1", DeviceItem(device_id="dev-1")),
        (b"GET", b"/devices", DeviceList()),
        (b"GET", b"/devices?top=10", DeviceList()),
        (b"GET", b"/streams", StreamList()),
        (b"GET", b"/streams?device=x", StreamList()),
        (b"GET", b"/healthz", Health()),
        (b"GET", b"/metrics", Metrics()),
        (b"POST", b"/devices/d1/rotate-key", DeviceKeyRotation(device_id="d1", secondary=False)),
        (
            b"POST",
            b"/devices/d1/rotate-key?key=primary",
            DeviceKeyRotation(device_id="d1", secondary=False),
        ),
        (
            b"POST",
            b"/devices/d%2B1/rotate-key?key=secondary",
            DeviceKeyRotation(device_id="d+1", secondary=True),
        ),
        (b"PUT", b"/policies/ops", PolicyItem(name="ops")),
        (b"GET", b"/policies/a-b.c_D9", PolicyItem(name="a-b.c_D9")),
        (b"DELETE", b"/policies/ops", PolicyItem(name="ops")),
        (b"GET", b"/policies", PolicyList()),
        (b"POST", b"/policies/ops/rotate-key", PolicyKeyRotation(name="ops", secondary=False)),
        (
            b"POST",
            b"/policies/ops/rotate-key?x=1&key=secondary",
            PolicyKeyRotation(name="ops", secondary=True),
        ),
    ],
)
def test_each_route(method: bytes, target: bytes, route: Route) -> None:
    assert parse_route(method, target) == route
    assert method in ALLOWED_METHODS[type(route)]


@pytest.mark.parametrize(
    ("segment", "device_id"),
    [
        (b"a%25b", "a%b"),
        (b"a%23b", "a#b"),
        (b"a%3Fb", "a?b"),
        (b"a%3fb", "a?b"),
        (b"%41", "A"),
        (b"a%2525", "a%25"),  # decoded once, not twice
        (b"a:b@c$d'e(f)g+h=i,j!k*l", "a:b@c$d'e(f)g+h=i,j!k*l"),  # legal unencoded in a path
        (b"a%3Ab%40c", "a:b@c"),
        (b"..", ".."),  # no dot-segment normalisation: a device id like any other
    ],
)
def test_percent_encoded_device_ids(segment: bytes, device_id: str) -> None:
    for target, route in [
        (b"/devices/" + segment, DeviceItem(device_id=device_id)),
        (b"/devices/" + segment + b"/streams", ControlChannel(device_id=device_id)),
    ]:
        assert parse_route(b"GET", target) == route
    initiate = parse_route(b"POST", b"/twins/" + segment + b"/streams/ssh")
    assert initiate == Initiate(device_id=device_id, stream_name="ssh", api_version=None)


@settings(max_examples=200)
@given(st.text(DEVICE_ID_CHARS, min_size=1, max_size=128))
def test_any_legal_device_id_round_trips_through_quote(device_id: str) -> None:
    target = ("/devices/" + quote(device_id, safe="") + "/streams").encode("ascii")
    assert parse_route(b"GET", target) == ControlChannel(device_id=device_id)


@settings(max_examples=100)
@given(
    st.text(DEVICE_ID_CHARS, min_size=1, max_size=128),
    st.text(STREAM_NAME_CHARS, min_size=1, max_size=64),
    st.text(max_size=20),
)
def test_initiate_round_trips(device_id: str, name: str, api_version: str) -> None:
    target = (
        f"/twins/{quote(device_id, safe='')}/streams/{quote(name, safe='')}"
        f"?api-version={quote(api_version, safe='')}"
    ).encode("ascii")
    route = parse_route(b"POST", target)
    assert route == Initiate(device_id=device_id, stream_name=name, api_version=api_version)


@pytest.mark.parametrize(
    "target",
    [
        b"/",
        b"/nope",
        b"//devices",
        b"/devices/a/b",
        b"/devices/a/streams/x",
        b"/Devices",
        b"/healthz/",
        b"/%64evices",  # fixed segments match literally
        b"/twins/a/streams",
        b"/twins/a/stream/s",
        b"/bridges",
        b"/bridges/a/b",
    ],
)
def test_not_found(target: bytes) -> None:
    for method in METHODS:
        assert refused(method, target).code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize(
    ("target", "kind"),
    [
        (b"/twins/d/streams/s", Initiate),
        (b"/devices/d/streams", ControlChannel),
        (b"/bridges/s", BridgeJoin),
        (b"/devices/d", DeviceItem),
        (b"/devices", DeviceList),
        (b"/streams", StreamList),
        (b"/healthz", Health),
        (b"/metrics", Metrics),
        (b"/devices/d/rotate-key", DeviceKeyRotation),
        (b"/policies/p", PolicyItem),
        (b"/policies", PolicyList),
        (b"/policies/p/rotate-key", PolicyKeyRotation),
    ],
)
def test_method_not_allowed(target: bytes, kind: type[Route]) -> None:
    for method in METHODS:
        if method in ALLOWED_METHODS[kind]:
            assert isinstance(parse_route(method, target), kind)
        else:
            error = refused(method, target)
            assert error.code is ErrorCode.METHOD_NOT_ALLOWED
            assert isinstance(error, MethodNotAllowed)
            assert set(error.allow.split(b", ")) == ALLOWED_METHODS[kind]


def test_method_is_checked_before_arguments() -> None:
    assert refused(b"POST", b"/devices/%zz").code is ErrorCode.METHOD_NOT_ALLOWED


@pytest.mark.parametrize(
    ("method", "target", "part"),
    [
        (b"GET", b"/devices/", "deviceId"),
        (b"GET", b"/devices/a%2Fb", "deviceId"),
        (b"GET", b"/devices/a%20b", "deviceId"),
        (b"GET", b"/devices/a%00", "deviceId"),
        (b"GET", b"/devices/%c3%a9", "deviceId"),
        (b"GET", b"/devices/%ff", "deviceId"),
        (b"GET", b"/devices/%zz", "deviceId"),
        (b"GET", b"/devices/a%2", "deviceId"),
        (b"GET", b"/devices/a%", "deviceId"),
        (b"GET", b"/devices/" + b"a" * 129, "deviceId"),
        (b"GET", b"/devices/a~b/streams", "deviceId"),
        (b"POST", b"/twins//streams/ssh", "deviceId"),
        (b"POST", b"/twins/d/streams/", "streamName"),
        (b"POST", b"/twins/d/streams/%2A", "streamName"),
        (b"POST", b"/twins/d/streams/a:b", "streamName"),
        (b"POST", b"/twins/d/streams/" + b"s" * 65, "streamName"),
        (b"POST", b"/twins/d/streams/s?api-version=1&api-version=2", "api-version"),
        (b"POST", b"/twins/d/streams/s?api-version=%ff", "api-version"),
        (b"GET", b"/bridges/s?role=%ff", "role"),
        (b"GET", b"/bridges/a.b", "streamId"),
        (b"GET", b"/bridges/" + b"s" * 65, "streamId"),
        (b"GET", b"/bridges/%", "streamId"),
        (b"GET", b"/bridges/s?role=client", "role"),
        (b"GET", b"/bridges/s?role=Device", "role"),
        (b"GET", b"/bridges/s?role", "role"),
        (b"GET", b"/bridges/s?role=device&role=device", "role"),
        (b"GET", b"/bridges/s?" + b"&".join([b"k=v"] * 100), "query"),
        (b"POST", b"/devices/d/rotate-key?key=both", "key"),
        (b"POST", b"/devices/d/rotate-key?key=Primary", "key"),
        (b"POST", b"/policies/p/rotate-key?key=primary&key=primary", "key"),
        (b"GET", b"/policies/a%20b", "keyName"),
        (b"GET", b"/policies/a:b", "keyName"),
        (b"GET", b"/policies/" + b"p" * 65, "keyName"),
        (b"POST", b"/policies/a%zz/rotate-key", "keyName"),
    ],
)
def test_argument_invalid_names_the_part(method: bytes, target: bytes, part: str) -> None:
    error = refused(method, target)
    assert error.code is ErrorCode.ARGUMENT_INVALID
    assert part in error.message


def test_messages_do_not_echo_values() -> None:
    error = refused(b"GET", b"/devices/secret%20value")
    assert "secret" not in error.message


@pytest.mark.parametrize(
    "target",
    [
        b"",
        b"*",
        b"devices",
        b"ftp://hub/devices",
        b"http:/hub/devices",
        b"http://hub devices",
        b"/devices/a#b",
        b"/devices/a b",
        b"/devices/\xc3\xa9",
        b"/devices/a\x00",
        b"/devices?x=\x7f",
        b'/devices/"a"',
        b"/" + b"a" * MAX_TARGET_LENGTH,
    ],
)
def test_malformed_request(target: bytes) -> None:
    for method in METHODS:
        assert refused(method, target).code is ErrorCode.MALFORMED_REQUEST


@pytest.mark.parametrize(
    ("absolute", "origin"),
    [
        (b"http://hub.test/devices/d1", b"/devices/d1"),
        (
            b"HTTPS://hub.test:8080/twins/d1/streams/ssh?api-version=1",
            b"/twins/d1/streams/ssh?api-version=1",
        ),
        (b"http://[::1]:8080/healthz", b"/healthz"),
        (b"http://user@hub.test/streams", b"/streams"),
        (b"http://hub.test?x=1", b"/?x=1"),
    ],
)
def test_a_target_in_absolute_form_is_read_as_its_path(absolute: bytes, origin: bytes) -> None:
    """RFC 9112 §3.2.2: a server accepts the absolute form (what a client sends a proxy)."""
    for method in METHODS:
        try:
            expected: object = parse_route(method, origin)
        except RemoteProtocolError as exc:
            expected = (exc.code, exc.message)
        try:
            got: object = parse_route(method, absolute)
        except RemoteProtocolError as exc:
            got = (exc.code, exc.message)
        assert got == expected


def test_target_length_limit_is_exact() -> None:
    query = b"?x=" + b"a" * (MAX_TARGET_LENGTH - len(b"/healthz?x="))
    assert parse_route(b"GET", b"/healthz" + query) == Health()
    assert len(b"/healthz" + query) == MAX_TARGET_LENGTH
    assert refused(b"GET", b"/healthz" + query + b"a").code is ErrorCode.MALFORMED_REQUEST


def test_unused_query_is_not_parsed_strictly() -> None:
    assert parse_route(b"GET", b"/healthz?a=%ff&a=1") == Health()
    assert parse_route(b"GET", b"/bridges/s?api-version=%ff&x=%zz&rol%ff=1") == BridgeJoin(
        stream_id="s", role=None
    )
    initiate = parse_route(b"POST", b"/twins/d/streams/s?role=%ff&api-version=a+b%2B")
    assert initiate == Initiate(device_id="d", stream_name="s", api_version="a b+")


@settings(max_examples=500)
@given(st.sampled_from(METHODS) | st.binary(max_size=8), st.binary(max_size=200))
def test_returns_a_route_or_raises_remote_protocol_error(method: bytes, target: bytes) -> None:
    try:
        route = parse_route(method, target)
    except RemoteProtocolError as exc:
        assert exc.code in {
            ErrorCode.MALFORMED_REQUEST,
            ErrorCode.NOT_FOUND,
            ErrorCode.METHOD_NOT_ALLOWED,
            ErrorCode.ARGUMENT_INVALID,
        }
    else:
        assert method in ALLOWED_METHODS[type(route)]


@settings(max_examples=300)
@given(
    st.lists(
        st.sampled_from(["devices", "twins", "streams", "bridges", "healthz", "d1", "%41", ""])
        | st.text(DEVICE_ID_CHARS, max_size=6),
        max_size=5,
    ),
    st.sampled_from(["", "?role=device", "?api-version=1", "?role=x"]),
)
def test_route_shaped_targets(segments: list[str], query: str) -> None:
    target = ("/" + "/".join(segments) + query).encode("ascii")
    for method in METHODS:
        try:
            route = parse_route(method, target)
        except RemoteProtocolError:
            continue
        if isinstance(route, Initiate | ControlChannel | DeviceItem):
            assert is_valid_device_id(route.device_id)


# --------------------------------------------------------------------------------------------
# The fuzz harness, in its fallback mode
# --------------------------------------------------------------------------------------------


def load_fuzz_module(name: str) -> ModuleType:
    path = Path(__file__).resolve().parents[1] / "fuzz" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"devstream_fuzz_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_http_path_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    fuzz = load_fuzz_module("fuzz_http_path")
    fuzz.run_fallback(2000, seed=1)

    # The loop does report a crash, with the input that caused it.
    def broken_check(data: bytes) -> None:
        raise KeyError("boom")

    monkeypatch.setattr(fuzz, "check", broken_check)
    with pytest.raises(fuzz.Crash) as info:
        fuzz.run_fallback(1, seed=1)
    assert info.value.data == fuzz.SEEDS[0]
    assert fuzz.main(["--fallback", "--iterations", "1"]) == 1


def test_fuzz_http_path_main_fallback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    fuzz = load_fuzz_module("fuzz_http_path")
    assert fuzz.main(["--fallback", "--iterations", "50", "--seed", "3"]) == 0
    assert "ok:" in capsys.readouterr().out
    crash_file = tmp_path / "input"
    crash_file.write_bytes(b"GET /devices/%41")
    assert fuzz.main(["--fallback", str(crash_file)]) == 0


def _api_version_as_parse_qs_reads_it(query: str) -> str | ErrorCode | None:
    """What the ``api-version`` of *query* is by the standard library's reading of it."""
    from urllib.parse import parse_qs

    from devstream_core.routes import MAX_QUERY_FIELDS

    try:
        fields = parse_qs(query, keep_blank_values=True, max_num_fields=MAX_QUERY_FIELDS)
    except ValueError:
        return ErrorCode.ARGUMENT_INVALID
    values = fields.get("api-version")
    if values is None:
        return None
    return values[0] if len(values) == 1 else ErrorCode.ARGUMENT_INVALID


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.sampled_from(["api-version", "api", "version", "=", "&", "2020-09-30", "-", "x"]),
        max_size=12,
    ).map("".join)
    | st.integers(60, 70).map(lambda n: "&".join(["a=1"] * n)),
)
def test_a_query_with_nothing_to_decode_reads_as_parse_qs_reads_it(query: str) -> None:
    """Without ``%`` or ``+`` the query is read without decoding (the usual initiate); the
    value, its absence, a repeated key and too many fields come out as ``parse_qs`` says."""
    expected = _api_version_as_parse_qs_reads_it(query)
    target = f"/twins/dev/streams/echo?{query}".encode()
    if isinstance(expected, ErrorCode):
        with pytest.raises(RemoteProtocolError) as info:
            parse_route(b"POST", target)
        assert info.value.code is expected
    else:
        route = parse_route(b"POST", target)
        assert isinstance(route, Initiate)
        assert route.api_version == expected


@pytest.mark.parametrize("escape", ["%41", "+"])
def test_too_many_query_fields_are_refused_whether_or_not_they_are_decoded(escape: str) -> None:
    """More than MAX_QUERY_FIELDS fields: refused with the same error on both readings (the
    one that decodes, for a query with ``%`` or ``+``, and the one that need not)."""
    from devstream_core.routes import MAX_QUERY_FIELDS

    for query in (f"a={escape}&" * MAX_QUERY_FIELDS, "a=1&" * MAX_QUERY_FIELDS):
        with pytest.raises(RemoteProtocolError) as info:
            parse_route(b"POST", f"/twins/dev/streams/echo?{query}".encode())
        assert info.value.code is ErrorCode.ARGUMENT_INVALID
        assert f"more than {MAX_QUERY_FIELDS} fields" in info.value.message
    fields = "&".join([f"a={escape}"] * (MAX_QUERY_FIELDS - 1))  # exactly the limit: read
    route = parse_route(b"POST", f"/twins/dev/streams/echo?{fields}&api-version=1".encode())
    assert isinstance(route, Initiate)
    assert route.api_version == "1"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        (b"GET", "/devices"),
        (b"GET", "/devices/dev"),
        (b"PUT", "/devices/dev"),
        (b"GET", "/devices/dev/streams"),
        (b"GET", "/bridges/abc"),
        (b"GET", "/policies"),
        (b"GET", "/policies/iothubowner"),
        (b"GET", "/streams"),
        (b"GET", "/healthz"),
        (b"GET", "/metrics"),
        (b"POST", "/devices/dev/rotate-key"),
    ],
)
def test_the_query_field_limit_holds_on_every_route(method: bytes, path: str) -> None:
    """Routes that read no query refuse too many fields as those that do (400004), after
    the path and method checks."""
    from devstream_core.routes import MAX_QUERY_FIELDS

    route = parse_route(method, f"{path}?{'&'.join(['x=1'] * MAX_QUERY_FIELDS)}".encode())
    assert route == parse_route(method, path.encode())
    with pytest.raises(RemoteProtocolError) as info:
        parse_route(method, f"{path}?{'x=1&' * MAX_QUERY_FIELDS}x=1".encode())
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert f"more than {MAX_QUERY_FIELDS} fields" in info.value.message
    with pytest.raises(MethodNotAllowed):
        parse_route(b"PATCH", f"{path}?{'x=1&' * MAX_QUERY_FIELDS}x=1".encode())
