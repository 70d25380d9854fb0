"""``devstream echo`` and ``devstream demo``: the echo sample, and everything in one process."""

from __future__ import annotations

import argparse
import statistics
import time

import trio

from ..client.device import DeviceClient
from ..client.framed import FramedStream
from ..client.service import AnyStream, ServiceClient
from ..server.hub import ensure_owner_policy, serve_hub
from ..server.store import RegistryStore
from .options import (
    UsageError,
    client_options,
    connection_string,
    device_client,
    device_options,
    owner_connection_string,
    replaced_hint,
    service_client,
)


def stream_mode(stream: AnyStream) -> str:
    """How *stream* moves its bytes, for messages."""
    return "devstream.v1" if isinstance(stream, FramedStream) else "raw mode"


async def echo_handler(stream: AnyStream) -> None:
    """Send back everything received until the peer closes."""
    async for data in stream:
        await stream.send_all(data)


async def cmd_echo(args: argparse.Namespace) -> int:
    cs = connection_string(args)
    if args.role == "device":
        device = device_client(args, cs)

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            with replaced_hint():
                await device.serve({args.name: echo_handler}, task_status=task_status)

        async with trio.open_nursery() as nursery:
            await nursery.start(serve)
            print(f"device {device.device_id!r} online; echoing stream {args.name!r}", flush=True)
        return 0
    if not args.device:
        raise UsageError("`devstream echo service` needs --device ID")
    async with trio.open_nursery() as nursery:
        service = service_client(args)
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``echo`` and ``demo`` to the command line."""
    echo = sub.add_parser(
        "echo",
        help="the echo sample: a device that echoes, a service that asks",
        epilog="""\
example (CS_DEVICE from `devstream device create`, CS_OWNER from `devstream connection-string`):
  devstream echo device --connection-string "$CS_DEVICE" &      # then wait for "online"
  devstream echo service --device my-device --connection-string "$CS_OWNER"
  kill $!      # the echo device: one client per device id, or they push each other off
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    echo.add_argument("role", choices=["device", "service"])
    echo.add_argument("--device", help="device id (service side)")
    echo.add_argument("--message", default="hello from the service")
    echo.add_argument("--name", default="echo", help="stream name (default %(default)s)")
    echo.add_argument("--raw", action="store_true", help="raw mode (Azure) instead of devstream.v1")
    client_options(echo)
    device_options(echo)
    echo.set_defaults(func=cmd_echo)

    demo = sub.add_parser(
        "demo",
        help="run a hub, a device and a service in one process",
        epilog="example (nothing to set up; it prints each step):\n  devstream demo",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.set_defaults(func=cmd_demo)
