"""The hub's data folder: private modes, one hub at a time, and one clear line (not a traceback)
when the folder or its database cannot be used.

``devstream hub`` runs as a child process (port 0, loopback only); a hub that must refuse to
start is run until it exits, under ``trio.fail_after`` (on a hub that wrongly starts, the test
fails by timeout).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from devstream_core.credentials import ConnectionString
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_core.registry import DEVICE_RANDOM_BYTES, new_device
from devstream_trio.server.datafolder import DB_NAME, LOCK_NAME, lock_data_folder, open_data_folder
from devstream_trio.server.hub import ensure_owner_policy, load_or_create_secret
from devstream_trio.server.store import RegistryStore

from ._helpers import one_error_line, run_cli, start_child

TIMEOUT = 20


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    """Child processes started in the block inherit *mask* (what a user's shell usually has)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def hub_argv(data: Path) -> list[str]:
    return ["hub", "--data", str(data), "--listen", "127.0.0.1:0"]


async def hub_until_exit(data: Path) -> tuple[int, str]:
    """Run ``devstream hub`` on *data* until it exits: its exit status and its stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "devstream_trio.cli", *hub_argv(data)],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.stdout == b""
    return result.returncode, result.stderr.decode()


async def write_registry(path: Path, devices: int) -> None:
    """A registry database with an owner policy, the hub secret and *devices* devices."""
    async with await RegistryStore.open(path) as store:
        await ensure_owner_policy(store)
        await load_or_create_secret(store)
        for i in range(devices):
            await store.create_device(
                new_device(device_id=f"device-{i:04}", random_bytes=bytes(DEVICE_RANDOM_BYTES))
            )


# -- modes ------------------------------------------------------------------------------------


async def test_a_new_data_folder_is_private(tmp_path: Path) -> None:
    """The folder is 0700 and every file the hub makes in it 0600, under the usual umask 022."""
    data = tmp_path / "data"
    with trio.fail_after(TIMEOUT), umask(0o022):
        async with trio.open_nursery() as nursery:
            process, out = await start_child(nursery, hub_argv(data))
            await out.until("clients reach it at")
            cs = ConnectionString.parse(await out.until(lambda line: line.startswith("HostName=")))
            assert mode_of(data) == 0o700
            files = {path.name: mode_of(path) for path in data.iterdir()}
            # The WAL and its index exist while the hub runs: they hold the keys too.
            expected = [DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm", LOCK_NAME]
            assert sorted(files) == sorted(expected)
            assert files == dict.fromkeys(files, 0o600)
            process.kill()
    assert not any("open to other users" in line for line in out.lines)
    assert cs.shared_access_key


async def test_an_exposed_data_folder_is_named_with_its_fix(tmp_path: Path) -> None:
    """A folder (0755) and database (0644) left by an older devstream: the hub still starts,
    with one warning for each naming the path and the chmod that fixes it, and no key."""
    data = tmp_path / "data"
    data.mkdir()
    data.chmod(0o755)
    (data / DB_NAME).touch()
    (data / DB_NAME).chmod(0o644)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process, out = await start_child(nursery, hub_argv(data))
            await out.until("clients reach it at")
            cs = ConnectionString.parse(await out.until(lambda line: line.startswith("HostName=")))
            process.kill()
    warnings = [line for line in out.lines if "open to other users" in line]
    assert len(warnings) == 2, out.lines
    assert f"{data} is open to other users (mode 0755)" in warnings[0]
    assert warnings[0].endswith(f"chmod 700 {data}")
    assert f"{data / DB_NAME} is open to other users (mode 0644)" in warnings[1]
    assert warnings[1].endswith(f"chmod 600 {data / DB_NAME}*")
    assert cs.shared_access_key not in "\n".join(warnings)
    # Warned, not changed: the hub does not take a user's files over.
    assert mode_of(data) == 0o755


async def test_group_readable_database_alone_is_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    await write_registry(data / DB_NAME, devices=0)
    (data / DB_NAME).chmod(0o640)
    with trio.fail_after(TIMEOUT), caplog.at_level(logging.WARNING, logger="devstream.hub"):
        async with open_data_folder(data) as store:
            owner, created = await ensure_owner_policy(store)
            secret = await load_or_create_secret(store)
    assert not created
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1, messages
    assert f"{data / DB_NAME} is open to other users (mode 0640)" in messages[0]
    assert owner.primary_key not in messages[0] and secret.hex() not in messages[0]


# -- one hub per data folder ------------------------------------------------------------------


async def test_lock_is_held_until_released(tmp_path: Path) -> None:
    with lock_data_folder(tmp_path):
        with pytest.raises(DevstreamError) as info, lock_data_folder(tmp_path):
            pass
        assert info.value.code == ErrorCode.DATA_FOLDER_IN_USE
        assert str(tmp_path) in info.value.message
    with lock_data_folder(tmp_path):  # released: taken again
        assert mode_of(tmp_path / LOCK_NAME) == 0o600


async def test_second_hub_on_one_data_folder_stops_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            first, out = await start_child(nursery, hub_argv(data))
            url = (await out.until("clients reach it at")).rsplit(" ", 1)[1]

            status, err = await hub_until_exit(data)
            assert status == 1
            line = one_error_line(err)
            assert line == (
                f"devstream: error: the data folder {str(data)!r} is in use by another hub "
                "(error 409901)"
            )
            # The first hub's address is still the one stored.
            assert await run_cli(["connection-string", "--data", str(data)]) == 0
            stored = ConnectionString.parse(capsys.readouterr().out.strip())
            assert stored.host_name == url.removeprefix("http://")

            first.kill()
            await first.wait()
            # The lock went with the process, killed as it was.
            again, out = await start_child(nursery, hub_argv(data))
            await out.until("clients reach it at")
            again.kill()


# -- a data folder that cannot be used --------------------------------------------------------


async def garbage(data: Path) -> None:
    (data / DB_NAME).write_bytes(bytes(range(256)) * 32)


async def damaged_pages(data: Path) -> None:
    """A real registry with a sound header and schema page, and a run of bytes in the middle
    of its device table overwritten: damage no query at start reads, only a full check."""
    db = data / DB_NAME
    await write_registry(db, devices=300)
    size = db.stat().st_size
    assert size >= 16 * 4096  # the device table spans many pages
    with db.open("r+b") as file:
        file.seek(size // 2 + 100)
        file.write(b"\xa5" * 2000)


async def database_is_a_folder(data: Path) -> None:
    """Stands for a database the hub cannot open for writing (SQLite: "unable to open database
    file", what a file it cannot create or write gives too)."""
    (data / DB_NAME).mkdir()


@pytest.mark.parametrize(
    ("spoil", "reason"),
    [
        (garbage, "file is not a database"),
        (damaged_pages, "database disk image is damaged"),
        (database_is_a_folder, "unable to open database file"),
    ],
    ids=["garbage", "damaged-pages", "database-is-a-folder"],
)
async def test_unusable_database_stops_the_hub_with_one_line(
    spoil: Any, reason: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    await spoil(data)
    with trio.fail_after(TIMEOUT):
        status, err = await hub_until_exit(data)
    assert status == 1
    line = one_error_line(err)
    assert line.startswith(
        f"devstream: error: cannot use the registry database {str(data / DB_NAME)!r}: {reason}"
    )
    assert line.endswith("(error 500901)")


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make *folder* read-only to the hub: no file can be created in it; files already there
    stay writable. For a normal user, chmod 0500. As root (whom permission bits do not stop),
    the immutable attribute (``chattr +i``, which stops root too); skipped where that is not
    available."""
    if os.geteuid() != 0:
        folder.chmod(0o500)
        try:
            yield
        finally:
            folder.chmod(0o700)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root and chattr is not installed")
    if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("running as root and this file system has no immutable attribute")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("used_before", [False, True], ids=["new", "used-before"])
async def test_read_only_data_folder_stops_the_hub_with_one_line(
    used_before: bool, tmp_path: Path
) -> None:
    """A new folder fails on its lock file; a folder a hub used before (lock file and database
    there, the hub stopped cleanly) fails in SQLite, which must create its WAL index."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    if used_before:
        with lock_data_folder(data):
            await write_registry(data / DB_NAME, devices=1)
        assert sorted(path.name for path in data.iterdir()) == [LOCK_NAME, DB_NAME]
    with read_only(data), trio.fail_after(TIMEOUT):
        status, err = await hub_until_exit(data)
    assert status == 1
    line = one_error_line(err)
    assert str(data) in line
    assert line.endswith("(error 500901)")


# -- the open-files limit ---------------------------------------------------------------------


def _open_files_limits(pid: int) -> tuple[int, int]:
    """The soft and hard open-files limits of process *pid*, from ``/proc``."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-files line in /proc/PID/limits")


async def test_hub_raises_its_open_files_soft_limit_to_the_hard_one(tmp_path: Path) -> None:
    """A hub started with the soft limit many systems give (1024, or less) takes the hard limit:
    its connection cap follows the soft limit, and would otherwise stop near 768."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard <= 256:
        pytest.skip("needs a finite hard open-files limit above 256")

    def low_soft_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))

    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process: trio.Process = await nursery.start(
                functools.partial(
                    trio.run_process,
                    [sys.executable, "-m", "devstream_trio.cli", *hub_argv(tmp_path / "data")],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    check=False,
                    preexec_fn=low_soft_limit,
                )
            )
            assert process.stdout is not None
            seen = b""
            while b"clients reach it at" not in seen:
                chunk = await process.stdout.receive_some()
                assert chunk, seen
                seen += chunk
            assert _open_files_limits(process.pid) == (hard, hard)
            process.kill()
