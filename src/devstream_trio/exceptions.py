"""Exceptions the device and service clients raise, one class per error code that matters.

They live in the sans-IO core (:mod:`devstream_core.exceptions`), so that every I/O layer
raises the same classes; this module names them for trio code (the same class objects).
"""

from __future__ import annotations

from devstream_core.exceptions import (
    DeviceDisabled,
    DeviceNotFound,
    DeviceNotOnline,
    DeviceReplaced,
    DeviceResponseTimeout,
    HubError,
    HubUnreachable,
    PeerLost,
    PeerNeverConnected,
    PermissionDenied,
    StreamJoinRefused,
    StreamNameNotRegistered,
    StreamRejected,
    StreamReset,
    TargetUnreachable,
    TlsMismatch,
    Unauthorized,
    error_for,
)

__all__ = [
    "DeviceDisabled",
    "DeviceNotFound",
    "DeviceNotOnline",
    "DeviceReplaced",
    "DeviceResponseTimeout",
    "HubError",
    "HubUnreachable",
    "PeerLost",
    "PeerNeverConnected",
    "PermissionDenied",
    "StreamJoinRefused",
    "StreamNameNotRegistered",
    "StreamRejected",
    "StreamReset",
    "TargetUnreachable",
    "TlsMismatch",
    "Unauthorized",
    "error_for",
]
