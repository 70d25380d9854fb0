"""The HTTP/1.1 adapter (``devstream_trio.transport.http``) over in-memory streams.

Test rules: no sockets; every test runs on ``trio.testing.memory_stream_pair()`` and anything that
waits runs on the ``autojump_clock`` (the hypothesis test drives its own ``MockClock``), so the
timeouts are checked to the exact second without slowing the suite down.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Sequence
from types import ModuleType

import h11
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from wsproto.connection import Connection as WsConnection
from wsproto.connection import ConnectionType
from wsproto.events import BytesMessage

from devstream_core import handshake
from devstream_core.errors import DevstreamError, ErrorCode
from devstream_trio.transport.http import (
    HttpError,
    HttpRequest,
    HttpResponse,
    HttpServerConnection,
    HttpStatusError,
    accept_token,
    http_request,
    parse_101,
    parse_upgrade_request,
    websocket_connect,
)
from devstream_trio.transport.websocket import payload

from ._helpers import load_fuzz_harness, run_checking_harness

GET = b"GET /devices?top=10 HTTP/1.1\r\nHost: hub.test\r\nAccept: */*\r\nX-Trace: one, two\r\n\r\n"
POST = (
    b"POST /twins/d1/streams/ssh?api-version=2020-05-31 HTTP/1.1\r\n"
    b"Host: hub.test\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
    b'{"hello": "hub"}\n'
)
CHUNKED = (
    b"PUT /devices/d1 HTTP/1.1\r\nHost: hub.test\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nhello\r\n1;ext=1\r\n \r\n3\r\nhub\r\n0\r\n\r\n"
)


async def read_response(stream: trio.abc.Stream) -> HttpResponse:
    """Read one response from *stream*, parsed by h11 as a client would."""
    conn = h11.Connection(h11.CLIENT)
    conn.send(h11.Request(method="GET", target="/", headers=[("host", "hub.test")]))
    conn.send(h11.EndOfMessage())
    status = 0
    headers: list[tuple[bytes, bytes]] = []
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some()))
        elif isinstance(event, h11.Response):
            status = event.status_code
            headers = [(bytes(k), bytes(v)) for k, v in event.headers]
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return HttpResponse(status=status, headers=headers, body=bytes(body))
        else:
            raise AssertionError(f"unexpected event {event!r}")


async def receive_until_eof(stream: trio.abc.Stream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some():
        data += chunk
    return bytes(data)


async def serve_all(http: HttpServerConnection) -> list[HttpRequest]:
    """Answer every request with ``204`` until the client leaves; return the requests."""
    requests: list[HttpRequest] = []
    while (request := await http.next_request()) is not None:
        requests.append(request)
        await http.send_response(204)
    return requests


async def parse_in_chunks(chunks: Sequence[bytes]) -> list[HttpRequest]:
    """Feed *chunks* one read at a time to a server and return the requests it parsed."""
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    result: list[HttpRequest] = []

    async def serve() -> None:
        result.extend(await serve_all(http))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        for chunk in chunks:
            # Let the server read each chunk on its own, so the split points are real.
            await trio.testing.wait_all_tasks_blocked()
            await client.send_all(chunk)
        await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()
    return result


#: A WebSocket upgrade request, the RFC 6455 example's key.
UPGRADE = (
    b"GET /s HTTP/1.1\r\nHost: hub.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)


async def received(raw: bytes) -> tuple[trio.abc.Stream, HttpServerConnection, HttpRequest]:
    """A server connection that has parsed the request *raw*: (the client's end, the
    connection, the request)."""
    client_stream, server_stream = trio.testing.memory_stream_pair()
    await client_stream.send_all(raw)
    http = HttpServerConnection(server_stream)
    request = await http.next_request()
    assert request is not None
    return client_stream, http, request


def split(data: bytes, points: Sequence[int]) -> list[bytes]:
    cuts = [0, *sorted(points), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


# --- requests -----------------------------------------------------------------------------


async def test_get_request(autojump_clock: trio.abc.Clock) -> None:
    (request,) = await parse_in_chunks([GET])
    assert request.method == b"GET"
    assert request.target == b"/devices?top=10"
    assert request.header(b"host") == b"hub.test"
    assert request.header(b"x-trace") == b"one, two"
    assert request.header_tokens(b"x-trace") == ["one", "two"]
    assert request.header(b"missing") is None
    assert request.body == b""
    assert not request.is_websocket_upgrade


async def test_post_request_with_body(autojump_clock: trio.abc.Clock) -> None:
    (request,) = await parse_in_chunks([POST])
    assert request.method == b"POST"
    assert request.target == b"/twins/d1/streams/ssh?api-version=2020-05-31"
    assert request.header(b"content-type") == b"application/json"
    assert request.body == b'{"hello": "hub"}\n'


async def test_a_client_that_expects_100_continue_is_told_to_send_its_body(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, header_timeout=10)
    head = (
        b"PUT /devices/d1 HTTP/1.1\r\nhost: hub.test\r\ncontent-length: 9\r\n"
        b"expect: 100-continue\r\n\r\n"
    )
    start = trio.current_time()
    async with trio.open_nursery() as nursery:

        async def client_side() -> None:
            await client.send_all(head)
            interim = await client.receive_some()
            assert interim == b"HTTP/1.1 100 \r\n\r\n"
            await client.send_all(b"hello hub")

        nursery.start_soon(client_side)
        request = await http.next_request()
    assert request is not None
    assert request.body == b"hello hub"
    assert trio.current_time() - start < 0.01  # not the client's wait for a 100 that never came
    await http.send_response(204)
    assert (await client.receive_some()).startswith(b"HTTP/1.1 204 ")


async def test_a_body_too_large_gets_413_without_a_100(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_body_size=1000)
    await client.send_all(
        b"PUT /devices/d1 HTTP/1.1\r\nhost: hub.test\r\ncontent-length: 1001\r\n"
        b"expect: 100-continue\r\n\r\n"
    )
    with pytest.raises(HttpError) as info:
        await http.next_request()
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    with trio.move_on_after(1) as waited:
        await client.receive_some()  # no 100: the body is refused before it is sent
    assert waited.cancelled_caught


async def test_chunked_body_is_joined(autojump_clock: trio.abc.Clock) -> None:
    (request,) = await parse_in_chunks([CHUNKED])
    assert request.method == b"PUT"
    assert request.body == b"hello hub"


async def test_keep_alive_serves_two_requests_on_one_connection(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    await client.send_all(GET)
    first = await http.next_request()
    assert first is not None and first.method == b"GET"
    await http.send_json(200, {"n": 1})
    response = await read_response(client)
    assert response.status == 200
    assert json.loads(response.body) == {"n": 1}

    await client.send_all(POST)
    second = await http.next_request()
    assert second is not None and second.method == b"POST"
    assert second.body == b'{"hello": "hub"}\n'
    await http.send_response(201, [(b"x-created", b"yes")], b"made", content_type=b"text/plain")
    response = await read_response(client)
    assert response.status == 201
    assert response.header(b"x-created") == b"yes"
    assert response.header(b"content-type") == b"text/plain"
    assert response.body == b"made"


async def test_pipelined_requests_in_one_chunk(autojump_clock: trio.abc.Clock) -> None:
    requests = await parse_in_chunks([GET + POST + CHUNKED])
    assert [r.method for r in requests] == [b"GET", b"POST", b"PUT"]
    assert [r.body for r in requests] == [b"", b'{"hello": "hub"}\n', b"hello hub"]


#: A request whose body length is given twice (RFC 9112 §6.1), then a second request.
BOTH_LENGTHS = (
    b"GET /devices HTTP/1.1\r\nHost: hub.test\r\nContent-Length: 5\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
)


async def answers(raw: bytes) -> list[int]:
    """Send *raw* at once to a server that answers each request with ``204`` (and an error
    with its response); return the statuses the client got before the server closed."""
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    await client.send_all(raw)
    await client.send_eof()
    try:
        await serve_all(http)
    except HttpError as exc:
        await http.send_error(exc.code, exc.message)
    await server.aclose()
    got = await receive_until_eof(client)
    return [int(status) for status in re.findall(rb"HTTP/1\.1 (\d{3}) ", got)]


async def test_a_request_with_both_body_lengths_is_refused_and_the_connection_closed(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The pipelined request after it is never answered: the connection closes.
    assert await answers(BOTH_LENGTHS + GET) == [400]
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(BOTH_LENGTHS)
    error = await refuse(client, HttpServerConnection(server), ErrorCode.MALFORMED_REQUEST)
    assert "Content-Length and Transfer-Encoding" in error.message


async def test_pipelined_requests_are_each_answered(autojump_clock: trio.abc.Clock) -> None:
    assert await answers(GET + POST + CHUNKED) == [204, 204, 204]


@pytest.mark.parametrize(
    "raw", [GET, POST, CHUNKED, GET + POST], ids=["get", "post", "chunked", "two"]
)
async def test_byte_at_a_time_equals_all_at_once(
    autojump_clock: trio.abc.Clock, raw: bytes
) -> None:
    whole = await parse_in_chunks([raw])
    assert whole
    assert await parse_in_chunks([raw[i : i + 1] for i in range(len(raw))]) == whole


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_random_splits_equal_all_at_once(data: st.DataObject) -> None:
    raw = data.draw(st.sampled_from([GET, POST, CHUNKED, GET + CHUNKED + POST]))
    points = data.draw(st.lists(st.integers(0, len(raw)), max_size=25))

    async def check() -> None:
        whole = await parse_in_chunks([raw])
        assert await parse_in_chunks(split(raw, points)) == whole

    trio.run(check, clock=trio.testing.MockClock(autojump_threshold=0))


# --- limits -------------------------------------------------------------------------------


async def refuse(client: trio.abc.Stream, http: HttpServerConnection, code: ErrorCode) -> HttpError:
    """Expect ``next_request`` to raise *code*, answer it, and check the response."""
    with pytest.raises(HttpError) as info:
        await http.next_request()
    assert info.value.code is code
    await http.send_error(info.value.code, info.value.message)
    response = await read_response(client)
    assert response.status == code.http_status
    assert response.header(b"content-type") == b"application/json; charset=utf-8"
    assert response.header(b"connection") == b"close"
    assert json.loads(response.body)["errorCode"] == int(code)
    # The connection is done after an error.
    assert await http.next_request() is None
    return info.value


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: hub.test\r\nBad Header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: hub.test\r\n: no-name\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: hub.test\r\nContent-Length: many\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # HTTP/1.1 requires Host
        b"POST / HTTP/1.1\r\nHost: hub.test\r\nTransfer-Encoding: gzip\r\n\r\n",
    ],
    ids=[
        "request-line",
        "header-no-colon",
        "header-no-name",
        "content-length",
        "no-host",
        "transfer-encoding",
    ],
)
async def test_malformed_request(autojump_clock: trio.abc.Clock, raw: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    await client.send_all(raw)
    await refuse(client, http, ErrorCode.MALFORMED_REQUEST)


async def test_headers_too_large_in_one_read(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_header_size=1000)
    await client.send_all(
        b"GET / HTTP/1.1\r\nHost: hub.test\r\nX-Big: " + b"a" * 1200 + b"\r\n\r\n"
    )
    await refuse(client, http, ErrorCode.HEADERS_TOO_LARGE)


async def test_headers_too_large_before_they_end(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_header_size=1000)
    await client.send_all(b"GET / HTTP/1.1\r\nHost: hub.test\r\nX-Big: " + b"a" * 1200)
    await refuse(client, http, ErrorCode.HEADERS_TOO_LARGE)


async def test_headers_just_under_the_limit_pass(autojump_clock: trio.abc.Clock) -> None:
    head = b"GET / HTTP/1.1\r\nHost: hub.test\r\nX-Big: "
    raw = head + b"a" * (1000 - len(head) - 4) + b"\r\n\r\n"
    assert len(raw) == 1000
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_header_size=1000)
    await client.send_all(raw)
    request = await http.next_request()
    assert request is not None
    assert request.header(b"x-big") == b"a" * (1000 - len(head) - 4)


async def test_body_too_large_by_content_length(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_body_size=1000)
    # Refused on the head alone: the body is never waited for.
    await client.send_all(b"POST / HTTP/1.1\r\nHost: hub.test\r\nContent-Length: 1001\r\n\r\n")
    await refuse(client, http, ErrorCode.PAYLOAD_TOO_LARGE)


async def test_body_too_large_by_chunks(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_body_size=1000)
    chunk = b"258\r\n" + b"x" * 600 + b"\r\n"
    await client.send_all(
        b"POST / HTTP/1.1\r\nHost: hub.test\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk + chunk
    )
    await refuse(client, http, ErrorCode.PAYLOAD_TOO_LARGE)


@pytest.mark.parametrize("chunked", [False, True])
async def test_body_at_the_limit_passes(autojump_clock: trio.abc.Clock, chunked: bool) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, max_body_size=1000)
    head = b"POST / HTTP/1.1\r\nHost: hub.test\r\n"
    if chunked:
        raw = head + b"Transfer-Encoding: chunked\r\n\r\n" + (b"1f4\r\n" + b"y" * 500 + b"\r\n") * 2
        raw += b"0\r\n\r\n"
    else:
        raw = head + b"Content-Length: 1000\r\n\r\n" + b"y" * 1000
    await client.send_all(raw)
    request = await http.next_request()
    assert request is not None
    assert request.body == b"y" * 1000


async def test_slow_headers_time_out(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, header_timeout=10)
    sent = 0

    async def trickle() -> None:
        nonlocal sent
        for byte in GET:
            await client.send_all(bytes([byte]))
            sent += 1
            await trio.sleep(1)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trickle)
        with pytest.raises(HttpError) as info:
            await http.next_request()
        assert info.value.code is ErrorCode.REQUEST_TIMEOUT
        # The server gave up exactly at header_timeout: not before, though bytes kept coming.
        assert trio.current_time() - start == pytest.approx(10)
        assert 10 <= sent < len(GET)
        nursery.cancel_scope.cancel()
    await http.send_error(ErrorCode.REQUEST_TIMEOUT)
    response = await read_response(client)
    assert response.status == 408
    assert json.loads(response.body)["errorCode"] == 408901


async def test_header_clock_starts_at_first_byte_of_kept_alive_request(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, header_timeout=10, idle_timeout=60)
    await client.send_all(GET)
    assert await http.next_request() is not None
    await http.send_response(204)

    async def idle_then_trickle() -> None:
        await trio.sleep(20)
        for byte in GET:
            await client.send_all(bytes([byte]))
            await trio.sleep(1)

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(idle_then_trickle)
        with pytest.raises(HttpError) as info:
            await http.next_request()
        assert info.value.code is ErrorCode.REQUEST_TIMEOUT
        # 20 s idle (allowed: under idle_timeout) + 10 s header_timeout from the first byte.
        assert trio.current_time() - start == pytest.approx(30)
        nursery.cancel_scope.cancel()


async def test_idle_keep_alive_connection_closes_silently(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server, header_timeout=10, idle_timeout=30)
    await client.send_all(GET)
    assert await http.next_request() is not None
    await http.send_response(204)
    start = trio.current_time()
    assert await http.next_request() is None
    assert trio.current_time() - start == pytest.approx(30)
    await server.aclose()
    # Exactly one response on the wire: no 408 for an idle connection.
    data = await receive_until_eof(client)
    assert data.startswith(b"HTTP/1.1 204 ")
    assert data.count(b"HTTP/1.1") == 1


async def test_client_that_closes_before_a_request(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    await client.send_eof()
    assert await http.next_request() is None


async def test_client_that_closes_between_requests(autojump_clock: trio.abc.Clock) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    await client.send_all(GET)
    assert await http.next_request() is not None
    await http.send_response(204)
    await client.send_eof()
    assert await http.next_request() is None


@pytest.mark.parametrize(
    "raw",
    [b"GET / HTTP/1.1\r\nHo", POST[:-5], CHUNKED[:-7]],
    ids=["in-head", "in-body", "in-chunks"],
)
async def test_client_that_closes_mid_request(autojump_clock: trio.abc.Clock, raw: bytes) -> None:
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    await client.send_all(raw)
    await client.send_eof()
    await refuse(client, http, ErrorCode.MALFORMED_REQUEST)


# --- WebSocket handshake --------------------------------------------------------------------


def test_accept_token_matches_rfc_6455_example() -> None:
    assert accept_token(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


async def test_websocket_handshake_with_subprotocol(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    seen: list[HttpRequest] = []

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        request = await http.next_request()
        assert request is not None
        seen.append(request)
        offered = request.header_tokens(b"sec-websocket-protocol")
        ws = await http.accept_websocket(request, subprotocol=offered[-1])
        assert ws.subprotocol == "devstream.control.v1"
        message = payload(await ws.receive())
        assert isinstance(message, bytes)
        await ws.send_bytes(b"echo:" + message)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            ws = await websocket_connect(
                client_stream,
                host="hub.test:8080",
                target="/devices/d1/streams",
                headers=[("authorization", "SharedAccessSignature sr=x")],
                subprotocols=["devstream.control.v0", "devstream.control.v1"],
            )
            assert ws.subprotocol == "devstream.control.v1"
            await ws.send_bytes(b"hi")
            reply = await ws.receive()
            assert payload(reply) == b"echo:hi"
    (request,) = seen
    assert request.is_websocket_upgrade
    assert request.target == b"/devices/d1/streams"
    assert request.header(b"host") == b"hub.test:8080"
    assert request.header(b"authorization") == b"SharedAccessSignature sr=x"
    assert request.header_tokens(b"sec-websocket-protocol") == [
        "devstream.control.v0",
        "devstream.control.v1",
    ]


async def test_websocket_without_subprotocol(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        request = await http.next_request()
        assert request is not None
        assert request.header(b"sec-websocket-protocol") is None
        ws = await http.accept_websocket(request)
        assert ws.subprotocol is None

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            ws = await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
            assert ws.subprotocol is None


def handshake_response(key: bytes, accept: bytes | None = None) -> bytes:
    return (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: "
        + (accept if accept is not None else accept_token(key))
        + b"\r\n\r\n"
    )


async def hand_made_server(
    server_stream: trio.abc.Stream, extra: bytes, accept: bytes | None
) -> None:
    """Read the client's upgrade request and answer it by hand, *extra* in the same write."""
    http = HttpServerConnection(server_stream)
    request = await http.next_request()
    assert request is not None
    key = request.header(b"sec-websocket-key")
    assert key is not None
    await server_stream.send_all(handshake_response(key, accept) + extra)


