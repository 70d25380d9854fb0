"""devstream's sans-IO core: credentials, control channel, coordinator, bridge, error codes.

Nothing in this package touches a socket, a clock, randomness or an event loop: time and
random bytes come in as arguments, and deadlines go out as data.
"""

from .common import Role
from .errors import (
    CredentialError,
    DevstreamError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
    StreamTokenError,
)

__all__ = [
    "CredentialError",
    "DevstreamError",
    "ErrorCode",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Role",
    "StreamTokenError",
]
