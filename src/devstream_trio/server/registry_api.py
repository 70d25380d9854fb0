"""The hub's registry API (Azure's device-identity shape): list, read, create or replace, and
delete devices; a change asks every channel of the device again whether it may stay open.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.registry import (
    Permission,
    check_put_precondition,
    device_from_json,
    device_to_json,
)
from devstream_core.routes import DeviceItem

from ..transport.http import HttpError, HttpRequest, HttpServerConnection

if TYPE_CHECKING:
    from .hub import Hub

__all__ = ["RegistryApi"]


class RegistryApi:
    """The registry routes of one hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        #: Held by every write (PUT, DELETE of a device), so that an If-Match is checked
        #: against the etag its write replaces.
        self.writes = trio.Lock()

    async def device_list(self, http: HttpServerConnection, request: HttpRequest) -> None:
        hub = self.hub
        await hub.authorize_policy(request, Permission.REGISTRY_READ)
        devices = await hub.store.list_devices()
        await http.send_json(
            200,
            [device_to_json(d, connected=hub.coordinator.is_online(d.device_id)) for d in devices],
        )

    async def device_item(
        self, http: HttpServerConnection, request: HttpRequest, route: DeviceItem
    ) -> None:
        hub = self.hub
        if request.method == b"GET":
            await hub.authorize_policy(request, Permission.REGISTRY_READ)
            device = await hub.store.get_device(route.device_id)
            if device is None:
                raise HttpError(ErrorCode.DEVICE_NOT_FOUND, f"device {route.device_id!r} not found")
            await http.send_json(
                200,
                device_to_json(device, connected=hub.coordinator.is_online(device.device_id)),
            )
            return
        await hub.authorize_policy(request, Permission.REGISTRY_WRITE)
        # One write at a time: an If-Match is checked against the etag the write replaces.
        async with self.writes:
            if request.method == b"DELETE":
                if not await hub.store.delete_device(route.device_id):
                    raise HttpError(
                        ErrorCode.DEVICE_NOT_FOUND, f"device {route.device_id!r} not found"
                    )
                hub.device_changed(route.device_id, None)
                await http.send_response(204)
                return
            existing = await hub.store.get_device(route.device_id)
            raw_if_match = request.header(b"if-match")
            try:
                check_put_precondition(
                    device_id=route.device_id,
                    existing=existing,
                    if_match=None if raw_if_match is None else raw_if_match.decode("latin-1"),
                )
                device = device_from_json(
                    request.body or b"{}",
                    device_id=route.device_id,
                    random_bytes=hub.random_bytes(96),
                    existing=existing,
                )
            except DevstreamError as exc:
                raise HttpError(exc.code, exc.message) from exc
            await hub.store.put_device(device)
            hub.device_changed(device.device_id, device)
        await http.send_json(
            200, device_to_json(device, connected=hub.coordinator.is_online(device.device_id))
        )
