"""Helpers shared by the tests that run real hubs, the command line and child processes.

Everything here listens on or connects to 127.0.0.1 only. Nothing waits on time: readers wait
for output lines, servers report their port once they listen.
"""

from __future__ import annotations

import atexit
import importlib.util
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType

import trio

from devstream_core.credentials import ConnectionString
from devstream_core.registry import Policy
from devstream_core.streamdriver import StreamPhase
from devstream_trio.cli import main
from devstream_trio.client.framed import FramedStream
from devstream_trio.server.hub import Hub, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore

# -- ports, hubs and TCP servers --------------------------------------------------------------


#: The sockets that hold the ports :func:`refused_port` handed out, for the tests' lifetime.
_HELD: list[socket.socket] = []


@atexit.register
def _release_held_ports() -> None:
    for sock in _HELD:
        sock.close()


def refused_port() -> int:
    """A loopback port where a connection is refused, for as long as the tests run: a socket
    is bound to it and never listens, so no other program (another test worker's server, say)
    can take the port meanwhile, as it could one of :func:`free_port`'s."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    _HELD.append(sock)
    port: int = sock.getsockname()[1]
    return port


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released), for a server to bind: another
    program may take it first. A test that only needs a connection refused uses
    :func:`refused_port`."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def policy_cs(host_name: str, policy: Policy) -> ConnectionString:
    """A service connection string for *policy* reaching the hub at *host_name* over plain HTTP."""
    return ConnectionString(
        host_name=host_name,
        shared_access_key_name=policy.name,
        shared_access_key=policy.primary_key,
        use_tls=False,
    )


async def start_hub(nursery: trio.Nursery, store: RegistryStore) -> tuple[Hub, ConnectionString]:
    """A hub on 127.0.0.1, port 0, serving *store* in *nursery*; with its owner's string."""
    owner, _ = await ensure_owner_policy(store)
    hub: Hub = await nursery.start(partial(serve_hub, store, host="127.0.0.1", port=0))
    return hub, policy_cs(hub.host_name, owner)


async def start_tcp_server(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> int:
    """Serve *handler* on 127.0.0.1, port 0, in *nursery*; return the port it bound."""
    listeners: list[trio.SocketListener] = await nursery.start(
        partial(trio.serve_tcp, handler, 0, host="127.0.0.1")
    )
    port: int = listeners[0].socket.getsockname()[1]
    return port


async def closed_promptly(port: int, within: float) -> bytes:
    """Connect to 127.0.0.1:*port*, send a little, and return what arrives before the other end
    closes the connection (EOF or reset), which must happen within *within* seconds."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    received = bytearray()
    with trio.fail_after(within):
        try:
            await tcp.send_all(b"anyone there?\n")
            async for chunk in tcp:
                received += chunk
        except trio.BrokenResourceError:
            pass  # a reset is as good as an EOF here
    await tcp.aclose()
    return bytes(received)


# -- child processes --------------------------------------------------------------------------


class Output:
    """The merged stdout/stderr of a child process, read line by line and kept in ``lines``."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self._stream = stream
        self._buffer = b""
        self.lines: list[str] = []

    async def readline(self) -> str:
        """The next line; fail if the program exits first."""
        while b"\n" not in self._buffer:
            chunk = await self._stream.receive_some()
            if not chunk:
                raise AssertionError(f"child exited; unread output {self._buffer!r}: {self.lines}")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(b"\n")
        line = raw.decode(errors="replace")
        self.lines.append(line)
        return line

    async def until(self, match: str | Callable[[str], bool]) -> str:
        """The first line from here on that contains *match* (a string) or satisfies it."""
        while True:
            line = await self.readline()
            if match(line) if callable(match) else match in line:
                return line

    async def drain(self) -> None:
        """Keep reading (so the program never blocks on a full pipe) until it exits."""
        async for chunk in self._stream:
            self._buffer += chunk
            *complete, rest = self._buffer.split(b"\n")
            self.lines += [line.decode(errors="replace") for line in complete]
            self._buffer = rest


async def start_process(
    nursery: trio.Nursery, argv: Sequence[str], env: dict[str, str] | None = None
) -> tuple[trio.Process, Output]:
    """Start *argv* in *nursery* (killed when it is cancelled), stdout and stderr merged."""
    process: trio.Process = await nursery.start(
        lambda task_status: trio.run_process(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
            task_status=task_status,
        )
    )
    assert process.stdout is not None
    return process, Output(process.stdout)


async def start_child(
    nursery: trio.Nursery, argv: Sequence[str], env: dict[str, str] | None = None
) -> tuple[trio.Process, Output]:
    """``devstream ARGV`` as a child process, stdout and stderr merged."""
    return await start_process(nursery, [sys.executable, "-m", "devstream_trio.cli", *argv], env)


# -- the command line in this process ---------------------------------------------------------


async def run_cli(argv: Sequence[str]) -> int:
    """``devstream ARGV`` in a worker thread (it runs its own trio loop)."""
    return await trio.to_thread.run_sync(main, list(argv))


def one_error_line(err: str) -> str:
    """The single ``devstream: error:`` line a user mistake prints."""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("devstream: error: "), err
    return lines[0]


# -- fuzz harnesses ----------------------------------------------------------------------------

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"


def load_fuzz_harness(name: str) -> ModuleType:
    """The harness ``fuzz/<name>.py``, loaded by its path (``fuzz/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_devstream_{name}", FUZZ_DIR / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_checking_harness(harness: ModuleType, *, at_least: int) -> str:
    """Run a checking fuzz harness (one with an ``ACCEPTED`` counter) through its fallback
    loop and its command line; assert the loop checked at least *at_least* cases and the
    command line passed; return what the command line printed."""
    import contextlib
    import io

    accepted = harness.ACCEPTED[0]
    harness.run_fallback(2000, seed=1)
    assert harness.ACCEPTED[0] - accepted >= at_least
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert harness.main(["--iterations", "200", "--seed", "2"]) == 0
    assert "ok: " in out.getvalue()
    return out.getvalue()


async def until_closed(stream: FramedStream, step: float = 0.001) -> None:
    """Wait, polling every *step* seconds of (virtual) time, until *stream* is closed:
    nothing more travels and its WebSocket is let go."""
    while stream.phase is not StreamPhase.CLOSED:
        await trio.sleep(step)
