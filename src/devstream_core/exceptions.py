"""The exceptions a devstream client raises, one class per error code that matters.

A client of any I/O layer turns what the hub answers (an HTTP error body, a close reason, a
Reset frame) into one of these with :func:`error_for`, so ``except DeviceNotOnline`` reads the
same over trio and asyncio. The table from code to class is :data:`_CLASSES`, beside the
classes; a code without a class of its own gives a plain :class:`HubError`.

Every class is a :class:`~devstream_core.errors.DevstreamError`, so ``exc.code`` is always the
numeric error code from the hub (or from the client itself for ``HubUnreachable``).
"""

from __future__ import annotations

from .errors import DevstreamError, ErrorCode

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
    "reset_error",
]


class HubError(DevstreamError):
    """The hub refused a request, or could not be reached."""


class HubUnreachable(HubError):
    """No connection to the hub (refused, TLS failure, dropped)."""


class TlsMismatch(HubUnreachable):
    """The client and the hub disagree on TLS: a plain-HTTP client reached a hub that serves
    https (``UseTls=false`` against a TLS hub), or a TLS client one that serves plain http;
    the message says which and how to fix the connection string."""


class Unauthorized(HubError):
    """The hub refused the credential (wrong key, expired token, unknown policy)."""


class PermissionDenied(HubError):
    """The credential is valid but lacks a permission (e.g. ``ServiceConnect``)."""


class DeviceNotFound(HubError):
    """No device with that id in the registry."""


class DeviceDisabled(HubError):
    """The device is disabled in the registry."""


class DeviceNotOnline(HubError):
    """The device has no control channel open to the hub."""


class DeviceReplaced(HubError):
    """The device's control channel was replaced by a newer one with the same device id: the
    hub closed the older (another client uses this device id)."""


class DeviceResponseTimeout(HubError):
    """The device did not answer the stream request in time."""


class StreamRejected(HubError):
    """The device (or the hub on its behalf) rejected the stream; ``message`` says why."""


class StreamNameNotRegistered(StreamRejected):
    """The device is online but did not register this stream name."""


class StreamReset(HubError):
    """The other side reset (aborted) a devstream.v1 stream; ``reset_code`` is its number."""

    def __init__(
        self, code: ErrorCode, message: str | None = None, *, reset_code: int | None = None
    ) -> None:
        super().__init__(code, message)
        self.reset_code = int(code) if reset_code is None else reset_code


class PeerNeverConnected(HubError):
    """The other side never joined the stream before the stream tokens expired."""


class PeerLost(HubError):
    """The other side of a devstream.v1 stream dropped and did not resume in time."""


class TargetUnreachable(HubError):
    """The device-side proxy could not connect to the stream's target."""


class StreamJoinRefused(HubError):
    """The streaming endpoint refused the stream token (expired, reused, wrong stream/role)."""


_CLASSES: dict[ErrorCode, type[HubError]] = {
    ErrorCode.HUB_UNREACHABLE: HubUnreachable,
    ErrorCode.UNAUTHORIZED: Unauthorized,
    ErrorCode.PERMISSION_DENIED: PermissionDenied,
    ErrorCode.DEVICE_NOT_FOUND: DeviceNotFound,
    ErrorCode.DEVICE_DISABLED: DeviceDisabled,
    ErrorCode.DEVICE_NOT_ONLINE: DeviceNotOnline,
    ErrorCode.DEVICE_REPLACED: DeviceReplaced,
    ErrorCode.DEVICE_RESPONSE_TIMEOUT: DeviceResponseTimeout,
    ErrorCode.STREAM_REJECTED: StreamRejected,
    ErrorCode.STREAM_NAME_NOT_REGISTERED: StreamNameNotRegistered,
    ErrorCode.STREAM_RESET: StreamReset,
    ErrorCode.PEER_NEVER_CONNECTED: PeerNeverConnected,
    ErrorCode.PEER_LOST: PeerLost,
    ErrorCode.TARGET_UNREACHABLE: TargetUnreachable,
    ErrorCode.STREAM_TOKEN_EXPIRED: StreamJoinRefused,
    ErrorCode.STREAM_TOKEN_REUSED: StreamJoinRefused,
    ErrorCode.STREAM_TOKEN_WRONG_ROLE: StreamJoinRefused,
    ErrorCode.STREAM_TOKEN_WRONG_STREAM: StreamJoinRefused,
    ErrorCode.STREAM_TOKEN_INVALID: StreamJoinRefused,
}


def error_for(code: ErrorCode, message: str | None = None) -> HubError:
    """The exception for *code*: a specific class where there is one, else :class:`HubError`."""
    return _CLASSES.get(code, HubError)(code, message)


def reset_error(code: int, reason: str = "") -> HubError:
    """The exception for a devstream.v1 Reset with *code* and *reason*: :class:`StreamReset`
    (``reset_code`` the number sent) for ``STREAM_RESET`` or a code of the application's own,
    the class for the code when it is one of devstream's errors."""
    try:
        known = ErrorCode(code)
    except ValueError:
        return StreamReset(ErrorCode.STREAM_RESET, reason or None, reset_code=code)
    if known is ErrorCode.STREAM_RESET:
        return StreamReset(ErrorCode.STREAM_RESET, reason or None, reset_code=code)
    return error_for(known, reason or None)
