"""The ``devstream`` command line, against real hubs on loopback.

``main(argv)`` runs ``trio.run`` itself, so tests call it in a worker thread
(``trio.to_thread.run_sync``) while a hub runs in the test's own event loop. Commands that
never return (``devstream hub``, ``devstream echo device``) run as child processes whose output
the test reads line by line, and which it kills at the end.

Test rules: loopback only, port 0; every test body runs under ``trio.fail_after`` and waits on
events and output lines, never on time.
"""

from __future__ import annotations

import base64
import os
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devstream_core.credentials import ConnectionString
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import DeviceDisabled
from devstream_trio.server.hub import Hub
from devstream_trio.server.store import RegistryStore

from ._helpers import one_error_line, refused_port, run_cli, start_child, start_hub

TIMEOUT = 20
CS_ENV = "DEVSTREAM_CONNECTION_STRING"


@dataclass
class CliHub:
    hub: Hub
    owner_cs: str


@pytest.fixture
async def cli_hub() -> AsyncIterator[CliHub]:
    """A hub on 127.0.0.1, port 0, with an in-memory registry."""
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        hub, cs = await start_hub(nursery, store)
        yield CliHub(hub=hub, owner_cs=str(cs))
        nursery.cancel_scope.cancel()


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


# -- devstream hub / connection-string --------------------------------------------------------


