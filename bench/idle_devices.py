"""Benchmark 4, idle devices: hub resident memory per connected idle device.

The hub runs with ``--count`` devices in its registry; its VmRSS (/proc/<pid>/status) is read
before any device connects and again once every device's control channel is open and
registered (clients spread over ``--processes`` processes, bench/_idle_clients.py). The peer
is a ``websockets`` echo server holding the same number of idle connections from the same
client code (each sends one message, gets its answer, and stays idle).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c


def hold(target: str, server: c.Child, count: int, processes: int) -> tuple[int, int, float]:
    """Connect *count* idle clients to *server*; return (RSS before, RSS after, seconds)."""
    before = server.rss_kb()
    start = time.monotonic()
    share = -(-count // processes)
    clients = []
    try:
        for first in range(0, count, share):
            clients.append(
                c.Child(
                    [
                        str(c.BENCH / "_idle_clients.py"),
                        target,
                        json.dumps(server.info),
                        "--first",
                        str(first),
                        "--count",
                        str(min(share, count - first)),
                    ]
                )
            )
        connected = sum(client.info["connected"] for client in clients)
        elapsed = time.monotonic() - start
        if connected != count:
            raise RuntimeError(f"{connected} of {count} clients connected")
        after = server.rss_kb()
    finally:
        for client in clients:
            client.stop()
    return before, after, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--count", type=int, help="idle devices")
    parser.add_argument("--processes", type=int, help="client processes")
    args = parser.parse_args()
    count = args.count or c.tiny_or(args, 50, 10_000)
    processes = args.processes or c.tiny_or(args, 1, 4)
    with c.start_hub(devices=count) as hub:
        ours = hold("devstream", hub, count, processes)
    with c.start_peer("echo") as peer:
        theirs = hold("peer", peer, count, processes)
    ours_kb = (ours[1] - ours[0]) / count
    theirs_kb = (theirs[1] - theirs[0]) / count
    c.print_table(
        f"Idle devices: {count:,} control channels held open by one process",
        "websockets server",
        [
            ("resident memory before, MB", ours[0] / 1024, theirs[0] / 1024),
            ("resident memory after, MB", ours[1] / 1024, theirs[1] / 1024),
            ("KB per idle device (KiB of VmRSS)", ours_kb, theirs_kb),
            ("seconds to connect them all", ours[2], theirs[2]),
        ],
        [
            f"{count:,} clients over {processes} processes; the peer holds idle WebSockets "
            "from the same client code (one message each, then idle)."
        ],
    )


if __name__ == "__main__":
    main()
