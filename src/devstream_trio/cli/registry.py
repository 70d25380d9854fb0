"""``devstream device …``: the device registry, through the hub's registry API."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import Any

from .options import UsageError, client_options, service_client

EXAMPLES = """examples (CS_OWNER: the output of `devstream connection-string`):
  CS_DEVICE=$(devstream device create my-device --connection-string "$CS_OWNER")
  devstream device show my-device --connection-string "$CS_OWNER"
  devstream device list --json
  devstream device connection-string my-device
  devstream device rotate-key my-device        # a new primary key; the old one stops working
"""


def print_device(device: dict[str, Any]) -> None:
    keys = device.get("authentication", {}).get("symmetricKey", {})
    print(f"deviceId:        {device.get('deviceId')}")
    print(f"status:          {device.get('status')}")
    print(f"connectionState: {device.get('connectionState')}")
    print(f"primaryKey:      {keys.get('primaryKey')}")
    print(f"secondaryKey:    {keys.get('secondaryKey')}")


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """*rows* under *header*, in columns two spaces apart (the last one not padded)."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header) - 1)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        print("  ".join([*cells, row[-1]]))


def print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


async def cmd_device(args: argparse.Namespace) -> int:
    service = service_client(args)
    if args.action == "list":
        devices = await service.list_devices()
        if args.json:
            print_json(devices)
        else:
            print_table(
                ("DEVICE ID", "STATUS", "CONNECTION"),
                [(d["deviceId"], d["status"], d["connectionState"]) for d in devices],
            )
        return 0
    if not args.id:
        raise UsageError(f"`devstream device {args.action}` needs a device id")
    if args.action == "create":
        device = await service.create_device(args.id)
        print(service.device_connection_string(device))
    elif args.action == "show":
        device = await service.get_device(args.id)
        if args.json:
            print_json(device)
        else:
            print_device(device)
    elif args.action == "connection-string":
        device = await service.get_device(args.id)
        print(service.device_connection_string(device, secondary=args.secondary))
    elif args.action == "rotate-key":
        device = await service.rotate_device_key(args.id, secondary=args.secondary)
        print(service.device_connection_string(device, secondary=args.secondary))
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
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    device.add_argument(
        "action",
        choices=[
            "create",
            "show",
            "list",
            "delete",
            "disable",
            "enable",
            "connection-string",
            "rotate-key",
        ],
        help="connection-string prints the device's connection string; rotate-key gives it a "
        "new key (its old key stops working, and its agent is disconnected) and prints the "
        "new connection string",
    )
    device.add_argument("id", nargs="?")
    device.add_argument(
        "--json", action="store_true", help="list, show: print the hub's JSON instead of a table"
    )
    device.add_argument(
        "--secondary",
        action="store_true",
        help="connection-string, rotate-key: the secondary key instead of the primary",
    )
    client_options(device)
    device.set_defaults(func=cmd_device)