async def test_client_rejects_a_wrong_accept_value(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    wrong = accept_token(b"some other key==")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hand_made_server, server_stream, b"", wrong)
            with pytest.raises(DevstreamError) as info:
                await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert "Sec-WebSocket-Accept" in info.value.message


#: A good answer to the upgrade; ``ACCEPT`` stands for the accept value of the client's key.
GOOD_101 = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: ACCEPT\r\n\r\n"
)
#: Answers that break RFC 6455 §4.1 for a client that offered ``devstream.v1``, each with
#: the words its error names.
BAD_101S = {
    "no-upgrade-no-connection-unoffered-protocol": (
        b"HTTP/1.1 101 Switching Protocols\r\nSec-WebSocket-Accept: ACCEPT\r\n"
        b"Sec-WebSocket-Protocol: evil.v9\r\n\r\n",
        "Upgrade: websocket",
    ),
    "no-upgrade": (GOOD_101.replace(b"Upgrade: websocket\r\n", b""), "Upgrade: websocket"),
    "upgrade-h2c": (GOOD_101.replace(b"Upgrade: websocket", b"Upgrade: h2c"), "Upgrade"),
    "no-connection": (GOOD_101.replace(b"Connection: Upgrade\r\n", b""), "Connection"),
    "no-accept": (GOOD_101.replace(b"Sec-WebSocket-Accept: ACCEPT\r\n", b""), "Accept"),
    "accept-twice": (
        GOOD_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Accept: ACCEPT\r\n\r\n"),
        "Accept",
    ),
    "unoffered-protocol": (
        GOOD_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: evil.v9\r\n\r\n"),
        "Sec-WebSocket-Protocol",
    ),
    "unoffered-extension": (
        GOOD_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n"),
        "Sec-WebSocket-Extensions",
    ),
}


