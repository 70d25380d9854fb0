"""Idle WebSocket clients in their own process (benchmark 4).

``python bench/_idle_clients.py TARGET '<server ready line JSON>' --first 0 --count 2500``

Each client opens a WebSocket, sends one ``Register`` control message, waits for the answer and
then stays idle (the ``websockets`` client pings every 20 s). TARGET ``devstream``: the device
control channel of ``dev-<i>`` with its SAS token (the answer is ``Registered``); ``peer``:
``/idle/<i>`` on a ``websockets`` echo server (the answer is the echo). The same code either
way. Prints one JSON line once all are connected; closes them when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

from devstream_core import control


async def connect_idle(url: str, authorization: str | None) -> Any:
    ws = await c.ws_connect(
        url, authorization=authorization, subprotocols=[control.CONTROL_SUBPROTOCOL]
    )
    await ws.send(control.encode_message(control.Register(names=("echo",))))
    await ws.recv()
    return ws


async def main(args: argparse.Namespace) -> None:
    c.raise_fd_limit()
    info = json.loads(args.server)
    gate = asyncio.Semaphore(args.parallel)
    hub = c.HubInfo(info) if args.target == "devstream" else None

    async def one(i: int) -> Any:
        async with gate:
            if hub is not None:
                device = c.device_id(i)
                return await connect_idle(
                    f"ws://{hub.host}/devices/{device}/streams", hub.device_sas(device)
                )
            return await connect_idle(f"ws://{info['host']}/idle/{i}", None)

    sockets = await asyncio.gather(*(one(i) for i in range(args.first, args.first + args.count)))
    c.json_line(connected=len(sockets), pid=os.getpid())
    await c.wait_until_stdin_closes()
    for ws in sockets:
        with contextlib.suppress(Exception):
            ws.transport.abort()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("target", choices=["devstream", "peer"])
    parser.add_argument("server", help="the server's ready line (JSON)")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--parallel", type=int, default=64, help="handshakes at once")
    asyncio.run(main(parser.parse_args()))
