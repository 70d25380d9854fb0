"""Benchmark 3, stream setup: from initiate to the first byte echoed, one at a time and many.

devstream: the hub and the device (devstream's own DeviceClient echoing every stream, in a
process of its own) are already up; this process is the service (devstream's ServiceClient).
One setup is ``open_stream`` (initiate -> the device accepts -> both sides join) then one byte
sent and its echo received; closing the stream afterwards is not counted.

peer: a bare WebSocket connect to a ``websockets`` echo server in its own process, with the same
client code as the service's (devstream's TCP connect and WebSocket client over trio), then
one byte echoed.

Then ``--concurrency`` tasks set up streams (and bare connects) at once for ``--seconds``:
streams per second of wall time, and per CPU-second of the hub (the echo server) process,
which is what one hub process could carry with a core to itself (the clients share this
2-core machine with it).

Both parts run in ``--rounds`` rounds, each round a share of every kind (bare, raw,
devstream.v1) in turn, so that the machine's drift during the run (it is shared) weighs on
every kind alike; the figures pool the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

from devstream_trio.client.service import ServiceClient, open_service
from devstream_trio.transport.connect import open_tcp
from devstream_trio.transport.http import websocket_connect

TIMEOUT = 60


async def one_stream(service: ServiceClient, device: str, mode: str) -> float:
    start = trio.current_time()
    stream = await service.open_stream(device, "echo", mode=mode)
    await stream.send_all(b"x")
    data = await stream.receive_some(1)
    elapsed = trio.current_time() - start
    await stream.aclose()
    if data != b"x":
        raise RuntimeError(f"echo came back as {data!r}")
    return elapsed


async def one_bare(host: str, port: int) -> float:
    start = trio.current_time()
    tcp = await open_tcp(host, port)  # the connect devstream's clients use
    ws = await websocket_connect(tcp, host=f"{host}:{port}", target="/echo")
    await ws.send_bytes(b"x")
    event = await ws.receive()
    elapsed = trio.current_time() - start
    await ws.aclose()
    if event.data != b"x":
        raise RuntimeError(f"echo came back as {event.data!r}")
    return elapsed


async def sequential(count: int, run: object) -> list[float]:
    times = []
    for _ in range(count):
        times.append(await run())  # type: ignore[operator]
    return times


async def concurrent(
    tasks: int, seconds: float, run: object, pid: int, device_pid: int | None = None
) -> tuple[int, float, float, float, float]:
    """Run *tasks* loops of *run* for *seconds*; return (runs done, wall s, server CPU-s,
    device CPU-s, this process's CPU-s). The device's is 0 without *device_pid*."""
    done = 0
    me = os.getpid()
    device0 = c.cpu_seconds(device_pid) if device_pid else 0.0
    own0 = c.cpu_seconds(me)
    cpu0, start = c.cpu_seconds(pid), trio.current_time()
    deadline = start + seconds

    async def loop() -> None:
        nonlocal done
        while trio.current_time() < deadline:
            await run()  # type: ignore[operator]
            done += 1

    async with trio.open_nursery() as nursery:
        for _ in range(tasks):
            nursery.start_soon(loop)
    wall, cpu = trio.current_time() - start, c.cpu_seconds(pid) - cpu0
    device = c.cpu_seconds(device_pid) - device0 if device_pid else 0.0
    return done, wall, cpu, device, c.cpu_seconds(me) - own0


async def measure(
    args: argparse.Namespace, hub: c.Child, peer: c.Child, device: c.Child, notes: list[str]
) -> list[object]:
    info = c.HubInfo(hub.info)
    bare_host, bare_port = peer.info["host"].rsplit(":", 1)
    devices = [c.device_id(i) for i in range(args.devices)]
    rows: list[object] = []
    with trio.fail_after(args.seconds * 4 + args.count * 2 + TIMEOUT):
        async with open_service(info.service_cs(), http_proxy="") as service:

            def stream_run(mode: str, counter: list[int] = [0]) -> object:  # noqa: B006
                async def run() -> float:
                    counter[0] += 1
                    return await one_stream(service, devices[counter[0] % len(devices)], mode)

                return run

            async def bare_run() -> float:
                return await one_bare(bare_host, int(bare_port))

            for mode in c.MODES:  # warm up
                await sequential(10, stream_run(mode))
            await sequential(10, bare_run)
            kinds: dict[str, tuple[object, int]] = {"bare": (bare_run, peer.pid)}
            for mode in c.MODES:
                kinds[mode] = (stream_run(mode), hub.pid)
            times: dict[str, list[float]] = {kind: [] for kind in kinds}
            for i in range(args.rounds):  # args.count in all, spread over the rounds
                share = args.count // args.rounds + (i < args.count % args.rounds)
                for kind, (run, _pid) in kinds.items():
                    times[kind] += await sequential(share, run)
            totals = {kind: [0, 0.0, 0.0, 0.0, 0.0] for kind in kinds}
            for _ in range(args.rounds):
                for kind, (run, pid) in kinds.items():
                    figures = await concurrent(
                        args.concurrency,
                        args.seconds / args.rounds,
                        run,
                        pid,
                        None if kind == "bare" else device.pid,
                    )
                    for i, value in enumerate(figures):
                        totals[kind][i] += value

            def rates(kind: str) -> tuple[float, float]:
                done, wall, cpu = totals[kind][:3]
                return done / wall, done / cpu if cpu else float("nan")

            bare_rate, bare_per_cpu = rates("bare")
            for mode in c.MODES:
                for name, q in (("median", 0.5), ("p99", 0.99)):
                    rows.append(
                        (
                            f"{mode} setup + 1-byte echo, {name} ms",
                            c.percentile(times[mode], q) * 1000,
                            c.percentile(times["bare"], q) * 1000,
                        )
                    )
            for mode in c.MODES:
                rate, per_cpu = rates(mode)
                rows.append((f"{mode} streams/s, wall", rate, bare_rate))
                rows.append((f"{mode} streams per hub CPU-second", per_cpu, bare_per_cpu))

            def per_run(kind: str, i: int) -> str:
                return f"{totals[kind][i] / max(1, totals[kind][0]) * 1e6:,.0f}"

            # Where a set-up's CPU goes: the three processes share the machine's cores, so
            # the wall rate is at most (cores) / (their sum), whatever the hub's share.
            notes.append(
                "CPU µs per set-up in the runs at once (hub / device / service): "
                + "; ".join(
                    f"{mode} {per_run(mode, 2)} / {per_run(mode, 3)} / {per_run(mode, 4)}"
                    for mode in c.MODES
                )
                + f"; the bare connect: echo server {per_run('bare', 2)}, client "
                f"{per_run('bare', 4)}."
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--count", type=int, help="streams set up one at a time, per mode")
    parser.add_argument("--concurrency", type=int, help="tasks setting up streams at once")
    parser.add_argument("--seconds", type=float, help="length of each concurrent run")
    parser.add_argument("--devices", type=int, default=4, help="devices the streams go to")
    parser.add_argument(
        "--rounds", type=int, help="rounds that take turns between the kinds (see above)"
    )
    parser.add_argument(
        "--store", choices=["file", "memory"], default="file", help="the hub's registry"
    )
    args = parser.parse_args()
    args.count = args.count or c.tiny_or(args, 20, 1000)
    args.concurrency = args.concurrency or c.tiny_or(args, 4, 64)
    args.seconds = args.seconds or (0.3 if args.tiny else 15.0)
    args.rounds = args.rounds or c.tiny_or(args, 2, 10)
    c.raise_fd_limit()
    notes: list[str] = []
    with (
        c.start_hub(devices=args.devices, store=args.store) as hub,
        c.Child(
            [str(c.BENCH / "_device.py"), json.dumps(hub.info), "--devices", str(args.devices)]
        ) as device,
        c.start_peer("echo") as peer,
    ):
        rows = trio.run(measure, args, hub, peer, device, notes)
    c.print_table(
        "Stream setup: initiate -> accepted -> both joined -> first byte echoed",
        "bare WS connect + echo",
        rows,  # type: ignore[arg-type]
        [
            f"{args.count} setups one at a time per kind; then {args.concurrency} at once for "
            f"{args.seconds:g} s per kind; both in {args.rounds} rounds taking turns between "
            f"the kinds. The peer's per-CPU-second figure is the websockets echo server's. Hub "
            f"registry: {args.store} (SQLite).",
            *notes,
        ],
    )


if __name__ == "__main__":
    main()