async def answering_server(server_stream: trio.abc.Stream, answer: bytes) -> None:
    """Read an upgrade request; send *answer* with its ``ACCEPT`` the right accept value."""
    request = await HttpServerConnection(server_stream).next_request()
    assert request is not None
    key = request.header(b"sec-websocket-key")
    assert key is not None
    await server_stream.send_all(answer.replace(b"ACCEPT", accept_token(key)))


@pytest.mark.parametrize("reader", ["plain", "h11"])
@pytest.mark.parametrize("case", list(BAD_101S))
async def test_client_refuses_a_101_that_breaks_the_handshake(
    autojump_clock: trio.abc.Clock, case: str, reader: str
) -> None:
    answer, words = BAD_101S[case]
    if reader == "h11":
        # A head that ends with a bare line feed is left to h11 by the client's own reader.
        answer = answer.replace(b"\r\n\r\n", b"\r\n\n")
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answering_server, server_stream, answer)
            with pytest.raises(DevstreamError) as info:
                await websocket_connect(
                    client_stream, host="hub.test", target="/s", subprotocols=["devstream.v1"]
                )
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert info.value.message.startswith("bad answer to the WebSocket handshake: ")
    assert words in info.value.message


@pytest.mark.parametrize("reader", ["plain", "h11"])
async def test_client_takes_a_good_101_either_way(
    autojump_clock: trio.abc.Clock, reader: str
) -> None:
    answer = GOOD_101.replace(b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: devstream.v1\r\n\r\n")
    if reader == "h11":
        answer = answer.replace(b"\r\n\r\n", b"\r\n\n")
    client_stream, server_stream = trio.testing.memory_stream_pair()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answering_server, server_stream, answer)
            ws = await websocket_connect(
                client_stream, host="hub.test", target="/s", subprotocols=["x", "devstream.v1"]
            )
    assert ws.subprotocol == "devstream.v1"


