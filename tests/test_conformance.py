"""The client conformance suite: each behaviour written once, run with the trio clients and
with the asyncio clients, against one real trio hub (in a thread, behind a tap; see
``tests/_conformance.py``).

Rules: loopback only, port 0; nothing sleeps or polls: a test waits for a predicate that is
checked again at each change it can see (the tap counting pings, registrations and cuts in
the hub's thread, a device client's ``connections`` and ``online``, a task's end, the test's
own ``notify``), with short intervals configured where time must pass, and asserts what
happened (bytes and their SHA-256, error classes and codes, pings the hub received,
reconnections, the window that stopped a writer), never how long it took. Every test body
runs under a 15 s limit (real time: the hub runs in a thread of its own, with real sockets,
so no virtual clock spans both sides; the limit only bounds a failure).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from devstream_core.credentials import make_sas_token
from devstream_core.exceptions import (
    DeviceNotFound,
    DeviceNotOnline,
    DeviceReplaced,
    StreamNameNotRegistered,
    StreamRejected,
    StreamReset,
    Unauthorized,
)
from devstream_core.framing import EndpointState, RecvState
from devstream_core.session import RefusalBackoff
from devstream_trio.server.hub import HubConfig

from ._conformance import DRIVERS, AsyncioDriver, Body, Driver, HubThread
from .test_no_cycles import cycles_left_by

README = Path(__file__).resolve().parent.parent / "README.md"

MODES = ["raw", "devstream.v1"]


@pytest.fixture(scope="module")
def hub() -> Iterator[HubThread]:
    thread = HubThread().start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def tls_hub() -> Iterator[HubThread]:
    thread = HubThread(tls=True, devices=4).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def idle_hub() -> Iterator[HubThread]:
    """A hub that closes a control channel silent for 0.3 s."""
    thread = HubThread(config=HubConfig(control_idle_timeout=0.3), devices=4).start()
    yield thread
    thread.stop()


@pytest.fixture(params=sorted(DRIVERS))
def driver(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def run_with(driver: str, hub: HubThread, body: Body) -> None:
    """Run a test body with one driver (``trio.run`` or ``asyncio.run``) against *hub*."""
    DRIVERS[driver](hub).run(body, timeout=15)


@pytest.fixture
def run(driver: str, hub: HubThread) -> Any:
    return partial(run_with, driver, hub)


async def read_all(stream: Any) -> bytes:
    received = bytearray()
    while data := await stream.receive_some():
        received += data
    return bytes(received)


async def echo(stream: Any) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


def wrong_key(cs: Any) -> Any:
    return dataclasses.replace(cs, shared_access_key="d3Jvbmcga2V5IHdyb25nIGtleQ==")


@pytest.mark.parametrize("one_step", [True, False], ids=["one-step", "post"])
@pytest.mark.parametrize("mode", MODES)
def test_stream_opens_and_carries_bytes_both_ways(run: Any, mode: str, one_step: bool) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.device(cs, {"echo": echo}), d.service() as service:
            service.one_step = None if one_step else False  # False: POST, then join
            stream = await service.open_stream(cs.device_id, "echo", mode=mode)
            await stream.send_all(b"hello, device")
            received = b""
            while len(received) < 13:
                received += await stream.receive_some()
            assert received == b"hello, device"
            assert service.one_step is one_step
            await stream.aclose()

    run(body)


def test_errors_carry_the_hub_codes(run: Any) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.service() as service:
            error = await d.error_of(service.open_stream("no-such-device", "echo"))
            assert isinstance(error, DeviceNotFound) and error.code == 404001
            error = await d.error_of(service.open_stream(cs.device_id, "echo"))
            assert isinstance(error, DeviceNotOnline) and error.code == 404103
        assert d.hub.service_cs is not None
        async with d.service(wrong_key(d.hub.service_cs)) as service:
            error = await d.error_of(service.open_stream(cs.device_id, "echo"))
            assert isinstance(error, Unauthorized) and error.code == 401002
        error = await d.serve_error(wrong_key(cs), {"echo": echo})
        assert isinstance(error, Unauthorized) and error.code == 401002
        async with d.device(cs, {"echo": echo}), d.service() as service:
            error = await d.error_of(service.open_stream(cs.device_id, "ssh"))
            assert isinstance(error, StreamRejected)
            assert isinstance(error, StreamNameNotRegistered) and error.code == 404901

    run(body)


async def echoes(d: Driver, device_id: str, data: bytes) -> None:
    """A stream to *device_id*'s echo carries *data* there and back."""
    async with d.service() as service:
        stream = await service.open_stream(device_id, "echo")
        await stream.send_all(data)
        received = b""
        while len(received) < len(data):
            received += await stream.receive_some()
        assert received == data
        await stream.aclose()


