"""Sessions that end with their credentials: SAS expiry, key rotation, disable and delete, and
the hub's maximum SAS lifetime.

Test rules: no sockets (clients reach the hub through ``HubEnv.open``); everything that waits
runs on ``autojump_clock`` and is bounded by ``trio.fail_after``; the SAS clock of the hub and
of every client is the test's virtual clock (``BASE + trio.current_time()``), so a test asserts
the virtual time at which a channel closes or a token is renewed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from devstream_core import control
from devstream_core.common import Role
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream
from devstream_trio.client.service import AnyStream, ServiceClient, join_stream
from devstream_trio.exceptions import (
    DeviceDisabled,
    DeviceNotFound,
    DeviceNotOnline,
    DeviceResponseTimeout,
    HubError,
    Unauthorized,
)
from devstream_trio.server.hub import Hub, HubConfig, ensure_owner_policy, load_or_create_secret
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpRequest, HttpServerConnection, websocket_connect
from devstream_trio.transport.websocket import ConnectionClosed, WebSocket, payload

from .conftest import PUBLIC_URL, HubEnv
from .test_hub import echo, read_exactly

#: The Unix time the virtual clock starts at.
BASE = 1_800_000_000.0
HUB = HubAddress.from_url(PUBLIC_URL)


def sas_clock() -> float:
    """The wall clock of the hub and its clients: Unix time that moves with the trio clock."""
    return BASE + trio.current_time()


async def start_env(nursery: trio.Nursery, config: HubConfig) -> HubEnv:
    store = await RegistryStore.open(None)
    owner, _ = await ensure_owner_policy(store)
    secret = await load_or_create_secret(store)
    hub = Hub(store, public_url=PUBLIC_URL, secret=secret, config=config, wall_clock=sas_clock)
    await nursery.start(hub.run)
    return HubEnv(hub=hub, store=store, owner=owner, nursery=nursery)


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[HubEnv]:
    hub_env = await start_env(nursery, HubConfig())
    yield hub_env
    await hub_env.store.aclose()


def service(env: HubEnv, **options: int) -> ServiceClient:
    return ServiceClient(
        env.service_cs(), opener=env.open, wall_clock=sas_clock, nursery=env.nursery, **options
    )


def device(env: HubEnv, cs: ConnectionString, **options: int) -> DeviceClient:
    return DeviceClient(cs, opener=env.open, wall_clock=sas_clock, **options)


async def put_device(svc: ServiceClient, device_id: str, body: dict[str, object]) -> None:
    """Update device *device_id* with *body* (``If-Match: *``)."""
    response = await svc.request(
        "PUT",
        f"/devices/{device_id}",
        headers=[("if-match", "*"), ("content-type", "application/json")],
        body=json.dumps(body).encode(),
    )
    assert response.status == 200, response.body


async def create_device(env: HubEnv, device_id: str) -> ConnectionString:
    svc = service(env)
    return svc.device_connection_string(await svc.create_device(device_id))


# -- the hub's maximum SAS lifetime --------------------------------------------------------------


async def test_max_sas_lifetime_refuses_longer_tokens_of_devices_and_services(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    env = await start_env(nursery, HubConfig(max_sas_lifetime=600))
    with trio.fail_after(30):
        # A service signing for an hour (the default) is refused, with a message that says why.
        with pytest.raises(Unauthorized) as refused:
            await service(env).create_device("d1")
        assert refused.value.code == ErrorCode.UNAUTHORIZED
        assert "600 s" in refused.value.message
        # Signing for ten minutes passes.
        svc = service(env, sas_lifetime=600)
        cs = svc.device_connection_string(await svc.create_device("d1"))

        # The same for a device's control channel.
        with pytest.raises(Unauthorized) as refused:
            await device(env, cs).serve({"echo": echo})
        assert "600 s" in refused.value.message
        online = device(env, cs, sas_lifetime=600)
        await nursery.start(online.serve, {"echo": echo})
        assert online.online

        # And for initiating a stream.
        with pytest.raises(Unauthorized):
            await service(env).open_stream("d1", "echo")
        stream = await svc.open_stream("d1", "echo")
        await stream.send_all(b"ten minutes")
        assert await read_exactly(stream, 11) == b"ten minutes"
        await stream.aclose()


async def test_no_max_sas_lifetime_by_default(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    assert HubConfig().max_sas_lifetime is None
    year = 365 * 24 * 3600
    with trio.fail_after(30):
        svc = service(env, sas_lifetime=year)
        cs = svc.device_connection_string(await svc.create_device("d1"))
        long_lived = device(env, cs, sas_lifetime=year)
        await env.nursery.start(long_lived.serve, {"echo": echo})
        assert long_lived.online


def test_clients_refuse_a_lifetime_too_short_to_renew() -> None:
    cs = ConnectionString(
        host_name="hub.test:8080",
        device_id="d1",
        shared_access_key="a2V5a2V5a2V5a2V5",
        use_tls=False,
    )
    with pytest.raises(ValueError):
        DeviceClient(cs, sas_lifetime=1)
    service_cs = ConnectionString(
        host_name="hub.test:8080",
        shared_access_key_name="svc",
        shared_access_key="a2V5a2V5a2V5a2V5",
        use_tls=False,
    )
    with pytest.raises(ValueError):
        ServiceClient(service_cs, sas_lifetime=0)


# -- a hand-driven control channel ---------------------------------------------------------------


@dataclass
class Channel:
    """A device's control channel driven by hand, opened with a token that expires at ``se``."""

    ws: WebSocket
    machine: control.DeviceControl = field(default_factory=control.DeviceControl)
    inbox: deque[control.ControlMessage] = field(default_factory=deque)

    @classmethod
    async def open(
        cls,
        env: HubEnv,
        cs: ConnectionString,
        *,
        se: int,
        device_id: str | None = None,
        wait_registered: bool = True,
    ) -> Channel:
        """Open device *device_id*'s channel with a token of *cs* (the device's own, or a
        policy's with DeviceConnect) that expires at *se*, and register (waiting for the hub's
        answer, unless told not to)."""
        ws = await websocket_connect(
            await env.open(HUB),
            host=HUB.host_header,
            target=f"/devices/{device_id or cs.device_id}/streams",
            headers=[("authorization", cs.sas_token(expiry=se))],
            subprotocols=[control.CONTROL_SUBPROTOCOL],
        )
        channel = cls(ws)
        await ws.send_text(channel.machine.send(control.Register(names=("echo",))))
        if wait_registered:
            assert isinstance(await channel.next_message(), control.Registered)
        return channel

    async def next_message(self) -> control.ControlMessage:
        while not self.inbox:
            event = await self.ws.receive()
            self.inbox.extend(
                self.machine.receive(payload(event), message_finished=event.message_finished)
            )
        return self.inbox.popleft()

    async def until_closed(self) -> tuple[list[control.ControlMessage], ConnectionClosed, float]:
        """Every message until the hub closes the channel, the close, and when it came."""
        messages: list[control.ControlMessage] = []
        try:
            while True:
                messages.append(await self.next_message())
        except ConnectionClosed as closed:
            return messages, closed, trio.current_time()

    async def accept(self, env: HubEnv) -> AnyStream:
        """Accept the next stream request and join its stream as the device."""
        request = await self.next_message()
        assert isinstance(request, control.StreamRequest), request
        await self.ws.send_text(self.machine.send(request.accept()))
        return await join_stream(
            request.url,
            request.token,
            role=Role.DEVICE,
            opener=env.open,
            mode=request.mode,
            nursery=env.nursery,
        )


