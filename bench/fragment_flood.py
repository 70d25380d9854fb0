"""Hostile peers: what a flood of tiny WebSocket fragments costs the hub, and everyone else.

The hub (bench/_hub.py) runs in a process of its own; this process runs the clients (the
``websockets`` asyncio client, as in the other benchmarks):

1. **Fragmented raw message.** One raw stream carries one binary message sent as
   ``--fragments`` masked frames of ``--size`` bytes each (a first frame with FIN=0, then
   continuations, the last with FIN=1), written straight to the socket. Meanwhile a second raw
   stream echoes a 64-byte message every 10 ms. Printed: the hub's CPU-seconds from the first
   fragment written to the whole message received by the other side (utime + stime from
   /proc), whether it arrived intact, and the echo's round trips while the flood lasted.
2. **Empty continuations.** A device's control channel gets a text frame with FIN=0 and then
   ``--empty`` empty continuation frames; then, on a fresh hub, the service side of a
   devstream.v1 stream gets a binary frame with FIN=0 and as many. Printed: the close code and
   reason the hub answered with (if it did), and the hub's resident memory before, after the
   writes and after the close.

3. **Ping flood.** The service side of a raw stream (a client with credentials) writes
   ``--pings`` masked empty pings straight to the socket, then one binary message, while the
   echo stream of case 1 runs. Printed: the hub's CPU-seconds until the message reached the
   device side, and the echo's round trips meanwhile.

Run from the repository root: ``python bench/fragment_flood.py`` (``--tiny`` for a quick
functional run).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import struct
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c
from websockets.exceptions import ConnectionClosed

DEVICE = c.device_id(0)
NAME = "flood"
_KEY = b"\x37\xfa\x21\x3d"


def frame(first: int, payload: bytes) -> bytes:
    """A masked (client) frame with FIN/opcode byte *first*."""
    length = len(payload)
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    masked = bytes(b ^ _KEY[i & 3] for i, b in enumerate(payload))
    return head + _KEY + masked


def fragmented_message(count: int, size: int) -> tuple[bytes, bytes]:
    """The wire bytes of one binary message in *count* fragments of *size* bytes, and the
    message itself. Each fragment carries its number, so a lost or reordered one shows; the
    mask key is zero (legal, and unmasking costs the hub the same), so building 1,000,000
    frames costs this process little."""
    modulus = 1 << (8 * size)
    pieces = [(index % modulus).to_bytes(size, "big") for index in range(count)]
    head = b"\x00\x00\x00\x00"
    assert size < 126
    wire = b"".join(
        bytes(((0x02 if index == 0 else 0x00) | (0x80 if index == count - 1 else 0), 0x80 | size))
        + head
        + piece
        for index, piece in enumerate(pieces)
    )
    return wire, b"".join(pieces)


class Streams:
    """Opens raw streams on the bench hub: initiate, the device accepts and joins."""

    def __init__(self, hub: c.HubInfo, mode: str = "raw") -> None:
        self.hub = hub
        self.mode = mode
        self.sas = hub.service_sas()
        self.joined: asyncio.Queue[Any] = asyncio.Queue()
        self.ready = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(
            c.run_device(self.hub, DEVICE, [NAME], self._on_request, self.ready)
        )
        await self.ready.wait()

    async def _on_request(self, request: Any) -> None:
        ws = await c.ws_connect(
            request.url,
            authorization=f"Bearer {request.token}",
            subprotocols=c.subprotocols_for(self.mode),
        )
        await self.joined.put(ws)

    async def open(self) -> tuple[Any, Any]:
        url, token = await c.initiate(self.hub, self.sas, DEVICE, NAME, self.mode)
        service = await c.ws_connect(
            url, authorization=f"Bearer {token}", subprotocols=c.subprotocols_for(self.mode)
        )
        return service, await self.joined.get()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


async def echo(ws: Any) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            await ws.send(message)


class EchoProbe:
    """Two raw streams on the bench hub: one that echoes 64 bytes every 10 ms (its round trips
    are kept), and one for the flood (``flood_service`` writes, ``flood_device`` reads)."""

    def __init__(self, hub: c.Child) -> None:
        self.streams = Streams(c.HubInfo(hub.info))
        self.round_trips: list[float] = []
        self.done = asyncio.Event()

    async def __aenter__(self) -> EchoProbe:
        await self.streams.start()
        self.echo_service, echo_device = await self.streams.open()
        self.echo_task = asyncio.create_task(echo(echo_device))
        self.flood_service, self.flood_device = await self.streams.open()
        self.probing = asyncio.create_task(self._probe())
        await asyncio.sleep(0.2)
        return self

    async def _probe(self) -> None:
        data = os.urandom(64)
        while not self.done.is_set():
            sent = time.perf_counter()
            await self.echo_service.send(data)
            if await self.echo_service.recv() != data:
                raise RuntimeError("echo stream: wrong bytes")
            self.round_trips.append(time.perf_counter() - sent)
            await asyncio.sleep(0.01)

    def idle(self) -> list[float]:
        """The round trips so far (before the flood); the list starts again."""
        idle = list(self.round_trips)
        self.round_trips.clear()
        return idle

    async def __aexit__(self, *exc: object) -> None:
        self.done.set()
        await self.probing
        for ws in (self.flood_service, self.flood_device, self.echo_service):
            await ws.close()
        self.echo_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.echo_task
        await self.streams.stop()

    def figures(self) -> dict[str, Any]:
        return {
            "rtt_median": c.median(self.round_trips),
            "rtt_max": max(self.round_trips, default=float("nan")),
            "probes": len(self.round_trips),
        }


async def fragmented_raw(args: argparse.Namespace, hub: c.Child) -> dict[str, Any]:
    wire, message = fragmented_message(args.fragments, args.size)
    async with EchoProbe(hub) as probe:
        idle = probe.idle()
        cpu0, t0 = hub.cpu(), time.perf_counter()
        probe.flood_service.transport.write(wire)  # the frames as they are, to the socket
        received = await probe.flood_device.recv()
        cpu1, t1 = hub.cpu(), time.perf_counter()
    return {
        "cpu": cpu1 - cpu0,
        "wall": t1 - t0,
        "intact": received == message,
        "idle_rtt": c.median(idle),
        **probe.figures(),
    }


async def ping_flood(args: argparse.Namespace, hub: c.Child) -> dict[str, Any]:
    """A raw stream's service side writes ``args.pings`` pings, then a message (case 3)."""
    ping = frame(0x89, b"")
    batch = ping * 100_000
    async with EchoProbe(hub) as probe:
        probe.idle()
        transport = probe.flood_service.transport
        cpu0, t0 = hub.cpu(), time.perf_counter()
        sent = 0
        while sent < args.pings:
            count = min(100_000, args.pings - sent)
            transport.write(batch if count == 100_000 else ping * count)
            sent += count
            while transport.get_write_buffer_size() > 1 << 20:
                await asyncio.sleep(0.001)
        transport.write(frame(0x82, b"end"))
        received = await probe.flood_device.recv()
        cpu1, t1 = hub.cpu(), time.perf_counter()
    return {"cpu": cpu1 - cpu0, "wall": t1 - t0, "intact": received == b"end", **probe.figures()}


