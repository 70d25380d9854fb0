"""Tests for devstream_core.credentials: connection strings and SAS tokens.

Rules for this module: no clock (``now`` is always a literal), no randomness outside
hypothesis, whole strings only (there is no incremental parser, so no chunking tests; instead
arbitrary text must either parse or raise ``CredentialError``). Known-answer signatures are
computed here with ``hmac``/``hashlib`` directly, never with ``credentials.sign``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import itertools
import random
import string
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstream_core import credentials
from devstream_core.common import Role
from devstream_core.credentials import (
    MAX_SAS_TOKEN_LENGTH,
    ConnectionString,
    RequestTokens,
    SasToken,
    SasVerifier,
    device_resource,
    expired_signature_error,
    make_sas_token,
    parse_sas_token,
    sign,
    verify_sas_token,
)
from devstream_core.errors import CredentialError, ErrorCode, LocalProtocolError
from devstream_core.exceptions import Unauthorized

from ._helpers import load_fuzz_harness

KEY = "ZGV2c3RyZWFtIHRlc3Qga2V5IGZvciBjcmVkZW50aWFscw=="  # has '=' padding
KEY2 = "c2Vjb25kYXJ5IGtleSBvZiB0aGUgc2FtZSBkZXZpY2U="
OTHER_KEY = "c29tZWJvZHkgZWxzZSdzIGtleQ=="
HOST = "hub.example.com:8080"
NOW = 1_700_000_000.0
LATER = 1_700_003_600


def _hmac_b64(key: str, message: str) -> str:
    digest = hmac.new(base64.b64decode(key), message.encode(), hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


# --- connection strings: parsing and formatting ----------------------------------------------


def test_parse_device_connection_string() -> None:
    cs = ConnectionString.parse(f"HostName={HOST};DeviceId=d1;SharedAccessKey={KEY}")
    assert cs == ConnectionString(host_name=HOST, device_id="d1", shared_access_key=KEY)
    assert cs.role is Role.DEVICE
    assert cs.use_tls is True
    assert cs.shared_access_key == KEY  # padding kept: the value was split on the first '='
    assert cs.http_base_url == "https://hub.example.com:8080"
    assert cs.ws_base_url == "wss://hub.example.com:8080"
    assert cs.resource == "hub.example.com:8080/devices/d1"


def test_parse_service_connection_string() -> None:
    cs = ConnectionString.parse(
        f"HostName=hub.example.com;SharedAccessKeyName=service;SharedAccessKey={KEY}"
    )
    assert cs.role is Role.SERVICE
    assert cs.shared_access_key_name == "service"
    assert cs.device_id is None
    assert cs.resource == "hub.example.com"
    assert str(cs) == f"HostName=hub.example.com;SharedAccessKeyName=service;SharedAccessKey={KEY}"


def test_parse_is_tolerant_of_case_whitespace_empty_pairs_and_unknown_keys() -> None:
    cs = ConnectionString.parse(
        f" hostname = 127.0.0.1:8080 ;;DEVICEID=d1 ; sharedaccesskey={KEY};usetls=FALSE;"
        "GatewayHostName=gw.example.com;SomethingNew=1;"
    )
    assert cs == ConnectionString(
        host_name="127.0.0.1:8080", device_id="d1", shared_access_key=KEY, use_tls=False
    )
    assert str(cs) == f"HostName=127.0.0.1:8080;DeviceId=d1;SharedAccessKey={KEY};UseTls=false"
    assert cs.http_base_url == "http://127.0.0.1:8080"
    assert cs.ws_base_url == "ws://127.0.0.1:8080"


@pytest.mark.parametrize("flag", ["true", "TRUE", "True"])
def test_use_tls_true_is_the_default_and_not_formatted(flag: str) -> None:
    cs = ConnectionString.parse(f"HostName=h;DeviceId=d;SharedAccessKey={KEY};UseTls={flag}")
    assert cs.use_tls is True
    assert "UseTls" not in str(cs)


@pytest.mark.parametrize(
    ("host", "base"),
    [
        ("127.0.0.1:8080", "127.0.0.1:8080"),
        ("hub.example.com:443", "hub.example.com:443"),
        ("[::1]:8080", "[::1]:8080"),
        ("[2001:db8::1]", "[2001:db8::1]"),
        ("localhost", "localhost"),
        ("my_host-1.internal:65535", "my_host-1.internal:65535"),
    ],
)
def test_host_names_with_ports_and_ipv6(host: str, base: str) -> None:
    cs = ConnectionString.parse(f"HostName={host};DeviceId=d;SharedAccessKey={KEY}")
    assert cs.host_name == host
    assert cs.http_base_url == f"https://{base}"
    assert ConnectionString.parse(str(cs)) == cs


def test_device_id_with_every_allowed_special_character_and_equals() -> None:
    device_id = "a-.+%_#*?!(),:=@$'z"
    cs = ConnectionString.parse(f"HostName=h;DeviceId={device_id};SharedAccessKey={KEY}")
    assert cs.device_id == device_id
    assert ConnectionString.parse(str(cs)) == cs


def test_repr_hides_the_key() -> None:
    cs = ConnectionString(host_name="h", device_id="d", shared_access_key=KEY)
    assert KEY not in repr(cs)


_BAD: list[tuple[str, str]] = [
    (f"DeviceId=d;SharedAccessKey={KEY}", "connection string: missing HostName"),
    ("HostName=h;DeviceId=d", "connection string: missing SharedAccessKey"),
    (
        "HostName=h;DeviceId=d;SharedAccessKey=not*base64",
        "connection string: SharedAccessKey is not valid base64",
    ),
    (
        "HostName=h;DeviceId=d;SharedAccessKey=ZGV2c3RyZWFt=",
        "connection string: SharedAccessKey is not valid base64",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKeyName=s;SharedAccessKey={KEY}",
        "connection string: has both DeviceId and SharedAccessKeyName",
    ),
    (
        f"HostName=h;SharedAccessKey={KEY}",
        "connection string: has neither DeviceId nor SharedAccessKeyName",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKey={KEY};UseTls=yes",
        "connection string: UseTls must be true or false",
    ),
    (
        f"HostName=x y;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName 'x y' is not a valid host[:port]",
    ),
    (
        f"HostName=h:0;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName 'h:0' is not a valid host[:port]",
    ),
    (
        f"HostName=h:65536;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName 'h:65536' is not a valid host[:port]",
    ),
    (
        f"HostName=::1;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName '::1' is not a valid host[:port]",
    ),
    (
        f"HostName=[::1;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName '[::1' is not a valid host[:port]",
    ),
    (
        f"HostName=[::1]x;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName '[::1]x' is not a valid host[:port]",
    ),
    (
        f"HostName=[nope]:1;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName '[nope]:1' is not a valid host[:port]",
    ),
    (
        f"HostName=[fe80::1%eth0];DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName '[fe80::1%eth0]' is not a valid host[:port]",
    ),
    (
        f"HostName=-bad-.com;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName '-bad-.com' is not a valid host[:port]",
    ),
    (
        f"HostName=h;HostName=h;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: duplicate key HostName",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKey={KEY};sharedaccesskey={KEY}",
        "connection string: duplicate key SharedAccessKey",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKey={KEY};X=1;x=2",
        "connection string: an unknown key appears twice",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKey={KEY};abc",
        "connection string: pair 'abc' has no '='",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKey={KEY};{'a' * 17}",
        "connection string: a pair of 17 characters has no '='",
    ),
    (
        f"HostName=h+a;DeviceId=d;SharedAccessKey={KEY}",
        "connection string: HostName 'h+a' is not a valid host[:port]",
    ),
    (
        f"HostName={'h.' * 40} x;DeviceId=d;SharedAccessKey={KEY}",
        f"connection string: HostName '{'h.' * 32}...' is not a valid host[:port]",
    ),
    (
        "HostName=h;DeviceId=d;SharedAccessKey=QQ=A",
        "connection string: SharedAccessKey is not valid base64",
    ),
    (
        "HostName=h;DeviceId=d;SharedAccessKey=QQ",
        "connection string: SharedAccessKey is not valid base64",
    ),
    (
        "HostName=h;DeviceId=d;SharedAccessKey=\u00e9",
        "connection string: SharedAccessKey is not valid base64",
    ),
    (
        f"HostName=h;DeviceId=d;SharedAccessKey={KEY};=v",
        "connection string: a pair has an empty key",
    ),
    (
        f"HostName=h;DeviceId=d;ModuleId=m;SharedAccessKey={KEY}",
        "connection string: ModuleId is not supported (devstream has no modules)",
    ),
    (f"HostName=;DeviceId=d;SharedAccessKey={KEY}", "connection string: HostName is empty"),
    (f"HostName=h;DeviceId=;SharedAccessKey={KEY}", "connection string: DeviceId is empty"),
    (
        f"HostName=h;SharedAccessKeyName= ;SharedAccessKey={KEY}",
        "connection string: SharedAccessKeyName is empty",
    ),
    ("HostName=h;DeviceId=d;SharedAccessKey=", "connection string: SharedAccessKey is empty"),
    (
        f"HostName=h;DeviceId=d/e;SharedAccessKey={KEY}",
        "connection string: DeviceId is not a valid device id",
    ),
    (
        f"HostName=h;DeviceId={'d' * 129};SharedAccessKey={KEY}",
        "connection string: DeviceId is not a valid device id",
    ),
    (
        f"HostName=h;SharedAccessKeyName=a b;SharedAccessKey={KEY}",
        "connection string: SharedAccessKeyName is not a valid policy name",
    ),
    ("x" * 4097, "connection string: longer than 4096 characters"),
]


@pytest.mark.parametrize(("text", "message"), _BAD)
def test_every_connection_string_error(text: str, message: str) -> None:
    with pytest.raises(CredentialError) as info:
        ConnectionString.parse(text)
    assert info.value.code is ErrorCode.INVALID_CONNECTION_STRING
    assert info.value.message.startswith(message)
    assert KEY not in str(info.value)


@pytest.mark.parametrize(
    "text",
    [
        # The key slipped into another field for want of a ';'.
        f"HostName=h SharedAccessKey={KEY};DeviceId=d",
        f"HostName=h;DeviceId=d SharedAccessKey={KEY}",
        # The key pasted without its name (unpadded keys have no '=').
        "HostName=h;DeviceId=d;ZGV2c3RyZWFtIHRlc3Qga2V5IGZvciBjcmVkZW50aWFsc3M",
        # The key's value pasted into the host as well as given properly.
        f"HostName={KEY};DeviceId=d;SharedAccessKey={KEY}",
        # A key-like run in the host, even with no SharedAccessKey given.
        f"HostName=h {KEY};DeviceId=d",
        # A short key (with its padding stripped) in the host, and repeated as a bare pair.
        "HostName=h x c2hvcnQ;DeviceId=d;SharedAccessKey=c2hvcnQ=",
        "HostName=h;DeviceId=d;SharedAccessKey=Zm9v;Zm9v",
    ],
)
def test_messages_never_contain_the_key(text: str) -> None:
    with pytest.raises(CredentialError) as info:
        ConnectionString.parse(text)
    shown = str(info.value)
    for secret in (KEY, "ZGV2c3RyZWFtIHRlc3Qga2V5", "c2hvcnQ", "Zm9v"):
        assert secret not in shown


_ID_CHARS = string.ascii_letters + string.digits + "-.+%_#*?!(),:=@$'"
_label = st.from_regex(r"[A-Za-z0-9_]([A-Za-z0-9_\-]{0,10}[A-Za-z0-9_])?", fullmatch=True)
_dns = st.lists(_label, min_size=1, max_size=4).map(".".join)
_ipv6 = st.ip_addresses(v=6).map(lambda a: f"[{a}]")
_ipv4 = st.ip_addresses(v=4).map(str)
_port = st.none() | st.integers(1, 65535)
_host = st.builds(
    lambda host, port: host if port is None else f"{host}:{port}", _dns | _ipv4 | _ipv6, _port
)
_id = st.text(_ID_CHARS, min_size=1, max_size=128)
_key = st.binary(min_size=1, max_size=64).map(lambda b: base64.b64encode(b).decode())


@st.composite
def _connection_strings(draw: st.DrawFn) -> ConnectionString:
    is_device = draw(st.booleans())
    return ConnectionString(
        host_name=draw(_host),
        shared_access_key=draw(_key),
        device_id=draw(_id) if is_device else None,
        shared_access_key_name=None if is_device else draw(_id),
        use_tls=draw(st.booleans()),
    )


@settings(max_examples=300)
@given(_connection_strings())
def test_round_trip(cs: ConnectionString) -> None:
    assert ConnectionString.parse(str(cs)) == cs
    assert cs.role is (Role.DEVICE if cs.device_id is not None else Role.SERVICE)


@settings(max_examples=100)
@given(_connection_strings(), st.randoms(use_true_random=False))
def test_round_trip_with_shuffled_recased_spaced_pairs(
    cs: ConnectionString, rnd: random.Random
) -> None:
    pairs = str(cs).split(";")
    rnd.shuffle(pairs)
    messy = []
    for pair in pairs:
        key, _, value = pair.partition("=")
        key = "".join(c.upper() if rnd.random() < 0.5 else c.lower() for c in key)
        messy.append(f" {key} = {value} ")
    assert ConnectionString.parse(";".join(messy) + ";") == cs


@settings(max_examples=300)
@given(st.text(max_size=200))
def test_parse_arbitrary_text_returns_or_raises_credential_error(text: str) -> None:
    try:
        cs = ConnectionString.parse(text)
    except CredentialError as exc:
        assert exc.code is ErrorCode.INVALID_CONNECTION_STRING
        assert exc.message.startswith("connection string: ")
    else:
        assert ConnectionString.parse(str(cs)) == cs


@settings(max_examples=200)
@given(
    st.lists(
        st.sampled_from(
            ["HostName", "DeviceId", "SharedAccessKeyName", "SharedAccessKey", "UseTls", "X"]
        ).flatmap(lambda k: st.tuples(st.just(k), st.text(max_size=12) | st.just(KEY))),
        max_size=6,
    )
)
def test_structured_garbage_never_leaks_the_key(pairs: list[tuple[str, str]]) -> None:
    text = ";".join(f"{k}={v}" for k, v in pairs)
    try:
        ConnectionString.parse(text)
    except CredentialError as exc:
        assert KEY not in str(exc)


def test_direct_construction_is_validated() -> None:
    with pytest.raises(LocalProtocolError) as info:
        ConnectionString(host_name="x y", device_id="d", shared_access_key=KEY)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    with pytest.raises(LocalProtocolError):
        ConnectionString(host_name="h", shared_access_key=KEY)
    with pytest.raises(LocalProtocolError) as info:
        ConnectionString(host_name="h", device_id="d", shared_access_key="%%%")
    assert "%%%" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"host_name": b"h", "device_id": "d", "shared_access_key": KEY},
        {"host_name": "h", "device_id": "d", "shared_access_key": None},
        {"host_name": "h", "device_id": 1, "shared_access_key": KEY},
        {"host_name": "h", "device_id": "d", "shared_access_key": KEY, "use_tls": "false"},
        {"host_name": "h" * 300, "device_id": "d", "shared_access_key": KEY},
    ],
    ids=repr,
)
def test_direct_construction_checks_types_and_lengths(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        ConnectionString(**kwargs)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_non_str_input_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        ConnectionString.parse(b"HostName=h")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        parse_sas_token(b"SharedAccessSignature sr=a&sig=b&se=1")  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError):
        sign(KEY, "\udc80")
    with pytest.raises(LocalProtocolError):
        verify_sas_token(
            make_sas_token(resource="a", key=KEY, expiry=9), keys=[KEY], resource="", now=0
        )


# --- SAS tokens ------------------------------------------------------------------------------

DEVICE_RESOURCE = "hub.example.com:8080/devices/d1"
ENCODED_DEVICE_RESOURCE = "hub.example.com%3A8080%2Fdevices%2Fd1"


def test_known_answer_vector() -> None:
    key = "ZGV2c3RyZWFtIGtub3duLWFuc3dlciBrZXkgMDAwMQ=="  # b"devstream known-answer key 0001"
    assert base64.b64decode(key) == b"devstream known-answer key 0001"
    expected_sig = "cYr7XY5BXr9antqc/vkJkO9iS5cmttWI7zciVsXDqys="
    computed = hmac.new(
        b"devstream known-answer key 0001",
        b"hub.example.com%3A8080%2Fdevices%2Fd1\n1700000000",
        hashlib.sha256,
    ).digest()
    assert base64.b64encode(computed).decode() == expected_sig
    encoded_sig = expected_sig.replace("+", "%2B").replace("/", "%2F").replace("=", "%3D")
    expected = (
        "SharedAccessSignature sr=hub.example.com%3A8080%2Fdevices%2Fd1"
        f"&sig={encoded_sig}&se=1700000000"
    )
    assert make_sas_token(resource=DEVICE_RESOURCE, key=key, expiry=1_700_000_000) == expected
    cs = ConnectionString(host_name=HOST, device_id="d1", shared_access_key=key)
    assert cs.sas_token(expiry=1_700_000_000) == expected
    token = verify_sas_token(expected, keys=[key], resource=DEVICE_RESOURCE, now=1_699_999_999)
    assert token.se == 1_700_000_000


def test_sign_matches_hmac() -> None:
    assert sign(KEY, "a\nb") == _hmac_b64(KEY, "a\nb")


def test_sign_rejects_bad_key() -> None:
    with pytest.raises(LocalProtocolError) as info:
        sign("not base64!", "m")
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_device_resource() -> None:
    assert device_resource(HOST, "d1") == DEVICE_RESOURCE


def test_service_token_has_skn_and_host_resource() -> None:
    cs = ConnectionString(host_name=HOST, shared_access_key_name="svc", shared_access_key=KEY)
    text = cs.sas_token(expiry=LATER)
    token = parse_sas_token(text)
    assert token.sr == "hub.example.com%3A8080"
    assert token.resource == HOST
    assert token.skn == "svc"
    assert token.sig == _hmac_b64(KEY, f"hub.example.com%3A8080\n{LATER}").replace(
        "+", "%2B"
    ).replace("/", "%2F").replace("=", "%3D")
    assert verify_sas_token(text, keys=[KEY], resource=HOST, now=NOW) == token


def test_sign_and_verify_device_token() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    token = parse_sas_token(text)
    assert token.sr == ENCODED_DEVICE_RESOURCE
    assert token.resource == DEVICE_RESOURCE
    assert token.se == LATER
    assert token.skn is None
    assert KEY not in repr(token) and token.sig not in repr(token)
    assert verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW) == token
    assert verify_sas_token(token, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW) == token


def _fields(text: str) -> list[str]:
    return text.removeprefix("SharedAccessSignature ").split("&")


@pytest.mark.parametrize("with_skn", [False, True])
def test_fields_in_every_order(with_skn: bool) -> None:
    policy = "svc" if with_skn else None
    resource = HOST if with_skn else DEVICE_RESOURCE
    text = make_sas_token(resource=resource, key=KEY, expiry=LATER, policy_name=policy)
    fields = _fields(text)
    assert len(fields) == (4 if with_skn else 3)
    expected = parse_sas_token(text)
    for order in itertools.permutations(fields):
        reordered = "SharedAccessSignature " + "&".join(order)
        assert parse_sas_token(reordered) == expected
        assert verify_sas_token(reordered, keys=[KEY], resource=resource, now=NOW) == expected


def test_sr_url_encoded_against_hub_host_and_case_insensitive_host() -> None:
    sr = ENCODED_DEVICE_RESOURCE
    sig = _hmac_b64(KEY, f"{sr}\n{LATER}")
    text = f"SharedAccessSignature sr={sr}&sig={sig}&se={LATER}"  # sig not url-encoded
    token = verify_sas_token(text, keys=[KEY], resource="HUB.Example.com:8080/devices/d1", now=NOW)
    assert token.sr == sr
    assert token.sig == sig


def test_unencoded_sr_is_signed_as_written() -> None:
    sr = DEVICE_RESOURCE  # some clients do not url-encode sr
    sig = _hmac_b64(KEY, f"{sr}\n{LATER}")
    text = f"SharedAccessSignature sr={sr}&sig={sig}&se={LATER}"
    assert verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW).sr == sr


@pytest.mark.parametrize("now", [float(LATER), LATER + 0.5, LATER + 3600.0, float("nan")])
def test_expired(now: float) -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    with pytest.raises(CredentialError) as info:
        verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=now)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert info.value.message == "SAS token expired"


def test_not_expired_just_before() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    assert verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=LATER - 0.001)


def _refused(text: str | SasToken, message: str, *, resource: str = DEVICE_RESOURCE) -> None:
    with pytest.raises(CredentialError) as info:
        verify_sas_token(text, keys=[KEY, KEY2], resource=resource, now=NOW)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert info.value.message == message
    for secret in (KEY, KEY2):
        assert secret not in str(info.value)
    if isinstance(text, str) and "sig=" in text:
        sig = dict(f.partition("=")[::2] for f in _fields(text))["sig"]
        assert sig not in str(info.value)


def test_wrong_key() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=OTHER_KEY, expiry=LATER)
    _refused(text, "SAS token signature does not match")


def test_secondary_key() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY2, expiry=LATER)
    token = verify_sas_token(text, keys=[KEY, KEY2], resource=DEVICE_RESOURCE, now=NOW)
    assert token.resource == DEVICE_RESOURCE
    with pytest.raises(CredentialError):
        verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW)


def test_wrong_device() -> None:
    text = make_sas_token(resource=f"{HOST}/devices/d2", key=KEY, expiry=LATER)
    _refused(text, "SAS token is for another resource")


@pytest.mark.parametrize("token_resource", [f"{HOST}/devices/d", f"{HOST}/devices/d1x"])
def test_other_resources_are_refused(token_resource: str) -> None:
    text = make_sas_token(resource=token_resource, key=KEY, expiry=LATER)
    _refused(text, "SAS token is for another resource")


@pytest.mark.parametrize(
    ("token_resource", "token_host"),
    [("hub.example.com/devices/d1", "hub.example.com"), ("other:8080", "other:8080")],
)
def test_a_token_for_another_host_names_both_hosts(token_resource: str, token_host: str) -> None:
    """The usual cause is a HostName that names the hub another way than its public URL
    (``localhost`` for ``127.0.0.1``); the message shows both names and that fix."""
    text = make_sas_token(resource=token_resource, key=KEY, expiry=LATER)
    _refused(
        text,
        f"SAS token is for another resource: it is signed for host {token_host!r} but this "
        f"hub signs for {HOST!r}; HostName in the connection string must be the host of the "
        "hub's --public-url",
    )


@pytest.mark.parametrize("token_resource", [HOST, f"{HOST}/devices", f"{HOST}/devices/"])
def test_scoped_token_covers_paths_below_it(token_resource: str) -> None:
    text = make_sas_token(resource=token_resource, key=KEY, expiry=LATER)
    token = verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW)
    assert token.resource == token_resource


def test_device_token_does_not_cover_the_host() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    _refused(text, "SAS token is for another resource", resource=HOST)


def test_tampered_se() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    tampered = text.replace(f"se={LATER}", f"se={LATER + 1}")
    assert tampered != text
    _refused(tampered, "SAS token signature does not match")


def test_tampered_sig() -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    fields = dict(f.partition("=")[::2] for f in _fields(text))
    sig = fields["sig"]
    flipped = ("B" if sig[0] == "A" else "A") + sig[1:]
    _refused(text.replace(sig, flipped), "SAS token signature does not match")


def test_tampered_sr_with_equivalent_encoding() -> None:
    # Same decoded resource, different bytes as written: the signature covers what is written.
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    _refused(text.replace("%2Fdevices", "%2fdevices"), "SAS token signature does not match")


_SIG = "c2ln"
_SAS_BAD: list[tuple[str, str]] = [
    (f"sr=a&sig={_SIG}&se=1", "SAS token: does not start with 'SharedAccessSignature'"),
    (
        f"sharedaccesssignature sr=a&sig={_SIG}&se=1",
        "SAS token: does not start with 'SharedAccessSignature'",
    ),
    (
        f"SharedAccessSignature  sr=a&sig={_SIG}&se=1",
        "SAS token: contains spaces or characters outside printable ASCII",
    ),
    (
        f"SharedAccessSignature sr=\u00e9&sig={_SIG}&se=1",
        "SAS token: contains spaces or characters outside printable ASCII",
    ),
    (f"SharedAccessSignature sig={_SIG}&se=1", "SAS token: missing sr"),
    ("SharedAccessSignature sr=a&se=1", "SAS token: missing sig"),
    (f"SharedAccessSignature sr=a&sig={_SIG}", "SAS token: missing se"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&se=1", "SAS token: duplicate se"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&sig={_SIG}&se=1", "SAS token: duplicate sig"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&skn=x&skn=x", "SAS token: duplicate skn"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&foo=2", "SAS token: unknown field 'foo'"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&a%b=2", "SAS token: unknown field"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&SR=a", "SAS token: unknown field 'SR'"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&", "SAS token: a field has no '='"),
    (f"SharedAccessSignature sr=a&{_SIG}&se=1", "SAS token: a field has no '='"),
    (f"SharedAccessSignature sr=&sig={_SIG}&se=1", "SAS token: sr is empty"),
    ("SharedAccessSignature sr=a&sig=&se=1", "SAS token: sig is empty"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1&skn=", "SAS token: skn is empty"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=-1", "SAS token: se is not a non-negative"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=01", "SAS token: se is not a non-negative"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1.5", "SAS token: se is not a non-negative"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=\u0661", "SAS token: contains spaces"),
    (f"SharedAccessSignature sr=a&sig={_SIG}&se=1" + "0" * 15, "SAS token: se is not"),
    (
        "SharedAccessSignature sr=" + "a" * MAX_SAS_TOKEN_LENGTH + f"&sig={_SIG}&se=1",
        f"SAS token: longer than {MAX_SAS_TOKEN_LENGTH} characters",
    ),
]


@pytest.mark.parametrize(("text", "message"), _SAS_BAD)
def test_every_sas_parse_error(text: str, message: str) -> None:
    with pytest.raises(CredentialError) as info:
        parse_sas_token(text)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert info.value.message.startswith(message)
    assert _SIG not in str(info.value)
    # verify_sas_token reports the same parse error.
    with pytest.raises(CredentialError) as again:
        verify_sas_token(text, keys=[KEY], resource="a", now=0)
    assert again.value.message == info.value.message


def test_skn_is_url_decoded() -> None:
    text = make_sas_token(resource=HOST, key=KEY, expiry=LATER, policy_name="a&b=c")
    assert "skn=a%26b%3Dc" in text
    assert parse_sas_token(text).skn == "a&b=c"


@pytest.mark.parametrize(
    "keys", [[], "ZGV2c3RyZWFt", ["not base64!"], [KEY, "%%"], [b"Zm9v"]], ids=repr
)
def test_verify_rejects_bad_keys_as_local_errors(keys: object) -> None:
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    with pytest.raises(LocalProtocolError) as info:
        verify_sas_token(text, keys=keys, resource=DEVICE_RESOURCE, now=NOW)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize(
    "kwargs",
    [
        {"resource": DEVICE_RESOURCE, "key": KEY, "expiry": -1},
        {"resource": DEVICE_RESOURCE, "key": KEY, "expiry": True},
        {"resource": DEVICE_RESOURCE, "key": KEY, "expiry": 1.5},
        {"resource": "", "key": KEY, "expiry": 1},
        {"resource": DEVICE_RESOURCE, "key": "nope!", "expiry": 1},
        {"resource": DEVICE_RESOURCE, "key": KEY, "expiry": 1, "policy_name": ""},
        {"resource": "\udc80", "key": KEY, "expiry": 1},
    ],
    ids=repr,
)
def test_make_sas_token_rejects_misuse(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        make_sas_token(**kwargs)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sr": "", "sig": "s", "se": 1},
        {"sr": "a b", "sig": "s", "se": 1},
        {"sr": "a", "sig": "s", "se": -1},
        {"sr": "a", "sig": "s", "se": True},
        {"sr": "a", "sig": 5, "se": 1},
        {"sr": "a", "sig": "s", "se": 1, "skn": 3},
    ],
    ids=repr,
)
def test_sas_token_construction_is_validated(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        SasToken(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=300)
@given(st.text(max_size=200) | st.text(max_size=200).map("SharedAccessSignature ".__add__))
def test_sas_arbitrary_text_returns_or_raises_credential_error(text: str) -> None:
    try:
        token = parse_sas_token(text)
    except CredentialError as exc:
        assert exc.code is ErrorCode.UNAUTHORIZED
        assert exc.message.startswith("SAS token: ")
        return
    with pytest.raises(CredentialError):
        verify_sas_token(token, keys=[KEY], resource=DEVICE_RESOURCE, now=0)


@settings(max_examples=100)
@given(
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    _key,
    st.integers(0, 10**12),
    st.none() | st.text(st.characters(codec="utf-8"), min_size=1, max_size=20),
)
def test_make_then_verify_round_trip(
    resource: str, key: str, expiry: int, policy: str | None
) -> None:
    text = make_sas_token(resource=resource, key=key, expiry=expiry, policy_name=policy)
    token = verify_sas_token(text, keys=[key], resource=resource, now=expiry - 1)
    assert token.resource == resource
    assert token.skn == policy
    assert token.se == expiry


# --- fuzz harnesses, run briefly in-process --------------------------------------------------


@pytest.mark.parametrize("name", ["fuzz_connection_string", "fuzz_sas"])
def test_fuzz_harness_fallback_loop(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    harness = load_fuzz_harness(name)
    harness.run_fallback(2000, seed=1)
    assert harness.main(["--iterations", "200", "--seed", "2"]) == 0
    assert "ok: " in capsys.readouterr().out


@pytest.mark.parametrize("name", ["fuzz_connection_string", "fuzz_sas"])
def test_fuzz_harness_reports_a_crash(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    harness = load_fuzz_harness(name)

    def broken(data: bytes) -> None:
        raise ValueError("planted bug")

    monkeypatch.setattr(harness, "check", broken)
    assert harness.main(["--iterations", "5"]) == 1
    assert "CRASH on input b" in capsys.readouterr().out


# -- SasVerifier: a token verified once is remembered -------------------------------------------


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[SasToken]:
    """The tokens verify_sas_token really checked (signature computed), in order."""
    checked: list[SasToken] = []
    real = credentials.verify_sas_token

    def counting(token: SasToken | str, **kwargs: object) -> SasToken:
        result = real(token, **kwargs)  # type: ignore[arg-type]
        checked.append(result)
        return result

    monkeypatch.setattr(credentials, "verify_sas_token", counting)
    return checked


def policy_token(key: str = KEY, expiry: int = LATER, resource: str = HOST) -> str:
    return make_sas_token(resource=resource, key=key, expiry=expiry, policy_name="service")


def test_verifier_checks_a_token_once_then_remembers_it(verifications: list[SasToken]) -> None:
    verifier = SasVerifier()
    text = policy_token()
    for _ in range(3):
        token = verifier.parse(text)
        verifier.verify(text, token, keys=[KEY, KEY2], resource=HOST, now=NOW)
        assert token.skn == "service"
    assert len(verifications) == 1
    assert len(verifier) == 1


def test_verifier_refuses_a_remembered_token_once_expired() -> None:
    verifier = SasVerifier()
    text = policy_token(expiry=int(NOW) + 30)
    verifier.verify(text, verifier.parse(text), keys=[KEY], resource=HOST, now=NOW)
    for now in (NOW + 30, NOW + 31, float("nan")):
        with pytest.raises(CredentialError, match="expired"):
            verifier.verify(text, verifier.parse(text), keys=[KEY], resource=HOST, now=now)


def test_verifier_checks_again_with_other_keys_or_resource() -> None:
    """Rotated keys (or another resource) mean a new check, which a token signed with the old
    key fails."""
    verifier = SasVerifier()
    text = policy_token(key=KEY)
    verifier.verify(text, verifier.parse(text), keys=[KEY, KEY2], resource=HOST, now=NOW)
    with pytest.raises(CredentialError, match="signature"):
        verifier.verify(text, verifier.parse(text), keys=[OTHER_KEY, KEY2], resource=HOST, now=NOW)
    with pytest.raises(CredentialError, match="another resource"):
        verifier.verify(text, verifier.parse(text), keys=[KEY], resource="hub.other:1", now=NOW)


def test_verifier_never_takes_a_tampered_token_for_a_remembered_one() -> None:
    verifier = SasVerifier()
    text = policy_token()
    verifier.verify(text, verifier.parse(text), keys=[KEY], resource=HOST, now=NOW)
    tampered = text.replace("sig=", "sig=A", 1)
    with pytest.raises(CredentialError, match="signature"):
        verifier.verify(tampered, verifier.parse(tampered), keys=[KEY], resource=HOST, now=NOW)
    # The same fields parsed afresh are not the remembered token: checked again, and pass.
    fresh = parse_sas_token(text)
    verifier.verify(text, fresh, keys=[KEY], resource=HOST, now=NOW)


def test_verifier_remembers_no_failure(verifications: list[SasToken]) -> None:
    verifier = SasVerifier()
    text = policy_token(key=OTHER_KEY)
    for _ in range(2):
        with pytest.raises(CredentialError):
            verifier.verify(text, verifier.parse(text), keys=[KEY], resource=HOST, now=NOW)
    assert len(verifier) == 0
    with pytest.raises(CredentialError):
        verifier.parse("SharedAccessSignature sr=x")


def test_verifier_keeps_at_most_its_size(verifications: list[SasToken]) -> None:
    verifier = SasVerifier(size=4)
    texts = [policy_token(expiry=LATER + i) for i in range(6)]
    for text in texts:
        verifier.verify(text, verifier.parse(text), keys=[KEY], resource=HOST, now=NOW)
    assert len(verifier) == 4
    # The newest are remembered, the oldest were dropped and are checked again.
    for text in texts[2:] + texts[:1]:
        verifier.verify(text, verifier.parse(text), keys=[KEY], resource=HOST, now=NOW)
    assert len(verifications) == 6 + 1
    with pytest.raises(LocalProtocolError):
        SasVerifier(size=0)


# --- the hub's maximum SAS lifetime ----------------------------------------------------------


def test_max_lifetime_refuses_a_token_that_expires_further_out() -> None:
    # LATER is exactly 3600 s after NOW.
    text = make_sas_token(resource=DEVICE_RESOURCE, key=KEY, expiry=LATER)
    for limit in (None, 3600.0, 7200.0):
        assert (
            verify_sas_token(
                text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW, max_lifetime=limit
            ).se
            == LATER
        )
    for limit in (3599.0, 60.0):
        with pytest.raises(CredentialError) as info:
            verify_sas_token(
                text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW, max_lifetime=limit
            )
        assert info.value.code is ErrorCode.UNAUTHORIZED
        assert f"more than {limit:g} s away" in info.value.message
        assert KEY not in info.value.message and "sig=" not in info.value.message
    # A minute later the same token is within 3599 s.
    verify_sas_token(text, keys=[KEY], resource=DEVICE_RESOURCE, now=NOW + 60, max_lifetime=3599)


def test_sas_verifier_applies_the_max_lifetime_even_to_a_remembered_token() -> None:
    text = make_sas_token(resource=HOST, key=KEY, expiry=LATER, policy_name="svc")
    verifier = SasVerifier()
    token = verifier.parse(text)
    verifier.verify(text, token, keys=[KEY], resource=HOST, now=NOW)
    assert len(verifier) == 1
    with pytest.raises(CredentialError) as info:
        verifier.verify(text, token, keys=[KEY], resource=HOST, now=NOW, max_lifetime=600)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    verifier.verify(text, token, keys=[KEY], resource=HOST, now=NOW, max_lifetime=3600)


# --- when a client renews its token ------------------------------------------------------------


def test_sas_renewal_time_is_well_before_the_expiry() -> None:
    assert credentials.SAS_RENEW_FRACTION == 0.85
    assert credentials.sas_renewal_time(issued_at=NOW, expiry=NOW + 3600) == NOW + 3060
    assert credentials.sas_renewal_time(issued_at=NOW, expiry=NOW + 100, fraction=0.8) == NOW + 80
    for kwargs in (
        {"issued_at": NOW, "expiry": NOW},
        {"issued_at": NOW, "expiry": NOW - 1},
        {"issued_at": NOW, "expiry": NOW + 100, "fraction": 1.0},
        {"issued_at": NOW, "expiry": NOW + 100, "fraction": 0.0},
    ):
        with pytest.raises(LocalProtocolError):
            credentials.sas_renewal_time(**kwargs)  # type: ignore[arg-type]


def test_verifier_parse_refuses_what_is_no_text_as_parse_sas_token_does() -> None:
    verifier = SasVerifier()
    for value in (b"SharedAccessSignature sr=a&sig=b&se=1", None):
        with pytest.raises(LocalProtocolError) as info:
            verifier.parse(value)  # type: ignore[arg-type]
        assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert len(verifier) == 0


# -- RequestTokens: one token for many requests ---------------------------------------------


def test_request_tokens_sign_again_at_half_the_lifetime_or_when_the_clock_went_back() -> None:
    cs = ConnectionString.parse(
        f"HostName={HOST};SharedAccessKeyName=service;SharedAccessKey={KEY}"
    )
    tokens = RequestTokens(cs, 3600)
    first = tokens.token(NOW)
    assert parse_sas_token(first).se == int(NOW) + 3600
    verify_sas_token(first, keys=[KEY], resource=HOST, now=NOW)
    assert tokens.token(NOW + 1799.9) is first  # the same text: the hub remembers it
    second = tokens.token(NOW + 1800)  # half its life gone: signed again
    assert parse_sas_token(second).se == int(NOW) + 1800 + 3600
    assert tokens.token(NOW + 1801) is second
    back = tokens.token(NOW - 10)  # the clock went back before it was signed
    assert parse_sas_token(back).se == int(NOW) - 10 + 3600
    assert "sig" not in repr(tokens)
    for lifetime in (1, 0, 2.5, True):
        with pytest.raises(LocalProtocolError):
            RequestTokens(cs, lifetime)  # type: ignore[arg-type]


# -- a SAS token in place of the key (SharedAccessSignature=…) -------------------------------

DEVICE_TOKEN = make_sas_token(resource=f"{HOST}/devices/d1", key=KEY, expiry=LATER)
SERVICE_TOKEN = make_sas_token(resource=HOST, key=KEY, expiry=LATER, policy_name="service")


@pytest.mark.parametrize(
    ("text", "device_id", "key_name", "token"),
    [
        (
            f"HostName={HOST};DeviceId=d1;SharedAccessSignature={DEVICE_TOKEN}",
            "d1",
            None,
            DEVICE_TOKEN,
        ),
        (
            f"HostName={HOST};SharedAccessKeyName=service;SharedAccessSignature={SERVICE_TOKEN}",
            None,
            "service",
            SERVICE_TOKEN,
        ),
        # A policy's token for the whole hub covers a device (DeviceConnect, checked by the hub).
        (
            f"HostName={HOST};DeviceId=d1;SharedAccessSignature={SERVICE_TOKEN}",
            "d1",
            None,
            SERVICE_TOKEN,
        ),
    ],
)
def test_a_connection_string_may_carry_a_token_instead_of_the_key(
    text: str, device_id: str | None, key_name: str | None, token: str
) -> None:
    cs = ConnectionString.parse(text + ";UseTls=false")
    assert cs.shared_access_key is None
    assert cs.shared_access_signature == token
    assert (cs.device_id, cs.shared_access_key_name, cs.use_tls) == (device_id, key_name, False)
    assert cs.signature_expiry == LATER
    assert ConnectionString.parse(str(cs)) == cs
    assert "SharedAccessSignature=SharedAccessSignature sr=" in str(cs)
    assert token not in repr(cs) and "sig" not in repr(cs)
    # Given as is, for its own expiry; it cannot sign another.
    assert cs.sas_token(expiry=LATER) == token
    assert cs.token_at(NOW, expiry=LATER + 99) == token
    with pytest.raises(LocalProtocolError) as info:
        cs.sas_token(expiry=LATER + 1)
    assert "cannot sign" in info.value.message


def test_a_key_signs_with_token_at_and_has_no_signature_expiry() -> None:
    cs = ConnectionString.parse(f"HostName={HOST};DeviceId=d1;SharedAccessKey={KEY}")
    assert cs.signature_expiry is None and cs.shared_access_signature is None
    token = cs.token_at(NOW, expiry=LATER)
    assert token == cs.sas_token(expiry=LATER)
    verify_sas_token(token, keys=[KEY], resource=cs.resource, now=NOW)


@pytest.mark.parametrize("now", [LATER, LATER + 1.5, float("nan")])
def test_a_given_token_that_expired_fails_saying_there_is_no_key(now: float) -> None:
    cs = ConnectionString.parse(f"HostName={HOST};DeviceId=d1;SharedAccessSignature={DEVICE_TOKEN}")
    with pytest.raises(Unauthorized) as info:
        cs.token_at(now, expiry=LATER)
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert "expired" in info.value.message and "no key" in info.value.message
    assert "sig" not in info.value.message.replace("signed", "")
    assert expired_signature_error(LATER).message == info.value.message


def test_request_tokens_send_a_given_token_until_it_expires() -> None:
    cs = ConnectionString.parse(
        f"HostName={HOST};SharedAccessKeyName=service;SharedAccessSignature={SERVICE_TOKEN}"
    )
    tokens = RequestTokens(cs, 60)
    assert tokens.token(NOW) == SERVICE_TOKEN
    assert tokens.token(LATER - 0.5) == SERVICE_TOKEN  # never signed again (there is no key)
    with pytest.raises(Unauthorized) as info:
        tokens.token(LATER)
    assert "expired" in info.value.message


_OTHER_DEVICE_TOKEN = make_sas_token(resource=f"{HOST}/devices/d2", key=KEY, expiry=LATER)
_OTHER_POLICY_TOKEN = make_sas_token(resource=HOST, key=KEY, expiry=LATER, policy_name="ops")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            f"HostName={HOST};DeviceId=d1;SharedAccessKey={KEY};SharedAccessSignature={DEVICE_TOKEN}",
            "connection string: has both SharedAccessKey and SharedAccessSignature: "
            "give one of them",
        ),
        (
            f"HostName={HOST};DeviceId=d1;SharedAccessSignature=",
            "connection string: SharedAccessSignature is empty",
        ),
        (
            f"HostName={HOST};DeviceId=d1;SharedAccessSignature=SharedAccessSignature sr=h&se=1",
            "connection string: SharedAccessSignature is not a SAS token (SAS token: missing sig)",
        ),
        (
            f"HostName={HOST};DeviceId=d1;SharedAccessSignature={_OTHER_DEVICE_TOKEN}",
            f"connection string: SharedAccessSignature is for another resource (its sr must be "
            f"'{HOST}/devices/d1')",
        ),
        (
            f"HostName=other.example.com;DeviceId=d1;SharedAccessSignature={DEVICE_TOKEN}",
            "connection string: SharedAccessSignature is for another resource (its sr must be "
            "'other.example.com/devices/d1')",
        ),
        (
            f"HostName={HOST};SharedAccessKeyName=service;SharedAccessSignature={DEVICE_TOKEN}",
            "connection string: SharedAccessSignature is not signed by the policy "
            "SharedAccessKeyName names (its skn differs)",
        ),
        (
            f"HostName={HOST};SharedAccessKeyName=service;SharedAccessSignature={_OTHER_POLICY_TOKEN}",
            "connection string: SharedAccessSignature is not signed by the policy "
            "SharedAccessKeyName names (its skn differs)",
        ),
        (
            f"HostName={HOST};SharedAccessKeyName=service;SharedAccessSignature="
            + make_sas_token(
                resource=f"{HOST}/devices/d1", key=KEY, expiry=1, policy_name="service"
            ),
            f"connection string: SharedAccessSignature is for another resource (its sr must be "
            f"'{HOST}')",
        ),
    ],
)
def test_every_given_token_error(text: str, message: str) -> None:
    with pytest.raises(CredentialError) as info:
        ConnectionString.parse(text)
    assert info.value.code is ErrorCode.INVALID_CONNECTION_STRING
    assert info.value.message == message
    for secret in (KEY, parse_sas_token(DEVICE_TOKEN).sig, parse_sas_token(SERVICE_TOKEN).sig):
        assert secret not in str(info.value)


def test_a_bad_host_name_beside_a_token_never_quotes_the_token() -> None:
    sig = parse_sas_token(DEVICE_TOKEN).sig
    for host in (f"{sig}:1", f"x{urllib.parse.unquote(sig)}"):
        text = f"HostName={host};DeviceId=d1;SharedAccessSignature={DEVICE_TOKEN}"
        with pytest.raises(CredentialError) as info:
            ConnectionString.parse(text)
        assert "(value withheld)" in info.value.message


def test_direct_construction_with_a_token_is_validated() -> None:
    cs = ConnectionString(host_name=HOST, device_id="d1", shared_access_signature=DEVICE_TOKEN)
    assert cs.sas_token(expiry=LATER) == DEVICE_TOKEN
    with pytest.raises(LocalProtocolError) as info:
        ConnectionString(host_name=HOST, device_id="d2", shared_access_signature=DEVICE_TOKEN)
    assert "another resource" in info.value.message
    with pytest.raises(LocalProtocolError):
        ConnectionString(host_name=HOST, device_id="d1", shared_access_signature=b"x")  # type: ignore[arg-type]
    for key in (KEY, ""):
        with pytest.raises(LocalProtocolError) as info:
            ConnectionString(
                host_name=HOST,
                device_id="d1",
                shared_access_key=key,
                shared_access_signature=DEVICE_TOKEN,
            )
        assert "has both" in info.value.message
    with pytest.raises(LocalProtocolError) as info:
        ConnectionString(host_name=HOST, device_id="d1", shared_access_signature="")
    assert "missing SharedAccessKey" in info.value.message


@st.composite
def _token_connection_strings(draw: st.DrawFn) -> ConnectionString:
    cs = draw(_connection_strings())
    token = make_sas_token(
        resource=cs.resource,
        key=cs.shared_access_key or KEY,
        expiry=draw(st.integers(0, 10**12)),
        policy_name=cs.shared_access_key_name,
    )
    return dataclasses.replace(cs, shared_access_key=None, shared_access_signature=token)


@settings(max_examples=200)
@given(_token_connection_strings())
def test_round_trip_with_a_token(cs: ConnectionString) -> None:
    assert ConnectionString.parse(str(cs)) == cs
    assert cs.signature_expiry is not None
    assert cs.sas_token(expiry=cs.signature_expiry) == cs.shared_access_signature
