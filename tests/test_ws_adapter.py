"""The WebSocket adapter (``devstream_trio.transport.websocket``) and the raw-mode
``HubStream`` over it.

Test rules: no sockets; pairs are built on ``trio.testing.memory_stream_pair()`` with codecs
already open (the opening handshake has its own tests in ``test_http_adapter``), and anything
that waits runs on the ``autojump_clock``. Where a test needs to see the exact frames on the
wire, one side is a bare wsproto connection (:class:`RawPeer`, an independent implementation)
instead of a ``WebSocket``; it takes and gives the codec's event classes.
"""

from __future__ import annotations

import itertools

import pytest
import trio
import trio.testing
import wsproto.events
from wsproto.connection import Connection as WsprotoConnection
from wsproto.connection import ConnectionType

from devstream_core.common import Role
from devstream_core.errors import ErrorCode, LocalProtocolError, close_reason_for
from devstream_core.websocket import (
    MAX_BATCH_FRAMES,
    BytesMessage,
    CloseConnection,
    Connection,
    Event,
    Ping,
    Pong,
    TextMessage,
)
from devstream_trio.client.stream import HubStream
from devstream_trio.exceptions import HubError
from devstream_trio.transport.websocket import (
    ABNORMAL_CLOSURE,
    MAX_MESSAGE_FRAGMENTS,
    ConnectionClosed,
    WebSocket,
    payload,
)


def ws_pair() -> tuple[WebSocket, WebSocket]:
    """A connected (client, server) pair of WebSockets."""
    a, b = trio.testing.memory_stream_pair()
    return (
        WebSocket(a, Connection(client=True)),
        WebSocket(b, Connection(client=False)),
    )


def sides(client_sends: bool) -> tuple[WebSocket, WebSocket]:
    """(sender, receiver) of a fresh pair, either way round."""
    client, server = ws_pair()
    return (client, server) if client_sends else (server, client)


def to_wsproto(event: Event) -> wsproto.events.Event:
    """The wsproto event for one of the codec's."""
    if isinstance(event, BytesMessage):
        return wsproto.events.BytesMessage(
            data=bytes(event.data),
            frame_finished=event.frame_finished,
            message_finished=event.message_finished,
        )
    if isinstance(event, TextMessage):
        return wsproto.events.TextMessage(
            data=event.data,
            frame_finished=event.frame_finished,
            message_finished=event.message_finished,
        )
    if isinstance(event, Ping):
        return wsproto.events.Ping(payload=event.payload)
    if isinstance(event, Pong):
        return wsproto.events.Pong(payload=event.payload)
    return wsproto.events.CloseConnection(code=event.code, reason=event.reason)


def from_wsproto(event: wsproto.events.Event) -> Event:
    """The codec's event for one of wsproto's."""
    if isinstance(event, wsproto.events.BytesMessage):
        return BytesMessage(bytes(event.data), event.frame_finished, event.message_finished)
    if isinstance(event, wsproto.events.TextMessage):
        return TextMessage(event.data, event.frame_finished, event.message_finished)
    if isinstance(event, wsproto.events.Ping):
        return Ping(payload=bytes(event.payload))
    if isinstance(event, wsproto.events.Pong):
        return Pong(payload=bytes(event.payload))
    assert isinstance(event, wsproto.events.CloseConnection), event
    return CloseConnection(code=int(event.code), reason=event.reason or "")


class RawPeer:
    """The other end of a ``WebSocket`` as a bare wsproto connection, frame by frame; it
    takes and gives the codec's events."""

    def __init__(self, stream: trio.abc.Stream, kind: ConnectionType) -> None:
        self.stream = stream
        self.ws = WsprotoConnection(kind)

    def wire(self, *events: Event) -> bytes:
        """The bytes wsproto sends for *events*."""
        return b"".join(self.ws.send(to_wsproto(e)) for e in events)

    async def send(self, *events: Event) -> None:
        """Send *events* in one write, so they reach the other side in one chunk."""
        await self.stream.send_all(self.wire(*events))

    async def next_events(self) -> list[Event]:
        """Read until wsproto has at least one event; return all it has."""
        while True:
            events = [from_wsproto(e) for e in self.ws.events()]
            if events:
                return events
            self.ws.receive_data(bytes(await self.stream.receive_some()))


def raw_pair(kind: ConnectionType = ConnectionType.SERVER) -> tuple[RawPeer, WebSocket]:
    """A ``WebSocket`` of type *kind* and a raw peer of the opposite type."""
    a, b = trio.testing.memory_stream_pair()
    other = ConnectionType.CLIENT if kind is ConnectionType.SERVER else ConnectionType.SERVER
    return RawPeer(a, other), WebSocket(b, Connection(client=kind is ConnectionType.CLIENT))


async def receive_message(ws: WebSocket) -> tuple[bytes | str, list[bool]]:
    """Join fragments until ``message_finished``; also return each fragment's flag."""
    parts: list[bytes | str] = []
    flags: list[bool] = []
    while True:
        event = await ws.receive()
        parts.append(payload(event))
        flags.append(event.message_finished)
        if event.message_finished:
            break
    if isinstance(parts[0], str):
        return "".join(p for p in parts if isinstance(p, str)), flags
    return b"".join(p for p in parts if isinstance(p, bytes)), flags


async def nothing_arrives(stream: trio.abc.Stream, seconds: float = 10) -> bool:
    """True if no byte arrives on *stream* for *seconds* of trio time."""
    with trio.move_on_after(seconds):
        await stream.receive_some()
        return False
    return True


# --- messages -------------------------------------------------------------------------------


@pytest.mark.parametrize("client_sends", [True, False], ids=["client-sends", "server-sends"])
async def test_binary_and_text_messages(autojump_clock: trio.abc.Clock, client_sends: bool) -> None:
    sender, receiver = sides(client_sends)
    await sender.send_bytes(b"\x00\x01\xffbinary")
    await sender.send_text("héllo ✓")
    await sender.send_bytes(b"")
    await sender.send_messages([BytesMessage(data=b"relayed"), TextMessage(data="relayed text")])

    first = await receiver.receive()
    assert isinstance(first, BytesMessage)
    assert payload(first) == b"\x00\x01\xffbinary"
    second = await receiver.receive()
    assert isinstance(second, TextMessage)
    assert payload(second) == "héllo ✓"
    assert await receive_message(receiver) == (b"", [True])
    assert await receive_message(receiver) == (b"relayed", [True])
    assert await receive_message(receiver) == ("relayed text", [True])


@pytest.mark.parametrize("client_sends", [True, False], ids=["client-sends", "server-sends"])
async def test_large_message_arrives_whole(
    autojump_clock: trio.abc.Clock, client_sends: bool
) -> None:
    sender, receiver = sides(client_sends)
    data = bytes(range(256)) * 1200  # larger than one transport read
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender.send_bytes, data)
        received, flags = await receive_message(receiver)
    assert received == data
    assert flags[-1] is True


@pytest.mark.parametrize("client_sends", [True, False], ids=["client-sends", "server-sends"])
async def test_fragments_keep_their_order_and_flags(
    autojump_clock: trio.abc.Clock, client_sends: bool
) -> None:
    sender, receiver = sides(client_sends)
    await sender.send_bytes(b"ab", message_finished=False)
    await sender.send_bytes(b"cd", message_finished=False)
    await sender.send_bytes(b"ef")
    await sender.send_text("gh", message_finished=False)
    await sender.send_text("ij")
    await sender.send_bytes(b"next")

    got = []
    for _ in range(6):
        event = await receiver.receive()
        got.append((type(event), payload(event), event.message_finished))
    assert got == [
        (BytesMessage, b"ab", False),
        (BytesMessage, b"cd", False),
        (BytesMessage, b"ef", True),
        (TextMessage, "gh", False),
        (TextMessage, "ij", True),
        (BytesMessage, b"next", True),
    ]