async def empty_continuations(
    args: argparse.Namespace, hub: c.Child, target: str
) -> dict[str, Any]:
    """Flood a control channel (*target* "control") or a devstream.v1 stream's service side
    (*target* "framed") with empty continuations after a first fragment."""
    info = c.HubInfo(hub.info)
    streams: Streams | None = None
    if target == "control":
        ws = await c.ws_connect(
            f"ws://{info.host}/devices/{DEVICE}/streams",
            authorization=info.device_sas(DEVICE),
            subprotocols=["devstream.control.v1"],
        )
        first = frame(0x01, b'{"type": ')
    else:
        streams = Streams(info, c.FRAMED)
        await streams.start()
        ws, _ = await streams.open()
        first = frame(0x02, b"\x01")
    rss0 = hub.rss_kb()
    empty = frame(0x00, b"")
    ws.transport.write(first)
    batch = empty * 100_000
    sent = 0
    while sent < args.empty:
        count = min(100_000, args.empty - sent)
        ws.transport.write(batch if count == 100_000 else empty * count)
        sent += count
        while ws.transport.get_write_buffer_size() > 1 << 20 and not ws.transport.is_closing():
            await asyncio.sleep(0.001)
        if ws.transport.is_closing():
            break
    rss_peak = hub.rss_kb()
    code, reason = None, ""
    with contextlib.suppress(ConnectionClosed, asyncio.TimeoutError):
        async with asyncio.timeout(30):
            while True:
                await ws.recv()
    if ws.close_code is not None:
        code, reason = ws.close_code, ws.close_reason or ""
    await ws.close()
    if streams is not None:
        await streams.stop()
    await asyncio.sleep(0.5)
    return {
        "code": code,
        "reason": reason,
        "rss_before": rss0,
        "rss_peak": rss_peak,
        "rss_after": hub.rss_kb(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--fragments", type=int, help="fragments of the raw message")
    parser.add_argument("--size", type=int, default=6, help="bytes per fragment (1 to 125)")
    parser.add_argument("--empty", type=int, help="empty continuations on a control channel")
    parser.add_argument("--pings", type=int, help="pings a raw stream's service side floods")
    args = parser.parse_args()
    args.fragments = args.fragments or c.tiny_or(args, 10_000, 1_000_000)
    args.empty = args.empty or c.tiny_or(args, 10_000, 5_000_000)
    args.pings = args.pings or c.tiny_or(args, 10_000, 1_000_000)
    with c.start_hub() as hub:
        raw = asyncio.run(fragmented_raw(args, hub))
    with c.start_hub() as hub:
        pings = asyncio.run(ping_flood(args, hub))
    floods = {}
    for target in ("control", "framed"):
        with c.start_hub() as hub:
            floods[target] = asyncio.run(empty_continuations(args, hub, target))
    ms = 1000
    print(f"\n## One raw message in {args.fragments:,} fragments of {args.size} bytes\n")
    print("| metric | value |\n|---|---|")
    print(f"| hub CPU-s for the message | {c.fmt(raw['cpu'])} |")
    print(f"| wall s until it arrived | {c.fmt(raw['wall'])} |")
    print(f"| arrived intact | {'yes' if raw['intact'] else 'NO'} |")
    print(f"| echo round trip before, median ms | {c.fmt(raw['idle_rtt'] * ms)} |")
    print(f"| echo round trip during, median ms | {c.fmt(raw['rtt_median'] * ms)} |")
    print(f"| echo round trip during, max ms | {c.fmt(raw['rtt_max'] * ms)} |")
    print(f"| echo round trips during | {raw['probes']} |")
    print(f"\n## {args.pings:,} pings from a raw stream's service side, then a message\n")
    print("| metric | value |\n|---|---|")
    print(f"| hub CPU-s until the message arrived | {c.fmt(pings['cpu'])} |")
    print(f"| wall s until it arrived | {c.fmt(pings['wall'])} |")
    print(f"| arrived intact | {'yes' if pings['intact'] else 'NO'} |")
    print(f"| echo round trip during, median ms | {c.fmt(pings['rtt_median'] * ms)} |")
    print(f"| echo round trip during, max ms | {c.fmt(pings['rtt_max'] * ms)} |")
    print(f"| echo round trips during | {pings['probes']} |")
    titles = {
        "control": "A control message: a text frame",
        "framed": "A devstream.v1 message: a binary frame",
    }
    for target, flood in floods.items():
        print(f"\n## {titles[target]}, then {args.empty:,} empty continuations\n")
        print("| metric | value |\n|---|---|")
        print(f"| hub's close | {flood['code']} {flood['reason']} |")
        print(f"| hub RSS before, MB | {c.fmt(flood['rss_before'] / 1024)} |")
        print(f"| hub RSS after the writes, MB | {c.fmt(flood['rss_peak'] / 1024)} |")
        print(f"| hub RSS after the close, MB | {c.fmt(flood['rss_after'] / 1024)} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
