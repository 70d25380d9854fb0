"""The one table of error codes, used by every layer of devstream.

Rules:

* An error code is a six-digit number whose first three digits are the HTTP status the hub
  answers with (``404001`` -> ``404``). Where Azure IoT Hub has a number for the same
  condition, devstream uses Azure's number; devstream's own numbers have a ``9`` in the
  fourth digit (``401901``) so they never collide with Azure's.
* A WebSocket that the hub closes because of an error uses the close code
  ``4000 + status`` (``401`` -> ``4401``) and the close reason ``"<errorCode> <message>"``,
  so a client recovers the exact error code from the close reason alone.
* :class:`LocalProtocolError` means *this* program misused an API; :class:`RemoteProtocolError`
  means the peer sent something invalid. Both carry an :class:`ErrorCode`.
"""

from __future__ import annotations

import enum

__all__ = [
    "CredentialError",
    "DevstreamError",
    "ErrorCode",
    "LocalProtocolError",
    "RemoteProtocolError",
    "StreamTokenError",
    "close_code_for",
    "close_reason_for",
    "parse_close_reason",
]


class ErrorCode(enum.IntEnum):
    """Every error devstream reports, with its default message in :data:`MESSAGES`."""

    #: The HTTP request could not be parsed (bad request line, bad header, bad framing).
    MALFORMED_REQUEST = 400901
    #: A request body or control message is not valid JSON (or not a JSON object).
    INVALID_JSON = 400902
    #: A field has an invalid value (Azure ``ArgumentInvalid``).
    ARGUMENT_INVALID = 400004
    #: A connection string is malformed.
    INVALID_CONNECTION_STRING = 400903
    #: The peer broke the control-channel protocol: a message of the wrong shape (missing or
    #: mistyped field, unknown type) or one not allowed in the current state.
    PROTOCOL_ERROR = 400904
    #: Missing, malformed, wrong or expired SAS token (Azure ``IotHubUnauthorizedAccess``).
    UNAUTHORIZED = 401002
    #: The stream token has expired (tokens live 60 seconds).
    STREAM_TOKEN_EXPIRED = 401901
    #: The stream token was already used once.
    STREAM_TOKEN_REUSED = 401902
    #: The stream token belongs to the other side of the stream (device vs service).
    STREAM_TOKEN_WRONG_ROLE = 401903
    #: The stream token belongs to another stream.
    STREAM_TOKEN_WRONG_STREAM = 401904
    #: The stream token is missing, malformed or not signed by this hub.
    STREAM_TOKEN_INVALID = 401905
    #: The credential is valid but lacks the permission the request needs.
    PERMISSION_DENIED = 403901
    #: The device is disabled in the registry.
    DEVICE_DISABLED = 403902
    #: The device rejected the stream request.
    STREAM_REJECTED = 403903
    #: The owner policy (``iothubowner``) cannot be deleted or lose a permission.
    OWNER_POLICY_PROTECTED = 403905
    #: No device with that id is registered (Azure ``DeviceNotFound``).
    DEVICE_NOT_FOUND = 404001
    #: The device exists but has no control channel open (Azure ``DeviceNotOnline``).
    DEVICE_NOT_ONLINE = 404103
    #: The device is online but did not register this stream name.
    STREAM_NAME_NOT_REGISTERED = 404901
    #: No such path on the hub, or no such stream on the streaming endpoint.
    NOT_FOUND = 404902
    #: No shared-access policy with that name.
    POLICY_NOT_FOUND = 404903
    #: A devstream.v1 stream was reset (aborted) by the other side.
    STREAM_RESET = 410901
    #: The path exists but not for this HTTP method.
    METHOD_NOT_ALLOWED = 405901
    #: The client took too long to send its request headers.
    REQUEST_TIMEOUT = 408901
    #: A connection (a control channel) sent no message and no ping for its idle time.
    CONNECTION_IDLE = 408902
    #: The device id is already registered (Azure ``DeviceAlreadyExists``).
    DEVICE_ALREADY_EXISTS = 409001
    #: A shared-access policy with that name exists already.
    POLICY_ALREADY_EXISTS = 409905
    #: Another hub holds the data folder's lock (``devstream hub`` refuses to start).
    DATA_FOLDER_IN_USE = 409901
    #: The device registered on a newer control channel, and the hub closed this older one
    #: (another client uses the same device id, or this one reconnected).
    DEVICE_REPLACED = 409902
    #: ``If-Match`` names an etag that is not the current one (Azure ``PreconditionFailed``).
    PRECONDITION_FAILED = 412002
    #: A request body, control message or frame is larger than the limit.
    PAYLOAD_TOO_LARGE = 413901
    #: The request headers are larger than the limit.
    HEADERS_TOO_LARGE = 431901
    #: A plain HTTP request reached a WebSocket-only path.
    UPGRADE_REQUIRED = 426901
    #: A WebSocket handshake asked for a version other than 13 (the answer names 13).
    WEBSOCKET_VERSION_UNSUPPORTED = 426902
    #: Too many requests (Azure ``ThrottlingException``).
    THROTTLED = 429001
    #: An unexpected failure inside the hub (Azure ``ServerError``).
    SERVER_ERROR = 500001
    #: The hub's data folder cannot be used: it cannot be created or written, or its registry
    #: database is not a database or is damaged (``devstream hub`` refuses to start).
    DATA_FOLDER_UNUSABLE = 500901
    #: The device-side proxy could not connect to the stream's target.
    TARGET_UNREACHABLE = 502901
    #: The hub is shutting down or cannot serve the request now.
    SERVICE_UNAVAILABLE = 503901
    #: The device did not answer the stream request in time (Azure ``GatewayTimeout``).
    DEVICE_RESPONSE_TIMEOUT = 504101
    #: One side joined the stream but its peer never arrived before the tokens expired.
    PEER_NEVER_CONNECTED = 504901
    #: A devstream.v1 side dropped and did not resume within the grace period.
    PEER_LOST = 504902
    #: The client could not reach the hub (connection refused, TLS failure, drop).
    HUB_UNREACHABLE = 503902

    @property
    def http_status(self) -> int:
        """The HTTP status the hub answers with for this error."""
        return int(self) // 1000

    @property
    def close_code(self) -> int:
        """The WebSocket close code the hub uses for this error (4000 + status)."""
        return 4000 + self.http_status

    @property
    def message(self) -> str:
        """The default, human-readable message."""
        return MESSAGES[self]


MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.MALFORMED_REQUEST: "malformed HTTP request",
    ErrorCode.INVALID_JSON: "invalid JSON",
    ErrorCode.ARGUMENT_INVALID: "invalid argument",
    ErrorCode.INVALID_CONNECTION_STRING: "invalid connection string",
    ErrorCode.PROTOCOL_ERROR: "protocol error",
    ErrorCode.UNAUTHORIZED: "unauthorized: missing, malformed, wrong or expired SAS token",
    ErrorCode.STREAM_TOKEN_EXPIRED: "stream token expired",
    ErrorCode.STREAM_TOKEN_REUSED: "stream token already used",
    ErrorCode.STREAM_TOKEN_WRONG_ROLE: "stream token is for the other side of the stream",
    ErrorCode.STREAM_TOKEN_WRONG_STREAM: "stream token is for another stream",
    ErrorCode.STREAM_TOKEN_INVALID: "stream token missing or invalid",
    ErrorCode.PERMISSION_DENIED: "permission denied",
    ErrorCode.DEVICE_DISABLED: "device is disabled",
    ErrorCode.STREAM_REJECTED: "the device rejected the stream",
    ErrorCode.OWNER_POLICY_PROTECTED: "the owner policy cannot be deleted or lose a permission",
    ErrorCode.DEVICE_NOT_FOUND: "device not found",
    ErrorCode.DEVICE_NOT_ONLINE: "device not online",
    ErrorCode.STREAM_NAME_NOT_REGISTERED: "the device did not register this stream name",
    ErrorCode.NOT_FOUND: "not found",
    ErrorCode.POLICY_NOT_FOUND: "shared-access policy not found",
    ErrorCode.METHOD_NOT_ALLOWED: "method not allowed",
    ErrorCode.STREAM_RESET: "the stream was reset by the other side",
    ErrorCode.REQUEST_TIMEOUT: "request headers not received in time",
    ErrorCode.CONNECTION_IDLE: "no message or ping received in time",
    ErrorCode.DEVICE_ALREADY_EXISTS: "device already exists",
    ErrorCode.POLICY_ALREADY_EXISTS: "shared-access policy already exists",
    ErrorCode.DATA_FOLDER_IN_USE: "the data folder is in use by another hub",
    ErrorCode.DEVICE_REPLACED: "replaced by a newer connection",
    ErrorCode.PRECONDITION_FAILED: "If-Match does not match the current etag",
    ErrorCode.PAYLOAD_TOO_LARGE: "payload too large",
    ErrorCode.HEADERS_TOO_LARGE: "request headers too large",
    ErrorCode.UPGRADE_REQUIRED: "this path only accepts WebSocket connections",
    ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED: "the hub speaks WebSocket version 13 only",
    ErrorCode.THROTTLED: "too many requests",
    ErrorCode.SERVER_ERROR: "internal hub error",
    ErrorCode.DATA_FOLDER_UNUSABLE: "the hub's data folder cannot be used",
    ErrorCode.SERVICE_UNAVAILABLE: "hub unavailable",
    ErrorCode.TARGET_UNREACHABLE: "the device could not connect to the stream's target",
    ErrorCode.DEVICE_RESPONSE_TIMEOUT: "the device did not answer the stream request in time",
    ErrorCode.PEER_NEVER_CONNECTED: "the other side of the stream never connected",
    ErrorCode.HUB_UNREACHABLE: "cannot reach the hub",
    ErrorCode.PEER_LOST: "the other side of the stream dropped and did not come back in time",
}


