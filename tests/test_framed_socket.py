"""devstream.v1 streams over a real socket pair, two FramedStreams facing each other (the hub
only relays their messages): the writes a FramedStream makes from the calling task, and the
ones it leaves to its writer task when the socket is full."""

from __future__ import annotations

import gc
import os
import socket
import types
import weakref
from typing import Any

import pytest
import trio
import trio.testing

from devstream_core.common import Role
from devstream_core.errors import ErrorCode
from devstream_core.framing import (
    Ack,
    Data,
    Eof,
    FrameDecoder,
    RecvState,
    Resume,
    encode_frame,
)
from devstream_core.streamdriver import Outcome, OutcomeKind, StreamPhase
from devstream_core.websocket import BytesMessage, CloseConnection, Connection
from devstream_trio.client.framed import ACK_DELAY, DIRECT_READ_TIME, FramedStream
from devstream_trio.exceptions import StreamReset
from devstream_trio.transport.websocket import WebSocket


async def never_reconnect(resume_token: str) -> WebSocket:
    raise AssertionError("no resume in these tests")


def websocket_pair(buffer_size: int) -> tuple[WebSocket, WebSocket]:
    """A client and a server WebSocket over a socket pair with *buffer_size* buffers."""
    a, b = trio.socket.socketpair()
    for sock in (a, b):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer_size)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer_size)
    client = WebSocket(trio.SocketStream(a), Connection(client=True))
    server = WebSocket(trio.SocketStream(b), Connection(client=False))
    return client, server


def framed_pair(
    nursery: trio.Nursery, buffer_size: int, sockets: tuple[WebSocket, WebSocket] | None = None
) -> tuple[FramedStream, FramedStream]:
    client, server = sockets or websocket_pair(buffer_size)
    service = FramedStream(
        client, stream_id="s", role=Role.SERVICE, reconnect=never_reconnect, nursery=nursery
    )
    device = FramedStream(
        server, stream_id="s", role=Role.DEVICE, reconnect=never_reconnect, nursery=nursery
    )
    return service, device


async def test_a_send_the_socket_takes_goes_out_from_the_calling_task() -> None:
    a, b = trio.socket.socketpair()
    client = WebSocket(trio.SocketStream(a), Connection(client=True))
    peer = Connection(client=False)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service = FramedStream(
                client, stream_id="s", role=Role.SERVICE, reconnect=never_reconnect, nursery=nursery
            )
            # The bytes are written by this task: the stream's own tasks (connection task,
            # writer task) never started, and the bytes are on the socket when it returns.
            await service.send_all(b"hello")
            assert not service.background_started
            assert not service.writer_started
            events = peer.receive_data(os.read(b.fileno(), 65536))  # there already: no wait
            [message] = events
            decoder = FrameDecoder()
            [frame] = decoder.feed(bytes(message.data))  # type: ignore[attr-defined]
            assert isinstance(frame, Data) and frame.payload == b"hello"
            nursery.cancel_scope.cancel()
    b.close()


async def test_a_full_socket_leaves_the_rest_to_the_writer_and_loses_nothing() -> None:
    # Small socket buffers: sends from the calling task write part of a message and leave the
    # rest to the writer task, both ways at once.
    payload = {Role.SERVICE: bytes(range(251)) * 9000, Role.DEVICE: bytes(range(241)) * 7000}
    got: dict[Role, bytearray] = {Role.SERVICE: bytearray(), Role.DEVICE: bytearray()}

    async def side(me: FramedStream, peer_role: Role) -> None:
        async def send() -> None:
            data = memoryview(payload[me.role])
            for start in range(0, len(data), 50_000):
                await me.send_all(data[start : start + 50_000])
            await me.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await me.receive_some():
                got[me.role] += chunk
        assert bytes(got[me.role]) == payload[peer_role]

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 8192)
            async with trio.open_nursery() as sides:
                sides.start_soon(side, service, Role.DEVICE)
                sides.start_soon(side, device, Role.SERVICE)
            await service.aclose()
            await device.aclose()
    # The writer task started where the socket was full: on both sides.
    assert service.writer_started
    assert device.writer_started


