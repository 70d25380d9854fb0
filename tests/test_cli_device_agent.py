"""``devstream echo device`` and ``devstream proxy device`` as long-running agents, through
the console script: two agents with one device id, and a device the hub refuses.

The agents run as child processes against a hub on 127.0.0.1 (port 0) in the test's own event
loop; the test reads their merged output line by line. The waits an agent chooses are made
short with its hidden ``--reconnect-max`` and ``--auth-retry-first`` options, so that nothing
here waits on time but for output lines, under ``trio.fail_after``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import trio

from devstream_trio.server.hub import Hub
from devstream_trio.server.store import RegistryStore

from ._helpers import Output, refused_port, run_cli, start_child, start_hub

TIMEOUT = 30
CS_ENV = "DEVSTREAM_CONNECTION_STRING"
REPLACED = "replaced by a newer connection (another client uses this device id)"


@dataclass
class CliHub:
    hub: Hub
    owner_cs: str

    async def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> str:
        """``devstream ARGV --connection-string <owner>``: its output (it must succeed)."""
        assert await run_cli([*argv, "--connection-string", self.owner_cs]) == 0
        return capsys.readouterr().out


@pytest.fixture
async def cli_hub() -> AsyncIterator[CliHub]:
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        hub, cs = await start_hub(nursery, store)
        yield CliHub(hub=hub, owner_cs=str(cs))
        nursery.cancel_scope.cancel()


def agent_env(device_cs: str) -> dict[str, str]:
    """The agent's environment: the key travels there, not on its command line."""
    return dict(os.environ, **{CS_ENV: device_cs})


async def rest_of(process: trio.Process, out: Output) -> int:
    """Read *out* to its end; the exit status."""
    await out.drain()
    return await process.wait()


async def test_of_two_echo_devices_with_one_id_the_older_gives_way_and_stops(
    cli_hub: CliHub, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        device_cs = (await cli_hub.cli(capsys, "device", "create", "twin")).strip()
        async with trio.open_nursery() as nursery:
            argv = ["echo", "device", "--reconnect-max", "1"]
            older, older_out = await start_child(nursery, argv, env=agent_env(device_cs))
            await older_out.until("online")
            newer, newer_out = await start_child(nursery, argv, env=agent_env(device_cs))
            await newer_out.until("online")
            # The older one is replaced: one line, and it waits (0.5 to 1 s) before it takes
            # the device back once; the newer one, replaced in turn, says so once, and takes
            # it back: the older one, replaced again, stops.
            assert await rest_of(older, older_out) == 1
            lines = older_out.lines
            assert "Traceback" not in "\n".join(lines)
            assert len([line for line in lines if REPLACED in line]) == 1, lines
            assert lines[-1].startswith("devstream: error: replaced by a newer connection again")
            assert "another client uses this device id" in lines[-1]
            assert "--keep-trying-when-replaced" in lines[-1]
            assert lines[-1].endswith("(error 409902)")
            assert [line for line in lines if "404103" in line] == []
            assert len(lines) == 3, lines  # online, replaced, the error

            # The newer one serves: it was replaced once, and is online again.
            assert REPLACED in await newer_out.until(REPLACED)
            argv = ["echo", "service", "--device", "twin", "--message", "still here"]
            out = await cli_hub.cli(capsys, *argv)
            assert out.splitlines()[0] == "received: still here"
            newer.kill()
            await rest_of(newer, newer_out)
            assert len([line for line in newer_out.lines if REPLACED in line]) == 1
            assert [line for line in newer_out.lines if "Traceback" in line] == []


async def test_proxy_device_of_a_disabled_device_retries_until_it_is_enabled(
    cli_hub: CliHub, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        device_cs = (await cli_hub.cli(capsys, "device", "create", "far-away")).strip()
        await cli_hub.cli(capsys, "device", "disable", "far-away")
        async with trio.open_nursery() as nursery:
            argv = [
                "proxy",
                "device",
                "--map",
                f"ssh=127.0.0.1:{refused_port()}",
                "--auth-retry-first",
                "0.2",
            ]
            process, out = await start_child(nursery, argv, env=agent_env(device_cs))
            for attempt in range(1, 4):
                line = await out.readline()
                assert "the hub refuses it: device 'far-away' is disabled (error 403902)" in line, (
                    line
                )
                assert f"(attempt {attempt})" in line, line
            await cli_hub.cli(capsys, "device", "enable", "far-away")
            online = await out.until("online")
            assert "'far-away' online; forwarding ssh -> 127.0.0.1:" in online
            # One line per refused attempt, and nothing else before the device came online.
            before = out.lines[:-1]
            assert len(before) >= 3
            assert all("403902" in line and "connecting again in" in line for line in before)
            assert process.returncode is None
            process.kill()


@pytest.mark.parametrize("command", ["echo", "proxy"])
async def test_exit_on_auth_error_keeps_the_one_line_exit(
    command: str, cli_hub: CliHub, capsys: pytest.CaptureFixture[str]
) -> None:
    with trio.fail_after(TIMEOUT):
        device_cs = (await cli_hub.cli(capsys, "device", "create", "off")).strip()
        await cli_hub.cli(capsys, "device", "disable", "off")
        argv = [command, "device", "--exit-on-auth-error"]
        if command == "proxy":
            argv += ["--map", f"ssh=127.0.0.1:{refused_port()}"]
        async with trio.open_nursery() as nursery:
            process, out = await start_child(nursery, argv, env=agent_env(device_cs))
            assert await rest_of(process, out) == 1
        assert out.lines == ["devstream: error: device 'off' is disabled (error 403902)"]
