"""The hub's HTTP request targets: which route a method and a request target name.

The hub serves everything on one HTTP/1.1 port. This module turns the method and request
target of a request (bytes, exactly as h11 hands them over) into one route object, or refuses
them with a :class:`RemoteProtocolError` whose code the adapter turns into the HTTP answer.
It knows nothing about headers, bodies, credentials or whether a device exists.

The routes::

    POST GET        /twins/{deviceId}/streams/{streamName}[?api-version=...]   Initiate
    GET             /devices/{deviceId}/streams                                ControlChannel
    GET             /bridges/{streamId}[?role=device|service]                  BridgeJoin
    PUT GET DELETE  /devices/{deviceId}                                        DeviceItem
    GET             /devices                                                   DeviceList
    POST            /devices/{deviceId}/rotate-key[?key=primary|secondary]     DeviceKeyRotation
    PUT GET DELETE  /policies/{keyName}                                        PolicyItem
    GET             /policies                                                  PolicyList
    POST            /policies/{keyName}/rotate-key[?key=primary|secondary]     PolicyKeyRotation
    GET             /streams                                                   StreamList
    GET             /healthz                                                   Health
    GET             /metrics                                                   Metrics

Rules:

* The target is split into path and query at the first ``?``, the path into segments at
  ``/``, and only then is each segment percent-decoded, exactly once: ``%2F`` inside a
  device id is a character of the id, never a separator, and ``%2525`` stays ``%25``.
  Fixed segments (``devices``, ``streams``, ...) match literally, case-sensitively.
* The checks run in a fixed order, so every request gets one definite answer: target shape
  (``MALFORMED_REQUEST``), then path (``NOT_FOUND``), then method (``METHOD_NOT_ALLOWED``),
  then the values in the path and query (``ARGUMENT_INVALID``, naming the part at fault).
* Error messages name the part at fault, never echo its value.
* The query is parsed with :func:`urllib.parse.parse_qs` (at most
  :data:`MAX_QUERY_FIELDS` fields); keys a route does not use are ignored, whatever they
  hold. A key a route uses must appear at most once, and its value must be UTF-8.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, unquote_to_bytes

from .common import Role
from .control import is_valid_stream_name
from .errors import ErrorCode, RemoteProtocolError
from .registry import validate_policy_name

__all__ = [
    "ALLOWED_METHODS",
    "MAX_TARGET_LENGTH",
    "BridgeJoin",
    "ControlChannel",
    "DeviceItem",
    "DeviceKeyRotation",
    "DeviceList",
    "Health",
    "Initiate",
    "MethodNotAllowed",
    "Metrics",
    "PolicyItem",
    "PolicyKeyRotation",
    "PolicyList",
    "Route",
    "StreamList",
    "is_valid_device_id",
    "is_valid_stream_id",
    "parse_route",
]

#: The longest request target the hub accepts, in bytes.
MAX_TARGET_LENGTH: Final = 8192
#: The most query fields parsed; more is an invalid query.
MAX_QUERY_FIELDS: Final = 64


@dataclass(frozen=True, kw_only=True)
class Initiate:
    """``POST /twins/{deviceId}/streams/{streamName}``: a service initiates a stream.

    ``GET`` on the same path, as a WebSocket upgrade, is devstream's one-step open: the
    initiate whose connection, once the device accepts, is the service's side of the stream.
    *api_version* is the ``api-version`` query value, or ``None`` when absent (any value
    is accepted).
    """

    device_id: str
    stream_name: str
    api_version: str | None


@dataclass(frozen=True, kw_only=True)
class ControlChannel:
    """``GET /devices/{deviceId}/streams``: a device opens its control channel (WebSocket)."""

    device_id: str


@dataclass(frozen=True, kw_only=True)
class BridgeJoin:
    """``GET /bridges/{streamId}``: one side joins a stream (WebSocket).

    *role* is the ``role`` query value, or ``None`` when absent (the stream token says).
    """

    stream_id: str
    role: Role | None


@dataclass(frozen=True, kw_only=True)
class DeviceItem:
    """``PUT/GET/DELETE /devices/{deviceId}``: create, read or delete one registry entry."""

    device_id: str


@dataclass(frozen=True, kw_only=True)
class DeviceList:
    """``GET /devices``: list the registry."""


@dataclass(frozen=True, kw_only=True)
class DeviceKeyRotation:
    """``POST /devices/{deviceId}/rotate-key``: replace one of a device's keys with a fresh one.

    *secondary* is true for ``?key=secondary``; the primary key is replaced otherwise.
    """

    device_id: str
    secondary: bool


@dataclass(frozen=True, kw_only=True)
class PolicyItem:
    """``PUT/GET/DELETE /policies/{keyName}``: create or update, read or delete a policy."""

    name: str


@dataclass(frozen=True, kw_only=True)
class PolicyList:
    """``GET /policies``: list the shared-access policies."""


@dataclass(frozen=True, kw_only=True)
class PolicyKeyRotation:
    """``POST /policies/{keyName}/rotate-key``: replace one of a policy's keys with a fresh one.

    *secondary* is true for ``?key=secondary``; the primary key is replaced otherwise.
    """

    name: str
    secondary: bool


@dataclass(frozen=True, kw_only=True)
class StreamList:
    """``GET /streams``: the devices online and the streams open, for an operator."""


@dataclass(frozen=True, kw_only=True)
class Health:
    """``GET /healthz``: liveness."""


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """``GET /metrics``: Prometheus text."""


#: Any route.
Route = (
    Initiate
    | ControlChannel
    | BridgeJoin
    | DeviceItem
    | DeviceList
    | StreamList
    | DeviceKeyRotation
    | PolicyItem
    | PolicyList
    | PolicyKeyRotation
    | Health
    | Metrics
)

#: The methods each route answers; the adapter can send them as an ``Allow`` header.
ALLOWED_METHODS: Final[Mapping[type[Route], frozenset[bytes]]] = {
    Initiate: frozenset({b"POST", b"GET"}),
    ControlChannel: frozenset({b"GET"}),
    BridgeJoin: frozenset({b"GET"}),
    DeviceItem: frozenset({b"PUT", b"GET", b"DELETE"}),
    DeviceList: frozenset({b"GET"}),
    DeviceKeyRotation: frozenset({b"POST"}),
    PolicyItem: frozenset({b"PUT", b"GET", b"DELETE"}),
    PolicyList: frozenset({b"GET"}),
    PolicyKeyRotation: frozenset({b"POST"}),
    StreamList: frozenset({b"GET"}),
    Health: frozenset({b"GET"}),
    Metrics: frozenset({b"GET"}),
}

# Azure's device id rule: up to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '
_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}")
_STREAM_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# RFC 3986 characters of a request target in origin form (pchar, "/", "?", and "%").
_TARGET_RE: Final = re.compile(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")
#: The scheme and authority of a target in absolute form (``http://hub.example:8080``).
_ABSOLUTE_FORM_RE: Final = re.compile(
    rb"[Hh][Tt][Tt][Pp][Ss]?://[A-Za-z0-9\-._~!$&'()*+,;=:@%\[\]]*"
)
_BAD_PERCENT_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


def is_valid_device_id(device_id: str) -> bool:
    """Whether *device_id* is legal: 1 to 128 ASCII letters, digits or ``-.+%_#*?!(),:=@$'``."""
    return type(device_id) is str and _DEVICE_ID_RE.fullmatch(device_id) is not None


