"""The WebSocket opening handshake's decisions (RFC 6455 §4): which upgrade request the hub
answers with a ``101``, and which ``101`` a client takes.

Both sides read the header fields as an HTTP parser hands them over: names lower-cased,
values without their surrounding spaces and tabs. How the bytes were parsed (h11, or a plain
reader held to h11's reading) is the adapter's business; what the fields must say is decided
here, once, for every I/O layer.

The hub (:func:`check_request`) takes an upgrade request only if it is

1. a ``GET`` (RFC 6455 §4.2.1 item 1);
2. of HTTP/1.1 or later (item 1);
3. with exactly one ``Host`` (item 2);
4. with ``websocket`` among the tokens of its ``Upgrade`` fields (item 3; else 426901);
5. with ``upgrade`` among the tokens of its ``Connection`` fields (item 4; else 426901);
6. with one ``Sec-WebSocket-Version`` field, ``13`` (item 6; else 426902, and the answer
   says ``Sec-WebSocket-Version: 13``);
7. with one ``Sec-WebSocket-Key`` field, the base64 of 16 bytes (item 5).

A client (:func:`check_response`) takes a ``101`` (the status is the caller's check, rule 1
of RFC 6455 §4.1: any other answer, an interim ``1xx`` included, is a refusal it reports
with the hub's error) only if it has

1. one ``Upgrade`` field, ``websocket`` in any case (RFC 6455 §4.1, rule 2 of reading the
   answer);
2. ``upgrade`` among the tokens of its ``Connection`` fields (rule 3);
3. one ``Sec-WebSocket-Accept`` field, the one its key asks for (rule 4);
4. no ``Sec-WebSocket-Extensions`` field: devstream's client offers no extension (rule 5);
5. at most one ``Sec-WebSocket-Protocol`` field, naming one of the subprotocols the client
   offered, spelled as offered (rule 6).

Rules every change must keep:

* A list field (``Connection``, a request's ``Upgrade``) is read across all its lines, as
  RFC 9110 §5.3 joins them, its items separated by commas with spaces or tabs around them
  (§5.6.1; any other character, whitespace or not, is part of an item). A field read as one
  value (the key, the version, the accept value, the chosen subprotocol, a 101's
  ``Upgrade``) must come once: repeated, it is refused, since the joined value (``a, b``) is
  never a valid one.
* Every check wsproto makes on a handshake is made here too. Where the decisions differ, it
  is on purpose: wsproto reads only the last line of each field (and a request's ``Upgrade``
  as one value, not a list), strips any whitespace around a list item, and asks only that a
  key be there; the hub also refuses HTTP/1.0 and a key that is not the base64 of 16 bytes.
  ``fuzz/fuzz_http_request.py`` and ``fuzz/fuzz_http_response.py`` hold these functions to
  wsproto's decisions with exactly these differences.
* A refusal is a :class:`RemoteProtocolError` whose code is the answer: on the hub, the
  error the hub answers with; on a client, ``HUB_UNREACHABLE`` and a message naming the
  field at fault. A message never echoes a key or a value.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from typing import Final

from .errors import ErrorCode, RemoteProtocolError

__all__ = [
    "FIELD_NAME",
    "FIELD_VALUE",
    "REQUEST_TARGET",
    "WEBSOCKET_VERSION",
    "accept_token",
    "asks_for_websocket",
    "check_request",
    "check_response",
    "client_key",
    "field_values",
    "header_line",
    "is_websocket_key",
    "request_head",
    "upgrade_fields",
]

#: The only WebSocket version devstream speaks (RFC 6455).
WEBSOCKET_VERSION: Final = b"13"
#: What RFC 6455 §1.3 appends to a key before hashing it into the accept value.
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

Fields = Sequence[tuple[bytes, bytes]]

#: A header name (RFC 9110 token) and value (visible characters, inner spaces and tabs), as
#: h11 checks them in what it writes. (Runs of visible characters with spaces or tabs between
#: them: one way to match each value, so a long line that does not match fails in linear time.)
FIELD_NAME: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+")
FIELD_VALUE: Final = re.compile(rb"(?:[\x21-\x7e\x80-\xff]+(?:[\t ]+[\x21-\x7e\x80-\xff]+)*)?")
#: A request's target as h11 takes it (visible ASCII).
REQUEST_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
#: A request's field names joined by ``:``, and its values joined by line feeds, each as the
#: two above take them: every field checked in two matches (see request_head).
_FIELD_NAMES: Final = re.compile(rb"%s(?::%s)*" % (FIELD_NAME.pattern, FIELD_NAME.pattern))
_FIELD_VALUES: Final = re.compile(rb"%s(?:\n%s)*" % (FIELD_VALUE.pattern, FIELD_VALUE.pattern))


def accept_token(key: bytes) -> bytes:
    """The ``Sec-WebSocket-Accept`` value for a ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


