"""devstream's HTTP header names, for trio code: they live in :mod:`devstream_core.wire`."""

from __future__ import annotations

from devstream_core.wire import (
    HEADER_CONNECT_TIMEOUT,
    HEADER_RESPONSE_TIMEOUT,
    HEADER_RESUME_TOKEN,
    HEADER_STREAM_MODE,
    HEADER_STREAM_WINDOW,
)

__all__ = [
    "HEADER_CONNECT_TIMEOUT",
    "HEADER_RESPONSE_TIMEOUT",
    "HEADER_RESUME_TOKEN",
    "HEADER_STREAM_MODE",
    "HEADER_STREAM_WINDOW",
]
