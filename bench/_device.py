"""Devices in their own process: devstream's own DeviceClient serving an ``echo`` stream name.

``python bench/_device.py '<hub ready line JSON>' --devices 4`` connects ``dev-0`` …
``dev-3``, echoes every stream (raw or devstream.v1) until the peer's EOF, prints one JSON
line once all are online, and stops when its stdin closes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import HubInfo, device_id, json_line, raise_fd_limit

from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import AnyStream


async def echo(stream: AnyStream) -> None:
    while data := await stream.receive_some(65536):
        await stream.send_all(data)
    await stream.aclose()


async def stdin_closed() -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass


async def main(hub: HubInfo, devices: int) -> None:
    raise_fd_limit()
    async with trio.open_nursery() as nursery:
        for i in range(devices):
            client = DeviceClient(hub.device_cs(device_id(i)), http_proxy="")
            await nursery.start(client.serve, {"echo": echo})
        json_line(pid=os.getpid(), devices=devices)
        await stdin_closed()
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("hub", help="the hub's ready line (JSON)")
    parser.add_argument("--devices", type=int, default=1)
    arguments = parser.parse_args()
    trio.run(main, HubInfo(json.loads(arguments.hub)), arguments.devices)
