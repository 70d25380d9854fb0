"""What a failed connection to a hub most likely means, in words a user can act on.

A client that cannot talk to its hub sees only low-level symptoms: a refused connection, a TLS
library's reason code, a peer that hung up before answering, bytes that are not HTTP. The
likely causes are few and the same for every I/O layer (a hub not running there, ``UseTls``
set the wrong way round, a name the hub's certificate is not for), so the reading of those
symptoms lives here and each driver only reports what it saw.

Rules every change must keep:

* Every function returns a :class:`~devstream_core.exceptions.HubUnreachable` (error
  ``HUB_UNREACHABLE``); a cause that is certain (a TLS answer to plain HTTP, a non-TLS answer
  to a TLS handshake) gives its subclass :class:`~devstream_core.exceptions.TlsMismatch`.
* A message names where (``host:port``), what was seen, and the likely fix. It never quotes
  more than a few bytes of what the peer sent, and never a credential.
"""

from __future__ import annotations

import errno as _errno
from collections.abc import Collection

from .errors import ErrorCode
from .exceptions import HubUnreachable, TlsMismatch

__all__ = [
    "connect_error",
    "connect_failure",
    "looks_like_tls",
    "no_http_answer",
    "tls_error",
    "tls_handshake_failure",
]

#: How many bytes of a non-HTTP answer a message quotes.
QUOTED_BYTES = 16

#: TLS record content types: change_cipher_spec, alert, handshake, application_data.
_TLS_CONTENT_TYPES = frozenset({0x14, 0x15, 0x16, 0x17})

_USE_TLS_FALSE_HINT = (
    "if the hub serves plain http (started without --tls-cert), "
    "add UseTls=false to the connection string"
)
_DROP_USE_TLS_HINT = (
    "if the hub serves https (started with --tls-cert), remove UseTls=false "
    "from the connection string"
)


def looks_like_tls(data: bytes) -> bool:
    """Whether *data* starts like a TLS record (content type, then version 3.x)."""
    return len(data) >= 2 and data[0] in _TLS_CONTENT_TYPES and data[1] == 0x03


def connect_failure(where: str, errnos: Collection[int], detail: str) -> HubUnreachable:
    """The TCP connection to the hub at *where* failed with *errnos* (every attempt's error
    number; several for a name with several addresses) and *detail* (the OS's text)."""
    if errnos and all(number == _errno.ECONNREFUSED for number in errnos):
        return HubUnreachable(
            ErrorCode.HUB_UNREACHABLE,
            f"cannot reach the hub at {where}: connection refused, no hub is running there; "
            "start `devstream hub` or check HostName and its port in the connection string",
        )
    return HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"cannot reach the hub at {where}: {detail}")


def connect_error(where: str, exc: OSError) -> HubUnreachable:
    """:func:`connect_failure` for the ``OSError`` a connection attempt raised: its error
    number, or those of every attempt when its cause groups them (trio's error for a name
    with several addresses)."""
    errnos = [exc.errno] if exc.errno else []
    cause = exc.__cause__
    if not errnos and isinstance(cause, BaseExceptionGroup):
        errnos = [e.errno for e in cause.exceptions if isinstance(e, OSError) and e.errno]
    return connect_failure(where, errnos, exc.strerror or str(exc))


def tls_error(where: str, exc: BaseException) -> HubUnreachable:
    """:func:`tls_handshake_failure` for the error the TLS library raised (an
    ``ssl.SSLError`` or ``ssl.SSLCertVerificationError``: its ``reason`` and
    ``verify_message``, when it has them)."""
    return tls_handshake_failure(
        where,
        reason=getattr(exc, "reason", None),
        verify_message=getattr(exc, "verify_message", None),
        detail=str(exc),
    )


def tls_handshake_failure(
    where: str, *, reason: str | None, verify_message: str | None, detail: str
) -> HubUnreachable:
    """The TLS handshake with the hub at *where* failed; *reason* is the TLS library's reason
    code (OpenSSL's ``WRONG_VERSION_NUMBER``, …), *verify_message* its reason for refusing the
    hub's certificate, *detail* the whole error's text."""
    head = f"TLS handshake with the hub at {where} failed"
    if reason == "WRONG_VERSION_NUMBER":
        return TlsMismatch(
            ErrorCode.HUB_UNREACHABLE,
            f"{head}: the server there does not speak TLS; {_USE_TLS_FALSE_HINT}",
        )
    if verify_message:
        hint = ""
        lowered = verify_message.lower()
        if "mismatch" in lowered:
            hint = "; HostName must be a name or address the hub's certificate is for"
        elif "issuer" in lowered or "self-signed" in lowered or "self signed" in lowered:
            hint = (
                "; trust the CA that signed the hub's certificate (--ca-file or DEVSTREAM_CA_FILE)"
            )
        return HubUnreachable(
            ErrorCode.HUB_UNREACHABLE, f"{head}: certificate refused: {verify_message}{hint}"
        )
    return HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"{head}: {detail}")


def no_http_answer(where: str, received: bytes, *, tls: bool, detail: str = "") -> HubUnreachable:
    """The hub at *where* gave no HTTP answer to a request: it hung up first (*received* is
    empty) or sent *received*, which HTTP cannot read (*detail*: the HTTP parser's words).
    *tls* says whether the connection is TLS."""
    if not received:
        message = f"connection closed by the hub at {where} before it answered"
        if not tls:
            return HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"{message}; {_DROP_USE_TLS_HINT}")
        return HubUnreachable(ErrorCode.HUB_UNREACHABLE, message)
    if not tls and looks_like_tls(received):
        return TlsMismatch(
            ErrorCode.HUB_UNREACHABLE,
            f"the hub at {where} answered in TLS to a plain HTTP request; {_DROP_USE_TLS_HINT}",
        )
    if received.startswith(b"HTTP/"):
        return HubUnreachable(
            ErrorCode.HUB_UNREACHABLE, f"bad HTTP response from the hub at {where}: {detail}"
        )
    quoted = repr(received[:QUOTED_BYTES])
    return HubUnreachable(
        ErrorCode.HUB_UNREACHABLE,
        f"the server at {where} is not a devstream hub (it answered {quoted}, not HTTP); "
        "check HostName and its port in the connection string",
    )
