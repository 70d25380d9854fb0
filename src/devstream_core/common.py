"""Small shared types of the core."""

from __future__ import annotations

import enum

__all__ = ["IdentityEnum", "Role"]


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
