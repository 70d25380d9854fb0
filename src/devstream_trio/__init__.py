"""trio adapters for devstream: the hub server, the device and service clients, the CLI.

::

    async with devstream_trio.open_device(device_connection_string) as device:
        await device.serve({"echo": handler})

    async with devstream_trio.open_service(service_connection_string) as service:
        stream = await service.open_stream("my-device", "echo")

    await nursery.start(devstream_trio.serve_hub, store)
"""

from .device import DeviceClient, Handler, open_device
from .exceptions import (
    DeviceDisabled,
    DeviceNotFound,
    DeviceNotOnline,
    DeviceResponseTimeout,
    HubError,
    HubUnreachable,
    PermissionDenied,
    StreamJoinRefused,
    StreamNameNotRegistered,
    StreamRejected,
    Unauthorized,
)
from .hub import Hub, HubConfig, serve_hub
from .service import ServiceClient, open_service
from .store import RegistryStore
from .stream import HubStream

__all__ = [
    "DeviceClient",
    "DeviceDisabled",
    "DeviceNotFound",
    "DeviceNotOnline",
    "DeviceResponseTimeout",
    "Handler",
    "Hub",
    "HubConfig",
    "HubError",
    "HubStream",
    "HubUnreachable",
    "PermissionDenied",
    "RegistryStore",
    "ServiceClient",
    "StreamJoinRefused",
    "StreamNameNotRegistered",
    "StreamRejected",
    "Unauthorized",
    "open_device",
    "open_service",
    "serve_hub",
]
