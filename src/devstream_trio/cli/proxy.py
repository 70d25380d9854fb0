"""``devstream proxy device|service``: local TCP proxies through device streams."""

from __future__ import annotations

import argparse
import errno
from collections.abc import Sequence

import trio

from ..client.proxy import (
    Forward,
    parse_forward,
    parse_map,
    serve_device_proxy,
    serve_service_proxy,
)
from .failures import listen_hint
from .options import UsageError, client_options, connection_string, device_client, service_client


async def cmd_proxy(args: argparse.Namespace) -> int:
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
        help="local TCP proxies through device streams",
        epilog="""\
example: SSH to a device (one `proxy device` per device id; repeat --map for more names)
  on the device:   devstream proxy device --map ssh=127.0.0.1:22 --connection-string "$CS_DEVICE"
  on your machine: devstream proxy service --device my-device --forward 2222=ssh \\
                       --connection-string "$CS_OWNER"
                   ssh -p 2222 user@127.0.0.1""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    proxy.add_argument("role", choices=["device", "service"])
    proxy.add_argument(
        "--map",
        action="append",
        default=[],
        metavar="NAME=HOST:PORT",
        help="device side: send streams named NAME to HOST:PORT (repeatable)",
    )
    proxy.add_argument("--device", help="service side: the device id")
    proxy.add_argument(
        "--forward",
        action="append",
        default=[],
        metavar="[BIND:]LOCALPORT=NAME",
        help="service side: listen on LOCALPORT, one stream NAME per connection (repeatable)",
    )
    client_options(proxy)
    proxy.set_defaults(func=cmd_proxy)
