"""A hub behind a relay (``--public-url``) and the command-line hub serving TLS.

A hub that sits behind a load balancer or relay is told the address clients use; connection
strings, the SAS resource it checks and the stream URLs it hands out all name that address,
never the socket it listens on. These tests put a small TCP forwarder of their own in front of
a real hub and check that every connection goes through it.

Test rules: loopback only (127.0.0.1), port 0; real I/O, so every test body runs under
``trio.fail_after`` and waits on events and output lines, never on time. Child processes are
killed in ``finally``.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
import trustme

from devstream_core.credentials import ConnectionString, make_sas_token
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import ServiceClient
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import Unauthorized
from devstream_trio.server.hub import Hub, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.http import http_request

from ._helpers import one_error_line, policy_cs, run_cli, start_child
from .conftest import random_payload

TIMEOUT = 30
CS_ENV = "DEVSTREAM_CONNECTION_STRING"
CA_ENV = "DEVSTREAM_CA_FILE"
#: How much of each direction of a relayed connection the forwarder keeps for the test.
RECORD_LIMIT = 16 * 1024


# -- the forwarder ----------------------------------------------------------------------------


@dataclass
class Relayed:
    """One connection the forwarder carried: the first bytes of each direction."""

    request: bytearray = field(default_factory=bytearray)
    response: bytearray = field(default_factory=bytearray)

    @property
    def request_line(self) -> str:
        return self.request.split(b"\r\n", 1)[0].decode()

    def header(self, which: bytearray, name: str) -> str | None:
        head = bytes(which).split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name:
                return value.strip()
        return None


@dataclass
class Relay:
    """A TCP forwarder on 127.0.0.1 that pipes every connection to the hub's real port."""

    listener: trio.SocketListener
    port: int
    target_port: int = 0
    connections: list[Relayed] = field(default_factory=list)

    def request_lines(self) -> list[str]:
        return [c.request_line for c in self.connections]

    def find(self, prefix: str) -> Relayed:
        matches = [c for c in self.connections if c.request_line.startswith(prefix)]
        assert len(matches) == 1, (prefix, self.request_lines())
        return matches[0]

    async def handle(self, client: trio.SocketStream) -> None:
        relayed = Relayed()
        self.connections.append(relayed)
        async with client:
            upstream = await trio.open_tcp_stream("127.0.0.1", self.target_port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream, relayed.request, nursery.cancel_scope)
                nursery.start_soon(pump, upstream, client, relayed.response, nursery.cancel_scope)


async def pump(
    source: trio.SocketStream,
    sink: trio.SocketStream,
    record: bytearray,
    scope: trio.CancelScope,
) -> None:
    """Copy *source* to *sink* (passing EOF on); a broken side ends the whole connection."""
    try:
        async for chunk in source:
            if len(record) < RECORD_LIMIT:
                record += chunk[: RECORD_LIMIT - len(record)]
            await sink.send_all(chunk)
        await sink.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


@asynccontextmanager
async def relayed_hub(store: RegistryStore) -> AsyncIterator[tuple[Hub, Relay]]:
    """A hub on 127.0.0.1:0 whose public URL is a forwarder bound first on 127.0.0.1:0."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    relay = Relay(listener=listeners[0], port=listeners[0].socket.getsockname()[1])
    async with trio.open_nursery() as nursery:

        async def run(task_status: trio.TaskStatus[Hub]) -> None:
            await serve_hub(
                store,
                host="127.0.0.1",
                port=0,
                public_url=f"http://127.0.0.1:{relay.port}",
                task_status=task_status,
            )

        hub: Hub = await nursery.start(run)
        assert hub.listen_address is not None
        relay.target_port = hub.listen_address[1]
        await nursery.start(trio.serve_listeners, relay.handle, listeners)
        yield hub, relay
        nursery.cancel_scope.cancel()


@pytest.fixture
async def store() -> AsyncIterator[RegistryStore]:
    async with await RegistryStore.open(None) as s:
        yield s


async def raw_request(port: int, target: str, token: str, method: str = "GET") -> tuple[int, bytes]:
    """One HTTP request with a hand-made Authorization header to 127.0.0.1:*port*."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        response = await http_request(
            stream,
            method=method,
            host=f"127.0.0.1:{port}",
            target=target,
            headers=[("authorization", token)],
            body=b"" if method == "POST" else None,
        )
    return response.status, response.body


