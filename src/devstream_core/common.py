"""Small shared types and helpers of the core."""

from __future__ import annotations

import binascii
import enum
import json

__all__ = ["IdentityEnum", "Role", "b64url", "strict_json"]

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(raw: bytes) -> str:
    """*raw* as unpadded base64url text (``base64.urlsafe_b64encode`` without its ``=``), in
    fewer steps: tokens and their nonces are made on every stream's set-up."""
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


class _NotStrictJSON(ValueError):
    """Raised inside the JSON parser for input that is not strict JSON."""


def _refuse_constant(name: str) -> object:
    raise _NotStrictJSON("NaN and Infinity are not JSON")


def _unique_object(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _NotStrictJSON("duplicate member name")
    return obj


def strict_json(text: str) -> object:
    """*text* read as JSON the way the hub reads every JSON it is sent (control messages,
    registry bodies): ``NaN``, ``Infinity`` and a member name repeated in one object are
    errors, as are what :func:`json.loads` refuses (``ValueError``; ``RecursionError`` for
    nesting too deep). A repeated name would otherwise leave the last one in force unseen."""
    return json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_unique_object)


class IdentityEnum(enum.Enum):
    """An enum hashed by identity, as it compares: members are singletons, and ``Enum``'s own
    ``__hash__`` (Python code hashing the member's name) is a cost on every dictionary lookup
    of the state machines' tables."""

    __hash__ = object.__hash__


class Role(IdentityEnum):
    """Which side of a stream a party is on."""

    DEVICE = "device"
    SERVICE = "service"

    @property
    def other(self) -> Role:
        """The role of the peer."""
        return Role.SERVICE if self is Role.DEVICE else Role.DEVICE
