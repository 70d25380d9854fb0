"""Stream tokens and resume tokens: the role-bound credentials for one side of one stream.

What this module knows: how the hub mints a token and how the streaming endpoint checks one.
It does not know which tokens were already used, nor which resume token is the latest; single
use is the bridge's job (:mod:`devstream_core.bridge`), because only the bridge sees joins and
resumes.

There are two kinds of token, both self-contained text signed with a secret only the hub
holds::

    v1.<stream_id>.<role>.<expires_ms>.<nonce>.<mac>     stream token (join)
    r1.<stream_id>.<role>.<nonce>.<mac>                  resume token (devstream.v1 resume)

``nonce`` and ``mac`` are base64url without padding; ``mac`` is HMAC-SHA256 over everything
before the last dot, prefix included. Because the claims travel in the clear and the signature
covers them, the hub can tell a forged token apart from an honest one that is expired, for the
other side, or for another stream, and say which.

A stream token admits a side to a stream once, within 60 seconds. A resume token lets a
``devstream.v1`` side that dropped come back to the same stream; it has no expiry of its own
(its claims say ``expires_at = inf``): the bridge accepts only the latest one it issued for a
role, and only while the stream lives.

Rules:

* A token is URL-safe ASCII (``A-Z a-z 0-9 - _ .``) and at most :data:`MAX_TOKEN_LENGTH`
  characters, so it fits in an ``Authorization: Bearer`` header and in a URL unescaped.
* The expiry is whole milliseconds, rounded *down*: a token minted at ``now`` never lives past
  ``now + lifetime``. At its ``expires_at`` a token is already expired.
* Verification order is fixed: malformed or wrongly signed (``STREAM_TOKEN_INVALID``), then
  another stream (``STREAM_TOKEN_WRONG_STREAM``), then the other role
  (``STREAM_TOKEN_WRONG_ROLE``), then expired (``STREAM_TOKEN_EXPIRED``, stream tokens only).
* The two kinds never stand in for each other: a resume token presented as a stream token, or
  a stream token presented as a resume token, is ``STREAM_TOKEN_INVALID``.
* No error message ever contains a token or any part of one.
"""

from __future__ import annotations

import base64
import hmac
import math
import re
from dataclasses import dataclass

from .common import Role, b64url
from .errors import ErrorCode, LocalProtocolError, StreamTokenError

__all__ = [
    "MAX_TOKEN_LENGTH",
    "MIN_NONCE_BYTES",
    "STREAM_TOKEN_LIFETIME",
    "StreamTokenClaims",
    "check_nonce",
    "is_resume_token",
    "mint_resume_token",
    "mint_stream_token",
    "stream_token_expiry",
    "verify_resume_token",
    "verify_stream_token",
]

#: How long a stream token lives, in seconds.
STREAM_TOKEN_LIFETIME = 60.0
#: The longest token text this module mints or accepts.
MAX_TOKEN_LENGTH = 512
#: The fewest random bytes a token's nonce may have.
MIN_NONCE_BYTES = 16
#: The most random bytes a token's nonce may have (keeps tokens short).
MAX_NONCE_BYTES = 64
#: The longest stream id a token can carry.
MAX_STREAM_ID_LENGTH = 128

_VERSION = "v1"
_RESUME_VERSION = "r1"
_STREAM_ID_RE = re.compile(rf"[A-Za-z0-9_-]{{1,{MAX_STREAM_ID_LENGTH}}}")
_TOKEN_CHARS_RE = re.compile(r"[A-Za-z0-9_.-]+")
_EXPIRES_RE = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_ROLES: dict[str, Role] = {role.value: role for role in Role}


@dataclass(frozen=True, kw_only=True)
class StreamTokenClaims:
    """What a verified stream token says."""

    #: The stream the token admits to.
    stream_id: str
    #: The side of the stream the token is for.
    role: Role
    #: The moment (same clock as ``now``) from which the token is expired; ``inf`` for a
    #: resume token, which has no expiry of its own.
    expires_at: float
    #: The token's nonce as base64url text; unique per token, the key for single use.
    nonce: str


