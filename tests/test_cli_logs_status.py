"""``--log-level`` / ``--log-format`` and ``devstream status``, as a user runs them: the hub and
the device agent as child processes, ``status`` through the installed console script, all on
loopback with real sockets.

Test rules: loopback only, port 0; every test body runs under ``trio.fail_after`` and waits on
output lines, never on time.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from devstream_core.credentials import ConnectionString
from devstream_trio.cli import build_parser
from devstream_trio.cli.logs import JsonFormatter, add_options
from devstream_trio.client.service import ServiceClient

from ._helpers import Output, start_child

TIMEOUT = 30
CS_ENV = "DEVSTREAM_CONNECTION_STRING"
SCRIPT = Path(sys.executable).parent / "devstream"


# -- the options -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "level", "fmt"),
    [
        (["hub"], None, None),
        (["hub", "--log-level", "debug", "--log-format", "json"], "debug", "json"),
        (["--log-level", "error", "--log-format", "json", "hub"], "error", "json"),
        (["--log-level", "error", "hub", "--log-level", "warning"], "warning", None),
        (["--log-format", "json", "device", "list", "--log-level", "info"], "info", "json"),
        (["status", "--json", "--log-format", "text"], None, "text"),
    ],
)
def test_log_options_go_before_or_after_the_subcommand(
    argv: list[str], level: str | None, fmt: str | None
) -> None:
    args = build_parser().parse_args(argv)
    assert (args.log_level, args.log_format) == (level, fmt)


def test_the_hub_logs_at_info_by_default_and_other_commands_at_warning() -> None:
    parser = build_parser()
    assert parser.parse_args(["hub"]).default_log_level == "info"
    assert not hasattr(parser.parse_args(["device", "list"]), "default_log_level")


def test_a_bad_log_level_after_the_subcommand_is_a_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["hub", "--log-level", "loud"])
    assert exited.value.code == 2
    assert "--log-level" in capsys.readouterr().err


def test_json_formatter_writes_one_object_per_line_with_the_fields() -> None:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("devstream.test-json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("two\nlines %d", 7, extra={"event": "x", "bytes_to_device": 5})
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed", extra={"path": Path("/p")})
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert set(first) == {"time", "level", "logger", "message", "event", "bytes_to_device"}
    assert first["message"] == "two\nlines 7"
    assert (first["level"], first["logger"]) == ("warning", "devstream.test-json")
    assert first["time"].endswith("+00:00") and "T" in first["time"]
    assert (first["event"], first["bytes_to_device"]) == ("x", 5)
    assert second["path"] == "/p"
    assert "ValueError: boom" in second["exception"]


# -- a hub's log and `devstream status`, end to end ----------------------------------------


def _json_lines(out: Output) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.lines if line.startswith("{")]


async def _until_event(out: Output, event: str, **fields: Any) -> dict[str, Any]:
    while True:
        line = await out.readline()
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("event") == event and all(record.get(k) == v for k, v in fields.items()):
                return record


async def _script(*argv: str) -> tuple[int, str, str]:
    result = await trio.run_process(
        [str(SCRIPT), *argv], capture_stdout=True, capture_stderr=True, check=False
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


@pytest.mark.parametrize("where", ["before", "after"])
async def test_hub_json_log_and_status_with_a_device_online_and_a_stream_open(
    tmp_path: Path, where: str
) -> None:
    assert SCRIPT.is_file()
    options = ["--log-format", "json"]
    hub_argv = ["hub", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    argv = [*options, *hub_argv] if where == "before" else [*hub_argv, *options]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            hub_process, hub_out = await start_child(nursery, argv)
            await hub_out.until("clients reach it at")
            owner_cs = await hub_out.until(lambda line: line.startswith("HostName="))

            code, out, err = await _script(
                "device", "create", "agent-1", "--connection-string", owner_cs
            )
            assert (code, err) == (0, "")
            device_cs = out.strip()
            env = dict(os.environ, **{CS_ENV: device_cs})
            device_process, device_out = await start_child(nursery, ["echo", "device"], env=env)
            await device_out.until("online")
            connected = await _until_event(hub_out, "device_connected", device_id="agent-1")
            assert connected["peer"].startswith("127.0.0.1:")
            assert connected["level"] == "info" and connected["logger"] == "devstream.hub"

            # A raw stream (exact byte counts), left open while `status` looks.
            service = ServiceClient(ConnectionString.parse(owner_cs))
            stream = await service.open_stream("agent-1", "echo", mode="raw")
            await stream.send_all(b"0123456789" * 4)
            echoed = b""
            while len(echoed) < 40:
                echoed += await stream.receive_some()
            assert echoed == b"0123456789" * 4

            code, out, err = await _script("status", "--connection-string", owner_cs)
            assert (code, err) == (0, "")
            text = out.splitlines()
            assert text[0] == "devices online: 1"
            assert text[1].split() == ["DEVICE", "ADDRESS", "ONLINE"]
            assert text[2].split()[:2] == ["agent-1", connected["peer"]]
            assert text[3] == "streams open: 1"
            assert text[4].split()[:5] == ["STREAM", "DEVICE", "NAME", "MODE", "STATE"]
            row = text[5].split()
            assert row[1:5] == ["agent-1", "echo", "raw", "paired"]
            assert row[-2:] == ["40", "40"]

            code, out, err = await _script(
                "status", "--json", "--connection-string", owner_cs, "--log-level", "debug"
            )
            assert code == 0
            status = json.loads(out)
            (listed,) = status["streams"]
            assert (listed["bytesToDevice"], listed["bytesToService"]) == (40, 40)
            assert status["devices"][0]["deviceId"] == "agent-1"

            await stream.aclose()
            ended = await _until_event(hub_out, "stream_ended", stream_id=listed["streamId"])
            assert (ended["bytes_to_device"], ended["bytes_to_service"]) == (40, 40)
            assert (ended["device_id"], ended["stream_name"], ended["mode"]) == (
                "agent-1",
                "echo",
                "raw",
            )
            assert (ended["end"], ended["by"], ended["code"]) == ("closed", "service", 1000)
            assert ended["duration"] >= 0

            device_process.kill()
            left = await _until_event(hub_out, "device_left", device_id="agent-1")
            assert left["peer"] == connected["peer"] and left["online_seconds"] >= 0
            assert left["reason"]
            hub_process.kill()
            await hub_out.drain()

    records = _json_lines(hub_out)
    assert records
    for record in records:
        assert {"time", "level", "logger", "message"} <= set(record)
    # No key or token in the hub's output, but for the owner connection string it prints
    # once on first start.
    owner_key = ConnectionString.parse(owner_cs).shared_access_key
    device_key = ConnectionString.parse(device_cs).shared_access_key
    logged = "\n".join(line for line in hub_out.lines if not line.startswith("HostName="))
    for secret in (owner_key, device_key):
        assert secret and secret not in logged
    assert "sig=" not in logged and "SharedAccessSignature" not in logged


async def test_status_refuses_a_device_connection_string(tmp_path: Path) -> None:
    cs = "HostName=127.0.0.1:1;DeviceId=d;SharedAccessKey=" + "A" * 44 + ";UseTls=false"
    with trio.fail_after(TIMEOUT):
        code, out, err = await _script("status", "--connection-string", cs)
    assert code == 1 and out == ""
    assert err.startswith("devstream: error: ") and "service connection string" in err


def test_log_options_reach_nested_subcommands() -> None:
    parser = argparse.ArgumentParser(prog="x")
    sub = parser.add_subparsers(dest="command")
    group = sub.add_parser("group")
    inner = group.add_subparsers(dest="action").add_parser("leaf")
    inner.set_defaults(leaf=True)
    add_options(parser)
    args = parser.parse_args(["--log-level", "error", "group", "leaf", "--log-format", "json"])
    assert (args.log_level, args.log_format, args.leaf) == ("error", "json", True)
    args = parser.parse_args(["group", "--log-level", "debug", "leaf"])
    assert args.log_level == "debug"
