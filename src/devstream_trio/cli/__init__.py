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
import sys
from collections.abc import Sequence

import trio

from devstream_core.errors import DevstreamError

from . import echo, hub, logs, proxy, registry, status
from .options import UsageError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="devstream", description="Device streams: reach a device behind a NAT via a hub."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for group in (hub, registry, echo, proxy, status):
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