# -- --public-url behind a forwarder ----------------------------------------------------------


async def test_everything_flows_through_the_public_address(store: RegistryStore) -> None:
    with trio.fail_after(TIMEOUT):
        owner, _ = await ensure_owner_policy(store)
        async with relayed_hub(store) as (hub, relay), trio.open_nursery() as nursery:
            assert relay.target_port != relay.port
            assert hub.public_url == f"http://127.0.0.1:{relay.port}"
            assert hub.host_name == f"127.0.0.1:{relay.port}"

            service = ServiceClient(policy_cs(f"127.0.0.1:{relay.port}", owner))
            device_cs = service.device_connection_string(await service.create_device("d1"))
            assert device_cs.host_name == f"127.0.0.1:{relay.port}"
            assert not device_cs.use_tls
            device = DeviceClient(device_cs)

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                await device.serve({"echo": echo}, task_status=task_status)

            await nursery.start(serve)
            stream = await service.open_stream("d1", "echo")
            payload = random_payload(300_000)
            received = bytearray()
            async with trio.open_nursery() as io:
                io.start_soon(stream.send_all, payload)
                while len(received) < len(payload):
                    chunk = await stream.receive_some()
                    assert chunk, "stream ended before the whole echo arrived"
                    received += chunk
            assert received == payload
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()

            # Registry API, control channel, the service's one-step open and the device's join
            # all came through the relay; the one-step answer names the public address.
            lines = relay.request_lines()
            assert len(lines) == 4, lines
            relay.find("PUT /devices/d1 ")
            control = relay.find("GET /devices/d1/streams ")
            opened = relay.find("GET /twins/d1/streams/echo?")
            assert opened.response.startswith(b"HTTP/1.1 101 ")
            url = opened.header(opened.response, "iothub-streaming-url")
            assert url is not None
            match = re.fullmatch(
                rf"ws://127\.0\.0\.1:{relay.port}/bridges/([^?]+)\?role=service", url
            )
            assert match, url
            stream_id = match.group(1)
            device_join = relay.find(f"GET /bridges/{stream_id}?role=device ")
            for relayed in (control, opened, device_join):
                assert relayed.header(relayed.request, "host") == f"127.0.0.1:{relay.port}"
            assert device_join.response.startswith(b"HTTP/1.1 101 ")
            nursery.cancel_scope.cancel()


async def test_sas_for_the_listen_address_is_refused(store: RegistryStore) -> None:
    with trio.fail_after(TIMEOUT):
        owner, _ = await ensure_owner_policy(store)
        async with relayed_hub(store) as (hub, relay):
            real = f"127.0.0.1:{relay.target_port}"
            public = f"127.0.0.1:{relay.port}"
            service = ServiceClient(policy_cs(f"127.0.0.1:{relay.port}", owner))
            device_cs = service.device_connection_string(await service.create_device("d1"))

            def token(resource: str) -> str:
                expiry = int(time.time()) + 600
                return make_sas_token(
                    resource=resource, key=owner.primary_key, expiry=expiry, policy_name=owner.name
                )

            # Through the relay: signed for the public host it passes; for the listen address
            # it is refused, on the registry API and on initiate alike.
            assert (await raw_request(relay.port, "/devices", token(public)))[0] == 200
            for method, target in [
                ("GET", "/devices"),
                ("POST", "/twins/d1/streams/echo?api-version=2020-09-30"),
            ]:
                status, body = await raw_request(relay.port, target, token(real), method)
                assert status == 401, (method, target)
                assert json.loads(body)["errorCode"] == 401002

            # A client configured with the listen address reaches the hub but is refused too.
            direct = policy_cs(real, owner)
            with pytest.raises(Unauthorized) as info:
                await ServiceClient(direct).list_devices()
            assert info.value.code == 401002
            direct_device = ConnectionString(
                host_name=real,
                device_id="d1",
                shared_access_key=device_cs.shared_access_key,
                use_tls=False,
            )
            with pytest.raises(Unauthorized) as info:
                await DeviceClient(direct_device).serve({"echo": echo})
            assert info.value.code == 401002
            assert hub.host_name == public


