"""Benchmark 6, resume overhead: a proxied transfer whose connections are reset every N bytes.

The path of benchmark 2 (TCP client -> service proxy -> hub -> device proxy -> TCP sink, the
stream devstream.v1), with a TCP relay between each proxy's client and the hub. A relay resets
(TCP RST: ``SO_LINGER`` on with a zero timeout, then close) the connection that carries the
byte at each of its cut points, every ``N`` bytes of what it relayed (both directions, every
connection); the service side's relay cuts half a step before the device side's, so the two
sides drop at independent points and resume on their own. The same transfer runs with no cuts
(the relays only forward), with cuts every 16 MiB and every 1 MiB; the sink answers the
SHA-256 of what it read after the EOF, and the client checks it.

A cut resets both ends of the connection, or (the "one end" settings) only the socket the cut
byte was read from, as a middlebox that notices a cut while reading one side does: the other
end stays open and hears nothing more until it next sends something. The stream has to notice
that silence itself (a message that stops half-way makes it ping at once, see
``devstream_core.streamdriver.STALL_PROBE``); before it did, each such cut waited for the next ping.

The hub runs in a process of its own (``_hub.py``); the relays, the two proxies (the library's
``serve_service_proxy`` and ``serve_device_proxy``), the client and the sink run in this one.
Runs take turns (no cuts; 16 MiB and 1 MiB at both ends; 16 MiB and 1 MiB at one end)
``--repeat`` times; the table gives medians, and the
extra milliseconds per cut: (median time with cuts - median time without) / median cuts,
cuts of both relays counted. Target: at most 50 ms per cut on loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import socket
import struct
import sys
import time
from functools import partial

import trio

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

from devstream_core.credentials import ConnectionString
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.proxy import Forward, Target, serve_device_proxy, serve_service_proxy
from devstream_trio.client.service import ServiceClient
from devstream_trio.transport.connect import HubAddress

MIB = 1024 * 1024
CHUNK = 256 * 1024
#: Extra time per cut the benchmark aims at, in ms.
TARGET_MS = 50.0
NO_CUTS = 1 << 62


def _reset(stream: trio.SocketStream) -> None:
    with contextlib.suppress(OSError):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


class CuttingRelay:
    """A TCP relay to the hub that resets the connection carrying each cut point."""

    def __init__(self, hub_port: int) -> None:
        self.hub_port = hub_port
        self.port = 0
        self.every = NO_CUTS
        self.one_sided = False
        self.carried = 0
        self.cuts = 0
        self._next_cut = NO_CUTS

    def arm(self, every: int, first: int, *, one_sided: bool = False) -> None:
        """Cut every *every* bytes from now on, the first after *first*; with *one_sided*,
        reset only the socket the cut byte came from."""
        self.every, self.cuts, self.one_sided = every, 0, one_sided
        self._next_cut = self.carried + first

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._serve, listeners)

    async def open(self, address: HubAddress) -> trio.abc.Stream:
        return await trio.open_tcp_stream("127.0.0.1", self.port)

    async def _serve(self, client: trio.SocketStream) -> None:
        hub = await trio.open_tcp_stream("127.0.0.1", self.hub_port)
        ends: list[str] = []
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._pipe, client, hub, nursery.cancel_scope, ends)
                nursery.start_soon(self._pipe, hub, client, nursery.cancel_scope, ends)
        finally:
            for stream in (client, hub):
                if "cut" in ends:
                    _reset(stream)
                else:
                    stream.socket.close()

    async def _pipe(
        self,
        source: trio.SocketStream,
        sink: trio.SocketStream,
        scope: trio.CancelScope,
        ends: list[str],
    ) -> None:
        try:
            while data := await source.receive_some(CHUNK):
                room = self._next_cut - self.carried
                if len(data) < room:
                    self.carried += len(data)
                    await sink.send_all(data)
                    continue
                self.carried = self._next_cut
                self._next_cut += self.every
                self.cuts += 1
                ends.append("cut")
                await sink.send_all(data[:room])
                if self.one_sided:
                    _reset(source)  # the other direction finds out when it next forwards
                else:
                    scope.cancel()
                return
            await sink.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            ends.append("cut")
            scope.cancel()


async def digest_sink(tcp: trio.SocketStream) -> None:
    digest = hashlib.sha256()
    async for chunk in tcp:
        digest.update(chunk)
    await tcp.send_all(digest.digest())
    await tcp.aclose()


async def transfer(port: int, payload: bytes) -> float:
    """Send *payload* and EOF through the service proxy; read and check the sink's answer."""
    started = time.perf_counter()
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    answer = bytearray()

    async def send() -> None:
        view = memoryview(payload)
        for start in range(0, len(payload), CHUNK):
            await tcp.send_all(view[start : start + CHUNK])
        await tcp.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        async for chunk in tcp:
            answer += chunk
    await tcp.aclose()
    took = time.perf_counter() - started
    if bytes(answer) != hashlib.sha256(payload).digest():
        raise SystemExit("the sink's digest does not match what was sent")
    return took


