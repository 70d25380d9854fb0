"""Tests for devstream_core.registry: device and policy JSON, ids, keys and permissions.

Rules: pure functions only (no I/O, no clock); random bytes are fixed or drawn by hypothesis;
every error path asserts its error code; no key may appear in an error message or a repr.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstream_core.credentials import SasToken, make_sas_token, parse_sas_token
from devstream_core.errors import DevstreamError, ErrorCode, LocalProtocolError, RemoteProtocolError
from devstream_core.registry import (
    ALL_PERMISSIONS,
    DEVICE_RANDOM_BYTES,
    NEVER,
    OWNER_POLICY,
    PERMISSION_NAMES,
    POLICY_ADMIN,
    Device,
    Permission,
    Policy,
    check_device_access,
    check_policy_delete,
    check_policy_put_precondition,
    check_put_precondition,
    device_from_json,
    device_to_json,
    format_permissions,
    new_device,
    new_key,
    new_policy,
    parse_permissions,
    policy_from_json,
    policy_to_json,
    rotate_device_key,
    rotate_policy_key,
    validate_device_id,
    validate_policy_name,
)

ID_SPECIALS = "-.+%_#*?!(),:=@$'"
ID_ALPHABET = string.ascii_letters + string.digits + ID_SPECIALS
RB = bytes(range(DEVICE_RANDOM_BYTES))
RB2 = bytes(255 - b for b in RB)

device_ids = st.text(alphabet=ID_ALPHABET, min_size=1, max_size=128)
keys = st.binary(min_size=16, max_size=64).map(lambda b: base64.b64encode(b).decode())
statuses = st.sampled_from(["enabled", "disabled"])
reasons = st.none() | st.text(max_size=128)
random_blocks = st.binary(min_size=DEVICE_RANDOM_BYTES, max_size=DEVICE_RANDOM_BYTES)


@st.composite
def devices(draw: st.DrawFn) -> Device:
    base = new_device(device_id=draw(device_ids), random_bytes=draw(random_blocks))
    return dataclasses.replace(
        base,
        primary_key=draw(keys),
        secondary_key=draw(keys),
        status=draw(statuses),
        status_reason=draw(reasons),
    )


def put(body: object, *, device_id: str = "d1", existing: Device | None = None) -> Device:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return device_from_json(raw, device_id=device_id, random_bytes=RB, existing=existing)


def put_error(body: object, *, device_id: str = "d1") -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        put(body, device_id=device_id)
    return info.value


# -- device ids ----------------------------------------------------------------------------


def test_validate_device_id_accepts_every_legal_character() -> None:
    for char in ID_ALPHABET:
        assert validate_device_id(char) == char
    assert validate_device_id(ID_ALPHABET[:128]) == ID_ALPHABET[:128]
    assert validate_device_id("x" * 128) == "x" * 128


@pytest.mark.parametrize("char", sorted(set(map(chr, range(256))) - set(ID_ALPHABET)))
def test_validate_device_id_rejects_every_other_character(char: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        validate_device_id(f"ab{char}cd")
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert "deviceId" in info.value.message


@pytest.mark.parametrize("bad", ["", "x" * 129, "dé", "a b", "a/b", "\u0661"])
def test_validate_device_id_rejects_bad_lengths_and_non_ascii(bad: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        validate_device_id(bad)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


@given(device_ids)
@settings(max_examples=200)
def test_validate_device_id_accepts_generated_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id


def test_validate_policy_name() -> None:
    assert validate_policy_name(OWNER_POLICY) == OWNER_POLICY
    assert validate_policy_name("svc-1.a_b") == "svc-1.a_b"
    for bad in ["", "x" * 65, "a b", "a=b", "a;b"]:
        with pytest.raises(RemoteProtocolError) as info:
            validate_policy_name(bad)
        assert info.value.code is ErrorCode.ARGUMENT_INVALID


# -- keys and constructors -----------------------------------------------------------------


def test_new_key_is_base64_of_exactly_32_bytes() -> None:
    raw = bytes(range(32))
    key = new_key(raw)
    assert base64.b64decode(key, validate=True) == raw
    for size in (0, 31, 33, 64):
        with pytest.raises(LocalProtocolError) as info:
            new_key(bytes(size))
        assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_new_device_uses_the_random_bytes_layout() -> None:
    device = new_device(device_id="d1", random_bytes=RB)
    assert base64.b64decode(device.primary_key) == RB[0:32]
    assert base64.b64decode(device.secondary_key) == RB[32:64]
    assert device.status == "enabled"
    assert device.enabled
    assert device.status_reason is None
    assert device.generation_id and device.etag
    other = new_device(device_id="d1", random_bytes=RB2, status="disabled")
    assert other.generation_id != device.generation_id
    assert other.etag != device.etag
    assert not other.enabled


def test_new_device_rejects_misuse() -> None:
    with pytest.raises(LocalProtocolError) as local:
        new_device(device_id="d1", random_bytes=RB[:-1])
    assert local.value.code is ErrorCode.ARGUMENT_INVALID
    with pytest.raises(RemoteProtocolError) as remote:
        new_device(device_id="bad id", random_bytes=RB)
    assert remote.value.code is ErrorCode.ARGUMENT_INVALID
    with pytest.raises(LocalProtocolError):
        new_device(device_id="d1", random_bytes=RB, status="Enabled")


def test_keys_never_appear_in_repr() -> None:
    device = new_device(device_id="d1", random_bytes=RB)
    policy = new_policy(name="svc", random_bytes=RB[:64], permissions=Permission.SERVICE_CONNECT)
    for obj, secret in [
        (device, device.primary_key),
        (device, device.secondary_key),
        (policy, policy.primary_key),
        (policy, policy.secondary_key),
    ]:
        assert secret not in repr(obj)
    assert "d1" in repr(device)


# -- device JSON ---------------------------------------------------------------------------


def test_device_to_json_shape() -> None:
    device = new_device(device_id="d1", random_bytes=RB)
    body = device_to_json(device, connected=True)
    assert body == {
        "deviceId": "d1",
        "generationId": device.generation_id,
        "etag": device.etag,
        "status": "enabled",
        "statusReason": None,
        "connectionState": "Connected",
        "authentication": {
            "type": "sas",
            "symmetricKey": {
                "primaryKey": device.primary_key,
                "secondaryKey": device.secondary_key,
            },
            "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
        },
        "capabilities": {"iotEdge": False},
        "lastActivityTime": NEVER,
    }
    hidden = device_to_json(device, connected=False, include_keys=False)
    assert hidden["connectionState"] == "Disconnected"
    assert hidden["authentication"] == {
        "type": "sas",
        "symmetricKey": {"primaryKey": None, "secondaryKey": None},
        "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
    }
    assert device.primary_key not in json.dumps(hidden)


@given(devices(), random_blocks, st.booleans())
@settings(max_examples=150)
def test_device_json_round_trip(device: Device, random_bytes: bytes, connected: bool) -> None:
    body = json.dumps(device_to_json(device, connected=connected)).encode()
    # Sent back over the existing device: everything kept but the etag.
    updated = device_from_json(
        body, device_id=device.device_id, random_bytes=random_bytes, existing=device
    )
    fresh_etag = new_device(device_id="x", random_bytes=random_bytes).etag
    assert updated == dataclasses.replace(device, etag=fresh_etag)
    # Sent as a new device: everything kept but the generation id and etag.
    created = device_from_json(
        body, device_id=device.device_id, random_bytes=random_bytes, existing=None
    )
    fresh = new_device(device_id="x", random_bytes=random_bytes)
    assert created == dataclasses.replace(
        device, generation_id=fresh.generation_id, etag=fresh.etag
    )


@given(devices(), random_blocks)
@settings(max_examples=50)
def test_device_json_without_keys_keeps_existing_keys(device: Device, rb: bytes) -> None:
    body = json.dumps(device_to_json(device, connected=False, include_keys=False)).encode()
    updated = device_from_json(body, device_id=device.device_id, random_bytes=rb, existing=device)
    assert (updated.primary_key, updated.secondary_key) == (
        device.primary_key,
        device.secondary_key,
    )


def test_empty_object_creates_device_with_generated_keys() -> None:
    device = put({})
    assert device == new_device(device_id="d1", random_bytes=RB)
    assert put({"deviceId": "d1", "authentication": None, "capabilities": None}) == device


def test_partial_update_keeps_other_fields() -> None:
    existing = put({"statusReason": "maintenance"})
    key = base64.b64encode(b"k" * 20).decode()
    updated = device_from_json(
        json.dumps(
            {"status": "DISABLED", "authentication": {"symmetricKey": {"primaryKey": key}}}
        ).encode(),
        device_id="d1",
        random_bytes=RB2,
        existing=existing,
    )
    assert updated.status == "disabled"
    assert updated.status_reason == "maintenance"
    assert updated.primary_key == key
    assert updated.secondary_key == existing.secondary_key
    assert updated.generation_id == existing.generation_id
    assert updated.etag != existing.etag
    cleared = put({"statusReason": None}, existing=updated)
    assert cleared.status_reason is None
    assert cleared.status == "disabled"


def test_null_keys_are_generated_for_new_device() -> None:
    device = put({"authentication": {"type": "SAS", "symmetricKey": {"primaryKey": None}}})
    assert base64.b64decode(device.primary_key) == RB[0:32]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", ErrorCode.INVALID_JSON),
        (b"{", ErrorCode.INVALID_JSON),
        (b"\xff\xfe{}", ErrorCode.INVALID_JSON),
        (b"[]", ErrorCode.INVALID_JSON),
        (b'"d1"', ErrorCode.INVALID_JSON),
        (b"null", ErrorCode.INVALID_JSON),
        (b"[" * 50_000 + b"]" * 50_000, ErrorCode.PAYLOAD_TOO_LARGE),
        (b"[" * 30_000 + b"]" * 30_000, ErrorCode.INVALID_JSON),
        (b'{"a": ' + b"9" * 10_000 + b"}", ErrorCode.INVALID_JSON),
    ],
)
def test_bad_bodies(body: bytes, code: ErrorCode) -> None:
    assert put_error(body).code is code


def test_body_size_cap_is_exact() -> None:
    body = b"{}" + b" " * 62
    assert device_from_json(body, device_id="d1", random_bytes=RB, existing=None, max_size=64)
    with pytest.raises(RemoteProtocolError) as info:
        device_from_json(body + b" ", device_id="d1", random_bytes=RB, existing=None, max_size=64)
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


SHORT_KEY = base64.b64encode(b"k" * 15).decode()
LONG_KEY = base64.b64encode(b"k" * 65).decode()


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"deviceId": "d2"}, "deviceId"),
        ({"deviceId": 1}, "deviceId"),
        ({"status": "paused"}, "status"),
        ({"status": True}, "status"),
        ({"statusReason": 5}, "statusReason"),
        ({"statusReason": "x" * 129}, "statusReason"),
        ({"authentication": "sas"}, "authentication"),
        ({"authentication": {"type": "selfSigned"}}, "authentication.type"),
        ({"authentication": {"type": 1}}, "authentication.type"),
        ({"authentication": {"symmetricKey": []}}, "authentication.symmetricKey"),
        (
            {"authentication": {"x509Thumbprint": {"primaryThumbprint": "AB"}}},
            "authentication.x509Thumbprint",
        ),
        ({"authentication": {"x509Thumbprint": 3}}, "authentication.x509Thumbprint"),
        (
            {"authentication": {"symmetricKey": {"primaryKey": "not base64!"}}},
            "authentication.symmetricKey.primaryKey",
        ),
        (
            {"authentication": {"symmetricKey": {"primaryKey": SHORT_KEY}}},
            "authentication.symmetricKey.primaryKey",
        ),
        (
            {"authentication": {"symmetricKey": {"secondaryKey": LONG_KEY}}},
            "authentication.symmetricKey.secondaryKey",
        ),
        (
            {"authentication": {"symmetricKey": {"secondaryKey": 7}}},
            "authentication.symmetricKey.secondaryKey",
        ),
        (
            {"authentication": {"symmetricKey": {"primaryKey": "ké=="}}},
            "authentication.symmetricKey.primaryKey",
        ),
        ({"capabilities": []}, "capabilities"),
        ({"capabilities": {"iotEdge": "no"}}, "capabilities.iotEdge"),
        ({"capabilities": {"iotEdge": True}}, "capabilities.iotEdge"),
    ],
)
def test_bad_fields_name_the_field(body: object, field: str) -> None:
    error = put_error(body)
    assert error.code is ErrorCode.ARGUMENT_INVALID
    assert error.message.startswith(field)


def test_bad_key_is_not_echoed() -> None:
    secret = base64.b64encode(b"s" * 15).decode()
    error = put_error({"authentication": {"symmetricKey": {"primaryKey": secret}}})
    assert secret not in str(error)


def test_bad_path_id_and_misuse() -> None:
    assert put_error({}, device_id="a/b").code is ErrorCode.ARGUMENT_INVALID
    with pytest.raises(LocalProtocolError):
        device_from_json(b"{}", device_id="d1", random_bytes=RB[:95], existing=None)
    other = new_device(device_id="d2", random_bytes=RB)
    with pytest.raises(LocalProtocolError):
        device_from_json(b"{}", device_id="d1", random_bytes=RB, existing=other)


@given(st.binary(max_size=300))
@settings(max_examples=300)
def test_device_from_json_parses_or_raises_remote_error(body: bytes) -> None:
    try:
        device = device_from_json(body, device_id="d1", random_bytes=RB, existing=None)
    except RemoteProtocolError as error:
        assert error.code in {ErrorCode.INVALID_JSON, ErrorCode.ARGUMENT_INVALID}
    else:
        assert device.device_id == "d1"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)
field_names = st.sampled_from(
    ["deviceId", "status", "statusReason", "authentication", "capabilities", "etag"]
)
inner_names = st.sampled_from(
    ["type", "symmetricKey", "x509Thumbprint", "primaryKey", "secondaryKey", "iotEdge"]
)


@given(
    st.dictionaries(
        field_names,
        json_values
        | st.dictionaries(inner_names, json_values | st.dictionaries(inner_names, json_values)),
    )
)
@settings(max_examples=300)
def test_structured_garbage_parses_or_raises_argument_invalid(body: dict[str, object]) -> None:
    try:
        device = put(body)
    except RemoteProtocolError as error:
        assert error.code is ErrorCode.ARGUMENT_INVALID
    else:
        assert device.status in ("enabled", "disabled")


# -- policies and permissions --------------------------------------------------------------


def test_policy_to_json() -> None:
    policy = Policy(
        name="svc",
        primary_key="cA==",
        secondary_key="cw==",
        permissions=Permission.SERVICE_CONNECT | Permission.REGISTRY_READ,
    )
    assert policy_to_json(policy) == {
        "keyName": "svc",
        "primaryKey": "cA==",
        "secondaryKey": "cw==",
        "rights": "RegistryRead, ServiceConnect",
    }
    assert policy.allows(Permission.SERVICE_CONNECT)
    assert not policy.allows(Permission.SERVICE_CONNECT | Permission.REGISTRY_WRITE)


def test_new_policy() -> None:
    owner = new_policy(name=OWNER_POLICY, random_bytes=RB[:64], permissions=ALL_PERMISSIONS)
    assert base64.b64decode(owner.primary_key) == RB[0:32]
    assert base64.b64decode(owner.secondary_key) == RB[32:64]
    assert all(owner.allows(p) for p in PERMISSION_NAMES)
    assert format_permissions(owner.permissions) == (
        "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect"
    )
    with pytest.raises(LocalProtocolError):
        new_policy(name="svc", random_bytes=RB, permissions=ALL_PERMISSIONS)
    with pytest.raises(RemoteProtocolError):
        new_policy(name="bad name", random_bytes=RB[:64], permissions=ALL_PERMISSIONS)


permission_lists = st.lists(st.sampled_from(list(PERMISSION_NAMES)), min_size=1, unique=True)


@given(permission_lists)
@settings(max_examples=200)
def test_permissions_round_trip(chosen: list[Permission]) -> None:
    permissions = Permission(0)
    for p in chosen:
        permissions |= p
    text = format_permissions(permissions)
    assert parse_permissions(text) == permissions
    # Any order, any case, commas and/or spaces.
    names = [PERMISSION_NAMES[p] for p in chosen]
    spelled = " ,  ".join(n.upper() if i % 2 else n.lower() for i, n in enumerate(names))
    assert parse_permissions(spelled) == permissions
    assert parse_permissions(" ".join(names)) == permissions


@pytest.mark.parametrize("text", ["", " , ", "RegistryRead, Admin", "Registry Read", "*"])
def test_parse_permissions_rejects_unknown_or_empty(text: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_permissions(text)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


# -- If-Match --------------------------------------------------------------------------------


def precondition_error(existing: Device | None, if_match: str | None) -> ErrorCode | None:
    try:
        check_put_precondition(device_id="d1", existing=existing, if_match=if_match)
    except RemoteProtocolError as exc:
        assert "d1" in exc.message
        return exc.code
    return None


def test_if_match_decides_whether_a_put_may_write() -> None:
    current = new_device(device_id="d1", random_bytes=RB)
    stale = new_device(device_id="d1", random_bytes=RB2).etag
    assert stale != current.etag
    etag = current.etag
    # No If-Match: create only.
    assert precondition_error(None, None) is None
    assert precondition_error(current, None) is ErrorCode.DEVICE_ALREADY_EXISTS
    # "*": only a device that exists.
    assert precondition_error(current, "*") is None
    assert precondition_error(current, " * ") is None
    assert precondition_error(None, "*") is ErrorCode.DEVICE_NOT_FOUND
    # Etags: the current one, quoted (as HTTP writes it), bare (as the JSON shows it), or in
    # a list; never a stale one, a weak one, or one on an unknown id.
    for matching in (f'"{etag}"', etag, f'"{stale}", "{etag}"', f' "{etag}" '):
        assert precondition_error(current, matching) is None, matching
    for failing in (f'"{stale}"', stale, f'W/"{etag}"', '""', "", f'"{etag}x"', f'"{etag[:-1]}"'):
        assert precondition_error(current, failing) is ErrorCode.PRECONDITION_FAILED, failing
    assert precondition_error(None, f'"{etag}"') is ErrorCode.DEVICE_NOT_FOUND
    assert precondition_error(current, '"x", ' * 400 + f'"{etag}"') is (
        ErrorCode.PRECONDITION_FAILED
    )
    assert ErrorCode.PRECONDITION_FAILED == 412002
    assert ErrorCode.PRECONDITION_FAILED.http_status == 412


# -- whether a device's control channel may stay open -------------------------------------------


def test_check_device_access_on_open_and_after_a_change() -> None:
    resource = "hub.test/devices/d1"
    current = new_device(device_id="d1", random_bytes=RB)
    signed = parse_sas_token(
        make_sas_token(resource=resource, key=current.primary_key, expiry=2000)
    )

    def code(
        device: Device | None, *, established: bool = True, token: SasToken | None = signed
    ) -> ErrorCode | None:
        try:
            check_device_access(
                device,
                device_id="d1",
                token=token,
                resource=resource,
                now=1000,
                established=established,
            )
        except DevstreamError as exc:
            assert current.primary_key not in exc.message
            return exc.code
        return None

    assert code(current) is None
    assert code(None) is ErrorCode.DEVICE_NOT_FOUND
    assert code(dataclasses.replace(current, status="disabled")) is ErrorCode.DEVICE_DISABLED
    # Rotating the other key keeps the channel; replacing the key it signed with closes it.
    rotated_secondary = dataclasses.replace(current, secondary_key=new_key(bytes(32)))
    assert code(rotated_secondary) is None
    rotated_primary = dataclasses.replace(current, primary_key=new_key(bytes(32)))
    assert code(rotated_primary) is ErrorCode.UNAUTHORIZED
    with pytest.raises(DevstreamError) as info:
        check_device_access(
            rotated_primary,
            device_id="d1",
            token=signed,
            resource=resource,
            now=1000,
            established=True,
        )
    assert "keys changed" in info.value.message
    # A channel opened with a policy token (token None) only needs the device enabled.
    assert code(rotated_primary, token=None) is None
    # On open, the hub's max lifetime applies.
    with pytest.raises(DevstreamError) as info:
        check_device_access(
            current, device_id="d1", token=signed, resource=resource, now=1000, max_lifetime=60
        )
    assert info.value.code is ErrorCode.UNAUTHORIZED and "60 s" in info.value.message


# -- key rotation ---------------------------------------------------------------------------


@pytest.mark.parametrize("secondary", [False, True])
def test_rotating_a_device_key_replaces_that_key_alone_and_the_etag(secondary: bool) -> None:
    device = new_device(device_id="d1", random_bytes=RB)
    rotated = rotate_device_key(device, secondary=secondary, random_bytes=RB2)
    changed, kept = (
        ("secondary_key", "primary_key") if secondary else ("primary_key", "secondary_key")
    )
    assert getattr(rotated, kept) == getattr(device, kept)
    assert getattr(rotated, changed) not in (device.primary_key, device.secondary_key)
    assert len(base64.b64decode(getattr(rotated, changed))) == 32
    assert rotated.etag != device.etag
    assert (rotated.generation_id, rotated.status) == (device.generation_id, device.status)
    with pytest.raises(LocalProtocolError):
        rotate_device_key(device, secondary=secondary, random_bytes=RB2[:32])


@pytest.mark.parametrize("secondary", [False, True])
def test_rotating_a_policy_key_replaces_that_key_alone(secondary: bool) -> None:
    policy = new_policy(name="ops", random_bytes=RB[:64], permissions=Permission.SERVICE_CONNECT)
    rotated = rotate_policy_key(policy, secondary=secondary, random_bytes=RB2[:32])
    new, old = (
        (rotated.secondary_key, rotated.primary_key)
        if secondary
        else (rotated.primary_key, rotated.secondary_key)
    )
    assert new == new_key(RB2[:32])
    assert old == (policy.primary_key if secondary else policy.secondary_key)
    assert rotated.permissions == policy.permissions
    with pytest.raises(LocalProtocolError):
        rotate_policy_key(policy, secondary=secondary, random_bytes=RB2)


# -- policies: PUT bodies, If-Match, the owner ----------------------------------------------


def put_policy(body: object, *, name: str = "ops", existing: Policy | None = None) -> Policy:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return policy_from_json(raw, name=name, random_bytes=RB[:64], existing=existing)


def test_a_new_policy_gets_the_rights_and_fresh_keys() -> None:
    policy = put_policy({"keyName": "ops", "rights": "serviceconnect registryRead"})
    assert policy.permissions == Permission.SERVICE_CONNECT | Permission.REGISTRY_READ
    assert policy.primary_key == new_key(RB[:32])
    assert policy.secondary_key == new_key(RB[32:64])
    assert policy_to_json(policy)["rights"] == "RegistryRead, ServiceConnect"
    given = put_policy({"rights": "DeviceConnect", "primaryKey": KEY_16, "secondaryKey": None})
    assert (given.primary_key, given.secondary_key) == (KEY_16, new_key(RB[32:64]))


def test_an_update_keeps_what_the_body_leaves_out() -> None:
    existing = new_policy(name="ops", random_bytes=RB2[:64], permissions=Permission.SERVICE_CONNECT)
    same = put_policy({}, existing=existing)
    assert same == existing
    wider = put_policy({"rights": "ServiceConnect,RegistryWrite"}, existing=existing)
    assert wider.permissions == Permission.SERVICE_CONNECT | Permission.REGISTRY_WRITE
    assert (wider.primary_key, wider.secondary_key) == (
        existing.primary_key,
        existing.secondary_key,
    )
    rekeyed = put_policy({"secondaryKey": KEY_16}, existing=existing)
    assert (rekeyed.primary_key, rekeyed.secondary_key) == (existing.primary_key, KEY_16)


KEY_16 = base64.b64encode(bytes(16)).decode()


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({}, ErrorCode.ARGUMENT_INVALID, "rights is required"),
        ({"rights": ""}, ErrorCode.ARGUMENT_INVALID, "rights must name"),
        ({"rights": "Everything"}, ErrorCode.ARGUMENT_INVALID, "rights may only name"),
        ({"rights": 3}, ErrorCode.ARGUMENT_INVALID, "rights must be a string"),
        ({"rights": "ServiceConnect", "keyName": "other"}, ErrorCode.ARGUMENT_INVALID, "keyName"),
        (
            {"rights": "ServiceConnect", "primaryKey": "%%"},
            ErrorCode.ARGUMENT_INVALID,
            "primaryKey",
        ),
        (
            {"rights": "ServiceConnect", "secondaryKey": base64.b64encode(bytes(8)).decode()},
            ErrorCode.ARGUMENT_INVALID,
            "secondaryKey",
        ),
        (b"[]", ErrorCode.INVALID_JSON, "JSON object"),
        (b"{", ErrorCode.INVALID_JSON, "not valid JSON"),
        (b" " * (64 * 1024 + 1), ErrorCode.PAYLOAD_TOO_LARGE, "larger than"),
    ],
)
def test_bad_policy_bodies(body: object, code: ErrorCode, words: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        put_policy(body)
    assert info.value.code is code
    assert words in info.value.message


def test_policy_from_json_misuse_and_bad_names() -> None:
    with pytest.raises(RemoteProtocolError) as info:
        put_policy({"rights": "ServiceConnect"}, name="a b")
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    other = new_policy(name="other", random_bytes=RB[:64], permissions=Permission.SERVICE_CONNECT)
    with pytest.raises(LocalProtocolError):
        put_policy({}, existing=other)
    with pytest.raises(LocalProtocolError):
        policy_from_json(b"{}", name="ops", random_bytes=RB, existing=None)


def test_the_owner_policy_keeps_every_permission() -> None:
    owner = new_policy(name=OWNER_POLICY, random_bytes=RB[:64], permissions=ALL_PERMISSIONS)
    for rights in ("ServiceConnect", "RegistryRead, RegistryWrite, ServiceConnect"):
        with pytest.raises(RemoteProtocolError) as info:
            put_policy({"rights": rights}, name=OWNER_POLICY, existing=owner)
        assert info.value.code is ErrorCode.OWNER_POLICY_PROTECTED
    kept = put_policy(
        {"rights": "DeviceConnect ServiceConnect RegistryWrite RegistryRead"},
        name=OWNER_POLICY,
        existing=owner,
    )
    assert kept.permissions == ALL_PERMISSIONS
    rekeyed = put_policy({"primaryKey": KEY_16}, name=OWNER_POLICY, existing=owner)
    assert rekeyed.primary_key == KEY_16 and rekeyed.permissions == ALL_PERMISSIONS
    with pytest.raises(RemoteProtocolError) as info:
        check_policy_delete(OWNER_POLICY)
    assert info.value.code is ErrorCode.OWNER_POLICY_PROTECTED
    assert "cannot be deleted" in info.value.message
    check_policy_delete("ops")


def test_if_match_decides_whether_a_policy_put_may_write() -> None:
    policy = new_policy(name="ops", random_bytes=RB[:64], permissions=Permission.SERVICE_CONNECT)

    def code(existing: Policy | None, if_match: str | None) -> ErrorCode | None:
        try:
            check_policy_put_precondition(name="ops", existing=existing, if_match=if_match)
        except RemoteProtocolError as exc:
            return exc.code
        return None

    assert code(None, None) is None  # create
    assert code(policy, None) is ErrorCode.POLICY_ALREADY_EXISTS
    assert code(policy, "*") is None and code(policy, " * ") is None  # update
    assert code(None, "*") is ErrorCode.POLICY_NOT_FOUND
    assert code(policy, '"etag"') is ErrorCode.ARGUMENT_INVALID
    assert code(None, '"etag"') is ErrorCode.ARGUMENT_INVALID


def test_policy_admin_is_every_permission() -> None:
    assert POLICY_ADMIN == ALL_PERMISSIONS
