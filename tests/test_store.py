"""Tests for devstream_trio.server.store: the SQLite registry, used from trio.

Rules: in-memory databases unless the test is about files (then ``tmp_path``); no wall-clock
sleeps; the event-loop test proves progress with a lock held by another connection, so the
store call cannot finish until the test lets it.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.registry import (
    ALL_PERMISSIONS,
    DEVICE_RANDOM_BYTES,
    OWNER_POLICY,
    Device,
    Permission,
    Policy,
    new_device,
    new_policy,
)
from devstream_trio.server.store import SCHEMA_VERSION, RegistryStore, StoreError


def make_device(device_id: str, seed: int = 0, **changes: object) -> Device:
    random_bytes = bytes((seed + i) % 256 for i in range(DEVICE_RANDOM_BYTES))
    device = new_device(device_id=device_id, random_bytes=random_bytes)
    return dataclasses.replace(device, **changes)  # type: ignore[arg-type]


def make_policy(name: str, permissions: Permission, seed: int = 7) -> Policy:
    random_bytes = bytes((seed * 3 + i) % 256 for i in range(64))
    return new_policy(name=name, random_bytes=random_bytes, permissions=permissions)


@pytest.fixture
async def store() -> AsyncIterator[RegistryStore]:
    async with await RegistryStore.open(None) as opened:
        yield opened


# -- devices -------------------------------------------------------------------------------


async def test_device_crud(store: RegistryStore) -> None:
    assert await store.get_device("d1") is None
    assert await store.list_devices() == []
    d1 = make_device("d1", seed=1)
    await store.create_device(d1)
    assert await store.get_device("d1") == d1
    assert await store.get_device("D1") is None  # ids are case-sensitive

    d1_disabled = dataclasses.replace(d1, status="disabled", status_reason="lost", etag="e2")
    await store.put_device(d1_disabled)
    assert await store.get_device("d1") == d1_disabled

    d0 = make_device("d0", seed=2)
    await store.put_device(d0)  # put creates too
    assert await store.list_devices() == [d0, d1_disabled]

    assert await store.delete_device("d1") is True
    assert await store.delete_device("d1") is False
    assert await store.get_device("d1") is None
    assert await store.list_devices() == [d0]


async def test_create_existing_device_fails_and_keeps_the_original(store: RegistryStore) -> None:
    original = make_device("d1", seed=1)
    await store.create_device(original)
    with pytest.raises(DevstreamError) as info:
        await store.create_device(make_device("d1", seed=2))
    assert info.value.code is ErrorCode.DEVICE_ALREADY_EXISTS
    assert await store.get_device("d1") == original


async def test_list_devices_is_ordered_by_id(store: RegistryStore) -> None:
    ids = ["b", "a", "C", "a-1", "$x", "z", "A"]
    for i, device_id in enumerate(ids):
        await store.create_device(make_device(device_id, seed=i))
    assert [d.device_id for d in await store.list_devices()] == sorted(ids)


# -- policies and settings -----------------------------------------------------------------


async def test_policy_crud(store: RegistryStore) -> None:
    assert await store.get_policy(OWNER_POLICY) is None
    owner = make_policy(OWNER_POLICY, ALL_PERMISSIONS)
    service = make_policy("service", Permission.SERVICE_CONNECT, seed=9)
    await store.put_policy(owner)
    await store.put_policy(service)
    assert await store.get_policy(OWNER_POLICY) == owner
    assert await store.list_policies() == [owner, service]

    narrowed = dataclasses.replace(owner, permissions=Permission.REGISTRY_READ)
    await store.put_policy(narrowed)
    assert await store.get_policy(OWNER_POLICY) == narrowed

    assert await store.delete_policy("service") is True
    assert await store.delete_policy("service") is False
    assert await store.list_policies() == [narrowed]


async def test_policy_without_permissions_round_trips(store: RegistryStore) -> None:
    empty = make_policy("nothing", Permission(0))
    await store.put_policy(empty)
    assert await store.get_policy("nothing") == empty


async def test_settings(store: RegistryStore) -> None:
    assert await store.get_setting("hub_secret") is None
    secret = bytes(range(256))
    await store.set_setting("hub_secret", secret)
    assert await store.get_setting("hub_secret") == secret
    await store.set_setting("hub_secret", b"")
    assert await store.get_setting("hub_secret") == b""


async def test_closed_store_refuses_calls() -> None:
    store = await RegistryStore.open(":memory:")
    await store.aclose()
    await store.aclose()  # twice is fine
    with pytest.raises(trio.ClosedResourceError):
        await store.get_device("d1")


# -- files ---------------------------------------------------------------------------------


async def test_everything_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    devices = [
        make_device("d1", seed=1),
        make_device("d2", seed=2, status="disabled", status_reason="stolen"),
        make_device("odd:id=$'(x)'", seed=3),
    ]
    policies = [
        make_policy(OWNER_POLICY, ALL_PERMISSIONS),
        make_policy("svc", Permission.SERVICE_CONNECT | Permission.REGISTRY_READ, seed=4),
    ]
    async with await RegistryStore.open(path) as store:
        for device in devices:
            await store.create_device(device)
        for policy in policies:
            await store.put_policy(policy)
        await store.set_setting("hub_secret", b"\x00secret\xff")

    async with await RegistryStore.open(str(path)) as store:
        assert await store.list_devices() == sorted(devices, key=lambda d: d.device_id)
        assert await store.list_policies() == policies
        assert await store.get_setting("hub_secret") == b"\x00secret\xff"
        await store.delete_device("d1")

    async with await RegistryStore.open(path) as store:
        assert await store.get_device("d1") is None
        assert await store.get_device("d2") == devices[1]


async def test_file_database_uses_wal_and_records_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    async with await RegistryStore.open(path):
        pass
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        conn.close()


async def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DevstreamError) as info:
        await RegistryStore.open(path)
    assert info.value.code is ErrorCode.SERVER_ERROR
    assert str(SCHEMA_VERSION + 1) in info.value.message


async def test_writes_are_visible_to_another_connection_at_once(tmp_path: Path) -> None:
    # Committed before the call returns: a second process (the CLI) sees it immediately.
    path = tmp_path / "registry.sqlite"
    async with await RegistryStore.open(path) as store:
        await store.create_device(make_device("d1"))
        conn = sqlite3.connect(path)
        try:
            assert conn.execute("SELECT device_id FROM devices").fetchall() == [("d1",)]
        finally:
            conn.close()


async def test_new_database_and_its_side_files_are_private(tmp_path: Path) -> None:
    """Under the usual umask 022 the database (every key, the hub secret) and SQLite's files
    beside it are the owner's alone: 0600."""
    path = tmp_path / "registry.sqlite"
    old_umask = os.umask(0o022)
    try:
        async with await RegistryStore.open(path) as store:
            await store.set_setting("hub_secret", b"secret")
            modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    finally:
        os.umask(old_umask)
    assert modes == {
        "registry.sqlite": 0o600,
        "registry.sqlite-wal": 0o600,
        "registry.sqlite-shm": 0o600,
    }


