"""Tests for devstream_core.authorization: the hub's decisions on credentials. No I/O, no
clock: ``now`` is a literal, registry records are built in the test."""

from __future__ import annotations

import dataclasses

import pytest

from devstream_core.authorization import (
    ChannelGrant,
    Credential,
    authorize_control_channel,
    authorize_policy,
    check_device_usable,
    read_credential,
)
from devstream_core.credentials import SasVerifier, device_resource, make_sas_token
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.registry import Device, Permission, Policy, new_device, new_policy

HOST = "hub.example.com:8443"
NOW = 1_800_000_000.0
LATER = int(NOW) + 3600

SERVICE = new_policy(
    name="service", random_bytes=bytes(range(64)), permissions=Permission.SERVICE_CONNECT
)
DEVICE_CONNECT = new_policy(
    name="gateway", random_bytes=bytes(range(1, 65)), permissions=Permission.DEVICE_CONNECT
)
DEVICE = new_device(device_id="d1", random_bytes=bytes(range(96)))


def policy_token(
    policy: Policy = SERVICE, *, key: str | None = None, expiry: int = LATER, host: str = HOST
) -> bytes:
    text = make_sas_token(
        resource=host,
        key=key if key is not None else policy.primary_key,
        expiry=expiry,
        policy_name=policy.name,
    )
    return text.encode()


def device_token(device: Device = DEVICE, *, key: str | None = None, expiry: int = LATER) -> bytes:
    text = make_sas_token(
        resource=device_resource(HOST, device.device_id),
        key=key if key is not None else device.primary_key,
        expiry=expiry,
    )
    return text.encode()


def refusal(call: object, *args: object, **kwargs: object) -> DevstreamError:
    with pytest.raises(DevstreamError) as info:
        call(*args, **kwargs)  # type: ignore[operator]
    return info.value


# -- reading -----------------------------------------------------------------------------------


def test_a_credential_names_the_record_it_needs_and_hides_its_token() -> None:
    credential = read_credential(policy_token())
    assert credential.policy_name == "service"
    assert credential.token.se == LATER
    assert read_credential(device_token()).policy_name is None
    assert "sig" not in repr(credential)
    assert credential.text not in repr(credential)


@pytest.mark.parametrize(
    ("header", "words"),
    [
        (None, "missing Authorization"),
        (b"Bearer abc", "SAS token"),
        (b"SharedAccessSignature sr=a&se=1", "SAS token"),
    ],
)
def test_a_missing_or_malformed_credential_is_unauthorized(
    header: bytes | None, words: str
) -> None:
    for verifier in (None, SasVerifier()):
        error = refusal(read_credential, header, verifier)
        assert error.code is ErrorCode.UNAUTHORIZED
        assert words in error.message


# -- policies ----------------------------------------------------------------------------------


def authorize(
    header: bytes,
    policy: Policy | None = SERVICE,
    needed: Permission = Permission.SERVICE_CONNECT,
    **kwargs: object,
) -> Policy:
    return authorize_policy(
        read_credential(header),
        policy,
        needed,
        host_name=HOST,
        now=NOW,
        **kwargs,  # type: ignore[arg-type]
    )


def test_a_policy_token_signed_with_either_key_is_granted_what_the_policy_allows() -> None:
    assert authorize(policy_token()) is SERVICE
    assert authorize(policy_token(key=SERVICE.secondary_key)) is SERVICE


@pytest.mark.parametrize(
    ("header", "policy", "words"),
    [
        (device_token(), SERVICE, "no skn"),
        (policy_token(), None, "unknown shared-access policy"),
        (policy_token(key=DEVICE_CONNECT.primary_key), SERVICE, "signature"),
        (policy_token(expiry=int(NOW)), SERVICE, "expired"),
        (policy_token(host="other.example.com"), SERVICE, ""),
    ],
)
def test_a_policy_token_that_does_not_verify_is_unauthorized(
    header: bytes, policy: Policy | None, words: str
) -> None:
    for verifier in (None, SasVerifier()):
        error = refusal(authorize, header, policy, verifier=verifier)
        assert error.code is ErrorCode.UNAUTHORIZED
        assert words in error.message
        assert header.decode().rpartition("sig=")[2].split("&")[0] not in error.message


def test_unauthorized_comes_before_the_missing_permission() -> None:
    """A wrong signature on a policy that lacks the permission says unauthorized: the caller
    learns nothing about the policy's rights without its key."""
    forged = policy_token(DEVICE_CONNECT, key=SERVICE.primary_key)
    assert refusal(authorize, forged, DEVICE_CONNECT).code is ErrorCode.UNAUTHORIZED
    error = refusal(authorize, policy_token(DEVICE_CONNECT), DEVICE_CONNECT)
    assert error.code is ErrorCode.PERMISSION_DENIED
    assert error.message == "policy 'gateway' lacks the ServiceConnect permission"


