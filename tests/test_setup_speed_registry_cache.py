"""The registry store's lookup cache: fast lookups that never answer with a stale record.

``RegistryStore.get_device`` and ``get_policy`` answer from an in-process cache once a record
was read; every write through the store drops what it changes. These tests check that each
kind of write is seen by the next lookup, straight on the store and through a running hub
(keys rotated, a device disabled or deleted, a policy narrowed or removed), and that a cached
lookup needs no worker thread.

Test rules: the hub runs on in-memory streams (``hub_env``) on the autojump clock, under
``trio.fail_after``; file databases live in pytest's ``tmp_path``. No sockets, no sleeps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from devstream_core import authorization, credentials
from devstream_core.credentials import ConnectionString
from devstream_core.registry import Device, Permission, Policy, new_device, new_key
from devstream_trio.exceptions import (
    DeviceDisabled,
    DeviceNotFound,
    PermissionDenied,
    Unauthorized,
)
from devstream_trio.server import store as store_module
from devstream_trio.server.store import RegistryStore

from .conftest import HubEnv

TIMEOUT = 60


def make_device(device_id: str, seed: int = 1) -> Device:
    return new_device(device_id=device_id, random_bytes=bytes([seed]) * 96)


def with_keys(device: Device, seed: int) -> Device:
    return dataclasses.replace(
        device,
        primary_key=new_key(bytes([seed]) * 32),
        secondary_key=new_key(bytes([seed + 1]) * 32),
    )


@pytest.fixture(params=["memory", "file"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    path = None if request.param == "memory" else tmp_path / "registry.sqlite3"
    async with await RegistryStore.open(path) as opened:
        yield opened


def no_worker_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any use of a worker thread fail the test."""

    async def refuse(*args: object, **kwargs: object) -> object:
        raise AssertionError("a worker thread was used")

    monkeypatch.setattr(trio.to_thread, "run_sync", refuse)


# -- the store -------------------------------------------------------------------------------


async def test_each_device_write_is_seen_by_the_next_lookup(store: RegistryStore) -> None:
    original = make_device("d1")
    await store.create_device(original)
    assert await store.get_device("d1") == original  # now cached
    assert await store.get_device("d1") == original

    rotated = with_keys(original, seed=7)
    await store.put_device(rotated)
    assert await store.get_device("d1") == rotated

    disabled = dataclasses.replace(rotated, status="disabled")
    await store.put_device(disabled)
    assert await store.get_device("d1") == disabled

    assert await store.delete_device("d1")
    assert await store.get_device("d1") is None

    recreated = make_device("d1", seed=9)
    await store.create_device(recreated)
    assert await store.get_device("d1") == recreated


async def test_each_policy_write_is_seen_by_the_next_lookup(store: RegistryStore) -> None:
    policy = Policy(
        name="ops",
        primary_key=new_key(b"\x01" * 32),
        secondary_key=new_key(b"\x02" * 32),
        permissions=Permission.SERVICE_CONNECT | Permission.REGISTRY_READ,
    )
    await store.put_policy(policy)
    assert await store.get_policy("ops") == policy
    narrowed = dataclasses.replace(
        policy, primary_key=new_key(b"\x03" * 32), permissions=Permission.REGISTRY_READ
    )
    await store.put_policy(narrowed)
    assert await store.get_policy("ops") == narrowed
    assert await store.delete_policy("ops")
    assert await store.get_policy("ops") is None


async def test_a_failed_create_leaves_the_cached_record_right(store: RegistryStore) -> None:
    original = make_device("d1")
    await store.create_device(original)
    assert await store.get_device("d1") == original
    with pytest.raises(Exception):  # noqa: B017 - DEVICE_ALREADY_EXISTS
        await store.create_device(make_device("d1", seed=2))
    assert await store.get_device("d1") == original


async def test_a_cached_lookup_needs_no_worker_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with await RegistryStore.open(tmp_path / "registry.sqlite3") as opened:
        device = make_device("d1")
        await opened.create_device(device)
        assert await opened.get_device("d1") == device
        policy = Policy(
            name="ops",
            primary_key=new_key(b"\x01" * 32),
            secondary_key=new_key(b"\x02" * 32),
            permissions=Permission.SERVICE_CONNECT,
        )
        await opened.put_policy(policy)
        assert await opened.get_policy("ops") == policy
        with monkeypatch.context() as patch:
            no_worker_threads(patch)
            assert await opened.get_device("d1") == device
            assert await opened.get_policy("ops") == policy
            # A record not read yet still needs the database.
            with pytest.raises(AssertionError, match="worker thread"):
                await opened.get_device("d2")


async def test_a_record_that_does_not_exist_is_not_cached(store: RegistryStore) -> None:
    assert await store.get_device("late") is None
    device = make_device("late")
    await store.create_device(device)
    assert await store.get_device("late") == device


async def test_lookups_stay_right_past_the_cache_size(
    store: RegistryStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_module, "CACHE_SIZE", 2)
    devices = {f"d{i}": make_device(f"d{i}", seed=i + 1) for i in range(5)}
    for device in devices.values():
        await store.create_device(device)
    for _ in range(2):
        for device_id, device in devices.items():
            assert await store.get_device(device_id) == device
    devices["d0"] = with_keys(devices["d0"], seed=40)
    await store.put_device(devices["d0"])
    for device_id, device in devices.items():
        assert await store.get_device(device_id) == device


