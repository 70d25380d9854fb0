"""A devstream hub in its own process, for the benchmarks.

Creates ``--devices`` devices (``dev-0``, ``dev-1``, …, all with one key) straight in the
registry, listens on 127.0.0.1 (a free port), prints one JSON line (address, owner policy,
device key, pid) and serves until its stdin closes. ``--profile FILE`` runs it under cProfile
(timed by process CPU time) and writes the stats to FILE on the way out.

The registry is an SQLite file in a temporary folder by default, as ``devstream hub`` keeps it
(``--store memory`` keeps it in memory instead).

The hub's limits on connections and on streams per device are lifted: the
benchmarks measure how much one hub holds, with the descriptors the bench leaves it.
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import os
import sys
import tempfile
import time

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import json_line, raise_fd_limit

from devstream_core.registry import new_device
from devstream_trio.server.hub import (
    Hub,
    HubConfig,
    ensure_owner_policy,
    serve_hub,
    tune_gc_for_hub,
)
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.mask import masker_in_use


async def stdin_closed() -> None:
    stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stream:
        while await stream.receive_some(4096):
            pass


async def main(args: argparse.Namespace) -> None:
    tune_gc_for_hub()  # as `devstream hub` does
    limit = raise_fd_limit()
    config = HubConfig(max_connections=limit, max_streams_per_device=limit)
    with tempfile.TemporaryDirectory(prefix="devstream-bench-") as folder:
        path = None if args.store == "memory" else os.path.join(folder, "registry.sqlite3")
        store = await RegistryStore.open(path)
        async with store:
            owner, _ = await ensure_owner_policy(store)
            random_bytes = os.urandom(96)
            key = ""
            for i in range(args.devices):
                device = new_device(device_id=f"dev-{i}", random_bytes=random_bytes)
                key = device.primary_key
                await store.create_device(device)
            async with trio.open_nursery() as nursery:
                hub: Hub = await nursery.start(functools.partial(serve_hub, store, config=config))
                json_line(
                    host=hub.host_name,
                    pid=os.getpid(),
                    owner_name=owner.name,
                    owner_key=owner.primary_key,
                    device_key=key,
                    masker=masker_in_use(),
                )
                await stdin_closed()
                nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--store", choices=["file", "memory"], default="file")
    parser.add_argument("--profile", help="write cProfile stats here on exit")
    arguments = parser.parse_args()
    if arguments.profile:
        # CPU time, not wall time: a hub waiting in epoll is not a cost.
        profiler = cProfile.Profile(time.process_time)
        profiler.enable()
        try:
            trio.run(main, arguments)
        finally:
            profiler.disable()
            profiler.dump_stats(arguments.profile)
    else:
        trio.run(main, arguments)