# -- the command line -------------------------------------------------------------------------


async def test_cli_hub_public_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "data"
    argv = ["hub", "--data", str(data), "--listen", "127.0.0.1:0"]
    argv += ["--public-url", "https://hub.example.com"]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            process, out = await start_child(nursery, argv)
            try:
                listening = await out.until("clients reach it at")
                assert listening.endswith("clients reach it at https://hub.example.com")
                port = int(listening.split("listening on 127.0.0.1:", 1)[1].split(";", 1)[0])
                assert port != 0
                cs_text = await out.until("HostName=")
                assert cs_text.startswith("HostName=hub.example.com;")
                assert "UseTls=false" not in cs_text
                cs = ConnectionString.parse(cs_text)
                assert cs.use_tls

                # The hub listening on `port` checks SAS tokens against the public host.
                assert cs.shared_access_key_name is not None
                expiry = int(time.time()) + 600
                for resource, expected in [("hub.example.com", 200), (f"127.0.0.1:{port}", 401)]:
                    token = make_sas_token(
                        resource=resource,
                        key=cs.shared_access_key,
                        expiry=expiry,
                        policy_name=cs.shared_access_key_name,
                    )
                    status, body = await raw_request(port, "/devices", token)
                    assert status == expected, (resource, body)
            finally:
                process.kill()

    assert await run_cli(["connection-string", "--data", str(data)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == cs_text
    assert captured.err == ""


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(cert.pem, key.pem, ca.pem): a certificate for 127.0.0.1 issued by a fresh CA."""
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1", "localhost")
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    return cert, key, ca_file


async def test_cli_hub_with_tls(
    tmp_path: Path, tls_files: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key, ca_file = tls_files
    argv = ["hub", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    argv += ["--tls-cert", str(cert), "--tls-key", str(key)]
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            hub, hub_out = await start_child(nursery, argv)
            device_process: trio.Process | None = None
            try:
                listening = await hub_out.until("clients reach it at")
                url = listening.rsplit(" ", 1)[1]
                assert url.startswith("https://127.0.0.1:")
                assert not url.endswith(":0")
                owner_cs = await hub_out.until("HostName=")
                assert "UseTls=false" not in owner_cs
                assert ConnectionString.parse(owner_cs).host_name == url.removeprefix("https://")

                create = ["device", "create", "d1", "--connection-string", owner_cs]
                assert await run_cli([*create, "--ca-file", str(ca_file)]) == 0
                captured = capsys.readouterr()
                assert captured.err == ""
                device_cs = ConnectionString.parse(captured.out.strip())
                assert device_cs.device_id == "d1"
                assert device_cs.use_tls

                # The device's key and CA file travel in the environment.
                env = dict(os.environ, **{CS_ENV: str(device_cs), CA_ENV: str(ca_file)})
                device_process, device_out = await start_child(nursery, ["echo", "device"], env=env)
                assert "'d1'" in await device_out.until("online")

                ask = ["echo", "service", "--device", "d1", "--message", "hi"]
                ask += ["--connection-string", owner_cs]
                assert await run_cli([*ask, "--ca-file", str(ca_file)]) == 0
                captured = capsys.readouterr()
                assert captured.out.splitlines()[0] == "received: hi"
                assert captured.err == ""

                # Without the CA file the hub's certificate is not trusted.
                assert await run_cli(ask) == 1
                captured = capsys.readouterr()
                assert captured.out == ""
                line = one_error_line(captured.err)
                assert "TLS handshake" in line
                assert ConnectionString.parse(owner_cs).shared_access_key not in line
            finally:
                hub.kill()
                if device_process is not None:
                    device_process.kill()
