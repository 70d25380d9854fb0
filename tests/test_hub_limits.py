"""The hub's limits: a device that stops reading, streams and requests per device, and the
connection cap.

Test rules: no sockets unless a test says so (clients reach the hub through ``hub_env.open``
or a hub built here on in-memory streams), everything that waits runs on ``autojump_clock``,
every wait is bounded by ``trio.fail_after``, and a test of a wait asserts the virtual time
it took.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import resource
import time
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from devstream_core import control
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_core.tokens import STREAM_TOKEN_LIFETIME
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import API_VERSION
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import HubError
from devstream_trio.server.hub import Hub, HubConfig, default_max_connections
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpResponse, websocket_connect
from devstream_trio.transport.websocket import WebSocket

from .conftest import PUBLIC_URL, HubEnv
from .test_framed_stream import env_with
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
    return (await hand_made_device(env, cs, names, trio.testing.lockstep_stream_pair()))[0]


async def hand_made_device(
    env: HubEnv,
    cs: ConnectionString,
    names: tuple[str, ...],
    pair: tuple[trio.abc.Stream, trio.abc.Stream] | None = None,
) -> tuple[WebSocket, control.DeviceControl]:
    """A device's control channel, registered for *names*, that the test drives by hand."""
    client, server = pair or trio.testing.memory_stream_pair()
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
    return ws, machine


async def answer_requests(
    ws: WebSocket, machine: control.DeviceControl, count: int, accept: bool
) -> None:
    """Read *count* stream requests on a hand-made device's channel and answer each."""
    answered = 0
    while answered < count:
        event = await ws.receive()
        for message in machine.receive(event.data, message_finished=event.message_finished):  # type: ignore[arg-type]
            assert isinstance(message, control.StreamRequest)
            await ws.send_text(
                machine.send(
                    control.StreamResponse(
                        request_id=message.request_id, accepted=accept, reason="not now"
                    )
                )
            )
            answered += 1


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


