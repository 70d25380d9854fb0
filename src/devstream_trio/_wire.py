"""Names on the wire that the hub and the clients must spell alike: devstream's HTTP headers."""

from __future__ import annotations

from typing import Final

__all__ = [
    "HEADER_CONNECT_TIMEOUT",
    "HEADER_RESPONSE_TIMEOUT",
    "HEADER_RESUME_TOKEN",
    "HEADER_STREAM_MODE",
    "HEADER_STREAM_WINDOW",
]

#: Azure's initiate headers.
HEADER_CONNECT_TIMEOUT: Final = b"iothub-streaming-connect-timeout-in-seconds"
HEADER_RESPONSE_TIMEOUT: Final = b"iothub-streaming-response-timeout-in-seconds"
#: devstream's initiate headers: the data-plane mode and the devstream.v1 window asked for.
HEADER_STREAM_MODE: Final = b"devstream-stream-mode"
HEADER_STREAM_WINDOW: Final = b"devstream-stream-window"
#: In a devstream.v1 join's 101 answer: the side's fresh resume token.
HEADER_RESUME_TOKEN: Final = b"devstream-resume-token"
