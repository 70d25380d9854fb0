"""A resume whose answer is lost: the side tries again with the token it still holds.

A devstream.v1 side that resumes gets its next resume token only in the hub's 101 answer. The
tests here lose that answer on its way to the side: the hub accepted the resume and issued a
fresh token, the side never read it and tries again with the token it came with. The retry is
accepted, the stream carries on and every byte arrives, once and in order (sha256 both ways);
once the side's first message proved the new connection, the old token (and every token of a
lost answer) is refused as ``STREAM_TOKEN_REUSED``.

Test rules: no sockets: clients reach the hub of ``hub_env`` through :class:`LossyRelay`, an
in-memory relay that cuts the streaming-endpoint connections through it and loses the hub's
answer on the next ones; everything runs on ``autojump_clock`` under ``trio.fail_after`` and
waits on events (bytes arriving), never on time.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from devstream_core.errors import ErrorCode
from devstream_core.framing import DEFAULT_WINDOW, EndpointState
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream
from devstream_trio.client.service import AnyStream, ServiceClient
from devstream_trio.transport.connect import HubAddress
from devstream_trio.transport.http import HttpStatusError, websocket_connect

from .conftest import PUBLIC_URL, HubEnv

MIB = 1024 * 1024
HUB = HubAddress.from_url(PUBLIC_URL)
HOST = "hub.test:8080"
END_OF_HEAD = b"\r\n\r\n"
TIMEOUT = 60


@dataclass
class Passage:
    """One connection through the relay."""

    #: The client's request head.
    head: bytes = b""
    #: The hub's answer head, when the relay lost it on its way to the client.
    lost_answer: bytes = b""

    @property
    def target(self) -> str:
        return self.head.split(b" ", 2)[1].decode("ascii")

    def header(self, head: bytes, name: bytes) -> str:
        for line in head.partition(END_OF_HEAD)[0].split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name:
                return value.strip().decode("ascii")
        return ""

    @property
    def bearer(self) -> str:
        return self.header(self.head, b"authorization").removeprefix("Bearer ")

    @property
    def lost_token(self) -> str:
        """The resume token the hub issued in the answer the client never read."""
        return self.header(self.lost_answer, b"devstream-resume-token")


class LossyRelay:
    """An opener relaying every connection to the ``hub_env`` hub in memory.

    :meth:`cut` closes every streaming-endpoint connection through it, both ends (a drop, no
    WebSocket close), and makes the relay lose the hub's answer to the next ``lose``
    streaming-endpoint requests: it forwards the request, reads the answer, throws it away and
    cuts the connection. With ``hang`` the hub's end of such a connection stays open and
    silent (the hub does not notice the drop before the retry replaces it); without, the hub
    sees it end at once.
    """

    def __init__(self, env: HubEnv, *, hang: bool) -> None:
        self.env = env
        self.hang = hang
        self.lose = 0
        self.passages: list[Passage] = []
        self._live: set[trio.CancelScope] = set()

    async def open(self, address: HubAddress) -> trio.abc.Stream:
        hub_end = await self.env.open(address)
        client_end, relay_end = trio.testing.memory_stream_pair()
        self.env.nursery.start_soon(self._serve, relay_end, hub_end)
        return client_end

    def cut(self, *, lose: int) -> int:
        """Cut every streaming-endpoint connection; lose the next ``lose`` answers."""
        self.lose = lose
        live = list(self._live)
        for scope in live:
            scope.cancel()
        return len(live)

    def bridge_passages(self) -> list[Passage]:
        """The stream connections: the side's first (a join, or a service's one-step open)
        and its resumes."""
        return [p for p in self.passages if p.head.startswith((b"GET /bridges/", b"GET /twins/"))]

    async def _serve(self, client: trio.abc.Stream, hub: trio.abc.Stream) -> None:
        passage = Passage()
        self.passages.append(passage)
        head = await self._read_head(client)
        while head.startswith(b"POST "):
            # The service's initiate: pass it and its answer on, then read the next request
            # (the service joins over the same, kept-alive connection).
            await hub.send_all(head)
            answer = await self._read_head(hub)
            answer += await self._read_body(hub, answer)
            await client.send_all(answer)
            head = await self._read_head(client, closed_ok=True)
            if not head:
                await trio.aclose_forcefully(client)
                await trio.aclose_forcefully(hub)
                return
        passage.head = bytes(head)
        bridge = passage.head.startswith(b"GET /bridges/")
        lose = bridge and self.lose > 0
        self.lose -= lose
        scope = trio.CancelScope()
        if bridge or passage.head.startswith(b"GET /twins/"):
            # A join, a resume, or the service's one-step open: a stream's connection.
            self._live.add(scope)
        hung = False
        try:
            with scope:
                await hub.send_all(head)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pipe, client, hub, nursery.cancel_scope)
                    if lose:
                        hung = self.hang
                        nursery.start_soon(self._lose_answer, hub, passage, nursery.cancel_scope)
                    else:
                        nursery.start_soon(self._pipe, hub, client, nursery.cancel_scope)
        finally:
            self._live.discard(scope)
            await trio.aclose_forcefully(client)
            if not hung:
                await trio.aclose_forcefully(hub)

    @staticmethod
    async def _read_head(stream: trio.abc.Stream, *, closed_ok: bool = False) -> bytearray:
        """One message head (with any bytes after it that came in the same reads)."""
        head = bytearray()
        while END_OF_HEAD not in head:
            chunk = await stream.receive_some()
            if not chunk and closed_ok and not head:
                return head
            assert chunk, "the peer closed before its head was complete"
            head += chunk
        return head

    @staticmethod
    async def _read_body(stream: trio.abc.Stream, head: bytearray) -> bytearray:
        """The rest of the body (``Content-Length``) of the message *head* starts."""
        top, _, already = bytes(head).partition(END_OF_HEAD)
        length = 0
        for line in top.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == b"content-length":
                length = int(value)
        rest = bytearray()
        while len(already) + len(rest) < length:
            chunk = await stream.receive_some()
            assert chunk, "the peer closed before its body was complete"
            rest += chunk
        return rest

    @staticmethod
    async def _pipe(
        source: trio.abc.Stream, sink: trio.abc.Stream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some():
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    @staticmethod
    async def _lose_answer(hub: trio.abc.Stream, passage: Passage, scope: trio.CancelScope) -> None:
        answer = bytearray()
        while END_OF_HEAD not in answer and (chunk := await hub.receive_some()):
            answer += chunk
        passage.lost_answer = bytes(answer)
        scope.cancel()


async def refused_resume(env: HubEnv, target: str, token: str) -> ErrorCode:
    """Present ``token`` on ``target`` directly to the hub; return the hub's error code."""
    with pytest.raises(HttpStatusError) as refused:
        await websocket_connect(
            await env.open(HUB),
            host=HOST,
            target=target,
            headers=[("authorization", f"Bearer {token}")],
            subprotocols=["devstream.v1"],
        )
    assert refused.value.code is not None
    return refused.value.code


