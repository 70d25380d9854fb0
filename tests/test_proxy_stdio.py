"""``devstream proxy stdio``: one stream joined to standard input and output, and ``--config``.

First :func:`serve_stdio` on in-memory streams against an in-memory hub (``hub_env``), on the
``autojump_clock``: bytes intact, half-close in both orders, a reset either way, a stream that
cannot be opened. Then the command line as a child process against a hub and a device proxy
on loopback: an echo over its standard input and output, its one-line errors, OpenSSH's
``ProxyCommand`` with ``ssh`` and ``scp`` against a throwaway ``sshd``, and proxies configured
by a TOML file.

Test rules: loopback only, port 0 (``sshd`` gets a just-released port); in-memory tests run on
the ``autojump_clock`` and assert how much virtual time passed; every real-socket test runs
under ``trio.fail_after`` and waits on events, process exits and output, never on time.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import pty
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
import trio.testing

from devstream_core.errors import ErrorCode
from devstream_trio.cli.config import apply_config
from devstream_trio.cli.options import UsageError
from devstream_trio.client.device import DeviceClient, Handler
from devstream_trio.client.framed import FramedStream
from devstream_trio.client.proxy import StdioError, Target, serve_device_proxy, serve_stdio
from devstream_trio.client.service import AnyStream, ServiceClient
from devstream_trio.exceptions import (
    DeviceNotOnline,
    StreamNameNotRegistered,
    StreamReset,
    TargetUnreachable,
)
from devstream_trio.server.store import RegistryStore

from ._helpers import one_error_line, refused_port, start_child, start_hub, start_tcp_server
from .conftest import HubEnv, random_payload, require_tool
from .test_proxy_e2e import Sshd, sha256_of, start_sshd, write_random_file

MiB = 1024 * 1024
TIMEOUT = 600
DEVICE_ID = "stdio-device"
CLI = [sys.executable, "-m", "devstream_trio.cli"]


# -- serve_stdio on in-memory streams ---------------------------------------------------------


@dataclass
class Stdio:
    """In-memory standard input and output: the test writes ``to_stdin`` and reads
    ``from_stdout``; ``stdin`` and ``stdout`` go to :func:`serve_stdio`."""

    to_stdin: trio.abc.SendStream
    stdin: trio.abc.ReceiveStream
    stdout: trio.abc.SendStream
    from_stdout: trio.abc.ReceiveStream


def stdio() -> Stdio:
    to_stdin, stdin = trio.testing.memory_stream_one_way_pair()
    stdout, from_stdout = trio.testing.memory_stream_one_way_pair()
    return Stdio(to_stdin, stdin, stdout, from_stdout)


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def start_device(env: HubEnv, handlers: dict[str, Handler]) -> None:
    cs = await env.create_device(DEVICE_ID)
    device = env.device(cs)
    await env.nursery.start(device.serve, handlers)


def service_of(env: HubEnv) -> ServiceClient:
    service = env.service()
    service.nursery = env.nursery
    return service


async def echo_then_eof(stream: AnyStream) -> None:
    """Send back everything up to the service's EOF, then half-close."""
    async for data in stream:
        await stream.send_all(data)
    await stream.send_eof()