def is_valid_stream_id(stream_id: str) -> bool:
    """Whether *stream_id* is legal: 1 to 64 characters of ``[A-Za-z0-9_-]``."""
    return type(stream_id) is str and _STREAM_ID_RE.fullmatch(stream_id) is not None


def _error(code: ErrorCode, message: str) -> RemoteProtocolError:
    return RemoteProtocolError(code, message)


def _decode_segment(segment: str, part: str) -> str:
    """Percent-decode one path segment exactly once; the result must be UTF-8."""
    if "%" not in segment:
        return segment  # the request target is ASCII: nothing to decode
    if _BAD_PERCENT_RE.search(segment):
        raise _error(ErrorCode.ARGUMENT_INVALID, f"{part} has invalid percent-encoding")
    try:
        return unquote_to_bytes(segment).decode("utf-8")
    except UnicodeDecodeError:
        raise _error(ErrorCode.ARGUMENT_INVALID, f"{part} is not valid UTF-8") from None


def _device_id(segment: str) -> str:
    device_id = _decode_segment(segment, "deviceId")
    if not is_valid_device_id(device_id):
        raise _error(
            ErrorCode.ARGUMENT_INVALID,
            "deviceId must be 1 to 128 ASCII letters, digits or characters of -.+%_#*?!(),:=@$'",
        )
    return device_id


