"""devstream's asyncio clients: a device and a service client driven by ``devstream_core``.

The same machines as the trio clients make every decision (:mod:`devstream_core.session`,
:mod:`devstream_core.streamdriver`, :mod:`devstream_core.client_websocket`,
:mod:`devstream_core.response`, :mod:`devstream_core.raw`, :mod:`devstream_core.handshake`,
:mod:`devstream_core.wire`); this package holds only the asyncio side: streams, tasks,
timers. Errors are the core's classes (:mod:`devstream_core.exceptions`).
"""

from devstream_core.exceptions import *  # noqa: F403
from devstream_core.exceptions import __all__ as _exceptions
from devstream_core.session import RefusalBackoff
from devstream_core.streamdriver import StreamOptions

from .device import DeviceClient, Handler, open_device
from .service import ServiceClient, open_service
from .stream import FramedStream, RawStream, Stream

__all__ = [
    *_exceptions,
    "DeviceClient",
    "FramedStream",
    "Handler",
    "RawStream",
    "RefusalBackoff",
    "ServiceClient",
    "Stream",
    "StreamOptions",
    "open_device",
    "open_service",
]
