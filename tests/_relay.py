"""A TCP relay on 127.0.0.1 in front of a real hub that can cut every connection through it.

Tests that check resumption put it between a client and the hub (``opener=relay.open``) and
call :meth:`Relay.cut` while bytes are flowing.
"""

from __future__ import annotations

import trio

from devstream_trio._connect import HubAddress


class Relay:
    """A TCP relay on 127.0.0.1 in front of the hub that can cut every connection through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
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
                try:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, hub, nursery.cancel_scope)
                        nursery.start_soon(self._pipe, hub, client, nursery.cancel_scope)
                finally:
                    await trio.aclose_forcefully(hub)
        finally:
            self._live.discard(scope)
            await trio.aclose_forcefully(client)

    @staticmethod
    async def _pipe(
        source: trio.SocketStream, sink: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await source.receive_some(256 * 1024):
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