async def send(stream: FramedStream, data: bytes) -> None:
    view = memoryview(data)
    for start in range(0, len(data), 64 * 1024):
        await stream.send_all(view[start : start + 64 * 1024])


@dataclass
class Reader:
    """Reads ``size`` bytes from a stream; calls ``at_half`` once, when half have arrived."""

    size: int
    at_half: Callable[[], None] = lambda: None
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    received: int = 0

    async def run(self, stream: FramedStream) -> None:
        while self.received < self.size:
            chunk = await stream.receive_some()
            assert chunk, "early EOF"
            before = self.received
            self.digest.update(chunk)
            self.received += len(chunk)
            if before < self.size // 2 <= self.received:
                self.at_half()


@pytest.mark.parametrize("lost", [1, 3])
@pytest.mark.parametrize("hang", [False, True], ids=["hub-sees-the-drop", "hub-misses-the-drop"])
@pytest.mark.parametrize("side", ["service", "device"])
async def test_the_stream_survives_resume_answers_lost_on_the_way(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, side: str, hang: bool, lost: int
) -> None:
    size = 3 * DEFAULT_WINDOW
    to_device = os.urandom(size)
    to_service = os.urandom(size)
    relay = LossyRelay(hub_env, hang=hang)
    with trio.fail_after(TIMEOUT):
        cs = await hub_env.create_device("d1")
        inbox_send, inbox_receive = trio.open_memory_channel[AnyStream](1)

        async def hand_over(stream: AnyStream) -> None:
            await inbox_send.send(stream)
            await trio.sleep_forever()

        device = DeviceClient(cs, opener=relay.open if side == "device" else hub_env.open)
        await hub_env.nursery.start(device.serve, {"pipe": hand_over})
        service = ServiceClient(
            hub_env.service_cs(),
            opener=relay.open if side == "service" else hub_env.open,
            nursery=hub_env.nursery,
        )
        service_stream = await service.open_stream("d1", "pipe")
        device_stream = await inbox_receive.receive()
        assert isinstance(service_stream, FramedStream)
        assert isinstance(device_stream, FramedStream)
        cut_side, other_side = (
            (service_stream, device_stream)
            if side == "service"
            else (device_stream, service_stream)
        )
        cuts: list[int] = []
        cut_at: list[float] = []

        def cut() -> None:
            # While the device still has half of it to read: the resume must resend.
            cuts.append(relay.cut(lose=lost))
            cut_at.append(trio.current_time())

        at_device, at_service = Reader(size, cut), Reader(size)
        async with trio.open_nursery() as transfer:
            transfer.start_soon(send, service_stream, to_device)
            transfer.start_soon(send, device_stream, to_service)
            transfer.start_soon(at_device.run, device_stream)
            transfer.start_soon(at_service.run, service_stream)

        # The resume took what the side's backoff deliberately waits after each failed
        # attempt (the first attempt is immediate; then at most 50 ms, 100 ms, ...), plus a
        # few milliseconds per connection: no stall until a ping.
        took = trio.current_time() - cut_at[0]
        backoff = sum(0.05 * 2**attempt for attempt in range(lost))
        assert took <= backoff + 0.005 * (lost + 1), (took, backoff)
        # Not a byte lost, duplicated or reordered (and nothing more: no EOF yet).
        assert at_device.digest.digest() == hashlib.sha256(to_device).digest()
        assert at_service.digest.digest() == hashlib.sha256(to_service).digest()
        assert cuts == [1]
        # The hub accepted every resume whose answer was lost, then the retry; the side saw
        # one resume, made with the token it held before the cut each time.
        join, *lost_passages, retry = relay.bridge_passages()
        assert len(lost_passages) == lost
        for passage in lost_passages:
            assert passage.lost_answer.startswith(b"HTTP/1.1 101 ")
            assert passage.lost_token
        assert {p.bearer for p in [*lost_passages, retry]} == {lost_passages[0].bearer}
        assert join.bearer != lost_passages[0].bearer
        assert (cut_side.resumes, other_side.resumes) == (1, 0)
        assert hub_env.hub.metrics.resumes_total == lost + 1
        # The retry's connection proved itself: the token it came with, and every token of a
        # lost answer, are spent; the stream does not notice the refusals.
        for token in [retry.bearer, *(p.lost_token for p in lost_passages)]:
            code = await refused_resume(hub_env, retry.target, token)
            assert code is ErrorCode.STREAM_TOKEN_REUSED

        # The stream ends cleanly: EOF both ways, then a close.
        for stream in (service_stream, device_stream):
            await stream.send_eof()
        for stream in (service_stream, device_stream):
            assert await stream.receive_some() == b""
        await service_stream.aclose()
        await device_stream.aclose()
        for stream in (service_stream, device_stream):
            assert stream.endpoint.state is EndpointState.DONE
        assert (cut_side.resumes, other_side.resumes) == (1, 0)
