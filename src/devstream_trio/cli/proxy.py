"""``devstream proxy device|service``: local TCP proxies through device streams."""

from __future__ import annotations

import argparse

import trio

from ..client.proxy import parse_forward, parse_map, serve_device_proxy, serve_service_proxy
from .options import (
    UsageError,
    client_options,
    connection_string,
    device_client,
    device_options,
    replaced_hint,
    service_client,
)


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
    async with trio.open_nursery() as nursery:
        service = service_client(args)
        service.nursery = nursery

        async def listen(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
            await serve_service_proxy(service, args.device, forwards, task_status=task_status)

        try:
            bound = await nursery.start(listen)
        except OSError as exc:
            raise UsageError(f"cannot listen: {exc.strerror or exc}") from exc
        for (host, port), forward in zip(bound, forwards, strict=True):
            print(
                f"listening on {host}:{port} -> {forward.name!r} on device {args.device!r}",
                flush=True,
            )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``proxy`` to the command line."""
    proxy = sub.add_parser("proxy", help="local TCP proxies through device streams")
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
    device_options(proxy)
    proxy.set_defaults(func=cmd_proxy)