# --- pings --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [ConnectionType.SERVER, ConnectionType.CLIENT])
async def test_ping_is_answered_by_the_reader(
    autojump_clock: trio.abc.Clock, kind: ConnectionType
) -> None:
    peer, ws = raw_pair(kind)
    start = trio.current_time()
    assert ws.last_received == start
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.receive)
        await trio.sleep(5)
        await peer.send(Ping(payload=b"hb-1"))
        assert await peer.next_events() == [Pong(payload=b"hb-1")]
        assert ws.last_received == start + 5
        await trio.sleep(3)
        await peer.send(Ping(payload=b"hb-2"))
        assert await peer.next_events() == [Pong(payload=b"hb-2")]
        assert ws.last_received == start + 8
        # The pings were not handed to the caller: its receive() is still waiting.
        await peer.send(BytesMessage(data=b"data"))
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("kind", [ConnectionType.SERVER, ConnectionType.CLIENT])
async def test_pings_read_together_get_one_pong_for_the_last(
    autojump_clock: trio.abc.Clock, kind: ConnectionType
) -> None:
    """A flood of pings costs a parse apiece, not a write apiece: those read one after
    another are answered once, with the last one's payload (RFC 6455 §5.5.3); a ping after
    data is answered on its own, and the data is not held back."""
    peer, ws = raw_pair(kind)
    count = MAX_BATCH_FRAMES // 2
    pings = [Ping(payload=b"p%d" % i) for i in range(count)]
    start = trio.current_time()
    await peer.send(*pings, BytesMessage(data=b"data"), Ping(payload=b"after"))
    event = await ws.receive()
    assert payload(event) == b"data"
    assert await peer.next_events() == [Pong(payload=b"p%d" % (count - 1))]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.receive)  # reads (and answers) the ping that came after
        assert await peer.next_events() == [Pong(payload=b"after")]
        assert trio.current_time() == start  # answered at once, not at some timer
        await trio.testing.wait_all_tasks_blocked()
        assert await nothing_arrives(peer.stream, 1)
        nursery.cancel_scope.cancel()


async def test_ping_between_two_websockets(autojump_clock: trio.abc.Clock) -> None:
    client, server = ws_pair()
    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.receive)
        nursery.start_soon(server.receive)
        await trio.sleep(7)
        await client.ping(b"keepalive")
        await trio.testing.wait_all_tasks_blocked()
        # The server saw the ping at 7 s and the client saw the pong at 7 s.
        assert server.last_received == start + 7
        assert client.last_received == start + 7
        nursery.cancel_scope.cancel()
    assert client.is_open and server.is_open


# --- closing ------------------------------------------------------------------------------


@pytest.mark.parametrize("client_closes", [True, False], ids=["client-closes", "server-closes"])
async def test_close_handshake(autojump_clock: trio.abc.Clock, client_closes: bool) -> None:
    closer, other = sides(client_closes)
    await closer.send_close(4000, "done for today")
    assert not closer.is_open

    with pytest.raises(ConnectionClosed) as info:
        await other.receive()
    assert (info.value.code, info.value.reason) == (4000, "done for today")
    # What it keeps says the same; a new exception is raised each time (tests/test_no_cycles.py).
    assert other.closed is not None
    assert (other.closed.code, other.closed.reason) == (4000, "done for today")
    assert not other.is_open

    # The other side answered the close; the closer sees its own code echoed.
    with pytest.raises(ConnectionClosed) as echoed:
        await closer.receive()
    assert echoed.value.code == 4000
    assert closer.closed is not None

    # After the handshake, send_close is a no-op on both sides: no error, no bytes.
    await closer.send_close()
    await other.send_close(1001, "again")
    assert await nothing_arrives(closer.stream)
    assert await nothing_arrives(other.stream)
    # Data can no longer be sent, and receive keeps reporting the close.
    with pytest.raises(ConnectionClosed):
        await closer.send_bytes(b"late")
    with pytest.raises(ConnectionClosed) as again:
        await other.receive()
    assert again.value.code == 4000


async def test_close_reaches_a_raw_peer_with_code_and_reason(
    autojump_clock: trio.abc.Clock,
) -> None:
    peer, ws = raw_pair()
    reason = close_reason_for(ErrorCode.PEER_NEVER_CONNECTED)
    await ws.send_close(ErrorCode.PEER_NEVER_CONNECTED.close_code, reason)
    (event,) = await peer.next_events()
    assert event == CloseConnection(code=4504, reason=reason)


async def test_close_codes_that_must_not_be_sent_are_replaced(
    autojump_clock: trio.abc.Clock,
) -> None:
    peer, ws = raw_pair()
    await ws.send_close(ABNORMAL_CLOSURE, "lost")
    (event,) = await peer.next_events()
    assert isinstance(event, CloseConnection)
    assert event.code == 1001


async def test_aclose_waits_for_the_peer_close(autojump_clock: trio.abc.Clock) -> None:
    client, server = ws_pair()
    async with trio.open_nursery() as nursery:

        async def server_side() -> None:
            with pytest.raises(ConnectionClosed) as info:
                await server.receive()
            assert info.value.code == 1000

        nursery.start_soon(server_side)
        start = trio.current_time()
        await client.aclose()
        assert trio.current_time() == start  # answered at once, no timeout
    assert client.closed is not None and client.closed.code == 1000


async def test_transport_end_without_close_is_1006(autojump_clock: trio.abc.Clock) -> None:
    client, server = ws_pair()
    await client.send_bytes(b"last words")
    await client.abort()
    assert payload(await server.receive()) == b"last words"
    with pytest.raises(ConnectionClosed) as info:
        await server.receive()
    assert info.value.code == ABNORMAL_CLOSURE == 1006
    assert server.closed is not None and server.closed.code == 1006
    with pytest.raises(ConnectionClosed) as again:
        await server.receive()
    assert again.value.code == 1006
    with pytest.raises(ConnectionClosed) as on_send:
        await server.send_bytes(b"anyone?")
    assert on_send.value.code == 1006


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\x80\x00\x00\x00\x00",  # reserved bits and a reserved opcode
        b"\x82\x02hi",  # a client frame without a mask
        b"\x09\xfe\x01\x00" + b"\x00" * 4 + b"x" * 256,  # a 256-byte, unfinished ping
    ],
    ids=["reserved-opcode", "unmasked", "bad-control-frame"],
)
async def test_invalid_frame_closes_with_1002(
    autojump_clock: trio.abc.Clock, garbage: bytes
) -> None:
    peer, ws = raw_pair(ConnectionType.SERVER)
    await peer.stream.send_all(garbage)
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert info.value.code == 1002
    assert not ws.is_open
    events = await peer.next_events()
    assert isinstance(events[0], CloseConnection)
    assert events[0].code == 1002


# --- cancel safety ------------------------------------------------------------------------


async def test_cancelled_receive_loses_nothing(autojump_clock: trio.abc.Clock) -> None:
    client, server = ws_pair()
    with trio.move_on_after(5) as scope:
        await server.receive()
    assert scope.cancelled_caught
    await client.send_bytes(b"after the cancel")
    assert payload(await server.receive()) == b"after the cancel"