async def exchange(
    service: FramedStream, device: FramedStream, request: bytes, answer: bytes
) -> None:
    """The service sends *request*, the device reads it and sends *answer*, the service reads
    that."""
    await service.send_all(request)
    assert await device.receive_some() == request
    await device.send_all(answer)
    assert await service.receive_some() == answer


class HandDrivenHub:
    """A device's FramedStream over a socket whose other end the test drives by hand, in the
    hub's place."""

    def __init__(self, nursery: trio.Nursery) -> None:
        a, self.sock = trio.socket.socketpair()
        self.ws = Connection(client=False)
        self.reader = self.ws
        client = WebSocket(trio.SocketStream(a), Connection(client=True))
        self.device = FramedStream(
            client, stream_id="s", role=Role.DEVICE, reconnect=never_reconnect, nursery=nursery
        )

    def send(self, frame: Data | Eof) -> None:
        os.write(self.sock.fileno(), b"".join(self.ws.send_data(encode_frame(frame))))

    def received(self) -> list[list[object]]:
        """The frames of each message the device sent, as far as they have come."""
        events = self.reader.receive_data(os.read(self.sock.fileno(), 65536))
        frames: list[list[object]] = []
        for event in events:
            assert isinstance(event, BytesMessage), event
            frames.append(FrameDecoder().feed(bytes(event.data)))
        return frames

    async def data_then_eof(self) -> None:
        """Two bytes, then, in a message of its own, the EOF; the device reads both."""
        self.send(Data(offset=0, payload=b"hi"))
        assert await self.device.receive_some() == b"hi"
        await trio.testing.wait_all_tasks_blocked()
        self.send(Eof(offset=2))
        assert await self.device.receive_some() == b""


async def test_the_ack_of_the_peers_eof_goes_out_with_this_sides_eof() -> None:
    """The peer's EOF comes after its data; the device reads to it and sends its own EOF: the
    acknowledgement and the EOF go out in one message, not two (each message costs the hub a
    read and a write)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            await hub.data_then_eof()
            await hub.device.send_eof()
            await trio.testing.wait_all_tasks_blocked()
            # The Ack counts the EOF as one byte past the data.
            assert hub.received() == [[Ack(offset=3), Eof(offset=0)]]
            nursery.cancel_scope.cancel()
    hub.sock.close()


async def test_a_stream_the_socket_keeps_up_with_needs_no_writer_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Data both ways, EOF both ways, close: every frame goes out from the calling task or
    the connection task, so the writer task never starts, and nothing waits on a timer (an
    acknowledgement of an EOF goes out with the EOF or the close that follows it)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            start = trio.current_time()
            await exchange(service, device, b"ping", b"pong")
            await service.send_eof()
            assert await device.receive_some() == b""
            await device.send_eof()
            assert await service.receive_some() == b""
            async with trio.open_nursery() as closing:  # each side closes in a task of its own
                closing.start_soon(service.aclose)
                closing.start_soon(device.aclose)
            assert trio.current_time() - start < ACK_DELAY / 10
            for stream in (service, device):
                assert stream.outcome == Outcome(kind=OutcomeKind.COMPLETED)
                assert not stream.writer_started


async def test_an_eof_the_application_does_not_answer_is_acknowledged_soon(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The device reads to the peer's EOF and then does nothing on the stream: the
    acknowledgement goes out alone after ACK_DELAY, so the peer's aclose is not held up."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            await hub.data_then_eof()
            eof_read_at = trio.current_time()
            await trio.lowlevel.wait_readable(hub.sock)
            waited = trio.current_time() - eof_read_at
            assert ACK_DELAY <= waited <= ACK_DELAY * 1.5
            assert hub.received() == [[Ack(offset=3)]]
            nursery.cancel_scope.cancel()
    hub.sock.close()


async def test_an_acknowledgement_taken_along_by_a_send_starts_no_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A young stream defers the acknowledgement of the peer's EOF; a send within ACK_DELAY
    takes it along, so the connection task is not started for it (it starts only when the
    stream is no longer young)."""

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            await hub.data_then_eof()
            await hub.device.send_all(b"late answer")
            assert hub.received() == [[Ack(offset=3), Data(offset=0, payload=b"late answer")]]
            await trio.sleep(ACK_DELAY * 2)
            assert not hub.device.background_started
            await trio.sleep(DIRECT_READ_TIME)
            assert hub.device.background_started
            nursery.cancel_scope.cancel()
    hub.sock.close()


