"""The device client (keepalive, reconnects, handlers) and the service client's exceptions.

Test rules: no sockets (clients reach the hub through ``hub_env.open``, or through a wrapper
around it that a test controls), everything that waits runs on ``autojump_clock``, every wait
is bounded by ``trio.fail_after``. Randomness is seeded (``rng=random.Random(seed)``).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
from collections.abc import Callable, Mapping

import pytest
import trio
import trio.testing
from wsproto.connection import Connection, ConnectionType
from wsproto.events import Ping

from devstream_core import control
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_core.registry import Permission, new_key, new_policy
from devstream_trio.client.device import DeviceClient, Handler
from devstream_trio.client.service import ServiceClient
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import (
    DeviceDisabled,
    DeviceNotFound,
    DeviceNotOnline,
    DeviceResponseTimeout,
    HubError,
    HubUnreachable,
    PermissionDenied,
    StreamNameNotRegistered,
    StreamRejected,
    Unauthorized,
)
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpServerConnection
from devstream_trio.transport.websocket import payload

from .conftest import HubEnv
from .test_hub import ManualDevice, echo, read_exactly

# -- helpers ---------------------------------------------------------------------------------


class TapStream(trio.abc.Stream):
    """A client's transport to the hub that records what the client sends and can go silent.

    Once ``silent`` is set, nothing more reaches the hub and nothing more comes back: the
    hub looks alive to the operating system but never answers (a half-dead NAT mapping).
    """

    def __init__(self, inner: trio.abc.Stream, server: trio.abc.Stream) -> None:
        self.inner = inner
        #: The hub's end of this connection.
        self.server = server
        self.sent = bytearray()
        self.silent = False

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.silent:
            await trio.lowlevel.checkpoint()
            return
        self.sent += data
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        while True:
            if self.silent:
                await trio.sleep_forever()
            data = await self.inner.receive_some(max_bytes)
            if not self.silent:
                return data

    async def aclose(self) -> None:
        await self.inner.aclose()

    def pings_sent(self) -> int:
        """How many WebSocket pings the client sent on this connection."""
        _, _, frames = bytes(self.sent).partition(b"\r\n\r\n")
        parser = Connection(ConnectionType.SERVER)
        parser.receive_data(frames)
        return sum(isinstance(event, Ping) for event in parser.events())


class Tap:
    """An opener that wraps every connection in a :class:`TapStream` and logs when it opened.

    ``fail_first`` makes that many opens fail as if the hub were unreachable.
    """

    def __init__(self, env: HubEnv, *, fail_first: int = 0) -> None:
        self.env = env
        self.fail_first = fail_first
        self.attempts: list[float] = []
        self.streams: list[TapStream] = []

    async def __call__(self, address: HubAddress) -> trio.abc.Stream:
        self.attempts.append(trio.current_time())
        if len(self.attempts) <= self.fail_first:
            await trio.lowlevel.checkpoint()
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, "connection refused")
        inner = await self.env.open(address)
        stream = TapStream(inner, self.env.server_streams[-1])
        self.streams.append(stream)
        return stream

    def control_channel(self) -> TapStream:
        """The latest control-channel connection (the device's stream joins use the tap too)."""
        return [s for s in self.streams if s.sent.startswith(b"GET /devices/")][-1]


def device_with(env: HubEnv, cs: ConnectionString, opener: Tap, **options: object) -> DeviceClient:
    return DeviceClient(cs, opener=opener, **options)  # type: ignore[arg-type]


async def wait_for(condition: Callable[[], bool], *, step: float = 0.01) -> None:
    while not condition():
        await trio.sleep(step)


async def round_trip(env: HubEnv, device_id: str, data: bytes = b"are you there?") -> None:
    stream = await env.service().open_stream(device_id, "echo")
    await stream.send_all(data)
    assert await read_exactly(stream, len(data)) == data
    await stream.aclose()


# -- keepalive -------------------------------------------------------------------------------


async def test_device_pings_and_the_hub_keeps_it(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    tap = Tap(hub_env)
    device = device_with(hub_env, cs, tap, ping_interval=5.0, ping_timeout=5.0)
    with trio.fail_after(400):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        start = trio.current_time()
        # Far longer than the hub's idle limit for a silent control channel (90 s).
        await trio.sleep(300)
        assert trio.current_time() - start >= 300
        assert device.connections == 1
        assert len(tap.attempts) == 1
        assert device.online
        pings = tap.streams[0].pings_sent()
        assert 300 / 5 - 2 <= pings <= 300 / 5 + 1
        await round_trip(hub_env, "d1")


async def test_hub_drops_a_device_that_never_pings(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    tap = Tap(hub_env)
    device = device_with(hub_env, cs, tap, ping_interval=1000.0, ping_timeout=1000.0)
    with trio.fail_after(200):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        start = trio.current_time()
        await wait_for(lambda: device.connections == 2, step=0.5)
        dropped_after = tap.attempts[1] - start
        # The hub's control_idle_timeout, plus a reconnect backoff of at most backoff_min.
        idle = hub_env.hub.config.control_idle_timeout
        assert idle <= dropped_after <= idle + 1.0
        assert tap.streams[0].pings_sent() == 0
        await round_trip(hub_env, "d1")


@pytest.mark.parametrize("silent_after", [10.001, 12.5, 14.999])
async def test_silent_hub_is_detected_and_the_device_reconnects(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, silent_after: float
) -> None:
    cs = await hub_env.create_device("d1")
    tap = Tap(hub_env)
    interval, timeout = 5.0, 3.0
    device = device_with(
        hub_env,
        cs,
        tap,
        ping_interval=interval,
        ping_timeout=timeout,
        backoff_min=0.01,
        rng=random.Random(7),
    )
    with trio.fail_after(100):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        start = trio.current_time()
        await trio.sleep_until(start + silent_after)
        tap.streams[0].silent = True
        silent_at = trio.current_time()
        await wait_for(lambda: len(tap.attempts) == 2)
        detected_after = tap.attempts[1] - silent_at
        assert detected_after <= interval + timeout + 0.01
        # Not before a ping went unanswered for ping_timeout.
        assert detected_after >= timeout
        await wait_for(lambda: device.connections == 2)
        assert device.online
        await round_trip(hub_env, "d1")


# -- reconnects and backoff ------------------------------------------------------------------


async def _failing_attempts(env: HubEnv, cs: ConnectionString, seed: int) -> list[float]:
    """Gaps between connection attempts of a device whose first 12 attempts fail."""
    tap = Tap(env, fail_first=12)
    device = device_with(env, cs, tap, backoff_min=1.0, backoff_max=8.0, rng=random.Random(seed))
    with trio.fail_after(200):
        async with trio.open_nursery() as nursery:
            await nursery.start(device.serve, {"echo": echo})
            assert device.connections == 1
            nursery.cancel_scope.cancel()
    assert len(tap.attempts) == 13
    return [later - earlier for earlier, later in itertools.pairwise(tap.attempts)]


async def test_backoff_grows_with_jitter_within_bounds(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    gaps = await _failing_attempts(hub_env, cs, seed=2024)
    ceilings = [min(8.0, 1.0 * 2 ** (n - 1)) for n in range(1, 13)]
    assert ceilings[:5] == [1.0, 2.0, 4.0, 8.0, 8.0]
    for gap, ceiling in zip(gaps, ceilings, strict=True):
        # Full jitter: anywhere from no wait to the ceiling.
        assert 0 <= gap <= ceiling + 1e-9
    # It grows: the late waits are longer than the early ones could ever be.
    assert max(gaps[4:]) > 2.0
    assert sum(gaps[4:]) / len(gaps[4:]) > sum(gaps[:2]) / 2
    # It is jittered, and the jitter comes from the rng only: the same seed replays exactly.
    assert len({round(gap, 6) for gap in gaps[4:]}) > 1
    assert await _failing_attempts(hub_env, cs, seed=2024) == pytest.approx(gaps, abs=1e-6)
    assert await _failing_attempts(hub_env, cs, seed=2025) != pytest.approx(gaps, abs=1e-6)


async def test_reconnects_after_a_drop_and_backoff_starts_small_again(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    tap = Tap(hub_env, fail_first=5)
    device = device_with(hub_env, cs, tap, backoff_min=1.0, backoff_max=30.0, rng=random.Random(3))
    with trio.fail_after(200):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        assert (device.connections, len(tap.attempts)) == (1, 6)
        for drop in (1, 2, 3):
            # The hub's end of the connection breaks (a hub restart, a NAT timeout...).
            dropped_at = trio.current_time()
            await trio.aclose_forcefully(tap.control_channel().server)
            while device.connections == drop:
                await trio.sleep(0.01)
            assert device.connections == drop + 1
            # A success reset the failure count: the first retry waits at most backoff_min.
            assert tap.attempts[-1] - dropped_at <= 1.0
            await round_trip(hub_env, "d1", f"after drop {drop}".encode())
            await trio.sleep(30)
        assert device.connections == 4


# -- handlers --------------------------------------------------------------------------------


async def test_a_handler_that_raises_does_not_stop_the_device(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    crashes = 0

    async def boom(stream: HubStream) -> None:
        nonlocal crashes
        await stream.receive_some()
        crashes += 1
        raise RuntimeError("handler bug")

    cs = await hub_env.create_device("d1")
    device = hub_env.device(cs)
    with trio.fail_after(30):
        await hub_env.nursery.start(device.serve, {"echo": echo, "boom": boom})
        for _ in range(5):
            stream = await hub_env.service().open_stream("d1", "boom")
            await stream.send_all(b"trigger")
            # The crashed handler's stream is closed: the service sees the end of it.
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some() == b""
            await stream.aclose()
        assert crashes == 5
        assert device.online and device.connections == 1
        await round_trip(hub_env, "d1")


async def test_unregistered_name_is_rejected_with_a_readable_reason(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    await hub_env.nursery.start(hub_env.device(cs).serve, {"echo": echo})
    with trio.fail_after(10), pytest.raises(StreamRejected) as rejected:
        await hub_env.service().open_stream("d1", "ssh")
    assert isinstance(rejected.value, StreamNameNotRegistered)
    assert rejected.value.code == 404901
    assert "did not register" in rejected.value.message


async def test_device_rejects_a_request_it_has_no_handler_for(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """A hub that asks for a name the device never offered gets a no, with the reason."""
    answers: list[control.StreamResponse] = []
    done = trio.Event()

    async def confused_hub(stream: trio.abc.Stream) -> None:
        http = HttpServerConnection(stream)
        request = await http.next_request()
        assert request is not None
        ws = await http.accept_websocket(request, subprotocol=control.CONTROL_SUBPROTOCOL)
        machine = control.HubControl()
        while True:
            event = await ws.receive()
            for message in machine.receive(payload(event), message_finished=event.message_finished):
                if isinstance(message, control.Register):
                    assert message.names == ("echo",)
                    await ws.send_text(machine.send(control.Registered(names=message.names)))
                    await ws.send_text(
                        machine.send(
                            control.StreamRequest(
                                request_id="r1",
                                name="ssh",
                                url="ws://hub.test:8080/bridges/AAAAAAAAAAAAAAAAAAAAAA?role=device",
                                token="opaque-token",
                            )
                        )
                    )
                elif isinstance(message, control.StreamResponse):
                    answers.append(message)
                    done.set()

    async def opener(address: HubAddress) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        hub_env.nursery.start_soon(confused_hub, server)
        return client

    cs = ConnectionString(
        host_name="hub.test:8080",
        device_id="d1",
        shared_access_key=new_key(os.urandom(32)),
        use_tls=False,
    )
    device = DeviceClient(cs, opener=opener)
    with trio.fail_after(10):
        await hub_env.nursery.start(device.serve, {"echo": echo})
        await done.wait()
    (answer,) = answers
    assert answer.request_id == "r1"
    assert answer.accepted is False
    assert "ssh" in answer.reason and "handler" in answer.reason


async def test_wildcard_handler_accepts_any_name(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    names: list[str] = []

    async def named(stream: HubStream) -> None:
        names.append(stream.name)
        await stream.send_all(f"you asked for {stream.name}".encode())

    cs = await hub_env.create_device("d1")
    handlers: Mapping[str, Handler] = {"echo": echo, "*": named}
    await hub_env.nursery.start(hub_env.device(cs).serve, handlers)
    with trio.fail_after(10):
        for name in ("ssh", "rdp", "x.y-z_9"):
            stream = await hub_env.service().open_stream("d1", name)
            expected = f"you asked for {name}".encode()
            assert await read_exactly(stream, len(expected)) == expected
            await stream.aclose()
        # A listed name still goes to its own handler.
        await round_trip(hub_env, "d1")
    assert names == ["ssh", "rdp", "x.y-z_9"]


# -- the service client's exceptions ---------------------------------------------------------


async def test_service_raises_one_exception_class_per_code(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    service = hub_env.service()
    await hub_env.create_device("offline")
    await hub_env.create_device("disabled")
    await service.set_device_status("disabled", "disabled")
    online = await hub_env.create_device("online")
    await hub_env.nursery.start(hub_env.device(online).serve, {"echo": echo})
    manual = await ManualDevice.connect(hub_env, await hub_env.create_device("manual"))

    async def reject_then_ignore() -> None:
        request = await manual.next_request()
        await manual.send(request.reject("maintenance window"))
        await manual.next_request()

    wrong_key = ConnectionString(
        host_name="hub.test:8080",
        shared_access_key_name="iothubowner",
        shared_access_key=new_key(os.urandom(32)),
        use_tls=False,
    )
    reader = new_policy(
        name="reader", random_bytes=os.urandom(64), permissions=Permission.REGISTRY_READ
    )
    await hub_env.store.put_policy(reader)

    async def expect(
        kind: type[HubError], code: int, device_id: str, name: str = "echo", **kw: object
    ) -> HubError:
        with pytest.raises(kind) as raised:
            await service.open_stream(device_id, name, **kw)  # type: ignore[arg-type]
        assert raised.value.code == code
        assert raised.value.message
        return raised.value

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(reject_then_ignore)
            rejected = await expect(StreamRejected, 403903, "manual")
            assert not isinstance(rejected, StreamNameNotRegistered)
            assert rejected.message == "maintenance window"
            start = trio.current_time()
            await expect(DeviceResponseTimeout, 504101, "manual", response_timeout=3)
            assert 3 <= trio.current_time() - start < 3.5
        await expect(DeviceNotFound, 404001, "ghost")
        await expect(DeviceNotOnline, 404103, "offline")
        await expect(DeviceDisabled, 403902, "disabled")
        await expect(StreamNameNotRegistered, 404901, "online", "ssh")
        with pytest.raises(Unauthorized) as unauthorized:
            await ServiceClient(wrong_key, opener=hub_env.open).open_stream("online", "echo")
        assert unauthorized.value.code == 401002
        with pytest.raises(PermissionDenied) as denied:
            await hub_env.service(reader).open_stream("online", "echo")
        assert denied.value.code == 403901
        # The registry calls map codes the same way.
        with pytest.raises(DeviceNotFound):
            await service.get_device("ghost")
        with pytest.raises(HubError) as exists:
            await service.create_device("online")
        assert exists.value.code == 409001
        with pytest.raises(PermissionDenied):
            await hub_env.service(reader).create_device("new")


# -- permanent errors ------------------------------------------------------------------------


@pytest.mark.parametrize("problem", ["wrong-key", "unknown-device", "disabled"])
async def test_permanent_errors_end_serve_instead_of_retrying(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, problem: str
) -> None:
    cs = await hub_env.create_device("d1")
    expected: type[HubError]
    if problem == "wrong-key":
        cs = ConnectionString(
            host_name=cs.host_name,
            device_id="d1",
            shared_access_key=new_key(os.urandom(32)),
            use_tls=False,
        )
        expected = Unauthorized
    elif problem == "unknown-device":
        await hub_env.service().delete_device("d1")
        expected = DeviceNotFound
    else:
        await hub_env.service().set_device_status("d1", "disabled")
        expected = DeviceDisabled
    tap = Tap(hub_env)
    device = device_with(hub_env, cs, tap)
    with trio.fail_after(10):
        start = trio.current_time()
        with pytest.raises(expected):
            await device.serve({"echo": echo})
    assert len(tap.attempts) == 1
    assert trio.current_time() == start
    assert device.connections == 0 and not device.online
