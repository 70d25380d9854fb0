"""``devstream proxy … --config FILE``: a proxy's settings in a TOML file.

One table per kind of proxy; a file may hold any of them, and each command reads its own::

    [device]                                   # devstream proxy device
    map = ["ssh=127.0.0.1:22", "web=127.0.0.1:80"]

    [service]                                  # devstream proxy service
    device = "my-device"
    forward = ["127.0.0.1:2222=ssh", "8088=web"]

    [stdio]                                    # devstream proxy stdio
    device = "my-device"
    name = "ssh"

Every table may also hold ``connection-string``, ``ca-file`` and ``http-proxy`` (strings, as
the flags of the same names). ``map`` and ``forward`` are lists of strings written as the
flags' values; the other keys are strings.

Precedence: a flag on the command line wins over the file, and the file over the environment
(``DEVSTREAM_CONNECTION_STRING``, ``DEVSTREAM_CA_FILE``). ``--map`` and ``--forward`` add to
the file's lists; a ``--map NAME=…`` replaces the file's entry for the same NAME, and a
``--forward`` the file's entry for the same local address and port.

The whole file is checked, every table: a file that cannot be read, is not TOML, has a table
or key not listed here, or a value of the wrong type is a user error naming the file and the
key.
"""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Callable, Sequence
from typing import Any

from ..client.proxy import parse_forward, parse_map
from .options import UsageError

__all__ = ["SCHEMA", "apply_config", "load_config"]

_COMMON = {"connection-string": str, "ca-file": str, "http-proxy": str}

#: The keys each table may hold, and their types (``list`` means a list of strings).
SCHEMA: dict[str, dict[str, type]] = {
    "device": {"map": list, **_COMMON},
    "service": {"device": str, "forward": list, **_COMMON},
    "stdio": {"device": str, "name": str, **_COMMON},
}

_PARSERS: dict[str, Callable[[str], object]] = {"map": parse_map, "forward": parse_forward}


def load_config(path: str) -> dict[str, dict[str, Any]]:
    """Read and check the config file at *path*; raise :class:`UsageError` naming the file and
    the key at fault."""
    where = f"config file {path!r}"
    try:
        with open(path, "rb") as file:
            text = file.read().decode()
    except OSError as exc:
        raise UsageError(f"{where}: cannot read it: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not TOML: it is not UTF-8 text") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{where} is not TOML: {exc}") from exc
    tables = ", ".join(f"[{name}]" for name in SCHEMA)
    for table, values in data.items():
        if table not in SCHEMA:
            raise UsageError(f"{where}: unknown key {table!r} (expected the tables {tables})")
        if not isinstance(values, dict):
            raise UsageError(f"{where}: {table} must be a table ([{table}]), not a value")
        allowed = SCHEMA[table]
        for key, value in values.items():
            if key not in allowed:
                raise UsageError(
                    f"{where}: unknown key {key!r} in [{table}] "
                    f"(expected {', '.join(sorted(allowed))})"
                )
            if allowed[key] is list:
                if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                    raise UsageError(f"{where}: [{table}] {key} must be a list of strings")
                for entry in value:
                    try:
                        _PARSERS[key](entry)
                    except ValueError as exc:
                        raise UsageError(f"{where}: [{table}] {key}: {exc}") from exc
            elif not isinstance(value, str):
                raise UsageError(f"{where}: [{table}] {key} must be a string")
    return data


def _map_key(text: str) -> object:
    return text.partition("=")[0]


def _forward_key(text: str) -> object:
    try:
        forward = parse_forward(text)
    except ValueError:
        return text  # reported when the command reads it
    return (forward.bind, forward.port)


def _merge(file: Sequence[str], flags: Sequence[str], key: Callable[[str], object]) -> list[str]:
    """The file's entries, except those a flag replaces, then the flags'."""
    replaced = {key(text) for text in flags}
    return [text for text in file if key(text) not in replaced] + list(flags)


def apply_config(args: argparse.Namespace) -> None:
    """Fill *args* from ``args.config``'s table for ``args.role`` (flags win; lists merge)."""
    if not args.config:
        return
    table = load_config(args.config).get(args.role, {})
    for key in ("connection-string", "ca-file", "http-proxy", "device", "name"):
        attr = key.replace("-", "_")
        if key in table and getattr(args, attr, None) is None:
            setattr(args, attr, table[key])
    if "map" in table:
        args.map = _merge(table["map"], args.map, _map_key)
    if "forward" in table:
        args.forward = _merge(table["forward"], args.forward, _forward_key)