def write_damaged_registry(path: Path) -> None:
    """A registry whose header and schema are sound and whose device table (many pages) has
    a run of bytes in its middle overwritten: no query at open reads it, a full check does."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE devices (device_id TEXT PRIMARY KEY NOT NULL, primary_key TEXT NOT NULL)"
    )
    conn.executemany(
        "INSERT INTO devices VALUES (?, ?)", [(f"d{i:04}", "k" * 44) for i in range(1000)]
    )
    conn.commit()
    conn.close()
    size = path.stat().st_size
    assert size >= 16 * 4096
    with path.open("r+b") as file:
        file.seek(size // 2 + 100)
        file.write(b"\xa5" * 2000)
    conn = sqlite3.connect(path)
    try:  # the damage is out of a plain query's way
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (lambda path: path.write_bytes(bytes(range(256)) * 32), "file is not a database"),
        (write_damaged_registry, "database disk image is damaged"),
        (lambda path: path.mkdir(), "unable to open database file"),
    ],
    ids=["garbage", "damaged-pages", "a-folder"],
)
async def test_unusable_database_is_refused_when_opened(
    spoil: Callable[[Path], object], reason: str, tmp_path: Path
) -> None:
    path = tmp_path / "registry.sqlite"
    spoil(path)
    with pytest.raises(StoreError) as info:
        await RegistryStore.open(path)
    assert info.value.code is ErrorCode.DATA_FOLDER_UNUSABLE
    assert info.value.message.startswith(
        f"cannot use the registry database {str(path)!r}: {reason}"
    )


class FailingConnection(sqlite3.Connection):
    """A real SQLite connection whose statements raise ``failure`` while it is set."""

    failure: sqlite3.Error | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if self.failure is not None:
            raise self.failure
        return super().execute(sql, parameters)


def failing_store(path: Path) -> tuple[RegistryStore, FailingConnection]:
    """The real store over a :class:`FailingConnection` to the (existing) database *path*."""
    conn = sqlite3.connect(
        path, factory=FailingConnection, check_same_thread=False, isolation_level=None
    )
    assert isinstance(conn, FailingConnection)
    return RegistryStore(conn, inline=True), conn


async def test_sqlite_failure_in_a_call_is_a_store_error_and_the_store_goes_on(
    tmp_path: Path,
) -> None:
    path = tmp_path / "registry.sqlite"
    async with await RegistryStore.open(path) as store:
        await store.create_device(make_device("d1"))
    store, conn = failing_store(path)
    async with store:
        conn.failure = sqlite3.OperationalError("database or disk is full")
        with pytest.raises(StoreError) as info:
            await store.create_device(make_device("d2"))
        assert info.value.code is ErrorCode.SERVER_ERROR
        assert info.value.message == "registry database error: database or disk is full"
        with pytest.raises(StoreError):
            await store.list_devices()
        conn.failure = None
        assert [d.device_id for d in await store.list_devices()] == ["d1"]


# -- the event loop keeps running ----------------------------------------------------------


async def test_store_call_does_not_block_the_event_loop(tmp_path: Path) -> None:
    path = tmp_path / "registry.sqlite"
    async with await RegistryStore.open(path) as store:
        # Another connection holds the write lock, so the store's write must wait in SQLite
        # until this test commits. Were that wait on the event loop, nothing below could run.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        ticks = 0
        finished_at: int | None = None

        async def counter() -> None:
            nonlocal ticks
            while finished_at is None:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async def write() -> None:
            nonlocal finished_at
            await store.put_device(make_device("d1"))
            finished_at = ticks

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(counter)
                nursery.start_soon(write)
                while ticks < 1000:
                    await trio.lowlevel.checkpoint()
                assert finished_at is None  # still waiting for the lock, loop still running
                blocker.execute("COMMIT")
        blocker.close()
        assert finished_at is not None and finished_at >= 1000
        assert await store.get_device("d1") == make_device("d1")


async def test_concurrent_calls_are_serialised(store: RegistryStore) -> None:
    async with trio.open_nursery() as nursery:
        for i in range(50):
            nursery.start_soon(store.create_device, make_device(f"d{i:02}", seed=i))
    assert [d.device_id for d in await store.list_devices()] == [f"d{i:02}" for i in range(50)]
