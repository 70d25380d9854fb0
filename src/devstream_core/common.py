"""Small shared types of the core."""

from __future__ import annotations

import enum

__all__ = ["Role"]


class Role(enum.Enum):
    """Which side of a stream a party is on."""

    DEVICE = "device"
    SERVICE = "service"

    @property
    def other(self) -> Role:
        """The role of the peer."""
        return Role.SERVICE if self is Role.DEVICE else Role.DEVICE