@pytest.mark.parametrize("peer_eof", ["before", "during"])
async def test_both_sides_closing_without_reading_the_eof_finish_at_once(
    autojump_clock: trio.abc.Clock, peer_eof: str
) -> None:
    """Request and answer of known length, then both sides close without reading to the
    peer's EOF: each has read every byte the other sent, so each acknowledges the EOF it got
    while closing, and the stream finishes cleanly at once, not after ``close_timeout`` with
    a reset. The device's EOF arrives before the service starts closing, or while it waits."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            start = trio.current_time()
            await exchange(service, device, b"request", b"answer")
            if peer_eof == "before":
                await device.send_eof()
                await trio.testing.wait_all_tasks_blocked()
                async with trio.open_nursery() as closing:
                    closing.start_soon(service.aclose)
                    closing.start_soon(device.aclose)
            else:
                async with trio.open_nursery() as closing:
                    closing.start_soon(service.aclose)
                    await trio.testing.wait_all_tasks_blocked()
                    closing.start_soon(device.aclose)
            assert trio.current_time() - start < ACK_DELAY * 2
            for stream in (service, device):
                # Finished without a reset; each side's EOF was acknowledged, or answered by
                # the peer's normal close.
                assert stream.outcome is not None
                assert stream.outcome.kind in (OutcomeKind.COMPLETED, OutcomeKind.PEER_CLOSED)


async def test_closing_with_unread_bytes_leaves_the_peers_eof_unacknowledged(
    autojump_clock: trio.abc.Clock,
) -> None:
    """A side that closes without reading what the peer sent does not acknowledge the peer's
    EOF (an acknowledgement says "read"), even while it closes: the peer's EOF stays
    unacknowledged, and the stream ends when the closing side closes the WebSocket."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            await device.send_all(b"never read")
            async with trio.open_nursery() as closing:
                closing.start_soon(service.aclose)
                closing.start_soon(device.aclose)
            assert service.endpoint.recv_state is RecvState.EOF_RECEIVED
            assert service.endpoint.consumed == 0
            assert device.endpoint.eof_acked is False
            assert service.endpoint.eof_acked is True


