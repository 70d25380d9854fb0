"""Every bad input the hub must refuse, each with its documented error code, and the hub still
serving everyone else afterwards (and while it happens).

Test rules: no sockets (clients reach the hub through ``hub_env.open``), everything that waits
runs on ``autojump_clock``, every wait is bounded by ``trio.fail_after``. Each test ends with
:func:`assert_serving`: a health check and a full echo stream through the same hub.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Sequence

import pytest
import trio
from wsproto.connection import Connection, ConnectionType
from wsproto.events import TextMessage

from devstream_core import control
from devstream_core.credentials import ConnectionString, device_resource, make_sas_token
from devstream_core.errors import ErrorCode
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.registry import Permission, new_key, new_policy
from devstream_core.websocket import MAX_BATCH_FRAMES
from devstream_trio.exceptions import Unauthorized
from devstream_trio.transport.http import HttpStatusError, websocket_connect
from devstream_trio.transport.websocket import (
    MAX_MESSAGE_FRAGMENTS,
    ConnectionClosed,
    WebSocket,
    payload,
)

from .conftest import HubEnv
from .test_hub import (
    HUB,
    ManualDevice,
    _raw_pair,
    auth,
    call,
    echo,
    error_code,
    initiate,
    join_raw,
    read_exactly,
)

HOST = "hub.test:8080"


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture
async def env(hub_env: HubEnv) -> AsyncIterator[HubEnv]:
    """A hub with an echo device ``probe`` online, to prove it keeps serving.

    (Tests take ``autojump_clock`` themselves: pytest-trio only uses a clock named by the test.)
    """
    cs = await hub_env.create_device("probe")
    await hub_env.nursery.start(hub_env.device(cs).serve, {"echo": echo})
    yield hub_env


async def assert_serving(env: HubEnv) -> None:
    """The hub answers a health check and relays a whole echo stream."""
    with trio.fail_after(10):
        health = await call(env, "GET", "/healthz")
        assert health.status == 200
        stream = await env.service().open_stream("probe", "echo")
        data = os.urandom(3000)
        await stream.send_all(data)
        assert await read_exactly(stream, len(data)) == data
        await stream.aclose()


def sas(
    *, resource: str = HOST, key: str, expiry: int, policy: str | None = "iothubowner"
) -> tuple[str, str]:
    return (
        "authorization",
        make_sas_token(resource=resource, key=key, expiry=expiry, policy_name=policy),
    )


def hour_from_now(env: HubEnv) -> int:
    return int(env.hub.wall_clock()) + 3600


async def initiate_with(env: HubEnv, header: tuple[str, str], device_id: str = "probe") -> int:
    """Initiate with the given Authorization header; return the error code."""
    response = await call(
        env,
        "POST",
        f"/twins/{device_id}/streams/echo?api-version=2020-09-30",
        headers=[header],
        body=b"",
    )
    assert response.status == error_code(response) // 1000
    return error_code(response)


async def raw_exchange(env: HubEnv, data: bytes) -> tuple[int, int]:
    """Write *data* on a fresh connection; return the status and error code of the answer."""
    stream = await env.open(HUB)
    await stream.send_all(data)
    return await read_error_answer(stream)


async def read_error_answer(stream: trio.abc.Stream) -> tuple[int, int]:
    """Read until the hub closes the connection; parse its one error response."""
    answer = bytearray()
    while chunk := await stream.receive_some():
        answer += chunk
    await trio.aclose_forcefully(stream)
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert b"connection: close" in head.lower()
    return status, int(json.loads(body)["errorCode"])


async def control_connect(env: HubEnv, device_id: str, token: str) -> WebSocket:
    return await websocket_connect(
        await env.open(HUB),
        host=HUB.host_header,
        target=f"/devices/{device_id}/streams",
        headers=[("authorization", token)],
        subprotocols=[control.CONTROL_SUBPROTOCOL],
    )


async def refused_join(env: HubEnv, url: str, headers: Sequence[tuple[str, str]]) -> ErrorCode:
    """Try to join a streaming-endpoint URL; return the hub's error code."""
    target = url.removeprefix("ws://hub.test:8080")
    with pytest.raises(HttpStatusError) as refused:
        await websocket_connect(await env.open(HUB), host=HOST, target=target, headers=headers)
    assert refused.value.code is not None
    assert refused.value.response.status == refused.value.code.http_status
    return refused.value.code