async def test_hub_prints_url_and_owner_connection_string(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process, out = await start_child(
                nursery, ["hub", "--data", str(data), "--listen", "127.0.0.1:0"]
            )
            url_line = await out.until("clients reach it at")
            url = url_line.rsplit(" ", 1)[1]
            assert url.startswith("http://127.0.0.1:")
            assert not url.endswith(":0")
            cs_text = await out.until(lambda line: line.startswith("HostName="))
            cs = ConnectionString.parse(cs_text)
            assert cs.host_name == url.removeprefix("http://")
            assert cs.shared_access_key_name is not None
            assert not cs.use_tls

            # The printed connection string works against the running hub.
            argv = ["device", "create", "via-child", "--connection-string", cs_text]
            assert await run_cli(argv) == 0
            created = ConnectionString.parse(capsys.readouterr().out.strip())
            assert created.device_id == "via-child"
            process.kill()

    assert await run_cli(["connection-string", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == cs_text
    assert captured.err == ""


async def test_hub_max_sas_lifetime_and_client_sas_lifetime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["hub", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process, out = await start_child(nursery, [*argv, "--max-sas-lifetime", "600"])
            owner = await out.until(lambda line: line.startswith("HostName="))
            create = ["device", "create", "dev-1", "--connection-string", owner]
            # The clients' default (an hour) is over the hub's limit: one line, 401002.
            assert await run_cli(create) == 1
            captured = capsys.readouterr()
            line = one_error_line(captured.err)
            assert "600 s" in line and line.endswith("(error 401002)"), line
            # Tokens signed for ten minutes pass.
            assert await run_cli([*create, "--sas-lifetime", "600"]) == 0
            assert ConnectionString.parse(capsys.readouterr().out.strip()).device_id == "dev-1"
            process.kill()


async def test_connection_string_before_any_hub(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        assert await run_cli(["connection-string", "--data", str(tmp_path / "empty")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "devstream hub" in one_error_line(captured.err)


# -- devstream device ... ---------------------------------------------------------------------


@pytest.mark.parametrize("via", ["flag", "env"])
async def test_device_commands(
    via: str,
    cli_hub: CliHub,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if via == "env":
        monkeypatch.setenv(CS_ENV, cli_hub.owner_cs)
        extra: list[str] = []
    else:
        extra = ["--connection-string", cli_hub.owner_cs]

    async def cli(*argv: str) -> str:
        assert await run_cli(["device", *argv, *extra]) == 0
        captured = capsys.readouterr()
        assert captured.err == ""
        return captured.out

    with trio.fail_after(TIMEOUT):
        device_cs = ConnectionString.parse((await cli("create", "dev-1")).strip())
        assert device_cs.device_id == "dev-1"
        assert device_cs.host_name == cli_hub.hub.host_name
        await cli("create", "dev-2")

        header, *listed = [line.split() for line in (await cli("list")).splitlines()]
        assert header == ["DEVICE", "ID", "STATUS", "CONNECTION"]
        assert [row[:2] for row in listed] == [["dev-1", "enabled"], ["dev-2", "enabled"]]

        shown = await cli("show", "dev-1")
        assert "deviceId:        dev-1" in shown
        assert "status:          enabled" in shown
        assert device_cs.shared_access_key in shown

        assert "disabled" in await cli("disable", "dev-1")
        assert "status:          disabled" in await cli("show", "dev-1")
        with pytest.raises(DeviceDisabled):
            await DeviceClient(device_cs).serve({"echo": echo})

        assert "enabled" in await cli("enable", "dev-1")
        async with trio.open_nursery() as nursery:
            device = DeviceClient(device_cs)

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                await device.serve({"echo": echo}, task_status=task_status)

            await nursery.start(serve)
            assert device.online
            assert "connectionState: Connected" in await cli("show", "dev-1")
            nursery.cancel_scope.cancel()

        assert "dev-1" in await cli("delete", "dev-1")
        assert [line.split()[0] for line in (await cli("list")).splitlines()[1:]] == ["dev-2"]
        assert await run_cli(["device", "show", "dev-1", *extra]) == 1
        assert "404001" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("action", ["disable", "enable"])
async def test_enable_or_disable_of_an_unknown_device_fails_and_creates_nothing(
    action: str, cli_hub: CliHub, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--connection-string", cli_hub.owner_cs]
    with trio.fail_after(TIMEOUT):
        assert await run_cli(["device", "create", "dev-1", *extra]) == 0
        capsys.readouterr()
        assert await run_cli(["device", action, "dev-l", *extra]) == 1
        captured = capsys.readouterr()
        assert captured.out == ""
        line = one_error_line(captured.err)
        assert line.endswith("(error 404001)"), line
        assert "dev-l" in line
        assert await run_cli(["device", "list", *extra]) == 0
        listed = [row.split()[0] for row in capsys.readouterr().out.splitlines()[1:]]
        assert listed == ["dev-1"]


# -- devstream echo / demo --------------------------------------------------------------------


async def test_echo_device_and_service(cli_hub: CliHub, capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIMEOUT):
        argv = ["device", "create", "echoer", "--connection-string", cli_hub.owner_cs]
        assert await run_cli(argv) == 0
        device_cs = capsys.readouterr().out.strip()
        async with trio.open_nursery() as nursery:
            # The key travels in the environment, not on the child's command line.
            env = dict(os.environ, **{CS_ENV: device_cs})
            process, out = await start_child(nursery, ["echo", "device"], env=env)
            online = await out.until("online")
            assert "echoer" in online

            argv = ["echo", "service", "--device", "echoer", "--message", "hi"]
            assert await run_cli([*argv, "--connection-string", cli_hub.owner_cs]) == 0
            captured = capsys.readouterr()
            lines = captured.out.splitlines()
            assert lines[0] == "received: hi"
            assert lines[1].startswith("round trip: ")
            assert captured.err == ""
            process.kill()


async def test_demo(capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIMEOUT):
        assert await run_cli(["demo"]) == 0
    out = capsys.readouterr().out
    for step in ("1. ", "2. ", "3. ", "4. ", "5. "):
        assert any(line.startswith(step) for line in out.splitlines()), out
    assert "round trip" in out
    assert "demo finished" in out


# -- user mistakes ----------------------------------------------------------------------------

OTHER_KEY = base64.b64encode(b"definitely not the owner key....").decode()

#: (name, argv built from the hub's owner connection string and tmp_path, expected text)
MISTAKES: list[tuple[str, Callable[[str, Path], list[str]], str]] = [
    ("no connection string", lambda cs, tmp: ["device", "list"], "no connection string"),
    (
        "malformed connection string",
        lambda cs, tmp: [
            "device",
            "list",
            "--connection-string",
            "HostName=127.0.0.1:1;SharedAccessKeyName=owner",
        ],
        "SharedAccessKey",
    ),
    (
        "bad key field",
        lambda cs, tmp: [
            "device",
            "list",
            "--connection-string",
            "HostName=127.0.0.1:1;SharedAccessKeyName=owner;SharedAccessKey=???",
        ],
        "SharedAccessKey is not valid base64",
    ),
    (
        "wrong key",
        lambda cs, tmp: [
            "device",
            "list",
            "--connection-string",
            cs.rsplit("SharedAccessKey=", 1)[0] + f"SharedAccessKey={OTHER_KEY};UseTls=false",
        ],
        "401002",
    ),
    (
        "hub not running",
        lambda cs, tmp: [
            "device",
            "list",
            "--connection-string",
            f"HostName=127.0.0.1:{refused_port()};SharedAccessKeyName=owner;"
            f"SharedAccessKey={OTHER_KEY};UseTls=false",
        ],
        "cannot reach",
    ),
    (
        "unknown device",
        lambda cs, tmp: ["device", "show", "nobody", "--connection-string", cs],
        "404001",
    ),
    (
        "device connection string for a service command",
        lambda cs, tmp: [
            "device",
            "list",
            "--connection-string",
            f"HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey={OTHER_KEY}",
        ],
        "service connection string",
    ),
    (
        "missing CA file",
        lambda cs, tmp: [
            "device",
            "list",
            "--connection-string",
            cs,
            "--ca-file",
            str(tmp / "missing-ca.pem"),
        ],
        "does not exist",
    ),
    (
        "tls cert without key",
        lambda cs, tmp: [
            "hub",
            "--data",
            str(tmp / "data"),
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(tmp / "cert.pem"),
        ],
        "--tls-cert and --tls-key go together",
    ),
    (
        "unreadable cert file",
        lambda cs, tmp: [
            "hub",
            "--data",
            str(tmp / "data"),
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            str(tmp / "missing-cert.pem"),
            "--tls-key",
            str(tmp / "missing-key.pem"),
        ],
        "cannot load the TLS certificate",
    ),
    (
        "bad listen address",
        lambda cs, tmp: ["hub", "--data", str(tmp / "data"), "--listen", "nowhere"],
        "--listen must be HOST:PORT",
    ),
]


@pytest.mark.parametrize(
    ("argv_for", "expected"),
    [pytest.param(argv, expected, id=name) for name, argv, expected in MISTAKES],
)
async def test_user_mistake_prints_one_line_and_exits_1(
    argv_for: Callable[[str, Path], list[str]],
    expected: str,
    cli_hub: CliHub,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = argv_for(cli_hub.owner_cs, tmp_path)
    with trio.fail_after(TIMEOUT):
        assert await run_cli(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    line = one_error_line(captured.err)
    assert expected in line
    # A mistake never echoes a key back.
    assert OTHER_KEY not in line
    assert ConnectionString.parse(cli_hub.owner_cs).shared_access_key not in line


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["device"],
        ["device", "explode", "x"],
        ["echo", "sideways"],
        ["hub", "--max-sas-lifetime", "soon"],
        ["device", "list", "--sas-lifetime", "1"],
    ],
    ids=[
        "nothing",
        "unknown-command",
        "no-action",
        "bad-action",
        "bad-role",
        "bad-max-sas-lifetime",
        "too-short-sas-lifetime",
    ],
)
async def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with trio.fail_after(TIMEOUT), pytest.raises(SystemExit) as info:
        await run_cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: devstream" in err
    assert "Traceback" not in err


# -- the console script -----------------------------------------------------------------------


async def test_console_script_help() -> None:
    script = Path(sys.executable).parent / "devstream"
    assert script.is_file()
    with trio.fail_after(TIMEOUT):
        result = await trio.run_process([str(script), "--help"], capture_stdout=True, check=False)
    assert result.returncode == 0
    out = result.stdout.decode()
    assert "usage: devstream" in out
    for command in ("hub", "device", "echo", "demo", "connection-string"):
        assert command in out