@pytest.mark.parametrize("ping_first", [False, True], ids=["two-messages", "ping-then-two"])
async def test_cancel_after_a_chunk_of_two_messages(
    autojump_clock: trio.abc.Clock, ping_first: bool
) -> None:
    peer, ws = raw_pair()
    got: list[bytes | str] = []
    async with trio.open_nursery() as nursery:

        async def reader(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                while True:
                    got.append(payload(await ws.receive()))

        scope = await nursery.start(reader)
        await trio.testing.wait_all_tasks_blocked()
        events: list[Event] = [BytesMessage(data=b"one"), BytesMessage(data=b"two")]
        if ping_first:
            events.insert(0, Ping(payload=b"p"))
        # Both messages reach the transport in one chunk, and the reader is cancelled before
        # it gets to run.
        await peer.send(*events)
        scope.cancel()
    with trio.fail_after(5):
        while len(got) < 2:
            got.append(payload(await ws.receive()))
    assert got == [b"one", b"two"]
    if ping_first:
        # The ping was answered even though the receive that read it was cancelled.
        with trio.fail_after(5):
            assert await peer.next_events() == [Pong(payload=b"p")]


async def test_close_is_answered_after_a_cancelled_receive(autojump_clock: trio.abc.Clock) -> None:
    peer, ws = raw_pair()
    async with trio.open_nursery() as nursery:

        async def reader(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
            with trio.CancelScope() as scope:
                task_status.started(scope)
                await ws.receive()

        scope = await nursery.start(reader)
        await trio.testing.wait_all_tasks_blocked()
        await peer.send(CloseConnection(code=4000, reason="bye"))
        scope.cancel()
    with pytest.raises(ConnectionClosed) as info:
        await ws.receive()
    assert (info.value.code, info.value.reason) == (4000, "bye")
    with trio.fail_after(5):
        (answer,) = await peer.next_events()
    assert answer == CloseConnection(code=4000, reason="bye")


# --- HubStream over a WebSocket pair ------------------------------------------------------


def stream_pair(max_message_size: int = 64 * 1024) -> tuple[HubStream, WebSocket]:
    """A service-side ``HubStream`` and the WebSocket at the other end."""
    client, server = ws_pair()
    stream = HubStream(
        client, stream_id="s-1", role=Role.SERVICE, max_message_size=max_message_size
    )
    return stream, server


async def test_hub_stream_splits_large_sends_into_capped_messages(
    autojump_clock: trio.abc.Clock,
) -> None:
    stream, peer = stream_pair(max_message_size=1000)
    data = bytes(range(251)) * 40  # 10040 bytes: ten full messages and a short one
    await stream.send_all(data)
    await stream.send_all(memoryview(b"tail"))
    sizes = []
    received = bytearray()
    while len(received) < len(data) + 4:
        message, _ = await receive_message(peer)
        assert isinstance(message, bytes)
        sizes.append(len(message))
        received += message
    assert bytes(received) == data + b"tail"
    assert max(sizes) == 1000
    assert sizes == [1000] * 10 + [40, 4]


async def test_hub_stream_receive_some_honours_max_bytes(autojump_clock: trio.abc.Clock) -> None:
    stream, peer = stream_pair()
    messages = [bytes([n]) * 10 for n in range(1, 6)]
    for message in messages:
        await peer.send_bytes(message)
    await peer.send_text("txt")
    received = bytearray()
    while len(received) < 53:
        chunk = await stream.receive_some(4)
        assert 1 <= len(chunk) <= 4
        received += chunk
    assert bytes(received) == b"".join(messages) + b"txt"
    with pytest.raises(ValueError):
        await stream.receive_some(0)


async def test_hub_stream_normal_close_is_eof(autojump_clock: trio.abc.Clock) -> None:
    stream, peer = stream_pair()
    await peer.send_bytes(b"bye")
    await peer.send_close(1000)
    assert await stream.receive_some() == b"bye"
    assert await stream.receive_some() == b""
    assert await stream.receive_some() == b""
    assert stream.close_code == 1000


async def test_hub_stream_error_close_is_broken_with_the_hub_error(
    autojump_clock: trio.abc.Clock,
) -> None:
    stream, peer = stream_pair()
    reason = "504901 the other side of the stream never connected"
    await peer.send_close(4504, reason)
    with pytest.raises(trio.BrokenResourceError) as info:
        await stream.receive_some()
    cause = info.value.__cause__
    assert isinstance(cause, HubError)
    assert cause.code is ErrorCode.PEER_NEVER_CONNECTED
    assert cause.message == "the other side of the stream never connected"
    assert stream.close_code == 4504
    assert stream.close_reason == reason


async def test_hub_stream_lost_connection_is_broken(autojump_clock: trio.abc.Clock) -> None:
    stream, peer = stream_pair()
    await peer.abort()
    with pytest.raises(trio.BrokenResourceError) as info:
        await stream.receive_some()
    assert isinstance(info.value.__cause__, ConnectionClosed)
    assert stream.close_code == 1006
    with pytest.raises(trio.BrokenResourceError):
        await stream.send_all(b"x")


async def test_hub_stream_concurrent_receives_are_busy(autojump_clock: trio.abc.Clock) -> None:
    stream, peer = stream_pair()
    async with trio.open_nursery() as nursery:
        result: list[bytes] = []

        async def first() -> None:
            result.append(await stream.receive_some())

        nursery.start_soon(first)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.BusyResourceError):
            await stream.receive_some()
        await peer.send_bytes(b"for the first")
    assert result == [b"for the first"]


async def test_hub_stream_send_after_send_eof_is_closed(autojump_clock: trio.abc.Clock) -> None:
    stream, peer = stream_pair()
    await peer.send_bytes(b"in flight")
    await stream.send_all(b"before eof")
    await stream.send_eof()
    await stream.send_eof()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"after eof")
    # The peer sees the data, then a normal close; bytes it had sent are still delivered.
    assert await receive_message(peer) == (b"before eof", [True])
    with pytest.raises(ConnectionClosed) as info:
        await peer.receive()
    assert info.value.code == 1000
    assert await stream.receive_some() == b"in flight"
    assert await stream.receive_some() == b""


async def test_hub_stream_as_async_iterator(autojump_clock: trio.abc.Clock) -> None:
    stream, peer = stream_pair()
    for part in (b"a", b"bc", b"def"):
        await peer.send_bytes(part)
    await peer.send_close(1000)
    assert b"".join([chunk async for chunk in stream]) == b"abcdef"
    await stream.aclose()
    with pytest.raises(trio.ClosedResourceError):
        await stream.send_all(b"x")


async def test_relaying_a_batch_keeps_message_boundaries_and_joins_fragments(
    autojump_clock: trio.abc.Clock,
) -> None:
    """take_queued + send_messages (the raw relay's batching): every message arrives intact,
    fragments of one message go out as one frame, and nothing waits for another read."""
    peer, hub_side = raw_pair()
    sent = [
        BytesMessage(data=b"one", message_finished=True),
        BytesMessage(data=b"tw", message_finished=False),
        BytesMessage(data=b"o", message_finished=True),
        TextMessage(data="thr", message_finished=False),
        TextMessage(data="ee", message_finished=True),
        Ping(payload=b"p"),
        BytesMessage(data=b"after the ping", message_finished=True),
    ]
    await peer.send(*sent)
    out_peer, out = raw_pair(ConnectionType.CLIENT)
    with trio.fail_after(5):
        batch = [await hub_side.receive(), *hub_side.take_queued()]
        # The ping stops the batch: it is answered by the next receive().
        assert [payload(e) for e in batch] == [b"one", b"tw", b"o", "thr", "ee"]
        await out.send_messages(batch)
        frames = [e for e in await out_peer.next_events()]
        assert [(type(e), e.data, e.message_finished) for e in frames] == [
            (BytesMessage, b"one", True),
            (BytesMessage, b"two", True),
            (TextMessage, "three", True),
        ]
        rest = await hub_side.receive()
        assert payload(rest) == b"after the ping"
        assert any(isinstance(e, Pong) for e in await peer.next_events())


# --- frames encoded by the adapter, read by wsproto ----------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_001])
@pytest.mark.parametrize("kind", [ConnectionType.CLIENT, ConnectionType.SERVER])
async def test_data_frames_at_every_length_encoding(
    autojump_clock: trio.abc.Clock, size: int, kind: ConnectionType
) -> None:
    """The adapter writes data frames itself (7-bit, 16-bit and 64-bit lengths; masked from a
    client, unmasked from a server); wsproto on the other side reads them back exactly."""
    peer, ws = raw_pair(kind)
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(ws.send_bytes, data)
        got = b""
        with trio.fail_after(5):
            while True:
                events = await peer.next_events()
                assert all(isinstance(e, BytesMessage) for e in events)
                got += b"".join(bytes(e.data) for e in events)
                if any(isinstance(e, BytesMessage) and e.message_finished for e in events):
                    break
    assert got == data


async def test_fragments_sent_by_the_adapter_are_continuations(
    autojump_clock: trio.abc.Clock,
) -> None:
    peer, ws = raw_pair(ConnectionType.CLIENT)
    await ws.send_bytes(b"ab", message_finished=False)
    await ws.send_bytes(b"cd", message_finished=True)
    await ws.send_text("text")
    events: list[Event] = []
    with trio.fail_after(5):
        while len(events) < 3:
            events += await peer.next_events()
    assert [(type(e), e.data, e.message_finished) for e in events] == [
        (BytesMessage, b"ab", False),
        (BytesMessage, b"cd", True),
        (TextMessage, "text", True),
    ]