async def test_a_short_timeout_waiting_its_turn_leaves_the_channel_and_the_others(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """A request whose response timeout ends while it waits behind another one's write (the
    device reads slowly) has written nothing: it fails with 504101, and the channel and the
    request before it go on. Dropping the channel would fail every request on it."""
    cs = await hub_env.create_device("slow")
    with trio.fail_after(30):
        ws, machine = await hand_made_device(
            hub_env, cs, ("echo",), trio.testing.lockstep_stream_pair()
        )
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            answers: dict[str, HttpResponse] = {}

            async def ask(key: str, timeout: int) -> None:
                answers[key] = await initiate(hub_env, "slow", "echo", response_timeout=timeout)

            nursery.start_soon(ask, "first", 10)  # its write waits for the device to read
            await trio.sleep(0.1)
            nursery.start_soon(ask, "short", 1)  # waits its turn behind it
            await trio.sleep(1.5)
            assert list(answers) == ["short"]
            assert error_of(answers["short"])[0] == ErrorCode.DEVICE_RESPONSE_TIMEOUT
            # The device reads again: the first request is there, and its answer gets back.
            await answer_requests(ws, machine, 1, accept=False)
        assert answers["first"].status == 200
        assert answers["first"].header(b"iothub-streaming-is-accepted") == b"False"
        assert trio.current_time() - start < 1.7


# -- 2. streams and stream requests per device -----------------------------------------------


async def test_streams_per_device_are_capped_and_capacity_returns(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    env = await env_with(nursery, HubConfig(max_streams_per_device=2))
    cs = await env.create_device("d1")
    await nursery.start(env.device(cs).serve, {"echo": echo})
    other = await env.create_device("d2")
    await nursery.start(env.device(other).serve, {"echo": echo})
    with trio.fail_after(200):
        start = trio.current_time()
        # Under the limit: accepted (the service never joins; the device's side waits).
        for _ in range(2):
            response = await initiate(env, "d1", "echo")
            assert response.status == 200
            assert response.header(b"iothub-streaming-is-accepted") == b"True"
        # Over it: 429001 at once, saying why, before the device is asked.
        response = await initiate(env, "d1", "echo")
        assert response.status == 429
        code, message = error_of(response)
        assert code == ErrorCode.THROTTLED
        assert message.startswith(
            "device 'd1' has 2 streams open or waiting to be joined, the most the hub allows"
        )
        with pytest.raises(HubError) as info:
            await env.service().open_stream("d1", "echo")
        assert info.value.code is ErrorCode.THROTTLED
        # Another device has its own budget.
        await round_trip(env, "d2")
        assert trio.current_time() - start < 1
        # The two waiting streams end when their tokens expire (60 s); their slots come back.
        await trio.sleep(STREAM_TOKEN_LIFETIME + 1 - (trio.current_time() - start))
        await round_trip(env, "d1")
        await round_trip(env, "d1")
    # The device said once per stream, in one line, why each ended: no traceback.
    ended = [r for r in caplog.records if r.name == "devstream.device" and "ended" in r.message]
    assert len(ended) == 2, [r.getMessage() for r in caplog.records]
    for record in ended:
        assert record.exc_info is None
        assert "the other side of the stream never connected (error 504901)" in record.message


async def test_refused_and_failed_initiations_do_not_hold_stream_slots(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    env = await env_with(nursery, HubConfig(max_streams_per_device=2))
    cs = await env.create_device("d1")
    ws, machine = await hand_made_device(env, cs, ("echo", "ssh"))
    with trio.fail_after(30):
        start = trio.current_time()
        for _ in range(3):
            # The hub refuses a name the device did not register...
            response = await initiate(env, "d1", "ftp")
            assert response.header(b"iothub-streaming-is-accepted") == b"False"
            # ... the device refuses one ...
            async with trio.open_nursery() as asking:
                asking.start_soon(answer_requests, ws, machine, 1, False)
                response = await initiate(env, "d1", "ssh")
            assert response.header(b"iothub-streaming-is-accepted") == b"False"
            # ... and does not answer another in time.
            response = await initiate(env, "d1", "echo", response_timeout=1)
            assert error_of(response)[0] == ErrorCode.DEVICE_RESPONSE_TIMEOUT
            await ws.receive()  # the request it let time out
        # None of the nine holds a slot: two streams can still be initiated at once.
        async with trio.open_nursery() as asking:
            asking.start_soon(answer_requests, ws, machine, 2, True)
            for _ in range(2):
                response = await initiate(env, "d1", "echo")
                assert response.header(b"iothub-streaming-is-accepted") == b"True"
        assert trio.current_time() - start < 3.1


async def test_pending_requests_per_device_are_capped_and_capacity_returns(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    env = await env_with(nursery, HubConfig(max_pending_per_device=2))
    cs = await env.create_device("q")
    ws, machine = await hand_made_device(env, cs, ("echo",))
    with trio.fail_after(100):
        answers: list[HttpResponse] = []

        async def ask() -> None:
            answers.append(await initiate(env, "q", "echo", response_timeout=30))

        async with trio.open_nursery() as asking:
            # Under the limit: two requests wait for the device's answer.
            asking.start_soon(ask)
            asking.start_soon(ask)
            await trio.sleep(1)
            start = trio.current_time()
            # Over it: 429001 at once, saying why.
            response = await initiate(env, "q", "echo", response_timeout=30)
            assert trio.current_time() - start < 0.1
            assert response.status == 429
            code, message = error_of(response)
            assert code == ErrorCode.THROTTLED
            assert message.startswith("device 'q' has 2 stream requests waiting for its answer")
            await answer_requests(ws, machine, 2, True)
        assert [a.header(b"iothub-streaming-is-accepted") for a in answers] == [b"True"] * 2
        # Answered: the capacity is back; the next request reaches the device.
        async with trio.open_nursery() as asking:
            asking.start_soon(ask)
            await answer_requests(ws, machine, 1, False)
        assert answers[-1].header(b"iothub-streaming-is-accepted") == b"False"
        assert trio.current_time() - start < 1


async def test_hub_config_refuses_more_pending_requests_than_a_channel_carries() -> None:
    config = HubConfig(max_pending_per_device=control.MAX_OUTSTANDING_REQUESTS + 1)
    store = await RegistryStore.open(None)
    with pytest.raises(ValueError, match="max_pending_per_device"):
        Hub(store, public_url=PUBLIC_URL, secret=b"s", config=config)
    await store.aclose()


async def test_a_device_that_cannot_open_a_join_logs_one_line_per_stream(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    cs = await hub_env.create_device("d1")
    opened = 0

    async def out_of_files(address: HubAddress) -> trio.abc.Stream:
        # The control channel opens; every join after it finds the device out of descriptors.
        nonlocal opened
        opened += 1
        if opened > 1:
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await hub_env.open(address)

    device = DeviceClient(cs, opener=out_of_files)
    with trio.fail_after(10):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        for _ in range(3):
            response = await initiate(hub_env, "d1", "echo")
            assert response.header(b"iothub-streaming-is-accepted") == b"True"
        await trio.sleep(1)
        # The device is still serving.
        assert device.online
    failed = [r for r in caplog.records if r.name == "devstream.device" and "join" in r.message]
    assert len(failed) == 3, [r.getMessage() for r in caplog.records]
    for record in failed:
        assert record.exc_info is None
        assert record.getMessage() == (
            "device 'd1': could not join stream 'echo': [Errno 24] Too many open files"
        )


# -- 3. the connection cap -------------------------------------------------------------------


async def test_past_the_connection_cap_the_hub_answers_and_streams_go_on(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    # Three connections: the device's control channel and the two sides of one stream.
    env = await env_with(nursery, HubConfig(max_connections=3))
    cs = await env.create_device("d1")
    await nursery.start(env.device(cs).serve, {"echo": echo})
    with trio.fail_after(30):
        stream = await env.service().open_stream("d1", "echo")
        await stream.send_all(b"before")
        assert await stream.receive_some() == b"before"
        start = trio.current_time()
        # Full: a new connection is answered 503901 and closed, at once.
        response = await initiate(env, "d1", "echo")
        assert response.status == 503
        assert response.header(b"connection") == b"close"
        code, message = error_of(response)
        assert code == ErrorCode.SERVICE_UNAVAILABLE
        assert message == "the hub serves its most connections (3); try again later"
        # /healthz still says the hub is alive.
        health = await call(env, "GET", "/healthz")
        assert (health.status, json.loads(health.body)) == (200, {"status": "ok"})
        assert trio.current_time() - start < 0.1
        # The stream goes on.
        await stream.send_all(b"after")
        assert await stream.receive_some() == b"after"
        # Its end gives the capacity back.
        await stream.aclose()
        await trio.sleep(1)
        await round_trip(env, "d1")
        await trio.sleep(1)
        # /metrics counts the two refused, and serves the control channel and itself.
        metrics = (await call(env, "GET", "/metrics")).body.decode().splitlines()
        assert "devstream_connections_refused_total 2" in metrics
        assert "devstream_connections 2" in metrics


async def test_refusals_are_logged_once_per_interval(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    env = await env_with(nursery, HubConfig(max_connections=1, limit_log_interval=10.0))
    cs = await env.create_device("d1")
    await nursery.start(env.device(cs).serve, {"echo": echo})  # the one connection served
    with trio.fail_after(60):
        start = trio.current_time()
        for _ in range(100):
            health = await call(env, "GET", "/healthz")
            assert health.status == 200
            await trio.sleep(0.25)
        assert 25.0 <= trio.current_time() - start < 25.1
    lines = [r.getMessage() for r in caplog.records if "connection limit" in r.getMessage()]
    assert lines == [
        "at the connection limit (1 served): refused 1 new connection since the last report",
        "at the connection limit (1 served): refused 40 new connections since the last report",
        "at the connection limit (1 served): refused 40 new connections since the last report",
    ]


async def test_past_the_answering_slots_a_connection_is_closed_at_once(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    env = await env_with(nursery, HubConfig(max_connections=1, max_over_limit_answers=1))
    cs = await env.create_device("d1")
    await nursery.start(env.device(cs).serve, {"echo": echo})
    with trio.fail_after(30):
        # One connection takes the answering slot and says nothing.
        silent = await env.open(HUB)
        await trio.sleep(0.5)
        start = trio.current_time()
        closed = await env.open(HUB)
        await closed.send_all(b"GET /healthz HTTP/1.1\r\nHost: hub.test\r\n\r\n")
        assert await closed.receive_some() == b""
        assert trio.current_time() - start < 0.1
        # The silent one holds its slot for 2 s at most: then 408, and the end.
        answer = await silent.receive_some()
        assert answer.startswith(b"HTTP/1.1 408 ")
        assert 1.5 <= trio.current_time() - start < 1.6
        await silent.aclose()
        await closed.aclose()
        # With the slot free again, /healthz is answered.
        health = await call(env, "GET", "/healthz")
        assert health.status == 200


@pytest.mark.parametrize(
    ("soft", "cap"),
    [
        (20_000, 19_744),
        (1024, 768),
        (512, 256),
        (256, 128),
        (1, 1),
        (resource.RLIM_INFINITY, (1 << 24) - 256),
    ],
)
def test_the_default_cap_leaves_descriptors_below_the_open_files_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, cap: int
) -> None:
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, resource.RLIM_INFINITY))
    assert default_max_connections() == cap
