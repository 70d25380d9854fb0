"""The local proxies end to end: real programs talk to each other through devstream.

A hub on 127.0.0.1 (port 0, in-memory registry), a device running ``serve_device_proxy`` and a
service running ``serve_service_proxy`` all run in the test's event loop over real loopback
sockets. On either end sit programs devstream did not write: OpenSSH (``sshd``, ``ssh``,
``scp``), ``curl`` and Python's ``http.server``, plus small trio servers where a test needs to
control exactly when each side half-closes. One test drives the ``devstream proxy`` command
line as child processes.

Test rules: loopback only; port 0 everywhere except for ``sshd``, which needs a port number
(a just-released one); every test body runs under ``trio.fail_after`` and waits on events,
process exits and output lines, never on time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import struct
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from devstream_trio.client.device import DeviceClient
from devstream_trio.client.proxy import Forward, Target, serve_device_proxy, serve_service_proxy
from devstream_trio.client.service import ServiceClient
from devstream_trio.server.hub import Hub
from devstream_trio.server.store import RegistryStore

from ._helpers import (
    Output,
    closed_promptly,
    free_port,
    refused_port,
    start_hub,
    start_process,
    start_tcp_server,
)
from .conftest import random_payload, require_tool

MiB = 1024 * 1024
DEVICE_ID = "proxy-device"
#: How long a refused connection may stay open before the client sees it closed.
PROMPT = 5


# -- helpers ----------------------------------------------------------------------------------


def write_random_file(path: Path, size: int) -> str:
    """Fill *path* with *size* incompressible bytes; return their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for offset in range(0, size, MiB):
            chunk = os.urandom(min(MiB, size - offset))
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


async def start_program(
    nursery: trio.Nursery, argv: Sequence[str], ready: str, env: dict[str, str] | None = None
) -> tuple[str, Output]:
    """Start *argv* in *nursery* (killed when it is cancelled); return its *ready* line."""
    _, output = await start_process(nursery, argv, env)
    line = await output.until(ready)
    nursery.start_soon(output.drain)
    return line, output


async def run(argv: Sequence[str]) -> bytes:
    """Run a program to completion; return its stdout, failing with its stderr."""
    result = await trio.run_process(
        list(argv), capture_stdout=True, capture_stderr=True, check=False
    )
    assert result.returncode == 0, (argv[0], result.returncode, result.stderr.decode())
    return result.stdout


async def start_http_server(nursery: trio.Nursery, directory: Path) -> int:
    """Python's own HTTP server on 127.0.0.1, port 0; return the port it bound."""
    argv = [sys.executable, "-u", "-m", "http.server", "--bind", "127.0.0.1", "0"]
    line, _ = await start_program(
        nursery, [*argv, "--directory", str(directory)], ready="Serving HTTP on"
    )
    # "Serving HTTP on 127.0.0.1 port 40123 (http://127.0.0.1:40123/) ..."
    return int(line.split(" port ", 1)[1].split()[0])


async def read_to_eof(stream: trio.abc.ReceiveStream) -> bytes:
    received = bytearray()
    async for chunk in stream:
        received += chunk
    return bytes(received)


@dataclass
class Tunnel:
    """A hub, a device proxy and a service proxy; ``ports[name]`` is the local forward."""

    hub: Hub
    service: ServiceClient
    nursery: trio.Nursery
    ports: dict[str, int] = field(default_factory=dict)

    async def connect(self, name: str) -> trio.SocketStream:
        return await trio.open_tcp_stream("127.0.0.1", self.ports[name])


