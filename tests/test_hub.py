"""The hub end to end on in-memory streams: handshake, Azure-compatible initiate, registry,
health and metrics, the raw data plane, and devices disabled or deleted while connected.

Test rules: no sockets (every client reaches the hub through ``hub_env.open``), everything
that waits runs on ``autojump_clock``, and every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
import trio

from devstream_core import control
from devstream_core.credentials import ConnectionString
from devstream_core.registry import Permission, new_policy
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import API_VERSION
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import DeviceDisabled, DeviceNotFound, HubError
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpResponse, http_request, websocket_connect
from devstream_trio.transport.websocket import ConnectionClosed, WebSocket, payload

from .conftest import PUBLIC_URL, HubEnv

HUB = HubAddress.from_url(PUBLIC_URL)


# -- helpers ---------------------------------------------------------------------------------


def auth(env: HubEnv, cs: ConnectionString | None = None) -> tuple[str, str]:
    """An Authorization header for *cs* (the owner policy by default), valid for an hour."""
    cs = cs or env.service_cs()
    return ("authorization", cs.sas_token(expiry=int(env.hub.wall_clock()) + 3600))


async def call(
    env: HubEnv,
    method: str,
    target: str,
    *,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
) -> HttpResponse:
    """One raw HTTP request to the hub."""
    stream = await env.open(HUB)
    try:
        return await http_request(
            stream, method=method, host=HUB.host_header, target=target, headers=headers, body=body
        )
    finally:
        await trio.aclose_forcefully(stream)


async def initiate(
    env: HubEnv, device_id: str, name: str, *, headers: Sequence[tuple[str, str]] = ()
) -> HttpResponse:
    """The Azure initiate request, as Azure's service SDK sends it."""
    return await call(
        env,
        "POST",
        f"/twins/{device_id}/streams/{name}?api-version={API_VERSION}",
        headers=[auth(env), *headers],
        body=b"",
    )


def error_code(response: HttpResponse) -> int:
    value = json.loads(response.body)
    assert isinstance(value["message"], str) and value["message"]
    return int(value["errorCode"])


async def join_raw(
    env: HubEnv, url: str, token: str, subprotocols: Sequence[str] = ()
) -> WebSocket:
    """Open a plain WebSocket to a streaming-endpoint URL with a bearer token."""
    parts = urllib.parse.urlsplit(url)
    address = HubAddress.from_url(url)
    stream = await env.open(address)
    return await websocket_connect(
        stream,
        host=address.host_header,
        target=f"{parts.path}?{parts.query}" if parts.query else parts.path,
        headers=[("authorization", f"Bearer {token}")],
        subprotocols=subprotocols,
    )


async def receive_message(ws: WebSocket) -> bytes:
    """One whole WebSocket message, reassembled from its fragments."""
    data = bytearray()
    while True:
        event = await ws.receive()
        chunk = payload(event)
        data += chunk.encode() if isinstance(chunk, str) else chunk
        if event.message_finished:
            return bytes(data)


@dataclass
class ManualDevice:
    """A device that speaks the control channel by hand, so a test decides every answer."""

    ws: WebSocket
    device_id: str
    machine: control.DeviceControl = field(default_factory=control.DeviceControl)
    inbox: deque[control.ControlMessage] = field(default_factory=deque)

    @classmethod
    async def connect(
        cls, env: HubEnv, cs: ConnectionString, names: Sequence[str] = ("echo",)
    ) -> ManualDevice:
        assert cs.device_id is not None
        ws = await websocket_connect(
            await env.open(HUB),
            host=HUB.host_header,
            target=f"/devices/{cs.device_id}/streams",
            headers=[auth(env, cs)],
            subprotocols=[control.CONTROL_SUBPROTOCOL],
        )
        assert ws.subprotocol == control.CONTROL_SUBPROTOCOL
        device = cls(ws, cs.device_id)
        await device.send(control.Register(names=tuple(names)))
        registered = await device.next_message()
        assert registered == control.Registered(names=tuple(names))
        return device

    async def send(self, message: control.ControlMessage) -> None:
        await self.ws.send_text(self.machine.send(message))

    async def next_message(self) -> control.ControlMessage:
        while not self.inbox:
            event = await self.ws.receive()
            self.inbox.extend(
                self.machine.receive(payload(event), message_finished=event.message_finished)
            )
        return self.inbox.popleft()

    async def next_request(self) -> control.StreamRequest:
        message = await self.next_message()
        assert isinstance(message, control.StreamRequest), message
        return message


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def start_echo_device(env: HubEnv, device_id: str = "d1") -> None:
    cs = await env.create_device(device_id)
    await env.nursery.start(env.device(cs).serve, {"echo": echo})


