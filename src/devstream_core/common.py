"""Small shared types and helpers of the core."""

from __future__ import annotations

import binascii
import enum

__all__ = ["IdentityEnum", "Role", "b64url"]

_URLSAFE = bytes.maketrans(b"+/", b"-_")


def b64url(raw: bytes) -> str:
    """*raw* as unpadded base64url text (``base64.urlsafe_b64encode`` without its ``=``), in
    fewer steps: tokens and their nonces are made on every stream's set-up."""
    return binascii.b2a_base64(raw, newline=False).translate(_URLSAFE).rstrip(b"=").decode("ascii")


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