def _stream_name(segment: str) -> str:
    name = _decode_segment(segment, "streamName")
    if not is_valid_stream_name(name):
        raise _error(
            ErrorCode.ARGUMENT_INVALID, "streamName must be 1 to 64 characters of [A-Za-z0-9._-]"
        )
    return name


def _stream_id(segment: str) -> str:
    stream_id = _decode_segment(segment, "streamId")
    if not is_valid_stream_id(stream_id):
        raise _error(
            ErrorCode.ARGUMENT_INVALID, "streamId must be 1 to 64 characters of [A-Za-z0-9_-]"
        )
    return stream_id


def _policy_name(segment: str) -> str:
    return validate_policy_name(_decode_segment(segment, "keyName"))


def _query_value(query: str, key: str) -> str | None:
    """The single value of *key* in *query*, or ``None`` when absent.

    Percent-escapes that are not UTF-8 are an error only in the value asked for.
    """
    if "%" not in query and "+" not in query:
        # Nothing to decode (the usual case: ``api-version=…``): the fields as parse_qs
        # reads them, without its decoding.
        if query.count("&") >= MAX_QUERY_FIELDS:
            raise _too_many_fields()
        values = [
            value
            for name, _, value in (field.partition("=") for field in query.split("&") if field)
            if name == key
        ]
        if not values:
            return None
        if len(values) != 1:
            raise _repeated(key)
        return values[0]
    try:
        fields = parse_qs(
            query,
            keep_blank_values=True,
            errors="surrogateescape",
            max_num_fields=MAX_QUERY_FIELDS,
        )
    except ValueError:
        raise _too_many_fields() from None
    decoded = fields.get(key)
    if decoded is None:
        return None
    if len(decoded) != 1:
        raise _repeated(key)
    values = decoded
    try:
        values[0].encode("utf-8")
    except UnicodeEncodeError:
        raise _error(
            ErrorCode.ARGUMENT_INVALID, f"query parameter {key} is not valid UTF-8"
        ) from None
    return values[0]


def _too_many_fields() -> RemoteProtocolError:
    return _error(
        ErrorCode.ARGUMENT_INVALID, f"query string has more than {MAX_QUERY_FIELDS} fields"
    )


def _repeated(key: str) -> RemoteProtocolError:
    return _error(ErrorCode.ARGUMENT_INVALID, f"query parameter {key} appears more than once")


def _role(query: str) -> Role | None:
    value = _query_value(query, "role")
    if value is None:
        return None
    for role in Role:
        if value == role.value:
            return role
    raise _error(ErrorCode.ARGUMENT_INVALID, "query parameter role must be device or service")


def _secondary(query: str) -> bool:
    """Whether the ``key`` query value names the secondary key (absent: the primary)."""
    value = _query_value(query, "key")
    if value is None or value == "primary":
        return False
    if value == "secondary":
        return True
    raise _error(ErrorCode.ARGUMENT_INVALID, "query parameter key must be primary or secondary")


