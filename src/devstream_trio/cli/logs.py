"""How ``devstream`` logs: ``--log-level`` and ``--log-format``, before or after the subcommand.

``--log-format text`` (the default) writes ``TIME LEVEL LOGGER: MESSAGE`` lines;
``--log-format json`` writes one JSON object per line with ``time`` (UTC, ISO 8601),
``level``, ``logger`` and ``message``, plus the structured fields the record carries (the
hub's ``event``, ``device_id``, ``stream_id``, byte counts, ...: what a caller passed as
``extra=``). ``devstream hub`` logs at ``info`` unless told otherwise, every other command at
``warning``: a hub's info lines are its operator's record of who came and went.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import sys
from typing import Any

__all__ = [
    "LOG_FORMATS",
    "LOG_LEVELS",
    "TEXT_FORMAT",
    "JsonFormatter",
    "add_options",
    "configure",
    "set_default_level",
]

LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
#: The line of ``--log-format text``.
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: The level of a command that does not say (see :func:`set_default_level`).
_DEFAULT_LEVEL = "warning"

#: The attributes every :class:`logging.LogRecord` has; any other is an ``extra=`` field.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time``, ``level``, ``logger``, ``message``, then the
    record's ``extra=`` fields (values JSON cannot hold are written as their ``str``), and
    ``exception`` when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


def _add(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # After the subcommand, an option that was not given must not overwrite the one given
    # before it (argparse copies a subparser's defaults over the parent's values).
    default: Any = None if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-level",
        default=default,
        choices=LOG_LEVELS,
        help="what to log (default: info for `devstream hub`, else warning)",
    )
    parser.add_argument(
        "--log-format",
        default=default,
        choices=LOG_FORMATS,
        help="text lines, or one JSON object per line (default: text)",
    )


def add_options(parser: argparse.ArgumentParser) -> None:
    """Accept ``--log-level`` and ``--log-format`` on *parser* and on each of its
    subcommands, at every depth (call once they are all added)."""
    _add(parser, top=True)
    pending = [parser]
    while pending:
        for action in pending.pop()._actions:
            if isinstance(action, argparse._SubParsersAction):
                for subparser in dict.fromkeys(action.choices.values()):
                    _add(subparser, top=False)
                    pending.append(subparser)


def set_default_level(parser: argparse.ArgumentParser, level: str) -> None:
    """The log level of this subcommand when ``--log-level`` is not given."""
    parser.set_defaults(default_log_level=level)


def configure(args: argparse.Namespace, stream: Any = None) -> None:
    """Set up the root logger as *args* say (``--log-level``, ``--log-format``), writing to
    *stream* (standard error by default)."""
    level = args.log_level or getattr(args, "default_log_level", _DEFAULT_LEVEL)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    if args.log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    # Like basicConfig: a program (or a test) that set up logging already keeps its own.
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
