"""The registry's persistence: devices, policies and hub settings in one SQLite database.

This module knows how the registry's records (:class:`~devstream_core.registry.Device`,
:class:`~devstream_core.registry.Policy`, and small binary settings such as the hub secret)
are kept in SQLite. It does not know what they mean; validation lives in the core.

Rules:

* Never block the event loop. Every SQLite call runs in a worker thread
  (``trio.to_thread.run_sync``) on the store's one connection (opened with
  ``check_same_thread=False``); a :class:`trio.Lock` lets one call at a time use it. A call is
  not abandoned when cancelled: the cancellation takes effect once the SQLite call returns, so
  the connection is never used by two threads at once.
* Every write is committed before its method returns (autocommit, ``synchronous=FULL``), so a
  hub restart, or a crash, keeps everything it was told it had written.
* File databases use WAL and a busy timeout, so another process (``devstream
  connection-string``) can read while the hub runs. ``None`` or ``":memory:"`` gives a private
  in-memory database (tests).
* The schema is versioned with ``PRAGMA user_version``; a database from a newer devstream is
  refused rather than misread.
* The database holds every key and the hub's token-signing secret: a new database file is
  created readable and writable by its owner only (``0600``); SQLite gives its side files
  (``-wal``, ``-shm``, ``-journal``) the database file's mode.
* A database that cannot be used is found when it is opened, not by the first request:
  :meth:`RegistryStore.open` opens it for writing and runs ``PRAGMA quick_check`` (it reads
  every page once: about 5 ms for 10,000 devices, 0.1 s for 100,000), and raises
  :class:`StoreError` (``DATA_FOLDER_UNUSABLE``) for a file that is not a database, a
  damaged one, or one it cannot create or write.
* A SQLite failure in any later call (damage found later, disk full, I/O error) raises
  :class:`StoreError` (``SERVER_ERROR``), whose message names SQLite's reason and never a
  stored value; the store stays usable for the calls that still work.
* Lookups by key (:meth:`RegistryStore.get_device`, :meth:`RegistryStore.get_policy`) are
  answered from a small in-process cache when they can be, so a hub's every initiate does not
  wait on a worker thread. Every write through the store drops the entries it could change
  before it runs, under the same lock, so a lookup after a write returns sees the write. The
  cache does not see writes made by another process: a running hub's registry is written only
  through that hub (its HTTP API, which ``devstream device ...`` uses). Only records that
  exist are cached, at most :data:`CACHE_SIZE` of each kind.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable
from types import TracebackType
from typing import Final, TypeVar

import trio

from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.registry import (
    Device,
    Permission,
    Policy,
    format_permissions,
    parse_permissions,
)

__all__ = ["SCHEMA_VERSION", "RegistryStore", "StoreError"]

_T = TypeVar("_T")

#: The schema this module writes; stored in ``PRAGMA user_version``.
SCHEMA_VERSION: Final = 1
#: How long a write waits for another process's lock before failing (milliseconds).
BUSY_TIMEOUT_MS: Final = 5000
#: The most devices, and the most policies, the lookup cache holds (oldest dropped first).
CACHE_SIZE: Final = 1024

_SCHEMA: Final = (
    """
    CREATE TABLE devices (
        device_id     TEXT PRIMARY KEY NOT NULL,
        primary_key   TEXT NOT NULL,
        secondary_key TEXT NOT NULL,
        status        TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
        status_reason TEXT,
        generation_id TEXT NOT NULL,
        etag          TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE policies (
        name          TEXT PRIMARY KEY NOT NULL,
        primary_key   TEXT NOT NULL,
        secondary_key TEXT NOT NULL,
        rights        TEXT NOT NULL
    )
    """,
    """
    CREATE TABLE settings (
        key   TEXT PRIMARY KEY NOT NULL,
        value BLOB NOT NULL
    )
    """,
)

_DEVICE_COLUMNS: Final = (
    "device_id, primary_key, secondary_key, status, status_reason, generation_id, etag"
)
_POLICY_COLUMNS: Final = "name, primary_key, secondary_key, rights"


class StoreError(DevstreamError):
    """The registry database failed: it cannot be opened or used (``DATA_FOLDER_UNUSABLE``,
    from :meth:`RegistryStore.open`), or a SQLite call failed (``SERVER_ERROR``)."""


def _create_private(path: str) -> None:
    """Create the database file with mode 0600 if it does not exist yet (SQLite would create
    it with the umask's mode, usually 0644)."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


def _quick_check(conn: sqlite3.Connection) -> None:
    """Raise ``sqlite3.DatabaseError`` if ``PRAGMA quick_check`` finds damage."""
    rows = conn.execute("PRAGMA quick_check").fetchall()
    if rows != [("ok",)]:
        first = str(rows[0][0]).splitlines() if rows else []
        detail = next((line for line in first if not line.startswith("***")), "no answer")
        raise sqlite3.DatabaseError(f"database disk image is damaged ({detail[:200]})")


def _connect(path: str) -> sqlite3.Connection:
    """Open (and if needed create) the database; runs in a worker thread."""
    if path != ":memory:":
        _create_private(path)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        if path != ":memory:":
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            _quick_check(conn)
        conn.execute("PRAGMA synchronous = FULL")
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _migrate(conn: sqlite3.Connection) -> None:
    """Create the tables on first open; refuse a schema newer than :data:`SCHEMA_VERSION`."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version == 0:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        elif version != SCHEMA_VERSION:
            raise DevstreamError(
                ErrorCode.SERVER_ERROR,
                f"registry database has schema version {version}; "
                f"this devstream understands version {SCHEMA_VERSION}",
            )
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _device_from_row(row: tuple[str, str, str, str, str | None, str, str]) -> Device:
    device_id, primary_key, secondary_key, status, status_reason, generation_id, etag = row
    return Device(
        device_id=device_id,
        primary_key=primary_key,
        secondary_key=secondary_key,
        status=status,
        status_reason=status_reason,
        generation_id=generation_id,
        etag=etag,
    )


def _device_row(device: Device) -> tuple[str, str, str, str, str | None, str, str]:
    return (
        device.device_id,
        device.primary_key,
        device.secondary_key,
        device.status,
        device.status_reason,
        device.generation_id,
        device.etag,
    )


def _policy_from_row(row: tuple[str, str, str, str]) -> Policy:
    name, primary_key, secondary_key, rights = row
    return Policy(
        name=name,
        primary_key=primary_key,
        secondary_key=secondary_key,
        permissions=parse_permissions(rights) if rights else Permission(0),
    )


_K = TypeVar("_K")
_V = TypeVar("_V")


def _cache_put(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """Keep *value* under *key*, dropping the oldest entry when the cache is full."""
    cache.pop(key, None)
    if len(cache) >= CACHE_SIZE:
        del cache[next(iter(cache))]
    cache[key] = value


class RegistryStore:
    """The registry in SQLite: async methods, each SQLite call off the event loop.

    Make one with :meth:`open`; close it with :meth:`aclose` or ``async with``.
    """

    def __init__(self, conn: sqlite3.Connection, *, inline: bool = False) -> None:
        """Wrap an open connection; use :meth:`open` instead.

        ``inline`` runs each call on the event loop instead of a worker thread: right for an
        in-memory database, which never waits for a disk (and it keeps a test's autojump
        clock from jumping while a worker thread runs).
        """
        self._conn: sqlite3.Connection | None = conn
        self._inline = inline
        self._lock = trio.Lock()
        # Records known to exist, by key; see the module's rules.
        self._devices: dict[str, Device] = {}
        self._policies: dict[str, Policy] = {}

    @classmethod
    async def open(cls, path: str | os.PathLike[str] | None) -> RegistryStore:
        """Open the registry at *path*, creating it if needed (``None``: in memory).

        Raises :class:`StoreError` (``DATA_FOLDER_UNUSABLE``) naming the file and the reason
        when the database cannot be created, opened or written, or is damaged.
        """
        if path is None:
            await trio.lowlevel.checkpoint()
            return cls(_connect(":memory:"), inline=True)
        try:
            conn = await trio.to_thread.run_sync(_connect, os.fspath(path))
        except (sqlite3.Error, OSError) as exc:
            reason = (exc.strerror if isinstance(exc, OSError) else None) or str(exc)
            raise StoreError(
                ErrorCode.DATA_FOLDER_UNUSABLE,
                f"cannot use the registry database {os.fspath(path)!r}: {reason}",
            ) from exc
        return cls(conn)

    async def aclose(self) -> None:
        """Close the database. Closing twice is allowed; any other call after it is not."""
        async with self._lock:
            conn, self._conn = self._conn, None
            self._devices.clear()
            self._policies.clear()
            if conn is not None and self._inline:
                conn.close()
            elif conn is not None:
                await trio.to_thread.run_sync(conn.close)

    async def __aenter__(self) -> RegistryStore:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def _run(
        self,
        fn: Callable[[sqlite3.Connection], _T],
        *,
        forget: Callable[[], object] | None = None,
        remember: Callable[[_T], None] | None = None,
    ) -> _T:
        """Run ``fn(connection)`` in a worker thread, one call at a time.

        Under the same lock, ``forget()`` runs first (a write drops what it may change from
        the cache) and ``remember(result)`` last (a lookup fills the cache). A SQLite error
        raises :class:`StoreError` (``SERVER_ERROR``).
        """
        async with self._lock:
            conn = self._conn
            if conn is None:
                raise trio.ClosedResourceError("the registry store is closed")
            if forget is not None:
                forget()
            try:
                if self._inline:
                    await trio.lowlevel.checkpoint()
                    result = fn(conn)
                else:
                    result = await trio.to_thread.run_sync(fn, conn)
            except sqlite3.Error as exc:
                raise StoreError(ErrorCode.SERVER_ERROR, f"registry database error: {exc}") from exc
            if remember is not None:
                remember(result)
            return result

    def _remember_device(self, device: Device | None) -> None:
        if device is not None:
            _cache_put(self._devices, device.device_id, device)

    def _remember_policy(self, policy: Policy | None) -> None:
        if policy is not None:
            _cache_put(self._policies, policy.name, policy)

    # -- devices -------------------------------------------------------------------------

    async def get_device(self, device_id: str) -> Device | None:
        """The device with *device_id*, or ``None``."""
        cached = self._devices.get(device_id)
        if cached is not None and self._conn is not None:
            return cached  # no thread, no wait: not even a checkpoint

        def query(conn: sqlite3.Connection) -> Device | None:
            row = conn.execute(
                f"SELECT {_DEVICE_COLUMNS} FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
            return None if row is None else _device_from_row(row)

        return await self._run(query, remember=self._remember_device)

    async def list_devices(self) -> list[Device]:
        """Every device, ordered by device id."""

        def query(conn: sqlite3.Connection) -> list[Device]:
            rows = conn.execute(f"SELECT {_DEVICE_COLUMNS} FROM devices ORDER BY device_id")
            return [_device_from_row(row) for row in rows]

        return await self._run(query)

    async def create_device(self, device: Device) -> None:
        """Add a new device; raise ``DEVICE_ALREADY_EXISTS`` if its id is taken."""

        def insert(conn: sqlite3.Connection) -> None:
            try:
                conn.execute(
                    f"INSERT INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    _device_row(device),
                )
            except sqlite3.IntegrityError:
                raise DevstreamError(ErrorCode.DEVICE_ALREADY_EXISTS) from None

        await self._run(insert, forget=lambda: self._devices.pop(device.device_id, None))

    async def put_device(self, device: Device) -> None:
        """Add *device*, or replace the stored device with the same id."""

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT OR REPLACE INTO devices ({_DEVICE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
                _device_row(device),
            )

        await self._run(upsert, forget=lambda: self._devices.pop(device.device_id, None))

    async def delete_device(self, device_id: str) -> bool:
        """Remove the device with *device_id*; ``False`` if there was none."""

        def delete(conn: sqlite3.Connection) -> bool:
            cursor = conn.execute("DELETE FROM devices WHERE device_id = ?", (device_id,))
            return cursor.rowcount > 0

        return await self._run(delete, forget=lambda: self._devices.pop(device_id, None))

    # -- policies ------------------------------------------------------------------------

    async def get_policy(self, name: str) -> Policy | None:
        """The policy called *name*, or ``None``."""
        cached = self._policies.get(name)
        if cached is not None and self._conn is not None:
            return cached  # no thread, no wait: not even a checkpoint

        def query(conn: sqlite3.Connection) -> Policy | None:
            row = conn.execute(
                f"SELECT {_POLICY_COLUMNS} FROM policies WHERE name = ?", (name,)
            ).fetchone()
            return None if row is None else _policy_from_row(row)

        return await self._run(query, remember=self._remember_policy)

    async def put_policy(self, policy: Policy) -> None:
        """Add *policy*, or replace the stored policy with the same name."""

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                f"INSERT OR REPLACE INTO policies ({_POLICY_COLUMNS}) VALUES (?, ?, ?, ?)",
                (
                    policy.name,
                    policy.primary_key,
                    policy.secondary_key,
                    format_permissions(policy.permissions),
                ),
            )

        await self._run(upsert, forget=lambda: self._policies.pop(policy.name, None))

    async def list_policies(self) -> list[Policy]:
        """Every policy, ordered by name."""

        def query(conn: sqlite3.Connection) -> list[Policy]:
            rows = conn.execute(f"SELECT {_POLICY_COLUMNS} FROM policies ORDER BY name")
            return [_policy_from_row(row) for row in rows]

        return await self._run(query)

    async def delete_policy(self, name: str) -> bool:
        """Remove the policy called *name*; ``False`` if there was none."""

        def delete(conn: sqlite3.Connection) -> bool:
            return conn.execute("DELETE FROM policies WHERE name = ?", (name,)).rowcount > 0

        return await self._run(delete, forget=lambda: self._policies.pop(name, None))

    # -- settings ------------------------------------------------------------------------

    async def get_setting(self, key: str) -> bytes | None:
        """The value stored under *key*, or ``None``."""

        def query(conn: sqlite3.Connection) -> bytes | None:
            row = conn.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(query)

    async def set_setting(self, key: str, value: bytes) -> None:
        """Store *value* under *key*, replacing any earlier value."""

        def upsert(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, bytes(value))
            )

        await self._run(upsert)