def _b64url_decode(text: str) -> bytes | None:
    """Decode canonical unpadded base64url, or return None."""
    if not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        return None
    # The alphabet and the length are right, so this decodes; the round trip refuses a
    # non-canonical text (unused bits set in its last character).
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return raw if b64url(raw) == text else None


def _mac(secret: bytes, payload: str) -> str:
    return b64url(hmac.digest(secret, payload.encode("ascii"), "sha256"))


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or not secret:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "the hub secret must be non-empty")


def _check_claims(*, secret: bytes, stream_id: str, role: Role, nonce: bytes) -> None:
    _check_secret(secret)
    if not isinstance(stream_id, str) or not _STREAM_ID_RE.fullmatch(stream_id):
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID,
            f"stream id must be 1 to {MAX_STREAM_ID_LENGTH} characters of A-Z a-z 0-9 - _",
        )
    if not isinstance(role, Role):
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "role must be a Role")
    check_nonce(nonce)


def check_nonce(nonce: bytes) -> None:
    """Refuse (``ARGUMENT_INVALID``) what a token's minting refuses as its nonce: anything
    but 16 to 64 bytes."""
    if not isinstance(nonce, bytes) or not MIN_NONCE_BYTES <= len(nonce) <= MAX_NONCE_BYTES:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID,
            f"nonce must be {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes",
        )


def _check_time(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, f"{name} must be a finite number")


def _expires_ms(now: float, lifetime: float) -> int:
    target = now + lifetime
    ms = math.floor(target * 1000)
    # Float rounding in ``target * 1000`` may land one step high; never outlive ``target``.
    while ms / 1000 > target:
        ms -= 1
    return ms


def stream_token_expiry(*, now: float, lifetime: float = STREAM_TOKEN_LIFETIME) -> float:
    """The ``expires_at`` a token minted at *now* with *lifetime* carries.

    It is ``now + lifetime`` rounded down to the millisecond, so it is never later.
    """
    _check_time("now", now)
    _check_time("lifetime", lifetime)
    if lifetime <= 0:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "lifetime must be positive")
    return _expires_ms(now, lifetime) / 1000


def mint_stream_token(
    *,
    secret: bytes,
    stream_id: str,
    role: Role,
    now: float,
    nonce: bytes,
    lifetime: float = STREAM_TOKEN_LIFETIME,
) -> str:
    """Mint the token that admits side *role* to stream *stream_id* until ``now + lifetime``.

    *nonce* must be 16 to 64 random bytes, fresh for every token. *stream_id* must be 1 to 128
    URL-safe characters (``A-Z a-z 0-9 - _``). Raises :class:`LocalProtocolError`
    (``ARGUMENT_INVALID``) on a bad argument.
    """
    _check_claims(secret=secret, stream_id=stream_id, role=role, nonce=nonce)
    stream_token_expiry(now=now, lifetime=lifetime)  # validates now and lifetime
    expires_ms = _expires_ms(now, lifetime)
    payload = f"{_VERSION}.{stream_id}.{role.value}.{expires_ms}.{b64url(nonce)}"
    token = f"{payload}.{_mac(secret, payload)}"
    assert len(token) <= MAX_TOKEN_LENGTH
    return token


def _invalid() -> StreamTokenError:
    return StreamTokenError(ErrorCode.STREAM_TOKEN_INVALID)


def _parse(token: str, secret: bytes, version: str) -> StreamTokenClaims:
    """Check shape and signature and return the claims, or raise ``STREAM_TOKEN_INVALID``.

    ``version`` is the prefix of the kind expected (``v1`` stream token, ``r1`` resume token).
    """
    if (
        not isinstance(token, str)
        or len(token) > MAX_TOKEN_LENGTH
        or not token.isascii()
        or not _TOKEN_CHARS_RE.fullmatch(token)
    ):
        raise _invalid()
    parts = token.split(".")
    if parts[0] != version or len(parts) != (6 if version == _VERSION else 5):
        raise _invalid()
    payload, _, mac = token.rpartition(".")
    if not hmac.compare_digest(_mac(secret, payload), mac):
        raise _invalid()
    expires_at = math.inf
    if version == _VERSION:
        _, stream_id, role_text, expires_text, nonce_text, _ = parts
        if not _EXPIRES_RE.fullmatch(expires_text):
            raise _invalid()
        expires_at = int(expires_text) / 1000
    else:
        _, stream_id, role_text, nonce_text, _ = parts
    role = _ROLES.get(role_text)
    nonce = _b64url_decode(nonce_text)
    if (
        role is None
        or not _STREAM_ID_RE.fullmatch(stream_id)
        or nonce is None
        or len(nonce) < MIN_NONCE_BYTES
    ):
        raise _invalid()
    return StreamTokenClaims(
        stream_id=stream_id, role=role, expires_at=expires_at, nonce=nonce_text
    )