def close_code_for(code: ErrorCode) -> int:
    """The WebSocket close code for *code* (``4000 + http status``)."""
    return code.close_code


def close_reason_for(code: ErrorCode, message: str | None = None) -> str:
    """The WebSocket close reason for *code*: ``"<errorCode> <message>"``.

    Close reasons are limited to 123 bytes of UTF-8 by RFC 6455; longer messages are cut.
    """
    text = f"{int(code)} {message if message is not None else code.message}"
    raw = text.encode("utf-8")[:123]
    return raw.decode("utf-8", errors="ignore")


def parse_close_reason(reason: str | None) -> tuple[ErrorCode | None, str]:
    """Split a close reason made by :func:`close_reason_for` back into code and message.

    Returns ``(None, reason)`` when the reason does not start with a known error code.
    """
    if not reason:
        return None, ""
    head, _, rest = reason.partition(" ")
    if head.isdigit():
        try:
            return ErrorCode(int(head)), rest
        except ValueError:
            pass
    return None, reason


class DevstreamError(Exception):
    """Base of every error devstream raises on purpose; carries an :class:`ErrorCode`."""

    def __init__(self, code: ErrorCode, message: str | None = None) -> None:
        self.code = code
        self.message = message if message is not None else code.message
        super().__init__(f"{self.message} (error {int(code)})")


class LocalProtocolError(DevstreamError):
    """This program used an API in a way the protocol does not allow."""


class RemoteProtocolError(DevstreamError):
    """The peer sent something the protocol does not allow."""


class CredentialError(DevstreamError):
    """A connection string or SAS token is malformed, wrong or expired."""


class StreamTokenError(DevstreamError):
    """A stream token was refused (expired, reused, wrong role, wrong stream, invalid)."""