async def test_mixing_text_into_a_binary_message_is_refused(
    autojump_clock: trio.abc.Clock,
) -> None:
    _peer, ws = raw_pair(ConnectionType.CLIENT)
    await ws.send_bytes(b"ab", message_finished=False)
    with pytest.raises(LocalProtocolError):
        await ws.send_text("no")


async def test_no_data_after_a_close_was_sent(autojump_clock: trio.abc.Clock) -> None:
    _peer, ws = raw_pair(ConnectionType.CLIENT)
    await ws.send_close(1000, "")
    with pytest.raises(ConnectionClosed):
        await ws.send_bytes(b"late")
    with pytest.raises(ConnectionClosed):
        await ws.send_whole_messages([[b"late"]])


async def test_receive_messages_takes_whole_messages_and_keeps_the_rest(
    autojump_clock: trio.abc.Clock,
) -> None:
    """receive_messages (the devstream.v1 relay's batching): every whole message already
    received, as its fragments; a message still in part waits for the next call, and one past
    the limit is refused by that next call (after the whole ones before it were handed over)."""
    peer, hub_side = raw_pair()
    await peer.send(
        BytesMessage(data=b"one", message_finished=True),
        BytesMessage(data=b"tw", message_finished=False),
        BytesMessage(data=b"o", message_finished=True),
        BytesMessage(data=b"thr", message_finished=False),
    )
    with trio.fail_after(5):
        messages = await hub_side.receive_messages(10)
        assert messages == [[b"one"], [b"tw", b"o"]]
        await peer.send(BytesMessage(data=b"ee", message_finished=True))
        assert await hub_side.receive_messages(10) == [[b"thr", b"ee"]]
        await peer.send(
            BytesMessage(data=b"fits", message_finished=True),
            BytesMessage(data=b"far too long", message_finished=True),
        )
        assert await hub_side.receive_messages(10) == [[b"fits"]]
        with pytest.raises(ConnectionClosed) as info:
            await hub_side.receive_messages(10)
        assert info.value.code == 1009


async def test_receive_messages_stops_at_a_control_frame_and_acts_on_it_next(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A ping or close between messages: the whole messages before it are handed over first;
    the next call answers the ping and goes on, or answers the close and raises. Text comes
    as UTF-8 bytes."""
    peer, hub_side = raw_pair()
    await peer.send(
        BytesMessage(data=b"one", message_finished=True),
        TextMessage(data="tw\u00f6", message_finished=True),
        Ping(payload=b"p1"),
        BytesMessage(data=b"three", message_finished=True),
    )
    with trio.fail_after(5):
        assert await hub_side.receive_messages(100) == [[b"one"], ["tw\u00f6".encode()]]
        assert await hub_side.receive_messages(100) == [[b"three"]]
        assert await peer.next_events() == [Pong(payload=b"p1")]
        await peer.send(
            BytesMessage(data=b"four", message_finished=True),
            CloseConnection(code=4001, reason="bye"),
        )
        assert await hub_side.receive_messages(100) == [[b"four"]]
        with pytest.raises(ConnectionClosed) as info:
            await hub_side.receive_messages(100)
        assert (info.value.code, info.value.reason) == (4001, "bye")
        assert await peer.next_events() == [CloseConnection(code=4001, reason="bye")]


async def test_receive_messages_says_when_a_message_stops_half_way(
    autojump_clock: trio.abc.Clock,
) -> None:
    """With ``stall_timeout``, receive_messages returns no message when part of one arrived
    and then no byte for that long (part of a frame, or the first fragments of a message); the
    part is kept, and the message comes whole once the rest arrives. With nothing in part, it
    waits as before."""
    peer, client = raw_pair(ConnectionType.CLIENT)
    frame = peer.wire(BytesMessage(data=b"0123456789", message_finished=True))
    with trio.fail_after(60):
        with trio.move_on_after(10) as idle:
            await client.receive_messages(100, stall_timeout=1)
        assert idle.cancelled_caught  # nothing in part: no stall to report
        await peer.stream.send_all(frame[:6])
        started = trio.current_time()
        assert await client.receive_messages(100, stall_timeout=1) == []
        assert trio.current_time() - started == pytest.approx(1)
        # Reported: the caller reads on without a stall timeout until more bytes come (as
        # the stream driver has it), and the message comes whole.
        await peer.stream.send_all(frame[6:])
        assert await client.receive_messages(100) == [[b"0123", b"456789"]]
        await peer.send(BytesMessage(data=b"ab", message_finished=False))
        started = trio.current_time()
        assert await client.receive_messages(100, stall_timeout=2) == []
        assert trio.current_time() - started == pytest.approx(2)
        await peer.send(BytesMessage(data=b"cd", message_finished=True))
        assert await client.receive_messages(100) == [[b"ab", b"cd"]]


async def test_a_stall_is_counted_from_the_last_bytes_not_from_the_call(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A read with ``stall_timeout`` cancelled by the caller's own timer, and made again, still
    reports the stall ``stall_timeout`` after the last bytes: the caller's timers (an idle
    acknowledgement, say) do not put off the probe of a connection that went silent."""
    peer, client = raw_pair(ConnectionType.CLIENT)
    frame = peer.wire(BytesMessage(data=b"0123456789", message_finished=True))
    with trio.fail_after(60):
        await peer.stream.send_all(frame[:6])
        arrived = trio.current_time()
        with trio.move_on_after(0.4) as timer:
            await client.receive_messages(100, stall_timeout=1)
        assert timer.cancelled_caught
        assert await client.receive_messages(100, stall_timeout=1) == []
        assert trio.current_time() - arrived == pytest.approx(1)
        # Reported once: the caller reads on without a stall timeout (as the stream driver
        # has it until more bytes come), and the message comes whole.
        await peer.stream.send_all(frame[6:])
        assert await client.receive_messages(100) == [[b"0123", b"456789"]]


@pytest.mark.parametrize("kind", [ConnectionType.CLIENT, ConnectionType.SERVER])
async def test_send_whole_messages_one_frame_each(
    autojump_clock: trio.abc.Clock, kind: ConnectionType
) -> None:
    peer, ws = raw_pair(kind)
    big = bytes(range(256)) * 400
    await ws.send_whole_messages([[b"a", b"b"], [big[:70000], big[70000:]], [b""]])
    events: list[Event] = []
    with trio.fail_after(5):
        while sum(1 for e in events if isinstance(e, BytesMessage) and e.message_finished) < 3:
            events += await peer.next_events()
    joined: list[bytes] = []
    current = b""
    for event in events:
        assert isinstance(event, BytesMessage)
        current += bytes(event.data)
        if event.message_finished:
            joined.append(current)
            current = b""
    assert joined == [b"ab", big, b""]


@pytest.mark.parametrize("kind", [ConnectionType.CLIENT, ConnectionType.SERVER])
async def test_send_whole_messages_then_close_in_one_write(
    autojump_clock: trio.abc.Clock, kind: ConnectionType
) -> None:
    """With ``then_close``, the close follows the messages in the same write: the peer reads
    the messages and the close at once, in that order; a code only ever reported (1006) goes
    out as 1001, as send_close sends it. The sender then counts as closing."""
    peer, ws = raw_pair(kind)
    writes: list[bytes] = []
    send_all = ws.stream.send_all

    async def counted(data: bytes | bytearray | memoryview) -> None:
        writes.append(bytes(data))
        await send_all(data)

    ws.stream.send_all = counted  # type: ignore[method-assign]
    start = trio.current_time()
    sent = await ws.send_whole_messages(
        [[b"last", b"-ack"]], then_close=CloseConnection(code=1000, reason="done")
    )
    assert sent == 8
    assert len(writes) == 1
    assert ws.close_sent and not ws.is_open
    with trio.fail_after(5):
        first_read = await peer.next_events()
    assert trio.current_time() == start  # nothing waited: both were in the one write
    assert first_read == [
        BytesMessage(data=b"last-ack", message_finished=True),
        CloseConnection(code=1000, reason="done"),
    ]
    peer2, ws2 = raw_pair(kind)
    await ws2.send_whole_messages([[b"x"]], then_close=CloseConnection(code=1006, reason="lost"))
    with trio.fail_after(5):
        assert (await peer2.next_events())[-1] == CloseConnection(code=1001, reason="lost")


async def test_queued_close_names_the_close_already_read(autojump_clock: trio.abc.Clock) -> None:
    """A close read in the same batch as messages is queued behind them: ``queued_close``
    names it once the messages are taken (not before, and not while nothing is queued), and
    the next receive still answers it and raises."""
    peer, hub_side = raw_pair()
    assert hub_side.queued_close is None
    start = trio.current_time()
    await peer.send(
        BytesMessage(data=b"ack", message_finished=True),
        CloseConnection(code=1000, reason=""),
    )
    with trio.fail_after(5):
        assert await hub_side.receive_messages(100) == [[b"ack"]]
        assert hub_side.queued_close == CloseConnection(code=1000, reason="")
        with pytest.raises(ConnectionClosed) as info:
            await hub_side.receive_messages(100)
    assert info.value.code == 1000
    assert hub_side.queued_close is None
    assert await peer.next_events() == [CloseConnection(code=1000, reason="")]
    assert trio.current_time() == start  # all of it from what was read at once


# --- over a real socket: the vectored writes -------------------------------------------------


async def socket_ws_pair(buffer_size: int = 8192) -> tuple[WebSocket, WebSocket]:
    """A (client, server) pair over a connected socket pair with small kernel buffers, so a
    large write is taken in parts."""
    import socket as stdlib_socket

    a, b = trio.socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_RCVBUF, buffer_size)
    return (
        WebSocket(trio.SocketStream(a), Connection(client=True)),
        WebSocket(trio.SocketStream(b), Connection(client=False)),
    )


