"""Benchmark 5, concurrent streams: many streams open at once on one hub process.

``--count`` streams are opened (device sides and service sides spread over ``--processes``
processes each, bench/_stream_clients.py) and held open together; then every stream sends
``--rounds`` payloads of ``--size`` bytes made from its number, the device side echoes them, and
the service side checks each echo. The hub's VmRSS is read before, with all streams open, and
after the exchange; its CPU time (/proc/<pid>/stat) over the setup and over the exchange.

The peer is the ``websockets`` relay (bench/_ws_peer.py) holding the same number of pairs, with
the same client code and the same exchange. ``--mode`` picks raw or devstream.v1 (both by
default).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

#: Devices the streams are spread over (the hub queues at most 100 requests per device).
DEVICES = 4


def run(target: str, server: c.Child, args: argparse.Namespace, mode: str) -> dict[str, Any]:
    """Open, exchange, measure; return the figures."""
    count, processes = args.count, args.processes
    share = -(-count // processes)
    common = ["--mode", mode, "--size", str(args.size), "--rounds", str(args.rounds)]
    script = str(c.BENCH / "_stream_clients.py")
    server_json = json.dumps(server.info)
    rss0, cpu0, t0 = server.rss_kb(), server.cpu(), time.monotonic()
    clients: list[c.Child] = []
    try:
        per_process = DEVICES // processes if target == "devstream" else 0
        for p, first in enumerate(range(0, count, share)):
            size = min(share, count - first)
            where = (
                ["--first", str(p * per_process), "--devices", str(per_process)]
                if target == "devstream"
                else ["--first", str(first), "--count", str(size)]
            )
            clients.append(c.Child([script, "device", target, server_json, *where, *common]))
        services = []
        for first in range(0, count, share):
            size = min(share, count - first)
            services.append(
                c.Child(
                    [
                        script,
                        "service",
                        target,
                        server_json,
                        "--first",
                        str(first),
                        "--count",
                        str(size),
                        "--devices",
                        str(DEVICES),
                        *common,
                    ]
                )
            )
        clients += services
        opened = sum(service.info["opened"] for service in services)
        rss1, cpu1, t1 = server.rss_kb(), server.cpu(), time.monotonic()
        for service in services:
            service.tell("go")
        results = [service.readline() for service in services]
        rss2, cpu2, t2 = server.rss_kb(), server.cpu(), time.monotonic()
    finally:
        for client in clients:
            client.stop()
    return {
        "opened": opened,
        "correct": sum(r["correct"] for r in results),
        "rss": (rss0, rss1, rss2),
        "setup": (cpu1 - cpu0, t1 - t0),
        "exchange": (cpu2 - cpu1, t2 - t1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--count", type=int, help="streams open at once")
    parser.add_argument("--processes", type=int, default=2, help="processes per side")
    parser.add_argument("--size", type=int, default=4096, help="bytes per payload")
    parser.add_argument("--rounds", type=int, default=2, help="payloads per stream")
    parser.add_argument("--mode", choices=c.MODES, action="append", help="default: both")
    parser.add_argument("--profile", action="store_true", help="profile the hub, print top 15")
    args = parser.parse_args()
    # 10,000, or as many as the open-files limit lets the hub hold: it has two sockets per
    # stream, plus its listener and the devices' control channels (200 spare). Where the
    # hard limit is 20,000, that is 9,900.
    args.count = args.count or c.tiny_or(args, 40, min(10_000, (c.raise_fd_limit() - 200) // 2))
    modes = args.mode or list(c.MODES)
    for mode in modes:
        with tempfile.TemporaryDirectory() as folder:
            profile = os.path.join(folder, "hub.prof") if args.profile else None
            with c.start_hub(devices=DEVICES, profile=profile) as hub:
                ours = run("devstream", hub, args, mode)
            if profile:
                print(f"\n## Hub profile ({mode}, {args.count:,} streams), top 15 by own time\n")
                pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        with c.start_peer("relay") as peer:
            theirs = run("peer", peer, args, mode)
        n = args.count

        def per_stream(r: dict[str, Any], at: int = 1, n: int = n) -> float:
            return float(r["rss"][at] - r["rss"][0]) / n

        c.print_table(
            f"Concurrent streams ({mode}): {n:,} open at once on one process",
            "websockets relay",
            [
                ("streams open", ours["opened"], theirs["opened"]),
                ("streams whose data came back intact", ours["correct"], theirs["correct"]),
                ("resident memory before, MB", ours["rss"][0] / 1024, theirs["rss"][0] / 1024),
                ("resident memory, all open, MB", ours["rss"][1] / 1024, theirs["rss"][1] / 1024),
                (
                    "resident memory after the exchange, MB",
                    ours["rss"][2] / 1024,
                    theirs["rss"][2] / 1024,
                ),
                ("KB per open stream (KiB of VmRSS)", per_stream(ours), per_stream(theirs)),
                (
                    "KB per stream after the exchange",
                    per_stream(ours, 2),
                    per_stream(theirs, 2),
                ),
                ("server CPU-s, opening them all", ours["setup"][0], theirs["setup"][0]),
                ("wall s, opening them all", ours["setup"][1], theirs["setup"][1]),
                ("server CPU-s, the exchange", ours["exchange"][0], theirs["exchange"][0]),
                ("wall s, the exchange", ours["exchange"][1], theirs["exchange"][1]),
            ],
            [
                f"each stream: {args.rounds} x {args.size} B sent, echoed and checked; clients "
                f"over {args.processes} processes per side. The peer needs no initiate, so its "
                "opening cost is the WebSocket handshakes alone."
            ],
        )


if __name__ == "__main__":
    main()
