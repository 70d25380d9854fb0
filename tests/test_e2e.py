"""End-to-end tests: a real hub on loopback sockets, real TLS, and an outside WebSocket client.

Test rules: loopback only (127.0.0.1), port 0 unless a test must reuse a port it was given;
no autojump clock here (real I/O), so every test body runs under ``trio.fail_after`` and waits
on events, never on time.
"""

from __future__ import annotations

import base64
import hashlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
import websockets.sync.client

from devstream_core.credentials import ConnectionString, make_sas_token
from devstream_core.registry import Policy
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import ServiceClient
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import DeviceDisabled, HubUnreachable
from devstream_trio.server.hub import Hub, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import client_ssl_context

from .conftest import random_payload

TIMEOUT = 30


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


def service_cs(hub: Hub, policy: Policy) -> ConnectionString:
    """The connection string of *policy* for a hub bound on loopback."""
    return ConnectionString(
        host_name=hub.host_name,
        shared_access_key_name=policy.name,
        shared_access_key=policy.primary_key,
        use_tls=hub.use_tls,
    )


async def start_hub(
    nursery: trio.Nursery,
    store: RegistryStore,
    *,
    port: int = 0,
    ssl_context: ssl.SSLContext | None = None,
) -> Hub:
    async def run(task_status: trio.TaskStatus[Hub]) -> None:
        await serve_hub(
            store, host="127.0.0.1", port=port, ssl_context=ssl_context, task_status=task_status
        )

    hub: Hub = await nursery.start(run)
    return hub


async def start_device(
    nursery: trio.Nursery, device: DeviceClient, handler: Callable[[HubStream], Awaitable[None]]
) -> None:
    async def run(task_status: trio.TaskStatus[None]) -> None:
        await device.serve({"echo": handler}, task_status=task_status)

    await nursery.start(run)


async def echo_round_trip(stream: HubStream, payload: bytes) -> bytes:
    """Send *payload* while reading the echo; return what came back."""
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        while len(received) < len(payload):
            chunk = await stream.receive_some()
            assert chunk, "stream ended before the whole echo arrived"
            received += chunk
    return bytes(received)


@pytest.fixture
async def store() -> AsyncIterator[RegistryStore]:
    async with await RegistryStore.open(None) as s:
        yield s


@pytest.fixture
def tls(tmp_path: Path) -> tuple[trustme.CA, ssl.SSLContext, str]:
    """A CA, a server context with a cert for 127.0.0.1/localhost, and the CA file's path."""
    ca = trustme.CA()
    server_cert = ca.issue_cert("127.0.0.1", "localhost")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_cert.configure_cert(server_context)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return ca, server_context, str(ca_file)


# -- plain TCP --------------------------------------------------------------------------------


async def test_echo_4mib_over_loopback(store: RegistryStore) -> None:
    with trio.fail_after(TIMEOUT):
        owner, _ = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, store)
            assert hub.public_url.startswith("http://127.0.0.1:")
            assert not hub.public_url.endswith(":0")
            service = ServiceClient(service_cs(hub, owner))
            device_cs = service.device_connection_string(await service.create_device("d1"))
            await start_device(nursery, DeviceClient(device_cs), echo)

            payload = random_payload(4 * 1024 * 1024)
            stream = await service.open_stream("d1", "echo")
            received = await echo_round_trip(stream, payload)
            assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
            await stream.send_eof()
            assert await stream.receive_some() == b""
            await stream.aclose()
            nursery.cancel_scope.cancel()


# -- TLS --------------------------------------------------------------------------------------


async def test_tls_echo_and_untrusted_client(
    store: RegistryStore, tls: tuple[trustme.CA, ssl.SSLContext, str]
) -> None:
    _, server_context, ca_file = tls
    client_context = client_ssl_context(ca_file)
    with trio.fail_after(TIMEOUT):
        owner, _ = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, store, ssl_context=server_context)
            assert hub.public_url.startswith("https://127.0.0.1:")
            cs = service_cs(hub, owner)
            assert cs.use_tls
            service = ServiceClient(cs, ssl_context=client_context)
            device_cs = service.device_connection_string(await service.create_device("d1"))
            await start_device(nursery, DeviceClient(device_cs, ssl_context=client_context), echo)

            stream = await service.open_stream("d1", "echo")
            payload = random_payload(200_000)
            assert await echo_round_trip(stream, payload) == payload
            await stream.aclose()

            # A client trusting another CA fails the handshake, with a message that says so.
            stranger = ServiceClient(cs, ssl_context=client_ssl_context(None))
            other_ca = trustme.CA()
            other_ca.configure_trust(stranger.ssl_context)
            with pytest.raises(HubUnreachable) as info:
                await stranger.list_devices()
            assert "TLS handshake" in info.value.message
            assert "failed" in info.value.message

            # The hub still serves the good client afterwards.
            stream = await service.open_stream("d1", "echo")
            assert await echo_round_trip(stream, b"still here") == b"still here"
            await stream.aclose()
            nursery.cancel_scope.cancel()


# -- an Azure-style service program written with `websockets` -----------------------------------


