"""The peer the hub is compared with: a server written with the ``websockets`` library.

``relay``: two clients that connect to the same path (``/pair/<id>?role=…``) are paired and
every message is forwarded to the other, as the hub's raw relay does; a close on one side
closes the other with the same code. The first subprotocol a client offers is accepted (so
devstream.v1 clients work through it unchanged).

``echo``: every message is sent back (an idle connection simply waits).

Listens on 127.0.0.1 (a free port), prints one JSON line, serves until its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    json_line,
    raise_fd_limit,
    wait_until_stdin_closes,
    websockets_speedups,
)

_waiting: dict[str, tuple[ServerConnection, asyncio.Future[None]]] = {}


async def _pump(source: ServerConnection, sink: ServerConnection) -> None:
    try:
        async for message in source:
            await sink.send(message)
    except ConnectionClosed:
        pass
    code = source.close_code if source.close_code not in (None, 1005, 1006) else 1001
    await sink.close(code or 1000, source.close_reason or "")


async def relay(ws: ServerConnection) -> None:
    pair = ws.request.path.split("?", 1)[0] if ws.request is not None else ""
    waiting = _waiting.pop(pair, None)
    if waiting is None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        _waiting[pair] = (ws, done)
        try:
            await done
        finally:
            _waiting.pop(pair, None)
        return
    peer, peer_done = waiting
    try:
        await asyncio.gather(_pump(ws, peer), _pump(peer, ws))
    finally:
        if not peer_done.done():
            peer_done.set_result(None)


async def echo(ws: ServerConnection) -> None:
    try:
        async for message in ws:
            await ws.send(message)
    except ConnectionClosed:
        pass


def _select(connection: ServerConnection, offered: Sequence[Subprotocol]) -> Subprotocol | None:
    return offered[0] if offered else None


async def main(role: str) -> None:
    raise_fd_limit()
    handler = relay if role == "relay" else echo
    async with serve(
        handler,
        "127.0.0.1",
        0,
        compression=None,
        max_size=None,
        select_subprotocol=_select,
        backlog=4096,
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        json_line(host=f"127.0.0.1:{port}", pid=os.getpid(), speedups=websockets_speedups())
        await wait_until_stdin_closes()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("role", choices=["relay", "echo"])
    asyncio.run(main(parser.parse_args().role))
