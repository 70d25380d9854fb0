"""Pieces every benchmark shares: the processes under test, /proc readings, clients, tables.

The process under test (the hub, or the peer it is compared with) always runs on its own, so
its CPU time and memory can be read from ``/proc/<pid>``; the clients run in other processes.
Every helper process prints one JSON line when it is ready and exits when its stdin closes.

The data-plane clients are the same code for devstream and for its peers: WebSocket clients
written with the ``websockets`` asyncio client. Only how they find each other differs (the
devstream initiate + ``Authorization: Bearer`` join, or a path the peer relay pairs on).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, cast

import websockets
import websockets.asyncio.client
from websockets.exceptions import ConnectionClosed

from devstream_core import control
from devstream_core.credentials import ConnectionString, device_resource, make_sas_token
from devstream_core.framing import SUBPROTOCOL as FRAMED
from devstream_core.framing import StreamEndpoint
from devstream_trio.client.framed import MESSAGE_LIMIT

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: What a FramedStream puts in one WebSocket message at most (whole frames).
FRAMED_MESSAGE_LIMIT = MESSAGE_LIMIT
MODES = ("raw", FRAMED)
GB = 1e9
MB = 1e6


# -- /proc readings ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process *pid* (every thread), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # After the ")" closing the command name: state is field 3, utime 14, stime 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid: int) -> int:
    """Resident memory of process *pid* in KiB (VmRSS from /proc/<pid>/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard one; return it."""
    import resource

    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def websockets_version() -> str:
    return str(getattr(websockets, "__version__", "?"))


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import h11
    import trio

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "trio": trio.__version__,
        "h11": getattr(h11, "__version__", "?"),
        "websockets": websockets_version(),
        "websockets C speedups": "on" if websockets_speedups() else "off",
    }


def websockets_speedups() -> bool:
    """Whether ``websockets`` unmasks frames with its C extension."""
    import websockets.frames

    try:
        import websockets.speedups
    except ImportError:
        return False
    return getattr(websockets.frames, "apply_mask", None) is websockets.speedups.apply_mask


# -- tables -----------------------------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """The *q* quantile (0..1) by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))
    return ordered[index]


