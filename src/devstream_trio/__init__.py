"""trio adapters for devstream: the hub server, the device and service clients, the CLI.

::

    async with devstream_trio.open_device(device_connection_string) as device:
        await device.serve({"echo": handler})

    async with devstream_trio.open_service(service_connection_string) as service:
        stream = await service.open_stream("my-device", "echo")

    await nursery.start(devstream_trio.serve_hub, store)
"""

from devstream_core.session import RefusalBackoff

from .client.device import DeviceClient, Handler, open_device
from .client.framed import FramedStream, StreamOptions
from .client.proxy import serve_device_proxy, serve_service_proxy
from .client.service import AnyStream, ServiceClient, open_service
from .client.stream import HubStream
from .exceptions import (
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
    Unauthorized,
)
from .server.hub import Hub, HubConfig, serve_hub, tune_gc_for_hub
from .server.store import RegistryStore

__all__ = [
    "AnyStream",
    "DeviceClient",
    "DeviceDisabled",
    "DeviceNotFound",
    "DeviceNotOnline",
    "DeviceReplaced",
    "DeviceResponseTimeout",
    "FramedStream",
    "Handler",
    "Hub",
    "HubConfig",
    "HubError",
    "HubStream",
    "HubUnreachable",
    "PeerLost",
    "PeerNeverConnected",
    "PermissionDenied",
    "RefusalBackoff",
    "RegistryStore",
    "ServiceClient",
    "StreamJoinRefused",
    "StreamNameNotRegistered",
    "StreamOptions",
    "StreamRejected",
    "StreamReset",
    "TargetUnreachable",
    "Unauthorized",
    "open_device",
    "open_service",
    "serve_device_proxy",
    "serve_hub",
    "serve_service_proxy",
    "tune_gc_for_hub",
]