async def test_a_queued_close_is_answered_from_the_calling_task_on_a_socket(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Over a plain socket, the peer's close read with its last message is answered at once
    by ``answer_queued_close_nowait``, which returns it as the next receive would raise it;
    then the WebSocket is closed. Nothing queued, or a stream other than a plain socket:
    None, and the next receive answers the close as before."""
    client, server = await socket_ws_pair()
    assert client.answer_queued_close_nowait() is None  # nothing read yet
    await server.send_whole_messages([[b"last"]], then_close=CloseConnection(code=1000))
    with trio.fail_after(5):
        assert await client.receive_messages(100) == [[b"last"]]
    start = trio.current_time()
    closed = client.answer_queued_close_nowait()
    assert closed is not None and (closed.code, closed.reason) == (1000, "")
    assert client.closed is closed and not client.has_backlog
    assert client.queued_close is None
    with trio.fail_after(5), pytest.raises(ConnectionClosed) as info:
        await server.receive_messages(100)  # the answer arrived
    assert info.value.code == 1000
    assert trio.current_time() == start
    with pytest.raises(ConnectionClosed):
        await client.receive_messages(100)

    peer, memory_side = raw_pair()
    await peer.send(BytesMessage(data=b"x", message_finished=True), CloseConnection(code=1000))
    with trio.fail_after(5):
        assert await memory_side.receive_messages(100) == [[b"x"]]
        assert memory_side.answer_queued_close_nowait() is None  # not a plain socket
        assert memory_side.queued_close == CloseConnection(code=1000, reason="")
        with pytest.raises(ConnectionClosed):
            await memory_side.receive_messages(100)
    assert await peer.next_events() == [CloseConnection(code=1000, reason="")]


@pytest.mark.parametrize("client_sends", [True, False])
async def test_vectored_writes_keep_every_byte_in_order(client_sends: bool) -> None:
    client, server = await socket_ws_pair()
    sender, receiver = (client, server) if client_sends else (server, client)
    # Payloads around the 16 KiB line (alone or joined), tiny ones between, and more buffers
    # than one writev takes; every message is distinct.
    messages = [
        [bytes([i % 251]) * (20_000 + i), b"tail-%d" % i] if i % 3 else [b"small-%d" % i]
        for i in range(900)
    ]
    expected = [b"".join(parts) for parts in messages]
    got: list[bytes] = []

    async def read_all() -> None:
        while len(got) < len(expected):
            got.append(await receiver.receive_message(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await sender.send_whole_messages(messages)
            await sender.send_bytes(b"last", message_finished=True)
    assert got == expected
    assert await receiver.receive_message(10) == b"last"


async def test_vectored_write_after_the_socket_closed_is_connection_closed() -> None:
    client, server = await socket_ws_pair()
    client.stream.socket.close()  # type: ignore[attr-defined]
    with pytest.raises(ConnectionClosed) as info:
        await client.send_bytes(b"x" * 100_000)
    assert info.value.code == ABNORMAL_CLOSURE
    assert client.closed is not None
    await server.abort()


async def test_vectored_write_to_a_vanished_peer_is_connection_closed() -> None:
    client, server = await socket_ws_pair()
    await server.abort()
    with trio.fail_after(30), pytest.raises(ConnectionClosed) as info:
        while True:  # the first writes may still be taken by the kernel
            await client.send_whole_messages([[b"y" * 50_000]])
    assert info.value.code == ABNORMAL_CLOSURE


# --- over a real socket: where sends and receives let other tasks run ------------------------


async def test_a_receive_that_reads_is_a_checkpoint_whether_or_not_it_waits() -> None:
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    await client.send_whole_messages([[b"a" * 100], [b"b" * 100]])
    # The bytes are already there: the read does not wait, and still lets others run.
    with trio.testing.assert_checkpoints():
        assert payload(await server.receive()) == b"a" * 100
    # Answered from what that read parsed: no read, no checkpoint.
    with trio.testing.assert_no_checkpoints():
        assert payload(await server.receive()) == b"b" * 100
    # The last read drained the socket: the next one waits for data first.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_bytes, b"c")
        with trio.testing.assert_checkpoints():
            assert payload(await server.receive()) == b"c"
    await client.abort()
    await server.abort()


async def test_a_send_the_kernel_takes_at_once_is_a_cancellation_point_not_a_schedule_point() -> (
    None
):
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    ran: list[str] = []

    async def other() -> None:
        ran.append("other task")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(other)  # runs at the next schedule point
        await client.send_bytes(b"quick")
        assert ran == []
    assert ran == ["other task"]
    assert payload(await server.receive()) == b"quick"
    # Cancelled before it starts: nothing is written.
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.send_bytes(b"never")
    assert scope.cancelled_caught
    await client.send_bytes(b"after")
    assert payload(await server.receive()) == b"after"
    await client.abort()
    await server.abort()


async def test_a_hub_streams_send_all_stays_a_checkpoint() -> None:
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    stream = HubStream(client, stream_id="s", role=Role.SERVICE)
    with trio.testing.assert_checkpoints():
        await stream.send_all(b"hello")
    assert payload(await server.receive()) == b"hello"
    await client.abort()
    await server.abort()


async def test_a_receive_after_the_socket_closed_is_connection_closed() -> None:
    client, server = await socket_ws_pair()
    server.stream.socket.close()  # type: ignore[attr-defined]
    with pytest.raises(ConnectionClosed) as info:
        await server.receive()
    assert info.value.code == ABNORMAL_CLOSURE
    assert server.closed is not None
    await client.abort()


async def test_aclose_of_a_closed_websocket_drops_it_at_once() -> None:
    client, server = await socket_ws_pair()
    await client.send_close(1000, "done")
    with pytest.raises(ConnectionClosed):
        await server.receive()  # answers the close
    # Nothing left to send or wait for: no checkpoint, the socket is closed.
    with trio.testing.assert_no_checkpoints():
        await server.aclose()
    assert server.stream.socket.fileno() == -1  # type: ignore[attr-defined]
    await client.abort()


async def test_aclose_is_bounded_even_when_its_close_cannot_be_written(
    autojump_clock: trio.abc.Clock,
) -> None:
    # A peer that never reads: with a lockstep stream the close frame never goes out.
    a, b = trio.testing.lockstep_stream_pair()
    ws = WebSocket(a, Connection(client=False))
    start = trio.current_time()
    await ws.aclose(timeout=3.0)
    assert trio.current_time() - start == pytest.approx(3.0)
    with pytest.raises(trio.ClosedResourceError):
        await a.send_all(b"x")
    await b.aclose()


@pytest.mark.parametrize("client_sends", [True, False])
async def test_connections_reading_at_once_never_mix_their_bytes(client_sends: bool) -> None:
    # Plain-socket reads share one buffer per trio run; each read is parsed before another
    # connection's read can reuse it.
    pairs = [await socket_ws_pair(buffer_size=1 << 16) for _ in range(3)]
    got: dict[int, list[bytes]] = {n: [] for n in range(3)}

    def message(n: int, i: int) -> bytes:
        return bytes([n * 50 + i % 50]) * (40_000 + 997 * i)

    async def send(n: int) -> None:
        client, server = pairs[n]
        sender = client if client_sends else server
        for i in range(30):
            await sender.send_bytes(message(n, i))

    async def receive(n: int) -> None:
        client, server = pairs[n]
        receiver = server if client_sends else client
        for _ in range(30):
            got[n].append(await receiver.receive_message(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(send, n)
                nursery.start_soon(receive, n)
    for n in range(3):
        assert got[n] == [message(n, i) for i in range(30)]
    for client, server in pairs:
        await client.abort()
        await server.abort()


# --- sends that never wait: send_bytes_nowait --------------------------------------------------


async def test_send_bytes_nowait_writes_at_once_without_a_checkpoint() -> None:
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    assert client.can_send_nowait
    with trio.testing.assert_no_checkpoints():
        assert client.send_bytes_nowait(b"now")
    assert not client.has_backlog
    assert payload(await server.receive()) == b"now"
    await client.abort()
    await server.abort()


async def test_send_bytes_nowait_then_close_writes_both_at_once() -> None:
    """A stream's last frames and its close: one write, no checkpoint; the peer gets the
    message, then the close (1006, only ever reported, goes out as 1001), and answers it."""
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    with trio.testing.assert_no_checkpoints():
        assert client.send_bytes_nowait(b"ack", then_close=CloseConnection(code=1006, reason="bye"))
    assert client.close_sent and not client.has_backlog
    assert payload(await server.receive()) == b"ack"
    with pytest.raises(ConnectionClosed) as info:
        await server.receive()
    assert (info.value.code, info.value.reason) == (1001, "bye")
    with pytest.raises(ConnectionClosed):  # the server's answer completes the handshake
        await client.receive()
    await client.abort()
    await server.abort()


async def test_what_send_bytes_nowait_cannot_write_goes_out_first_with_the_next_send() -> None:
    client, server = await socket_ws_pair()  # small buffers: a big message waits
    big = bytes(range(256)) * 2000
    assert client.send_bytes_nowait(big)
    assert client.has_backlog and not client.can_send_nowait
    assert not client.send_bytes_nowait(b"refused while a message waits")
    got: list[bytes] = []

    async def read() -> None:
        for _ in range(3):
            got.append(await server.receive_message(1 << 20))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await client.send_bytes(b"after")
            assert not client.has_backlog
            assert client.send_bytes_nowait(b"last")
            await client.flush()
    assert got == [big, b"after", b"last"]
    await client.abort()
    await server.abort()


async def test_flush_writes_the_backlog_alone() -> None:
    client, server = await socket_ws_pair()
    assert not client.sending
    big = b"z" * 300_000
    assert client.send_bytes_nowait(big)
    assert client.has_backlog and client.sending  # part of the message is not out yet
    got: list[bytes] = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.flush)
            got.append(await server.receive_message(1 << 20))
    assert got == [big] and not client.has_backlog and not client.sending
    await client.abort()
    await server.abort()


async def test_send_bytes_nowait_declines_while_another_send_waits() -> None:
    client, server = await socket_ws_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_bytes, b"y" * 400_000)  # fills the socket, then waits
        await trio.testing.wait_all_tasks_blocked()
        assert not client.can_send_nowait and client.sending  # another task writes
        assert not client.send_bytes_nowait(b"declined")
        assert await server.receive_message(1 << 20) == b"y" * 400_000
    assert not client.sending
    await client.abort()
    await server.abort()


async def test_send_bytes_nowait_declines_on_other_streams() -> None:
    client, server = ws_pair()  # memory streams, not a socket
    assert not client.can_send_nowait
    assert not client.send_bytes_nowait(b"x")
    await client.send_bytes(b"x")
    assert payload(await server.receive()) == b"x"


async def test_send_bytes_nowait_to_a_lost_transport_marks_the_websocket_closed() -> None:
    client, server = await socket_ws_pair()
    client.stream.socket.close()  # type: ignore[attr-defined]
    assert client.can_send_nowait  # it does not know yet
    assert client.send_bytes_nowait(b"lost")
    assert client.closed is not None and client.closed.code == ABNORMAL_CLOSURE
    assert not client.can_send_nowait
    await server.abort()


# --- over a real socket: how much one read takes ---------------------------------------------


def count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of ``_io.<name>`` the WebSocket adapter makes."""
    from devstream_trio.transport import io as _io

    calls: list[int] = []
    real = getattr(_io, name)

    def counted(*args: object, **kwargs: object) -> object:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(_io, name, counted)
    return calls


async def test_a_client_reads_messages_a_little_longer_than_its_read_in_one_read_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # 64 KiB reads, messages 30 bytes longer (a devstream.v1 Data frame of 64 KiB): the tail
    # left for a second read must not shrink the read again, or every message takes two.
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    reads = count_calls(monkeypatch, "receive_plain")
    count = 20
    for i in range(count):
        message = bytes([i]) * (65536 + 16)
        await server.send_bytes(message)
        assert await client.receive_message(1 << 20) == message
    # The first message takes two reads (64 KiB, then the tail), the rest one each.
    assert len(reads) <= count + 2
    await client.abort()
    await server.abort()


async def test_a_client_read_shrinks_again_after_small_reads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    sizes: list[int] = []
    from devstream_trio.transport import io as _io

    real = _io.receive_plain

    async def recorded(stream: trio.SocketStream, size: int, *, wait_first: bool) -> bytes:
        sizes.append(size)
        return await real(stream, size, wait_first=wait_first)

    monkeypatch.setattr(_io, "receive_plain", recorded)
    # A message that fills two reads (64 KiB, then 128 KiB): the next asks for 256 KiB.
    await server.send_whole_messages([[b"x" * (200_000 - 4)]])
    assert await client.receive_message(1 << 20) == b"x" * (200_000 - 4)
    assert sizes[:2] == [65536, 131072]
    # Small messages from now on: one short read keeps the size, two in a row halve it.
    for i in range(5):
        await server.send_bytes(b"small-%d" % i)
        assert await client.receive_message(100) == b"small-%d" % i
    # 256 KiB brought the last 3 KB, a first small read; then the five small messages.
    assert sizes == [65536, 131072, 262144, 262144, 131072, 131072, 65536, 65536]
    await client.abort()
    await server.abort()


async def test_a_server_reads_all_that_arrived_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # A server reads into one buffer shared by every connection: it takes everything that is
    # there in one read, never starting small.
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    reads = count_calls(monkeypatch, "read_when_ready")
    messages = [[bytes([i]) * 200_000] for i in range(3)]
    await client.send_whole_messages(messages)
    got = await server.receive_messages(1 << 20)
    assert [bytes(b"".join(parts)) for parts in got] == [parts[0] for parts in messages]
    assert len(reads) == 1
    await client.abort()
    await server.abort()


# --- the send lock ------------------------------------------------------------------------


async def test_the_send_lock_serves_writers_in_arrival_order(
    autojump_clock: trio.abc.Clock,
) -> None:
    from devstream_trio.transport.websocket_send import SendLock

    lock = SendLock()
    order: list[str] = []
    holding: list[str] = []

    async def writer(name: str, delay: float) -> None:
        await trio.sleep(delay)
        async with lock:
            holding.append(name)
            assert holding == [name]  # one holder at a time
            order.append(name)
            await trio.sleep(1)
            holding.remove(name)

    async with trio.open_nursery() as nursery:
        for i, name in enumerate("abcd"):
            nursery.start_soon(writer, name, i * 0.1)
    assert order == ["a", "b", "c", "d"]
    assert not lock.locked()


async def test_a_writer_cancelled_while_waiting_never_holds_the_send_lock(
    autojump_clock: trio.abc.Clock,
) -> None:
    from devstream_trio.transport.websocket_send import SendLock

    lock = SendLock()
    order: list[str] = []

    async def writer(name: str, scope: trio.CancelScope | None = None) -> None:
        with scope or trio.CancelScope():
            async with lock:
                order.append(name)
                await trio.sleep(1)

    cancelled = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, "first")
        await trio.sleep(0.1)
        nursery.start_soon(writer, "cancelled", cancelled)
        await trio.sleep(0.1)
        nursery.start_soon(writer, "last")
        await trio.sleep(0.1)
        assert lock.locked()
        cancelled.cancel()
    assert order == ["first", "last"]
    assert not lock.locked()
    async with lock:  # free again
        assert lock.locked()
    assert not lock.locked()