# -- the client's request ------------------------------------------------------------------


def client_key(nonce: bytes) -> bytes:
    """The ``Sec-WebSocket-Key`` of a client's request: the base64 of *nonce*, 16 random
    bytes the caller draws (a new one for each request)."""
    if len(nonce) != 16:
        raise ValueError("a WebSocket key is made of 16 random bytes")
    return base64.b64encode(nonce)


def upgrade_fields(
    host: str,
    key: bytes,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
) -> list[tuple[str, str]]:
    """The header fields of a client's upgrade request to *host*: the handshake's own, then
    *headers* (``Authorization``, the initiate's), then the *subprotocols* offered, if any.
    :func:`check_response` takes the answer with the same *key* and *subprotocols*."""
    fields = [
        ("host", host),
        ("upgrade", "websocket"),
        ("connection", "Upgrade"),
        ("sec-websocket-key", key.decode()),
        ("sec-websocket-version", "13"),
        *headers,
    ]
    if subprotocols:
        fields.append(("sec-websocket-protocol", ", ".join(subprotocols)))
    return fields


def header_line(name: bytes, value: bytes) -> bytes:
    """``name: value`` and its line break, checked as h11 checks what it writes
    (``ValueError`` if not)."""
    if not FIELD_NAME.fullmatch(name) or not FIELD_VALUE.fullmatch(value):
        raise ValueError(f"not a valid header: {name!r}: {value!r}")
    return name + b": " + value + b"\r\n"


def request_head(target: str, fields: Sequence[tuple[str, str]]) -> bytes:
    """The head of a ``GET`` request for *target* with *fields*, byte for byte what h11
    writes, and checked as h11 checks one (``ValueError`` if not)."""
    raw_target = target.encode("ascii")
    if not REQUEST_TARGET.fullmatch(raw_target):
        raise ValueError(f"not a valid request target: {target!r}")
    names = ":".join([name for name, _ in fields]).encode("ascii")
    values = "\n".join([value for _, value in fields]).encode("ascii")
    # (A colon in a name, or a line feed in a value, would pass as one more field.)
    separators = len(fields) - 1
    if fields and not (
        names.count(b":") == separators == values.count(b"\n")
        and _FIELD_NAMES.fullmatch(names)
        and _FIELD_VALUES.fullmatch(values)
    ):
        name, value = next(  # the field at fault, for the message
            (name, value)
            for name, value in ((name.encode(), value.encode()) for name, value in fields)
            if not (FIELD_NAME.fullmatch(name) and FIELD_VALUE.fullmatch(value))
        )
        raise ValueError(f"not a valid header: {name!r}: {value!r}")
    head = "".join([f"{name}: {value}\r\n" for name, value in fields]).encode("ascii")
    return b"GET " + raw_target + b" HTTP/1.1\r\n" + head + b"\r\n"


# -- reading the fields ----------------------------------------------------------------------


def field_values(fields: Fields) -> dict[bytes, list[bytes]]:
    """Each field's values by name (names as given), in order: *fields* read in one pass.
    The checks below take it as *values* from a caller that made it already, for lookups
    of its own."""
    found: dict[bytes, list[bytes]] = {}
    for name, value in fields:
        values = found.get(name)
        if values is None:
            found[name] = [value]
        else:
            values.append(value)
    return found


#: No values (what a lookup of a field that is not there finds).
_NONE: Final[tuple[bytes, ...]] = ()


def _has_token(values: Sequence[bytes], token: bytes) -> bool:
    """True when *token* (lower-case) is among the comma-separated items of *values*."""
    return any(
        value.lower() == token
        or token in (item.strip(b" \t").lower() for item in value.split(b","))
        for value in values
    )


def _single(found: dict[bytes, list[bytes]], name: bytes) -> bytes | None:
    """The value of the one *name* field; None if there is none.

    Raises ``LookupError`` if there are several.
    """
    values = found.get(name, _NONE)
    if len(values) > 1:
        raise LookupError(name)
    return values[0] if values else None