#: A setting: cut every so many bytes, at both ends (False) or one end (True).
Step = tuple[int, bool]


async def measure(
    hub: c.HubInfo, size: int, steps: list[Step], repeat: int
) -> dict[Step, list[tuple[float, int]]]:
    payload = os.urandom(size)
    runs: dict[Step, list[tuple[float, int]]] = {step: [] for step in steps}
    async with trio.open_nursery() as nursery:
        relays = {side: CuttingRelay(hub.port) for side in ("service", "device")}
        for relay in relays.values():
            await nursery.start(relay.run)
        device_id = c.device_id(0)
        device = DeviceClient(
            ConnectionString.parse(hub.device_cs(device_id)),
            opener=relays["device"].open,
            backoff_min=0.05,
            backoff_max=0.5,
        )
        service = ServiceClient(
            ConnectionString.parse(hub.service_cs()),
            nursery=nursery,
            opener=relays["service"].open,
        )
        listeners = await nursery.start(partial(trio.serve_tcp, digest_sink, 0, host="127.0.0.1"))
        sink_port = listeners[0].socket.getsockname()[1]
        target = Target(name="bench", host="127.0.0.1", port=sink_port)
        await nursery.start(partial(serve_device_proxy, device, [target]))
        forward = Forward(bind="127.0.0.1", port=0, name="bench")
        ((_, port),) = await nursery.start(
            partial(serve_service_proxy, service, device_id, [forward])
        )
        await transfer(port, payload[: min(size, 4 * MIB)])  # warm up
        for _ in range(repeat):
            for step in steps:
                every, one_sided = step
                relays["service"].arm(every, every // 2, one_sided=one_sided)
                relays["device"].arm(every, every, one_sided=one_sided)
                took = await transfer(port, payload)
                cuts = sum(relay.cuts for relay in relays.values())
                runs[step].append((took, cuts))
                for relay in relays.values():
                    relay.arm(NO_CUTS, NO_CUTS)
        nursery.cancel_scope.cancel()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--bytes", type=int, help="bytes per transfer")
    parser.add_argument("--repeat", type=int, help="runs per setting")
    args = parser.parse_args()
    size = args.bytes or c.tiny_or(args, 8 * MIB, 128 * MIB)
    repeat = args.repeat or c.tiny_or(args, 1, 5)
    sizes = [16 * MIB, MIB] if not args.tiny else [4 * MIB, MIB]
    steps: list[Step] = [(NO_CUTS, False)]
    steps += [(every, False) for every in sizes] + [(every, True) for every in sizes]
    with c.start_hub(store="memory") as hub_child:
        hub = c.HubInfo(hub_child.info)
        runs = trio.run(measure, hub, size, steps, repeat)

    base = c.median([took for took, _ in runs[NO_CUTS, False]])
    rows: list[tuple[str, float, float]] = []
    notes = []
    for step in steps[1:]:
        took = c.median([t for t, _ in runs[step]])
        cuts = c.median([n for _, n in runs[step]])
        extra = (took - base) * 1000 / cuts if cuts else float("nan")
        every, one_sided = step
        label = f"{every // MIB} MiB" + (" at one end" if one_sided else "")
        rows.append((f"cuts every {label}: time, s", took, base))
        rows.append(
            (f"cuts every {label}: extra ms per cut (target {TARGET_MS:.0f})", extra, TARGET_MS)
        )
        notes.append(
            f"cuts every {label}: {', '.join(f'{t:.2f} s / {n} cuts' for t, n in runs[step])}"
        )
    c.print_table(
        f"Resume overhead: {size / MIB:.0f} MiB through the proxies, connections reset every N",
        "no cuts",
        rows,
        [
            f"Medians of {repeat} runs per setting; no cuts: "
            f"{', '.join(f'{t:.2f} s' for t, _ in runs[NO_CUTS, False])}. "
            "The 'no cuts' column of a time row is the transfer without cuts; "
            "of an extra-ms row, the target.",
            *notes,
        ],
    )


if __name__ == "__main__":
    main()