async def read_exactly(stream: HubStream, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = await stream.receive_some()
        assert chunk, f"stream ended after {len(data)} of {size} bytes"
        data += chunk
    return bytes(data)


async def metrics(env: HubEnv) -> dict[str, float]:
    response = await call(env, "GET", "/metrics")
    assert response.status == 200
    assert (response.header(b"content-type") or b"").startswith(b"text/plain")
    values: dict[str, float] = {}
    for line in response.body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


# -- the handshake ---------------------------------------------------------------------------


async def test_stream_carries_bytes_both_ways(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    seen: list[tuple[str, bytes]] = []

    async def greet(stream: HubStream) -> None:
        request = await read_exactly(stream, 5)
        seen.append((stream.name, request))
        await stream.send_all(b"device says " + request[::-1])

    cs = await hub_env.create_device("d1")
    await hub_env.nursery.start(hub_env.device(cs).serve, {"greet": greet})
    with trio.fail_after(10):
        stream = await hub_env.service().open_stream("d1", "greet")
        await stream.send_all(b"hello")
        assert await read_exactly(stream, 17) == b"device says olleh"
        # The handler returned: its side closed normally, so ours reads EOF.
        assert await stream.receive_some() == b""
        await stream.aclose()
    assert seen == [("greet", b"hello")]


async def test_service_close_ends_the_device_side(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    ended = trio.Event()
    received = bytearray()

    async def sink(stream: HubStream) -> None:
        async for data in stream:
            received.extend(data)
        ended.set()

    cs = await hub_env.create_device("d1")
    await hub_env.nursery.start(hub_env.device(cs).serve, {"sink": sink})
    with trio.fail_after(10):
        stream = await hub_env.service().open_stream("d1", "sink")
        await stream.send_all(b"x" * 100_000)
        await stream.aclose()
        await ended.wait()
    assert bytes(received) == b"x" * 100_000


async def test_fifty_concurrent_streams_keep_their_own_data(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_echo_device(hub_env)
    service = hub_env.service()
    count = 50
    echoed: dict[int, bytes] = {}
    all_echoed = trio.Event()
    release = trio.Event()
    open_during: list[float] = []

    async def one(index: int) -> None:
        stream = await service.open_stream("d1", "echo")
        data = f"stream {index:02d}|".encode() * (index + 1) + os.urandom(1000 + index)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, data)
            echoed[index] = await read_exactly(stream, len(data))
        assert echoed[index] == data, f"stream {index} got someone else's bytes"
        if len(echoed) == count:
            all_echoed.set()
        await release.wait()
        await stream.aclose()

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for index in range(count):
                nursery.start_soon(one, index)
            await all_echoed.wait()
            open_during.append((await metrics(hub_env))["devstream_streams_open"])
            release.set()
    assert sorted(echoed) == list(range(count))
    assert open_during == [count]


# -- the Azure-compatible initiate API -------------------------------------------------------


async def test_initiate_accepted_answers_like_azure(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_echo_device(hub_env)
    with trio.fail_after(10):
        response = await initiate(hub_env, "d1", "echo")
        assert response.status == 200
        assert response.header(b"iothub-streaming-is-accepted") == b"True"
        url = (response.header(b"iothub-streaming-url") or b"").decode()
        token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
        assert url.startswith("ws://hub.test:8080/bridges/")
        assert token
        # An Azure-style client: a plain WebSocket with the bearer token, raw binary messages.
        ws = await join_raw(hub_env, url, token)
        await ws.send_bytes(b"ping through azure api")
        assert await receive_message(ws) == b"ping through azure api"
        await ws.aclose()


async def test_initiate_rejected_answers_200_with_is_accepted_false(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("d1"))

    async def refuse() -> None:
        request = await device.next_request()
        assert request.name == "echo"
        await device.send(request.reject("busy with firmware update"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            response = await initiate(hub_env, "d1", "echo")
    assert response.status == 200
    assert response.header(b"iothub-streaming-is-accepted") == b"False"
    assert response.header(b"iothub-streaming-url") is None
    assert response.header(b"iothub-streaming-auth-token") is None
    body = json.loads(response.body)
    assert body == {"errorCode": 403903, "message": "busy with firmware update"}


@pytest.mark.parametrize(("header", "expected"), [(None, 60.0), ("5", 5.0), ("1", 1.0)])
async def test_initiate_response_timeout_header_is_honoured(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, header: str | None, expected: float
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("d1"))
    headers = [] if header is None else [("iothub-streaming-response-timeout-in-seconds", header)]
    with trio.fail_after(expected + 10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.next_request)  # reads the request, never answers
            start = trio.current_time()
            response = await initiate(hub_env, "d1", "echo", headers=headers)
            elapsed = trio.current_time() - start
    assert response.status == 504
    assert error_code(response) == 504101
    assert expected <= elapsed < expected + 0.5


@pytest.mark.parametrize(
    "name",
    [
        "iothub-streaming-response-timeout-in-seconds",
        "iothub-streaming-connect-timeout-in-seconds",
    ],
)
@pytest.mark.parametrize("value", ["abc", "0", "-5", "2.5", "99999", ""])
async def test_initiate_invalid_timeout_header(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, name: str, value: str
) -> None:
    await start_echo_device(hub_env)
    with trio.fail_after(10):
        response = await initiate(hub_env, "d1", "echo", headers=[(name, value)])
    assert response.status == 400
    assert error_code(response) == 400004
    assert name in json.loads(response.body)["message"]


async def test_initiate_accepts_any_sas_field_order_and_api_version(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_echo_device(hub_env)
    _, token = auth(hub_env)
    fields = token.removeprefix("SharedAccessSignature ").split("&")
    shuffled = "SharedAccessSignature " + "&".join(reversed(fields))
    with trio.fail_after(10):
        response = await call(
            hub_env,
            "POST",
            "/twins/d1/streams/echo?api-version=2019-05-01-preview",
            headers=[("authorization", shuffled)],
            body=b"",
        )
    assert response.status == 200
    assert response.header(b"iothub-streaming-is-accepted") == b"True"


# -- the registry ----------------------------------------------------------------------------


async def test_registry_put_get_list_delete(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        created = await call(
            hub_env,
            "PUT",
            "/devices/sensor-7",
            headers=[auth(hub_env), ("content-type", "application/json")],
            body=json.dumps({"deviceId": "sensor-7"}).encode(),
        )
        assert created.status == 200
        device = json.loads(created.body)
        assert device["deviceId"] == "sensor-7"
        assert device["status"] == "enabled"
        assert device["connectionState"] == "Disconnected"
        assert device["authentication"]["type"] == "sas"
        keys = device["authentication"]["symmetricKey"]
        assert keys["primaryKey"] and keys["secondaryKey"]
        assert {"generationId", "etag", "statusReason", "capabilities", "lastActivityTime"} <= set(
            device
        )

        fetched = await call(hub_env, "GET", "/devices/sensor-7", headers=[auth(hub_env)])
        assert fetched.status == 200
        assert json.loads(fetched.body) == device

        # Online: the registry says Connected, in the item and in the list.
        cs = hub_env.service().device_connection_string(device)
        served = trio.CancelScope()

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with served:
                await hub_env.device(cs).serve({"echo": echo}, task_status=task_status)

        await hub_env.nursery.start(serve)
        fetched = await call(hub_env, "GET", "/devices/sensor-7", headers=[auth(hub_env)])
        assert json.loads(fetched.body)["connectionState"] == "Connected"
        listed = await call(hub_env, "GET", "/devices", headers=[auth(hub_env)])
        assert listed.status == 200
        entries = json.loads(listed.body)
        assert [d["deviceId"] for d in entries] == ["sensor-7"]
        assert entries[0]["connectionState"] == "Connected"
        served.cancel()
        while (
            json.loads(
                (await call(hub_env, "GET", "/devices/sensor-7", headers=[auth(hub_env)])).body
            )["connectionState"]
            != "Disconnected"
        ):
            await trio.sleep(0.1)

        # An existing id without If-Match is a conflict; with it, an update.
        again = await call(
            hub_env,
            "PUT",
            "/devices/sensor-7",
            headers=[auth(hub_env)],
            body=json.dumps({"deviceId": "sensor-7", "status": "disabled"}).encode(),
        )
        assert again.status == 409
        assert error_code(again) == 409001
        updated = await call(
            hub_env,
            "PUT",
            "/devices/sensor-7",
            headers=[auth(hub_env), ("if-match", "*")],
            body=json.dumps({"deviceId": "sensor-7", "status": "disabled"}).encode(),
        )
        assert updated.status == 200
        assert json.loads(updated.body)["status"] == "disabled"
        assert json.loads(updated.body)["authentication"] == device["authentication"]

        deleted = await call(hub_env, "DELETE", "/devices/sensor-7", headers=[auth(hub_env)])
        assert deleted.status == 204
        gone = await call(hub_env, "GET", "/devices/sensor-7", headers=[auth(hub_env)])
        assert gone.status == 404
        assert error_code(gone) == 404001
        again_deleted = await call(hub_env, "DELETE", "/devices/sensor-7", headers=[auth(hub_env)])
        assert error_code(again_deleted) == 404001
        listed = await call(hub_env, "GET", "/devices", headers=[auth(hub_env)])
        assert json.loads(listed.body) == []


async def test_put_with_if_match_updates_only_the_current_version(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    async def put(device_id: str, if_match: str | None, status: str) -> HttpResponse:
        headers = [auth(hub_env)] + ([("if-match", if_match)] if if_match is not None else [])
        body = json.dumps({"deviceId": device_id, "status": status}).encode()
        return await call(hub_env, "PUT", f"/devices/{device_id}", headers=headers, body=body)

    with trio.fail_after(10):
        created = await put("sensor-8", None, "enabled")
        assert created.status == 200
        first = json.loads(created.body)["etag"]

        # The current etag, quoted as HTTP writes it: an update, with a new etag.
        updated = await put("sensor-8", f'"{first}"', "disabled")
        assert updated.status == 200
        second = json.loads(updated.body)["etag"]
        assert second != first
        assert json.loads(updated.body)["status"] == "disabled"

        # The etag it had before: 412002, and nothing changes.
        stale = await put("sensor-8", f'"{first}"', "enabled")
        assert stale.status == 412
        assert error_code(stale) == 412002
        fetched = json.loads(
            (await call(hub_env, "GET", "/devices/sensor-8", headers=[auth(hub_env)])).body
        )
        assert (fetched["status"], fetched["etag"]) == ("disabled", second)

        # "*" or an etag on an id that does not exist: 404001, and no device is created.
        for if_match in ("*", f'"{second}"'):
            missing = await put("sensor-9", if_match, "enabled")
            assert missing.status == 404
            assert error_code(missing) == 404001
        gone = await call(hub_env, "GET", "/devices/sensor-9", headers=[auth(hub_env)])
        assert error_code(gone) == 404001
        listed = await call(hub_env, "GET", "/devices", headers=[auth(hub_env)])
        assert [d["deviceId"] for d in json.loads(listed.body)] == ["sensor-8"]


async def test_policy_permissions_are_enforced(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_echo_device(hub_env)
    reader = new_policy(
        name="reader", random_bytes=os.urandom(64), permissions=Permission.REGISTRY_READ
    )
    await hub_env.store.put_policy(reader)
    reader_auth = auth(hub_env, hub_env.service_cs(reader))
    with trio.fail_after(10):
        listed = await call(hub_env, "GET", "/devices", headers=[reader_auth])
        assert listed.status == 200
        assert [d["deviceId"] for d in json.loads(listed.body)] == ["d1"]
        assert (await call(hub_env, "GET", "/devices/d1", headers=[reader_auth])).status == 200
        put = await call(
            hub_env, "PUT", "/devices/d2", headers=[reader_auth], body=b'{"deviceId": "d2"}'
        )
        assert put.status == 403
        assert error_code(put) == 403901
        delete = await call(hub_env, "DELETE", "/devices/d1", headers=[reader_auth])
        assert error_code(delete) == 403901
        started = await call(
            hub_env,
            "POST",
            f"/twins/d1/streams/echo?api-version={API_VERSION}",
            headers=[reader_auth],
            body=b"",
        )
        assert started.status == 403
        assert error_code(started) == 403901
        # Nothing was written.
        assert await hub_env.store.get_device("d2") is None
        assert await hub_env.store.get_device("d1") is not None


# -- health and metrics ----------------------------------------------------------------------


async def test_healthz(hub_env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10):
        response = await call(hub_env, "GET", "/healthz")
    assert response.status == 200
    assert json.loads(response.body) == {"status": "ok"}


async def test_metrics_move_with_what_happens(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    def outcome(values: dict[str, float], name: str) -> float:
        return values.get(f'devstream_initiations_total{{outcome="{name}"}}', 0.0)

    with trio.fail_after(60):
        before = await metrics(hub_env)
        assert before["devstream_devices_online"] == 0
        assert before["devstream_streams_open"] == 0
        assert before["devstream_relayed_bytes_total"] == 0

        await start_echo_device(hub_env, "d1")
        await hub_env.create_device("offline")
        manual = await ManualDevice.connect(hub_env, await hub_env.create_device("m1"))
        values = await metrics(hub_env)
        assert values["devstream_devices_online"] == 2

        # accepted, with bytes relayed both ways
        stream = await hub_env.service().open_stream("d1", "echo")
        data = os.urandom(50_000)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, data)
            assert await read_exactly(stream, len(data)) == data
        values = await metrics(hub_env)
        assert values["devstream_streams_open"] == 1
        assert outcome(values, "accepted") == 1
        assert values["devstream_relayed_bytes_total"] >= 2 * len(data)
        await stream.aclose()
        while (await metrics(hub_env))["devstream_streams_open"] != 0:
            await trio.sleep(0.1)

        # rejected by the device, timed out, not online, not found, name not registered
        async def answer_then_ignore() -> None:
            request = await manual.next_request()
            await manual.send(request.reject("no"))
            await manual.next_request()  # never answered

        async with trio.open_nursery() as nursery:
            nursery.start_soon(answer_then_ignore)
            assert (await initiate(hub_env, "m1", "echo")).header(
                b"iothub-streaming-is-accepted"
            ) == b"False"
            timeout = [("iothub-streaming-response-timeout-in-seconds", "2")]
            assert error_code(await initiate(hub_env, "m1", "echo", headers=timeout)) == 504101
        assert error_code(await initiate(hub_env, "offline", "echo")) == 404103
        assert error_code(await initiate(hub_env, "ghost", "echo")) == 404001
        unregistered = await initiate(hub_env, "d1", "ssh")
        assert error_code(unregistered) == 404901

        values = await metrics(hub_env)
        assert outcome(values, "accepted") == 1
        assert outcome(values, "rejected") == 1
        assert outcome(values, "timeout") == 1
        assert outcome(values, "device_not_online") == 1
        assert outcome(values, "device_not_found") == 1
        assert outcome(values, "name_not_registered") == 1
        assert values["devstream_streams_total"] == 1

        await manual.ws.aclose()
        while (await metrics(hub_env))["devstream_devices_online"] != 1:
            await trio.sleep(0.1)


# -- the raw data plane ----------------------------------------------------------------------


async def _raw_pair(
    env: HubEnv, service_subprotocols: Sequence[str] = (), device_subprotocols: Sequence[str] = ()
) -> tuple[WebSocket, WebSocket]:
    """A stream whose two sides are plain WebSockets: (device side, service side)."""
    device = await ManualDevice.connect(env, await env.create_device("raw"))
    sides: dict[str, WebSocket] = {}

    async def device_side() -> None:
        request = await device.next_request()
        assert request.url.startswith("ws://hub.test:8080/bridges/")
        await device.send(request.accept())
        sides["device"] = await join_raw(env, request.url, request.token, device_subprotocols)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_side)
        response = await initiate(env, "raw", "echo")
        assert response.header(b"iothub-streaming-is-accepted") == b"True"
        url = (response.header(b"iothub-streaming-url") or b"").decode()
        token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
        sides["service"] = await join_raw(env, url, token, service_subprotocols)
    return sides["device"], sides["service"]


SIZES = [1, 2, 125, 126, 127, 65535, 65536, 65537, 300_000, 7]


@pytest.mark.parametrize("direction", ["service_to_device", "device_to_service"])
async def test_raw_mode_keeps_message_boundaries(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, direction: str
) -> None:
    with trio.fail_after(30):
        device_ws, service_ws = await _raw_pair(hub_env)
        sender, receiver = (
            (service_ws, device_ws) if direction == "service_to_device" else (device_ws, service_ws)
        )
        messages = [bytes([index]) * size for index, size in enumerate(SIZES)]
        async with trio.open_nursery() as nursery:

            async def send_all() -> None:
                for message in messages:
                    await sender.send_bytes(message)

            nursery.start_soon(send_all)
            received = [await receive_message(receiver) for _ in messages]
        assert [len(m) for m in received] == SIZES
        assert received == messages

        # A close on one side closes the other with the same code and reason.
        await sender.send_close(4000, "application says bye")
        with pytest.raises(ConnectionClosed) as closed:
            await receiver.receive()
        assert (closed.value.code, closed.value.reason) == (4000, "application says bye")


async def test_raw_mode_accepts_whatever_subprotocol_is_offered(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        device_ws, service_ws = await _raw_pair(
            hub_env,
            service_subprotocols=["Azure.DeviceStream.v1", "binary"],
            device_subprotocols=[],
        )
        assert service_ws.subprotocol == "Azure.DeviceStream.v1"
        assert device_ws.subprotocol is None
        await device_ws.send_bytes(b"still relayed")
        assert await receive_message(service_ws) == b"still relayed"


# -- devices disabled or deleted while connected ---------------------------------------------


@dataclass
class Served:
    """A device's ``serve`` running in the background, and how it ended."""

    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None

    async def run(
        self, env: HubEnv, cs: ConnectionString, task_status: trio.TaskStatus[None]
    ) -> None:
        try:
            await env.device(cs).serve({"echo": echo}, task_status=task_status)
        except HubError as exc:
            self.error = exc
        finally:
            self.done.set()


async def _online(env: HubEnv, cs: ConnectionString) -> Served:
    served = Served()
    await env.nursery.start(served.run, env, cs)
    return served


async def test_disabling_a_connected_device_drops_it_and_keeps_it_out(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    service = hub_env.service()
    with trio.fail_after(30):
        served = await _online(hub_env, cs)
        assert (await service.get_device("d1"))["connectionState"] == "Connected"
        await service.set_device_status("d1", "disabled")
        await served.done.wait()
        assert isinstance(served.error, DeviceDisabled)
        assert served.error.code == 403902
        assert (await service.get_device("d1"))["connectionState"] == "Disconnected"
        assert (await metrics(hub_env))["devstream_devices_online"] == 0

        # A fresh client is refused at once, not retried.
        with pytest.raises(DeviceDisabled):
            await hub_env.device(cs).serve({"echo": echo})

        # Enabled again: a new client comes online and streams work.
        await service.set_device_status("d1", "enabled")
        await _online(hub_env, cs)
        stream = await service.open_stream("d1", "echo")
        await stream.send_all(b"back again")
        assert await read_exactly(stream, 10) == b"back again"
        await stream.aclose()


async def test_deleting_a_connected_device_drops_it_and_keeps_it_out(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    service = hub_env.service()
    with trio.fail_after(30):
        served = await _online(hub_env, cs)
        await service.delete_device("d1")
        await served.done.wait()
        assert isinstance(served.error, DeviceNotFound)
        assert served.error.code == 404001
        assert (await metrics(hub_env))["devstream_devices_online"] == 0
        with pytest.raises(DeviceNotFound):
            await hub_env.device(cs).serve({"echo": echo})
        # The same id created again has new keys: the old connection string stays out.
        fresh = await hub_env.create_device("d1")
        assert fresh.shared_access_key != cs.shared_access_key
        with pytest.raises(HubError) as refused:
            await hub_env.device(cs).serve({"echo": echo})
        assert refused.value.code == 401002
        await _online(hub_env, fresh)
        assert (await service.get_device("d1"))["connectionState"] == "Connected"


# -- a side that vanishes mid-stream -----------------------------------------------------------


async def test_a_side_whose_connection_drops_breaks_the_other_side_only(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The device's transport dies without a close: the service's stream ends with
    1001 "peer connection lost" (not a clean EOF), and the hub keeps serving new streams."""
    opened: list[trio.abc.Stream] = []

    async def recording_opener(address: HubAddress) -> trio.abc.Stream:
        stream = await hub_env.open(address)
        opened.append(stream)
        return stream

    holding = trio.Event()

    async def hold(stream: HubStream) -> None:
        holding.set()
        async for data in stream:
            await stream.send_all(data)

    cs = await hub_env.create_device("d-drop")
    device = DeviceClient(cs, opener=recording_opener)
    await hub_env.nursery.start(device.serve, {"hold": hold})
    with trio.fail_after(30):
        stream = await hub_env.service().open_stream("d-drop", "hold")
        await holding.wait()
        await stream.send_all(b"before")
        assert await stream.receive_some() == b"before"
        # The device's newest connection is its side of this stream: drop it hard.
        await trio.aclose_forcefully(opened[-1])
        with pytest.raises(trio.BrokenResourceError):
            while True:
                await stream.receive_some()
        assert stream.close_code == 1001
        assert stream.close_reason == "peer connection lost"
        holding = trio.Event()
        again = await hub_env.service().open_stream("d-drop", "hold")
        await again.send_all(b"after")
        assert await again.receive_some() == b"after"
        await again.aclose()


def test_tune_gc_for_hub_sets_the_documented_thresholds() -> None:
    """`devstream hub` makes the collector run less often (cycles are still collected)."""
    import gc

    from devstream_trio import tune_gc_for_hub
    from devstream_trio.server.hub import HUB_GC_THRESHOLDS

    before = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        tune_gc_for_hub()
        assert gc.get_threshold() == HUB_GC_THRESHOLDS
        assert HUB_GC_THRESHOLDS[0] > 700 and gc.isenabled()
    finally:
        gc.set_threshold(*before)
