"""The hub's data folder: where ``devstream hub`` keeps its registry, and who may use it.

The folder holds the registry database (every device's and policy's keys, and the secret that
signs stream tokens). Rules:

* It is created ``0700`` and the database ``0600`` (by :meth:`RegistryStore.open`; SQLite's
  side files take the database's mode). A folder or database already there that other users
  may read or write is left as it is, with one warning each when the hub has opened it,
  naming the fix (``chmod 700 …``); the warning shows paths and modes only, never a key.
* One hub at a time: a hub holds an advisory lock (``flock``) on :data:`LOCK_NAME` in the
  folder for its whole life, taken before it reads the database. A second hub on the same
  folder stops at once with ``DATA_FOLDER_IN_USE``. The lock goes with the process, however
  it ends. Readers (``devstream connection-string``) take no lock.
* A folder that cannot be used (it cannot be created or written, its database is not one or
  is damaged) stops the hub at start with ``DATA_FOLDER_UNUSABLE`` and a message naming the
  path and the reason.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shlex
import stat
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

from devstream_core.errors import DevstreamError, ErrorCode

from .store import RegistryStore

__all__ = ["DB_NAME", "LOCK_NAME", "lock_data_folder", "open_data_folder", "warn_if_exposed"]

log = logging.getLogger("devstream.hub")

#: The registry database in the data folder.
DB_NAME: Final = "registry.sqlite3"
#: The file a running hub holds its lock on.
LOCK_NAME: Final = "hub.lock"
#: Permission bits that let anyone but the owner in.
_OTHERS: Final = stat.S_IRWXG | stat.S_IRWXO


def _unusable(folder: Path, reason: str) -> DevstreamError:
    return DevstreamError(
        ErrorCode.DATA_FOLDER_UNUSABLE, f"cannot use the data folder {str(folder)!r}: {reason}"
    )


@contextlib.contextmanager
def lock_data_folder(folder: Path) -> Iterator[None]:
    """Hold the data folder's lock for the ``with`` block.

    Raises ``DATA_FOLDER_IN_USE`` if another process (or another open of the lock file in this
    one) holds it, and ``DATA_FOLDER_UNUSABLE`` if the lock file cannot be opened.
    """
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise _unusable(folder, f"cannot open its lock file: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DevstreamError(
                ErrorCode.DATA_FOLDER_IN_USE,
                f"the data folder {str(folder)!r} is in use by another hub",
            ) from None
        except OSError as exc:
            raise _unusable(folder, f"cannot lock it: {exc.strerror}") from exc
        yield
    finally:
        os.close(fd)  # releases the lock


def warn_if_exposed(folder: Path) -> None:
    """Log one warning for the folder, and one for the database, if users other than the
    owner may read or write it (group or other permission bits set)."""
    db = folder / DB_NAME
    quoted_db = shlex.quote(str(db))
    # The database's fix takes its side files along (SQLite gave them its mode).
    for path, fix in (
        (folder, f"chmod 700 {shlex.quote(str(folder))}"),
        (db, f"chmod 600 {quoted_db}*"),
    ):
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except OSError:
            continue
        if mode & _OTHERS:
            log.warning(
                "%s is open to other users (mode %04o) and holds the hub's keys; fix: %s",
                path,
                mode,
                fix,
            )


@contextlib.asynccontextmanager
async def open_data_folder(folder: Path) -> AsyncIterator[RegistryStore]:
    """Create *folder* (``0700``) if needed, lock it, open its registry and warn if the folder
    or the database is exposed; the lock and the registry are held for the ``async with``
    block."""
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except FileExistsError as exc:  # a file, or a link to one, where the folder should be
        raise _unusable(folder, "it is a file, not a folder: give --data a folder") from exc
    except OSError as exc:
        raise _unusable(folder, f"cannot create it: {exc.strerror}") from exc
    with lock_data_folder(folder):
        async with await RegistryStore.open(folder / DB_NAME) as store:
            warn_if_exposed(folder)
            yield store