def asks_for_websocket(fields: Fields, *, values: dict[bytes, list[bytes]] | None = None) -> bool:
    """True when a request's ``Upgrade`` names ``websocket`` and its ``Connection``
    ``upgrade``: it asks to open a WebSocket (whether it may is :func:`check_request`'s).
    *values*: :func:`field_values` of *fields*, if the caller has it."""
    found = field_values(fields) if values is None else values
    return _has_token(found.get(b"upgrade", _NONE), b"websocket") and _has_token(
        found.get(b"connection", _NONE), b"upgrade"
    )


def check_request(
    method: bytes,
    http_version: bytes,
    fields: Fields,
    *,
    values: dict[bytes, list[bytes]] | None = None,
) -> bytes:
    """The key of an upgrade request the hub may answer with a ``101`` (*values*: as
    :func:`asks_for_websocket`'s).

    Raises :class:`RemoteProtocolError` with the code to answer with: ``MALFORMED_REQUEST``,
    ``UPGRADE_REQUIRED`` or ``WEBSOCKET_VERSION_UNSUPPORTED`` (see the module's list).
    """
    if method != b"GET":
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_REQUEST, "a WebSocket handshake must be a GET"
        )
    if http_version != b"1.1":
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_REQUEST, "a WebSocket handshake needs HTTP/1.1"
        )
    found = field_values(fields) if values is None else values
    try:
        host = _single(found, b"host")
        version = _single(found, b"sec-websocket-version")
        key = _single(found, b"sec-websocket-key")
    except LookupError as exc:
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_REQUEST,
            f"a WebSocket handshake has one {_field_name(exc.args[0])} field",
        ) from None
    if host is None:
        raise RemoteProtocolError(ErrorCode.MALFORMED_REQUEST, "a WebSocket handshake needs a Host")
    if not _has_token(found.get(b"upgrade", _NONE), b"websocket") or not _has_token(
        found.get(b"connection", _NONE), b"upgrade"
    ):
        raise RemoteProtocolError(
            ErrorCode.UPGRADE_REQUIRED,
            "a WebSocket handshake needs Upgrade: websocket and Connection: Upgrade",
        )
    if version != WEBSOCKET_VERSION:
        raise RemoteProtocolError(ErrorCode.WEBSOCKET_VERSION_UNSUPPORTED)
    if key is None or not is_websocket_key(key):
        raise RemoteProtocolError(
            ErrorCode.MALFORMED_REQUEST, "Sec-WebSocket-Key must be the base64 of 16 bytes"
        )
    return key


def is_websocket_key(key: bytes) -> bool:
    """True when *key* is the base64 (with its padding) of 16 bytes."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except binascii.Error:
        return False


def check_response(fields: Fields, *, key: bytes, subprotocols: Sequence[str]) -> str | None:
    """The subprotocol a ``101`` chose (None for none), if a client that sent *key* and
    offered *subprotocols* (and no extension) may take it.

    Raises :class:`RemoteProtocolError` (``HUB_UNREACHABLE``) naming the field at fault.
    """
    found = field_values(fields)
    try:
        upgrade = _single(found, b"upgrade")
        accept = _single(found, b"sec-websocket-accept")
        chosen = _single(found, b"sec-websocket-protocol")
    except LookupError as exc:
        raise _bad_answer(f"more than one {_field_name(exc.args[0])} field") from None
    if upgrade is None or upgrade.lower() != b"websocket":
        raise _bad_answer("no Upgrade: websocket")
    if not _has_token(found.get(b"connection", _NONE), b"upgrade"):
        raise _bad_answer("no Connection: Upgrade")
    if accept is None:
        raise _bad_answer("no Sec-WebSocket-Accept")
    if accept != accept_token(key):
        raise _bad_answer("a wrong Sec-WebSocket-Accept")
    if b"sec-websocket-extensions" in found:
        raise _bad_answer("a Sec-WebSocket-Extensions the client did not offer")
    if chosen is None:
        return None
    for offered in subprotocols:
        if chosen == offered.encode():
            return offered
    raise _bad_answer("a Sec-WebSocket-Protocol the client did not offer")


def _field_name(name: bytes) -> str:
    """A field's name as RFC 6455 spells it (for messages)."""
    return "-".join(
        "WebSocket" if part == "websocket" else part.capitalize()
        for part in name.decode().split("-")
    )


def _bad_answer(problem: str) -> RemoteProtocolError:
    return RemoteProtocolError(
        ErrorCode.HUB_UNREACHABLE, f"bad answer to the WebSocket handshake: {problem}"
    )
