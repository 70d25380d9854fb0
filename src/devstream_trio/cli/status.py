"""``devstream status``: the devices online and the streams open at a hub (``GET /streams``)."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .options import client_options, service_client

__all__ = ["cmd_status", "register"]


def _duration(seconds: float) -> str:
    """``42s``, ``3m07s``, ``2h05m``, ``3d04h``."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]


def render(status: dict[str, Any]) -> str:
    """The text ``devstream status`` prints for a ``GET /streams`` answer."""
    devices = status.get("devices", [])
    streams = status.get("streams", [])
    lines = [f"devices online: {len(devices)}"]
    if devices:
        lines += _table(
            ["DEVICE", "ADDRESS", "ONLINE"],
            [
                [str(d["deviceId"]), str(d["address"]), _duration(d["onlineSeconds"])]
                for d in devices
            ],
        )
    lines.append(f"streams open: {len(streams)}")
    if streams:
        lines += _table(
            ["STREAM", "DEVICE", "NAME", "MODE", "STATE", "AGE", "TO DEVICE", "TO SERVICE"],
            [
                [
                    str(s["streamId"]),
                    str(s["deviceId"]),
                    str(s["name"]) or "-",
                    str(s["mode"]),
                    str(s["state"]),
                    _duration(s["ageSeconds"]),
                    str(s["bytesToDevice"]),
                    str(s["bytesToService"]),
                ]
                for s in streams
            ],
        )
    return "\n".join(lines)


async def cmd_status(args: argparse.Namespace) -> int:
    status = await service_client(args).list_streams()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(render(status))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``status`` to the command line."""
    status = sub.add_parser(
        "status",
        help="devices online and streams open at the hub (needs RegistryRead)",
        description="Show the devices online and the streams open at the hub, with each "
        "stream's device, name, mode, age and bytes each way (GET /streams; the policy "
        'needs RegistryRead). Example: devstream status --connection-string "$CS_OWNER"',
    )
    status.add_argument("--json", action="store_true", help="print the hub's JSON answer")
    client_options(status)
    status.set_defaults(func=cmd_status)
