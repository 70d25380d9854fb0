"""The hub's limits: a device that stops reading, streams and requests per device, and the
connection cap.

Test rules: no sockets unless a test says so (clients reach the hub through ``hub_env.open``
or a hub built here on in-memory streams), everything that waits runs on ``autojump_clock``,
every wait is bounded by ``trio.fail_after``, and a test of a wait asserts the virtual time
it took.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from devstream_core import control
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_trio._http import HttpResponse, websocket_connect
from devstream_trio._ws import WebSocket
from devstream_trio.service import API_VERSION
from devstream_trio.stream import HubStream

from .conftest import HubEnv
from .test_hub import HUB, auth, call, echo

# -- helpers ---------------------------------------------------------------------------------


async def initiate(
    env: HubEnv, device_id: str, name: str, *, response_timeout: int | None = None
) -> HttpResponse:
    """A POST initiate (the service never joins the stream it gets)."""
    headers = [auth(env)]
    if response_timeout is not None:
        headers.append(("iothub-streaming-response-timeout-in-seconds", str(response_timeout)))
    return await call(
        env, "POST", f"/twins/{device_id}/streams/{name}?api-version={API_VERSION}", headers=headers
    )


def error_of(response: HttpResponse) -> tuple[int, str]:
    value = json.loads(response.body)
    return int(value["errorCode"]), str(value["message"])


async def stalled_device(env: HubEnv, cs: ConnectionString, names: tuple[str, ...]) -> WebSocket:
    """A device's control channel that registers *names* and then never reads again.

    It runs over a lockstep stream (a write waits until the other end reads it), so the hub's
    next write to it blocks, as a socket's does once the buffers between are full.
    """
    client, server = trio.testing.lockstep_stream_pair()
    env.nursery.start_soon(env.hub.handle_connection, server)
    token = cs.sas_token(expiry=int(time.time()) + 3600)
    ws = await websocket_connect(
        client,
        host=HUB.host_header,
        target=f"/devices/{cs.device_id}/streams",
        headers=[("authorization", token)],
        subprotocols=[control.CONTROL_SUBPROTOCOL],
    )
    machine = control.DeviceControl()
    await ws.send_text(machine.send(control.Register(names=names)))
    event = await ws.receive()
    messages = machine.receive(event.data, message_finished=event.message_finished)  # type: ignore[arg-type]
    assert [type(m) for m in messages] == [control.Registered]
    return ws


@pytest.fixture
async def online(hub_env: HubEnv) -> AsyncIterator[None]:
    """Device "ok" online with an echo handler."""
    cs = await hub_env.create_device("ok")
    await hub_env.nursery.start(hub_env.device(cs).serve, {"echo": echo})
    yield


async def round_trip(env: HubEnv, device_id: str) -> None:
    stream = await env.service().open_stream(device_id, "echo")
    assert isinstance(stream, HubStream)
    await stream.send_all(b"ping")
    assert await stream.receive_some() == b"ping"
    await stream.aclose()


# -- 1. a device that stops reading its control channel --------------------------------------


async def test_a_device_that_stops_reading_gets_504101_on_time(
    hub_env: HubEnv, online: None, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("stuck")
    with trio.fail_after(30):
        await stalled_device(hub_env, cs, ("echo",))
        start = trio.current_time()
        response = await initiate(hub_env, "stuck", "echo", response_timeout=2)
        elapsed = trio.current_time() - start
        assert response.status == 504
        assert error_of(response)[0] == ErrorCode.DEVICE_RESPONSE_TIMEOUT
        assert 2.0 <= elapsed < 2.1
        # The hub kept serving another device all along, and still does.
        await round_trip(hub_env, "ok")
        # The stuck channel was dropped: the device is offline, not holding requests.
        response = await initiate(hub_env, "stuck", "echo", response_timeout=2)
        assert error_of(response)[0] == ErrorCode.DEVICE_NOT_ONLINE
    assert trio.current_time() - start < 2.1


async def test_others_are_served_while_a_send_to_a_stuck_device_waits(
    hub_env: HubEnv, online: None, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("stuck")
    with trio.fail_after(30):
        await stalled_device(hub_env, cs, ("echo",))
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            answers: list[HttpResponse] = []

            async def stuck() -> None:
                answers.append(await initiate(hub_env, "stuck", "echo", response_timeout=5))

            nursery.start_soon(stuck)
            await trio.sleep(1)
            await round_trip(hub_env, "ok")
            assert trio.current_time() - start < 1.1
            assert not answers
        assert error_of(answers[0])[0] == ErrorCode.DEVICE_RESPONSE_TIMEOUT
        assert 5.0 <= trio.current_time() - start < 5.1
