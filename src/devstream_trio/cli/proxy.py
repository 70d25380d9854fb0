"""``devstream proxy device|service|stdio``: local proxies through device streams.

``proxy stdio`` joins one stream to standard input and output, for OpenSSH's
``ProxyCommand``; it writes nothing else to standard output. ``--config FILE`` reads a
proxy's settings from a TOML file (see :mod:`.config`).
"""

from __future__ import annotations

import argparse
import errno
import signal
from collections.abc import Sequence

import trio

from ..client.proxy import (
    Forward,
    StdioError,
    parse_forward,
    parse_map,
    serve_device_proxy,
    serve_service_proxy,
    serve_stdio,
)
from ..client.stdio import open_standard_streams
from .config import apply_config
from .failures import listen_hint
from .options import (
    UsageError,
    client_options,
    connection_string,
    device_client,
    device_options,
    replaced_hint,
    service_client,
)


async def cmd_stdio(args: argparse.Namespace) -> int:
    """One stream joined to standard input and output; 0 when both directions ended."""
    if not args.device or not args.name:
        raise UsageError("`devstream proxy stdio` needs --device ID and --name NAME")
    # OpenSSH hangs up on its ProxyCommand (SIGHUP) as it exits: the stream is then closed
    # properly rather than dropped, so the device's end is not left waiting for a resume.
    hangup = trio.Event()
    with trio.open_signal_receiver(signal.SIGHUP) as signals:

        async def on_hangup() -> None:
            async for _ in signals:
                hangup.set()

        async with trio.open_nursery() as nursery:
            service = service_client(args)
            service.nursery = nursery
            async with trio.open_nursery() as watcher:
                watcher.start_soon(on_hangup)
                try:
                    async with open_standard_streams() as (stdin, stdout):
                        await serve_stdio(
                            service, args.device, args.name, stdin, stdout, hangup=hangup
                        )
                except StdioError as exc:
                    raise UsageError(str(exc)) from exc
                except OSError as exc:
                    raise UsageError(f"standard input or output: {exc.strerror or exc}") from exc
                watcher.cancel_scope.cancel()
    return 0


async def cmd_proxy(args: argparse.Namespace) -> int:
    apply_config(args)
    if args.role == "stdio":
        return await cmd_stdio(args)
    cs = connection_string(args)
    if args.role == "device":
        if not args.map:
            raise UsageError("`devstream proxy device` needs at least one --map NAME=HOST:PORT")
        try:
            targets = [parse_map(text) for text in args.map]
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        device = device_client(args, cs)

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with replaced_hint():
                await serve_device_proxy(device, targets, task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            mapping = ", ".join(f"{t.name} -> {t.host}:{t.port}" for t in targets)
            print(f"device {device.device_id!r} online; forwarding {mapping}", flush=True)
        return 0
    if not args.device or not args.forward:
        raise UsageError(
            "`devstream proxy service` needs --device ID and at least one "
            "--forward [BIND:]LOCALPORT=NAME"
        )
    try:
        forwards = [parse_forward(text) for text in args.forward]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    check_local_ports(forwards)
    async with trio.open_nursery() as nursery:
        service = service_client(args)
        service.nursery = nursery

        async def listen(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            await serve_service_proxy(service, args.device, forwards, task_status=task_status)

        try:
            bound = await nursery.start(listen)
        except OSError as exc:
            hint = listen_hint(exc.errno)
            hint = f"{hint} in --forward" if exc.errno == errno.EADDRINUSE else hint
            raise UsageError(f"{exc.strerror or exc}" + (f"; {hint}" if hint else "")) from exc
        for (host, port), forward in zip(bound, forwards, strict=True):
            print(
                f"listening on {host}:{port} -> {forward.name!r} on device {args.device!r}",
                flush=True,
            )
    return 0


def check_local_ports(forwards: Sequence[Forward]) -> None:
    """Two forwards may not listen on one local port (port 0, any free one, excepted)."""
    seen: dict[tuple[str, int], Forward] = {}
    for forward in forwards:
        key = (forward.bind, forward.port)
        first = seen.setdefault(key, forward)
        if forward.port and first is not forward:
            raise UsageError(
                f"--forward {forward.port}={first.name} and --forward {forward.port}="
                f"{forward.name} both listen on {forward.bind}:{forward.port}: give each "
                "forward a LOCALPORT of its own"
            )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``proxy`` to the command line."""
    proxy = sub.add_parser(
        "proxy",
        help="local proxies through device streams",
        description="device: serve stream names from local targets; service: listen on local "
        "ports, one stream per connection; stdio: one stream on standard input and output",
        epilog="""\
example: SSH to a device (one `proxy device` per device id; repeat --map for more names)
  on the device:   devstream proxy device --map ssh=127.0.0.1:22 --connection-string "$CS_DEVICE"
  on your machine: devstream proxy service --device my-device --forward 2222=ssh \\
                       --connection-string "$CS_OWNER"
                   ssh -p 2222 user@127.0.0.1
  or, with no local port:
                   ssh -o ProxyCommand='devstream proxy stdio --device %h --name ssh' \\
                       user@my-device""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.add_argument("role", choices=["device", "service", "stdio"])
    proxy.add_argument(
        "--config",
        metavar="FILE",
        help="read settings from the [device], [service] or [stdio] table of this TOML file "
        "(flags win; --map and --forward add to its lists)",
    )
    proxy.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="device side: send streams named NAME to HOST:PORT (repeatable)",
    )
    proxy.add_argument("--device", help="service and stdio: the device id")
    proxy.add_argument("--name", help="stdio: the stream name to open (as the device's --map)")
    proxy.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="[BIND:]LOCALPORT=NAME",
        help="service side: listen on LOCALPORT, one stream NAME per connection (repeatable)",
    )
    client_options(proxy)
    device_options(proxy)
    proxy.set_defaults(func=cmd_proxy)
