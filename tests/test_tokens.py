"""Tests for devstream_core.tokens: minting and verifying stream tokens and resume tokens.

Rules: no clock and no randomness; ``now`` and nonces are literals or hypothesis-drawn.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devstream_core.common import Role
from devstream_core.errors import ErrorCode, LocalProtocolError, StreamTokenError
from devstream_core.tokens import (
    MAX_TOKEN_LENGTH,
    STREAM_TOKEN_LIFETIME,
    StreamTokenClaims,
    is_resume_token,
    mint_resume_token,
    mint_stream_token,
    stream_token_expiry,
    verify_resume_token,
    verify_stream_token,
)

SECRET = b"hub-secret-for-tests-0123456789ab"
STREAM = "c3RyZWFtLWlkLTAwMDAwMQ"
NONCE = bytes(range(16))
NOW = 1000.0
URL_SAFE = re.compile(r"[A-Za-z0-9_.-]+")


def mint(
    *,
    stream_id: str = STREAM,
    role: Role = Role.DEVICE,
    now: float = NOW,
    nonce: bytes = NONCE,
    secret: bytes = SECRET,
    lifetime: float = STREAM_TOKEN_LIFETIME,
) -> str:
    return mint_stream_token(
        secret=secret, stream_id=stream_id, role=role, now=now, nonce=nonce, lifetime=lifetime
    )


def verify(
    token: str,
    *,
    stream_id: str = STREAM,
    role: Role | None = Role.DEVICE,
    now: float = NOW,
    secret: bytes = SECRET,
) -> StreamTokenClaims:
    return verify_stream_token(token, secret=secret, stream_id=stream_id, role=role, now=now)


def refused(token: str, **kwargs: object) -> StreamTokenError:
    with pytest.raises(StreamTokenError) as info:
        verify(token, **kwargs)  # type: ignore[arg-type]
    # The message never echoes the token or its signature (short fragments prove nothing).
    for secret_part in (token, token.rpartition(".")[2]):
        if len(secret_part) >= 8:
            assert secret_part not in str(info.value)
    return info.value


@pytest.mark.parametrize("role", list(Role))
def test_round_trip_gives_the_claims(role: Role) -> None:
    token = mint(role=role)
    claims = verify(token, role=role)
    assert claims == StreamTokenClaims(
        stream_id=STREAM,
        role=role,
        expires_at=NOW + 60.0,
        nonce=base64.urlsafe_b64encode(NONCE).rstrip(b"=").decode(),
    )


def test_role_none_takes_the_tokens_role() -> None:
    assert verify(mint(role=Role.SERVICE), role=None).role is Role.SERVICE
    assert verify(mint(role=Role.DEVICE), role=None).role is Role.DEVICE


def test_token_text_is_url_safe_and_short() -> None:
    token = mint(stream_id="s" * 128, nonce=b"\xff" * 64, now=9.99e14)
    assert URL_SAFE.fullmatch(token)
    assert len(token) <= MAX_TOKEN_LENGTH
    parts = token.split(".")
    assert parts[:4] == ["v1", "s" * 128, "device", str(int((9.99e14 + 60) * 1000))]
    assert len(parts) == 6


def test_tokens_differ_by_nonce_and_role() -> None:
    tokens = {
        mint(),
        mint(nonce=bytes(range(1, 17))),
        mint(role=Role.SERVICE),
        mint(stream_id="other"),
    }
    assert len(tokens) == 4


# -- expiry boundary ---------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_expired_exactly_at_expires_at(role: Role) -> None:
    token = mint(role=role)
    expires_at = verify(token, role=role).expires_at
    assert expires_at == NOW + STREAM_TOKEN_LIFETIME
    assert verify(token, role=role, now=expires_at - 1e-9).expires_at == expires_at
    assert refused(token, role=role, now=expires_at).code is ErrorCode.STREAM_TOKEN_EXPIRED
    assert refused(token, role=role, now=expires_at + 5).code is ErrorCode.STREAM_TOKEN_EXPIRED


def test_valid_from_before_mint_time() -> None:
    # Only expiry is checked; a token checked on a clock slightly behind is still good.
    assert verify(mint(), now=NOW - 1).stream_id == STREAM


def test_custom_lifetime() -> None:
    token = mint(lifetime=5.0)
    assert verify(token, now=NOW + 5 - 1e-9).expires_at == NOW + 5
    assert refused(token, now=NOW + 5).code is ErrorCode.STREAM_TOKEN_EXPIRED


def test_expiry_rounds_down_to_the_millisecond() -> None:
    expires_at = stream_token_expiry(now=0.1234567, lifetime=60.0)
    assert expires_at <= 60.1234567
    assert expires_at == pytest.approx(60.123, abs=1e-9)
    assert verify(mint(now=0.1234567), now=0).expires_at == expires_at


@settings(max_examples=200)
@given(
    now=st.floats(min_value=-1e9, max_value=1e12, allow_nan=False),
    lifetime=st.floats(min_value=0.01, max_value=1e6),
)
def test_expiry_never_later_than_now_plus_lifetime(now: float, lifetime: float) -> None:
    expires_at = stream_token_expiry(now=now, lifetime=lifetime)
    assert expires_at <= now + lifetime
    assert expires_at > now + lifetime - 0.002
    token = mint(now=now, lifetime=lifetime)
    assert verify(token, now=now).expires_at == expires_at
    assert refused(token, now=expires_at).code is ErrorCode.STREAM_TOKEN_EXPIRED


# -- refusals and their order --------------------------------------------------------------------


def test_wrong_stream() -> None:
    assert refused(mint(), stream_id="another").code is ErrorCode.STREAM_TOKEN_WRONG_STREAM


@pytest.mark.parametrize("role", list(Role))
def test_wrong_role(role: Role) -> None:
    token = mint(role=role)
    assert refused(token, role=role.other).code is ErrorCode.STREAM_TOKEN_WRONG_ROLE


def test_order_wrong_stream_before_wrong_role_before_expired() -> None:
    token = mint(role=Role.DEVICE)
    late = NOW + 1000
    assert (
        refused(token, stream_id="x", role=Role.SERVICE, now=late).code
        is ErrorCode.STREAM_TOKEN_WRONG_STREAM
    )
    assert refused(token, role=Role.SERVICE, now=late).code is ErrorCode.STREAM_TOKEN_WRONG_ROLE
    assert refused(token, now=late).code is ErrorCode.STREAM_TOKEN_EXPIRED


def test_invalid_before_everything_else() -> None:
    token = mint(secret=b"another hub's secret")
    assert (
        refused(token, stream_id="x", role=Role.SERVICE, now=NOW + 1000).code
        is ErrorCode.STREAM_TOKEN_INVALID
    )


def test_any_single_character_change_is_invalid() -> None:
    token = mint()
    for index, char in enumerate(token):
        for replacement in {"A", "b", "-", "_", "."} - {char}:
            forged = token[:index] + replacement + token[index + 1 :]
            error = refused(forged)
            assert error.code is ErrorCode.STREAM_TOKEN_INVALID, (index, replacement)


def test_claims_cannot_be_rewritten_without_the_secret() -> None:
    parts = mint(role=Role.DEVICE).split(".")
    parts[2] = "service"
    assert refused(".".join(parts), role=Role.SERVICE).code is ErrorCode.STREAM_TOKEN_INVALID
    parts = mint().split(".")
    parts[3] = str(int(parts[3]) + 3_600_000)
    assert refused(".".join(parts), now=NOW + 100).code is ErrorCode.STREAM_TOKEN_INVALID


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v1.a.device.1.AAAAAAAAAAAAAAAAAAAAAA",
        "v1.a.device.1.AAAAAAAAAAAAAAAAAAAAAA.mac.extra",
        "v2" + mint()[2:],
        mint() + "=",
        mint() + " ",
        "é" + mint(),
        mint()[:-1] + "é",
        "Bearer " + mint(),
        "x" * (MAX_TOKEN_LENGTH + 1),
        mint() + "." * (MAX_TOKEN_LENGTH),
    ],
)
def test_malformed_is_invalid(token: str) -> None:
    assert refused(token).code is ErrorCode.STREAM_TOKEN_INVALID


@settings(max_examples=300)
@given(st.text(max_size=600))
def test_arbitrary_text_is_invalid_and_never_crashes(text: str) -> None:
    with pytest.raises(StreamTokenError) as info:
        verify(text)
    assert info.value.code is ErrorCode.STREAM_TOKEN_INVALID


@settings(max_examples=100)
@given(
    stream_id=st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True),
    role=st.sampled_from(list(Role)),
    nonce=st.binary(min_size=16, max_size=64),
    now=st.floats(min_value=0, max_value=1e12),
)
def test_any_minted_token_verifies(stream_id: str, role: Role, nonce: bytes, now: float) -> None:
    token = mint(stream_id=stream_id, role=role, nonce=nonce, now=now)
    assert URL_SAFE.fullmatch(token)
    assert len(token) <= MAX_TOKEN_LENGTH
    claims = verify(token, stream_id=stream_id, role=role, now=now)
    assert (claims.stream_id, claims.role) == (stream_id, role)
    assert base64.urlsafe_b64decode(claims.nonce + "=" * (-len(claims.nonce) % 4)) == nonce


# -- misuse ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": b"x" * 15},
        {"nonce": b""},
        {"nonce": b"x" * 65},
        {"stream_id": ""},
        {"stream_id": "a.b"},
        {"stream_id": "a/b"},
        {"stream_id": "a" * 129},
        {"secret": b""},
        {"now": float("nan")},
        {"now": float("inf")},
        {"lifetime": 0.0},
        {"lifetime": -1.0},
        {"lifetime": float("inf")},
    ],
)
def test_mint_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        mint(**kwargs)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_mint_accepts_a_16_byte_nonce() -> None:
    assert verify(mint(nonce=b"n" * 16)).stream_id == STREAM


@pytest.mark.parametrize("now", [float("nan"), float("inf")])
def test_verify_refuses_a_non_finite_now(now: float) -> None:
    with pytest.raises(LocalProtocolError):
        verify(mint(), now=now)


def test_verify_refuses_an_empty_secret() -> None:
    with pytest.raises(LocalProtocolError):
        verify(mint(), secret=b"")


# -- resume tokens -----------------------------------------------------------------------------


def mint_resume(
    *,
    stream_id: str = STREAM,
    role: Role = Role.DEVICE,
    nonce: bytes = NONCE,
    secret: bytes = SECRET,
) -> str:
    return mint_resume_token(secret=secret, stream_id=stream_id, role=role, nonce=nonce)


def verify_resume(
    token: str,
    *,
    stream_id: str = STREAM,
    role: Role | None = Role.DEVICE,
    now: float = NOW,
    secret: bytes = SECRET,
) -> StreamTokenClaims:
    return verify_resume_token(token, secret=secret, stream_id=stream_id, role=role, now=now)


def resume_refused(token: str, **kwargs: object) -> StreamTokenError:
    with pytest.raises(StreamTokenError) as info:
        verify_resume(token, **kwargs)  # type: ignore[arg-type]
    for secret_part in (token, token.rpartition(".")[2]):
        if len(secret_part) >= 8:
            assert secret_part not in str(info.value)
    return info.value


@pytest.mark.parametrize("role", list(Role))
def test_resume_round_trip_gives_claims_without_expiry(role: Role) -> None:
    token = mint_resume(role=role)
    assert verify_resume(token, role=role) == StreamTokenClaims(
        stream_id=STREAM,
        role=role,
        expires_at=math.inf,
        nonce=base64.urlsafe_b64encode(NONCE).rstrip(b"=").decode(),
    )
    assert verify_resume(token, role=None).role is role


def test_resume_token_has_its_own_prefix_and_no_expiry_field() -> None:
    token = mint_resume(stream_id="s" * 128, nonce=b"\xff" * 64, role=Role.SERVICE)
    assert URL_SAFE.fullmatch(token)
    assert len(token) <= MAX_TOKEN_LENGTH
    parts = token.split(".")
    assert parts[:3] == ["r1", "s" * 128, "service"]
    assert len(parts) == 5
    assert is_resume_token(token)
    assert not is_resume_token(mint())
    assert not is_resume_token("")
    assert not is_resume_token("r1")


@pytest.mark.parametrize("now", [-1e12, 0.0, NOW, NOW + 1e9, 1e15])
def test_resume_token_never_expires_by_itself(now: float) -> None:
    assert verify_resume(mint_resume(), now=now).stream_id == STREAM


@pytest.mark.parametrize("role", list(Role))
def test_the_two_kinds_never_stand_in_for_each_other(role: Role) -> None:
    # Same secret, stream, role and nonce: still refused, whatever the clock says.
    join_token = mint(role=role)
    resume_token = mint_resume(role=role)
    assert resume_refused(join_token, role=role).code is ErrorCode.STREAM_TOKEN_INVALID
    assert resume_refused(join_token, role=None).code is ErrorCode.STREAM_TOKEN_INVALID
    assert refused(resume_token, role=role).code is ErrorCode.STREAM_TOKEN_INVALID
    assert refused(resume_token, role=None, now=0).code is ErrorCode.STREAM_TOKEN_INVALID


def test_relabelling_one_kind_as_the_other_breaks_the_signature() -> None:
    join_parts = mint().split(".")
    # Drop the expiry and call it a resume token, keeping nonce and mac.
    relabelled = ".".join(["r1", *join_parts[1:3], *join_parts[4:]])
    assert resume_refused(relabelled).code is ErrorCode.STREAM_TOKEN_INVALID
    resume_parts = mint_resume().split(".")
    relabelled = ".".join(["v1", *resume_parts[1:3], "99999999999999", *resume_parts[3:]])
    assert refused(relabelled).code is ErrorCode.STREAM_TOKEN_INVALID


def test_resume_wrong_stream_then_wrong_role() -> None:
    token = mint_resume(role=Role.DEVICE)
    assert (
        resume_refused(token, stream_id="x", role=Role.SERVICE).code
        is ErrorCode.STREAM_TOKEN_WRONG_STREAM
    )
    assert resume_refused(token, role=Role.SERVICE).code is ErrorCode.STREAM_TOKEN_WRONG_ROLE


def test_resume_forged_is_invalid_before_everything_else() -> None:
    token = mint_resume(secret=b"another hub's secret")
    assert (
        resume_refused(token, stream_id="x", role=Role.SERVICE).code
        is ErrorCode.STREAM_TOKEN_INVALID
    )


def test_resume_any_single_character_change_is_invalid() -> None:
    token = mint_resume()
    for index, char in enumerate(token):
        for replacement in {"A", "b", "-", "_", "."} - {char}:
            forged = token[:index] + replacement + token[index + 1 :]
            assert resume_refused(forged).code is ErrorCode.STREAM_TOKEN_INVALID, index


def test_resume_claims_cannot_be_rewritten_without_the_secret() -> None:
    parts = mint_resume(role=Role.DEVICE).split(".")
    parts[2] = "service"
    assert resume_refused(".".join(parts), role=Role.SERVICE).code is (
        ErrorCode.STREAM_TOKEN_INVALID
    )
    parts = mint_resume().split(".")
    parts[1] = "another"
    assert resume_refused(".".join(parts), stream_id="another").code is (
        ErrorCode.STREAM_TOKEN_INVALID
    )


@pytest.mark.parametrize(
    "token",
    [
        "",
        "r1",
        "r1.a.device.AAAAAAAAAAAAAAAAAAAAAA",
        "r1.a.device.AAAAAAAAAAAAAAAAAAAAAA.mac.extra",
        "r2" + mint_resume()[2:],
        mint_resume() + "=",
        "Bearer " + mint_resume(),
        "x" * (MAX_TOKEN_LENGTH + 1),
    ],
)
def test_resume_malformed_is_invalid(token: str) -> None:
    assert resume_refused(token).code is ErrorCode.STREAM_TOKEN_INVALID


@settings(max_examples=200)
@given(st.text(max_size=600))
def test_resume_arbitrary_text_is_invalid_and_never_crashes(text: str) -> None:
    with pytest.raises(StreamTokenError) as info:
        verify_resume(text)
    assert info.value.code is ErrorCode.STREAM_TOKEN_INVALID


@settings(max_examples=100)
@given(
    stream_id=st.from_regex(r"[A-Za-z0-9_-]{1,128}", fullmatch=True),
    role=st.sampled_from(list(Role)),
    nonce=st.binary(min_size=16, max_size=64),
)
def test_any_minted_resume_token_verifies_and_is_no_stream_token(
    stream_id: str, role: Role, nonce: bytes
) -> None:
    token = mint_resume(stream_id=stream_id, role=role, nonce=nonce)
    assert URL_SAFE.fullmatch(token)
    assert len(token) <= MAX_TOKEN_LENGTH
    claims = verify_resume(token, stream_id=stream_id, role=role)
    assert (claims.stream_id, claims.role, claims.expires_at) == (stream_id, role, math.inf)
    assert base64.urlsafe_b64decode(claims.nonce + "=" * (-len(claims.nonce) % 4)) == nonce
    with pytest.raises(StreamTokenError) as info:
        verify(token, stream_id=stream_id, role=role)
    assert info.value.code is ErrorCode.STREAM_TOKEN_INVALID


@pytest.mark.parametrize(
    "kwargs",
    [
        {"nonce": b"x" * 15},
        {"nonce": b"x" * 65},
        {"stream_id": ""},
        {"stream_id": "a.b"},
        {"stream_id": "a" * 129},
        {"secret": b""},
        {"role": "device"},
    ],
)
def test_mint_resume_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError) as info:
        mint_resume(**kwargs)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize("kwargs", [{"now": float("nan")}, {"now": float("-inf")}, {"secret": b""}])
def test_verify_resume_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        verify_resume(mint_resume(), **kwargs)  # type: ignore[arg-type]


# -- tokens signed with the hub's secret whose claims are malformed -------------------------


def signed(payload: str, secret: bytes = SECRET) -> str:
    """*payload* with the signature the module's format describes (HMAC-SHA256, base64url)."""
    mac = hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest()
    return f"{payload}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


