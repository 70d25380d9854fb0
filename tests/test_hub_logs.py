"""What the hub logs for its operator, and ``GET /streams``: devices that come and go, streams
that end (with their bytes each way and how they ended), limits reached, never a key or token.

Test rules: no sockets (clients reach the hub through ``hub_env.open``), everything that waits
runs on ``autojump_clock`` and is bounded by ``trio.fail_after``; a test of a wait asserts the
virtual time it took. The lines are read from pytest's ``caplog``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
import trio

from devstream_core.errors import ErrorCode
from devstream_core.registry import Permission, new_policy
from devstream_core.tokens import STREAM_TOKEN_LIFETIME
from devstream_trio.client.service import open_service
from devstream_trio.server.hub import HubConfig
from devstream_trio.transport.websocket import ConnectionClosed, WebSocket

from .conftest import HubEnv
from .test_framed_stream import env_with
from .test_hub import HUB, ManualDevice, auth, call, echo, initiate, join_raw, receive_message

TIMEOUT = 300


@pytest.fixture
def hub_log(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    """Every record of the hub's logger, debug included."""
    caplog.set_level(logging.DEBUG, logger="devstream")
    yield caplog


def events(caplog: pytest.LogCaptureFixture, event: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == event]


class _Wake(logging.Handler):
    """Wakes a waiting test each time the hub writes a record."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.written = trio.Event()
        self._token = trio.lowlevel.current_trio_token()

    def emit(self, record: logging.LogRecord) -> None:
        self._token.run_sync_soon(self.written.set)


async def next_event(
    caplog: pytest.LogCaptureFixture, event: str, **fields: Any
) -> logging.LogRecord:
    """The first record of *event* whose fields match, once it is written.

    The test sleeps until the hub writes a record, so the clock jumps straight to the hub's
    next deadline and the time read after it is the time the record was written."""
    logger = logging.getLogger("devstream")
    while True:
        for record in events(caplog, event):
            if all(getattr(record, key, None) == value for key, value in fields.items()):
                return record
        wake = _Wake()
        logger.addHandler(wake)
        try:
            await wake.written.wait()
        finally:
            logger.removeHandler(wake)


async def raw_stream(
    env: HubEnv, device: ManualDevice, name: str = "echo"
) -> tuple[WebSocket, WebSocket, list[str]]:
    """A raw stream of *device* (device side, service side) and the two stream tokens."""
    sides: dict[str, WebSocket] = {}
    tokens: list[str] = []

    async def device_side() -> None:
        request = await device.next_request()
        tokens.append(request.token)
        await device.send(request.accept())
        sides["device"] = await join_raw(env, request.url, request.token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_side)
        response = await initiate(env, device.device_id, name)
        url = (response.header(b"iothub-streaming-url") or b"").decode()
        token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
        tokens.append(token)
        sides["service"] = await join_raw(env, url, token)
    return sides["device"], sides["service"], tokens


# -- devices ---------------------------------------------------------------------------------


async def test_a_device_that_connects_and_leaves_gets_a_line_each(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        device = await ManualDevice.connect(hub_env, await hub_env.create_device("dev-log"))
        connected = await next_event(hub_log, "device_connected", device_id="dev-log")
        assert connected.levelno == logging.INFO
        assert connected.getMessage().startswith("device 'dev-log' connected from ")
        started = trio.current_time()
        await trio.sleep(42)
        await device.ws.aclose()
        left = await next_event(hub_log, "device_left", device_id="dev-log")
    assert left.levelno == logging.INFO
    assert left.connection_id == connected.connection_id  # type: ignore[attr-defined]
    assert left.reason == "it closed its channel (code 1000)"  # type: ignore[attr-defined]
    online = left.online_seconds  # type: ignore[attr-defined]
    assert 42 <= online <= trio.current_time() - started + 0.01
    assert "after 42." in left.getMessage() and "online: it closed its channel" in left.getMessage()


async def test_a_replaced_device_connection_is_logged_as_replaced(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("twice")
    with trio.fail_after(TIMEOUT):
        first = await ManualDevice.connect(hub_env, cs)
        old = await next_event(hub_log, "device_connected", device_id="twice")
        started = trio.current_time()
        await ManualDevice.connect(hub_env, cs)
        left = await next_event(
            hub_log,
            "device_left",
            connection_id=old.connection_id,  # type: ignore[attr-defined]
        )
        with pytest.raises(ConnectionClosed):
            while True:
                await first.ws.receive()
        # At once: not after a ping, an idle limit or a response timeout.
        assert trio.current_time() - started < 1.0
    assert left.reason == (  # type: ignore[attr-defined]
        "replaced by a newer connection of the device (its own, renewing its token, "
        "or another client's)"
    )


async def test_a_device_silent_too_long_is_logged_as_silent(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        await ManualDevice.connect(hub_env, await hub_env.create_device("quiet"))
        started = trio.current_time()
        left = await next_event(hub_log, "device_left", device_id="quiet")
    timeout = hub_env.hub.config.control_idle_timeout
    assert left.reason == f"silent for {timeout:g} s"  # type: ignore[attr-defined]
    assert timeout <= trio.current_time() - started <= timeout + 1


# -- streams ---------------------------------------------------------------------------------


async def test_a_raw_stream_end_line_counts_what_each_side_sent(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("counted"))
    to_device = [b"a" * 1000, b"b" * 70_000, b"c"]
    to_service = [b"d" * 12_345, b"e" * 5]
    with trio.fail_after(TIMEOUT):
        started = trio.current_time()
        device_ws, service_ws, _ = await raw_stream(hub_env, device)
        for message in to_device:
            await service_ws.send_bytes(message)
            assert await receive_message(device_ws) == message
        for message in to_service:
            await device_ws.send_bytes(message)
            assert await receive_message(service_ws) == message
        await trio.sleep(3)
        await service_ws.aclose()
        ended = await next_event(hub_log, "stream_ended", device_id="counted")
        elapsed = trio.current_time() - started
    fields = vars(ended)
    assert fields["stream_name"] == "echo"
    assert fields["mode"] == "raw"
    assert (fields["end"], fields["by"], fields["code"]) == ("closed", "service", 1000)
    assert fields["bytes_to_device"] == sum(map(len, to_device))
    assert fields["bytes_to_service"] == sum(map(len, to_service))
    assert 3 <= fields["duration"] <= elapsed
    assert ended.levelno == logging.INFO
    message = ended.getMessage()
    assert message.startswith(
        f"stream {fields['stream_id']} ended, closed by the service (code 1000)"
    )
    assert "71001 bytes to the device, 12350 bytes to the service" in message
    assert len(events(hub_log, "stream_ended")) == 1


async def test_a_devstream_v1_stream_end_line(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    env = hub_env
    cs = await env.create_device("framed")
    await env.nursery.start(env.device(cs).serve, {"echo": echo})
    with trio.fail_after(TIMEOUT):
        async with open_service(env.service_cs(), opener=env.open) as service:
            stream = await service.open_stream("framed", "echo", mode="devstream.v1")
            await stream.send_all(b"x" * 10_000)
            received = 0
            while received < 10_000:
                received += len(await stream.receive_some())
            await stream.send_eof()
            assert await stream.receive_some() == b""
            closed = trio.current_time()
            await stream.aclose()
        ended = await next_event(hub_log, "stream_ended", device_id="framed")
        # Written as the stream ends, not at a later timer.
        assert trio.current_time() - closed < 1.0
    fields = vars(ended)
    assert (fields["mode"], fields["stream_name"], fields["end"]) == (
        "devstream.v1",
        "echo",
        "closed",
    )
    assert fields["by"] in ("device", "service") and fields["code"] == 1000
    # Frames: the data plus a few bytes of framing and acknowledgements.
    for direction in ("bytes_to_device", "bytes_to_service"):
        assert 10_000 <= fields[direction] <= 11_000, fields


async def test_a_stream_whose_service_never_joins_times_out(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("alone"))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def device_side() -> None:
                request = await device.next_request()
                await device.send(request.accept())
                ws = await join_raw(hub_env, request.url, request.token)
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.receive()

            nursery.start_soon(device_side)
            started = trio.current_time()
            response = await initiate(hub_env, "alone", "echo")
            assert response.header(b"iothub-streaming-is-accepted") == b"True"
            ended = await next_event(hub_log, "stream_ended", device_id="alone")
            waited = trio.current_time() - started
    fields = vars(ended)
    assert (fields["end"], fields["by"], fields["code"]) == (
        "timeout",
        "hub",
        int(ErrorCode.PEER_NEVER_CONNECTED),
    )
    assert STREAM_TOKEN_LIFETIME - 0.01 <= waited <= STREAM_TOKEN_LIFETIME + 0.1
    assert (fields["bytes_to_device"], fields["bytes_to_service"]) == (0, 0)


async def test_a_stream_whose_side_vanishes_says_so(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("gone"))
    with trio.fail_after(TIMEOUT):
        device_ws, service_ws, _ = await raw_stream(hub_env, device)
        await device_ws.send_bytes(b"last words")
        assert await receive_message(service_ws) == b"last words"
        aborted = trio.current_time()
        await device_ws.abort()
        with pytest.raises(ConnectionClosed):  # the service answers the close passed on
            while True:
                await service_ws.receive()
        ended = await next_event(hub_log, "stream_ended", device_id="gone")
        assert trio.current_time() - aborted < 1.0  # a raw side is not held for a resume
    fields = vars(ended)
    assert (fields["end"], fields["by"], fields["code"]) == ("vanished", "device", 1006)
    assert fields["bytes_to_service"] == len(b"last words")
    assert "the device vanished (code 1006)" in ended.getMessage()


async def test_a_stream_of_a_disabled_device_is_reset_by_the_hub(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("revoked"))
    with trio.fail_after(TIMEOUT):
        _, service_ws, _ = await raw_stream(hub_env, device)
        disabled = trio.current_time()
        await hub_env.service().set_device_status("revoked", "disabled")
        ended = await next_event(hub_log, "stream_ended", device_id="revoked")
        with pytest.raises(ConnectionClosed):
            while True:
                await service_ws.receive()
        # At once, not after the 30 s grace a dropped side gets.
        assert trio.current_time() - disabled < 1.0
        left = await next_event(hub_log, "device_left", device_id="revoked")
    fields = vars(ended)
    assert (fields["end"], fields["by"], fields["code"]) == (
        "reset",
        "hub",
        int(ErrorCode.DEVICE_DISABLED),
    )
    assert left.reason.startswith("refused: ")  # type: ignore[attr-defined]


async def test_a_refused_initiation_writes_no_stream_line(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    device = await ManualDevice.connect(hub_env, await hub_env.create_device("picky"))
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def refuse() -> None:
                request = await device.next_request()
                await device.send(request.reject("not today"))

            nursery.start_soon(refuse)
            response = await initiate(hub_env, "picky", "echo")
        assert response.header(b"iothub-streaming-is-accepted") == b"False"
        await trio.sleep(STREAM_TOKEN_LIFETIME + 1)
    assert events(hub_log, "stream_ended") == []
    assert hub_env.hub.streaming.ledger.records == {}


# -- limits ----------------------------------------------------------------------------------


async def test_limit_reached_is_a_warning_at_most_once_per_interval(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    caplog.set_level(logging.INFO, logger="devstream")
    env = await env_with(nursery, HubConfig(max_streams_per_device=1, limit_log_interval=10))
    await ManualDevice.connect(env, await env.create_device("busy"))
    with trio.fail_after(TIMEOUT):
        first = await initiate_in_background(env, "busy")
        for _ in range(3):
            code = json.loads((await initiate(env, "busy", "echo")).body)["errorCode"]
            assert code == ErrorCode.THROTTLED
        warned = events(caplog, "limit_reached")
        assert len(warned) == 1
        assert warned[0].levelno == logging.WARNING
        assert warned[0].count == 1  # type: ignore[attr-defined]
        assert "device 'busy' has 1 streams open" in warned[0].getMessage()
        await trio.sleep(10)
        await initiate(env, "busy", "echo")
        warned = events(caplog, "limit_reached")
        assert [r.count for r in warned] == [1, 3]  # type: ignore[attr-defined]
        first.cancel()


async def initiate_in_background(env: HubEnv, device_id: str) -> trio.CancelScope:
    """An initiate left waiting for the device's answer (its stream counts against the
    device's limit); cancel the scope to end it."""
    scope = trio.CancelScope()

    async def run(task_status: trio.TaskStatus[None]) -> None:
        with scope:
            task_status.started()
            await initiate(env, device_id, "echo")

    await env.nursery.start(run)
    while env.hub.bridge.device_stream_count(device_id) == 0:
        await trio.sleep(0.001)
    return scope


