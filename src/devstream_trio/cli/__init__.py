"""The ``devstream`` command line.

Every command that talks to a hub takes its connection string from ``--connection-string`` or
the ``DEVSTREAM_CONNECTION_STRING`` environment variable, and a CA file for a hub whose
certificate the system does not trust from ``--ca-file`` or ``DEVSTREAM_CA_FILE``. A user
mistake prints one line naming the problem and exits with status 1 (2 for bad arguments).

One module per group of subcommands; each has a ``register(sub)`` that adds its parsers, and
its ``cmd_*`` coroutines run under ``trio.run``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Sequence

import trio

from . import echo, hub, logs, policy, proxy, registry, sas, status
from .failures import error_line

__all__ = ["build_parser", "main", "version"]

EXAMPLE = """\
example (a hub, a device and a service, all on this machine):
  devstream hub --listen 127.0.0.1:8080 &      # then wait for "listening on"
  CS_OWNER=$(devstream connection-string)
  CS_DEVICE=$(devstream device create my-device --connection-string "$CS_OWNER")
  devstream echo device --connection-string "$CS_DEVICE" &      # then wait for "online"
  devstream echo service --device my-device --connection-string "$CS_OWNER"
  kill $!      # the echo device: one client per device id, or they push each other off

`devstream COMMAND --help` shows each command's options and an example."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="devstream",
        description="Device streams: reach a device behind a NAT via a hub.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (hub, registry, policy, sas, echo, proxy, status):
        group.register(sub)
    logs.add_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``devstream`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(args)
    try:
        return int(trio.run(args.func, args))
    except BaseException as raised:
        exc = _sole_error(raised)
        if isinstance(exc, KeyboardInterrupt):
            return 130
        line = error_line(exc)
        if line is None:
            raise  # a bug: its traceback is what a report needs
        print(f"devstream: error: {line}", file=sys.stderr)
        return 1


def version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a source tree that
    was never installed)."""
    try:
        return importlib.metadata.version("devstream")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def _sole_error(exc: BaseException) -> BaseException:
    """The one error inside nested exception groups (trio nurseries wrap what they raise)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