@asynccontextmanager
async def open_tunnel(
    targets: dict[str, tuple[str, int]], forwards: Sequence[str], *, device_online: bool = True
) -> AsyncIterator[Tunnel]:
    """Hub + device proxy sending each name to its target + service proxy forwarding *forwards*.

    With ``device_online=False`` the device is registered but its proxy never starts.
    """
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        hub, cs = await start_hub(nursery, store)
        service = ServiceClient(cs, nursery=nursery)
        device_cs = service.device_connection_string(await service.create_device(DEVICE_ID))
        if device_online:
            device = DeviceClient(device_cs)
            proxy_targets = [
                Target(name=name, host=host, port=port) for name, (host, port) in targets.items()
            ]

            async def device_task(task_status: trio.TaskStatus[None]) -> None:
                await serve_device_proxy(device, proxy_targets, task_status=task_status)

            await nursery.start(device_task)

        async def service_task(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            await serve_service_proxy(
                service,
                DEVICE_ID,
                [Forward(bind="127.0.0.1", port=0, name=name) for name in forwards],
                task_status=task_status,
            )

        bound: list[tuple[str, int]] = await nursery.start(service_task)
        assert all(host == "127.0.0.1" and port != 0 for host, port in bound), bound
        tunnel = Tunnel(hub=hub, service=service, nursery=nursery)
        tunnel.ports = {name: port for name, (_, port) in zip(forwards, bound, strict=True)}
        yield tunnel
        nursery.cancel_scope.cancel()


# -- OpenSSH ----------------------------------------------------------------------------------


@dataclass
class Sshd:
    port: int
    client_key: Path
    output: Output
    #: The server's public host key, for a known-hosts file.
    host_public_key: str

    def ssh_options(self) -> list[str]:
        return [
            "-F",
            "/dev/null",
            "-i",
            str(self.client_key),
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "LogLevel=ERROR",
        ]


async def start_sshd(nursery: trio.Nursery, where: Path) -> Sshd:
    """An OpenSSH server on 127.0.0.1 with throwaway keys, accepting one client key (for the
    user it runs as: a server not run by root logs in only its own user)."""
    where.mkdir()
    host_key, client_key = where / "host_key", where / "client_key"
    for key in (host_key, client_key):
        await run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
    authorized = where / "authorized_keys"
    authorized.write_bytes(client_key.with_suffix(".pub").read_bytes())
    port = free_port()
    config = where / "sshd_config"
    config.write_text(
        f"ListenAddress 127.0.0.1:{port}\n"
        f"HostKey {host_key}\n"
        f"AuthorizedKeysFile {authorized}\n"
        "StrictModes no\n"
        "UsePAM no\n"
        "PidFile none\n"
        "PermitRootLogin yes\n"
        "PasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\n"
        "UseDNS no\n"
        "PrintMotd no\n"
        "Subsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        # sshd started as root wants its privilege-separation directory (made at boot by the
        # system's service manager when sshd is installed as a service).
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    sshd = "/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else "sshd"
    _, output = await start_program(
        nursery, [sshd, "-D", "-e", "-f", str(config)], ready="Server listening on"
    )
    host_public_key = host_key.with_suffix(".pub").read_text().strip()
    return Sshd(port=port, client_key=client_key, output=output, host_public_key=host_public_key)


async def test_ssh_and_scp_through_the_proxies(tmp_path: Path) -> None:
    require_tool("sshd", "ssh", "scp", "ssh-keygen")
    if os.geteuid() != 0:
        pytest.skip("the throwaway sshd logs in as root, so it runs as root")
    with trio.fail_after(40):
        async with trio.open_nursery() as programs:
            sshd = await start_sshd(programs, tmp_path / "ssh")
            async with open_tunnel({"ssh": ("127.0.0.1", sshd.port)}, ["ssh"]) as tunnel:
                port = tunnel.ports["ssh"]
                options = sshd.ssh_options()
                ssh = ["ssh", "-p", str(port), *options, "root@127.0.0.1"]
                out = await run([*ssh, "echo hello-through-devstream; uname -s"])
                assert out.decode().splitlines() == ["hello-through-devstream", "Linux"]

                source, copy = tmp_path / "source.bin", tmp_path / "copy.bin"
                expected = await trio.to_thread.run_sync(write_random_file, source, 50 * MiB)
                scp = ["scp", "-q", "-P", str(port), *options]
                await run([*scp, str(source), f"root@127.0.0.1:{copy}"])
                assert await trio.to_thread.run_sync(sha256_of, copy) == expected
            programs.cancel_scope.cancel()
        # Both sessions really went through sshd (and nothing else logged in).
        accepted = [line for line in sshd.output.lines if "Accepted publickey for root" in line]
        assert len(accepted) == 2, sshd.output.lines


# -- HTTP -------------------------------------------------------------------------------------


async def test_curl_downloads_through_the_proxies(tmp_path: Path) -> None:
    require_tool("curl")
    site, downloads = tmp_path / "site", tmp_path / "downloads"
    site.mkdir()
    downloads.mkdir()
    big = await trio.to_thread.run_sync(write_random_file, site / "big.bin", 100 * MiB)
    small = await trio.to_thread.run_sync(write_random_file, site / "small.bin", 5 * MiB)
    with trio.fail_after(45):
        async with trio.open_nursery() as programs:
            web = await start_http_server(programs, site)
            async with open_tunnel({"web": ("127.0.0.1", web)}, ["web"]) as tunnel:
                url = f"http://127.0.0.1:{tunnel.ports['web']}"
                await run(["curl", "-sSf", "-o", str(downloads / "big.bin"), f"{url}/big.bin"])
                assert await trio.to_thread.run_sync(sha256_of, downloads / "big.bin") == big

                outputs = [downloads / f"small-{i}.bin" for i in range(20)]
                async with trio.open_nursery() as curls:
                    for out in outputs:
                        curls.start_soon(run, ["curl", "-sSf", "-o", str(out), f"{url}/small.bin"])
                for out in outputs:
                    assert await trio.to_thread.run_sync(sha256_of, out) == small, out
            programs.cancel_scope.cancel()


# -- half-close -------------------------------------------------------------------------------


async def test_client_half_closes_first_and_reads_the_whole_reply() -> None:
    request = random_payload(3 * MiB)
    body = random_payload(5 * MiB)

    async def digest_then_body(tcp: trio.SocketStream) -> None:
        # Reads until the client's EOF has come through both proxies, then answers.
        got = await read_to_eof(tcp)
        await tcp.send_all(hashlib.sha256(got).digest() + body)
        await tcp.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as servers:
            target = await start_tcp_server(servers, digest_then_body)
            async with open_tunnel({"rpc": ("127.0.0.1", target)}, ["rpc"]) as tunnel:
                client = await tunnel.connect("rpc")
                await client.send_all(request)
                await client.send_eof()
                reply = await read_to_eof(client)
                await client.aclose()
            servers.cancel_scope.cancel()
    assert reply[:32] == hashlib.sha256(request).digest()
    assert reply[32:] == body


async def test_target_half_closes_first_and_still_reads_the_request() -> None:
    greeting = random_payload(4 * MiB)
    request = random_payload(3 * MiB)
    send_digest, receive_digest = trio.open_memory_channel[bytes](1)

    async def body_then_read(tcp: trio.SocketStream) -> None:
        await tcp.send_all(greeting)
        await tcp.send_eof()
        got = await read_to_eof(tcp)
        await send_digest.send(hashlib.sha256(got).digest())
        await tcp.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as servers:
            target = await start_tcp_server(servers, body_then_read)
            async with open_tunnel({"push": ("127.0.0.1", target)}, ["push"]) as tunnel:
                client = await tunnel.connect("push")
                # The target's EOF arrives while the other direction is still open.
                assert await read_to_eof(client) == greeting
                await client.send_all(request)
                await client.send_eof()
                digest = await receive_digest.receive()
                await client.aclose()
            servers.cancel_scope.cancel()
    assert digest == hashlib.sha256(request).digest()


def abort(tcp: trio.SocketStream) -> None:
    """Make the next close of *tcp* send a TCP reset."""
    tcp.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def reset_or_eof(tcp: trio.SocketStream) -> str:
    """Read until the connection ends; say whether it ended with a reset or an EOF."""
    try:
        async for _ in tcp:
            pass
    except trio.BrokenResourceError:
        return "reset"
    return "eof"


@pytest.mark.parametrize("who_resets", ["client", "target"])
async def test_a_tcp_reset_reaches_the_other_end_as_a_reset(who_resets: str) -> None:
    connected = trio.Event()
    target_saw: list[str] = []
    target_done = trio.Event()

    async def target_side(tcp: trio.SocketStream) -> None:
        assert await tcp.receive_some() == b"ping"
        connected.set()
        if who_resets == "target":
            abort(tcp)
            await tcp.aclose()
        else:
            target_saw.append(await reset_or_eof(tcp))
        target_done.set()

    with trio.fail_after(20):
        async with trio.open_nursery() as servers:
            target = await start_tcp_server(servers, target_side)
            async with open_tunnel({"rst": ("127.0.0.1", target)}, ["rst"]) as tunnel:
                client = await tunnel.connect("rst")
                await client.send_all(b"ping")
                await connected.wait()
                with trio.fail_after(PROMPT):
                    if who_resets == "client":
                        abort(client)
                        await client.aclose()
                        await target_done.wait()
                        assert target_saw == ["reset"]
                    else:
                        assert await reset_or_eof(client) == "reset"
                        await client.aclose()
            servers.cancel_scope.cancel()


# -- failures ---------------------------------------------------------------------------------


def proxy_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "devstream.proxy"]


async def echo_once(tunnel: Tunnel, name: str) -> None:
    """A full exchange through forward *name* to a live echo target works."""
    client = await tunnel.connect(name)
    await client.send_all(b"still serving")
    await client.send_eof()
    assert await read_to_eof(client) == b"still serving"
    await client.aclose()


async def echo(tcp: trio.SocketStream) -> None:
    async for chunk in tcp:
        await tcp.send_all(chunk)
    await tcp.aclose()


async def test_target_down_closes_the_connection_and_the_proxy_keeps_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="devstream.proxy")
    down = refused_port()
    with trio.fail_after(20):
        async with trio.open_nursery() as servers:
            live = await start_tcp_server(servers, echo)
            targets = {"down": ("127.0.0.1", down), "live": ("127.0.0.1", live)}
            async with open_tunnel(targets, ["down", "live"]) as tunnel:
                assert await closed_promptly(tunnel.ports["down"], PROMPT) == b""
                lines = proxy_log(caplog)
                assert any(
                    f"target 127.0.0.1:{down} unreachable: Connection refused" in m
                    and "502901" in m
                    for m in lines
                ), lines
                # The same proxies keep accepting, on the failed port and on the others.
                assert await closed_promptly(tunnel.ports["down"], PROMPT) == b""
                await echo_once(tunnel, "live")
            servers.cancel_scope.cancel()


