"""Benchmark 1, relay cost: CPU-seconds per GB the relay process spends on one stream.

The hub (bench/_hub.py) and the peer, a relay written with the ``websockets`` library
(bench/_ws_peer.py relay), each run in a process of their own; this process runs the two
clients, both written with the ``websockets`` asyncio client, so only the relay differs:

* devstream: the service side initiates (documented HTTP API), a device control channel accepts,
  both sides join the streaming endpoint with ``Authorization: Bearer``;
* peer: both sides connect to the same ``/pair/<id>`` path.

The service side sends ``--bytes`` in writes of each size to the device side; the relay's CPU
time (utime + stime from /proc/<pid>/stat) is read just before the first write and just after
the last byte arrived. In raw mode each write is one WebSocket message; in devstream.v1 the
core's StreamEndpoint frames it (Data frames of at most 64 KiB, messages of at most 1 MiB,
Acks back), as a FramedStream does. Both modes also go through the ``websockets`` relay, which
forwards the same messages.

Every (mode, size) runs ``--repeat`` times on each relay, alternating; the table gives medians.
``--profile FILE`` also runs the hub under cProfile for 64 KiB raw and devstream.v1 streams and
prints its top functions.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import pstats
import sys
import tempfile
import uuid
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

SIZES = {"4 KiB": 4096, "64 KiB": 65536, "1 MiB": 1024 * 1024}
DEVICE = c.device_id(0)
NAME = "bench"


class DevstreamPairs:
    """Opens devstream streams: initiate, device accepts and joins, service joins."""

    def __init__(self, hub: c.HubInfo) -> None:
        self.hub = hub
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
            subprotocols=c.subprotocols_for(request.mode),
        )
        await self.joined.put(ws)

    async def open(self, mode: str) -> tuple[Any, Any]:
        url, token = await c.initiate(self.hub, self.sas, DEVICE, NAME, mode)
        service = await c.ws_connect(
            url, authorization=f"Bearer {token}", subprotocols=c.subprotocols_for(mode)
        )
        device = await self.joined.get()
        return service, device

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task


class PeerPairs:
    """Opens pairs through the ``websockets`` relay: both sides connect to one path."""

    def __init__(self, host: str) -> None:
        self.host = host

    async def open(self, mode: str) -> tuple[Any, Any]:
        pair = uuid.uuid4().hex
        protocols = c.subprotocols_for(mode)
        service, device = await asyncio.gather(
            c.ws_connect(f"ws://{self.host}/pair/{pair}?role=service", subprotocols=protocols),
            c.ws_connect(f"ws://{self.host}/pair/{pair}?role=device", subprotocols=protocols),
        )
        return service, device


async def transfer(
    pairs: DevstreamPairs | PeerPairs, pid: int, mode: str, size: int, total: int
) -> tuple[float, float, int]:
    """Send *total* bytes in writes of *size*; return (relay CPU s, wall s, bytes)."""
    service_ws, device_ws = await pairs.open(mode)
    sender, receiver = c.channel(service_ws, mode), c.channel(device_ws, mode)
    chunk = os.urandom(size)
    count = max(1, total // size)
    expected = count * size

    async def send() -> None:
        for _ in range(count):
            await sender.send(chunk)

    async def receive() -> None:
        got = 0
        while got < expected:
            data = await receiver.recv()
            if not data:
                raise RuntimeError(f"stream ended after {got} of {expected} bytes")
            got += len(data)

    loop = asyncio.get_running_loop()
    cpu0, t0 = c.cpu_seconds(pid), loop.time()
    await asyncio.gather(send(), receive())
    cpu1, t1 = c.cpu_seconds(pid), loop.time()
    await sender.close()
    await receiver.close()
    return cpu1 - cpu0, t1 - t0, expected


async def measure(args: argparse.Namespace, hub: c.Child, peer: c.Child) -> list[Any]:
    ours = DevstreamPairs(c.HubInfo(hub.info))
    await ours.start()
    theirs = PeerPairs(peer.info["host"])
    results: dict[tuple[str, str, str], list[tuple[float, float, int]]] = {}
    # Warm both up (imports, first connections).
    for mode in c.MODES:
        await transfer(ours, hub.pid, mode, 65536, 1 << 20)
        await transfer(theirs, peer.pid, mode, 65536, 1 << 20)
    for mode in c.MODES:
        for label, size in SIZES.items():
            total = args.bytes if size >= 65536 else args.bytes // args.small_divisor
            for _ in range(args.repeat):
                for who, pairs, pid in (("ours", ours, hub.pid), ("peer", theirs, peer.pid)):
                    result = await transfer(pairs, pid, mode, size, total)
                    results.setdefault((mode, label, who), []).append(result)
    await ours.stop()
    rows: list[Any] = []
    for mode in c.MODES:
        for label in SIZES:

            def per_gb(who: str, mode: str = mode, label: str = label) -> float:
                return c.median([cpu / (n / c.GB) for cpu, _, n in results[(mode, label, who)]])

            rows.append((f"{mode} {label}: relay CPU-s/GB", per_gb("ours"), per_gb("peer")))
    for mode in c.MODES:
        for label in SIZES:

            def rate(who: str, mode: str = mode, label: str = label) -> float:
                return c.median([n / wall / c.MB for _, wall, n in results[(mode, label, who)]])

            rows.append((f"{mode} {label}: MB/s (client-bound)", rate("ours"), rate("peer")))
    return rows


async def measure_masking(
    args: argparse.Namespace, native: c.Child, pure: c.Child
) -> list[tuple[str, float, float]]:
    """The same hub with the native masker and with the pure-Python one, 64 KiB."""
    hubs = {"native": native, "pure": pure}
    pairs = {name: DevstreamPairs(c.HubInfo(hub.info)) for name, hub in hubs.items()}
    for name in hubs:
        await pairs[name].start()
        for mode in c.MODES:
            await transfer(pairs[name], hubs[name].pid, mode, 65536, 1 << 20)
    results: dict[tuple[str, str], list[float]] = {}
    for mode in c.MODES:
        for _ in range(args.repeat):
            for name, hub in hubs.items():
                cpu, _, n = await transfer(pairs[name], hub.pid, mode, 65536, args.bytes)
                results.setdefault((mode, name), []).append(cpu / (n / c.GB))
    for name in hubs:
        await pairs[name].stop()
    return [
        (
            f"{mode} 64 KiB: hub CPU-s/GB",
            c.median(results[(mode, "native")]),
            c.median(results[(mode, "pure")]),
        )
        for mode in c.MODES
    ]


async def profile_hub(args: argparse.Namespace, path: str) -> None:
    with c.start_hub(profile=path) as hub:
        ours = DevstreamPairs(c.HubInfo(hub.info))
        await ours.start()
        for mode in c.MODES:
            await transfer(ours, hub.pid, mode, 65536, args.bytes)
        await ours.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--bytes", type=int, help="bytes per run at 64 KiB and 1 MiB")
    parser.add_argument("--repeat", type=int, help="runs per relay and (mode, size)")
    parser.add_argument("--profile", action="store_true", help="profile the hub, print top 10")
    args = parser.parse_args()
    args.bytes = args.bytes or c.tiny_or(args, 2 << 20, 512 << 20)
    args.repeat = args.repeat or c.tiny_or(args, 1, 5)
    #: 4 KiB writes move fewer bytes (their cost is per message).
    args.small_divisor = 1 if args.tiny else 4
    with c.start_hub() as hub, c.start_peer("relay") as peer:
        rows = asyncio.run(measure(args, hub, peer))
    speedups = "on" if peer.info["speedups"] else "OFF"
    c.print_table(
        "Relay cost: one stream, relay process CPU per GB relayed",
        "websockets relay",
        rows,
        [
            f"websockets {c.websockets_version()} (C speedups {speedups}); "
            f"medians of {args.repeat} runs; {args.bytes / c.MB:.0f} MB per run "
            f"({args.bytes / args.small_divisor / c.MB:.0f} MB at 4 KiB); GB = 1e9 bytes.",
        ],
    )
    with (
        c.start_hub() as native,
        c.start_hub(pure_python_mask=True) as pure,
    ):
        if (native.info["masker"], pure.info["masker"]) != ("native", "pure-python"):
            raise RuntimeError(f"maskers: {native.info['masker']}, {pure.info['masker']}")
        rows = asyncio.run(measure_masking(args, native, pure))
    c.print_table(
        "Masking: the hub with the native masker and with the pure-Python one",
        "pure-Python masking",
        rows,
        [
            "Both columns are devstream's hub (one stream, 64 KiB writes); the peer column "
            "runs with DEVSTREAM_PURE_PYTHON_MASK=1."
        ],
    )
    if args.profile:
        with tempfile.TemporaryDirectory() as folder:
            path = os.path.join(folder, "hub.prof")
            asyncio.run(profile_hub(args, path))
            print("\n## Hub profile (64 KiB writes, raw then devstream.v1), top 10 by own time\n")
            stats = pstats.Stats(path)
            stats.sort_stats("tottime").print_stats(10)
            sys.stdout.flush()


if __name__ == "__main__":
    main()