# --- a send cancelled part way through a frame -----------------------------------------------


async def test_a_send_cancelled_mid_frame_ends_the_connection_and_mixes_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    # The kernel takes the first part of a large message and the peer reads nothing, so the
    # send waits; cancelled there, the frame on the wire is cut. Another frame after it would
    # be read as the rest of the cut one: the peer would get bytes of the next message as
    # data. The connection ends instead, and the peer sees it end.
    client, server = await socket_ws_pair()
    first = b"a" * 300_000
    with trio.move_on_after(1) as scope:
        await client.send_bytes(first)
    assert scope.cancelled_caught
    assert client.closed is not None and client.closed.code == ABNORMAL_CLOSURE
    with pytest.raises(ConnectionClosed):
        await client.send_bytes(b"b" * 1000)
    got = bytearray()
    with trio.fail_after(10), pytest.raises(ConnectionClosed) as info:
        while True:
            got += payload(await server.receive())  # type: ignore[operator]
    assert info.value.code == ABNORMAL_CLOSURE
    assert set(got) <= {ord("a")} and len(got) < len(first)
    await server.abort()


async def test_a_send_cancelled_before_any_byte_went_out_leaves_the_connection_usable() -> None:
    client, server = await socket_ws_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await client.send_bytes(b"never sent")
    assert scope.cancelled_caught
    assert client.closed is None
    await client.send_bytes(b"sent")
    assert payload(await server.receive()) == b"sent"
    await client.abort()
    await server.abort()