async def test_a_closed_store_refuses_even_cached_lookups(tmp_path: Path) -> None:
    opened = await RegistryStore.open(tmp_path / "registry.sqlite3")
    await opened.create_device(make_device("d1"))
    assert await opened.get_device("d1") is not None
    await opened.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await opened.get_device("d1")


# -- through a running hub -------------------------------------------------------------------


async def echo(stream: Any) -> None:
    async for data in stream:
        await stream.send_all(data)


async def serve_device(hub_env: HubEnv, cs: ConnectionString) -> Callable[[], None]:
    """Bring a device online; return a function that takes it offline.

    The hub dropping it later (disabled, deleted) ends it quietly.
    """
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope, contextlib.suppress(DeviceDisabled, DeviceNotFound):
            await hub_env.device(cs).serve({"echo": echo}, task_status=task_status)

    await hub_env.nursery.start(run)
    return scope.cancel


async def assert_echoes(hub_env: HubEnv, device_id: str) -> None:
    stream = await hub_env.service().open_stream(device_id, "echo")
    await stream.send_all(b"ping")
    assert await stream.receive_some() == b"ping"
    await stream.aclose()


async def test_rotated_device_keys_take_effect_at_once(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        service = hub_env.service()
        old_cs = await hub_env.create_device("d1")
        stop = await serve_device(hub_env, old_cs)
        await assert_echoes(hub_env, "d1")  # device and policy now cached by the hub
        stop()
        new_key_text = new_key(b"\x05" * 32)
        body = {
            "deviceId": "d1",
            "authentication": {
                "symmetricKey": {"primaryKey": new_key_text, "secondaryKey": new_key_text}
            },
        }
        response = await service.request(
            "PUT",
            "/devices/d1",
            headers=[("content-type", "application/json"), ("if-match", "*")],
            body=json.dumps(body).encode(),
        )
        assert response.status == 200, response.body
        updated = json.loads(response.body)
        new_cs = service.device_connection_string(updated)
        assert new_cs.shared_access_key == new_key_text
        with pytest.raises(Unauthorized):
            await hub_env.device(old_cs).serve({"echo": echo})
        await serve_device(hub_env, new_cs)
        await assert_echoes(hub_env, "d1")


async def test_a_disabled_or_deleted_device_is_refused_at_once(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        service = hub_env.service()
        cs = await hub_env.create_device("d1")
        await serve_device(hub_env, cs)
        await assert_echoes(hub_env, "d1")
        await service.set_device_status("d1", "disabled")
        with pytest.raises(DeviceDisabled):
            await service.open_stream("d1", "echo")
        await service.delete_device("d1")
        with pytest.raises(DeviceNotFound):
            await service.open_stream("d1", "echo")
        with pytest.raises(DeviceNotFound):
            await hub_env.device(cs).serve({"echo": echo})


async def test_a_changed_or_removed_policy_takes_effect_at_once(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        await hub_env.create_device("d1")
        await serve_device(hub_env, await hub_env.create_device("d2"))
        ops = await put_service_policy(hub_env, seed=0x11)
        await assert_echoes_with(hub_env, ops, "d2")
        # Rotate the keys: the old connection string is refused.
        rotated = dataclasses.replace(
            ops, primary_key=new_key(b"\x13" * 32), secondary_key=new_key(b"\x14" * 32)
        )
        await hub_env.store.put_policy(rotated)
        with pytest.raises(Unauthorized):
            await hub_env.service(ops).open_stream("d2", "echo")
        await assert_echoes_with(hub_env, rotated, "d2")
        # Take the permission away.
        await hub_env.store.put_policy(
            dataclasses.replace(rotated, permissions=Permission.REGISTRY_READ)
        )
        with pytest.raises(PermissionDenied):
            await hub_env.service(rotated).open_stream("d2", "echo")
        # Remove it.
        assert await hub_env.store.delete_policy("ops")
        with pytest.raises(Unauthorized):
            await hub_env.service(rotated).open_stream("d2", "echo")


async def put_service_policy(hub_env: HubEnv, *, seed: int) -> Policy:
    """Store a policy "ops" with only the service-connect permission, keys made from *seed*."""
    ops = Policy(
        name="ops",
        primary_key=new_key(bytes([seed]) * 32),
        secondary_key=new_key(bytes([seed + 1]) * 32),
        permissions=Permission.SERVICE_CONNECT,
    )
    await hub_env.store.put_policy(ops)
    return ops


async def assert_echoes_with(hub_env: HubEnv, policy: Policy, device_id: str) -> None:
    stream = await hub_env.service(policy).open_stream(device_id, "echo")
    await stream.send_all(b"pong")
    assert await stream.receive_some() == b"pong"
    await stream.aclose()


async def test_a_service_token_is_verified_once_for_many_initiates(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A service sends one SAS token with each initiate: the hub computes its signature once
    and remembers it (until it expires or the policy's keys change, see the tests above and
    ``test_credentials``)."""
    checked: list[object] = []
    real = credentials.verify_sas_token

    def counting(token: Any, **kwargs: Any) -> Any:
        checked.append(token)
        return real(token, **kwargs)

    with trio.fail_after(TIMEOUT):
        await serve_device(hub_env, await hub_env.create_device("d1"))
        ops = await put_service_policy(hub_env, seed=0x21)
        service = hub_env.service(ops)
        monkeypatch.setattr(credentials, "verify_sas_token", counting)
        monkeypatch.setattr(authorization, "verify_sas_token", counting)
        for _ in range(3):
            stream = await service.open_stream("d1", "echo")
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            await stream.aclose()
        assert len(checked) == 1
