"""One connection per stream on the service's side: the one-step open, and the Azure way.

``ServiceClient.open_stream`` opens a stream in one step: the initiate is a WebSocket upgrade
(``GET /twins/{id}/streams/{name}``) that the hub answers with ``101`` once the device accepted,
and that connection is the service's side of the stream. A hub that answers it ``405`` (one
without the one-step open) is asked the Azure way from then on: the initiate is a ``POST``
sent without ``Connection: close``; when the hub accepts and the stream's URL names the hub the
service already talks to, the service side's WebSocket opens on that same connection (one TCP
and TLS handshake per stream, not two). When the URL names another address, or the initiate
fails, the connection is closed and nothing else changes. Registry requests still use one
connection each.

Test rules: in-memory streams to the ``hub_env`` hub (or one like it) on the autojump clock,
under ``trio.fail_after``; an opener that records each connection's requests. No sockets.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing

from devstream_core.credentials import ConnectionString
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream
from devstream_trio.client.service import ServiceClient
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import DeviceNotOnline, StreamRejected
from devstream_trio.server.hub import Hub, HubConfig, ensure_owner_policy, load_or_create_secret
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import HubAddress

from .conftest import HubEnv

TIMEOUT = 60


class Recorded(trio.abc.Stream):
    """A client connection that keeps what the client sent and whether it closed."""

    def __init__(self, inner: trio.abc.Stream, address: HubAddress) -> None:
        self.inner = inner
        self.address = address
        self.sent = bytearray()
        self.closed = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return bytes(await self.inner.receive_some(max_bytes))

    async def send_eof(self) -> None:  # pragma: no cover - clients never half-close
        raise NotImplementedError

    async def aclose(self) -> None:
        self.closed = True
        await self.inner.aclose()

    def request_lines(self) -> list[str]:
        """The request line of every HTTP request sent on this connection."""
        lines = []
        for line in bytes(self.sent).split(b"\r\n"):
            if line.endswith(b" HTTP/1.1"):
                lines.append(line.decode("latin-1"))
        return lines


@dataclass
class Recorder:
    """An opener over ``hub.handle_connection`` that records every connection."""

    hub: Hub
    nursery: trio.Nursery
    connections: list[Recorded] = field(default_factory=list)

    async def __call__(self, address: HubAddress) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.hub.handle_connection, server)
        recorded = Recorded(client, address)
        self.connections.append(recorded)
        return recorded

    def with_request(self, prefix: str) -> list[Recorded]:
        return [c for c in self.connections if any(x.startswith(prefix) for x in c.request_lines())]


async def echo(stream: Any) -> None:
    async for data in stream:
        await stream.send_all(data)


async def start_echo_device(env: HubEnv, opener: Any, device_id: str = "d1") -> None:
    cs = await env.create_device(device_id)
    device = DeviceClient(cs, opener=opener)
    await env.nursery.start(device.serve, {"echo": echo})


async def round_trip(stream: Any, data: bytes) -> bytes:
    await stream.send_all(data)
    received = bytearray()
    while len(received) < len(data):
        chunk = await stream.receive_some()
        assert chunk
        received += chunk
    return bytes(received)


async def three_streams(
    env: HubEnv, mode: str, *, one_step: bool | None = None
) -> tuple[ServiceClient, Recorder, Recorder]:
    """Open, use and close three streams to an echo device; return the service client and
    the recorders of the service's and the device's connections."""
    devices = Recorder(env.hub, env.nursery)
    await start_echo_device(env, devices)
    services = Recorder(env.hub, env.nursery)
    service = ServiceClient(env.service_cs(), opener=services, nursery=env.nursery)
    service.one_step = one_step
    for _ in range(3):
        stream = await service.open_stream("d1", "echo", mode=mode)
        assert isinstance(stream, HubStream if mode == "raw" else FramedStream)
        assert await round_trip(stream, b"hello " * 1000) == b"hello " * 1000
        await stream.aclose()
    await trio.testing.wait_all_tasks_blocked()  # devstream.v1 closes in its own task
    return service, services, devices


@pytest.mark.parametrize("mode", ["raw", "devstream.v1"])
async def test_a_stream_opens_in_one_step(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, mode: str
) -> None:
    with trio.fail_after(TIMEOUT):
        service, services, devices = await three_streams(hub_env, mode)
        assert service.one_step is True
        # Three streams, three connections, one request each: the initiate that upgraded.
        assert len(services.connections) == 3
        for connection in services.connections:
            [opened] = connection.request_lines()
            assert opened.startswith("GET /twins/d1/streams/echo?api-version=")
            head = bytes(connection.sent).split(b"\r\n\r\n")[0].lower()
            assert b"upgrade: websocket" in head
            assert b"authorization: sharedaccesssignature " in head
            assert (b"sec-websocket-protocol: devstream.v1" in head) == (mode != "raw")
            assert connection.closed
        assert hub_env.hub.metrics.initiations["accepted"] == 3
        assert len(devices.with_request("GET /bridges/")) == 3


class WithoutOneStep(Recorder):
    """A hub as one without the one-step open answers it: ``405`` to ``GET /twins/...``."""

    async def __call__(self, address: HubAddress) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self._serve, server)
        recorded = Recorded(client, address)
        self.connections.append(recorded)
        return recorded

    async def _serve(self, server: trio.abc.Stream) -> None:
        first = await server.receive_some()
        if first.startswith(b"GET /twins/"):
            body = b'{"errorCode": 405901, "message": "method not allowed for this path"}'
            await server.send_all(
                b"HTTP/1.1 405 Method Not Allowed\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(body), body)
            )
            await server.aclose()
            return
        # Anything else goes to the real hub, the bytes already read first.
        inner, outer = trio.testing.memory_stream_pair()
        self.nursery.start_soon(self.hub.handle_connection, outer)
        await inner.send_all(first)

        async def pipe(a: trio.abc.Stream, b: trio.abc.Stream) -> None:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                while data := await a.receive_some():
                    await b.send_all(data)
            await trio.aclose_forcefully(b)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(pipe, server, inner)
            nursery.start_soon(pipe, inner, server)


async def test_a_hub_without_the_one_step_open_is_asked_the_azure_way(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        await start_echo_device(hub_env, hub_env.open)
        services = WithoutOneStep(hub_env.hub, hub_env.nursery)
        service = ServiceClient(hub_env.service_cs(), opener=services)
        for _ in range(2):
            stream = await service.open_stream("d1", "echo")
            assert await round_trip(stream, b"azure") == b"azure"
            await stream.aclose()
        assert service.one_step is False
        # Asked once in one step (refused), then POST + join on one connection per stream.
        lines = [c.request_lines() for c in services.connections]
        assert len(lines) == 3
        assert lines[0][0].startswith("GET /twins/d1/streams/echo?")
        for initiate, join in lines[1:]:
            assert initiate.startswith("POST /twins/d1/streams/echo?")
            assert join.startswith("GET /bridges/") and "role=service" in join


@pytest.mark.parametrize("mode", ["raw", "devstream.v1"])
async def test_the_service_joins_over_its_initiate_connection(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, mode: str
) -> None:
    with trio.fail_after(TIMEOUT):
        # The Azure way, as with a hub without the one-step open.
        _, services, devices = await three_streams(hub_env, mode, one_step=False)
        # Three streams, three connections: each carried an initiate, then the join.
        assert len(services.connections) == 3
        for connection in services.connections:
            initiate, join = connection.request_lines()
            assert initiate.startswith("POST /twins/d1/streams/echo?")
            assert join.startswith("GET /bridges/") and "role=service" in join
            assert connection.closed
        head = bytes(services.connections[0].sent).split(b"\r\n\r\n")[0].lower()
        assert b"connection: close" not in head
        # The device still joins on a connection of its own, one per stream.
        assert len(devices.with_request("GET /bridges/")) == 3


async def test_a_stream_url_for_another_address_gets_a_new_connection(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    # The hub says its streams are at wss://hub.test:8080; the service talks plain HTTP to
    # hub.test:8080: not the same address, so the join does not reuse the connection.
    with trio.fail_after(TIMEOUT):
        store = await RegistryStore.open(None)
        owner, _ = await ensure_owner_policy(store)
        hub = Hub(
            store,
            public_url="https://hub.test:8080",
            secret=await load_or_create_secret(store),
            config=HubConfig(),
        )
        await nursery.start(hub.run)
        env = HubEnv(hub=hub, store=store, owner=owner, nursery=nursery)
        await start_echo_device(env, Recorder(hub, nursery))
        services = Recorder(hub, nursery)
        cs = ConnectionString(
            host_name="hub.test:8080",
            shared_access_key_name=owner.name,
            shared_access_key=owner.primary_key,
            use_tls=False,
        )
        service = ServiceClient(cs, opener=services)
        service.one_step = False  # the Azure way, as with a hub without the one-step open
        stream = await service.open_stream("d1", "echo")
        assert await round_trip(stream, b"x" * 100) == b"x" * 100
        await stream.aclose()
        initiate, join = services.connections
        assert [line.split(" ")[0:2] for line in initiate.request_lines()] == [
            ["POST", "/twins/d1/streams/echo?api-version=2020-09-30"]
        ]
        assert initiate.closed
        assert not initiate.address.tls
        assert join.address.tls
        assert join.request_lines()[0].startswith("GET /bridges/")
        await store.aclose()


async def test_a_refused_initiate_closes_its_connection(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        await start_echo_device(hub_env, hub_env.open)
        await hub_env.create_device("d2")  # never online
        services = Recorder(hub_env.hub, hub_env.nursery)
        service = ServiceClient(hub_env.service_cs(), opener=services)
        with pytest.raises(StreamRejected):
            await service.open_stream("d1", "no-such-name")
        with pytest.raises(DeviceNotOnline):
            await service.open_stream("d2", "echo")
        assert len(services.connections) == 2
        for connection in services.connections:
            assert len(connection.request_lines()) == 1
            assert connection.closed
        # The service still works afterwards.
        stream = await service.open_stream("d1", "echo")
        assert await round_trip(stream, b"again") == b"again"
        await stream.aclose()


async def test_registry_requests_use_a_connection_each(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        services = Recorder(hub_env.hub, hub_env.nursery)
        service = ServiceClient(hub_env.service_cs(), opener=services)
        await service.create_device("d1")
        assert [d["deviceId"] for d in await service.list_devices()] == ["d1"]
        await service.delete_device("d1")
        assert len(services.connections) == 3
        for connection in services.connections:
            assert len(connection.request_lines()) == 1
            assert b"connection: close" in bytes(connection.sent).lower()
            assert connection.closed


async def test_requests_share_a_sas_token_until_half_its_lifetime(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Signing a SAS token costs about as much as the rest of a request's head: the service
    signs one, uses it for every request, and signs a new one once half its hour is gone (or
    when its clock turned back past the token's signing)."""
    now = [hub_env.hub.wall_clock()]
    hub_env.hub.wall_clock = lambda: now[0]
    services = Recorder(hub_env.hub, hub_env.nursery)
    service = ServiceClient(hub_env.service_cs(), opener=services, wall_clock=lambda: now[0])
    tokens: list[str] = []
    with trio.fail_after(TIMEOUT):
        for step in (0, 10, 1789, 2, -1000):
            now[0] += step
            assert await service.list_devices() == []
            head = bytes(services.connections[-1].sent).split(b"\r\n\r\n")[0].decode()
            [line] = [x for x in head.split("\r\n") if x.lower().startswith("authorization:")]
            tokens.append(line.split(":", 1)[1].strip())
    signed = [int(token.rsplit("se=", 1)[1].split("&")[0]) for token in tokens]
    assert tokens[0] == tokens[1] == tokens[2]  # 1,799 s in: still the first token
    assert tokens[3] != tokens[2] and signed[3] == int(now[0] + 1000) + 3600
    assert tokens[4] != tokens[3] and signed[4] == int(now[0]) + 3600
