"""The credentials an operator hands out, through the ``devstream`` command line, against
real hubs on loopback: ``policy …``, ``device connection-string|rotate-key``, ``device list``
(header, ``--json``) and ``sas-token``.

``main(argv)`` runs ``trio.run`` itself, so tests call it in a worker thread while the hub
runs in the test's own event loop; ``devstream echo device`` runs as a child process, and one
test runs the console script itself.

Test rules: loopback only, port 0; every test body runs under ``trio.fail_after`` and waits on
events and output lines, never on time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from devstream_core.credentials import ConnectionString, parse_sas_token
from devstream_core.exceptions import Unauthorized
from devstream_core.registry import OWNER_POLICY
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.stream import HubStream
from devstream_trio.server.hub import Hub
from devstream_trio.server.store import RegistryStore

from ._helpers import one_error_line, run_cli, start_child, start_hub

TIMEOUT = 30
CS_ENV = "DEVSTREAM_CONNECTION_STRING"


@dataclass
class CliHub:
    hub: Hub
    owner_cs: str
    capsys: pytest.CaptureFixture[str]

    async def ok(self, *argv: str, cs: str | None = None) -> str:
        """Run ``devstream ARGV --connection-string CS`` (the owner's by default); it must
        succeed and print nothing on stderr. Returns what it printed."""
        assert await run_cli([*argv, "--connection-string", cs or self.owner_cs]) == 0
        captured = self.capsys.readouterr()
        assert captured.err == ""
        return captured.out

    async def fails(self, *argv: str, cs: str | None = None) -> str:
        """Run it; it must fail with exit status 1 and one error line, which is returned."""
        assert await run_cli([*argv, "--connection-string", cs or self.owner_cs]) == 1
        captured = self.capsys.readouterr()
        assert captured.out == ""
        return one_error_line(captured.err)


@pytest.fixture
async def cli(capsys: pytest.CaptureFixture[str]) -> AsyncIterator[CliHub]:
    """A hub on 127.0.0.1, port 0, with an in-memory registry."""
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        hub, cs = await start_hub(nursery, store)
        yield CliHub(hub=hub, owner_cs=str(cs), capsys=capsys)
        nursery.cancel_scope.cancel()


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def echo_service(cli: CliHub, cs: str, device_id: str = "d1") -> int:
    """``devstream echo service --device DEVICE_ID --message hi`` with *cs*: 0 when the stream
    carried the message both ways, else the error code of the one error line it printed."""
    argv = ["echo", "service", "--device", device_id, "--message", "hi", "--connection-string", cs]
    status = await run_cli(argv)
    captured = cli.capsys.readouterr()
    if status == 0:
        assert captured.out.splitlines()[0] == "received: hi"
        return 0
    assert status == 1
    line = one_error_line(captured.err)
    return int(line.rsplit("(error ", 1)[1].rstrip(")"))


async def serving(nursery: trio.Nursery, cs: str) -> trio.Event:
    """Serve ``echo`` as device *cs* in *nursery*; the event is set if ``serve`` ends with
    ``Unauthorized``."""
    refused = trio.Event()
    device = DeviceClient(ConnectionString.parse(cs))

    async def serve(task_status: trio.TaskStatus[None]) -> None:
        try:
            await device.serve({"echo": echo}, task_status=task_status)
        except Unauthorized:
            refused.set()

    await nursery.start(serve)
    return refused


def table(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()]


# -- devstream device list ----------------------------------------------------------------------


async def test_device_list_has_a_header_and_json(cli: CliHub) -> None:
    with trio.fail_after(TIMEOUT):
        assert table(await cli.ok("device", "list")) == [["DEVICE", "ID", "STATUS", "CONNECTION"]]
        await cli.ok("device", "create", "a-long-device-name")
        await cli.ok("device", "create", "d1")
        out = await cli.ok("device", "list")
        lines = out.splitlines()
        assert lines[0].index("STATUS") == len("a-long-device-name") + 2
        assert table(out)[1:] == [
            ["a-long-device-name", "enabled", "Disconnected"],
            ["d1", "enabled", "Disconnected"],
        ]
        # Columns line up: each status starts where the header's does.
        assert {line.index("enabled") for line in lines[1:]} == {lines[0].index("STATUS")}
        listed = json.loads(await cli.ok("device", "list", "--json"))
        assert [d["deviceId"] for d in listed] == ["a-long-device-name", "d1"]
        assert listed[1]["connectionState"] == "Disconnected"
        shown = json.loads(await cli.ok("device", "show", "d1", "--json"))
        assert shown == listed[1]


# -- devstream device connection-string / rotate-key --------------------------------------------


async def test_device_connection_string_and_rotate_key(cli: CliHub) -> None:
    with trio.fail_after(TIMEOUT):
        created = (await cli.ok("device", "create", "d1")).strip()
        assert (await cli.ok("device", "connection-string", "d1")).strip() == created
        secondary = (await cli.ok("device", "connection-string", "d1", "--secondary")).strip()
        assert ConnectionString.parse(secondary).device_id == "d1"
        assert secondary != created
        line = await cli.fails("device", "connection-string", "nope")
        assert "404001" in line
        line = await cli.fails("device", "rotate-key", "nope")
        assert "404001" in line
        assert "needs a device id" in await cli.fails("device", "rotate-key")

        async with trio.open_nursery() as nursery:
            refused = await serving(nursery, created)
            assert await echo_service(cli, cli.owner_cs) == 0
            rotated = (await cli.ok("device", "rotate-key", "d1")).strip()
            assert ConnectionString.parse(rotated).device_id == "d1"
            assert rotated not in (created, secondary)
            # The agent on the old key is disconnected and refused from then on.
            await refused.wait()
            assert (await cli.ok("device", "connection-string", "d1")).strip() == rotated
            # The secondary key was kept; rotating it gives a third key.
            await serving(nursery, secondary)
            assert await echo_service(cli, cli.owner_cs) == 0
            rotated_secondary = await cli.ok("device", "rotate-key", "d1", "--secondary")
            assert rotated_secondary.strip() not in (secondary, rotated)
            nursery.cancel_scope.cancel()


# -- devstream policy ---------------------------------------------------------------------------


async def test_policy_commands(cli: CliHub) -> None:
    with trio.fail_after(TIMEOUT):
        await cli.ok("device", "create", "d1")
        created = (
            await cli.ok("policy", "create", "streams", "--rights", "ServiceConnect")
        ).strip()
        streams = ConnectionString.parse(created)
        assert streams.shared_access_key_name == "streams"
        assert streams.host_name == cli.hub.host_name and not streams.use_tls

        out = await cli.ok("policy", "list")
        assert table(out) == [
            ["NAME", "RIGHTS"],
            [OWNER_POLICY, "RegistryRead,", "RegistryWrite,", "ServiceConnect,", "DeviceConnect"],
            ["streams", "ServiceConnect"],
        ]
        listed = json.loads(await cli.ok("policy", "list", "--json"))
        assert [(p["keyName"], p["rights"]) for p in listed][1] == ("streams", "ServiceConnect")
        assert listed[1]["primaryKey"] == streams.shared_access_key

        # Least privilege: it opens streams, and cannot read the registry.
        async with trio.open_nursery() as nursery:
            await serving(nursery, (await cli.ok("device", "connection-string", "d1")).strip())
            assert await echo_service(cli, created) == 0
            line = await cli.fails("device", "list", cs=created)
            assert line.endswith("(error 403901)") and "RegistryRead" in line
            assert "403901" in await cli.fails("policy", "list", cs=created)

            # Rotating its key: the old connection string (and its tokens) stop at once.
            rotated = (await cli.ok("policy", "rotate-key", "streams")).strip()
            assert rotated != created
            assert await echo_service(cli, created) == 401002
            assert await echo_service(cli, rotated) == 0
            other = (await cli.ok("policy", "rotate-key", "streams", "--secondary")).strip()
            assert await echo_service(cli, other) == 0
            assert await echo_service(cli, rotated) == 0  # the primary was kept
            nursery.cancel_scope.cancel()

        line = await cli.fails("policy", "delete", OWNER_POLICY)
        assert line.endswith("(error 403905)") and "cannot be deleted" in line
        line = await cli.fails("policy", "create", "streams", "--rights", "ServiceConnect")
        assert line.endswith("(error 409905)")
        line = await cli.fails("policy", "create", "x", "--rights", "ServiceConnect,Everything")
        assert line.endswith("(error 400004)") and "RegistryRead" in line
        assert "404903" in await cli.fails("policy", "rotate-key", "nope")
        assert (await cli.ok("policy", "delete", "streams")).strip() == "deleted policy 'streams'"
        assert [row[0] for row in table(await cli.ok("policy", "list"))] == ["NAME", OWNER_POLICY]
        assert "404903" in await cli.fails("policy", "delete", "streams")


@pytest.mark.parametrize(
    "argv",
    [
        ["policy", "create", "x"],  # --rights is required
        ["policy"],
        ["policy", "rotate-key"],
        ["sas-token", "--ttl", "1x"],
        ["sas-token", "--ttl", "0"],
        ["sas-token", "--ttl", "-1h"],
        ["sas-token", "--key-type", "tertiary"],
    ],
)
async def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        await run_cli(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: devstream" in err and "Traceback" not in err


# -- devstream sas-token ------------------------------------------------------------------------


def token_cs(cs: str, token: str) -> str:
    """*cs* with *token* in place of its key (Azure's form)."""
    parsed = ConnectionString.parse(cs)
    return str(
        ConnectionString(
            host_name=parsed.host_name,
            device_id=parsed.device_id,
            shared_access_key_name=parsed.shared_access_key_name,
            shared_access_signature=token,
            use_tls=parsed.use_tls,
        )
    )


async def test_sas_token_for_a_policy_works_in_place_of_the_key_until_the_key_rotates(
    cli: CliHub,
) -> None:
    with trio.fail_after(TIMEOUT):
        await cli.ok("device", "create", "d1")
        ops = (await cli.ok("policy", "create", "ops", "--rights", "RegistryRead")).strip()
        before = int(time.time())
        token = (await cli.ok("sas-token", "--ttl", "2h", cs=ops)).strip()
        parsed = parse_sas_token(token)
        assert parsed.skn == "ops" and parsed.resource == cli.hub.host_name
        assert before + 7200 <= parsed.se <= int(time.time()) + 7200
        handed_out = token_cs(ops, token)
        assert "SharedAccessKey=" not in handed_out
        assert table(await cli.ok("device", "list", cs=handed_out))[1][0] == "d1"
        as_cs = (
            await cli.ok("sas-token", "--ttl", "15m", "--as-connection-string", cs=ops)
        ).strip()
        assert ConnectionString.parse(as_cs).signature_expiry is not None
        assert table(await cli.ok("device", "list", cs=as_cs))[1][0] == "d1"
        # A connection string with a token has no key to sign another with.
        line = await cli.fails("sas-token", cs=handed_out)
        assert "cannot sign another" in line

        await cli.ok("policy", "rotate-key", "ops")
        line = await cli.fails("device", "list", cs=handed_out)
        assert line.endswith("(error 401002)")


async def test_sas_token_for_a_device_opens_streams_from_a_child_agent(cli: CliHub) -> None:
    with trio.fail_after(TIMEOUT):
        device_cs = (await cli.ok("device", "create", "d1")).strip()
        # From the device's own connection string: a device token, no policy named.
        token = (await cli.ok("sas-token", "--ttl", "90s", cs=device_cs)).strip()
        parsed = parse_sas_token(token)
        assert parsed.skn is None and parsed.resource == f"{cli.hub.host_name}/devices/d1"
        assert "differs" in await cli.fails("sas-token", "--device", "d2", cs=device_cs)
        assert "--key-type" in await cli.fails("sas-token", "--key-type", "secondary", cs=device_cs)
        assert "--key-type" in await cli.fails("sas-token", "--key-type", "secondary")
        # From the owner's, with --device: signed with the device's key read from the registry.
        handed_out = (
            await cli.ok("sas-token", "--device", "d1", "--ttl", "1d", "--as-connection-string")
        ).strip()
        parsed_cs = ConnectionString.parse(handed_out)
        assert parsed_cs.device_id == "d1" and parsed_cs.shared_access_key is None
        assert parse_sas_token(parsed_cs.shared_access_signature or "").skn is None
        assert "404001" in await cli.fails("sas-token", "--device", "nope")

        async with trio.open_nursery() as nursery:
            # The token travels in the environment, not on the child's command line.
            env = dict(os.environ, **{CS_ENV: handed_out})
            process, out = await start_child(nursery, ["echo", "device"], env=env)
            assert "d1" in await out.until("online")
            assert await echo_service(cli, cli.owner_cs) == 0
            process.kill()


async def test_the_console_script_mints_a_token_that_opens_a_stream(cli: CliHub) -> None:
    script = Path(sys.executable).parent / "devstream"
    assert script.is_file()

    async def run(argv: Sequence[str]) -> str:
        # PYTHONPATH (this checkout's sources) and the connection string go in the environment.
        env = dict(os.environ, **{CS_ENV: cli.owner_cs})
        result = await trio.run_process(
            [str(script), *argv], capture_stdout=True, capture_stderr=True, check=False, env=env
        )
        assert result.returncode == 0, result.stderr
        assert result.stderr == b""
        return result.stdout.decode()

    with trio.fail_after(TIMEOUT):
        device_cs = (await run(["device", "create", "d1"])).strip()
        streams = (await run(["policy", "create", "streams", "--rights", "ServiceConnect"])).strip()
        assert ConnectionString.parse(streams).shared_access_key_name == "streams"
        header = (await run(["device", "list"])).splitlines()[0]
        assert header.split() == ["DEVICE", "ID", "STATUS", "CONNECTION"]
        token = (await run(["sas-token", "--ttl", "10m", "--connection-string", streams])).strip()
        async with trio.open_nursery() as nursery:
            await serving(nursery, device_cs)
            assert await echo_service(cli, token_cs(streams, token)) == 0
            nursery.cancel_scope.cancel()
        # The rest of the credential commands, as the script runs them.
        assert (await run(["device", "connection-string", "d1"])).strip() == device_cs
        rotated = (await run(["device", "rotate-key", "d1"])).strip()
        assert ConnectionString.parse(rotated).device_id == "d1" and rotated != device_cs
        assert (await run(["device", "connection-string", "d1"])).strip() == rotated
        new_streams = (await run(["policy", "rotate-key", "streams"])).strip()
        assert ConnectionString.parse(new_streams).shared_access_key_name == "streams"
        assert new_streams != streams
        listed = json.loads(await run(["policy", "list", "--json"]))
        assert "streams" in {policy["keyName"] for policy in listed}
        await run(["policy", "delete", "streams"])
        names = [row[0] for row in table(await run(["policy", "list"]))[1:]]
        assert "streams" not in names and "iothubowner" in names