# -- never a key or a token ------------------------------------------------------------------


async def test_no_key_or_token_reaches_the_log(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    env = hub_env
    device_cs = await env.create_device("secretive")
    device = await ManualDevice.connect(env, device_cs)
    with trio.fail_after(TIMEOUT):
        device_ws, service_ws, stream_tokens = await raw_stream(env, device)
        await service_ws.send_bytes(b"hello")
        assert await receive_message(device_ws) == b"hello"
        await service_ws.aclose()
        await next_event(hub_log, "stream_ended", device_id="secretive")
        # Refusals too: a wrong key, and a stream token used twice.
        wrong = env.service_cs()
        wrong = type(wrong)(
            host_name=wrong.host_name,
            shared_access_key_name=wrong.shared_access_key_name,
            shared_access_key=device_cs.shared_access_key,
            use_tls=False,
        )
        assert (await call(env, "GET", "/devices", headers=[auth(env, wrong)])).status == 401
        response = await call(env, "GET", "/streams", headers=[auth(env, device_cs)])
        assert response.status == 401
        await device.ws.aclose()
        await next_event(hub_log, "device_left", device_id="secretive")
    secrets = [
        env.owner.primary_key,
        env.owner.secondary_key,
        device_cs.shared_access_key,
        auth(env)[1],
        auth(env, device_cs)[1],
        *stream_tokens,
    ]
    assert all(secrets) and len(stream_tokens) == 2
    text = "\n".join(
        [r.getMessage() for r in hub_log.records]
        + [json.dumps(vars(r), default=str) for r in hub_log.records]
    )
    assert len(hub_log.records) >= 4
    for secret in secrets:
        assert secret not in text
        assert secret[:16] not in text
    assert "sig=" not in text


async def raw_request(env: HubEnv, data: bytes) -> bytes:
    """Write *data* on a new connection; return everything the hub answers until it closes."""
    stream = await env.open(HUB)
    try:
        await stream.send_all(data)
        answer = bytearray()
        while chunk := await stream.receive_some():
            answer += chunk
        return bytes(answer)
    finally:
        await trio.aclose_forcefully(stream)


@pytest.mark.parametrize(
    "template",
    [
        b"GET /devices HTTP/1.1\r\nhost: hub.test\r\nAuthorization : %s\r\n\r\n",
        b"GET /devices HTTP/1.1\r\nhost: hub.test\r\nAuthorization: %s\x00\r\n\r\n",
        b"GET /devices?%s\x01 HTTP/1.1\r\nhost: hub.test\r\n\r\n",
    ],
    ids=["space-before-colon", "nul-after-token", "token-in-request-line"],
)
async def test_a_request_the_parser_refuses_is_answered_without_repeating_it(
    hub_env: HubEnv,
    hub_log: pytest.LogCaptureFixture,
    autojump_clock: trio.abc.Clock,
    template: bytes,
) -> None:
    # A line the HTTP parser refuses may carry a valid SAS token: neither the answer nor the
    # log may repeat it (the parser's own account of the error quotes the line).
    token = auth(hub_env)[1]
    signature = token.partition("sig=")[2].partition("&")[0]
    assert len(signature) > 20
    with trio.fail_after(TIMEOUT):
        answer = await raw_request(hub_env, template % token.encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    message = json.loads(body)
    assert message["errorCode"] == ErrorCode.MALFORMED_REQUEST
    assert message["message"].startswith("malformed HTTP request")
    (record,) = events(hub_log, "http_error")
    logged = record.getMessage() + json.dumps(vars(record), default=str)
    for text in (answer.decode("latin-1"), logged):
        assert signature not in text
        assert "sig=" not in text
        assert "SharedAccessSignature" not in text


async def test_refused_requests_are_logged_at_most_once_per_interval_per_code(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    # Anyone can send requests the hub refuses: a line for each would let them fill the disk.
    caplog.set_level(logging.INFO, logger="devstream")
    env = await env_with(nursery, HubConfig(limit_log_interval=10))
    garbage = b"GARBAGE\r\n\r\n"
    with trio.fail_after(TIMEOUT):
        start = trio.current_time()
        for _ in range(50):
            assert b'"errorCode": 400901' in await raw_request(env, garbage)
        for _ in range(3):
            assert (await call(env, "GET", "/nowhere")).status == 404
        assert trio.current_time() - start < 1
        logged = events(caplog, "http_error")
        assert [(r.code, r.count) for r in logged] == [(400901, 1), (404902, 1)]  # type: ignore[attr-defined]
        assert env.hub.metrics.http_errors[400901] == 50
        await trio.sleep(10 - (trio.current_time() - start))
        assert b'"errorCode": 400901' in await raw_request(env, garbage)
    logged = events(caplog, "http_error")
    assert [(r.code, r.count) for r in logged] == [(400901, 1), (404902, 1), (400901, 50)]  # type: ignore[attr-defined]
    assert "(50 requests refused with 400901 since the last report)" in logged[-1].getMessage()


# -- GET /streams ----------------------------------------------------------------------------


async def test_get_streams_lists_devices_online_and_open_streams(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    env = hub_env
    device = await ManualDevice.connect(env, await env.create_device("listed"), names=("ssh",))
    with trio.fail_after(TIMEOUT):
        device_ws, service_ws, _ = await raw_stream(env, device, "ssh")
        await service_ws.send_bytes(b"12345")
        assert await receive_message(device_ws) == b"12345"
        await device_ws.send_bytes(b"abc")
        assert await receive_message(service_ws) == b"abc"
        await trio.sleep(7)
        status = await env.service().list_streams()
    (online,) = status["devices"]
    assert online["deviceId"] == "listed" and online["address"] == "?"
    assert online["onlineSeconds"] >= 7 and isinstance(online["controlChannel"], int)
    (stream,) = status["streams"]
    assert {k: stream[k] for k in ("deviceId", "name", "mode", "state")} == {
        "deviceId": "listed",
        "name": "ssh",
        "mode": "raw",
        "state": "paired",
    }
    assert (stream["bytesToDevice"], stream["bytesToService"]) == (5, 3)
    assert 7 <= stream["ageSeconds"] <= 8
    # The stream's bytes count in /metrics while it is open.
    metrics = (await call(env, "GET", "/metrics")).body.decode()
    assert "devstream_relayed_bytes_total 8\n" in metrics


async def test_get_streams_needs_registry_read(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    env = hub_env
    device_cs = await env.create_device("nosy")
    reader = new_policy(name="reader", permissions=Permission.REGISTRY_READ, random_bytes=b"r" * 64)
    connector = new_policy(
        name="connector", permissions=Permission.SERVICE_CONNECT, random_bytes=b"c" * 64
    )
    for policy in (reader, connector):
        await env.store.put_policy(policy)
    with trio.fail_after(TIMEOUT):

        async def get(header: tuple[str, str] | None) -> tuple[int, int | None]:
            response = await call(env, "GET", "/streams", headers=[header] if header else [])
            body = json.loads(response.body)
            return response.status, body.get("errorCode") if isinstance(body, dict) else None

        assert await get(None) == (401, ErrorCode.UNAUTHORIZED)
        assert await get(auth(env, device_cs)) == (401, ErrorCode.UNAUTHORIZED)
        assert await get(auth(env, env.service_cs(connector))) == (
            403,
            ErrorCode.PERMISSION_DENIED,
        )
        status, _ = await get(auth(env, env.service_cs(reader)))
        assert status == 200
        response = await call(env, "POST", "/streams", headers=[auth(env)])
        assert response.status == 405


async def test_a_devstream_v1_side_that_never_resumes_vanished(
    hub_env: HubEnv, hub_log: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    env = hub_env
    device = await ManualDevice.connect(env, await env.create_device("held"))
    framed = ["devstream.v1"]
    sides: dict[str, WebSocket] = {}
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:

            async def device_side() -> None:
                request = await device.next_request()
                await device.send(request.accept())
                sides["device"] = await join_raw(env, request.url, request.token, framed)

            nursery.start_soon(device_side)
            response = await initiate(
                env, "held", "echo", headers=[("devstream-stream-mode", "devstream.v1")]
            )
            url = (response.header(b"iothub-streaming-url") or b"").decode()
            token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
            sides["service"] = await join_raw(env, url, token, framed)
        await sides["device"].abort()
        held = await next_event(hub_log, "stream_held")
        dropped_at = trio.current_time()
        ended = await next_event(hub_log, "stream_ended", device_id="held")
        waited = trio.current_time() - dropped_at
    assert vars(held)["role"] == "device"
    fields = vars(ended)
    assert fields["mode"] == "devstream.v1"
    assert (fields["end"], fields["by"], fields["code"]) == (
        "vanished",
        "device",
        int(ErrorCode.PEER_LOST),
    )
    grace = env.hub.config.grace_period
    assert grace - 0.01 <= waited <= grace + 0.1