async def echo_once(one: AnyStream, other: AnyStream, data: bytes) -> float:
    """Send *data* from *one* to *other* and back; return the virtual time it took."""
    start = trio.current_time()
    await one.send_all(data)
    assert await read_exactly(other, len(data)) == data  # type: ignore[arg-type]
    await other.send_all(data)
    assert await read_exactly(one, len(data)) == data  # type: ignore[arg-type]
    return trio.current_time() - start


# -- a control channel ends with its SAS token -------------------------------------------------


async def test_control_channel_closes_at_its_token_expiry(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(300):
        cs = await create_device(env, "d1")
        se = int(sas_clock()) + 50
        expires_at = se - BASE  # the token's se, on the virtual clock
        channel = await Channel.open(env, cs, se=se)
        svc = service(env)

        # A second before the expiry a stream request still reaches the channel; the device
        # leaves it unanswered.
        await trio.sleep_until(expires_at - 1)
        async with trio.open_nursery() as nursery:
            failed_at: list[float] = []

            async def initiate() -> None:
                with pytest.raises(DeviceNotOnline):
                    await svc.open_stream("d1", "echo", response_timeout=30)
                failed_at.append(trio.current_time())

            nursery.start_soon(initiate)
            messages, closed, closed_at = await channel.until_closed()
        assert isinstance(messages[0], control.StreamRequest)
        # At the expiry, not later: the hub says why, then closes with 4401 and the code.
        assert expires_at <= closed_at < expires_at + 0.01, closed_at - expires_at
        assert messages[1:] == [control.ErrorMessage(code=401002, message="SAS token expired")]
        assert closed.code == 4401
        assert closed.reason == "401002 SAS token expired"
        # The request waiting on it fails then too, not at its 30 s timeout.
        assert expires_at <= failed_at[0] < expires_at + 0.01
        # And the device is offline.
        with pytest.raises(DeviceNotOnline):
            await svc.open_stream("d1", "echo")
        assert (await svc.get_device("d1"))["connectionState"] == "Disconnected"


async def test_a_channel_opened_with_a_policy_token_ends_with_it_too(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(120):
        await create_device(env, "d1")
        await create_device(env, "d2")
        # The owner policy holds DeviceConnect: it may open any device's channel.
        se = int(sas_clock()) + 30
        expiring = await Channel.open(env, env.service_cs(), se=se, device_id="d1")
        disabled = await Channel.open(env, env.service_cs(), se=se + 3600, device_id="d2")
        await service(env).set_device_status("d2", "disabled")
        _, closed, closed_at = await disabled.until_closed()
        assert closed.reason.startswith("403902 ")
        _, closed, closed_at = await expiring.until_closed()
        assert se - BASE <= closed_at < se - BASE + 0.01
        assert closed.reason == "401002 SAS token expired"


async def test_device_renews_its_token_before_expiry_and_its_stream_keeps_flowing(
    env: HubEnv, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with trio.fail_after(600):
        cs = await create_device(env, "d1")
        client = device(env, cs, sas_lifetime=100)
        start = trio.current_time()
        await env.nursery.start(client.serve, {"echo": echo})
        stream = await service(env).open_stream("d1", "echo")  # devstream.v1
        assert isinstance(stream, FramedStream)
        seen: dict[float, int] = {}
        # One echo every 5 s for 250 s: across the renewals at 85 s and 170 s.
        for step in range(1, 51):
            await trio.sleep_until(start + 5 * step - 0.5)
            seen[5 * step - 0.5] = client.connections
            data = b"tick %d " % step * 100
            await stream.send_all(data)
            assert await read_exactly(stream, len(data)) == data  # type: ignore[arg-type]
            # No stall across a renewal: each echo takes milliseconds of virtual time.
            assert trio.current_time() - (start + 5 * step - 0.5) < 0.05
        # Renewed at 85 % of the 100 s lifetime, every time, before the expiry.
        assert seen[84.5] == 1 and seen[89.5] == 2
        assert seen[169.5] == 2 and seen[174.5] == 3
        assert seen[249.5] == 3
        assert client.online
        await stream.aclose()
    logged = caplog.text
    assert logged.count("renewed its SAS token") == 2
    assert "SAS token expired" not in logged


async def test_requests_during_a_renewal_reach_the_device(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """The device opens its next channel while the old one still serves: a stream asked for
    while the new channel's handshake is under way (half a second here) is not refused."""

    async def slow_open(address: HubAddress) -> trio.abc.Stream:
        await trio.sleep(0.5)
        return await env.open(address)

    with trio.fail_after(300):
        cs = await create_device(env, "d1")
        client = DeviceClient(cs, opener=slow_open, wall_clock=sas_clock, sas_lifetime=100)
        await env.nursery.start(client.serve, {"echo": echo})
        renew_at = trio.current_time() + 85  # 85 % of 100 s, give or take the handshake
        svc = service(env)
        times = [renew_at - 0.5 + 0.1 * step for step in range(20)]
        for when in times:
            await trio.sleep_until(when)
            stream = await svc.open_stream("d1", "echo", mode="raw")
            await stream.send_all(b"during")
            assert await read_exactly(stream, 6) == b"during"  # type: ignore[arg-type]
            await stream.aclose()
        assert client.connections == 2


class Laggy(trio.abc.Stream):
    """A connection whose bytes take ``delay`` seconds each way."""

    def __init__(self, inner: trio.abc.Stream, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await trio.sleep(self.delay)
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        # Shielded: cancelled in the delay, the bytes read would be lost, which no socket's
        # receive does.
        with trio.CancelScope(shield=True):
            await trio.sleep(self.delay)
        return data

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_requests_around_a_renewal_on_a_slow_link_all_reach_the_device(
    env: HubEnv, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """With 5 ms each way on the device's link, streams asked for every 4 ms around the
    hand-over all succeed: those the hub sent on the old channel are answered there, those
    asked for while the new one registers go to the old one, later ones to the new one."""
    caplog.set_level(logging.INFO)

    async def laggy_open(address: HubAddress) -> trio.abc.Stream:
        return Laggy(await env.open(address), 0.005)

    with trio.fail_after(300):
        cs = await create_device(env, "d1")
        client = DeviceClient(cs, opener=laggy_open, wall_clock=sas_clock, sas_lifetime=100)
        await env.nursery.start(client.serve, {"echo": echo})
        renew_at = trio.current_time() + 85
        svc = service(env)
        took: list[float] = []
        failed: list[tuple[float, int]] = []

        async def one(when: float) -> None:
            await trio.sleep_until(when)
            try:
                stream = await svc.open_stream("d1", "echo", mode="raw", response_timeout=5)
            except HubError as exc:
                failed.append((when - renew_at, int(exc.code)))
                return
            await stream.send_all(b"x")
            assert await read_exactly(stream, 1) == b"x"  # type: ignore[arg-type]
            took.append(trio.current_time() - when)
            await stream.aclose()

        async with trio.open_nursery() as nursery:
            for step in range(50):
                nursery.start_soon(one, renew_at - 0.1 + 0.004 * step)
        assert failed == []
        assert len(took) == 50
        # None waited for a timeout (5 s) or for the old channel's bound (ping_timeout): a
        # stream takes some 30 ms here, one sent on the new channel while the old one drains
        # a round trip or so more.
        assert max(took) < 0.5
        assert client.connections == 2
        assert client.online
    # The hub closed the old channel once its requests were answered, not at its expiry.
    assert "SAS token expired" not in caplog.text
    assert "renewed its SAS token" in caplog.text


async def test_a_replaced_channel_answers_its_pending_requests_then_is_closed(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Two agents with one device id: the second's Register takes new requests at once; the
    first still answers the request the hub had sent it, and is closed right after."""
    with trio.fail_after(60):
        cs = await create_device(env, "d1")
        se = int(sas_clock()) + 3600
        first = await Channel.open(env, cs, se=se)
        svc = service(env)
        opened: dict[str, AnyStream] = {}

        async def open_one(which: str) -> None:
            opened[which] = await svc.open_stream("d1", "echo", mode="raw", response_timeout=5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(open_one, "first")
            sent = await first.next_message()  # the hub sent it; not answered yet
            assert isinstance(sent, control.StreamRequest)
            second = await Channel.open(env, cs, se=se)
            nursery.start_soon(open_one, "second")
            device_side = await second.accept(env)  # the new request went to the new channel
            # The first channel answers its own request, and the hub then closes it.
            await first.ws.send_text(first.machine.send(sent.accept()))
            answered_at = trio.current_time()
            messages, closed, closed_at = await first.until_closed()
        assert sorted(opened) == ["first", "second"]
        assert (closed.code, closed.reason) == (4409, "409902 replaced by a newer connection")
        assert [m.code for m in messages if isinstance(m, control.ErrorMessage)] == [409902]
        assert closed_at - answered_at < 0.01
        # The second channel serves on.
        await opened["second"].send_all(b"on")
        assert await read_exactly(device_side, 2) == b"on"  # type: ignore[arg-type]


async def test_a_replaced_channel_whose_request_goes_unanswered_is_closed_at_its_deadline(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        cs = await create_device(env, "d1")
        se = int(sas_clock()) + 3600
        first = await Channel.open(env, cs, se=se)
        svc = service(env)
        async with trio.open_nursery() as nursery:

            async def unanswered() -> None:
                with pytest.raises(DeviceResponseTimeout):
                    await svc.open_stream("d1", "echo", mode="raw", response_timeout=5)

            start = trio.current_time()
            nursery.start_soon(unanswered)
            assert isinstance(await first.next_message(), control.StreamRequest)
            await Channel.open(env, cs, se=se)
            _, closed, closed_at = await first.until_closed()
        assert (closed.code, closed.reason) == (4409, "409902 replaced by a newer connection")
        assert 5 <= closed_at - start < 5.01


# -- keys rotated, device disabled or deleted ---------------------------------------------------


async def test_replacing_the_key_a_channel_signed_with_closes_it_at_once(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        cs = await create_device(env, "d1")
        svc = service(env)
        channel = await Channel.open(env, cs, se=int(sas_clock()) + 3600)

        # A new secondary key: the channel signed with the primary one stays.
        new_keys = {"secondaryKey": base64.b64encode(os.urandom(32)).decode()}
        body = {"deviceId": "d1", "authentication": {"symmetricKey": new_keys}}
        await put_device(svc, "d1", body)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: svc.open_stream("d1", "echo", response_timeout=5))
            request = await channel.next_message()
            assert isinstance(request, control.StreamRequest)
            nursery.cancel_scope.cancel()

        # A new primary key: the channel is closed within milliseconds.
        new_keys = {"primaryKey": base64.b64encode(os.urandom(32)).decode()}
        body = {"deviceId": "d1", "authentication": {"symmetricKey": new_keys}}
        changed_at = trio.current_time()
        await put_device(svc, "d1", body)
        messages, closed, closed_at = await channel.until_closed()
        assert closed_at - changed_at < 0.01
        assert closed.code == 4401
        assert closed.reason.startswith("401002 ") and "keys changed" in closed.reason
        assert [m.code for m in messages if isinstance(m, control.ErrorMessage)] == [401002]
        with pytest.raises(DeviceNotOnline):
            await svc.open_stream("d1", "echo")


async def test_a_key_replaced_while_a_channel_opens_closes_it_once_open(
    env: HubEnv, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The hub checks a channel's token, then answers its upgrade: a key replaced in between
    (the answer's write is made to take 10 ms here, as a slow TLS write would) is seen once
    the channel is open, and closes it, rather than leaving it served under the old key."""
    answer = HttpServerConnection.accept_websocket

    async def slow_answer(
        self: HttpServerConnection, request: HttpRequest, **options: Any
    ) -> WebSocket:
        await trio.sleep(0.01)
        return await answer(self, request, **options)

    monkeypatch.setattr(HttpServerConnection, "accept_websocket", slow_answer)
    with trio.fail_after(60):
        cs = await create_device(env, "d1")
        svc = service(env)
        opened: list[Channel] = []

        async def open_channel() -> None:
            channel = await Channel.open(env, cs, se=int(sas_clock()) + 3600, wait_registered=False)
            opened.append(channel)

        env.nursery.start_soon(open_channel)
        await trio.sleep(0.005)  # checked under the old key; the answer is on its way
        new_key = base64.b64encode(os.urandom(32)).decode()
        body = {
            "authentication": {"symmetricKey": {"primaryKey": new_key, "secondaryKey": new_key}}
        }
        changed_at = trio.current_time()
        await put_device(svc, "d1", body)
        while not opened:
            await trio.sleep(0.001)
        messages, closed, closed_at = await opened[0].until_closed()
        assert [m.code for m in messages if isinstance(m, control.ErrorMessage)] == [401002]
        assert closed_at - changed_at < 0.02
        assert closed.code == 4401
        assert closed.reason.startswith("401002 ")
        with pytest.raises(DeviceNotOnline):
            await svc.open_stream("d1", "echo")


async def test_a_policy_rotated_while_a_channel_opens_with_its_token_closes_it_once_open(
    env: HubEnv, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As above, for a channel opened with a policy's token (``DeviceConnect``): the policy's
    key rotated between the check and the answer is seen once the channel is listed."""
    answer = HttpServerConnection.accept_websocket

    async def slow_answer(
        self: HttpServerConnection, request: HttpRequest, **options: Any
    ) -> WebSocket:
        await trio.sleep(0.01)
        return await answer(self, request, **options)

    monkeypatch.setattr(HttpServerConnection, "accept_websocket", slow_answer)
    with trio.fail_after(60):
        await create_device(env, "d1")
        svc = service(env)
        gateway = svc.policy_connection_string(await svc.create_policy("gw", "DeviceConnect"))
        opened: list[Channel] = []

        async def open_channel() -> None:
            channel = await Channel.open(
                env, gateway, se=int(sas_clock()) + 3600, device_id="d1", wait_registered=False
            )
            opened.append(channel)

        env.nursery.start_soon(open_channel)
        await trio.sleep(0.005)  # checked under the old key; the answer is on its way
        changed_at = trio.current_time()
        await svc.rotate_policy_key("gw")
        while not opened:
            await trio.sleep(0.001)
        messages, closed, closed_at = await opened[0].until_closed()
        assert [m.code for m in messages if isinstance(m, control.ErrorMessage)] == [401002]
        assert closed_at - changed_at < 0.02
        assert closed.code == 4401
        with pytest.raises(DeviceNotOnline):
            await svc.open_stream("d1", "echo")


async def test_a_device_client_whose_key_is_replaced_stops_with_unauthorized(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        cs = await create_device(env, "d1")
        client = device(env, cs)
        failure: list[BaseException] = []

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            try:
                await client.serve({"echo": echo}, task_status=task_status)
            except Unauthorized as exc:
                failure.append(exc)

        await env.nursery.start(serve)
        changed_at = trio.current_time()
        new_key = base64.b64encode(os.urandom(32)).decode()
        body = {
            "authentication": {"symmetricKey": {"primaryKey": new_key, "secondaryKey": new_key}}
        }
        await put_device(service(env), "d1", body)
        while not failure:
            await trio.sleep(0.01)
        # One reconnect with a fresh token (after at most one backoff), refused: serve stops.
        assert trio.current_time() - changed_at < 1.0
        assert failure[0].code == 401002  # type: ignore[attr-defined]
        assert not client.online


@pytest.mark.parametrize("mode", ["devstream.v1", "raw"])
@pytest.mark.parametrize(
    ("change", "code", "error"),
    [("disable", 403902, DeviceDisabled), ("delete", 404001, DeviceNotFound)],
)
async def test_disabling_or_deleting_a_device_resets_its_streams_at_once(
    env: HubEnv,
    autojump_clock: trio.abc.Clock,
    mode: str,
    change: str,
    code: int,
    error: type[HubError],
) -> None:
    with trio.fail_after(60):
        cs = await create_device(env, "d1")
        svc = service(env)
        channel = await Channel.open(env, cs, se=int(sas_clock()) + 3600)
        async with trio.open_nursery() as nursery:
            opened: list[AnyStream] = []

            async def open_service_side() -> None:
                opened.append(await svc.open_stream("d1", "echo", mode=mode))

            nursery.start_soon(open_service_side)
            device_side = await channel.accept(env)
        (service_side,) = opened
        assert await echo_once(service_side, device_side, b"paired") < 0.01

        changed_at = trio.current_time()
        if change == "disable":
            await svc.set_device_status("d1", "disabled")
        else:
            await svc.delete_device("d1")
        for side in (service_side, device_side):
            with pytest.raises(trio.BrokenResourceError) as broken:
                while await side.receive_some():
                    pass
            assert isinstance(broken.value.__cause__, error), broken.value.__cause__
            assert broken.value.__cause__.code == code
        # At once: milliseconds, not the 30 s grace period.
        assert trio.current_time() - changed_at < 0.05
        _, closed, _ = await channel.until_closed()
        assert closed.reason.startswith(f"{code} ")