def initiate(
    base_url: str,
    token: str,
    device_id: str,
    name: str,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """POST the documented initiate request with the standard library; runs in a thread."""
    request = urllib.request.Request(
        f"{base_url}/twins/{device_id}/streams/{name}?api-version=2020-09-30",
        data=b"",
        method="POST",
        headers={
            "Authorization": token,
            "iothub-streaming-connect-timeout-in-seconds": "30",
            "iothub-streaming-response-timeout-in-seconds": "30",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT, context=context) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, b""
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()


def websockets_echo(
    url: str, token: str, messages: list[bytes], context: ssl.SSLContext | None = None
) -> tuple[list[bytes], Any]:
    """Join the stream with the ``websockets`` sync client and echo *messages*; in a thread."""
    options: dict[str, Any] = {"ssl": context} if context is not None else {}
    echoed: list[bytes] = []
    with websockets.sync.client.connect(
        url,
        additional_headers={"Authorization": f"Bearer {token}"},
        open_timeout=TIMEOUT,
        close_timeout=TIMEOUT,
        max_size=None,
        **options,
    ) as ws:
        for message in messages:
            ws.send(message)
            received = b""
            while len(received) < len(message):
                data = ws.recv(timeout=TIMEOUT)
                assert isinstance(data, bytes)
                received += data
            echoed.append(received)
        ws.close()
        return echoed, ws.close_code


async def azure_style_echo(
    hub: Hub, owner: Policy, context: ssl.SSLContext | None = None
) -> tuple[list[bytes], list[bytes], Any]:
    token = make_sas_token(
        resource=hub.host_name,
        key=owner.primary_key,
        expiry=int(time.time()) + 600,
        policy_name=owner.name,
    )
    status, headers, _ = await trio.to_thread.run_sync(
        initiate, hub.public_url, token, "d1", "echo", context
    )
    assert status == 200
    assert headers["iothub-streaming-is-accepted"] == "True"
    url = headers["iothub-streaming-url"]
    assert url.startswith("wss://" if hub.use_tls else "ws://")
    stream_token = headers["iothub-streaming-auth-token"]
    messages = [b"hello", random_payload(1000), random_payload(60_000), b"\x00bye"]
    echoed, close_code = await trio.to_thread.run_sync(
        websockets_echo, url, stream_token, messages, context
    )
    return messages, echoed, close_code


async def test_websockets_service_program(store: RegistryStore) -> None:
    with trio.fail_after(TIMEOUT):
        owner, _ = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, store)
            service = ServiceClient(service_cs(hub, owner))
            device_cs = service.device_connection_string(await service.create_device("d1"))
            closed = trio.Event()

            async def echo_then_note(stream: HubStream) -> None:
                await echo(stream)
                closed.set()

            await start_device(nursery, DeviceClient(device_cs), echo_then_note)
            messages, echoed, close_code = await azure_style_echo(hub, owner)
            assert echoed == messages
            assert close_code == 1000
            # The service's close reached the device as the end of its stream.
            await closed.wait()

            # A token signed with the wrong key gets the documented 401002 JSON error.
            bad = make_sas_token(
                resource=hub.host_name,
                key=base64.b64encode(b"not the owner's key, 32 bytes!!").decode(),
                expiry=int(time.time()) + 600,
                policy_name=owner.name,
            )
            status, _, body = await trio.to_thread.run_sync(
                initiate, hub.public_url, bad, "d1", "echo"
            )
            assert status == 401
            assert json.loads(body)["errorCode"] == 401002
            nursery.cancel_scope.cancel()


async def test_websockets_service_program_over_tls(
    store: RegistryStore, tls: tuple[trustme.CA, ssl.SSLContext, str]
) -> None:
    _, server_context, ca_file = tls
    client_context = client_ssl_context(ca_file)
    with trio.fail_after(TIMEOUT):
        owner, _ = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            hub = await start_hub(nursery, store, ssl_context=server_context)
            service = ServiceClient(service_cs(hub, owner), ssl_context=client_context)
            device_cs = service.device_connection_string(await service.create_device("d1"))
            await start_device(nursery, DeviceClient(device_cs, ssl_context=client_context), echo)
            messages, echoed, close_code = await azure_style_echo(hub, owner, client_context)
            assert echoed == messages
            assert close_code == 1000
            nursery.cancel_scope.cancel()


# -- persistence across a restart -------------------------------------------------------------


async def test_hub_restart_keeps_devices_keys_and_policies(tmp_path: Path) -> None:
    db = tmp_path / "registry.sqlite3"
    with trio.fail_after(TIMEOUT):
        # First run: create the owner policy and two devices, one of them disabled.
        async with await RegistryStore.open(db) as store:
            owner, created = await ensure_owner_policy(store)
            assert created
            async with trio.open_nursery() as nursery:
                hub = await start_hub(nursery, store)
                port = int(hub.host_name.rsplit(":", 1)[1])
                owner_cs = service_cs(hub, owner)
                service = ServiceClient(owner_cs)
                device_cs = service.device_connection_string(await service.create_device("d1"))
                off_cs = service.device_connection_string(await service.create_device("off"))
                await service.set_device_status("off", "disabled")
                nursery.cancel_scope.cancel()

        # Second run on the same file and the same port: nothing was forgotten.
        async with await RegistryStore.open(db) as store:
            owner_again, created = await ensure_owner_policy(store)
            assert not created
            assert owner_again == owner
            async with trio.open_nursery() as nursery:
                hub = await start_hub(nursery, store, port=port)
                assert service_cs(hub, owner_again) == owner_cs
                service = ServiceClient(owner_cs)
                listed = {d["deviceId"]: d["status"] for d in await service.list_devices()}
                assert listed == {"d1": "enabled", "off": "disabled"}

                await start_device(nursery, DeviceClient(str(device_cs)), echo)
                stream = await service.open_stream("d1", "echo")
                payload = random_payload(100_000)
                assert await echo_round_trip(stream, payload) == payload
                await stream.aclose()

                with pytest.raises(DeviceDisabled):
                    await DeviceClient(str(off_cs)).serve({"echo": echo})
                nursery.cancel_scope.cancel()