async def test_device_offline_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="devstream.proxy")
    with trio.fail_after(20):
        async with open_tunnel({}, ["ssh"], device_online=False) as tunnel:
            assert await closed_promptly(tunnel.ports["ssh"], PROMPT) == b""
            lines = proxy_log(caplog)
            assert any("404103" in m and DEVICE_ID in m for m in lines), lines
            assert await closed_promptly(tunnel.ports["ssh"], PROMPT) == b""  # still listening


async def test_unregistered_name_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="devstream.proxy")
    with trio.fail_after(20):
        async with trio.open_nursery() as servers:
            live = await start_tcp_server(servers, echo)
            async with open_tunnel({"live": ("127.0.0.1", live)}, ["nope", "live"]) as tunnel:
                assert await closed_promptly(tunnel.ports["nope"], PROMPT) == b""
                lines = proxy_log(caplog)
                assert any("404901" in m and "'nope'" in m for m in lines), lines
                await echo_once(tunnel, "live")
            servers.cancel_scope.cancel()


# -- the command line -------------------------------------------------------------------------


async def test_cli_proxies_carry_curl(tmp_path: Path) -> None:
    require_tool("curl")
    site = tmp_path / "site"
    site.mkdir()
    expected = await trio.to_thread.run_sync(write_random_file, site / "file.bin", 8 * MiB)
    with trio.fail_after(30):
        async with trio.open_nursery() as programs:
            web = await start_http_server(programs, site)
            async with open_tunnel({}, [], device_online=False) as tunnel:
                device = await tunnel.service.get_device(DEVICE_ID)
                device_cs = str(tunnel.service.device_connection_string(device))
                service_cs = str(tunnel.service.connection_string)
                cli = [sys.executable, "-m", "devstream_trio.cli", "proxy"]
                env = {k: v for k, v in os.environ.items() if not k.startswith("DEVSTREAM_")}
                line, _ = await start_program(
                    programs,
                    [*cli, "device", "--map", f"web=127.0.0.1:{web}"],
                    ready="online",
                    env={**env, "DEVSTREAM_CONNECTION_STRING": device_cs},
                )
                assert f"web -> 127.0.0.1:{web}" in line
                line, _ = await start_program(
                    programs,
                    [*cli, "service", "--device", DEVICE_ID, "--forward", "127.0.0.1:0=web"],
                    ready="listening on",
                    env={**env, "DEVSTREAM_CONNECTION_STRING": service_cs},
                )
                # "listening on 127.0.0.1:PORT -> 'web' on device 'proxy-device'"
                port = int(line.split()[2].rsplit(":", 1)[1])
                out = tmp_path / "out.bin"
                await run(["curl", "-sSf", "-o", str(out), f"http://127.0.0.1:{port}/file.bin"])
                assert await trio.to_thread.run_sync(sha256_of, out) == expected
            programs.cancel_scope.cancel()
