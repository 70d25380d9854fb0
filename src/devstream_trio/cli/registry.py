"""``devstream device …``: the device registry, through the hub's registry API."""

from __future__ import annotations

import argparse
from typing import Any

from .options import UsageError, client_options, service_client


def print_device(device: dict[str, Any]) -> None:
    keys = device.get("authentication", {}).get("symmetricKey", {})
    print(f"deviceId:        {device.get('deviceId')}")
    print(f"status:          {device.get('status')}")
    print(f"connectionState: {device.get('connectionState')}")
    print(f"primaryKey:      {keys.get('primaryKey')}")
    print(f"secondaryKey:    {keys.get('secondaryKey')}")


async def cmd_device(args: argparse.Namespace) -> int:
    service = service_client(args)
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
        print_device(await service.get_device(args.id))
    elif args.action == "delete":
        await service.delete_device(args.id)
        print(f"deleted device {args.id!r}")
    elif args.action in ("disable", "enable"):
        await service.set_device_status(args.id, f"{args.action}d")
        print(f"device {args.id!r} {args.action}d")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``device`` to the command line."""
    device = sub.add_parser(
        "device",
        help="manage the device registry",
        epilog="""\
examples (CS_OWNER: the output of `devstream connection-string`):
  CS_DEVICE=$(devstream device create my-device --connection-string "$CS_OWNER")
  devstream device show my-device --connection-string "$CS_OWNER"
""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    device.add_argument("action", choices=["create", "show", "list", "delete", "disable", "enable"])
    device.add_argument("id", nargs="?")
    client_options(device)
    device.set_defaults(func=cmd_device)
