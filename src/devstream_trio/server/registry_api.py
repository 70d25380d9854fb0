"""The hub's registry API (Azure's device-identity shape): list, read, create or replace, and
delete devices, and rotate their keys; a change asks every channel of the device again whether
it may stay open. ``GET /streams`` shows an operator the devices online and the
streams open. The shared-access policies are managed here too (``/policies``), with every
permission (the owner's, :data:`~devstream_core.registry.POLICY_ADMIN`); a policy's change
asks every control channel opened with its token again.

The hub verifies each request against the registry's current record (the store drops a record
from its cache before it writes it, and the hub's remembered tokens are keyed by the keys that
verified them), so a token signed with a key that was just rotated away, or by a policy just
deleted, is refused from the next request on.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from devstream_core.bridge import Bridge
from devstream_core.coordinator import Coordinator
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.registry import (
    DEVICE_RANDOM_BYTES,
    KEY_RANDOM_BYTES,
    POLICY_ADMIN,
    POLICY_RANDOM_BYTES,
    Device,
    Permission,
    Policy,
    check_policy_delete,
    check_policy_put_precondition,
    check_put_precondition,
    device_from_json,
    device_to_json,
    policy_from_json,
    policy_to_json,
    rotate_device_key,
    rotate_policy_key,
)
from devstream_core.routes import DeviceItem, DeviceKeyRotation, PolicyItem, PolicyKeyRotation

from ..transport.http import HttpError, HttpRequest, HttpServerConnection
from .control_channels import ControlChannels
from .store import RegistryStore
from .streaming import StreamingEndpoint

__all__ = ["RegistryApi", "RegistryHost"]


class RegistryHost(Protocol):
    """What :class:`RegistryApi` uses of the hub that runs it (:class:`~.hub.Hub`): its
    registry, coordinator, control channels, bridge and streaming endpoint (for ``GET
    /streams``) and a source of random bytes (for new keys); how it authorises a request, and
    what it does when a device's or a policy's record changed."""

    store: RegistryStore
    coordinator: Coordinator
    channels: ControlChannels
    bridge: Bridge
    streaming: StreamingEndpoint
    random_bytes: Callable[[int], bytes]

    async def authorize_policy(self, request: HttpRequest, needed: Permission) -> Policy:
        """The policy whose SAS token *request* carries, if it grants *needed*; HttpError
        otherwise."""

    def device_changed(self, device_id: str, device: Device | None) -> None:
        """The registry's record of *device_id* changed to *device* (None: deleted)."""

    def policy_changed(self, name: str, policy: Policy | None) -> None:
        """The registry's record of policy *name* changed to *policy* (None: deleted)."""


class RegistryApi:
    """The registry routes of one hub."""

    def __init__(self, hub: RegistryHost) -> None:
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

    async def stream_list(self, http: HttpServerConnection, request: HttpRequest) -> None:
        """``GET /streams`` (``RegistryRead``): the devices online and the live streams."""
        hub = self.hub
        await hub.authorize_policy(request, Permission.REGISTRY_READ)
        now = trio.current_time()
        coordinator = hub.coordinator
        devices = [
            {
                "deviceId": session.device_id,
                "address": session.peer,
                "controlChannel": session.connection_id,
                "onlineSeconds": round(now - session.opened_at, 3),
            }
            for session in sorted(
                hub.channels.sessions.values(), key=lambda s: (s.device_id, s.connection_id)
            )
            if coordinator.is_online(session.device_id)
        ]
        bridge = hub.bridge
        streams = [
            {
                "streamId": record.stream_id,
                "deviceId": record.device_id,
                "name": record.name,
                "mode": record.mode,
                "state": bridge.stream_state(record.stream_id).value,
                "ageSeconds": round(now - record.created_at, 3),
                "bytesToDevice": record.to_device.count,
                "bytesToService": record.to_service.count,
            }
            for record in sorted(hub.streaming.ledger.records.values(), key=lambda r: r.created_at)
        ]
        await http.send_json(200, {"devices": devices, "streams": streams})

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

    async def device_key_rotation(
        self, http: HttpServerConnection, request: HttpRequest, route: DeviceKeyRotation
    ) -> None:
        """``POST /devices/{id}/rotate-key``: a fresh key; channels signed with the old close."""
        hub = self.hub
        await hub.authorize_policy(request, Permission.REGISTRY_WRITE)
        async with self.writes:
            existing = await hub.store.get_device(route.device_id)
            if existing is None:
                raise HttpError(ErrorCode.DEVICE_NOT_FOUND, f"device {route.device_id!r} not found")
            device = rotate_device_key(
                existing,
                secondary=route.secondary,
                random_bytes=hub.random_bytes(DEVICE_RANDOM_BYTES),
            )
            await hub.store.put_device(device)
            hub.device_changed(device.device_id, device)
        await http.send_json(
            200, device_to_json(device, connected=hub.coordinator.is_online(device.device_id))
        )

    async def policy_list(self, http: HttpServerConnection, request: HttpRequest) -> None:
        """``GET /policies``: every policy, keys included."""
        hub = self.hub
        await hub.authorize_policy(request, POLICY_ADMIN)
        await http.send_json(200, [policy_to_json(p) for p in await hub.store.list_policies()])

    async def policy_item(
        self, http: HttpServerConnection, request: HttpRequest, route: PolicyItem
    ) -> None:
        """``GET``, ``PUT`` or ``DELETE /policies/{name}``."""
        hub = self.hub
        await hub.authorize_policy(request, POLICY_ADMIN)
        if request.method == b"GET":
            await http.send_json(200, policy_to_json(await self._policy(route.name)))
            return
        async with self.writes:
            try:
                if request.method == b"DELETE":
                    check_policy_delete(route.name)
                    if not await hub.store.delete_policy(route.name):
                        raise HttpError(
                            ErrorCode.POLICY_NOT_FOUND, f"policy {route.name!r} not found"
                        )
                    hub.policy_changed(route.name, None)
                    await http.send_response(204)
                    return
                existing = await hub.store.get_policy(route.name)
                raw_if_match = request.header(b"if-match")
                check_policy_put_precondition(
                    name=route.name,
                    existing=existing,
                    if_match=None if raw_if_match is None else raw_if_match.decode("latin-1"),
                )
                policy = policy_from_json(
                    request.body or b"{}",
                    name=route.name,
                    random_bytes=hub.random_bytes(POLICY_RANDOM_BYTES),
                    existing=existing,
                )
            except HttpError:
                raise
            except DevstreamError as exc:
                raise HttpError(exc.code, exc.message) from exc
            await hub.store.put_policy(policy)
            hub.policy_changed(policy.name, policy)
        await http.send_json(200, policy_to_json(policy))

    async def policy_key_rotation(
        self, http: HttpServerConnection, request: HttpRequest, route: PolicyKeyRotation
    ) -> None:
        """``POST /policies/{name}/rotate-key``: a fresh key; the old one stops at once."""
        hub = self.hub
        await hub.authorize_policy(request, POLICY_ADMIN)
        async with self.writes:
            policy = rotate_policy_key(
                await self._policy(route.name),
                secondary=route.secondary,
                random_bytes=hub.random_bytes(KEY_RANDOM_BYTES),
            )
            await hub.store.put_policy(policy)
            hub.policy_changed(policy.name, policy)
        await http.send_json(200, policy_to_json(policy))

    async def _policy(self, name: str) -> Policy:
        policy = await self.hub.store.get_policy(name)
        if policy is None:
            raise HttpError(ErrorCode.POLICY_NOT_FOUND, f"policy {name!r} not found")
        return policy
