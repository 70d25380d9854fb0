"""TCP relays on 127.0.0.1 in front of a real hub that cut the connections through them.

Tests that check resumption put one between a client and the hub (``opener=relay.open``):
:class:`Relay` cuts every connection when the test calls :meth:`Relay.cut`;
:class:`CuttingRelay` resets a connection each time it has carried another N bytes.
"""

from __future__ import annotations

import contextlib
import socket
import struct

import trio

from devstream_trio.transport.connect import HubAddress


class Pace:
    """A slow link's pace: :meth:`carry` returns no sooner than *rate* bytes a second would
    have carried everything handed to it since the first call."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._since: float | None = None
        self._carried = 0

    async def carry(self, size: int) -> None:
        if self._since is None:
            self._since = trio.current_time()
        self._carried += size
        await trio.sleep_until(self._since + self._carried / self.rate)


class Relay:
    """A TCP relay on 127.0.0.1 in front of the hub that can cut every connection through it.

    With *to_client_rate*, it carries the hub's bytes to the client at that many bytes a
    second, 4 KiB at a time, reading them from a socket with a small receive buffer: a slow
    link, whose writes make the hub wait.
    """

    def __init__(self, target_port: int, *, to_client_rate: float | None = None) -> None:
        self.target_port = target_port
        self.to_client_rate = to_client_rate
        self.port = 0
        self.connections = 0
        self.cuts = 0
        self._live: set[trio.CancelScope] = set()

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._serve, listeners, task_status=task_status)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.connections += 1
        scope = trio.CancelScope()
        self._live.add(scope)
        try:
            with scope:
                hub = await trio.open_tcp_stream("127.0.0.1", self.target_port)
                if self.to_client_rate is not None:
                    hub.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, hub, nursery.cancel_scope)
                        nursery.start_soon(
                            self._pipe, hub, client, nursery.cancel_scope, self.to_client_rate
                        )
                finally:
                    await trio.aclose_forcefully(hub)
        finally:
            self._live.discard(scope)
            await trio.aclose_forcefully(client)

    @staticmethod
    async def _pipe(
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        rate: float | None = None,
    ) -> None:
        pace = None if rate is None else Pace(rate)
        try:
            while data := await source.receive_some(256 * 1024 if pace is None else 16384):
                if pace is not None:
                    await pace.carry(len(data))  # no sooner than the link would have
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    def cut(self) -> int:
        """Close every connection through the relay, both ends; return how many."""
        self.cuts += 1
        live = list(self._live)
        for scope in live:
            scope.cancel()
        return len(live)

    async def open(self, address: HubAddress) -> trio.abc.Stream:
        """An opener for a client: every connection to the hub goes through the relay."""
        return await trio.open_tcp_stream("127.0.0.1", self.port)


def _reset(stream: trio.SocketStream) -> None:
    """Close *stream* with a TCP reset (RST) rather than a FIN."""
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


class CuttingRelay:
    """A TCP relay on 127.0.0.1 that resets a connection every time the relay has carried
    another *every* bytes (both directions of every connection, counted together).

    The first cut comes after *first* bytes (default: *every*), so two relays can cut at
    independent points. The bytes up to a cut point are forwarded, then both sockets of the
    connection that carried them are closed with a TCP reset (``SO_LINGER`` on with a zero
    timeout, then close), as a middlebox that drops a connection would. A half-close (EOF) is
    passed on; a connection whose both directions ended is closed normally.

    With *one_sided*, a cut resets only the socket the cut byte was read from, as a relay
    that notices the cut while reading one side does: the other end stays open and hears
    nothing more, and is reset when it next sends something (or when its peer does).
    """

    def __init__(
        self, target_port: int, *, every: int, first: int | None = None, one_sided: bool = False
    ) -> None:
        if every < 1:
            raise ValueError("every must be >= 1")
        self.target_port = target_port
        self.every = every
        self.one_sided = one_sided
        self.port = 0
        #: Bytes carried, both ways, every connection.
        self.carried = 0
        self.cuts = 0
        self.connections = 0
        self._next_cut = every if first is None else first

    async def run(
        self,
        *,
        task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        await trio.serve_listeners(self._serve, listeners, task_status=task_status)

    async def open(self, address: HubAddress) -> trio.abc.Stream:
        """An opener for a client: every connection to the hub goes through the relay."""
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def _serve(self, client: trio.SocketStream) -> None:
        self.connections += 1
        try:
            hub = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            _reset(client)
            return
        ends: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, hub, nursery.cancel_scope, ends)
                nursery.start_soon(self._pipe, hub, client, nursery.cancel_scope, ends)
        finally:
            for stream in (client, hub):
                if "cut" in ends:
                    _reset(stream)
                else:
                    stream.socket.close()

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        ends: list[str],
    ) -> None:
        """Forward one direction; at a cut point, stop both (``ends`` gets ``"cut"``)."""
        try:
            while data := await source.receive_some(256 * 1024):
                room = self._next_cut - self.carried
                if len(data) < room:
                    self.carried += len(data)
                    await sink.send_all(data)
                    continue
                # This read reaches the cut point: forward up to it, then the reset.
                self.carried = self._next_cut
                self._next_cut += self.every
                self.cuts += 1
                ends.append("cut")
                await sink.send_all(data[:room])
                if self.one_sided:
                    _reset(source)  # the other direction finds out when it next forwards
                else:
                    scope.cancel()
                return
            await sink.send_eof()
            ends.append("eof")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ends.append("cut")
            scope.cancel()