def test_of_two_clients_with_one_device_id_the_older_gives_way_and_stops(run: Any) -> None:
    """The hub closes the older channel with 409902; replaced, a client waits (half to all of
    ``backoff_max``), takes the device back once, and stops when replaced again; the newer one
    stays online."""

    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        older = d.client(cs, backoff_min=0.1, backoff_max=0.4)
        newer = d.client(cs, backoff_min=0.1, backoff_max=0.4)
        older_task = d.start(lambda: older.serve({"echo": echo}))
        await d.wait_for(lambda: older.online)
        newer_task = d.start(lambda: newer.serve({"echo": echo}))
        await d.wait_for(lambda: older_task.done, timeout=10)
        error = d.core_error(older_task.error) if older_task.error else None
        assert isinstance(error, DeviceReplaced) and error.code == 409902
        assert "another client uses this device id" in error.message
        await d.wait_for(lambda: newer.online)
        assert not newer_task.done
        await echoes(d, cs.device_id, b"the newer one")
        assert newer.online and not newer_task.done

    run(body)


def test_a_refused_device_with_a_refusal_backoff_comes_back_once_enabled(
    run: Any, caplog: pytest.LogCaptureFixture
) -> None:
    def refusals() -> int:
        return sum("the hub refuses it" in r.getMessage() for r in list(caplog.records))

    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        await d.in_thread(d.hub.set_device_status, cs.device_id, "disabled")
        try:
            client = d.client(cs, refusal_backoff=RefusalBackoff(base=0.05, cap=0.2))
            task = d.start(lambda: client.serve({"echo": echo}))
            await d.wait_for(lambda: refusals() >= 3)
            assert not task.done and not client.online
        finally:
            await d.in_thread(d.hub.set_device_status, cs.device_id, "enabled")
        await d.wait_for(lambda: client.online)
        await echoes(d, cs.device_id, b"back again")
        assert not task.done

    caplog.clear()
    run(body)
    assert all("403902" in r.getMessage() for r in caplog.records if "refuses" in r.getMessage())


def test_half_close_still_receives(run: Any) -> None:
    async def reply_after_eof(stream: Any) -> None:
        data = await read_all(stream)
        await stream.send_all(b"got %d bytes" % len(data))
        await stream.send_all(data[::-1])

    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.device(cs, {"rev": reply_after_eof}), d.service() as service:
            stream = await service.open_stream(cs.device_id, "rev", mode="devstream.v1")
            await stream.send_all(b"abc" * 1000)
            await stream.send_eof()
            assert await read_all(stream) == b"got 3000 bytes" + b"cba" * 1000
            await stream.aclose()

    run(body)


def test_reset_reaches_the_peer_with_its_code(run: Any) -> None:
    async def body(d: Driver) -> None:
        seen: list[BaseException] = []

        async def victim(stream: Any) -> None:
            seen.append(await d.error_of(read_all(stream)))
            d.notify()

        cs = d.hub.new_device()
        async with d.device(cs, {"victim": victim}), d.service() as service:
            stream = await service.open_stream(cs.device_id, "victim", mode="devstream.v1")
            await stream.send_all(b"some bytes first")
            await stream.reset(4242, "changed my mind")
            await d.wait_for(lambda: seen)
            error = seen[0]
            assert isinstance(error, StreamReset), error
            assert error.reset_code == 4242 and "changed my mind" in str(error)
            await stream.aclose()

    run(body)


def test_a_device_reset_reaches_the_service(run: Any) -> None:
    async def refuse(stream: Any) -> None:
        assert await stream.receive_some() == b"please"
        await stream.reset(7, "not today")

    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.device(cs, {"refuse": refuse}), d.service() as service:
            stream = await service.open_stream(cs.device_id, "refuse", mode="devstream.v1")
            await stream.send_all(b"please")
            error = await d.error_of(read_all(stream))
            assert isinstance(error, StreamReset) and error.reset_code == 7, error
            await stream.aclose()

    run(body)