def _check_target(claims: StreamTokenClaims, stream_id: str, role: Role | None) -> None:
    if claims.stream_id != stream_id:
        raise StreamTokenError(ErrorCode.STREAM_TOKEN_WRONG_STREAM)
    if role is not None and claims.role is not role:
        raise StreamTokenError(ErrorCode.STREAM_TOKEN_WRONG_ROLE)


def verify_stream_token(
    token: str,
    *,
    secret: bytes,
    stream_id: str,
    role: Role | None,
    now: float,
) -> StreamTokenClaims:
    """Check that *token* admits side *role* to stream *stream_id* at *now*; return its claims.

    With ``role=None`` the token's own role is taken as is. Raises :class:`StreamTokenError`
    with, in this order: ``STREAM_TOKEN_INVALID`` (malformed, not signed with *secret*, or a
    resume token), ``STREAM_TOKEN_WRONG_STREAM``, ``STREAM_TOKEN_WRONG_ROLE``,
    ``STREAM_TOKEN_EXPIRED`` (``now >= expires_at``). This does not check single use; the
    bridge does.
    """
    _check_secret(secret)
    _check_time("now", now)
    claims = _parse(token, secret, _VERSION)
    _check_target(claims, stream_id, role)
    if now >= claims.expires_at:
        raise StreamTokenError(ErrorCode.STREAM_TOKEN_EXPIRED)
    return claims


def mint_resume_token(*, secret: bytes, stream_id: str, role: Role, nonce: bytes) -> str:
    """Mint a resume token that lets side *role* come back to stream *stream_id*.

    It has no expiry of its own: the bridge decides whether it is still good (only the latest
    one issued for a role, only while the stream lives). *nonce* must be 16 to 64 random
    bytes, fresh for every token. Raises :class:`LocalProtocolError` (``ARGUMENT_INVALID``) on
    a bad argument.
    """
    _check_claims(secret=secret, stream_id=stream_id, role=role, nonce=nonce)
    payload = f"{_RESUME_VERSION}.{stream_id}.{role.value}.{b64url(nonce)}"
    token = f"{payload}.{_mac(secret, payload)}"
    assert len(token) <= MAX_TOKEN_LENGTH
    return token


def is_resume_token(token: str) -> bool:
    """Whether *token* looks like a resume token rather than a stream token (by its prefix).

    This only sorts a bearer token to the right check; it proves nothing about the token.
    """
    return isinstance(token, str) and token.startswith(_RESUME_VERSION + ".")


def verify_resume_token(
    token: str,
    *,
    secret: bytes,
    stream_id: str,
    role: Role | None,
    now: float,
) -> StreamTokenClaims:
    """Check that *token* is a resume token of this hub for side *role* of *stream_id*.

    With ``role=None`` the token's own role is taken as is. The claims' ``expires_at`` is
    ``inf``; *now* is only checked to be finite. Raises :class:`StreamTokenError` with, in this
    order: ``STREAM_TOKEN_INVALID`` (malformed, not signed with *secret*, or a stream token),
    ``STREAM_TOKEN_WRONG_STREAM``, ``STREAM_TOKEN_WRONG_ROLE``. Whether it is the latest one
    for its role is the bridge's check.
    """
    _check_secret(secret)
    _check_time("now", now)
    claims = _parse(token, secret, _RESUME_VERSION)
    _check_target(claims, stream_id, role)
    return claims