async def test_client_takes_an_interim_answer_as_a_refusal(autojump_clock: trio.abc.Clock) -> None:
    # The first answer to the upgrade is the answer (RFC 6455 §4.1; wsproto reads it so).
    client_stream, server_stream = trio.testing.memory_stream_pair()
    answer = b"HTTP/1.1 100 Continue\r\n\r\n" + GOOD_101
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(answering_server, server_stream, answer)
            with pytest.raises(HttpStatusError) as info:
                await websocket_connect(client_stream, host="hub.test", target="/s")
    assert info.value.response.status == 100


async def test_client_keeps_frames_sent_with_the_101(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server_ws = WsConnection(ConnectionType.SERVER)
    frames = server_ws.send(BytesMessage(data=b"first")) + server_ws.send(BytesMessage(data=b"two"))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(hand_made_server, server_stream, frames, None)
            ws = await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
            assert payload(await ws.receive()) == b"first"
            assert payload(await ws.receive()) == b"two"


async def test_server_keeps_frames_sent_with_the_request(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    client_ws = WsConnection(ConnectionType.CLIENT)
    request = (
        b"GET /bridges/s1 HTTP/1.1\r\nHost: hub.test\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    await client_stream.send_all(request + client_ws.send(BytesMessage(data=b"early")))
    http = HttpServerConnection(server_stream)
    parsed = await http.next_request()
    assert parsed is not None and parsed.is_websocket_upgrade
    with trio.fail_after(10):
        ws = await http.accept_websocket(parsed)
        assert payload(await ws.receive()) == b"early"
    head = await client_stream.receive_some()
    assert head.startswith(b"HTTP/1.1 101 ")
    assert b"sec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in head


async def answer_to(parts: Sequence[bytes]) -> tuple[HttpError, h11.Response, bytes]:
    """Send *parts* one read each to a server connection that refuses the request it reads;
    return its error, the response the client got (parsed by h11) and the response's body."""
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    for part in parts:
        await client.send_all(part)
        await trio.testing.wait_all_tasks_blocked()
    with pytest.raises(HttpError) as info:
        await http.next_request()
    await http.send_error(info.value.code, info.value.message)
    await server.aclose()
    reply = h11.Connection(h11.CLIENT)
    reply.send(h11.Request(method="GET", target="/", headers=[("host", "h")]))
    reply.send(h11.EndOfMessage())
    reply.receive_data(await receive_until_eof(client))
    reply.receive_data(b"")
    response = reply.next_event()
    assert isinstance(response, h11.Response)
    body = reply.next_event()
    assert isinstance(body, h11.Data)
    assert isinstance(reply.next_event(), h11.EndOfMessage)
    assert isinstance(reply.next_event(), h11.ConnectionClosed)  # and nothing after it
    return info.value, response, bytes(body.data)


#: Upgrade requests the hub refuses (RFC 6455 §4.2.1), each with the code it answers.
BAD_UPGRADES = {
    "key-not-base64": (
        UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"not-base64!!"),
        ErrorCode.MALFORMED_REQUEST,
    ),
    "key-of-3-bytes": (
        UPGRADE.replace(b"dGhlIHNhbXBsZSBub25jZQ==", b"AAAA"),
        ErrorCode.MALFORMED_REQUEST,
    ),
    "no-key": (
        UPGRADE.replace(b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", b""),
        ErrorCode.MALFORMED_REQUEST,
    ),
    "key-twice": (
        UPGRADE.replace(b"Version", b"Key: AAAAAAAAAAAAAAAAAAAAAA==\r\nSec-WebSocket-Version"),
        ErrorCode.MALFORMED_REQUEST,
    ),
    "post": (UPGRADE.replace(b"GET", b"POST"), ErrorCode.MALFORMED_REQUEST),
    "http-1.0": (UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0"), ErrorCode.MALFORMED_REQUEST),
    "version-8": (
        UPGRADE.replace(b"Version: 13", b"Version: 8"),
        ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED,
    ),
    "no-version": (
        UPGRADE.replace(b"Sec-WebSocket-Version: 13\r\n", b""),
        ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED,
    ),
}


@pytest.mark.parametrize("reads", [1, 2], ids=["one-read", "two-reads"])
@pytest.mark.parametrize("case", list(BAD_UPGRADES))
async def test_a_bad_upgrade_request_is_refused_whichever_way_it_is_read(
    autojump_clock: trio.abc.Clock, case: str, reads: int
) -> None:
    # One read: the hub's own reader takes what it can; two reads: h11 reads it.
    raw, code = BAD_UPGRADES[case]
    parts = [raw] if reads == 1 else [raw[:30], raw[30:]]
    error, response, body = await answer_to(parts)
    assert error.code is code
    assert response.status_code == code.http_status
    assert json.loads(body)["errorCode"] == int(code)
    headers = [(bytes(k), bytes(v)) for k, v in response.headers]
    assert (b"connection", b"close") in headers or (b"connection", b"close, upgrade") in headers
    if code.http_status == 426:
        # What the hub requires (RFC 9110 §15.5.22, RFC 6455 §4.2.2).
        assert (b"upgrade", b"websocket") in headers
        assert (b"sec-websocket-version", b"13") in headers
        assert (b"connection", b"close, upgrade") in headers


@pytest.mark.parametrize(
    ("field", "value"), [(b"Connection: Upgrade", b"Connection: x"), (b"websocket", b"h2c")]
)
async def test_a_request_that_does_not_ask_for_a_websocket_gets_no_101(
    autojump_clock: trio.abc.Clock, field: bytes, value: bytes
) -> None:
    # It does not ask for a WebSocket (the hub answers it as a plain request, or 426 on a
    # WebSocket path); answering it with a 101 is refused.
    _, http, request = await received(UPGRADE.replace(field, value))
    assert not request.is_websocket_upgrade
    with pytest.raises(HttpError) as info:
        await http.accept_websocket(request)
    assert info.value.code is ErrorCode.UPGRADE_REQUIRED


async def test_refused_handshake_raises_http_status_error(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        request = await http.next_request()
        assert request is not None and request.is_websocket_upgrade
        await http.send_error(ErrorCode.UNAUTHORIZED, "stream token signature does not match")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(HttpStatusError) as info:
                await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
    assert info.value.code is ErrorCode.UNAUTHORIZED
    assert info.value.response.status == 401
    assert info.value.message == "stream token signature does not match"


async def test_refusal_without_json_body_has_no_code(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        assert await http.next_request() is not None
        await http.send_response(502, body=b"bad gateway", content_type=b"text/plain")

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(HttpStatusError) as info:
                await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
    assert info.value.code is None
    assert info.value.response.status == 502
    assert info.value.message == "bad gateway"


# --- the client's plain requests ------------------------------------------------------------


async def tiny_server(stream: trio.abc.Stream, served: list[HttpRequest]) -> None:
    """Echo ``/echo`` as JSON; answer anything else with 404."""
    http = HttpServerConnection(stream)
    while (request := await http.next_request()) is not None:
        served.append(request)
        if request.target == b"/echo":
            await http.send_json(
                200,
                {"method": request.method.decode(), "body": request.body.decode()},
                headers=[(b"x-served-by", b"tiny")],
            )
        else:
            await http.send_error(ErrorCode.NOT_FOUND)


@pytest.mark.parametrize("method", ["POST", "PUT"])
async def test_http_request_with_body(autojump_clock: trio.abc.Clock, method: str) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    served: list[HttpRequest] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tiny_server, server_stream, served)
            response = await http_request(
                client_stream,
                method=method,
                host="hub.test",
                target="/echo",
                headers=[("content-type", "application/json")],
                body=b'{"a": 1}',
            )
            # The client asked to close: the server's loop ends by itself after one request.
    assert response.status == 200
    assert response.header(b"x-served-by") == b"tiny"
    assert response.header(b"content-type") == b"application/json; charset=utf-8"
    assert json.loads(response.body) == {"method": method, "body": '{"a": 1}'}
    (request,) = served
    assert request.header(b"connection") == b"close"
    assert request.header(b"content-length") == b"8"


async def test_http_request_error_response(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    served: list[HttpRequest] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(tiny_server, server_stream, served)
            response = await http_request(
                client_stream, method="GET", host="hub.test", target="/nowhere"
            )
    assert response.status == 404
    assert json.loads(response.body)["errorCode"] == int(ErrorCode.NOT_FOUND)
    assert served[0].method == b"GET" and served[0].body == b""


async def test_http_request_refuses_a_body_over_its_limit(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        assert await http.next_request() is not None
        await http.send_response(200, body=b"z" * 5000)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(DevstreamError) as info:
                await http_request(
                    client_stream, method="GET", host="hub.test", target="/", max_body=1000
                )
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE


async def test_http_request_when_the_server_hangs_up(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        assert await http.next_request() is not None
        await server_stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(DevstreamError) as info:
                await http_request(client_stream, method="GET", host="hub.test", target="/")
    assert info.value.code is ErrorCode.HUB_UNREACHABLE


async def test_the_101_carries_extra_headers_as_given(autojump_clock: trio.abc.Clock) -> None:
    # The hub writes its 101 itself; a client's h11 reads it as a well-formed response.
    client_stream, server_stream = trio.testing.memory_stream_pair()
    extra = [(b"x-devstream-resume-token", b"abc.def"), (b"x-empty", b"")]

    async def server() -> None:
        http = HttpServerConnection(server_stream)
        request = await http.next_request()
        assert request is not None
        await http.accept_websocket(request, subprotocol="devstream.v1", extra_headers=extra)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            ws = await websocket_connect(
                client_stream, host="hub.test", target="/s", subprotocols=["devstream.v1"]
            )
    assert ws.subprotocol == "devstream.v1"
    headers = dict(ws.handshake_headers)
    assert headers[b"x-devstream-resume-token"] == b"abc.def"
    assert headers[b"x-empty"] == b""
    assert headers[b"upgrade"] == b"websocket"


@pytest.mark.parametrize(
    "header",
    [(b"x-bad", b"one\r\ntwo"), (b"x-bad", b"nul\x00"), (b"bad name", b"v"), (b"x-bad", b" pad")],
)
async def test_a_101_header_that_would_break_the_response_is_refused(
    autojump_clock: trio.abc.Clock, header: tuple[bytes, bytes]
) -> None:
    _, http, request = await received(UPGRADE)
    with pytest.raises(ValueError, match="not a valid header"):
        await http.accept_websocket(request, extra_headers=[header])


async def test_a_request_without_upgrade_is_not_answered_with_a_101(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The upgrade request without its Upgrade and Connection headers.
    _, http, request = await received(
        UPGRADE.replace(b"Upgrade: websocket\r\nConnection: Upgrade\r\n", b"")
    )
    assert not request.is_websocket_upgrade
    with pytest.raises(HttpError) as info:
        await http.accept_websocket(request)
    assert info.value.code is ErrorCode.MALFORMED_REQUEST


async def test_a_declined_upgrade_closes_the_connection(autojump_clock: trio.abc.Clock) -> None:
    client_stream, http, _ = await received(UPGRADE)
    await http.send_json(401, {"message": "no"})
    head = (await client_stream.receive_some()).split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 401 ")
    assert b"connection: close" in head
    assert await http.next_request() is None


# -- the client's own request and 101 ---------------------------------------------------------


def test_the_client_request_head_is_what_h11_would_write() -> None:
    headers = [
        ("host", "hub.test:8443"),
        ("upgrade", "websocket"),
        ("authorization", "SharedAccessSignature sr=hub.test&sig=a%2Bb%3D&se=1&skn=service"),
        ("x-empty", ""),
        ("X-Mixed-Case", "inner  spaces\tand tab"),
    ]
    target = "/twins/d%201/streams/ssh?api-version=2020-09-30&x=~!$'()*"
    conn = h11.Connection(h11.CLIENT)
    expected = conn.send(h11.Request(method="GET", target=target, headers=headers))
    assert handshake.request_head(target, headers) == expected


@pytest.mark.parametrize(
    ("target", "header"),
    [
        ("/a b", ("host", "h")),
        ("/a\r\nX: y", ("host", "h")),
        ("", ("host", "h")),
        ("/", ("host", "h\r\nx-injected: 1")),
        ("/", ("host", " padded")),
        ("/", ("bad name", "v")),
        ("/", ("two: names", "v")),
        ("/", ("name:", "v")),
        ("/", ("two:names", "v")),
        ("/", ("host", "h\nx")),
        ("/", ("host", "h\nx-injected: 1")),
        ("/", ("host", "h\rx-injected: 1")),
        ("/", ("", "v")),
        ("/", ("host", "caf\u00e9")),
    ],
)
def test_a_client_request_h11_would_refuse_is_refused(target: str, header: tuple[str, str]) -> None:
    with pytest.raises(ValueError):
        handshake.request_head(target, [header])
    with pytest.raises((h11.LocalProtocolError, ValueError)):
        h11.Connection(h11.CLIENT).send(h11.Request(method="GET", target=target, headers=[header]))


#: The fuzz harness for the client's reader of a 101, whose h11 reference these tests share.
HTTP_RESPONSE_HARNESS = load_fuzz_harness("fuzz_http_response")


def h11_101(head: bytes) -> list[tuple[bytes, bytes]] | None:
    """The header fields h11 reads from *head* + blank line as the answer to an upgrade, or
    None if it reads no 101 there."""
    read = HTTP_RESPONSE_HARNESS.h11_reads(head + b"\r\n\r\n")
    return None if read is None else read[0]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nX-A:b\r\nX-B:  c d \t",
        b"HTTP/1.1 101\r\nX-Empty:",
        b"HTTP/1.1 101 \r\nX-Obs: caf\xc3\xa9",
    ],
)
def test_a_plain_101_is_read_as_h11_reads_it(head: bytes) -> None:
    fields = parse_101(head)
    assert fields is not None
    assert fields == h11_101(head)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0",
        b"HTTP/1.0 101 Switching Protocols\r\nUpgrade: websocket",
        b"HTTP/1.1 101 Switching\r\nUpgrade websocket",
        b"HTTP/1.1 101 Switching\r\nBad Name: v",
        b"HTTP/1.1 101 Switching\r\n: no name",
        b"HTTP/1.1 101 Switching\r\nX-Ctl: a\x00b",
        b"HTTP/1.1 101 Switching\r\nX-Fold: a\r\n  folded",
        b"HTTP/1.1 101 Switching\r\nX-Lf: a\nb",
        b"HTTP/1.1  101 Switching",
    ],
)
def test_anything_else_is_left_to_h11(head: bytes) -> None:
    assert parse_101(head) is None


_VISIBLE = st.binary(min_size=1, max_size=6).map(
    lambda b: bytes(0x21 + (x % 94) if x < 200 else x for x in b)
)
_BYTE_SOUP = st.binary(max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.from_regex(rb"\A[-!#$%&'*+.^_`|~0-9A-Za-z]{1,8}\Z"), _BYTE_SOUP),
            st.one_of(
                st.lists(_VISIBLE, max_size=3).map(b" ".join),
                _BYTE_SOUP,
                st.sampled_from([b" ", b"\t", b"  x  ", b"a\tb", b"\x7f", b"\xff"]),
            ),
        ),
        max_size=5,
    ),
    st.sampled_from([b"", b" Switching Protocols", b" ", b" \xe9t\xe9"]),
)
def test_whenever_the_client_reads_a_101_h11_reads_the_same(
    fields: list[tuple[bytes, bytes]], reason: bytes
) -> None:
    head = b"HTTP/1.1 101" + reason + b"".join(b"\r\n" + k + b":" + v for k, v in fields)
    ours = parse_101(head)
    if ours is not None:
        assert ours == h11_101(head)


async def test_a_101_that_comes_a_byte_at_a_time(autojump_clock: trio.abc.Clock) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()
    server_ws = WsConnection(ConnectionType.SERVER)

    async def server() -> None:
        request = await HttpServerConnection(server_stream).next_request()
        assert request is not None
        key = request.header(b"sec-websocket-key")
        assert key is not None
        answer = handshake_response(key) + server_ws.send(BytesMessage(data=b"hi"))
        for index in range(len(answer)):
            await server_stream.send_all(answer[index : index + 1])
            await trio.sleep(0.001)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            ws = await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
            assert dict(ws.handshake_headers)[b"upgrade"] == b"websocket"
            assert await ws.receive_message(100) == b"hi"


@pytest.mark.parametrize(
    "ending", [(b"\r\n", b"\n"), (b"\r\n\r\n", b"\n\r\n"), (b"\r\n\r\n", b"\r\n\n")]
)
async def test_a_101_with_bare_line_feeds_goes_through_h11(
    autojump_clock: trio.abc.Clock, ending: tuple[bytes, bytes]
) -> None:
    # h11 ends a head at its first empty line, carriage returns or not; the client reads no
    # further than h11 would, and leaves such a head to h11.
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        request = await HttpServerConnection(server_stream).next_request()
        assert request is not None
        key = request.header(b"sec-websocket-key")
        assert key is not None
        await server_stream.send_all(handshake_response(key).replace(*ending))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            ws = await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
    assert dict(ws.handshake_headers)[b"connection"] == b"Upgrade"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nX-Long: " + b"x" * 20_000,
        b"not http at all\r\n\r\n",
    ],
)
async def test_a_broken_answer_to_the_upgrade(
    autojump_clock: trio.abc.Clock, answer: bytes
) -> None:
    client_stream, server_stream = trio.testing.memory_stream_pair()

    async def server() -> None:
        assert await HttpServerConnection(server_stream).next_request() is not None
        await server_stream.send_all(answer)
        await server_stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server)
            with pytest.raises(DevstreamError) as info:
                await websocket_connect(client_stream, host="hub.test", target="/bridges/s1")
    assert info.value.code is ErrorCode.HUB_UNREACHABLE