async def test_a_send_cancelled_while_the_socket_was_full_before_its_first_byte_is_harmless(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = await socket_ws_pair()
    # Fill the socket with whole messages the peer does not read yet; the last one leaves a
    # backlog (its end), which a send writes first.
    filler: list[bytes] = []
    while client.can_send_nowait:
        message = b"%06d" % len(filler) * 100
        client.send_bytes_nowait(message)
        filler.append(message)
    assert client.has_backlog
    # The socket takes nothing: the send waits, and is cancelled before any byte went out.
    with trio.move_on_after(1) as scope:
        await client.send_bytes(b"late")
    assert scope.cancelled_caught
    assert client.closed is None
    # The connection carries on whole: the backlog, then the next message.
    received: list[bytes] = []

    async def read_all() -> None:
        while len(received) < len(filler) + 1:
            received.append(bytes(payload(await server.receive())))  # type: ignore[arg-type]

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            await client.send_bytes(b"after")
    assert received == [*filler, b"after"]
    await client.abort()
    await server.abort()


# --- many small fragments: batches, and a bound per message ---------------------------------


async def test_a_burst_of_tiny_fragments_lets_other_tasks_run_between_batches(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One read brings a message in far more fragments than a batch: they are handed on a
    batch (MAX_BATCH_FRAMES) at a time, and a task that only yields gets its turn between
    batches, while no virtual time passes."""
    peer, ws = raw_pair()
    count = 4 * MAX_BATCH_FRAMES + 10
    await peer.send(
        *[BytesMessage(data=b"x", message_finished=i == count - 1) for i in range(count)]
    )
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await trio.lowlevel.checkpoint()

    seen: list[int] = []
    start = trio.current_time()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(ticker)
            while True:
                event = await ws.receive()
                seen.append(ticks)
                if event.message_finished:
                    break
            nursery.cancel_scope.cancel()
    assert trio.current_time() == start
    assert len(seen) == count
    # Fragments handed on while the ticker did not run: at most two batches in a row (trio
    # runs the two tasks in either order in each round, so the receiver may run last in one
    # round and first in the next).
    runs = [len(list(group)) for _, group in itertools.groupby(seen)]
    assert max(runs) <= 2 * MAX_BATCH_FRAMES
    assert len(runs) >= 3


async def test_relaying_a_burst_sends_one_frame_per_batch(autojump_clock: trio.abc.Clock) -> None:
    """The raw relay's loop (receive, take_queued, send_messages) over a message in tiny
    fragments: each batch goes out as one frame, its fragments joined once; the message
    arrives intact and nothing waits."""
    peer, hub_side = raw_pair()
    count = 2 * MAX_BATCH_FRAMES + 7
    pieces = [bytes([i % 251]) * 6 for i in range(count)]
    await peer.send(
        *[
            BytesMessage(data=piece, message_finished=i == count - 1)
            for i, piece in enumerate(pieces)
        ]
    )
    out_peer, out = raw_pair(ConnectionType.CLIENT)
    start = trio.current_time()
    with trio.fail_after(5):
        relayed = 0
        while relayed < count:
            batch = [await hub_side.receive(), *hub_side.take_queued()]
            relayed += len(batch)
            await out.send_messages(batch)
        frames: list[Event] = []
        while not frames or not frames[-1].message_finished:  # type: ignore[attr-defined]
            frames += await out_peer.next_events()
    assert trio.current_time() == start
    assert [len(event.data) for event in frames] == [  # type: ignore[attr-defined]
        6 * MAX_BATCH_FRAMES,
        6 * MAX_BATCH_FRAMES,
        6 * 7,
    ]
    assert b"".join(event.data for event in frames) == b"".join(pieces)  # type: ignore[attr-defined]


@pytest.mark.parametrize("whole", ["receive_messages", "receive_message"])
async def test_a_message_in_too_many_fragments_is_refused_with_1009(
    autojump_clock: trio.abc.Clock, whole: str
) -> None:
    """A message may come in MAX_MESSAGE_FRAGMENTS fragments, empty ones counted; once that
    many came without its end, the connection is closed with 1009 at once."""
    peer, ws = raw_pair()

    async def receive() -> bytes:
        if whole == "receive_message":
            return await ws.receive_message(1 << 20)
        return b"".join(b"".join(parts) for parts in await ws.receive_messages(1 << 20))

    def fragments(count: int, *, ends: bool) -> list[Event]:
        return [
            BytesMessage(data=b"a" if i == 0 else b"", message_finished=ends and i == count - 1)
            for i in range(count)
        ]

    with trio.fail_after(60):
        await peer.send(*fragments(MAX_MESSAGE_FRAGMENTS, ends=True))
        assert await receive() == b"a"
        # One fragment short of the bound, without the end: the message is still welcome.
        await peer.send(*fragments(MAX_MESSAGE_FRAGMENTS - 1, ends=False))
        with trio.move_on_after(10) as waited:
            await receive()
        assert waited.cancelled_caught
        assert await nothing_arrives(peer.stream)
        # The fragment that reaches the bound without the end.
        await peer.send(BytesMessage(data=b"", message_finished=False))
        with pytest.raises(ConnectionClosed) as closed:
            await receive()
    assert (closed.value.code, closed.value.reason) == (1009, "message in too many fragments")
    assert await peer.next_events() == [
        CloseConnection(code=1009, reason="message in too many fragments")
    ]


@pytest.mark.parametrize("whole", ["receive_messages", "receive_message"])
async def test_one_frame_in_many_small_reads_is_one_fragment(
    autojump_clock: trio.abc.Clock, whole: str
) -> None:
    """Frames are counted, not reads: a 1 MiB message in one frame that arrives in 200-byte
    reads (far more than MAX_MESSAGE_FRAGMENTS of them, as through a proxy or a link with a
    small MSS) is received whole, in no more parts than MAX_MESSAGE_FRAGMENTS: the pieces of
    the reads are joined, not all kept."""
    peer, ws = raw_pair()
    data = bytes(range(256)) * 4096
    wire = peer.wire(BytesMessage(data=data, message_finished=True))
    assert len(wire) // 200 > MAX_MESSAGE_FRAGMENTS
    received: list[bytes] = []

    async def receive() -> None:
        if whole == "receive_message":
            received.append(await ws.receive_message(1 << 20))
        else:
            [parts] = await ws.receive_messages(1 << 20)
            assert len(parts) <= MAX_MESSAGE_FRAGMENTS
            received.append(b"".join(parts))

    with trio.fail_after(60):
        began = trio.current_time()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            for start in range(0, len(wire), 200):
                await peer.stream.send_all(wire[start : start + 200])
                await trio.sleep(0.001)  # the receiver takes each piece in a read of its own
        # Received as the last piece came: no wait beyond the sender's own pauses.
        pieces = -(-len(wire) // 200)
        assert trio.current_time() - began < pieces * 0.001 + 0.01
    assert received == [data]
    assert await nothing_arrives(peer.stream)  # no close


async def test_send_text_by_writes_at_once_when_the_kernel_takes_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A message the socket takes whole: sent, True, no time passes."""
    client, server = await socket_ws_pair()
    start = trio.current_time()
    assert await client.send_text_by('{"type":"streamRequest"}', start + 2)
    assert trio.current_time() == start
    assert await server.receive_message(1 << 20) == b'{"type":"streamRequest"}'
    await client.abort()
    await server.abort()


async def test_send_text_by_cuts_a_message_the_peer_does_not_read_at_its_deadline(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A peer that reads nothing: the part the socket took went out, the rest cannot. At the
    deadline (not before, not later) the send gives up and the connection is closed, since
    the next frame would read as the rest of this one."""
    client, server = await socket_ws_pair()
    start = trio.current_time()
    assert not await client.send_text_by("z" * 400_000, start + 2)
    assert trio.current_time() - start == pytest.approx(2)
    assert client.closed is not None and client.closed.code == ABNORMAL_CLOSURE
    with pytest.raises(ConnectionClosed):
        await client.send_text("next")
    with pytest.raises(ConnectionClosed):  # the peer never gets a whole message
        await server.receive_message(1 << 20)
    await server.abort()


async def test_send_text_by_waiting_its_turn_past_the_deadline_sends_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Behind another send that waits: at the deadline nothing of the message went out and
    the connection stays open; the other send's message arrives whole, alone."""
    client, server = await socket_ws_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.send_bytes, b"y" * 400_000)  # fills the socket, then waits
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        assert not await client.send_text_by("late", start + 1)
        assert trio.current_time() - start == pytest.approx(1)
        assert client.closed is None
        assert await server.receive_message(1 << 20) == b"y" * 400_000
    await client.send_text("after")
    assert await server.receive_message(1 << 20) == b"after"
    await client.abort()
    await server.abort()


# --- a write that waits, and pongs of the WebSocket's own ------------------------------------


class WaitLog:
    """A :class:`~devstream_trio.transport.websocket_send.WriteWaits` that notes its calls."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write_waits(self) -> None:
        self.calls.append("waits")

    def write_done(self) -> None:
        self.calls.append("done")


async def test_a_write_the_socket_takes_at_once_tells_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = await socket_ws_pair(buffer_size=1 << 20)
    log = WaitLog()
    await server.send_whole_messages([[b"x" * 1000]], waits=log)
    assert log.calls == []
    assert await client.receive_message(2000) == b"x" * 1000


async def test_a_write_that_waits_for_the_socket_says_so_once_and_when_it_is_done(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = await socket_ws_pair()
    log = WaitLog()
    message = bytes(range(256)) * 2048  # 512 KiB: far more than the socket buffers hold
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: server.send_whole_messages([[message]], waits=log))
        await trio.testing.wait_all_tasks_blocked()
        assert log.calls == ["waits"]  # the socket is full, the peer reads nothing yet
        assert await client.receive_message(len(message)) == message
    assert log.calls == ["waits", "done"]


async def test_a_write_to_another_stream_says_it_may_wait(autojump_clock: trio.abc.Clock) -> None:
    # A stream other than a plain socket (TLS, memory) may wait in any write: each is told.
    client, server = ws_pair()
    log = WaitLog()
    await server.send_whole_messages([[b"hello"]], waits=log)
    assert log.calls == ["waits", "done"]
    assert await client.receive_message(100) == b"hello"


@pytest.mark.parametrize("client_sends", [True, False])
async def test_a_pong_of_its_own_goes_out_at_once_on_a_free_socket(
    autojump_clock: trio.abc.Clock, client_sends: bool
) -> None:
    client, server = await socket_ws_pair()
    sender, receiver = (client, server) if client_sends else (server, client)
    before = receiver.last_received
    await trio.sleep(1)
    assert sender.pong_nowait()
    # The peer reads the pong (nothing to answer) and counts it as bytes received.
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: receiver.receive_message(100))
        await trio.testing.wait_all_tasks_blocked()
        assert receiver.last_received > before
        await sender.send_bytes(b"after")
    # It was not answered: nothing came back to the sender but what it reads now.
    await receiver.send_bytes(b"reply")
    assert await sender.receive_message(100) == b"reply"


async def test_a_pong_of_its_own_waits_its_turn_where_it_cannot_go_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    # Not a plain socket, or another send under way: the caller sends it with pong().
    peer, ws = raw_pair()
    assert not ws.pong_nowait()
    await ws.pong()
    assert await peer.next_events() == [Pong(payload=b"")]
    client, server = await socket_ws_pair()
    message = b"z" * 500_000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: server.send_whole_messages([[message]]))
        await trio.testing.wait_all_tasks_blocked()
        assert not server.pong_nowait()  # a send is under way: the pong must not cut into it
        nursery.start_soon(server.pong)
        assert await client.receive_message(len(message)) == message
        await client.send_bytes(b"next")
        assert await server.receive_message(100) == b"next"


async def test_a_write_that_waits_for_another_send_says_so_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    client, server = await socket_ws_pair()
    log = WaitLog()
    message = b"q" * 500_000
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: server.send_whole_messages([[message]]))
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(lambda: server.send_whole_messages([[b"next"]], waits=log))
        await trio.testing.wait_all_tasks_blocked()
        assert log.calls == ["waits"]  # behind the first send, which waits for the socket
        assert await client.receive_message(len(message)) == message
        assert await client.receive_message(100) == b"next"
    assert log.calls == ["waits", "done"]


@pytest.mark.parametrize("plain_socket", [True, False])
async def test_a_beat_comes_at_most_every_interval_while_bytes_keep_arriving(
    autojump_clock: trio.abc.Clock, plain_socket: bool
) -> None:
    """Bytes every 0.3 s for 3 s: the beat comes with the first read at least an interval
    after the last beat (or the start), so every 1.2 s; none while nothing arrives; none
    once stopped. The hub's plain-socket reads and other streams' reads both count."""
    if plain_socket:
        client, server = await socket_ws_pair(buffer_size=1 << 16)
    else:
        client, server = ws_pair()
    beats: list[float] = []
    start = trio.current_time()
    server.beat_while_receiving(1.0, lambda: beats.append(trio.current_time() - start))
    for _ in range(10):
        await trio.sleep(0.3)
        await client.send_bytes(b"x")
        assert await server.receive_message(10) == b"x"
    assert [round(t, 6) for t in beats] == [1.2, 2.4]
    await trio.sleep(5)  # nothing arrives: no beat
    await client.send_bytes(b"y")
    assert await server.receive_message(10) == b"y"
    assert len(beats) == 3  # the first bytes after the quiet spell
    server.beat_while_receiving(1.0, None)
    await trio.sleep(2)
    await client.send_bytes(b"z")
    assert await server.receive_message(10) == b"z"
    assert len(beats) == 3