async def test_bytes_arrive_intact_and_stdin_eof_ends_it(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_device(hub_env, {"echo": echo_then_eof})
    io = stdio()
    payload = random_payload(3 * MiB)
    echoed: list[bytes] = []
    counts: list[tuple[int, int]] = []
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def run_proxy() -> None:
                counts.append(
                    await serve_stdio(service_of(hub_env), DEVICE_ID, "echo", io.stdin, io.stdout)
                )

            async def read_stdout() -> None:
                echoed.append(await read_to_eof(io.from_stdout))

            nursery.start_soon(run_proxy)
            nursery.start_soon(read_stdout)
            for offset in range(0, len(payload), 100_000):
                await io.to_stdin.send_all(payload[offset : offset + 100_000])
            await io.to_stdin.aclose()  # EOF on standard input
        elapsed = trio.current_time() - start
    assert echoed == [payload]  # and standard output was closed: read_to_eof returned
    assert counts == [(len(payload), len(payload))]
    assert elapsed < 1.0  # no timeout was waited out on the way


async def test_stream_eof_first_closes_stdout_and_stdin_still_flows(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    greeting = random_payload(MiB)
    request = random_payload(2 * MiB)
    digests: list[bytes] = []
    got_request = trio.Event()

    async def greet_then_read(stream: AnyStream) -> None:
        await stream.send_all(greeting)
        await stream.send_eof()
        digests.append(hashlib.sha256(await read_to_eof(stream)).digest())
        got_request.set()

    await start_device(hub_env, {"push": greet_then_read})
    io = stdio()
    finished = trio.Event()
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        async with trio.open_nursery() as nursery:

            async def run_proxy() -> None:
                await serve_stdio(service_of(hub_env), DEVICE_ID, "push", io.stdin, io.stdout)
                finished.set()

            nursery.start_soon(run_proxy)
            # The device's EOF closes standard output while standard input is still open.
            assert await read_to_eof(io.from_stdout) == greeting
            assert not finished.is_set()
            await io.to_stdin.send_all(request)
            await io.to_stdin.aclose()
            await got_request.wait()
        elapsed = trio.current_time() - start
    assert finished.is_set()
    assert digests == [hashlib.sha256(request).digest()]
    assert elapsed < 1.0


async def test_a_reset_from_the_device_is_raised(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    async def reset_after_hello(stream: AnyStream) -> None:
        assert await stream.receive_some() == b"hello"
        assert isinstance(stream, FramedStream)
        await stream.reset(ErrorCode.TARGET_UNREACHABLE, "no target today")

    await start_device(hub_env, {"rst": reset_after_hello})
    io = stdio()
    with trio.fail_after(TIMEOUT):
        await io.to_stdin.send_all(b"hello")  # standard input stays open: the reset ends it
        start = trio.current_time()
        with pytest.raises(TargetUnreachable) as info:
            await serve_stdio(service_of(hub_env), DEVICE_ID, "rst", io.stdin, io.stdout)
        assert trio.current_time() - start < 1.0
    assert info.value.message == "no target today"


async def test_a_hangup_ends_both_directions_and_closes_the_stream(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The program on standard input and output went away (SIGHUP): the stream is closed
    properly, so the device reads an EOF, not a reset."""
    device_read: list[bytes] = []
    read_done = trio.Event()

    async def read_all(stream: AnyStream) -> None:
        await stream.send_all(b"hello")
        device_read.append(await read_to_eof(stream))
        read_done.set()

    await start_device(hub_env, {"read": read_all})
    io = stdio()
    hangup = trio.Event()
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def run_proxy() -> None:
                counts = await serve_stdio(
                    service_of(hub_env), DEVICE_ID, "read", io.stdin, io.stdout, hangup=hangup
                )
                assert counts == (4, 5)

            nursery.start_soon(run_proxy)
            await io.to_stdin.send_all(b"ping")
            assert await io.from_stdout.receive_some() == b"hello"
            start = trio.current_time()
            hangup.set()  # standard input is still open, and the device has sent no EOF
            await read_done.wait()
        assert trio.current_time() - start < 1.0
    assert device_read == [b"ping"]


class BrokenOutput(trio.abc.SendStream):
    """Standard output whose reader went away."""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("EPIPE")

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class BrokenInput(trio.abc.ReceiveStream):
    """Standard input that fails to read (EIO on a terminal that went away)."""

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.lowlevel.checkpoint()
        raise trio.BrokenResourceError("EIO")

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@pytest.mark.parametrize("broken", ["stdin", "stdout"])
async def test_stdin_or_stdout_failing_resets_the_stream(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, broken: str
) -> None:
    device_saw: list[BaseException | None] = []
    seen = trio.Event()

    async def talk(stream: AnyStream) -> None:
        await stream.send_all(b"anyone reading?")
        try:
            await read_to_eof(stream)
        except trio.BrokenResourceError as exc:
            device_saw.append(exc.__cause__)
        seen.set()

    await start_device(hub_env, {"talk": talk})
    io = stdio()
    stdin, stdout = (BrokenInput(), io.stdout) if broken == "stdin" else (io.stdin, BrokenOutput())
    expected = "standard input failed" if broken == "stdin" else "standard output was closed"
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        with pytest.raises(StdioError, match=expected):
            await serve_stdio(service_of(hub_env), DEVICE_ID, "talk", stdin, stdout)
        await seen.wait()
        assert trio.current_time() - start < 1.0
    [cause] = device_saw
    assert isinstance(cause, StreamReset)
    assert expected in cause.message


async def test_a_stream_that_cannot_open_is_an_error(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    io = stdio()
    await hub_env.create_device("asleep")
    with trio.fail_after(TIMEOUT):
        with pytest.raises(DeviceNotOnline):
            await serve_stdio(service_of(hub_env), "asleep", "ssh", io.stdin, io.stdout)
        await start_device(hub_env, {"echo": echo_then_eof})
        with pytest.raises(StreamNameNotRegistered):
            await serve_stdio(service_of(hub_env), DEVICE_ID, "ssh", io.stdin, io.stdout)
    # Nothing was written to standard output, and it was not closed.
    await io.stdout.send_all(b"still open")
    assert await io.from_stdout.receive_some() == b"still open"


# -- the command line on loopback -------------------------------------------------------------


@dataclass
class Loopback:
    service: ServiceClient
    service_cs: str
    device_cs: str

    def env(self, cs: str | None = None) -> dict[str, str]:
        """The environment of a child ``devstream``: no DEVSTREAM_* but the given string."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DEVSTREAM_")}
        if cs is not None:
            env["DEVSTREAM_CONNECTION_STRING"] = cs
        return env


@asynccontextmanager
async def open_loopback(targets: dict[str, int] | None = None) -> AsyncIterator[Loopback]:
    """A hub on 127.0.0.1 with device DEVICE_ID; with *targets*, a device proxy sending each
    name to its port on 127.0.0.1."""
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        _, cs = await start_hub(nursery, store)
        service = ServiceClient(cs, nursery=nursery)
        device_cs = service.device_connection_string(await service.create_device(DEVICE_ID))
        if targets is not None:
            device = DeviceClient(device_cs)
            proxy_targets = [
                Target(name=name, host="127.0.0.1", port=port) for name, port in targets.items()
            ]

            async def device_task(task_status: trio.TaskStatus[None]) -> None:
                await serve_device_proxy(device, proxy_targets, task_status=task_status)

            await nursery.start(device_task)
        yield Loopback(service, str(cs), str(device_cs))
        nursery.cancel_scope.cancel()


async def echo_tcp(tcp: trio.SocketStream) -> None:
    async for chunk in tcp:
        await tcp.send_all(chunk)
    await tcp.send_eof()


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: str


async def run_stdio(argv: Sequence[str], env: dict[str, str], stdin: bytes) -> Result:
    """``devstream ARGV``, fed *stdin* (then EOF); its exit status, stdout and stderr."""
    result = await trio.run_process(
        [*CLI, *argv], stdin=stdin, capture_stdout=True, capture_stderr=True, env=env, check=False
    )
    return Result(result.returncode, result.stdout, result.stderr.decode())


async def test_cli_echo_over_stdin_and_stdout() -> None:
    payload = random_payload(2 * MiB)
    with trio.fail_after(30):
        async with trio.open_nursery() as servers:
            echo_port = await start_tcp_server(servers, echo_tcp)
            async with open_loopback({"echo": echo_port}) as hub:
                proxy = await trio.lowlevel.open_process(
                    [*CLI, "proxy", "stdio", "--device", DEVICE_ID, "--name", "echo"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=hub.env(hub.service_cs),
                )
                assert proxy.stdin and proxy.stdout and proxy.stderr
                # A first exchange while standard input is open: the echo comes back at once.
                await proxy.stdin.send_all(b"ping\n")
                first = b""
                while len(first) < 5:
                    first += await proxy.stdout.receive_some()
                assert first == b"ping\n"
                received = bytearray()

                async def read_stdout() -> None:
                    assert proxy.stdout
                    while chunk := await proxy.stdout.receive_some():
                        received.extend(chunk)

                async with trio.open_nursery() as io:
                    io.start_soon(read_stdout)
                    await proxy.stdin.send_all(payload)
                    await proxy.stdin.aclose()  # EOF: the echo ends, stdout reaches its EOF
                assert await proxy.wait() == 0
                stderr = await proxy.stderr.receive_some()
            servers.cancel_scope.cancel()
    assert bytes(received) == payload
    assert stderr == b""


async def test_cli_stream_eof_closes_stdout_before_stdin_ends() -> None:
    """The device's end half-closes first: standard output reaches EOF while the command
    still reads standard input; it exits once standard input ends too."""
    greeting = b"hello from the device\n"
    got: list[bytes] = []

    async def greet_then_read(tcp: trio.SocketStream) -> None:
        await tcp.send_all(greeting)
        await tcp.send_eof()
        data = bytearray()
        async for chunk in tcp:
            data += chunk
        got.append(bytes(data))

    with trio.fail_after(30):
        async with trio.open_nursery() as servers:
            port = await start_tcp_server(servers, greet_then_read)
            async with open_loopback({"greet": port}) as hub:
                proxy = await trio.lowlevel.open_process(
                    [*CLI, "proxy", "stdio", "--device", DEVICE_ID, "--name", "greet"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    env=hub.env(hub.service_cs),
                )
                assert proxy.stdin and proxy.stdout
                out = bytearray()
                while chunk := await proxy.stdout.receive_some():
                    out += chunk
                assert bytes(out) == greeting
                assert proxy.poll() is None  # still running: standard input is open
                await proxy.stdin.send_all(b"the request")
                await proxy.stdin.aclose()
                assert await proxy.wait() == 0
            servers.cancel_scope.cancel()
    assert got == [b"the request"]


async def test_cli_with_files_as_stdin_and_stdout(tmp_path: Path) -> None:
    """``devstream proxy stdio < FILE > FILE``: regular files are read and written too."""
    source, copy = tmp_path / "in.bin", tmp_path / "out.bin"
    expected = await trio.to_thread.run_sync(write_random_file, source, 3 * MiB)
    with trio.fail_after(30):
        async with trio.open_nursery() as servers:
            echo_port = await start_tcp_server(servers, echo_tcp)
            async with open_loopback({"echo": echo_port}) as hub:
                with source.open("rb") as stdin, copy.open("wb") as stdout:
                    result = await trio.run_process(
                        [*CLI, "proxy", "stdio", "--device", DEVICE_ID, "--name", "echo"],
                        stdin=stdin,
                        stdout=stdout,
                        env=hub.env(hub.service_cs),
                        check=False,
                    )
                assert result.returncode == 0
            servers.cancel_scope.cancel()
    assert await trio.to_thread.run_sync(sha256_of, copy) == expected


async def test_cli_stdin_on_a_terminal_stays_blocking() -> None:
    """Standard input on a terminal (a pseudo-terminal here, in its usual line mode) is read
    without switching the terminal, which the shell shares, to non-blocking mode."""
    master, terminal = pty.openpty()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as servers:
                echo_port = await start_tcp_server(servers, echo_tcp)
                async with open_loopback({"echo": echo_port}) as hub:
                    proxy = await trio.lowlevel.open_process(
                        [*CLI, "proxy", "stdio", "--device", DEVICE_ID, "--name", "echo"],
                        stdin=terminal,
                        stdout=subprocess.PIPE,
                        env=hub.env(hub.service_cs),
                    )
                    assert proxy.stdout
                    os.write(master, b"typed line\n")
                    line = b""
                    while not line.endswith(b"\n"):
                        line += await proxy.stdout.receive_some()
                    assert line == b"typed line\n"
                    # The terminal's open file, shared with the child, is still blocking.
                    assert os.get_blocking(terminal)
                    os.write(master, b"\x04")  # end of input, as a user types Ctrl-D
                    assert await proxy.stdout.receive_some() == b""
                    assert await proxy.wait() == 0
                servers.cancel_scope.cancel()
    finally:
        os.close(master)
        os.close(terminal)


async def test_cli_errors_are_one_line_and_exit_1() -> None:
    dead = refused_port()
    with trio.fail_after(30):
        async with open_loopback({"down": dead}) as hub:
            env = hub.env(hub.service_cs)
            stdio_argv = ["proxy", "stdio", "--device"]
            # The device is online but does not serve this name.
            result = await run_stdio([*stdio_argv, DEVICE_ID, "--name", "nope"], env, b"x")
            assert result.returncode == 1 and result.stdout == b""
            assert "404901" in one_error_line(result.stderr)
            # The device proxy cannot reach its target: it resets the stream.
            result = await run_stdio([*stdio_argv, DEVICE_ID, "--name", "down"], env, b"x")
            assert result.returncode == 1 and result.stdout == b""
            line = one_error_line(result.stderr)
            assert f"127.0.0.1:{dead} unreachable" in line, line
            # An unknown device; a device that is not online.
            result = await run_stdio([*stdio_argv, "nobody", "--name", "ssh"], env, b"x")
            assert result.returncode == 1 and result.stdout == b""
            assert "404001" in one_error_line(result.stderr)
            await hub.service.create_device("asleep")
            result = await run_stdio([*stdio_argv, "asleep", "--name", "ssh"], env, b"x")
            assert result.returncode == 1 and result.stdout == b""
            assert "404103" in one_error_line(result.stderr)
            # Arguments missing.
            result = await run_stdio(["proxy", "stdio", "--device", DEVICE_ID], env, b"")
            assert result.returncode == 1
            assert "--name" in one_error_line(result.stderr)


# -- OpenSSH's ProxyCommand -------------------------------------------------------------------


class LogWatch(logging.Handler):
    """Keeps the messages of the loggers it is attached to (in this process: the hub's and the
    device proxy's), and wakes a test waiting for one."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []
        self._changed = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.levelname} {record.name}: {record.getMessage()}")
        self._changed.set()

    async def until(self, count: int, text: str) -> None:
        """Wait until *count* messages contain *text*."""
        while sum(text in m for m in self.messages) < count:
            self._changed = trio.Event()
            await self._changed.wait()


@contextmanager
def watching(*names: str) -> Iterator[LogWatch]:
    watch = LogWatch()
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(watch)
        logger.setLevel(logging.INFO)
    try:
        yield watch
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(watch)
            logger.setLevel(level)


def proxy_command(*extra: str) -> str:
    return shlex.join([*CLI, "proxy", "stdio", *extra]) + " --device %h --name ssh"


async def test_ssh_and_scp_with_proxy_command(tmp_path: Path) -> None:
    require_tool("sshd", "ssh", "scp", "ssh-keygen")
    if os.geteuid() != 0:
        pytest.skip("the throwaway sshd logs in as root, so it runs as root")
    with ExitStack() as stack, trio.fail_after(60):
        async with trio.open_nursery() as programs:
            sshd: Sshd = await start_sshd(programs, tmp_path / "ssh")
            logs = stack.enter_context(watching("devstream.proxy", "devstream.hub"))
            async with open_loopback({"ssh": sshd.port}) as hub:
                env = hub.env(hub.service_cs)
                options = [*sshd.ssh_options(), "-o", f"ProxyCommand={proxy_command()}"]
                ssh = ["ssh", *options, f"root@{DEVICE_ID}"]
                result = await trio.run_process(
                    [*ssh, "echo hello-over-stdio; echo to-stderr >&2; exit 7"],
                    capture_stdout=True,
                    capture_stderr=True,
                    env=env,
                    check=False,
                )
                assert result.returncode == 7, result.stderr.decode()
                assert result.stdout == b"hello-over-stdio\n"
                assert result.stderr == b"to-stderr\n"
                # ssh hangs up on its ProxyCommand as it exits: the stream still ends properly
                # (well before the hub's 30 s grace for a dropped side), and the device proxy
                # closes its connection to sshd.
                with trio.fail_after(10):
                    await logs.until(1, "(ssh): closed;")

                source, copy = tmp_path / "source.bin", tmp_path / "copy.bin"
                expected = await trio.to_thread.run_sync(write_random_file, source, 20 * MiB)
                scp = ["scp", "-q", *options]
                result = await trio.run_process(
                    [*scp, str(source), f"root@{DEVICE_ID}:{copy}"],
                    capture_stderr=True,
                    env=env,
                    check=False,
                )
                assert result.returncode == 0, result.stderr.decode()
                assert await trio.to_thread.run_sync(sha256_of, copy) == expected
                with trio.fail_after(10):
                    await logs.until(2, "(ssh): closed;")
            programs.cancel_scope.cancel()
    dropped = [m for m in logs.messages if "dropped" in m or m.startswith("WARNING")]
    assert dropped == [], logs.messages
    accepted = [line for line in sshd.output.lines if "Accepted publickey for root" in line]
    assert len(accepted) == 2, sshd.output.lines


# -- --config FILE ----------------------------------------------------------------------------


async def test_cli_proxies_configured_by_a_file(tmp_path: Path) -> None:
    """``proxy device``, ``proxy service`` and ``proxy stdio`` each read their table; a flag
    replaces the file's entry of the same name."""
    dead = refused_port()
    with trio.fail_after(30):
        async with trio.open_nursery() as programs:
            echo_port = await start_tcp_server(programs, echo_tcp)
            async with open_loopback() as hub:
                config = tmp_path / "devstream.toml"
                config.write_text(
                    "[device]\n"
                    f'map = ["echo=127.0.0.1:{dead}", "spare=127.0.0.1:{dead}"]\n'
                    f'connection-string = "{hub.device_cs}"\n'
                    "[service]\n"
                    f'device = "{DEVICE_ID}"\n'
                    'forward = ["127.0.0.1:0=echo"]\n'
                    f'connection-string = "{hub.service_cs}"\n'
                    "[stdio]\n"
                    f'device = "{DEVICE_ID}"\n'
                    'name = "echo"\n'
                    f'connection-string = "{hub.service_cs}"\n'
                )
                env = hub.env()  # no connection string in the environment: the file's
                # The flag's echo target replaces the file's (a port nobody listens on).
                _, device_out = await start_child(
                    programs,
                    [
                        "proxy",
                        "device",
                        "--config",
                        str(config),
                        "--map",
                        f"echo=127.0.0.1:{echo_port}",
                    ],
                    env,
                )
                line = await device_out.until("online")
                assert (
                    f"echo -> 127.0.0.1:{echo_port}" in line
                    and f"spare -> 127.0.0.1:{dead}" in line
                )
                programs.start_soon(device_out.drain)
                _, service_out = await start_child(
                    programs, ["proxy", "service", "--config", str(config)], env
                )
                line = await service_out.until("listening on")
                programs.start_soon(service_out.drain)
                port = int(line.split()[2].rsplit(":", 1)[1])
                tcp = await trio.open_tcp_stream("127.0.0.1", port)
                await tcp.send_all(b"through the service proxy")
                await tcp.send_eof()
                assert await read_to_eof(tcp) == b"through the service proxy"
                await tcp.aclose()

                result = await run_stdio(["proxy", "stdio", "--config", str(config)], env, b"abc")
                assert (result.returncode, result.stdout, result.stderr) == (0, b"abc", "")
            programs.cancel_scope.cancel()


BAD_CONFIGS = {
    "missing": (None, "cannot read it"),
    "not-toml": ("[device\nmap = 1\n", "is not TOML"),
    "not-utf8": (b"[device]\nmap = ['\xff']\n", "not UTF-8"),
    "unknown-table": ("[devices]\nmap = []\n", "unknown key 'devices'"),
    "unknown-key": ('[device]\nmaps = ["a=b:1"]\n', "unknown key 'maps' in [device]"),
    "not-a-table": ('device = "x"\n', "device must be a table"),
    "wrong-type": (
        '[device]\nmap = "ssh=127.0.0.1:22"\n',
        "[device] map must be a list of strings",
    ),
    "wrong-item": ("[service]\nforward = [22]\n", "[service] forward must be a list of strings"),
    "string-key": ("[stdio]\nname = 22\n", "[stdio] name must be a string"),
    "bad-entry": ('[device]\nmap = ["ssh"]\n', "[device] map: --map must be NAME=HOST:PORT"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
async def test_cli_bad_config_file_is_one_line(tmp_path: Path, case: str) -> None:
    content, expected = BAD_CONFIGS[case]
    path = tmp_path / f"{case}.toml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    env = {k: v for k, v in os.environ.items() if not k.startswith("DEVSTREAM_")}
    with trio.fail_after(30):
        result = await run_stdio(["proxy", "device", "--config", str(path)], env, b"")
    assert result.returncode == 1
    assert result.stdout == b""
    line = one_error_line(result.stderr)
    assert f"config file {str(path)!r}" in line, line
    assert expected in line, line


def test_flags_win_over_the_file_and_lists_merge(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text(
        "[service]\n"
        'device = "from-file"\n'
        'forward = ["127.0.0.1:2222=ssh", "8080=web"]\n'
        'connection-string = "from-file"\n'
        'ca-file = "file.pem"\n'
    )
    args = argparse.Namespace(
        config=str(path),
        role="service",
        device=None,
        forward=["2222=other", "9000=api"],
        map=[],
        connection_string="from-flag",
        ca_file=None,
        http_proxy=None,
    )
    apply_config(args)
    assert args.device == "from-file"
    assert args.connection_string == "from-flag"
    assert args.ca_file == "file.pem"
    assert args.http_proxy is None
    # 2222=other binds 127.0.0.1:2222 like the file's entry, so it replaces it.
    assert args.forward == ["8080=web", "2222=other", "9000=api"]

    args = argparse.Namespace(
        config=str(path), role="device", map=["ssh=10.0.0.1:22"], forward=[], device=None
    )
    path.write_text('[device]\nmap = ["ssh=127.0.0.1:22", "web=127.0.0.1:80"]\n')
    args.connection_string = args.ca_file = args.http_proxy = None
    apply_config(args)
    assert args.map == ["web=127.0.0.1:80", "ssh=10.0.0.1:22"]
    assert args.connection_string is None  # the environment still decides


def test_a_bad_file_names_the_key() -> None:
    args = argparse.Namespace(config="/nonexistent/devstream.toml", role="device")
    with pytest.raises(UsageError, match=r"nonexistent/devstream\.toml"):
        apply_config(args)
