"""How the command line turns what went wrong into its one ``devstream: error:`` line.

A user's mistake (a usage error, an error devstream reports with a code, and an ``OSError`` or
``ssl.SSLError`` from the system: a port in use, a file that cannot be read, a file that is not
a certificate) becomes one line with a hint where a reasonable one exists. Anything else is a
bug in devstream, and keeps its traceback.
"""

from __future__ import annotations

import errno
import ssl

from devstream_core.errors import DevstreamError

from .options import UsageError

__all__ = ["error_line", "listen_hint"]


def error_line(exc: BaseException) -> str | None:
    """The text after ``devstream: error:`` for *exc*, or None if *exc* is a bug.

    Trio's exception groups are looked through: a group whose every error has a line gives
    the first one's."""
    if isinstance(exc, BaseExceptionGroup):
        lines = [error_line(inner) for inner in exc.exceptions]
        if not lines or any(line is None for line in lines):
            return None
        return lines[0]
    if isinstance(exc, UsageError):
        return str(exc)
    if isinstance(exc, DevstreamError):
        return f"{exc.message} (error {int(exc.code)})"
    if isinstance(exc, ssl.SSLError):
        return _ssl_line(exc)
    if isinstance(exc, OSError):
        return _os_line(exc)
    return None


def listen_hint(number: int | None) -> str:
    """What to do when listening failed with error *number* (empty when nothing fits)."""
    if number == errno.EADDRINUSE:
        return "the port is in use (by another hub or program): choose another port"
    if number in (errno.EACCES, errno.EPERM):
        return "ports below 1024 need privileges: choose a port above 1023"
    if number == errno.EADDRNOTAVAIL:
        return "that address is not one of this machine's: use 127.0.0.1, 0.0.0.0 or one of its own"
    return ""


def _ssl_line(exc: ssl.SSLError) -> str:
    # A raised SSLError has the library's reason and library name; one made by hand may not.
    reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
    line = f"TLS: {reason}"
    if getattr(exc, "library", None) == "PEM" or "PEM" in reason or "NO_CERTIFICATE" in reason:
        line += ": a certificate, key or CA file given is not in PEM form"
    return line


def _os_line(exc: OSError) -> str:
    what = exc.strerror or str(exc)
    where = f" {exc.filename!r}" if exc.filename is not None else ""
    line = f"{what}{':' + where if where else ''}"
    hint = {
        errno.EADDRINUSE: listen_hint(errno.EADDRINUSE),
        errno.EADDRNOTAVAIL: listen_hint(errno.EADDRNOTAVAIL),
        errno.ENOENT: "check the path",
        errno.EACCES: "check its owner and mode" if where else "",
        errno.EROFS: "choose a folder on a writable file system",
        errno.ENOSPC: "free some space",
        errno.ECONNREFUSED: "nothing is listening there",
    }.get(exc.errno or -1, "")
    return f"{line}; {hint}" if hint else line