def test_fuzz_harness_fallback_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = HTTP_RESPONSE_HARNESS
    # The client read many itself, each checked.
    run_checking_harness(harness, at_least=101)

    # A client that kept header names as they came would be caught.
    def keeps_case(head: bytes) -> list[tuple[bytes, bytes]] | None:
        if not head.startswith(b"HTTP/1.1 101"):
            return None
        lines = (line.partition(b":") for line in head.split(b"\r\n")[1:])
        return [(name, value.strip()) for name, _, value in lines]

    monkeypatch.setattr(harness, "parse_101", keeps_case)
    with pytest.raises(harness.Crash):
        harness.run_fallback(2000, seed=1)


def takes_handshakes(harness: ModuleType) -> None:
    """300 inputs through *harness*: ours took at least 5 handshakes, and wsproto took at
    least 5 of the same ones (the comparison of decisions is not an empty one)."""
    taken = list(harness.TAKEN)
    harness.run_fallback(300, seed=3)
    assert harness.TAKEN[0] - taken[0] >= 5
    assert harness.TAKEN[1] - taken[1] >= 5


def test_the_101_fuzz_harness_compares_decisions_with_wsproto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = HTTP_RESPONSE_HARNESS
    takes_handshakes(harness)  # answers the client took

    # A client that took a subprotocol it never offered would be caught.
    check_response = handshake.check_response

    def any_subprotocol(
        fields: list[tuple[bytes, bytes]], *, key: bytes, subprotocols: Sequence[str]
    ) -> str | None:
        chosen = [v.decode() for k, v in fields if k == b"sec-websocket-protocol"]
        rest = [f for f in fields if f[0] != b"sec-websocket-protocol"]
        return check_response(rest, key=key, subprotocols=subprotocols) or (chosen or [None])[0]

    monkeypatch.setattr(handshake, "check_response", any_subprotocol)
    with pytest.raises(harness.Crash, match="sec-websocket-protocol") as info:
        harness.run_fallback(0)
    assert "unrecognized subprotocol" in str(info.value.__cause__)  # wsproto's refusal


