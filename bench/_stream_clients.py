"""Clients of many streams at once, in their own process (benchmark 5).

``device`` side: echoes every stream it joins. TARGET ``devstream``: the control channels of
``--devices`` devices from ``--first`` (each accepts every request and joins the stream);
``peer``: ``--count`` connections from ``--first`` to ``/pair/<i>?role=device`` on the
``websockets`` relay. Prints one JSON line when ready.

``service`` side: opens ``--count`` streams from ``--first`` (devstream: initiate to the devices
in turn, then join; peer: ``/pair/<i>?role=service``), prints ``{"opened": n}``, waits for a
``go`` line on stdin, then sends every stream ``--rounds`` payloads of ``--size`` bytes (made
from the stream's number) and checks each echo, and prints ``{"correct": n, "failed": m}``.

The data-plane code is the same for both targets: ``websockets`` clients, raw or devstream.v1
(the core's StreamEndpoint), through bench/_common.py. Everything closes when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c


async def echo(ch: c.Channel) -> None:
    with contextlib.suppress(Exception):
        while data := await ch.recv():
            await ch.send(data)


async def device_side(args: argparse.Namespace, info: dict[str, Any]) -> None:
    tasks: set[asyncio.Task[None]] = set()
    if args.target == "devstream":
        hub = c.HubInfo(info)

        async def on_request(request: Any) -> None:
            ws = await c.ws_connect(
                request.url,
                authorization=f"Bearer {request.token}",
                subprotocols=c.subprotocols_for(request.mode),
            )
            await echo(c.channel(ws, request.mode))

        readies = []
        for i in range(args.first, args.first + args.devices):
            ready = asyncio.Event()
            readies.append(ready)
            task = asyncio.create_task(
                c.run_device(hub, c.device_id(i), ["echo"], on_request, ready)
            )
            tasks.add(task)
        await asyncio.gather(*(ready.wait() for ready in readies))
    else:
        gate = asyncio.Semaphore(args.parallel)
        protocols = c.subprotocols_for(args.mode)

        async def connect(i: int) -> Any:
            async with gate:
                return await c.ws_connect(
                    f"ws://{info['host']}/pair/{i}?role=device", subprotocols=protocols
                )

        sockets = await asyncio.gather(
            *(connect(i) for i in range(args.first, args.first + args.count))
        )
        for ws in sockets:
            tasks.add(asyncio.create_task(echo(c.channel(ws, args.mode))))
    c.json_line(ready=True, pid=os.getpid())
    await c.wait_until_stdin_closes()


async def service_side(args: argparse.Namespace, info: dict[str, Any]) -> None:
    gate = asyncio.Semaphore(args.parallel)
    protocols = c.subprotocols_for(args.mode)
    hub = c.HubInfo(info) if args.target == "devstream" else None
    sas = hub.service_sas() if hub is not None else ""

    async def open_one(i: int) -> c.Channel:
        async with gate:
            if hub is not None:
                device = c.device_id(i % args.devices)
                url, token = await c.initiate(hub, sas, device, "echo", args.mode)
                ws = await c.ws_connect(
                    url, authorization=f"Bearer {token}", subprotocols=protocols
                )
            else:
                ws = await c.ws_connect(
                    f"ws://{info['host']}/pair/{i}?role=service", subprotocols=protocols
                )
            return c.channel(ws, args.mode)

    numbers = range(args.first, args.first + args.count)
    channels = await asyncio.gather(*(open_one(i) for i in numbers))
    c.json_line(opened=len(channels))
    await asyncio.to_thread(sys.stdin.readline)  # "go"

    async def exchange(i: int, ch: c.Channel) -> bool:
        rng = random.Random(i)
        try:
            for _ in range(args.rounds):
                payload = rng.randbytes(args.size)
                await ch.send(payload)
                if await c.recv_exactly(ch, len(payload)) != payload:
                    return False
        except Exception:
            return False
        return True

    results = await asyncio.gather(
        *(exchange(i, ch) for i, ch in zip(numbers, channels, strict=True))
    )
    correct = sum(results)
    c.json_line(correct=correct, failed=len(results) - correct)
    await c.wait_until_stdin_closes()


async def main(args: argparse.Namespace) -> None:
    c.raise_fd_limit()
    info = json.loads(args.server)
    if args.side == "device":
        await device_side(args, info)
    else:
        await service_side(args, info)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("side", choices=["device", "service"])
    parser.add_argument("target", choices=["devstream", "peer"])
    parser.add_argument("server", help="the server's ready line (JSON)")
    parser.add_argument("--mode", choices=c.MODES, default="raw")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=1, help="streams (or peer connections)")
    parser.add_argument("--devices", type=int, default=1, help="devstream devices")
    parser.add_argument("--parallel", type=int, default=32, help="setups at once")
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    asyncio.run(main(parser.parse_args()))
