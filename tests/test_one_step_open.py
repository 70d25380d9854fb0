"""The one-step open on the wire: an initiate that is a WebSocket upgrade.

``GET /twins/{deviceId}/streams/{streamName}`` with ``Upgrade: websocket``, the service's SAS
and the initiate's headers: the hub asks the device as for a ``POST``, and once the device
accepts it answers ``101`` with the stream's headers, the connection then being the service's
side of the stream. Refusals and errors get the same answers a ``POST`` gets.

Test rules: no sockets (clients reach the hub through ``hub_env.open``), the autojump clock,
every wait bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest
import trio

from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_trio.client.service import API_VERSION
from devstream_trio.transport.http import HttpStatusError, websocket_connect
from devstream_trio.transport.websocket import WebSocket

from .conftest import HubEnv
from .test_hub import (
    HUB,
    ManualDevice,
    auth,
    call,
    join_raw,
    receive_message,
    start_echo_device,
)

TARGET = f"/twins/d1/streams/echo?api-version={API_VERSION}"


async def open_in_one_step(
    env: HubEnv,
    *,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    authorized: bool = True,
) -> WebSocket:
    stream = await env.open(HUB)
    return await websocket_connect(
        stream,
        host=HUB.host_header,
        target=TARGET,
        headers=[*([auth(env)] if authorized else []), *headers],
        subprotocols=subprotocols,
    )


async def refused(env: HubEnv, **kwargs: object) -> HttpStatusError:
    with pytest.raises(HttpStatusError) as info:
        await open_in_one_step(env, **kwargs)  # type: ignore[arg-type]
    return info.value


async def test_raw_stream_in_one_step(hub_env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    await start_echo_device(hub_env)
    with trio.fail_after(10):
        ws = await open_in_one_step(hub_env)
        head = dict(ws.handshake_headers)
        assert head[b"iothub-streaming-is-accepted"] == b"True"
        url = head[b"iothub-streaming-url"].decode()
        assert url.startswith("ws://hub.test:8080/bridges/") and url.endswith("?role=service")
        assert head[b"devstream-stream-mode"] == b"raw"
        # The service's token was spent by the hub itself: it is never sent.
        assert b"iothub-streaming-auth-token" not in head
        assert ws.subprotocol is None
        await ws.send_bytes(b"one step")
        assert await receive_message(ws) == b"one step"
        await ws.aclose()
    assert hub_env.hub.metrics.initiations["accepted"] == 1


async def test_devstream_v1_stream_in_one_step_carries_a_resume_token(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_echo_device(hub_env)
    with trio.fail_after(10):
        ws = await open_in_one_step(
            hub_env,
            headers=[("devstream-stream-mode", FRAMED_SUBPROTOCOL)],
            subprotocols=[FRAMED_SUBPROTOCOL],
        )
        head = dict(ws.handshake_headers)
        assert ws.subprotocol == FRAMED_SUBPROTOCOL
        assert head[b"devstream-stream-mode"] == FRAMED_SUBPROTOCOL.encode()
        assert head[b"devstream-resume-token"]
        await ws.abort()


async def test_a_rejection_is_answered_as_for_a_post(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("d1"))

    async def refuse() -> None:
        request = await device.next_request()
        await device.send(request.reject("busy"))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refuse)
            error = await refused(hub_env)
    assert error.response.status == 200
    assert error.response.header(b"iothub-streaming-is-accepted") == b"False"
    assert json.loads(error.response.body) == {"errorCode": 403903, "message": "busy"}
    assert hub_env.hub.metrics.initiations["rejected"] == 1


async def test_an_offline_device_and_a_bad_sas_are_answered_as_for_a_post(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await hub_env.create_device("d1")  # never connects
    with trio.fail_after(10):
        offline = await refused(hub_env)
        unauthorized = await refused(hub_env, authorized=False)
    assert (offline.response.status, offline.code) == (404, 404103)
    assert (unauthorized.response.status, unauthorized.code and int(unauthorized.code)) == (
        401,
        401002,
    )


async def test_devstream_v1_without_its_subprotocol_is_refused_before_the_device_hears(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("d1"))
    with trio.fail_after(10):
        error = await refused(hub_env, headers=[("devstream-stream-mode", FRAMED_SUBPROTOCOL)])
        assert (error.response.status, error.code and int(error.code)) == (400, 400004)
        assert FRAMED_SUBPROTOCOL in error.message
        # The device was never asked: nothing is waiting on its control channel.
        with trio.move_on_after(1) as waited:
            await device.next_message()
        assert waited.cancelled_caught


async def test_a_get_without_upgrade_on_the_initiate_path_is_426(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    await start_echo_device(hub_env)
    with trio.fail_after(10):
        response = await call(hub_env, "GET", TARGET, headers=[auth(hub_env)])
    assert response.status == 426
    assert json.loads(response.body)["errorCode"] == 426901


async def test_a_side_waiting_for_its_peer_is_pinged_then_relayed(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("d1"))
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:

            async def accept_later() -> None:
                request = await device.next_request()
                await device.send(request.accept())
                # The device joins 12 s after the service's side opened.
                await trio.sleep(12)
                side = await join_raw(hub_env, request.url, request.token, [FRAMED_SUBPROTOCOL])
                await side.send_bytes(b"from the device")
                assert await receive_message(side) == b"from the service"
                await side.abort()

            nursery.start_soon(accept_later)
            ws = await open_in_one_step(
                hub_env,
                headers=[("devstream-stream-mode", FRAMED_SUBPROTOCOL)],
                subprotocols=[FRAMED_SUBPROTOCOL],
            )
            opened = trio.current_time()
            # Nothing but pings comes while the device is away; receive() answers them.
            with trio.move_on_after(11):
                await ws.receive()
            assert opened + 9.9 <= ws.last_received <= opened + 11
            assert await receive_message(ws) == b"from the device"
            await ws.send_bytes(b"from the service")