# --- the hub's reading of a plain upgrade request -------------------------------------------

#: The fuzz harness for the hub's reader of an upgrade request, whose h11 reference these
#: tests share.
HTTP_REQUEST_HARNESS = load_fuzz_harness("fuzz_http_request")

PLAIN_UPGRADE = (
    b"GET /bridges/s1?role=device HTTP/1.1\r\nHost: 127.0.0.1:4000\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer abc.def\r\n"
    b"X-Empty:\r\nX-Spaces: \t inner  spaces\t \r\n\r\n"
)


@pytest.mark.parametrize("after", [b"", b"\x82\x85abcdefghi"])
def test_a_plain_upgrade_request_is_read_as_h11_reads_it(after: bytes) -> None:
    read = parse_upgrade_request(PLAIN_UPGRADE + after, 16384)
    assert read is not None
    request, end = read
    assert end == len(PLAIN_UPGRADE)
    assert (request.method, request.target, request.headers, after) == (
        HTTP_REQUEST_HARNESS.h11_reads(PLAIN_UPGRADE + after)
    )
    assert request.header(b"x-spaces") == b"inner  spaces"
    assert request.is_websocket_upgrade


@pytest.mark.parametrize(
    "data",
    [
        PLAIN_UPGRADE[:-2],  # the head has not ended yet
        PLAIN_UPGRADE.replace(b"GET", b"POST", 1),
        PLAIN_UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        PLAIN_UPGRADE.replace(b"GET /", b"GET  /", 1),
        PLAIN_UPGRADE.replace(b"Host: 127.0.0.1:4000\r\n", b"", 1),  # h11 requires one
        PLAIN_UPGRADE.replace(b"Host:", b"Host: a\r\nHost:", 1),
        PLAIN_UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: , ", 1),
        PLAIN_UPGRADE.replace(b"Upgrade: websocket", b"X-Upgrade: websocket", 1),
        PLAIN_UPGRADE.replace(b"X-Empty:", b"Content-Length: 0", 1),
        PLAIN_UPGRADE.replace(b"X-Empty:", b"Transfer-Encoding: chunked", 1),
        PLAIN_UPGRADE.replace(b"X-Empty:", b"X-Empty: a\r\n folded", 1),
        PLAIN_UPGRADE.replace(b"X-Empty:", b"Bad Name: v", 1),
        PLAIN_UPGRADE.replace(b"X-Empty:", b"X-Ctl: a\x00b", 1),
        PLAIN_UPGRADE.replace(b"X-Empty:\r\n", b"X-Lf: a\n", 1),
        PLAIN_UPGRADE.replace(b"\r\n\r\n", b"\r\n\n", 1),
        PLAIN_UPGRADE.replace(b"/bridges/s1", b"/bridges/\xc3\xa9", 1),
        b"\r\n" + PLAIN_UPGRADE,
    ],
)
def test_anything_else_in_a_request_is_left_to_h11(data: bytes) -> None:
    assert parse_upgrade_request(data, 16384) is None


