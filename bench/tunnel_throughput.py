"""Benchmark 2, tunnel throughput: a TCP connection through the proxies and the hub.

devstream: TCP client -> service proxy (``devstream proxy service --forward``) -> hub ->
device proxy (``devstream proxy device --map``) -> TCP sink, each in its own process; the
stream between the proxies is devstream.v1.

peer: the same path built from three ``socat`` relays (``TCP-LISTEN`` -> ``TCP``), each in its
own process, started with ``-b 65536`` (the proxies' read size; socat's default is 8 KiB).

The client (a thread here) writes ``--bytes`` in 256 KiB writes, then shuts down its sending
side; the rate is bytes over the time from connecting to the sink seeing EOF. The CPU figure
sums the three relay processes (for socat, from ``wait4``; for devstream, /proc/<pid>/stat).
Runs alternate between the two paths; the table gives medians of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common as c

CHUNK = 256 * 1024
TIMEOUT = 300


class Sink:
    """Accepts connections one after another and counts each one's bytes until EOF."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.results: queue.Queue[tuple[int, float]] = queue.Queue()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        buffer = bytearray(1 << 20)
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            total = 0
            with conn:
                while size := conn.recv_into(buffer):
                    total += size
                self.results.put((total, time.perf_counter()))

    def close(self) -> None:
        self.listener.close()


def push(port: int, total: int, sink: Sink) -> tuple[int, float]:
    """Send *total* bytes to 127.0.0.1:*port*; return (bytes the sink got, seconds)."""
    chunk = os.urandom(CHUNK)
    view = memoryview(chunk)
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as conn:
        left = total
        while left > 0:
            conn.sendall(view[: min(left, CHUNK)])
            left -= CHUNK
        conn.shutdown(socket.SHUT_WR)
        got, end = sink.results.get(timeout=TIMEOUT)
        while conn.recv(65536):  # the far end's close comes back as EOF
            pass
    if got != total:
        raise RuntimeError(f"the sink got {got} of {total} bytes")
    return got, end - start


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (32768 and up), so that no outgoing
    connection of the other processes takes it before socat binds it."""
    while True:
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:*port* (without connecting to it)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(
            line.split()[1] == wanted and line.split()[3] == "0A" for line in f.readlines()[1:]
        )


def start_socats(sink: Sink) -> tuple[list[subprocess.Popen[bytes]], int]:
    """Three socat relays in a chain to the sink; return them and the first one's port.

    A relay that could not listen (its port taken meanwhile) is retried on fresh ports."""
    for _ in range(5):
        ports = [free_port() for _ in range(3)]
        targets = [*ports[1:], sink.port]
        procs: list[subprocess.Popen[bytes]] = []
        for listen, target in reversed(list(zip(ports, targets, strict=True))):
            procs.append(
                subprocess.Popen(
                    [
                        "socat",
                        "-b",
                        "65536",
                        f"TCP-LISTEN:{listen},bind=127.0.0.1,reuseaddr",
                        f"TCP:127.0.0.1:{target}",
                    ]
                )
            )
            deadline = time.monotonic() + 10
            while not listening(listen) and procs[-1].poll() is None:
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            if procs[-1].poll() is not None or not listening(listen):
                break
        else:
            time.sleep(0.05)  # a relay that failed to bind exits at once
            if all(proc.poll() is None for proc in procs):
                return procs, ports[0]
        for proc in procs:
            proc.kill()
            proc.wait()
    raise RuntimeError("socat did not start listening (five tries)")


def socat_run(total: int, sink: Sink) -> tuple[float, float, int]:
    """One transfer through three fresh socat relays; return (CPU s, wall s, bytes)."""
    procs, entry = start_socats(sink)
    got, wall = push(entry, total, sink)
    cpu = 0.0
    for proc in procs:
        _, _, usage = os.wait4(proc.pid, 0)
        proc.returncode = 0
        cpu += usage.ru_utime + usage.ru_stime
    return cpu, wall, got


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tiny", action="store_true", help="a quick functional run")
    parser.add_argument("--bytes", type=int, help="bytes per run")
    parser.add_argument("--repeat", type=int, help="runs per path")
    args = parser.parse_args()
    total = args.bytes or c.tiny_or(args, 1 << 20, 512 << 20)
    repeat = args.repeat or c.tiny_or(args, 1, 3)
    sink = Sink()
    env = {k: v for k, v in os.environ.items() if k.lower() not in ("https_proxy", "no_proxy")}
    cli = ["-m", "devstream_trio.cli", "--log-level", "warning", "proxy"]
    ours: list[tuple[float, float, int]] = []
    theirs: list[tuple[float, float, int]] = []
    #: CPU-s/GB of the service proxy, the hub and the device proxy, per run.
    each: list[list[float]] = []
    with c.start_hub() as hub_child:
        hub = c.HubInfo(hub_child.info)
        device_env = {**env, "DEVSTREAM_CONNECTION_STRING": hub.device_cs(c.device_id(0))}
        service_env = {**env, "DEVSTREAM_CONNECTION_STRING": hub.service_cs()}
        with (
            c.Child(
                [*cli, "device", "--map", f"bench=127.0.0.1:{sink.port}"],
                env=device_env,
                json_ready=False,
                terminate=True,
            ) as device,
            c.Child(
                [*cli, "service", "--device", c.device_id(0), "--forward", "127.0.0.1:0=bench"],
                env=service_env,
                json_ready=False,
                terminate=True,
            ) as service,
        ):
            # "listening on 127.0.0.1:PORT -> 'bench' on device 'dev-0'"
            entry = int(service.info["line"].split()[2].rsplit(":", 1)[1])
            pids = [service.pid, hub_child.pid, device.pid]

            def ours_run() -> tuple[float, float, int]:
                before = [c.cpu_seconds(pid) for pid in pids]
                got, wall = push(entry, total, sink)
                spent = [c.cpu_seconds(pid) - b for pid, b in zip(pids, before, strict=True)]
                each.append([cpu / (got / c.GB) for cpu in spent])
                return sum(spent), wall, got

            ours_run()  # warm up
            each.clear()
            socat_run(min(total, 1 << 20), sink)
            for _ in range(repeat):
                ours.append(ours_run())
                theirs.append(socat_run(total, sink))
    sink.close()

    def rate(runs: list[tuple[float, float, int]]) -> float:
        return c.median([n / wall / c.MB for _, wall, n in runs])

    def cost(runs: list[tuple[float, float, int]]) -> float:
        return c.median([cpu / (n / c.GB) for cpu, _, n in runs])

    c.print_table(
        "Tunnel throughput: TCP client -> 3 relays -> TCP sink",
        "3 x socat",
        [
            ("throughput, MB/s", rate(ours), rate(theirs)),
            ("CPU-s/GB, the three relay processes", cost(ours), cost(theirs)),
        ],
        [
            f"devstream: service proxy + hub + device proxy (devstream.v1); medians of "
            f"{repeat} runs of {total / c.MB:.0f} MB; GB = 1e9 bytes. Seconds per run: "
            f"devstream {', '.join(f'{w:.2f}' for _, w, _ in ours)}; "
            f"socat {', '.join(f'{w:.2f}' for _, w, _ in theirs)}.",
            "devstream CPU-s/GB by process (medians): "
            + ", ".join(
                f"{name} {c.median([run[i] for run in each]):.2f}"
                for i, name in enumerate(["service proxy", "hub", "device proxy"])
            )
            + ".",
        ],
    )


if __name__ == "__main__":
    main()