async def closed_by_hub(ws: WebSocket) -> tuple[ConnectionClosed, list[dict[str, object]]]:
    """Read until the hub closes *ws*; return the close and the text messages before it."""
    texts: list[dict[str, object]] = []
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            event = await ws.receive()
            if isinstance(event.data, str):
                texts.append(json.loads(event.data))
    return closed.value, texts


async def accepted_stream(
    env: HubEnv, device: ManualDevice
) -> tuple[control.StreamRequest, str, str]:
    """Initiate a stream the manual device accepts: (device's request, service URL, token)."""
    requests: list[control.StreamRequest] = []

    async def accept() -> None:
        request = await device.next_request()
        await device.send(request.accept())
        requests.append(request)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(accept)
        response = await initiate(env, device.device_id, "echo")
    assert response.header(b"iothub-streaming-is-accepted") == b"True"
    url = (response.header(b"iothub-streaming-url") or b"").decode()
    token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
    return requests[0], url, token


async def manual_device(env: HubEnv, device_id: str = "manual") -> ManualDevice:
    return await ManualDevice.connect(env, await env.create_device(device_id))


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


# -- SAS tokens and policies -----------------------------------------------------------------


async def test_wrong_sas_signature(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    wrong_key = new_key(os.urandom(32))
    header = sas(key=wrong_key, expiry=hour_from_now(env))
    with trio.fail_after(10):
        assert await initiate_with(env, header) == 401002
        listed = await call(env, "GET", "/devices", headers=[header])
        assert (listed.status, error_code(listed)) == (401, 401002)
        # A token whose signature was tampered with, for the right key.
        _, good = auth(env)
        tampered = good.replace("sig=", "sig=A", 1)
        assert await initiate_with(env, ("authorization", tampered)) == 401002
        assert await initiate_with(env, ("authorization", "Bearer nonsense")) == 401002
    await assert_serving(env)


async def test_expired_sas_token(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    now = env.hub.wall_clock()
    header = sas(key=env.owner.primary_key, expiry=int(now) + 30)
    with trio.fail_after(10):
        # Valid now (the device is online, so the initiate is accepted).
        ok = await call(env, "GET", "/devices/probe", headers=[header])
        assert ok.status == 200
        env.hub.wall_clock = lambda: now + 31
        assert await initiate_with(env, header) == 401002
        refused = await call(env, "GET", "/devices/probe", headers=[header])
        assert error_code(refused) == 401002
    await assert_serving(env)


async def test_sas_token_for_another_resource(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    key = env.owner.primary_key
    with trio.fail_after(10):
        for resource in ("other-hub.test:8080", "hub.test:9999", "hub.test"):
            header = sas(resource=resource, key=key, expiry=hour_from_now(env))
            assert await initiate_with(env, header) == 401002
    await assert_serving(env)


async def test_policy_without_service_connect(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    admin = new_policy(
        name="registry-admin",
        random_bytes=os.urandom(64),
        permissions=Permission.REGISTRY_READ | Permission.REGISTRY_WRITE,
    )
    await env.store.put_policy(admin)
    with trio.fail_after(10):
        assert await initiate_with(env, auth(env, env.service_cs(admin))) == 403901
        # Its registry rights still work.
        listed = await call(env, "GET", "/devices", headers=[auth(env, env.service_cs(admin))])
        assert listed.status == 200
    await assert_serving(env)


async def test_unknown_policy(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    header = sas(key=env.owner.primary_key, expiry=hour_from_now(env), policy="nosuchpolicy")
    with trio.fail_after(10):
        assert await initiate_with(env, header) == 401002
    await assert_serving(env)


async def test_device_key_of_another_device_on_the_control_channel(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    victim = await env.create_device("victim")
    other = await env.create_device("other")
    assert victim.device_id is not None
    with trio.fail_after(10):
        # The victim's resource, signed with the other device's key.
        forged = make_sas_token(
            resource=device_resource(HOST, "victim"),
            key=other.shared_access_key,
            expiry=hour_from_now(env),
        )
        with pytest.raises(HttpStatusError) as refused:
            await control_connect(env, "victim", forged)
        assert (refused.value.response.status, refused.value.code) == (401, 401002)
        # The other device's own valid token, presented for the victim.
        own = other.sas_token(expiry=hour_from_now(env))
        with pytest.raises(HttpStatusError) as refused:
            await control_connect(env, "victim", own)
        assert refused.value.code == 401002
        # The device client gives up at once with Unauthorized.
        wrong = ConnectionString(
            host_name=HOST,
            device_id="victim",
            shared_access_key=other.shared_access_key,
            use_tls=False,
        )
        with pytest.raises(Unauthorized):
            await env.device(wrong).serve({"echo": echo})
    assert (await env.service().get_device("victim"))["connectionState"] == "Disconnected"
    await assert_serving(env)


# -- devices ---------------------------------------------------------------------------------


async def test_unknown_device(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(10):
        response = await initiate(env, "ghost", "echo")
        assert (response.status, error_code(response)) == (404, 404001)
        token = make_sas_token(
            resource=device_resource(HOST, "ghost"),
            key=new_key(os.urandom(32)),
            expiry=hour_from_now(env),
        )
        with pytest.raises(HttpStatusError) as refused:
            await control_connect(env, "ghost", token)
        assert (refused.value.response.status, refused.value.code) == (404, 404001)
    await assert_serving(env)


async def test_disabled_device(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    cs = await env.create_device("sleepy")
    await env.service().set_device_status("sleepy", "disabled")
    with trio.fail_after(10):
        response = await initiate(env, "sleepy", "echo")
        assert (response.status, error_code(response)) == (403, 403902)
        with pytest.raises(HttpStatusError) as refused:
            await control_connect(env, "sleepy", cs.sas_token(expiry=hour_from_now(env)))
        assert (refused.value.response.status, refused.value.code) == (403, 403902)
    await assert_serving(env)


async def test_offline_device(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    await env.create_device("offline")
    with trio.fail_after(10):
        response = await initiate(env, "offline", "echo")
    assert (response.status, error_code(response)) == (404, 404103)
    await assert_serving(env)


async def test_unregistered_stream_name_is_refused_at_once(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(10):
        start = trio.current_time()
        response = await initiate(env, "probe", "ssh")
        elapsed = trio.current_time() - start
    assert elapsed < 0.001
    assert response.status == 200
    assert response.header(b"iothub-streaming-is-accepted") == b"False"
    assert response.header(b"iothub-streaming-auth-token") is None
    assert error_code(response) == 404901
    await assert_serving(env)


async def test_device_that_never_answers(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    device = await manual_device(env)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.next_request)  # read, never answered
            start = trio.current_time()
            response = await initiate(
                env,
                "manual",
                "echo",
                headers=[("iothub-streaming-response-timeout-in-seconds", "10")],
            )
            elapsed = trio.current_time() - start
    assert (response.status, error_code(response)) == (504, 504101)
    assert 10 <= elapsed < 10.5
    # A late answer to the forgotten request does not upset the hub or the channel.
    await device.send(_late_accept(device))
    await assert_serving(env)
    assert (await env.service().get_device("manual"))["connectionState"] == "Connected"


def _late_accept(device: ManualDevice) -> control.StreamResponse:
    (request_id,) = device.machine.pending_requests
    return control.StreamResponse(request_id=request_id, accepted=True)


# -- stream tokens ---------------------------------------------------------------------------


async def test_stream_token_reused(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    device = await manual_device(env)
    with trio.fail_after(10):
        request, url, token = await accepted_stream(env, device)
        device_ws = await join_raw(env, request.url, request.token)
        assert await refused_join(env, request.url, bearer(request.token)) == 401902
        service_ws = await join_raw(env, url, token)
        assert await refused_join(env, url, bearer(token)) == 401902
        # The first use is untouched: the stream works.
        await service_ws.send_bytes(b"still fine")
        event = await device_ws.receive()
        assert event.data == b"still fine"
    await assert_serving(env)


async def test_stream_token_expired(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    device = await manual_device(env)
    with trio.fail_after(100):
        start = trio.current_time()
        request, url, token = await accepted_stream(env, device)
        await trio.sleep_until(start + 59)
        # Just inside the lifetime, the device side still gets in.
        device_ws = await join_raw(env, request.url, request.token)
        await trio.sleep_until(start + 61)
        assert await refused_join(env, url, bearer(token)) == 401901
        closed, _ = await closed_by_hub(device_ws)
        assert closed.code == 4504
    await assert_serving(env)


async def test_stream_token_wrong_role(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    device = await manual_device(env)
    with trio.fail_after(10):
        request, url, token = await accepted_stream(env, device)
        assert request.url.endswith("?role=device") and url.endswith("?role=service")
        assert await refused_join(env, request.url, bearer(token)) == 401903
        assert await refused_join(env, url, bearer(request.token)) == 401903
    await assert_serving(env)


async def test_stream_token_for_another_stream(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    device = await manual_device(env)
    with trio.fail_after(10):
        _, url_a, token_a = await accepted_stream(env, device)
        _, url_b, token_b = await accepted_stream(env, device)
        assert url_a != url_b
        assert await refused_join(env, url_b, bearer(token_a)) == 401904
        # Neither token was used up by the refusal.
        await join_raw(env, url_a, token_a)
        await join_raw(env, url_b, token_b)
    await assert_serving(env)


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("authorization", "Bearer")],
        [("authorization", "Basic dXNlcjpwYXNz")],
        [("authorization", "Bearer not-a-token")],
    ],
    ids=["none", "empty", "basic", "garbage"],
)
async def test_stream_token_missing_or_invalid(
    env: HubEnv, autojump_clock: trio.abc.Clock, headers: list[tuple[str, str]]
) -> None:
    device = await manual_device(env)
    with trio.fail_after(10):
        _, url, token = await accepted_stream(env, device)
        assert await refused_join(env, url, headers) == 401905
        await join_raw(env, url, token)
    await assert_serving(env)


@pytest.mark.parametrize("lone", ["device", "service"])
async def test_side_whose_peer_never_connects_is_closed_with_504901(
    env: HubEnv, autojump_clock: trio.abc.Clock, lone: str
) -> None:
    device = await manual_device(env)
    with trio.fail_after(100):
        start = trio.current_time()
        request, url, token = await accepted_stream(env, device)
        if lone == "device":
            ws = await join_raw(env, request.url, request.token)
        else:
            ws = await join_raw(env, url, token)
        closed, _ = await closed_by_hub(ws)
        elapsed = trio.current_time() - start
    assert closed.code == 4504
    assert closed.reason.startswith("504901")
    assert 60 <= elapsed < 60.5
    await assert_serving(env)


# -- malformed HTTP --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nhost: hub.test\r\nno colon here\r\n\r\n",
        b"GET /healthz HTTP/1.1 trailing\r\nhost: hub.test\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32) + b"\r\n\r\n",
        b"POST /devices HTTP/1.1\r\nhost: hub.test\r\ncontent-length: x\r\n\r\n",
    ],
    ids=["garbage", "bad-header", "bad-request-line", "tls-hello", "bad-length"],
)
async def test_malformed_http(env: HubEnv, autojump_clock: trio.abc.Clock, data: bytes) -> None:
    with trio.fail_after(10):
        assert await raw_exchange(env, data) == (400, 400901)
    await assert_serving(env)


@pytest.mark.parametrize("upgrade", [False, True], ids=["get", "websocket-upgrade"])
async def test_a_request_with_two_authorization_headers_is_refused(
    env: HubEnv, autojump_clock: trio.abc.Clock, upgrade: bool
) -> None:
    # The first one is good: without the check, the hub would serve the request on it.
    cs = await env.create_device("twice")
    good = cs.sas_token(expiry=hour_from_now(env)).encode()
    head = b"GET /devices/twice/streams HTTP/1.1\r\n" if upgrade else b"GET /healthz HTTP/1.1\r\n"
    if upgrade:
        head += (
            b"upgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n"
        )
    request = (
        head + b"host: hub.test:8080\r\nauthorization: " + good + b"\r\n"
        b"authorization: SharedAccessSignature sr=other\r\n\r\n"
    )
    with trio.fail_after(10):
        assert await raw_exchange(env, request) == (400, 400901)
        one = request.replace(b"authorization: SharedAccessSignature sr=other\r\n", b"")
        stream = await env.open(HUB)
        await stream.send_all(one)
        assert (await stream.receive_some()).startswith(
            b"HTTP/1.1 101 " if upgrade else b"HTTP/1.1 200 "
        )
        await trio.aclose_forcefully(stream)
    await assert_serving(env)


async def test_a_request_with_both_body_lengths_closes_the_connection(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    # RFC 9112 §6.1: the pipelined request after it is never answered.
    both = (
        b"GET /healthz HTTP/1.1\r\nhost: hub.test\r\ncontent-length: 5\r\n"
        b"transfer-encoding: chunked\r\n\r\n0\r\n\r\n"
    )
    with trio.fail_after(10):
        stream = await env.open(HUB)
        await stream.send_all(both + b"GET /healthz HTTP/1.1\r\nhost: hub.test\r\n\r\n")
        answer = bytearray()
        while chunk := await stream.receive_some():
            answer += chunk
    assert answer.count(b"HTTP/1.1 ") == 1
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert b'"errorCode": 400901' in answer
    await assert_serving(env)


@pytest.mark.parametrize(
    ("key", "version", "answer"),
    [
        (b"not-base64!!", b"13", (400, 400901)),
        (b"AAAA", b"13", (400, 400901)),
        (b"dGhlIHNhbXBsZSBub25jZQ==", b"8", (426, 426902)),
    ],
    ids=["key-not-base64", "key-of-3-bytes", "version-8"],
)
async def test_a_websocket_handshake_the_hub_refuses(
    env: HubEnv, autojump_clock: trio.abc.Clock, key: bytes, version: bytes, answer: tuple[int, int]
) -> None:
    # A device with good credentials, whose handshake alone is at fault.
    cs = await env.create_device("keyed")
    token = cs.sas_token(expiry=hour_from_now(env)).encode()
    request = (
        b"GET /devices/keyed/streams HTTP/1.1\r\nhost: hub.test:8080\r\nupgrade: websocket\r\n"
        b"connection: Upgrade\r\nsec-websocket-key: " + key + b"\r\n"
        b"sec-websocket-version: " + version + b"\r\nauthorization: " + token + b"\r\n\r\n"
    )
    with trio.fail_after(10):
        assert await raw_exchange(env, request) == answer
    await assert_serving(env)


@pytest.mark.parametrize("target", ["/bridges/x", "/devices/probe/streams"])
async def test_plain_get_to_a_websocket_path(
    env: HubEnv, autojump_clock: trio.abc.Clock, target: str
) -> None:
    with trio.fail_after(10):
        response = await call(env, "GET", target, headers=[auth(env)])
    assert (response.status, error_code(response)) == (426, 426901)
    await assert_serving(env)


async def test_oversized_headers(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    request = (
        b"GET /healthz HTTP/1.1\r\nhost: hub.test\r\nx-padding: " + b"a" * 20_000 + b"\r\n\r\n"
    )
    with trio.fail_after(10):
        assert await raw_exchange(env, request) == (431, 431901)
        # Many small headers add up the same way.
        many = b"".join(b"x-h%d: %s\r\n" % (i, b"b" * 100) for i in range(300))
        request = b"GET /healthz HTTP/1.1\r\nhost: hub.test\r\n" + many + b"\r\n"
        assert await raw_exchange(env, request) == (431, 431901)
    await assert_serving(env)


async def test_slow_header_client_gets_408(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    with trio.fail_after(60):
        status, code, elapsed = await slow_header_client(env)
    assert (status, code) == (408, 408901)
    assert 10 <= elapsed < 11
    await assert_serving(env)


async def slow_header_client(env: HubEnv) -> tuple[int, int, float]:
    """Send a request one byte per second; return the answer and when it came."""
    request = (
        b"GET /healthz HTTP/1.1\r\nhost: hub.test:8080\r\nx-padding: " + b"a" * 40 + b"\r\n\r\n"
    )
    stream = await env.open(HUB)
    start = trio.current_time()

    async def trickle() -> None:
        for byte in request:
            try:
                await stream.send_all(bytes([byte]))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            await trio.sleep(1)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        status, code = await read_error_answer(stream)
        nursery.cancel_scope.cancel()
    return status, code, trio.current_time() - start


# -- the control channel ---------------------------------------------------------------------


@pytest.mark.parametrize("fragmented", [False, True])
async def test_oversized_control_message(
    env: HubEnv, autojump_clock: trio.abc.Clock, fragmented: bool
) -> None:
    device = await manual_device(env)
    text = json.dumps({"type": "register", "names": ["x" * 70_000]})
    with trio.fail_after(10):
        if fragmented:
            for start in range(0, len(text), 4096):
                chunk = text[start : start + 4096]
                await device.ws.send_text(chunk, message_finished=start + 4096 >= len(text))
        else:
            await device.ws.send_text(text)
        closed, texts = await closed_by_hub(device.ws)
    assert closed.code == 4413
    assert closed.reason.startswith("413901")
    assert texts and texts[-1]["type"] == "error" and texts[-1]["errorCode"] == 413901
    assert (await env.service().get_device("manual"))["connectionState"] == "Disconnected"
    await assert_serving(env)


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2, 3]", '"just a string"', '{"type": "register", "type": "x"}', "NaN"],
    ids=["broken", "array", "string", "duplicate-member", "nan"],
)
async def test_invalid_json_on_the_control_channel(
    env: HubEnv, autojump_clock: trio.abc.Clock, text: str
) -> None:
    device = await manual_device(env)
    with trio.fail_after(10):
        await device.ws.send_text(text)
        closed, texts = await closed_by_hub(device.ws)
    assert closed.code == 4400
    assert closed.reason.startswith("400902")
    assert texts[-1] == {"type": "error", "errorCode": 400902, "message": "invalid JSON"}
    await assert_serving(env)


@pytest.mark.parametrize(
    "text",
    ['{"type": "register"}', "{}", '{"type": "launch"}', '{"type": "register", "names": [1]}'],
    ids=["no-names", "no-type", "unknown-type", "bad-names"],
)
async def test_json_that_is_no_control_message(
    env: HubEnv, autojump_clock: trio.abc.Clock, text: str
) -> None:
    """Valid JSON of the wrong shape is a protocol error (``control.decode_message``)."""
    device = await manual_device(env)
    with trio.fail_after(10):
        await device.ws.send_text(text)
        closed, _ = await closed_by_hub(device.ws)
    assert closed.code == 4400
    assert closed.reason.startswith("400904")
    await assert_serving(env)


# -- floods of fragments ---------------------------------------------------------------------


def masked_frame(first: int, payload: bytes) -> bytes:
    """One frame as a client sends it (FIN/opcode byte *first*), masked with a fixed key."""
    key = b"\x5a\x13\xc7\x0e"
    assert len(payload) < 126
    return (
        bytes((first, 0x80 | len(payload)))
        + key
        + bytes(b ^ key[i & 3] for i, b in enumerate(payload))
    )


async def test_a_control_message_in_too_many_fragments_is_refused(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Empty continuations count: a control message may come in MAX_CONTROL_MESSAGE_FRAGMENTS
    fragments, and the hub closes the channel (413901) as soon as it has that many without
    the message's end, instead of keeping them."""
    limit = control.MAX_CONTROL_MESSAGE_FRAGMENTS
    device = await manual_device(env)
    text = device.machine.send(control.Register(names=("echo", "more")))
    with trio.fail_after(30):
        # At the bound: the whole text in the first fragment, empty ones after it.
        await device.ws.send_text(text, message_finished=False)
        for index in range(1, limit):
            await device.ws.send_text("", message_finished=index == limit - 1)
        assert await device.next_message() == control.Registered(names=("echo", "more"))
        # One more without the end: refused then, whatever follows.
        start = trio.current_time()
        await device.ws.stream.send_all(
            masked_frame(0x01, b'{"type": ') + masked_frame(0x00, b"") * (limit + 1000)
        )
        closed, texts = await closed_by_hub(device.ws)
    assert trio.current_time() - start < 0.01
    assert closed.code == 4413
    assert closed.reason.startswith("413901")
    assert texts[-1]["errorCode"] == 413901
    assert (await env.service().get_device("manual"))["connectionState"] == "Disconnected"
    await assert_serving(env)


async def test_a_control_message_in_one_frame_and_many_reads_is_one_fragment(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """Frames are counted, not reads: a Register of MAX_CONTROL_MESSAGE_SIZE bytes in one
    frame that reaches the hub in 32-byte reads (more than MAX_CONTROL_MESSAGE_FRAGMENTS of
    them) is taken."""
    device = await manual_device(env)
    text = device.machine.send(control.Register(names=("echo",)))
    text = text[:-1] + " " * (control.MAX_CONTROL_MESSAGE_SIZE - len(text)) + "}"
    wire = Connection(ConnectionType.CLIENT).send(TextMessage(data=text))
    assert len(wire) // 32 > control.MAX_CONTROL_MESSAGE_FRAGMENTS
    with trio.fail_after(30):
        for start in range(0, len(wire), 32):
            await device.ws.stream.send_all(wire[start : start + 32])
            await trio.sleep(0.001)  # the hub takes each piece in a read of its own
        sent_at = trio.current_time()
        assert await device.next_message() == control.Registered(names=("echo",))
        assert trio.current_time() - sent_at < 0.01  # answered at once, not at a timeout
    await assert_serving(env)


async def framed_stream_sides(env: HubEnv) -> tuple[WebSocket, WebSocket]:
    """A devstream.v1 stream whose sides are plain WebSockets: (device side, service side)."""
    device = await manual_device(env)
    sides: dict[str, WebSocket] = {}

    async def device_side() -> None:
        request = await device.next_request()
        await device.send(request.accept())
        sides["device"] = await join_raw(env, request.url, request.token, [FRAMED_SUBPROTOCOL])

    async with trio.open_nursery() as nursery:
        nursery.start_soon(device_side)
        response = await initiate(
            env, "manual", "echo", headers=[("devstream-stream-mode", FRAMED_SUBPROTOCOL)]
        )
        assert response.header(b"iothub-streaming-is-accepted") == b"True"
        url = (response.header(b"iothub-streaming-url") or b"").decode()
        token = (response.header(b"iothub-streaming-auth-token") or b"").decode()
        sides["service"] = await join_raw(env, url, token, [FRAMED_SUBPROTOCOL])
    return sides["device"], sides["service"]


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        (
            masked_frame(0x02, b"\x01") + masked_frame(0x00, b"") * (MAX_MESSAGE_FRAGMENTS + 100),
            (1009, "message in too many fragments"),
        ),
        (
            masked_frame(0x81, b"\x01\x00\x00\x00\x09\x00\x00\x00\x00\x00\x00\x00\x00x"),
            (1003, "a text message where only binary ones are taken"),
        ),
    ],
    ids=["too-many-fragments", "text"],
)
async def test_a_framed_side_that_breaks_the_rules_of_messages_is_closed_and_so_is_its_peer(
    env: HubEnv, autojump_clock: trio.abc.Clock, wire: bytes, expected: tuple[int, str]
) -> None:
    """A devstream.v1 side that sends a binary frame without FIN and then empty continuations
    is closed with 1009 once MAX_MESSAGE_FRAGMENTS fragments came without the end; one that
    sends a text message (devstream.v1 messages are binary), with 1003. Either way at once,
    its peer gets the same close (not the text as binary, to read as frames), and the hub
    serves everyone else."""
    with trio.fail_after(30):
        device_ws, service_ws = await framed_stream_sides(env)
        start = trio.current_time()
        await service_ws.stream.send_all(wire)
        with pytest.raises(ConnectionClosed) as closed:
            await service_ws.receive()
        with pytest.raises(ConnectionClosed) as peer_closed:
            await device_ws.receive()
    assert trio.current_time() - start < 0.01
    assert (closed.value.code, closed.value.reason) == expected
    assert (peer_closed.value.code, peer_closed.value.reason) == expected
    await assert_serving(env)


async def test_a_raw_message_in_tiny_fragments_goes_on_a_batch_at_a_time(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """A raw side's message in thousands of 6-byte fragments, all in one read: the hub relays
    them a batch (MAX_BATCH_FRAMES) at a time, each batch as one frame joined once, and holds
    no more than a batch. The message arrives intact, in no virtual time."""
    count = 2 * MAX_BATCH_FRAMES + 7
    pieces = [bytes([index % 251]) * 6 for index in range(count)]
    with trio.fail_after(30):
        device_ws, service_ws = await _raw_pair(env)
        start = trio.current_time()
        await service_ws.stream.send_all(
            b"".join(
                masked_frame(
                    (0x02 if index == 0 else 0x00) | (0x80 if index == count - 1 else 0), piece
                )
                for index, piece in enumerate(pieces)
            )
        )
        frames: list[bytes] = []
        frame = b""
        while True:
            event = await device_ws.receive()
            frame += payload(event)  # type: ignore[operator]
            if event.frame_finished:
                frames.append(frame)
                frame = b""
            if event.message_finished:
                break
    assert trio.current_time() - start < 0.01
    assert [len(frame) for frame in frames] == [6 * MAX_BATCH_FRAMES, 6 * MAX_BATCH_FRAMES, 6 * 7]
    assert b"".join(frames) == b"".join(pieces)
    await assert_serving(env)


# -- the registry ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'"device"',
        b"\xff\xfe",
        b'{"deviceId": "x", "deviceId": "y"',
        b'{"status": "enabled", "status": "disabled"}',
        b'{"authentication": {"symmetricKey": {}, "symmetricKey": {}}}',
        b'{"statusReason": NaN}',
    ],
    ids=[
        "broken",
        "array",
        "string",
        "not-utf8",
        "truncated",
        "repeated-member",
        "repeated-nested-member",
        "nan",
    ],
)
async def test_invalid_json_in_a_registry_put(
    env: HubEnv, autojump_clock: trio.abc.Clock, body: bytes
) -> None:
    with trio.fail_after(10):
        response = await call(env, "PUT", "/devices/newdev", headers=[auth(env)], body=body)
    assert (response.status, error_code(response)) == (400, 400902)
    assert await env.store.get_device("newdev") is None
    await assert_serving(env)


# -- everything at once ----------------------------------------------------------------------


async def test_a_stream_keeps_flowing_while_bad_inputs_are_handled(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """One echo round trip every second for 70 s, while bad clients come and go."""
    stream = await env.service().open_stream("probe", "echo")
    outcomes: dict[str, object] = {}
    round_trips: list[float] = []

    async def steady_stream() -> None:
        for index in range(70):
            message = f"round trip {index:03d} ".encode() + os.urandom(64)
            sent = trio.current_time()
            await stream.send_all(message)
            assert await read_exactly(stream, len(message)) == message
            round_trips.append(trio.current_time() - sent)
            await trio.sleep(1)

    async def slow_headers() -> None:
        outcomes["slow"] = (await slow_header_client(env))[:2]

    async def garbage() -> None:
        await trio.sleep(2.5)
        outcomes["garbage"] = await raw_exchange(env, b"GARBAGE\r\n\r\n")

    async def huge_headers() -> None:
        await trio.sleep(3.5)
        data = b"GET / HTTP/1.1\r\nhost: h\r\nx-pad: " + b"z" * 40_000 + b"\r\n\r\n"
        outcomes["huge"] = await raw_exchange(env, data)

    async def forged_sas() -> None:
        await trio.sleep(4.5)
        header = sas(key=new_key(os.urandom(32)), expiry=hour_from_now(env))
        outcomes["forged"] = await initiate_with(env, header)

    async def bad_control() -> None:
        device = await manual_device(env, "noisy")
        await trio.sleep(5.5)
        await device.ws.send_text("x" * 70_000)
        closed, _ = await closed_by_hub(device.ws)
        outcomes["control"] = closed.code

    async def silent_device() -> None:
        device = await manual_device(env, "silent")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(device.next_request)
            response = await initiate(
                env,
                "silent",
                "echo",
                headers=[("iothub-streaming-response-timeout-in-seconds", "20")],
            )
            outcomes["silent"] = error_code(response)

    async def lonely_side() -> None:
        device = await manual_device(env, "lonely")
        request, _, _ = await accepted_stream(env, device)
        ws = await join_raw(env, request.url, request.token)
        closed, _ = await closed_by_hub(ws)
        outcomes["lonely"] = closed.code

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for task in (
                slow_headers,
                garbage,
                huge_headers,
                forged_sas,
                bad_control,
                silent_device,
                lonely_side,
            ):
                nursery.start_soon(task)
            await steady_stream()
    await stream.aclose()
    assert len(round_trips) == 70
    assert max(round_trips) < 0.1
    assert outcomes == {
        "slow": (408, 408901),
        "garbage": (400, 400901),
        "huge": (431, 431901),
        "forged": 401002,
        "control": 4413,
        "silent": 504101,
        "lonely": 4504,
    }
    await assert_serving(env)


@pytest.mark.parametrize(
    ("request_line", "allow"),
    [
        (b"DELETE /healthz HTTP/1.1", b"GET"),
        (b"PATCH /devices/d1 HTTP/1.1", b"DELETE, GET, PUT"),
        (b"PUT /twins/d1/streams/ssh HTTP/1.1", b"GET, POST"),
    ],
)
async def test_a_method_a_path_does_not_answer_gets_405_with_allow(
    env: HubEnv, autojump_clock: trio.abc.Clock, request_line: bytes, allow: bytes
) -> None:
    """RFC 9110 §15.5.6: a 405 names the methods the path answers in an Allow header."""
    stream = await env.open(HUB)
    await stream.send_all(request_line + b"\r\nhost: hub\r\ncontent-length: 0\r\n\r\n")
    answer = bytearray()
    while chunk := await stream.receive_some():
        answer += chunk
    head, _, body = bytes(answer).partition(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    assert lines[0].startswith(b"http/1.1 405 ")
    assert [line for line in lines if line.startswith(b"allow:")] == [b"allow: " + allow.lower()]
    assert json.loads(body)["errorCode"] == ErrorCode.METHOD_NOT_ALLOWED
    await assert_serving(env)


async def test_a_request_in_absolute_form_is_served(
    env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    # RFC 9112 §3.2.2: what a client sends to a proxy, a server accepts too.
    with trio.fail_after(10):
        stream = await env.open(HUB)
        await stream.send_all(
            b"GET http://hub.test:8080/healthz HTTP/1.1\r\nhost: hub.test\r\n\r\n"
        )
        answer = await stream.receive_some()
        await trio.aclose_forcefully(stream)
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert b'"status": "ok"' in answer
    await assert_serving(env)