def test_a_request_head_over_the_limit_is_left_to_h11() -> None:
    assert parse_upgrade_request(PLAIN_UPGRADE, len(PLAIN_UPGRADE) - 4) is not None
    assert parse_upgrade_request(PLAIN_UPGRADE, len(PLAIN_UPGRADE) - 5) is None


_NAMES = st.one_of(
    st.sampled_from([b"Host", b"host", b"Upgrade", b"Connection", b"Content-Length", b"X-A"]),
    st.from_regex(rb"\A[-!#$%&'*+.^_`|~0-9A-Za-z]{1,8}\Z"),
    _BYTE_SOUP,
)
_VALUES = st.one_of(
    st.sampled_from([b"websocket", b"h", b"", b" ", b",", b"0", b"chunked", b"a, b"]),
    st.lists(_VISIBLE, max_size=3).map(b" ".join),
    _BYTE_SOUP,
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from([b"GET", b"POST", b"get", b"CONNECT"]),
    st.one_of(st.sampled_from([b"/", b"/bridges/s1?role=device", b"*"]), _VISIBLE, _BYTE_SOUP),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1"]),
    st.lists(st.tuples(_NAMES, st.sampled_from([b":", b": ", b":\t", b" :"]), _VALUES), max_size=6),
    st.sampled_from([b"\r\n\r\n", b"\r\n\n", b"\n\r\n", b"\r\n"]),
    st.binary(max_size=8),
)
def test_whenever_the_hub_reads_an_upgrade_request_h11_reads_the_same(
    method: bytes,
    target: bytes,
    version: bytes,
    fields: list[tuple[bytes, bytes, bytes]],
    end: bytes,
    after: bytes,
) -> None:
    head = method + b" " + target + b" " + version
    head += b"".join(b"\r\n" + name + sep + value for name, sep, value in fields)
    data = head + end + after
    read = parse_upgrade_request(data, 16384)
    if read is not None:
        request, head_end = read
        assert (request.method, request.target, request.headers, data[head_end:]) == (
            HTTP_REQUEST_HARNESS.h11_reads(data)
        )