def fmt(value: float) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    if value != value:  # NaN
        return "n/a"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def print_table(
    title: str, peer: str, rows: Sequence[tuple[str, float, float]], notes: Sequence[str] = ()
) -> None:
    """Print ``metric | devstream | peer | ratio`` rows (ratio = devstream / peer)."""
    header = ("metric", "devstream", peer, "ratio")
    lines = [
        (
            metric,
            fmt(ours),
            fmt(theirs),
            fmt(ours / theirs) if theirs and theirs == theirs else "n/a",
        )
        for metric, ours, theirs in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(4)]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for line in lines:
        cells = [line[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(line[1:], widths[1:], strict=True)
        ]
        print("| " + " | ".join(cells) + " |")
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


# -- helper processes -------------------------------------------------------------------------


class Child:
    """A helper process: prints one JSON line when ready, exits when its stdin closes."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        json_ready: bool = True,
        terminate: bool = False,
    ) -> None:
        """Start ``python *args``; wait for its ready line (JSON, or any line).

        *terminate*: stop it with SIGTERM (a CLI command) rather than by closing its stdin.
        (Not SIGINT: a shell starting the benchmark in the background makes its children
        ignore SIGINT.)
        """
        self.args = list(args)
        self.terminate = terminate
        self.proc = subprocess.Popen(
            [sys.executable, *self.args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=ROOT,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"{' '.join(self.args)} exited with {self.proc.returncode}")
        self.info: dict[str, Any] = json.loads(line) if json_ready else {"line": line.strip()}

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def rss_kb(self) -> int:
        return rss_kb(self.pid)

    def readline(self) -> dict[str, Any]:
        """The next JSON line the process prints."""
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{' '.join(self.args)} ended early")
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self, message: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(message + "\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 60) -> int:
        if self.terminate and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"warning: {' '.join(self.args)} did not stop; killed", file=sys.stderr)
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_hub(
    *,
    devices: int = 1,
    profile: str | None = None,
    store: str = "file",
    pure_python_mask: bool = False,
) -> Child:
    """A devstream hub in its own process (bench/_hub.py); *pure_python_mask* keeps
    the pure-Python masker (``DEVSTREAM_PURE_PYTHON_MASK=1``)."""
    args = [str(BENCH / "_hub.py"), "--devices", str(devices), "--store", store]
    if profile:
        args += ["--profile", profile]
    env = {**os.environ, "DEVSTREAM_PURE_PYTHON_MASK": "1" if pure_python_mask else "0"}
    return Child(args, env=env)


def start_peer(role: str) -> Child:
    """A ``websockets`` server in its own process (bench/_ws_peer.py): relay or echo."""
    return Child([str(BENCH / "_ws_peer.py"), role])


async def wait_until_stdin_closes() -> None:
    """For asyncio helper processes: return once the parent closes our stdin."""
    await asyncio.to_thread(sys.stdin.read)


# -- credentials ------------------------------------------------------------------------------


class HubInfo:
    """What a client needs to reach a bench hub (from its ready line)."""

    def __init__(self, info: dict[str, Any]) -> None:
        self.info = info
        self.host: str = info["host"]  # host:port, as the hub signs and names itself
        self.address, port = self.host.rsplit(":", 1)
        self.port = int(port)
        self.owner_name: str = info["owner_name"]
        self.owner_key: str = info["owner_key"]
        self.device_key: str = info["device_key"]

    def service_sas(self) -> str:
        return make_sas_token(
            resource=self.host,
            key=self.owner_key,
            expiry=int(time.time()) + 24 * 3600,
            policy_name=self.owner_name,
        )

    def device_sas(self, device_id: str) -> str:
        return make_sas_token(
            resource=device_resource(self.host, device_id),
            key=self.device_key,
            expiry=int(time.time()) + 24 * 3600,
        )

    def device_cs(self, device_id: str) -> str:
        return str(
            ConnectionString(
                host_name=self.host,
                device_id=device_id,
                shared_access_key=self.device_key,
                use_tls=False,
            )
        )

    def service_cs(self) -> str:
        return str(
            ConnectionString(
                host_name=self.host,
                shared_access_key_name=self.owner_name,
                shared_access_key=self.owner_key,
                use_tls=False,
            )
        )


def device_id(i: int) -> str:
    return f"dev-{i}"


# -- asyncio clients (websockets) -------------------------------------------------------------


async def ws_connect(
    url: str, *, authorization: str | None = None, subprotocols: Sequence[str] = ()
) -> Any:
    """The one WebSocket client every data-plane benchmark uses (no compression, no size cap)."""
    return await websockets.asyncio.client.connect(
        url,
        additional_headers={"Authorization": authorization} if authorization else None,
        subprotocols=list(subprotocols) or None,  # type: ignore[arg-type]
        compression=None,
        max_size=None,
        open_timeout=120,
        close_timeout=10,
    )


def subprotocols_for(mode: str) -> list[str]:
    return [FRAMED] if mode == FRAMED else []


async def initiate(hub: HubInfo, sas: str, device: str, name: str, mode: str) -> tuple[str, str]:
    """The documented initiate request (plain HTTP/1.1); returns (stream URL, token)."""
    reader, writer = await asyncio.open_connection(hub.address, hub.port)
    try:
        lines = [
            f"POST /twins/{device}/streams/{name}?api-version=2020-09-30 HTTP/1.1",
            f"Host: {hub.host}",
            f"Authorization: {sas}",
            "Content-Length: 0",
            "iothub-streaming-connect-timeout-in-seconds: 120",
            "iothub-streaming-response-timeout-in-seconds: 120",
            "Connection: close",
        ]
        if mode != "raw":
            lines.append(f"devstream-stream-mode: {mode}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            if ":" in line:
                key, value = line.split(":", 1)
                headers[key.strip().lower()] = value.strip()
        status = int(status_line.split()[1])
        if status != 200 or headers.get("iothub-streaming-is-accepted") != "True":
            body = await reader.read(int(headers.get("content-length", "0") or 0))
            raise RuntimeError(f"initiate failed: {status} {body[:200]!r}")
        return headers["iothub-streaming-url"], headers["iothub-streaming-auth-token"]
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


OnRequest = Callable[[control.StreamRequest], Coroutine[Any, Any, None]]


async def run_device(
    hub: HubInfo, device: str, names: Sequence[str], on_request: OnRequest, ready: asyncio.Event
) -> None:
    """A device's control channel: register *names*, accept every stream request, and run
    ``on_request`` for each in its own task (it joins the stream)."""
    quoted = urllib.parse.quote(device, safe="")
    ws = await ws_connect(
        f"ws://{hub.host}/devices/{quoted}/streams",
        authorization=hub.device_sas(device),
        subprotocols=[control.CONTROL_SUBPROTOCOL],
    )
    tasks: set[asyncio.Task[None]] = set()
    async with ws:
        await ws.send(control.encode_message(control.Register(names=tuple(names))))
        answer = control.decode_message(await ws.recv())
        if not isinstance(answer, control.Registered):
            raise RuntimeError(f"control channel: expected Registered, got {answer!r}")
        ready.set()
        async for text in ws:
            message = control.decode_message(text)
            if isinstance(message, control.StreamRequest):
                await ws.send(
                    control.encode_message(
                        control.StreamResponse(request_id=message.request_id, accepted=True)
                    )
                )
                task = asyncio.create_task(on_request(message))
                tasks.add(task)
                task.add_done_callback(tasks.discard)


# -- channels: one data-plane side, raw or devstream.v1 ----------------------------------------


class RawChannel:
    """Raw mode: each send is one binary WebSocket message."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws

    async def send(self, data: bytes) -> None:
        await self.ws.send(data)

    async def recv(self) -> bytes:
        """The next message, ``b""`` once the peer closed."""
        try:
            data = await self.ws.recv()
        except ConnectionClosed:
            return b""
        return data if isinstance(data, bytes) else data.encode()

    async def close(self) -> None:
        await self.ws.close()


class FramedChannel:
    """devstream.v1 over the same WebSocket client: the core's StreamEndpoint makes and reads
    the frames (Data, and Acks that open the sender's window), as a FramedStream would."""

    def __init__(self, ws: Any) -> None:
        self.ws = ws
        self.endpoint = StreamEndpoint()
        self.endpoint.connection_made(resumed=False)
        self._send_lock = asyncio.Lock()
        self._readable = asyncio.Event()
        self._writable = asyncio.Event()
        self._closed = False
        self._reader = asyncio.create_task(self._read_loop())

    async def _flush(self) -> None:
        async with self._send_lock:
            while data := self.endpoint.data_to_send(FRAMED_MESSAGE_LIMIT):
                await self.ws.send(data)

    async def _read_loop(self) -> None:
        try:
            async for message in self.ws:
                self.endpoint.receive_data(message)
                self._readable.set()
                self._writable.set()
                if self.endpoint.has_output:
                    await self._flush()
        except ConnectionClosed:
            pass
        finally:
            self._closed = True
            self._readable.set()
            self._writable.set()

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            self._writable.clear()
            taken = self.endpoint.write(cast(bytes, view))  # it takes any buffer
            view = view[taken:]
            await self._flush()
            if view and self.endpoint.send_capacity == 0:
                if self._closed:
                    raise RuntimeError("the stream closed while sending")
                await self._writable.wait()

    async def recv(self) -> bytes:
        """What has arrived (waits for something), ``b""`` once the peer closed or sent EOF."""
        while True:
            self._readable.clear()
            data = self.endpoint.read()
            if data:
                if self.endpoint.has_output:
                    await self._flush()
                return data
            if self._closed or self.endpoint.at_eof:
                return b""
            await self._readable.wait()

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


Channel = RawChannel | FramedChannel


def channel(ws: Any, mode: str) -> Channel:
    return FramedChannel(ws) if mode == FRAMED else RawChannel(ws)


async def recv_exactly(ch: Channel, size: int) -> bytes:
    """Read until *size* bytes arrived (raw messages or framed bytes)."""
    out = bytearray()
    while len(out) < size:
        data = await ch.recv()
        if not data:
            raise RuntimeError(f"stream ended after {len(out)} of {size} bytes")
        out += data
    return bytes(out)


def json_line(**values: object) -> None:
    """Print one JSON line for the parent process."""
    print(json.dumps(values), flush=True)


def tiny_or(args: Any, tiny: int, full: int) -> int:
    return tiny if getattr(args, "tiny", False) else full