def test_flow_control_blocks_a_writer_while_the_reader_does_not_read(run: Any) -> None:
    window, total = 4096, 256 * 1024

    async def body(d: Driver) -> None:
        go = d.event()

        async def slow_reader(stream: Any) -> None:
            await go.wait()
            data = await read_all(stream)
            await stream.send_all(hashlib.sha256(data).hexdigest().encode())

        payload = bytes(range(256)) * (total // 256)
        cs = d.hub.new_device()
        async with d.device(cs, {"slow": slow_reader}), d.service(window=window) as service:
            stream = await service.open_stream(cs.device_id, "slow", mode="devstream.v1")
            stalled_at: list[int] = []

            async def write() -> None:
                for start in range(0, total, 1024):
                    if stream.endpoint.send_capacity == 0 and not stalled_at:
                        # The window is full and the reader reads nothing: this send
                        # waits until it does.
                        stalled_at.append(start)
                        d.notify()
                    await stream.send_all(payload[start : start + 1024])
                await stream.send_eof()

            writer = d.start(write)
            await d.wait_for(lambda: stalled_at or writer.done)
            assert not writer.done
            assert stalled_at == [window], stalled_at
            assert stream.endpoint.send_capacity == 0
            go.set()
            await d.wait_for(lambda: writer.done)
            assert writer.error is None
            assert await read_all(stream) == hashlib.sha256(payload).hexdigest().encode()
            await stream.aclose()

    run(body)


def test_framed_stream_resumes_across_cut_connections(run: Any) -> None:
    total, chunk = 1024 * 1024, 16 * 1024

    async def digest(stream: Any) -> None:
        await stream.send_all(b"R")  # joined: cuts from now on hit a stream, not a join
        data = await read_all(stream)
        await stream.send_all(b"%d:" % len(data) + hashlib.sha256(data).hexdigest().encode())

    async def body(d: Driver) -> None:
        payload = hashlib.sha256(b"seed").digest() * (total // 32)
        cs = d.hub.new_device()
        options = {"backoff_min": 0.05, "backoff_max": 0.2}
        async with d.device(cs, {"sha": digest}, **options), d.service() as service:
            stream = await service.open_stream(cs.device_id, "sha", mode="devstream.v1")
            assert await stream.receive_some(1) == b"R"
            for start in range(0, total, chunk):
                if start in (total // 3 // chunk * chunk, 2 * total // 3 // chunk * chunk):
                    cuts = d.hub.tap.cuts
                    d.hub.cut()
                    await d.wait_for(lambda cuts=cuts: d.hub.tap.cuts > cuts)
                await stream.send_all(payload[start : start + chunk])
            await stream.send_eof()
            answer = await read_all(stream)
            assert answer == b"%d:" % total + hashlib.sha256(payload).hexdigest().encode()
            assert stream.resumes >= 1
            await stream.aclose()

    run(body)


def _a_service_stream(head: bytes) -> bool:
    """A service's stream connection: a one-step open, or a join as the service."""
    line = head.split(b"\r\n", 1)[0]
    return line.startswith(b"GET /twins/") or b"role=service" in line


def test_a_framed_stream_finds_a_reset_at_the_hubs_end_between_messages(run: Any) -> None:
    """The service's stream connection is reset at the hub's end only, right after the hub
    passed on a message: the hub holds the stream, the service hears nothing more, and its
    end stays open until it writes. The device's answer, and its acknowledgement, stay at the
    hub. The service's byte waits for an acknowledgement that cannot come: it pings
    (ACK_PROBE after the byte went out), the write meets the reset, it resumes, and the answer
    arrives, well before the next ping would have found the cut (10 s)."""

    async def body(d: Driver) -> None:
        got_b, go = d.event(), d.event()

        async def answer_when_told(stream: Any) -> None:
            assert await stream.receive_some(1) == b"a"
            await stream.send_all(b"A")
            assert await stream.receive_some(1) == b"b"
            got_b.set()
            await go.wait()
            await stream.send_all(b"B")
            assert await read_all(stream) == b""

        cs = d.hub.new_device()
        async with d.device(cs, {"up": answer_when_told}), d.service() as service:
            stream = await service.open_stream(cs.device_id, "up", mode="devstream.v1")
            await stream.send_all(b"a")
            assert await stream.receive_some(1) == b"A"
            await stream.send_all(b"b")
            await got_b.wait()  # passed on by the hub: the cut comes between messages
            cuts = d.hub.tap.cuts
            d.hub.cut_at_the_hub(_a_service_stream)
            await d.wait_for(lambda: d.hub.tap.cuts == cuts + 1)
            go.set()
            async with d.time_limit(3):
                assert await stream.receive_some(1) == b"B"
            assert stream.resumes == 1
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()

    run(body)


def test_a_framed_stream_leaves_a_silent_connection_after_its_probe(run: Any) -> None:
    """The network under the service's stream connection goes silent both ways (a NAT that
    forgot it): neither end hears of it. The service's next byte is swallowed and waits for
    its acknowledgement; its probe ping (ACK_PROBE) goes unanswered, and once the probe
    timeout passes (here ``ping_timeout``, 1 s, below PROBE_TIMEOUT) it drops the connection
    and resumes: the byte goes again, and the answer arrives, long before the keepalive's
    rule would have dropped the connection (11 s of silence here)."""

    async def body(d: Driver) -> None:
        async def answer(stream: Any) -> None:
            assert await stream.receive_some(1) == b"a"
            await stream.send_all(b"A")
            assert await stream.receive_some(1) == b"b"
            await stream.send_all(b"B")
            assert await read_all(stream) == b""

        cs = d.hub.new_device()
        async with d.device(cs, {"up": answer}), d.service(ping_timeout=1.0) as service:
            stream = await service.open_stream(cs.device_id, "up", mode="devstream.v1")
            await stream.send_all(b"a")
            assert await stream.receive_some(1) == b"A"  # a message came: the hub reads it
            assert await d.in_thread(d.hub.silence, _a_service_stream) == 1
            async with d.time_limit(4):
                await stream.send_all(b"b")
                assert await stream.receive_some(1) == b"B"
            assert stream.resumes == 1
            await stream.send_eof()
            assert await read_all(stream) == b""
            await stream.aclose()

    run(body)


def _a_device_stream(head: bytes) -> bool:
    """A device's stream connection: its join."""
    line = head.split(b"\r\n", 1)[0]
    return line.startswith(b"GET /bridges/") and b"role=device" in line


@pytest.mark.parametrize(
    ("slow", "direction"),
    [(_a_device_stream, "to_client"), (_a_service_stream, "to_hub")],
    ids=["peer on a slow link", "slow uplink"],
)
def test_a_framed_stream_on_a_slow_link_keeps_its_connection(
    run: Any, slow: Callable[[bytes], bool], direction: str
) -> None:
    """The window is larger than the transfer (no Acks on the way), the service's probe
    timeout is 2 s (``ping_timeout``; it counts once a message came from the device), and one
    link carries its bytes at 100 kB/s, a little at a time:

    * the device's stream connection, the hub's bytes to it: the hub's writes to the device
      wait seconds each, and meanwhile it reads nothing from the service, whose probe pings
      wait unanswered;
    * the service's, its bytes to the hub: its probe pings come after what it sent before
      them, seconds late.

    The hub's own pongs, every second while a write waits and while the service's bytes keep
    arriving, keep the service from taking its connection as lost: the 512 KiB arrive with no
    resume on either side (both drivers resumed without them, both ways)."""

    size = 512 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def body(d: Driver) -> None:
        joined = d.event()

        async def check_then_answer(stream: Any) -> None:
            await stream.send_all(b"ready")
            joined.set()
            assert await read_all(stream) == payload
            await stream.send_all(b"ok")
            await stream.send_eof()

        cs = d.hub.new_device()
        async with (
            d.device(cs, {"up": check_then_answer}),
            d.service(window=16 * 1024 * 1024, ping_timeout=2.0) as service,
        ):
            stream = await service.open_stream(cs.device_id, "up", mode="devstream.v1")
            # A message came from the device: the service's probes count from here on.
            assert await stream.receive_some(5) == b"ready"
            await joined.wait()  # the device's join went through the tap
            assert await d.in_thread(d.hub.slow_down, slow, 100_000, direction) == 1
            async with d.time_limit(30):
                await stream.send_all(payload)
                await stream.send_eof()
                assert await read_all(stream) == b"ok"
            assert stream.resumes == 0
            await stream.aclose()

    run(body)


@pytest.mark.parametrize("ack_alone", [False, True], ids=["ack with the close", "ack alone"])
def test_a_framed_stream_cut_while_the_peers_close_passes_ends_cleanly(
    run: Any, ack_alone: bool
) -> None:
    """Both sides sent their EOF and the service read the device's. The service's stream
    connection is then reset at the hub's end only, and the device reads the service's EOF:
    its Ack of it and its close go to a hub that holds the service (in one message, or
    *ack_alone*: the Ack on its own, read by the hub before the close comes). The service's
    EOF waits for that Ack: its ``aclose`` pings (ACK_PROBE), the write meets the reset, it
    resumes, and the hub sends it the device's last message and close: the stream completes
    on both sides (the service's resume was refused with 404902 before: the stream had
    ended). The hub reads every connection into one buffer: the last message it keeps must
    be its own copy, not a view that the next read overwrites."""

    async def body(d: Driver) -> None:
        go = d.event()
        device_streams: list[Any] = []

        async def close_first(stream: Any) -> None:
            await stream.send_all(b"answer")
            await stream.send_eof()
            device_streams.append(stream)
            d.notify()
            await go.wait()
            assert await read_all(stream) == b"request"
            if ack_alone:
                # The Ack of the EOF goes out on its own (ACK_DELAY after the read); the
                # close follows once the hub has had time to read the Ack by itself.
                while stream.endpoint.owes_ack or stream.endpoint.has_output:
                    await d.in_thread(time.sleep, 0.002)
                await d.in_thread(time.sleep, 0.05)
            await stream.aclose()
            device_streams.append(stream)
            d.notify()

        def device_waits() -> bool:
            if not device_streams:
                return False
            endpoint = device_streams[0].endpoint
            return bool(endpoint.eof_acked and endpoint.recv_state is RecvState.EOF_RECEIVED)

        cs = d.hub.new_device()
        async with d.device(cs, {"up": close_first}), d.service() as service:
            stream = await service.open_stream(cs.device_id, "up", mode="devstream.v1")
            await stream.send_all(b"request")
            await stream.send_eof()
            assert await read_all(stream) == b"answer"
            async with d.time_limit(5):
                while not device_waits():  # nothing tells of the frames' arrival: polled
                    await d.in_thread(time.sleep, 0.002)
            cuts = d.hub.tap.cuts
            d.hub.cut_at_the_hub(_a_service_stream)
            await d.wait_for(lambda: d.hub.tap.cuts == cuts + 1)
            go.set()
            async with d.time_limit(3):
                await stream.aclose()
                await d.wait_for(lambda: len(device_streams) == 2)
            assert stream.resumes == 1
            for side in (stream, device_streams[0]):
                assert side.endpoint.state is EndpointState.DONE

    run(body)


@pytest.mark.parametrize("mode", MODES)
def test_streams_over_tls(driver: str, tls_hub: HubThread, mode: str) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.device(cs, {"echo": echo}), d.service() as service:
            stream = await service.open_stream(cs.device_id, "echo", mode=mode)
            await stream.send_all(b"over TLS")
            received = b""
            while len(received) < 8:
                received += await stream.receive_some()
            assert received == b"over TLS"
            await stream.aclose()

    run_with(driver, tls_hub, body)


def test_keepalive_pings_reach_the_hub(run: Any) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.device(cs, {"echo": echo}, ping_interval=0.05, ping_timeout=2.0):
            await d.wait_for(lambda: d.hub.pings(cs.device_id) >= 3)

    run(body)


def test_the_device_renews_its_token_on_a_new_channel_and_serves_on(run: Any) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        # A 2 s token: renewed at 85 %, on a second channel registered while the first serves.
        async with d.device(cs, {"echo": echo}, sas_lifetime=2) as device:
            await d.wait_for(lambda: device.connections >= 2)
            assert device.online
            async with d.service() as service:
                stream = await service.open_stream(cs.device_id, "echo", mode="devstream.v1")
                await stream.send_all(b"renewed")
                await stream.send_eof()
                assert await read_all(stream) == b"renewed"
                await stream.aclose()

    run(body)


def given_token(cs: Any, expiry: int) -> Any:
    """*cs* with a SAS token (Azure's ``SharedAccessSignature=…``) in place of its key."""
    token = make_sas_token(
        resource=cs.resource,
        key=cs.shared_access_key,
        expiry=expiry,
        policy_name=cs.shared_access_key_name,
    )
    return dataclasses.replace(cs, shared_access_key=None, shared_access_signature=token)


def test_tokens_given_in_place_of_keys_work_until_they_expire(run: Any) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        assert d.hub.service_cs is not None
        later, gone = int(time.time()) + 600, int(time.time()) - 1
        async with (
            d.device(given_token(cs, later), {"echo": echo}),
            d.service(given_token(d.hub.service_cs, later)) as service,
        ):
            stream = await service.open_stream(cs.device_id, "echo")
            await stream.send_all(b"given")
            assert await stream.receive_some() == b"given"
            await stream.aclose()
        # Expired: nothing to sign a new one with, and the error says so.
        error = await d.serve_error(given_token(cs, gone), {"echo": echo})
        assert isinstance(error, Unauthorized) and "no key" in error.message
        async with d.service(given_token(d.hub.service_cs, gone)) as service:
            error = await d.error_of(service.open_stream(cs.device_id, "echo"))
            assert isinstance(error, Unauthorized) and "no key" in error.message

    run(body)


def test_device_comes_back_after_the_hub_closes_its_channel(
    driver: str, idle_hub: HubThread
) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        options = {"ping_interval": 30.0, "backoff_min": 0.05, "backoff_max": 0.2}
        async with d.device(cs, {"echo": echo}, **options) as device:
            # Silent for the hub's 0.3 s: it closes the channel (CONNECTION_IDLE); the
            # device registers again on a new one.
            await d.wait_for(lambda: device.connections >= 2)

    run_with(driver, idle_hub, body)


def test_device_reconnects_after_its_connection_is_cut(run: Any) -> None:
    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        options = {"backoff_min": 0.05, "backoff_max": 0.2}
        async with d.device(cs, {"echo": echo}, **options) as device:
            assert device.connections == 1
            d.hub.cut()
            await d.wait_for(lambda: device.connections >= 2 and device.online)
            async with d.service() as service:
                stream = await service.open_stream(cs.device_id, "echo", mode="devstream.v1")
                await stream.send_all(b"back again")
                await stream.send_eof()
                assert await read_all(stream) == b"back again"
                await stream.aclose()

    run(body)


def test_the_readmes_asyncio_example_runs(hub: HubThread) -> None:
    [code] = re.findall(
        r"```python\n(import asyncio, devstream_asyncio\n.*?)```", README.read_text(), re.DOTALL
    )
    example: dict[str, Any] = {}
    exec(compile(code, "README.md", "exec"), example)
    device_cs, service_cs = str(hub.readme_device), str(hub.service_cs)

    async def body(d: Driver) -> None:
        registered = d.hub.registered("my-device")
        device = asyncio.ensure_future(example["device_main"](device_cs))
        try:
            # Online once the hub confirmed its registration.
            await d.wait_for(lambda: d.hub.registered("my-device") > registered)
            reply = await example["service_main"](service_cs)
            assert reply == b"hello"
        finally:
            device.cancel()
            await asyncio.gather(device, return_exceptions=True)

    AsyncioDriver(hub).run(body, timeout=15)


@pytest.mark.parametrize("mode", MODES)
def test_streams_that_end_leave_no_cycle(run: Any, mode: str) -> None:
    """A stream's objects are freed by reference counting when it ends (tests/test_no_cycles.py
    says why that matters), in both drivers: streams run with the cyclic collector off, and
    it then finds none of devstream's objects to free (the hub's included: it runs in this
    process)."""

    async def body(d: Driver) -> None:
        cs = d.hub.new_device()
        async with d.device(cs, {"echo": echo}), d.service() as service:

            async def one_stream() -> None:
                stream = await service.open_stream(cs.device_id, "echo", mode=mode)
                await stream.send_all(b"x")
                assert await stream.receive_some() == b"x"
                await stream.aclose()

            assert await cycles_left_by(one_stream, 3) == []

    run(body)


def test_a_reset_stream_leaves_no_cycle(run: Any) -> None:
    """As above, for a stream the service resets while the device reads: its reads and its
    write after the reset each raise, in both drivers."""

    async def body(d: Driver) -> None:
        seen: list[BaseException] = []

        async def victim(stream: Any) -> None:
            seen.append(await d.error_of(read_all(stream)))
            seen.append(await d.error_of(read_all(stream)))
            seen.append(await d.error_of(stream.send_all(b"too late")))
            await stream.aclose()
            d.notify()

        cs = d.hub.new_device()
        async with d.device(cs, {"victim": victim}), d.service() as service:

            async def one_stream() -> None:
                seen.clear()
                stream = await service.open_stream(cs.device_id, "victim", mode="devstream.v1")
                await stream.send_all(b"x")
                await stream.reset(4242, "changed my mind")
                await d.wait_for(lambda: len(seen) == 3)
                assert all(isinstance(error, StreamReset) for error in seen[:2]), seen
                await stream.aclose()

            assert await cycles_left_by(one_stream, 3) == []

    run(body)