def test_the_request_fuzz_harness_runs_and_catches_a_disagreement(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = HTTP_REQUEST_HARNESS
    # The hub read some itself, each checked.
    run_checking_harness(harness, at_least=21)

    # A reader that let a body slip through (a Content-Length it ignores) would be caught.
    def ignores_length(data: bytes, limit: int) -> tuple[HttpRequest, int] | None:
        read = parse_upgrade_request(data.replace(b"content-length", b"x-length"), limit)
        return read

    monkeypatch.setattr(harness, "parse_upgrade_request", ignores_length)
    monkeypatch.setattr(
        harness,
        "SEEDS",
        [b"GET / HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\ncontent-length: 1\r\n\r\nx"],
    )
    with pytest.raises(harness.Crash):
        harness.run_fallback(200, seed=1)


def test_the_request_fuzz_harness_compares_decisions_with_wsproto(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    harness = HTTP_REQUEST_HARNESS
    takes_handshakes(harness)  # handshakes the hub took

    # A hub that took any Sec-WebSocket-Key (wsproto does) would be caught.
    monkeypatch.setattr(handshake, "is_websocket_key", lambda key: True)
    with pytest.raises(harness.Crash, match="not-base64") as info:
        harness.run_fallback(0)
    assert "the hub took a handshake it must refuse" in str(info.value.__cause__)


async def serve_one(
    data_parts: Sequence[bytes], answer: str
) -> tuple[HttpServerConnection, HttpRequest | None, bytes]:
    """Send *data_parts* to an HttpServerConnection one read each; it reads one request and
    answers it (*answer*: "101" or "404"); return it, the request, and what the client got."""
    client, server = trio.testing.memory_stream_pair()
    http = HttpServerConnection(server)
    got = bytearray()
    request: HttpRequest | None = None

    async def serve() -> None:
        nonlocal request
        request = await http.next_request()
        assert request is not None
        if answer == "101":
            ws = await http.accept_websocket(request)
            got.extend(payload(await ws.receive()))  # type: ignore[arg-type]
        else:
            await http.send_json(404, {"errorCode": 404001}, [(b"x-why", b"test")])

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            for part in data_parts:
                await client.send_all(part)
                await trio.testing.wait_all_tasks_blocked()
            if answer == "404":
                reply = h11.Connection(h11.CLIENT)
                reply.send(h11.Request(method="GET", target="/", headers=[("host", "h")]))
                reply.send(h11.EndOfMessage())
                while not got.endswith(b"}"):
                    got.extend(await client.receive_some())
                reply.receive_data(bytes(got))
                response = reply.next_event()
                assert isinstance(response, h11.Response)
                assert response.status_code == 404
                assert (b"x-why", b"test") in list(response.headers)
    return http, request, bytes(got)


async def test_a_plain_upgrade_is_answered_without_h11_and_keeps_the_frames_after_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    frame = WsConnection(ConnectionType.CLIENT).send(BytesMessage(data=b"early"))
    http, request, got = await serve_one([PLAIN_UPGRADE + frame], "101")
    assert request is not None and request.target == b"/bridges/s1?role=device"
    assert http.conn.their_state is h11.IDLE  # h11 never saw the request
    assert got == b"early"


async def test_a_plain_upgrade_can_still_be_declined_with_a_response(
    autojump_clock: trio.abc.Clock,
) -> None:
    http, request, _ = await serve_one([PLAIN_UPGRADE], "404")
    assert request is not None
    assert http.conn.our_state is h11.MUST_CLOSE  # h11 answered it, and closes after


async def test_a_request_that_comes_in_two_reads_goes_through_h11(
    autojump_clock: trio.abc.Clock,
) -> None:
    frame = WsConnection(ConnectionType.CLIENT).send(BytesMessage(data=b"later"))
    http, request, got = await serve_one([PLAIN_UPGRADE[:40], PLAIN_UPGRADE[40:] + frame], "101")
    assert request is not None and request.header(b"authorization") == b"Bearer abc.def"
    assert http.conn.their_state is not h11.IDLE  # h11 read it
    assert got == b"later"


def h11_pauses_after(raw: bytes) -> bool:
    """True when h11, reading the request *raw*, pauses after it for a protocol switch (its
    documented behaviour: a client that proposed a switch gets PAUSED until the answer)."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(raw)
    while not isinstance(conn.next_event(), h11.EndOfMessage):
        pass
    return conn.next_event() is h11.PAUSED


@pytest.mark.parametrize(
    "raw",
    [
        PLAIN_UPGRADE,
        b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: h2c\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade:\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT h:443 HTTP/1.1\r\nHost: h\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: ,\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\nUpgrade: \t \r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: h\r\n\r\n",
    ],
)
async def test_a_request_read_by_h11_is_taken_as_a_switch_exactly_when_h11_pauses(
    autojump_clock: trio.abc.Clock, raw: bytes
) -> None:
    """In two reads, so h11 reads it: declined, it closes the connection exactly when h11
    waits for a protocol switch after it (a CONNECT, or an Upgrade with a value)."""
    _, request, got = await serve_one([raw[:20], raw[20:]], "404")
    assert request is not None
    head = got.split(b"\r\n\r\n")[0].lower()
    assert (b"connection: close" in head) is h11_pauses_after(raw)