async def test_a_close_the_peer_never_acknowledges_resets_the_stream(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The device never reads: after ``close_timeout`` the service resets the stream and
    closes, so the device finds the stream reset (what it did not read is dropped with it),
    not a lost connection to resume."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            service.close_timeout = 2.0
            await service.send_all(b"unread")
            start = trio.current_time()
            await service.aclose()
            assert 2.0 <= trio.current_time() - start < 2.1
            assert service.endpoint.reset_info == (
                int(ErrorCode.STREAM_RESET),
                "closed before the peer read all",
            )
            await trio.testing.wait_all_tasks_blocked()
            with pytest.raises(trio.BrokenResourceError) as raised:
                await device.receive_some()
            assert isinstance(raised.value.__cause__, StreamReset)
            assert "closed before the peer read all" in str(raised.value.__cause__)
            await device.aclose()
            assert device.resumes == 0


async def test_receive_some_is_a_checkpoint_and_waits_with_one_schedule_point(
    autojump_clock: trio.abc.Clock,
) -> None:
    """``receive_some`` is a checkpoint whether the bytes are there or it waits for them, and
    a cancelled one loses nothing; its wait is its only schedule point (no extra pass through
    the scheduler before it)."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            await service.send_all(b"ready")
            await trio.testing.wait_all_tasks_blocked()
            with trio.testing.assert_checkpoints():
                assert await device.receive_some() == b"ready"
            with trio.CancelScope() as scope:
                scope.cancel()
                await device.receive_some()
            assert scope.cancelled_caught

            steps: list[trio.lowlevel.Task] = []

            async def receive() -> None:
                assert await device.receive_some() == b"later"

            class Steps(trio.abc.Instrument):
                def before_task_step(self, task: trio.lowlevel.Task) -> None:
                    if getattr(task.coro, "cr_code", None) is receive.__code__:
                        steps.append(task)

            instrument = Steps()
            trio.lowlevel.add_instrument(instrument)
            try:
                async with trio.open_nursery() as inner:
                    inner.start_soon(receive)
                    await trio.testing.wait_all_tasks_blocked()
                    await service.send_all(b"later")
            finally:
                trio.lowlevel.remove_instrument(instrument)
            # One step to start and wait, one to return the bytes once woken.
            assert len(steps) == 2
            nursery.cancel_scope.cancel()


async def test_a_young_streams_messages_are_read_by_the_receiving_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    """While a stream is young (DIRECT_READ_TIME), its messages are read from the socket by
    the task waiting in ``receive_some`` (no trip through the scheduler from a connection
    task); after that, the connection task reads."""
    readers: list[str] = []
    real = WebSocket.receive_messages

    async def receive(*expected: bytes) -> None:
        for data in expected:
            assert await device.receive_some() == data

    async def recorded(
        self: WebSocket, max_size: int, **options: Any
    ) -> list[list[bytes | memoryview]]:
        task = trio.lowlevel.current_task()
        by_receiver = getattr(task.coro, "cr_code", None) is receive.__code__
        readers.append("receiver" if by_receiver else "stream's own task")
        return await real(self, max_size, **options)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            client, server = websocket_pair(1 << 20)
            server.receive_messages = types.MethodType(recorded, server)  # type: ignore[method-assign]
            service, device = framed_pair(nursery, 1 << 20, (client, server))

            async with trio.open_nursery() as inner:
                inner.start_soon(receive, b"first", b"second")
                await trio.testing.wait_all_tasks_blocked()
                await service.send_all(b"first")
                await trio.testing.wait_all_tasks_blocked()
                await service.send_all(b"second")
            assert readers == ["receiver", "receiver"]
            assert not device.background_started
            await trio.sleep(DIRECT_READ_TIME * 1.5)
            async with trio.open_nursery() as inner:
                inner.start_soon(receive, b"third")
                await trio.testing.wait_all_tasks_blocked()
                await service.send_all(b"third")
            assert set(readers[2:]) == {"stream's own task"}
            assert device.background_started
            nursery.cancel_scope.cancel()


async def test_the_connection_task_reads_soon_when_the_application_does_not(
    autojump_clock: trio.abc.Clock,
) -> None:
    """An application that does not call receive_some does not hold the peer's bytes up in
    the network: within DIRECT_READ_TIME the connection task reads them into the stream."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            await service.send_all(b"unread for now")
            await trio.sleep(DIRECT_READ_TIME * 2)
            assert device.endpoint.received == len(b"unread for now")
            assert await device.receive_some() == b"unread for now"
            nursery.cancel_scope.cancel()


async def test_a_short_stream_starts_no_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Streams opening start no connection task of their own, nor do the application's reads
    and closes: a stream exchanged and closed within DIRECT_READ_TIME never starts one. One
    task starts, for all of the nursery's streams, those still open by then, and ends."""

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            pairs = [framed_pair(nursery, 1 << 20) for _ in range(3)]
            await trio.testing.wait_all_tasks_blocked()
            assert len(nursery.child_tasks) == 1  # the starter; no stream's own task
            service, device = pairs[0]
            await exchange(service, device, b"ping", b"pong")
            async with trio.open_nursery() as closing:
                closing.start_soon(service.aclose)
                closing.start_soon(device.aclose)
            assert len(nursery.child_tasks) == 1
            for side in (service, device):
                assert side.phase is StreamPhase.CLOSED
                assert side.outcome == Outcome(kind=OutcomeKind.COMPLETED)
            await trio.sleep(DIRECT_READ_TIME * 2)
            # The starter started the other streams' tasks, and ended.
            assert len(nursery.child_tasks) == 4
            assert all(side.background_started for pair in pairs for side in pair)
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("answer", [True, False])
async def test_closing_a_young_stream_waits_for_the_answer_to_its_close(
    autojump_clock: trio.abc.Clock, answer: bool
) -> None:
    """A stream that closes before its connection task ever started reads the answer to its
    WebSocket close itself, as the task would have, then drops the transport; without an
    answer it gives up after close_timeout."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            device = hub.device
            await hub.data_then_eof()
            returned_at = []

            closing: list[trio.lowlevel.Task] = []

            async def close() -> None:
                closing.append(trio.lowlevel.current_task())
                await device.aclose()
                returned_at.append(trio.current_time())

            before = set(nursery.child_tasks)
            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            assert hub.received() == [[Ack(offset=3), Eof(offset=0)]]
            hub.send(Ack(offset=1))  # the device's EOF: the stream is done, the close goes out
            await trio.testing.wait_all_tasks_blocked()
            events = hub.reader.receive_data(os.read(hub.sock.fileno(), 65536))
            assert [type(event) for event in events] == [CloseConnection]
            closed_at = trio.current_time()
            await trio.sleep(1)
            assert returned_at == []
            # No task started but the one closing (the stream's connection task never did).
            assert [t for t in nursery.child_tasks if t not in before] == closing
            if answer:
                close = events[0]
                assert isinstance(close, CloseConnection)
                os.write(hub.sock.fileno(), hub.ws.send_close(close.code, close.reason))
                await trio.testing.wait_all_tasks_blocked()
                assert returned_at == [closed_at + 1]
            else:
                await trio.sleep(device.close_timeout)
                assert returned_at == [closed_at + device.close_timeout]
            assert await hub.sock.recv(10) == b""  # dropped
            assert device.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    hub.sock.close()


@pytest.mark.parametrize("young", [True, False])
async def test_a_close_that_comes_with_the_last_ack_is_answered(
    autojump_clock: trio.abc.Clock, young: bool
) -> None:
    """The hub passes the peer's last Ack and its close on in one write. A device closing its
    stream reads both at once: the stream is done and the peer has closed, and the device
    answers that close with its own (RFC 6455 section 5.5.1) before it drops the connection,
    at once, with no timer to wait out. Likewise when its connection task had started."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            device = hub.device
            await hub.data_then_eof()
            if not young:
                await trio.sleep(DIRECT_READ_TIME * 2)
                assert device.background_started
            returned_at = []

            async def close() -> None:
                await device.aclose()
                returned_at.append(trio.current_time())

            nursery.start_soon(close)
            await trio.testing.wait_all_tasks_blocked()
            # (Waited past ACK_DELAY, the Ack of the EOF went out on its own before.)
            frames = [frame for message in hub.received() for frame in message]
            assert frames == [Ack(offset=3), Eof(offset=0)]
            sent_at = trio.current_time()
            os.write(
                hub.sock.fileno(),
                b"".join(hub.ws.send_data(encode_frame(Ack(offset=1))))
                + hub.ws.send_close(1000, ""),
            )
            await trio.testing.wait_all_tasks_blocked()
            events = hub.reader.receive_data(os.read(hub.sock.fileno(), 65536))
            assert [type(event) for event in events] == [CloseConnection]
            close_event = events[0]
            assert isinstance(close_event, CloseConnection) and close_event.code == 1000
            assert await hub.sock.recv(10) == b""  # then dropped
            assert returned_at == [sent_at]
            assert device.outcome == Outcome(kind=OutcomeKind.COMPLETED)
    hub.sock.close()


async def test_a_young_streams_close_cancelled_drops_the_connection_at_once(
    autojump_clock: trio.abc.Clock,
) -> None:
    """aclose() on a young stream waits (reading itself) for the peer's acknowledgement; the
    caller cancelled meanwhile, the stream is dropped at once, as trio's aclose rule says."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            device = hub.device
            await hub.data_then_eof()
            before = set(nursery.child_tasks)
            with trio.move_on_after(DIRECT_READ_TIME / 2):  # still young then
                await device.aclose()  # the hub never acknowledges the device's EOF
            assert trio.current_time() == DIRECT_READ_TIME / 2
            assert device.phase is StreamPhase.CLOSED
            assert hub.received() == [[Ack(offset=3), Eof(offset=0)]]
            assert await hub.sock.recv(10) == b""  # dropped, without a close
            assert set(nursery.child_tasks) <= before  # no stream task started meanwhile
            nursery.cancel_scope.cancel()
    hub.sock.close()


async def test_a_young_stream_closed_while_another_task_reads_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    """One task waits in receive_some (reading the socket itself, the stream is young) while
    another closes the stream: the close needs the reader too, so the connection task starts
    and reads for both; the receive gets the peer's data, the close finishes."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 1 << 20)
            got: list[bytes] = []

            async def receive_all() -> None:
                got.append(await device.receive_some())  # in progress when the close starts

            async def answer() -> None:
                assert await service.receive_some() == b""  # the device's EOF
                await service.send_all(b"late")
                await service.aclose()

            async with trio.open_nursery() as inner:
                inner.start_soon(receive_all)
                inner.start_soon(answer)
                await trio.testing.wait_all_tasks_blocked()
                await device.aclose()
            assert got == [b"late"]
            assert device.background_started
            assert device.outcome is None or device.outcome.kind is OutcomeKind.COMPLETED
            assert trio.current_time() < ACK_DELAY * 2
            nursery.cancel_scope.cancel()


async def test_a_connection_lost_under_a_young_streams_read_is_resumed(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The application's own read (the stream is young) finds the connection lost: the
    connection task starts at once and resumes the stream over a new one."""
    tokens: list[str] = []
    peers: list[trio.socket.SocketType] = []

    async def reconnect(resume_token: str) -> WebSocket:
        tokens.append(resume_token)
        a, b = trio.socket.socketpair()
        peers.append(b)
        return WebSocket(trio.SocketStream(a), Connection(client=True))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            a, b = trio.socket.socketpair()
            ws = WebSocket(
                trio.SocketStream(a),
                Connection(client=True),
                handshake_headers=[(b"devstream-resume-token", b"r1.token")],
            )
            device = FramedStream(
                ws, stream_id="s", role=Role.DEVICE, reconnect=reconnect, nursery=nursery
            )

            async def receive() -> None:
                with trio.move_on_after(1):
                    await device.receive_some()

            nursery.start_soon(receive)
            await trio.testing.wait_all_tasks_blocked()
            assert not device.background_started  # the application's task is reading
            b.close()  # the connection is lost
            lost_at = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            assert tokens == ["r1.token"] and device.resumes == 1
            # At once: the first attempt is immediate, and nothing waits for a ping.
            assert trio.current_time() - lost_at < 0.005
            # On the new connection the device asks the peer where to resume.
            peer = Connection(client=False)
            [message] = peer.receive_data(os.read(peers[0].fileno(), 65536))
            assert isinstance(message, BytesMessage)
            assert isinstance(FrameDecoder().feed(bytes(message.data))[0], Resume)
            nursery.cancel_scope.cancel()
    for sock in peers:
        sock.close()


async def test_a_nursery_that_held_streams_is_not_kept_alive() -> None:
    """The nursery's starter is kept by the nursery, weakly: once the nursery is done with,
    nothing of the streams' keeps it (nor its starter) in memory."""
    nurseries = []
    for _ in range(3):
        async with trio.open_nursery() as nursery:
            nurseries.append(weakref.ref(nursery))
            service, device = framed_pair(nursery, 1 << 20)
            await exchange(service, device, b"ping", b"pong")
            async with trio.open_nursery() as closing:
                closing.start_soon(service.aclose)
                closing.start_soon(device.aclose)
    del nursery, service, device, closing
    gc.collect()
    assert [ref() for ref in nurseries] == [None, None, None]


async def test_streams_whose_tasks_never_started_drop_their_connection_when_cancelled() -> None:
    """The client's nursery is cancelled before any stream needed its connection task: the
    WebSockets are dropped all the same, as the streams' own tasks would have dropped them."""
    peers = []
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            streams = []
            for _ in range(2):
                a, b = trio.socket.socketpair()
                peers.append(b)
                ws = WebSocket(trio.SocketStream(a), Connection(client=True))
                streams.append(
                    FramedStream(
                        ws,
                        stream_id="s",
                        role=Role.SERVICE,
                        reconnect=never_reconnect,
                        nursery=nursery,
                    )
                )
            nursery.cancel_scope.cancel()
        for stream in streams:
            assert stream.phase is StreamPhase.CLOSED
        for peer in peers:
            assert await peer.recv(10) == b""  # closed: end of file
            peer.close()


async def test_a_full_socket_both_ways_does_not_wait_for_the_direct_read_to_end(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Both sides write more than the socket takes while each waits for its first message:
    the writer tasks must run at once (a send that needs one stops the direct read), or each
    side would wait for the other until DIRECT_READ_TIME."""
    payload = bytes(range(256)) * 800

    async def side(me: FramedStream) -> None:
        async def send() -> None:
            await me.send_all(payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            got = bytearray()
            while len(got) < len(payload):
                got += await me.receive_some()
        assert bytes(got) == payload

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            service, device = framed_pair(nursery, 8192)
            start = trio.current_time()
            async with trio.open_nursery() as sides:
                sides.start_soon(side, service)
                sides.start_soon(side, device)
            assert trio.current_time() - start < DIRECT_READ_TIME / 2
            nursery.cancel_scope.cancel()


async def test_a_broken_first_message_read_directly_fails_the_stream_cleanly(
    autojump_clock: trio.abc.Clock,
) -> None:
    """The first message, read by the application's own receive_some, holds a frame of an
    unknown type: receive_some raises, the peer gets a Reset with the protocol error, and the
    WebSocket is closed with its code, as when the connection task finds a broken frame."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            hub = HandDrivenHub(nursery)
            bad = b"\x7f" + (8).to_bytes(4, "big") + bytes(8)  # type 0x7f, 8-byte body
            os.write(hub.sock.fileno(), b"".join(hub.ws.send_data(bad)))
            with pytest.raises(trio.BrokenResourceError):
                await hub.device.receive_some()
            await trio.testing.wait_all_tasks_blocked()
            events = hub.reader.receive_data(os.read(hub.sock.fileno(), 65536))
            data = [e for e in events if isinstance(e, BytesMessage)]
            [frame] = FrameDecoder().feed(bytes(data[0].data))
            assert frame.code == int(ErrorCode.PROTOCOL_ERROR)  # type: ignore[attr-defined]
            [close] = [e for e in events if isinstance(e, CloseConnection)]
            assert close.code == ErrorCode.PROTOCOL_ERROR.close_code
            assert hub.device.outcome is not None
            assert hub.device.outcome.kind is OutcomeKind.BROKEN
            assert hub.device.outcome.code == ErrorCode.PROTOCOL_ERROR
            nursery.cancel_scope.cancel()
    hub.sock.close()


async def test_young_streams_one_after_another_share_one_background_task(
    autojump_clock: trio.abc.Clock,
) -> None:
    """Streams opened and closed one after another in one nursery, each ending young with an
    acknowledgement it had deferred (the device reads to the EOF, then closes): one task in
    the nursery watches them all, the same task from the first stream to the last; it is
    not started anew for each stream, and it does not wake for an acknowledgement that went
    out with the stream's close. It leaves once the last stream would have stopped being
    young."""
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            watchers: set[trio.lowlevel.Task] = set()
            for _ in range(5):
                service, device = framed_pair(nursery, 1 << 20)
                await exchange(service, device, b"ping", b"pong")
                await service.send_eof()
                assert await device.receive_some() == b""  # the Ack of the EOF is deferred
                async with trio.open_nursery() as closing:
                    closing.start_soon(service.aclose)
                    closing.start_soon(device.aclose)
                watchers |= nursery.child_tasks
                await trio.sleep(ACK_DELAY * 2)  # past the deferred acknowledgement's time
                watchers |= nursery.child_tasks
            assert len(watchers) == 1
            last_closed = trio.current_time()
            await trio.testing.wait_all_tasks_blocked()
            assert nursery.child_tasks == watchers  # still there: streams may follow
        # The nursery could close once the last stream's young time was over.
        assert trio.current_time() - last_closed <= DIRECT_READ_TIME