GOOD_NONCE = base64.urlsafe_b64encode(NONCE).rstrip(b"=").decode()


def test_the_signature_helper_matches_the_module() -> None:
    """The helper below signs as the module does: a well-formed payload verifies."""
    token = signed(f"v1.{STREAM}.device.{int((NOW + 60) * 1000)}.{GOOD_NONCE}")
    assert verify(token).nonce == GOOD_NONCE
    resume = signed(f"r1.{STREAM}.service.{GOOD_NONCE}")
    claims = verify_resume_token(
        resume, secret=SECRET, stream_id=STREAM, role=Role.SERVICE, now=NOW
    )
    assert claims.expires_at == math.inf


@pytest.mark.parametrize(
    "payload",
    [
        f"v1.{STREAM}.device.soon.{GOOD_NONCE}",  # expiry not a number
        f"v1.{STREAM}.device.0100.{GOOD_NONCE}",  # expiry with a leading zero
        f"v1.{STREAM}.owner.1060000.{GOOD_NONCE}",  # no such role
        f"v1.{'s' * 129}.device.1060000.{GOOD_NONCE}",  # stream id too long
        f"v1.{STREAM}.device.1060000.{GOOD_NONCE[:-1]}",  # nonce: 21 characters
        f"v1.{STREAM}.device.1060000.{GOOD_NONCE[:-1]}B",  # nonce: unused bits set
        f"v1.{STREAM}.device.1060000.AAAAAAAAAAAAAAAAAAAA",  # nonce: 15 bytes
    ],
)
def test_a_signed_token_with_malformed_claims_is_invalid(payload: str) -> None:
    """The signature is checked first, the claims' shapes after: a token the hub signed but
    whose claims are malformed (no hub mints one) is refused all the same."""
    assert refused(signed(payload)).code is ErrorCode.STREAM_TOKEN_INVALID


def test_an_expiry_that_rounds_up_in_milliseconds_is_rounded_down() -> None:
    # 0.117 is not exact in binary: the float just under it times 1000 rounds up to 117.0.
    just_under = math.nextafter(0.117, 0.0)
    assert math.floor(just_under * 1000) == 117
    expires_at = stream_token_expiry(now=0.0, lifetime=just_under)
    assert expires_at == 0.116
    assert expires_at <= just_under


def test_b64url_is_unpadded_urlsafe_base64_at_every_length() -> None:
    import base64
    import os

    from devstream_core.common import b64url

    for size in range(70):
        raw = os.urandom(size) if size % 3 else bytes(range(256))[-size:] if size else b""
        assert b64url(raw) == base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
    assert b64url(b"\xfb\xff\xbf") == "-_-_"  # the two characters that differ from base64