def test_a_token_valid_too_far_ahead_is_refused_only_under_a_maximum_lifetime() -> None:
    far = policy_token(expiry=int(NOW) + 7 * 24 * 3600)
    assert authorize(far) is SERVICE
    error = refusal(authorize, far, max_lifetime=24 * 3600.0)
    assert error.code is ErrorCode.UNAUTHORIZED


def test_a_verifier_remembers_a_token_until_it_expires_or_the_keys_change() -> None:
    verifier = SasVerifier()
    header = policy_token(expiry=int(NOW) + 10)
    for _ in range(3):
        assert authorize(header, verifier=verifier) is SERVICE
    assert len(verifier) == 1
    error = refusal(
        authorize_policy,
        read_credential(header, verifier),
        SERVICE,
        Permission.SERVICE_CONNECT,
        host_name=HOST,
        now=NOW + 10,
        verifier=verifier,
    )
    assert error.code is ErrorCode.UNAUTHORIZED
    rotated = dataclasses.replace(SERVICE, primary_key=SERVICE.secondary_key)
    assert refusal(authorize, header, rotated, verifier=verifier).code is ErrorCode.UNAUTHORIZED


# -- devices -----------------------------------------------------------------------------------


def test_a_usable_device_exists_and_is_enabled() -> None:
    assert check_device_usable("d1", DEVICE) is DEVICE
    assert refusal(check_device_usable, "d1", None).code is ErrorCode.DEVICE_NOT_FOUND
    disabled = dataclasses.replace(DEVICE, status="disabled")
    error = refusal(check_device_usable, "d1", disabled)
    assert error.code is ErrorCode.DEVICE_DISABLED
    assert error.message == "device 'd1' is disabled"


def channel(
    header: bytes, device: Device | None = DEVICE, policy: Policy | None = None
) -> ChannelGrant:
    return authorize_control_channel(
        read_credential(header),
        device_id="d1",
        device=device,
        policy=policy,
        host_name=HOST,
        now=NOW,
    )


def test_a_device_token_opens_its_channel_until_it_expires() -> None:
    grant = channel(device_token())
    assert grant.expires_at == LATER
    assert grant.device_token is not None and grant.device_token.se == LATER
    assert channel(device_token(key=DEVICE.secondary_key)).expires_at == LATER


def test_a_policy_with_device_connect_opens_any_devices_channel() -> None:
    grant = channel(policy_token(DEVICE_CONNECT), policy=DEVICE_CONNECT)
    assert grant == ChannelGrant(expires_at=LATER, device_token=None)


@pytest.mark.parametrize(
    ("header", "device", "policy", "code"),
    [
        (device_token(key=DEVICE_CONNECT.primary_key), DEVICE, None, ErrorCode.UNAUTHORIZED),
        (device_token(expiry=int(NOW)), DEVICE, None, ErrorCode.UNAUTHORIZED),
        (device_token(), None, None, ErrorCode.DEVICE_NOT_FOUND),
        (
            device_token(),
            dataclasses.replace(DEVICE, status="disabled"),
            None,
            ErrorCode.DEVICE_DISABLED,
        ),
        (policy_token(DEVICE_CONNECT), DEVICE, None, ErrorCode.UNAUTHORIZED),
        (policy_token(SERVICE), DEVICE, SERVICE, ErrorCode.PERMISSION_DENIED),
        (
            policy_token(DEVICE_CONNECT, key=SERVICE.primary_key),
            None,
            DEVICE_CONNECT,
            ErrorCode.UNAUTHORIZED,
        ),
        (policy_token(DEVICE_CONNECT), None, DEVICE_CONNECT, ErrorCode.DEVICE_NOT_FOUND),
        (
            policy_token(DEVICE_CONNECT),
            dataclasses.replace(DEVICE, status="disabled"),
            DEVICE_CONNECT,
            ErrorCode.DEVICE_DISABLED,
        ),
    ],
)
def test_a_channel_is_refused_with_the_first_reason_that_applies(
    header: bytes, device: Device | None, policy: Policy | None, code: ErrorCode
) -> None:
    error = refusal(channel, header, device, policy)
    assert error.code is code
    assert type(error) is DevstreamError


def test_a_credential_is_a_value() -> None:
    one, other = read_credential(device_token()), read_credential(device_token())
    assert one == other
    assert isinstance(one, Credential)
