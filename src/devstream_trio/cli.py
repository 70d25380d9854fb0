"""The ``devstream`` command line.

Every command that talks to a hub takes its connection string from ``--connection-string`` or
the ``DEVSTREAM_CONNECTION_STRING`` environment variable, and a CA file for a hub whose
certificate the system does not trust from ``--ca-file`` or ``DEVSTREAM_CA_FILE``. A user
mistake prints one line naming the problem and exits with status 1 (2 for bad arguments).
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio

from devstream_core.credentials import ConnectionString
from devstream_core.errors import DevstreamError
from devstream_core.registry import OWNER_POLICY, Policy

from .client.device import DeviceClient
from .client.framed import FramedStream
from .client.proxy import parse_forward, parse_map, serve_device_proxy, serve_service_proxy
from .client.service import SAS_LIFETIME, AnyStream, ServiceClient
from .server.datafolder import DB_NAME, open_data_folder
from .server.hub import (
    HubConfig,
    ensure_owner_policy,
    raise_open_files_limit,
    serve_hub,
    tune_gc_for_hub,
)
from .server.store import RegistryStore
from .transport.connect import ProxyConfig, client_ssl_context

__all__ = ["main"]


class UsageError(Exception):
    """A mistake in how the command was called; printed as one line."""


def default_data_dir() -> Path:
    """``$DEVSTREAM_DATA``, else ``$XDG_DATA_HOME/devstream``, else ``~/.local/share/devstream``."""
    if os.environ.get("DEVSTREAM_DATA"):
        return Path(os.environ["DEVSTREAM_DATA"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "devstream"


def owner_connection_string(policy: Policy, public_url: str) -> ConnectionString:
    """The service connection string of *policy* for a hub reached at *public_url*."""
    tls = public_url.startswith("https://")
    host = public_url.split("://", 1)[1].rstrip("/")
    return ConnectionString(
        host_name=host,
        shared_access_key_name=policy.name,
        shared_access_key=policy.primary_key,
        use_tls=tls,
    )


def _parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _connection_string(args: argparse.Namespace) -> ConnectionString:
    text = args.connection_string or os.environ.get("DEVSTREAM_CONNECTION_STRING")
    if not text:
        raise UsageError(
            "no connection string: pass --connection-string or set DEVSTREAM_CONNECTION_STRING"
        )
    return ConnectionString.parse(text)


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    ca_file = args.ca_file or os.environ.get("DEVSTREAM_CA_FILE")
    if ca_file:
        if not Path(ca_file).is_file():
            raise UsageError(f"CA file {ca_file!r} does not exist")
        return client_ssl_context(ca_file)
    return None


# -- hub --------------------------------------------------------------------------------------


async def cmd_hub(args: argparse.Namespace) -> int:
    host, port = _parse_listen(args.listen)
    ssl_context = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load the TLS certificate or key: {exc}") from exc
    if args.public_url and not args.public_url.startswith(("http://", "https://")):
        raise UsageError("--public-url must start with http:// or https://")
    data = Path(args.data) if args.data else default_data_dir()
    tune_gc_for_hub()
    raise_open_files_limit()
    async with open_data_folder(data) as store:
        policy, created = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            try:
                hub = await nursery.start(
                    lambda task_status: serve_hub(
                        store,
                        host=host,
                        port=port,
                        public_url=args.public_url,
                        ssl_context=ssl_context,
                        config=HubConfig(max_sas_lifetime=args.max_sas_lifetime),
                        task_status=task_status,
                    )
                )
            except OSError as exc:
                raise UsageError(f"cannot listen on {args.listen}: {exc.strerror}") from exc
            await store.set_setting("public_url", hub.public_url.encode())
            listen_host, listen_port = hub.listen_address or (host, port)
            print(
                f"devstream hub listening on {listen_host}:{listen_port}; "
                f"clients reach it at {hub.public_url}",
                flush=True,
            )
            print(f"data folder: {data}", flush=True)
            if created:
                cs = owner_connection_string(policy, hub.public_url)
                print(
                    "first start: created the owner policy. Its service connection string "
                    "(shown once; `devstream connection-string` shows it again):",
                    flush=True,
                )
                print(cs, flush=True)
    return 0


async def cmd_connection_string(args: argparse.Namespace) -> int:
    data = Path(args.data) if args.data else default_data_dir()
    if not (data / DB_NAME).exists():
        raise UsageError(f"no hub data in {str(data)!r}: run `devstream hub` first")
    async with await RegistryStore.open(data / DB_NAME) as store:
        policy = await store.get_policy(OWNER_POLICY)
        stored_url = await store.get_setting("public_url")
    url = args.public_url or (stored_url.decode() if stored_url else None)
    if policy is None or url is None:
        raise UsageError(f"the hub in {str(data)!r} has not started yet: run `devstream hub`")
    print(owner_connection_string(policy, url))
    return 0


# -- registry ---------------------------------------------------------------------------------


def _service(args: argparse.Namespace) -> ServiceClient:
    cs = _connection_string(args)
    if cs.device_id is not None:
        raise UsageError("this command needs a service connection string, not a device's")
    return ServiceClient(
        cs,
        ssl_context=_ssl_context(args),
        http_proxy=_http_proxy(args),
        sas_lifetime=args.sas_lifetime,
    )


def _http_proxy(args: argparse.Namespace) -> str | None:
    proxy: str | None = args.http_proxy
    if proxy is not None:
        try:
            ProxyConfig.from_url(proxy)
        except DevstreamError as exc:
            raise UsageError(f"--http-proxy: {exc.message}") from exc
    return proxy


def _device(args: argparse.Namespace, cs: ConnectionString) -> DeviceClient:
    if cs.device_id is None:
        raise UsageError("this command needs a device connection string, not a service's")
    return DeviceClient(
        cs,
        ssl_context=_ssl_context(args),
        http_proxy=_http_proxy(args),
        sas_lifetime=args.sas_lifetime,
    )


def _print_device(device: dict[str, Any]) -> None:
    keys = device.get("authentication", {}).get("symmetricKey", {})
    print(f"deviceId:        {device.get('deviceId')}")
    print(f"status:          {device.get('status')}")
    print(f"connectionState: {device.get('connectionState')}")
    print(f"primaryKey:      {keys.get('primaryKey')}")
    print(f"secondaryKey:    {keys.get('secondaryKey')}")


async def cmd_device(args: argparse.Namespace) -> int:
    service = _service(args)
    if args.action == "list":
        for device in await service.list_devices():
            print(f"{device['deviceId']}\t{device['status']}\t{device['connectionState']}")
        return 0
    if not args.id:
        raise UsageError(f"`devstream device {args.action}` needs a device id")
    if args.action == "create":
        device = await service.create_device(args.id)
        print(service.device_connection_string(device))
    elif args.action == "show":
        _print_device(await service.get_device(args.id))
    elif args.action == "delete":
        await service.delete_device(args.id)
        print(f"deleted device {args.id!r}")
    elif args.action in ("disable", "enable"):
        await service.set_device_status(args.id, f"{args.action}d")
        print(f"device {args.id!r} {args.action}d")
    return 0


# -- echo -------------------------------------------------------------------------------------


def stream_mode(stream: AnyStream) -> str:
    """How *stream* moves its bytes, for messages."""
    return "devstream.v1" if isinstance(stream, FramedStream) else "raw mode"


async def echo_handler(stream: AnyStream) -> None:
    """Send back everything received until the peer closes."""
    async for data in stream:
        await stream.send_all(data)


async def cmd_echo(args: argparse.Namespace) -> int:
    cs = _connection_string(args)
    if args.role == "device":
        device = _device(args, cs)

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            await device.serve({args.name: echo_handler}, task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            print(f"device {device.device_id!r} online; echoing stream {args.name!r}", flush=True)
        return 0
    if not args.device:
        raise UsageError("`devstream echo service` needs --device ID")
    async with trio.open_nursery() as nursery:
        service = _service(args)
        service.nursery = nursery
        mode = "raw" if args.raw else None
        stream = await service.open_stream(args.device, args.name, mode=mode)
        async with stream:
            message = args.message.encode()
            started = time.perf_counter()
            await stream.send_all(message)
            if not args.raw:
                await stream.send_eof()  # half-close: the echo still comes back
            received = bytearray()
            while len(received) < len(message):
                chunk = await stream.receive_some()
                if not chunk:
                    break
                received += chunk
            elapsed = time.perf_counter() - started
    print(f"received: {received.decode(errors='replace')}")
    print(f"round trip: {elapsed * 1000:.2f} ms")
    return 0 if bytes(received) == message else 1


# -- proxies ----------------------------------------------------------------------------------


async def cmd_proxy(args: argparse.Namespace) -> int:
    cs = _connection_string(args)
    if args.role == "device":
        if not args.map:
            raise UsageError("`devstream proxy device` needs at least one --map NAME=HOST:PORT")
        try:
            targets = [parse_map(text) for text in args.map]
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        device = _device(args, cs)

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
    async with trio.open_nursery() as nursery:
        service = _service(args)
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


# -- demo -------------------------------------------------------------------------------------


async def cmd_demo(args: argparse.Namespace) -> int:
    del args
    store = await RegistryStore.open(None)
    async with store, trio.open_nursery() as nursery:
        policy, _ = await ensure_owner_policy(store)
        hub = await nursery.start(serve_hub, store)
        print(f"1. hub listening at {hub.public_url} (throwaway in-memory registry)")
        service = ServiceClient(owner_connection_string(policy, hub.public_url), nursery=nursery)
        device_json = await service.create_device("demo-device")
        device_cs = service.device_connection_string(device_json)
        print("2. registered device 'demo-device' through the registry API")
        device = DeviceClient(device_cs)

        async def serve_device(task_status: trio.TaskStatus[None]) -> None:
            await device.serve({"echo": echo_handler}, task_status=task_status)

        await nursery.start(serve_device)
        print("3. device connected its control channel and registered stream name 'echo'")
        started = time.perf_counter()
        stream = await service.open_stream("demo-device", "echo")
        setup = time.perf_counter() - started
        print(
            f"4. service initiated a stream; device accepted; both sides joined "
            f"({setup * 1000:.1f} ms)"
        )
        times = []
        async with stream:
            for i in range(20):
                message = f"hello device #{i}".encode()
                started = time.perf_counter()
                await stream.send_all(message)
                received = b""
                while len(received) < len(message):
                    received += await stream.receive_some()
                times.append(time.perf_counter() - started)
                if received != message:
                    print(f"echo mismatch: sent {message!r}, received {received!r}")
                    return 1
            await stream.send_eof()
            rest = await stream.receive_some()
        print(
            f"5. echoed 20 messages over {stream_mode(stream)}: round trip median "
            f"{statistics.median(times) * 1000:.2f} ms, first {times[0] * 1000:.2f} ms"
        )
        print(f"6. half-closed the service side; the device's echo ended too (read {rest!r} = EOF)")
        print("demo finished: hub, device and service all worked")
        nursery.cancel_scope.cancel()
    return 0


# -- main -------------------------------------------------------------------------------------


def _seconds(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of seconds, at least *minimum*."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of seconds >= {minimum}")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="devstream", description="Device streams: reach a device behind a NAT via a hub."
    )
    parser.add_argument(
        "--log-level", default="warning", choices=["debug", "info", "warning", "error"]
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def client_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connection-string", help="or set DEVSTREAM_CONNECTION_STRING")
        p.add_argument("--ca-file", help="CA bundle to verify the hub (or DEVSTREAM_CA_FILE)")
        p.add_argument(
            "--http-proxy",
            help="reach the hub through this HTTP CONNECT proxy, http://[user:pass@]host:port "
            "(default: $HTTPS_PROXY, honouring $NO_PROXY)",
        )
        p.add_argument(
            "--sas-lifetime",
            type=_seconds(2),
            default=SAS_LIFETIME,
            metavar="SECONDS",
            help="how long the SAS tokens it signs live (default %(default)s; at most the "
            "hub's --max-sas-lifetime)",
        )

    hub = sub.add_parser("hub", help="run a hub")
    hub.add_argument(
        "--data", help="data folder (default: $DEVSTREAM_DATA or ~/.local/share/devstream)"
    )
    hub.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    hub.add_argument("--public-url", help="address clients use, e.g. https://hub.example.com")
    hub.add_argument("--tls-cert", help="certificate chain (PEM) to serve https/wss")
    hub.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    hub.add_argument(
        "--max-sas-lifetime",
        type=_seconds(1),
        metavar="SECONDS",
        help="refuse SAS tokens that expire further out than this (default: no limit; "
        f"devstream's clients sign for {SAS_LIFETIME} s unless given --sas-lifetime)",
    )
    hub.set_defaults(func=cmd_hub)

    cs = sub.add_parser("connection-string", help="print the hub's owner connection string")
    cs.add_argument("--data")
    cs.add_argument("--public-url", help="print it for this address instead")
    cs.set_defaults(func=cmd_connection_string)

    device = sub.add_parser("device", help="manage the device registry")
    device.add_argument("action", choices=["create", "show", "list", "delete", "disable", "enable"])
    device.add_argument("id", nargs="?")
    client_options(device)
    device.set_defaults(func=cmd_device)

    echo = sub.add_parser("echo", help="the echo sample: a device that echoes, a service that asks")
    echo.add_argument("role", choices=["device", "service"])
    echo.add_argument("--device", help="device id (service side)")
    echo.add_argument("--message", default="hello from the service")
    echo.add_argument("--name", default="echo", help="stream name (default %(default)s)")
    echo.add_argument("--raw", action="store_true", help="raw mode (Azure) instead of devstream.v1")
    client_options(echo)
    echo.set_defaults(func=cmd_echo)

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
    proxy.set_defaults(func=cmd_proxy)

    demo = sub.add_parser("demo", help="run a hub, a device and a service in one process")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devstream`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(trio.run(args.func, args))
    except BaseException as raised:
        exc = _sole_error(raised)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, UsageError):
            print(f"devstream: error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, DevstreamError):
            print(f"devstream: error: {exc.message} (error {int(exc.code)})", file=sys.stderr)
            return 1
        raise


def _sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups (trio nurseries wrap what they raise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