class MethodNotAllowed(RemoteProtocolError):
    """``METHOD_NOT_ALLOWED``: the path exists, but not for this method. :attr:`allow` is the
    value of the ``Allow`` header a ``405`` must carry (RFC 9110 §15.5.6)."""

    def __init__(self, allowed: frozenset[bytes]) -> None:
        super().__init__(ErrorCode.METHOD_NOT_ALLOWED, "method not allowed for this path")
        #: The methods the path answers, comma-separated, in a fixed order.
        self.allow = b", ".join(sorted(allowed))


def _check_method(method: bytes, kind: type[Route]) -> None:
    allowed = ALLOWED_METHODS[kind]
    if method not in allowed:
        raise MethodNotAllowed(allowed)


def parse_route(method: bytes, target: bytes) -> Route:
    """The route that *method* and request *target* name.

    A target in absolute form (``http://host/path``) is read as its path and query.

    Raises :class:`RemoteProtocolError` with ``MALFORMED_REQUEST`` (target longer than
    :data:`MAX_TARGET_LENGTH` bytes, not starting with ``/`` or ``http(s)://``, or holding
    characters a request target may not), ``NOT_FOUND`` (no such path), ``METHOD_NOT_ALLOWED`` (path
    known, method not; see :data:`ALLOWED_METHODS`) or ``ARGUMENT_INVALID`` (a bad id, name,
    role, query or percent-encoding; the message names which).
    """
    if len(target) > MAX_TARGET_LENGTH:
        raise _error(ErrorCode.MALFORMED_REQUEST, "request target too long")
    if not target.startswith(b"/"):
        # RFC 9112 §3.2.2: a server accepts the absolute form too (what a client sends to a
        # proxy); its host is not the hub's to check, as the Host header's is not.
        absolute = _ABSOLUTE_FORM_RE.match(target)
        if absolute is None:
            raise _error(
                ErrorCode.MALFORMED_REQUEST, "request target must start with / or http(s)://"
            )
        rest = target[absolute.end() :]
        target = rest if rest.startswith(b"/") else b"/" + rest
    if _TARGET_RE.fullmatch(target) is None:
        raise _error(ErrorCode.MALFORMED_REQUEST, "request target holds invalid characters")
    path, _, query = target.decode("ascii").partition("?")
    route = _route(method, path[1:].split("/"), query)
    # Every route, whether it reads its query or not (those that do checked already).
    if query.count("&") >= MAX_QUERY_FIELDS:
        raise _too_many_fields()
    return route


def _route(method: bytes, segments: list[str], query: str) -> Route:
    """parse_route's answer for a target split into its path *segments* and *query*."""
    match segments:
        case ["twins", device, "streams", name]:
            _check_method(method, Initiate)
            return Initiate(
                device_id=_device_id(device),
                stream_name=_stream_name(name),
                api_version=_query_value(query, "api-version"),
            )
        case ["devices", device, "streams"]:
            _check_method(method, ControlChannel)
            return ControlChannel(device_id=_device_id(device))
        case ["bridges", stream]:
            _check_method(method, BridgeJoin)
            return BridgeJoin(stream_id=_stream_id(stream), role=_role(query))
        case ["devices", device]:
            _check_method(method, DeviceItem)
            return DeviceItem(device_id=_device_id(device))
        case ["devices"]:
            _check_method(method, DeviceList)
            return DeviceList()
        case ["devices", device, "rotate-key"]:
            _check_method(method, DeviceKeyRotation)
            return DeviceKeyRotation(device_id=_device_id(device), secondary=_secondary(query))
        case ["policies", name]:
            _check_method(method, PolicyItem)
            return PolicyItem(name=_policy_name(name))
        case ["policies"]:
            _check_method(method, PolicyList)
            return PolicyList()
        case ["policies", name, "rotate-key"]:
            _check_method(method, PolicyKeyRotation)
            return PolicyKeyRotation(name=_policy_name(name), secondary=_secondary(query))
        case ["streams"]:
            _check_method(method, StreamList)
            return StreamList()
        case ["healthz"]:
            _check_method(method, Health)
            return Health()
        case ["metrics"]:
            _check_method(method, Metrics)
            return Metrics()
    raise _error(ErrorCode.NOT_FOUND, "no such path on the hub")
