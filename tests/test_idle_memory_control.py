"""Idle device control channels: what the hub keeps for each, and the silence it drops.

The hub holds one task per control channel and no watchdog task: its timer (``Hub.run``)
keeps one heap of idle checks for every channel and drops a channel silent (no message, no
ping) for ``control_idle_timeout``. These tests pin the behaviour that must not change with
that: when a silent channel goes, that pings and messages keep a channel, that each channel
has its own deadline, that a replaced channel still gets its error, and that a connection may
answer plain HTTP before it becomes a control channel. The core's share (a registration kept
as the caller's tuple) is checked at the end.

Test rules: no sockets (every client reaches the hub through ``hub_env.open``), everything
that waits runs on ``autojump_clock``, and every wait is bounded by ``trio.fail_after``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import h11
import pytest
import trio
import trio.testing

from devstream_core import control
from devstream_core.coordinator import (
    Coordinator,
    InitiationRejected,
    SendStreamRequest,
)
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_trio.server.hub import HubConfig
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import websocket_connect
from devstream_trio.transport.websocket import ConnectionClosed, WebSocket, payload

from .conftest import PUBLIC_URL, HubEnv

HUB = HubAddress.from_url(PUBLIC_URL)
IDLE = HubConfig().control_idle_timeout
LIMIT = 20 * IDLE


# -- helpers ---------------------------------------------------------------------------------


@dataclass
class Device:
    """A device speaking the control channel by hand; ``closed`` is set when the hub closes it."""

    ws: WebSocket
    machine: control.DeviceControl = field(default_factory=control.DeviceControl)
    messages: list[control.ControlMessage] = field(default_factory=list)
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str | None = None
    closed: trio.Event = field(default_factory=trio.Event)

    async def send(self, message: control.ControlMessage) -> None:
        await self.ws.send_text(self.machine.send(message))

    async def read_until_closed(self) -> None:
        """Read (answering the hub's close) until the channel ends; note when and how."""
        try:
            while True:
                event = await self.ws.receive()
                self.messages.extend(
                    self.machine.receive(payload(event), message_finished=event.message_finished)
                )
        except ConnectionClosed as exc:
            self.closed_at = trio.current_time()
            self.close_code = exc.code
            self.close_reason = exc.reason
            self.closed.set()


async def open_channel(env: HubEnv, cs: ConnectionString) -> WebSocket:
    assert cs.device_id is not None
    token = cs.sas_token(expiry=int(env.hub.wall_clock()) + 24 * 3600)
    return await websocket_connect(
        await env.open(HUB),
        host=HUB.host_header,
        target=f"/devices/{cs.device_id}/streams",
        headers=[("authorization", token)],
        subprotocols=[control.CONTROL_SUBPROTOCOL],
    )


async def register(device: Device, names: Sequence[str] = ("echo",)) -> None:
    """Send a Register and read its Registered (before the reader task starts)."""
    await device.send(control.Register(names=tuple(names)))
    while not device.messages:
        event = await device.ws.receive()
        device.messages.extend(
            device.machine.receive(payload(event), message_finished=event.message_finished)
        )
    assert device.messages.pop() == control.Registered(names=tuple(names))


async def connect(env: HubEnv, cs: ConnectionString) -> Device:
    """A registered device whose reader runs in ``env.nursery``."""
    device = Device(await open_channel(env, cs))
    await register(device)
    env.nursery.start_soon(device.read_until_closed)
    return device


# -- silence ---------------------------------------------------------------------------------


async def test_a_silent_device_is_dropped_when_its_idle_time_runs_out(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    with trio.fail_after(LIMIT):
        device = await connect(hub_env, cs)
        heard_at = trio.current_time()  # the Register: the last bytes the hub got
        await trio.sleep(IDLE - 1)
        assert not device.closed.is_set()
        assert hub_env.hub.coordinator.is_online("d1")
        await device.closed.wait()
    assert device.closed_at == pytest.approx(heard_at + IDLE)
    # The hub says why, in an Error message and in the close: 4408, 408902.
    assert device.close_code == ErrorCode.CONNECTION_IDLE.close_code == 4408
    assert device.close_reason is not None
    assert device.close_reason.startswith("408902 ")
    assert [m.code for m in device.messages if isinstance(m, control.ErrorMessage)] == [408902]
    assert not hub_env.hub.coordinator.is_online("d1")


async def test_pings_alone_keep_a_device_and_its_last_ping_starts_the_clock(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    with trio.fail_after(LIMIT):
        device = await connect(hub_env, cs)
        last_ping = trio.current_time()
        for _ in range(12):  # 360 s: four idle timeouts
            await trio.sleep(IDLE / 3)
            await device.ws.ping(b"k")
            last_ping = trio.current_time()
        assert not device.closed.is_set()
        assert hub_env.hub.coordinator.is_online("d1")
        await device.closed.wait()
    assert device.closed_at == pytest.approx(last_ping + IDLE)
    assert device.close_code == ErrorCode.CONNECTION_IDLE.close_code


async def test_a_control_message_moves_the_deadline(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    with trio.fail_after(LIMIT):
        device = Device(await open_channel(hub_env, cs))
        await register(device)
        await trio.sleep(IDLE * 2 / 3)
        await register(device, ("echo", "ssh"))
        heard_at = trio.current_time()
        hub_env.nursery.start_soon(device.read_until_closed)
        await device.closed.wait()
    assert device.closed_at == pytest.approx(heard_at + IDLE)
    assert device.close_code == ErrorCode.CONNECTION_IDLE.close_code


async def test_every_channel_keeps_its_own_deadline(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Silent devices arriving at different times each go at their own time; a pinging one
    among them stays."""
    ids = ["a", "b", "c"]
    css = {device_id: await hub_env.create_device(device_id) for device_id in ids}
    live_cs = await hub_env.create_device("live")
    with trio.fail_after(LIMIT):
        live = await connect(hub_env, live_cs)

        async def keep_pinging() -> None:
            while not live.closed.is_set():
                await live.ws.ping()
                await trio.sleep(20)

        hub_env.nursery.start_soon(keep_pinging)
        silent: dict[str, tuple[Device, float]] = {}
        for device_id in ids:
            silent[device_id] = (await connect(hub_env, css[device_id]), trio.current_time())
            await trio.sleep(IDLE / 4)
        for device, _ in silent.values():
            await device.closed.wait()
        for device, heard_at in silent.values():
            assert device.closed_at == pytest.approx(heard_at + IDLE)
        await trio.sleep(IDLE)
        assert not live.closed.is_set()
        assert hub_env.hub.coordinator.is_online("live")
        assert not any(hub_env.hub.coordinator.is_online(device_id) for device_id in ids)
        await live.ws.send_close()
        await live.closed.wait()


async def test_channels_that_came_and_went_leave_a_later_one_watched(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Many short-lived channels leave entries in the hub's idle checks; clearing them out
    must keep the checks of the channels still open."""
    cs = await hub_env.create_device("d1")
    other = await hub_env.create_device("d2")
    with trio.fail_after(LIMIT):
        watched = await connect(hub_env, other)
        heard_at = trio.current_time()
        for _ in range(300):
            device = await connect(hub_env, cs)
            await device.ws.send_close()
            await device.closed.wait()
        await watched.closed.wait()
    assert watched.closed_at == pytest.approx(heard_at + IDLE)
    assert watched.close_code == ErrorCode.CONNECTION_IDLE.close_code


# -- what else ends a channel ----------------------------------------------------------------


async def test_a_replaced_channel_gets_its_error_and_the_new_one_its_own_deadline(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    with trio.fail_after(LIMIT):
        first = await connect(hub_env, cs)
        await trio.sleep(IDLE / 2)
        second = await connect(hub_env, cs)
        heard_at = trio.current_time()
        await first.closed.wait()
        assert first.closed_at == pytest.approx(heard_at)
        assert first.messages == [control.ErrorMessage.from_code(ErrorCode.DEVICE_REPLACED)]
        assert first.close_code == ErrorCode.DEVICE_REPLACED.close_code == 4409
        assert first.close_reason == "409902 replaced by a newer connection"
        assert hub_env.hub.coordinator.is_online("d1")
        await second.closed.wait()
    assert second.closed_at == pytest.approx(heard_at + IDLE)
    assert second.close_code == ErrorCode.CONNECTION_IDLE.close_code
    assert not hub_env.hub.coordinator.is_online("d1")


async def test_a_protocol_error_still_closes_with_its_error(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    with trio.fail_after(LIMIT):
        device = await connect(hub_env, cs)
        await device.ws.send_text('{"type": "streamResponse"')
        await device.closed.wait()
    assert device.messages == [control.ErrorMessage.from_code(ErrorCode.INVALID_JSON)]
    assert device.close_code == ErrorCode.INVALID_JSON.close_code
    assert not hub_env.hub.coordinator.is_online("d1")


async def test_plain_http_before_the_upgrade_on_one_connection(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """A kept-alive connection answers a request, then becomes a control channel."""
    cs = await hub_env.create_device("d1")
    assert cs.device_id is not None
    with trio.fail_after(LIMIT):
        stream = await hub_env.open(HUB)
        client = h11.Connection(h11.CLIENT)
        request = h11.Request(method="GET", target="/healthz", headers=[("host", HUB.host_header)])
        await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
        status = 0
        while True:
            event = client.next_event()
            if event is h11.NEED_DATA:
                client.receive_data(await stream.receive_some())
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                break
        assert status == 200
        assert client.our_state is h11.DONE and client.their_state is h11.DONE
        ws = await websocket_connect(
            stream,
            host=HUB.host_header,
            target=f"/devices/{cs.device_id}/streams",
            headers=[("authorization", cs.sas_token(expiry=int(hub_env.hub.wall_clock()) + 60))],
            subprotocols=[control.CONTROL_SUBPROTOCOL],
        )
        device = Device(ws)
        await register(device)
        assert hub_env.hub.coordinator.is_online("d1")
        await ws.aclose()
        await trio.testing.wait_all_tasks_blocked()
        assert not hub_env.hub.coordinator.is_online("d1")


# -- the core: a registration kept as the caller's tuple -------------------------------------


@pytest.mark.parametrize(
    "names",
    [("echo",), ("a", "b", "c"), tuple(f"n{i}" for i in range(20)), ["echo", "ssh"]],
    ids=["one", "three", "twenty", "list"],
)
def test_coordinator_matches_names_however_they_are_kept(names: Sequence[str]) -> None:
    coordinator = Coordinator()
    coordinator.device_registered(device_id="d", connection_id=1, names=names, now=0.0)
    assert coordinator.registered_names("d") == frozenset(names)
    nonce = bytes(16)
    for name in names:
        (event,) = coordinator.initiate(
            device_id="d", name=name, now=0.0, response_timeout=1.0, stream_nonce=nonce
        )
        assert isinstance(event, SendStreamRequest)
    (event,) = coordinator.initiate(
        device_id="d", name="other", now=0.0, response_timeout=1.0, stream_nonce=nonce
    )
    assert isinstance(event, InitiationRejected)
    assert event.code is ErrorCode.STREAM_NAME_NOT_REGISTERED
    # A re-register replaces the names, whatever the form of either.
    coordinator.device_registered(device_id="d", connection_id=1, names=("*",), now=0.0)
    assert coordinator.registered_names("d") == frozenset({"*"})
    (event,) = coordinator.initiate(
        device_id="d", name="other", now=0.0, response_timeout=1.0, stream_nonce=nonce
    )
    assert isinstance(event, SendStreamRequest)


def test_hub_machine_tracks_requests_without_sets() -> None:
    """Outstanding and forgotten request ids behave as before (kept in plain dicts now)."""
    hub = control.HubControl()
    hub.receive(control.encode_message(control.Register(names=("*",))))
    hub.send(control.Registered(names=("*",)))
    url = "ws://hub.test/bridges/s"
    for i in range(3):
        hub.send(control.StreamRequest(request_id=str(i), name="x", url=url, token="t"))
    assert hub.outstanding_requests == frozenset({"0", "1", "2"})
    assert hub.forget_request("1")
    assert not hub.forget_request("1")
    assert hub.outstanding_requests == frozenset({"0", "2"})
    late = control.StreamResponse(request_id="1", accepted=True)
    assert hub.receive(control.encode_message(late)) == []
    answer = control.StreamResponse(request_id="0", accepted=False, reason="no")
    assert hub.receive(control.encode_message(answer)) == [answer]
    assert hub.outstanding_requests == frozenset({"2"})
