"""The wire contract between the hub and its clients: names, limits, targets and answers.

What a device or service client of any I/O layer must spell and decide exactly as the hub
does lives here, so that a port to another event loop needs nothing from ``devstream_trio``:

* the HTTP header names of the initiate request and its answer (Azure's ``iothub-streaming-*``
  and devstream's ``devstream-*``), and the limits and defaults a client must know;
* where a hub is (:class:`HubAddress`, from a connection string or a URL) and the request
  targets a client sends: the initiate (:func:`build_initiate_request`), the control channel
  (:func:`control_target`), a stream's URL (:func:`stream_url`, :func:`parse_stream_url`);
* the initiate's answer, both ways: the hub builds it with :func:`build_initiate_answer` and a
  client reads it with :func:`parse_initiate_answer`; the hub reads the request's headers with
  :func:`parse_initiate_headers`;
* the JSON error body ``{"errorCode": …, "message": …}``: :func:`build_error_body` (the hub)
  and :func:`parse_error_body` (the clients), and :func:`error_from_response`, the exception a
  client raises for an error answer.

Rules every change must keep:

1. **One spelling.** Every name that crosses the wire is defined here once and used by the
   hub and every client; nothing else spells it.
2. **Build, then parse, gives back the inputs** (``tests/test_wire.py`` holds each pair to it).
3. **Strict where it decides, tolerant where it reports.** An answer is accepted only with
   ``iothub-streaming-is-accepted: True`` spelled exactly so, and an accepted answer without
   its URL (or, for a ``POST``, its token) is the hub breaking the contract:
   :class:`~devstream_core.exceptions.HubError` with ``PROTOCOL_ERROR``. An error body that
   is not the JSON shape is still an answer: :func:`parse_error_body` gives code ``None`` and
   the start of its text, never an exception.
4. **Typed errors only.** A client-side parser raises a
   :class:`~devstream_core.exceptions.HubError` (the class :func:`error_for` picks for the
   hub's code); the hub-side :func:`parse_initiate_headers` raises
   :class:`~devstream_core.errors.RemoteProtocolError` with ``ARGUMENT_INVALID``. Any other
   exception escaping is a bug.
5. **Sans-IO.** No socket, no clock: what depends on time takes it as an argument. Header
   names are lower-case bytes, as h11 hands them over; header lists are ``(name, value)``
   pairs, and where a name repeats the first value counts (as ``h11`` and the hub read them).
"""

from __future__ import annotations

import functools
import json
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from .bridge import STREAM_MODES
from .common import Role
from .control import MAX_CONTROL_MESSAGE_SIZE, MAX_WINDOW, MIN_WINDOW, MODE_RAW
from .credentials import ConnectionString
from .errors import ErrorCode, RemoteProtocolError
from .exceptions import HubError, HubUnreachable, error_for
from .framing import MAX_MESSAGE_SIZE

__all__ = [
    "ACCEPTED",
    "API_VERSION",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_RESPONSE_TIMEOUT",
    "DEFAULT_SAS_LIFETIME",
    "HEADER_AUTH_TOKEN",
    "HEADER_CONNECT_TIMEOUT",
    "HEADER_IS_ACCEPTED",
    "HEADER_RESPONSE_TIMEOUT",
    "HEADER_RESUME_TOKEN",
    "HEADER_STREAM_MODE",
    "HEADER_STREAM_URL",
    "HEADER_STREAM_WINDOW",
    "JSON_CONTENT_TYPE",
    "MAX_CONTROL_MESSAGE_SIZE",
    "MAX_ERROR_TEXT",
    "MAX_FRAMED_MESSAGE_SIZE",
    "MIN_SAS_LIFETIME",
    "NOT_ACCEPTED",
    "RAW_MESSAGE_SIZE",
    "STREAMS_TARGET",
    "HubAddress",
    "InitiateAccepted",
    "InitiateAnswer",
    "InitiateHeaders",
    "InitiateRejected",
    "InitiateRequest",
    "OneStepUnsupported",
    "StreamUrl",
    "accepted_headers",
    "bearer",
    "build_error_body",
    "build_initiate_answer",
    "build_initiate_request",
    "connection_string_for",
    "control_target",
    "device_target",
    "error_from_response",
    "initiate_target",
    "parse_bearer",
    "parse_error_body",
    "parse_initiate_answer",
    "parse_initiate_headers",
    "parse_stream_url",
    "policy_target",
    "resume_token",
    "rotate_key_target",
    "stream_url",
]

# --- header names ----------------------------------------------------------------------------

#: Azure's initiate request headers: seconds the hub waits for the device to join the stream,
#: and for the device to answer the stream request.
HEADER_CONNECT_TIMEOUT: Final = b"iothub-streaming-connect-timeout-in-seconds"
HEADER_RESPONSE_TIMEOUT: Final = b"iothub-streaming-response-timeout-in-seconds"
#: Azure's initiate answer headers: whether the device accepted (exactly ``True`` or
#: ``False``), the stream's URL on the streaming endpoint, and the service's stream token.
HEADER_IS_ACCEPTED: Final = b"iothub-streaming-is-accepted"
HEADER_STREAM_URL: Final = b"iothub-streaming-url"
HEADER_AUTH_TOKEN: Final = b"iothub-streaming-auth-token"
#: devstream's initiate headers, in the request and echoed in the answer: the data-plane mode
#: and the devstream.v1 window asked for.
HEADER_STREAM_MODE: Final = b"devstream-stream-mode"
HEADER_STREAM_WINDOW: Final = b"devstream-stream-window"
#: In a devstream.v1 join's 101 answer: the side's fresh resume token.
HEADER_RESUME_TOKEN: Final = b"devstream-resume-token"

#: The two values of :data:`HEADER_IS_ACCEPTED`, spelled as Azure spells them.
ACCEPTED: Final = b"True"
NOT_ACCEPTED: Final = b"False"
#: The content type of every JSON body the hub sends.
JSON_CONTENT_TYPE: Final = b"application/json; charset=utf-8"

# --- limits and defaults ---------------------------------------------------------------------

#: The ``api-version`` devstream's service client names (the hub takes any).
API_VERSION: Final = "2020-09-30"
#: The initiate's timeouts when the request names none (seconds), as in Azure.
DEFAULT_CONNECT_TIMEOUT: Final = 60
DEFAULT_RESPONSE_TIMEOUT: Final = 60
#: How long the SAS tokens a client signs live, by default (seconds), and the shortest
#: lifetime a client accepts (a token renewed at half or 85 % of it must still be valid).
DEFAULT_SAS_LIFETIME: Final = 3600
MIN_SAS_LIFETIME: Final = 2
#: The largest devstream.v1 WebSocket message (whole frames) the hub relays and a client
#: accepts; what a side sends (:data:`devstream_core.framing.MAX_MESSAGE_SIZE`) fits it.
MAX_FRAMED_MESSAGE_SIZE: Final = MAX_MESSAGE_SIZE
#: The largest message a client sends on a raw stream: a ``send_all`` goes out in messages
#: of at most this many bytes (the peer sees message boundaries: Azure's data plane).
RAW_MESSAGE_SIZE: Final = 64 * 1024
# MAX_CONTROL_MESSAGE_SIZE (named here too): the largest control-channel message, in bytes of
# UTF-8, from devstream_core.control.
#: How much of an error body that is not the JSON shape :func:`parse_error_body` keeps, in bytes.
MAX_ERROR_TEXT: Final = 200

_RAW: Final = MODE_RAW.encode()
_SCHEMES: Final = {"http": False, "ws": False, "https": True, "wss": True}


# --- where the hub is ------------------------------------------------------------------------


def connection_string_for(role: Role, value: str | ConnectionString) -> ConnectionString:
    """Parse *value* if needed and check that it is a *role* connection string (raises
    :class:`HubError` ``INVALID_CONNECTION_STRING`` if not)."""
    cs = value if isinstance(value, ConnectionString) else ConnectionString.parse(value)
    if cs.role is not role:
        needs = "DeviceId" if role is Role.DEVICE else "SharedAccessKeyName, not DeviceId"
        raise HubError(
            ErrorCode.INVALID_CONNECTION_STRING,
            f"a {role.value} needs a connection string with {needs}",
        )
    return cs


@dataclass(frozen=True, kw_only=True, slots=True)
class HubAddress:
    """Where a hub listens: host, port, whether it speaks TLS, and the ``Host`` header."""

    host: str
    port: int
    tls: bool
    host_header: str

    @classmethod
    def from_connection_string(cls, cs: ConnectionString) -> HubAddress:
        """The hub a connection string names (``HostName`` may carry a port)."""
        return cls.from_url(cs.http_base_url)

    @classmethod
    def from_url(cls, url: str) -> HubAddress:
        """The hub an ``http(s)://`` or ``ws(s)://`` URL names; the port defaults (when absent
        or 0) to 443 with TLS, 80 without. Anything else, a port that is not a number from 0
        to 65535 included, raises :class:`HubUnreachable`."""
        try:
            parts = urllib.parse.urlsplit(url)  # ValueError for an unclosed [IPv6 literal]
            port = parts.port  # ValueError for a port that is not a number from 0 to 65535
        except ValueError:
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"not a hub URL: {url!r}") from None
        tls = _SCHEMES.get(parts.scheme)
        if tls is None or not parts.hostname:
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"not a hub URL: {url!r}")
        return cls(
            host=parts.hostname,
            port=port or (443 if tls else 80),
            tls=tls,
            host_header=parts.netloc,
        )


# --- request targets -------------------------------------------------------------------------


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


def control_target(device_id: str) -> str:
    """The target of a device's control channel: ``/devices/{deviceId}/streams``."""
    return f"/devices/{_quote(device_id)}/streams"


def device_target(device_id: str | None = None) -> str:
    """The registry's target of one device (``/devices/{deviceId}``), or of the list."""
    return "/devices" if device_id is None else f"/devices/{_quote(device_id)}"


def policy_target(name: str | None = None) -> str:
    """The registry's target of one shared-access policy (``/policies/{keyName}``), or of the
    list."""
    return "/policies" if name is None else f"/policies/{_quote(name)}"


def rotate_key_target(target: str, *, secondary: bool = False) -> str:
    """The target that rotates a key of the device or policy at *target* (from
    :func:`device_target` or :func:`policy_target`): ``…/rotate-key?key=primary|secondary``."""
    return f"{target}/rotate-key?key={'secondary' if secondary else 'primary'}"


#: The registry's target of the devices online and streams open (``RegistryRead``).
STREAMS_TARGET: Final = "/streams"


@functools.lru_cache(maxsize=256)
def initiate_target(device_id: str, stream_name: str, api_version: str = API_VERSION) -> str:
    """The target of an initiate: ``/twins/{deviceId}/streams/{streamName}?api-version=…``.
    Cached: a service opens stream after stream to the same devices and names."""
    return (
        f"/twins/{_quote(device_id)}/streams/{_quote(stream_name)}"
        f"?api-version={_quote(api_version)}"
    )


def stream_url(ws_base_url: str, stream_id: str, role: Role) -> str:
    """The URL a side joins its stream at: ``{ws_base_url}/bridges/{streamId}?role=…``."""
    return f"{ws_base_url}/bridges/{stream_id}?role={role.value}"


class StreamUrl(NamedTuple):
    """A stream's URL taken apart: the hub to connect to, the request target, the stream id."""

    address: HubAddress
    target: str
    stream_id: str


#: A URL as the hub makes a stream's: ``ws`` or ``wss``, a host name or IPv4 address and a
#: port, a path, a query; no user, fragment, space or control character. ``urlsplit`` reads
#: such a URL into these four parts; any other URL is left to it.
_PLAIN_URL: Final = re.compile(
    r"(wss?)://([-.0-9A-Za-z]+(?::[0-9]*)?)(/[^?#\x00-\x20\x7f]*)(?:\?([^#\x00-\x20\x7f]*))?"
)


@functools.lru_cache(maxsize=64)
def parse_stream_url(url: str) -> StreamUrl:
    """The hub, the request target and the stream id of a stream's URL (raises
    :class:`HubUnreachable` if it names no hub). Cached: a side parses its stream's URL for
    the join and again for each resume soon after."""
    try:
        plain = _PLAIN_URL.fullmatch(url)
        if plain is not None:  # the usual case, in fewer steps than urlsplit's
            scheme, netloc, path, query = plain.groups("")
        else:
            # ValueError for an unclosed [IPv6 literal]
            scheme, netloc, path, query, _ = urllib.parse.urlsplit(url)
        address = _hub_of(scheme, netloc)
    except (ValueError, HubUnreachable):
        raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"not a hub URL: {url!r}") from None
    target = path + (f"?{query}" if query else "")
    return StreamUrl(address, target, path.rsplit("/", 1)[-1])


@functools.lru_cache(maxsize=16)
def _hub_of(scheme: str, netloc: str) -> HubAddress:
    """The hub of a URL with *scheme* and *netloc* (every stream of a hub has the same):
    what :meth:`HubAddress.from_url` says of it, worked out once."""
    return HubAddress.from_url(f"{scheme}://{netloc}")


def resume_token(headers: Sequence[tuple[bytes, bytes]]) -> str:
    """The resume credential a devstream.v1 side's ``101`` carries
    (``devstream-resume-token``; names lower-case), or ``""`` when it has none."""
    for name, value in headers:
        if name == HEADER_RESUME_TOKEN:
            return value.decode("ascii", "replace")
    return ""


def bearer(token: str) -> str:
    """The ``Authorization`` value that joins a stream with *token*."""
    return f"Bearer {token}"


def parse_bearer(value: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value (scheme in any case), or None."""
    if value is None:
        return None
    scheme, _, token = value.decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() == "bearer" and token:
        return token
    return None


# --- the JSON error body ---------------------------------------------------------------------


def build_error_body(code: ErrorCode, message: str | None = None) -> bytes:
    """The JSON body of an error answer: ``{"errorCode": <number>, "message": <text>}``
    (the code's default message when *message* is None)."""
    return json.dumps(
        {"errorCode": int(code), "message": message if message is not None else code.message}
    ).encode()


def parse_error_body(body: bytes) -> tuple[ErrorCode | None, str]:
    """The error code and message of an error body made by :func:`build_error_body`.

    Tolerant: a body that is not a JSON object with a known numeric ``errorCode`` gives
    ``(None, text)``, *text* being the body's first :data:`MAX_ERROR_TEXT` bytes. A missing
    ``message`` reads as ``""``.
    """
    try:
        value = json.loads(body)
        return ErrorCode(int(value["errorCode"])), str(value.get("message", ""))
    except (ValueError, KeyError, TypeError, OverflowError, RecursionError):
        return None, body[:MAX_ERROR_TEXT].decode("utf-8", "replace")


def error_from_response(status: int, body: bytes) -> HubError:
    """The exception for an error answer: the class for the body's code, or a
    :class:`HubError` with ``SERVER_ERROR`` naming the status when the body has no code."""
    code, message = parse_error_body(body)
    if code is None:
        return HubError(ErrorCode.SERVER_ERROR, f"hub answered HTTP {status}")
    return error_for(code, message or None)


# --- the initiate request --------------------------------------------------------------------


class InitiateRequest(NamedTuple):
    """An initiate as a client sends it. The one-step open sends the same target and headers
    as a ``GET`` WebSocket upgrade."""

    method: str
    target: str
    #: Header fields, names lower-case (the caller adds ``Authorization``).
    headers: list[tuple[str, str]]


def build_initiate_request(
    device_id: str,
    stream_name: str,
    *,
    connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
    response_timeout: int = DEFAULT_RESPONSE_TIMEOUT,
    mode: str = MODE_RAW,
    window: int | None = None,
    api_version: str = API_VERSION,
) -> InitiateRequest:
    """The initiate of a stream to *device_id*'s *stream_name*.

    The mode header is left out for ``raw`` (what the hub assumes, and all an Azure client
    knows); the window header is sent when *window* is given (the device adopts it, so both
    ends agree on it).
    """
    headers = [
        (HEADER_CONNECT_TIMEOUT.decode(), str(connect_timeout)),
        (HEADER_RESPONSE_TIMEOUT.decode(), str(response_timeout)),
    ]
    if mode != MODE_RAW:
        headers.append((HEADER_STREAM_MODE.decode(), mode))
    if window is not None:
        headers.append((HEADER_STREAM_WINDOW.decode(), str(window)))
    return InitiateRequest("POST", initiate_target(device_id, stream_name, api_version), headers)


class InitiateHeaders(NamedTuple):
    """What the hub reads from an initiate's headers (a tuple: made once per initiate, on the
    stream setup's path, where a frozen dataclass costs three times as much)."""

    #: Seconds (whole) for the device to join, and to answer the stream request.
    connect_timeout: float
    response_timeout: float
    #: ``raw`` or ``devstream.v1``.
    mode: str
    #: The devstream.v1 window the service asked for, or None.
    window: int | None


def _first_values(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """Each header's first value (a dict built from the end, so the first one stays)."""
    return dict(reversed(headers))


#: The headers of an initiate that the hub reads (names lower-case).
_INITIATE_HEADERS: Final = frozenset(
    (HEADER_CONNECT_TIMEOUT, HEADER_RESPONSE_TIMEOUT, HEADER_STREAM_MODE, HEADER_STREAM_WINDOW)
)


def _initiate_values(headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, bytes]:
    """The value of each initiate header present. One given twice is ``ARGUMENT_INVALID``: no
    reading of two would be the obvious one (a proxy may take the other)."""
    found: dict[bytes, bytes] = {}
    for name, value in headers:
        if name in _INITIATE_HEADERS:
            if name in found:
                raise RemoteProtocolError(
                    ErrorCode.ARGUMENT_INVALID, f"{name.decode()} may appear once"
                )
            found[name] = value
    return found


def _timeout(raw: bytes | None, name: bytes, default: float, maximum: float) -> float:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if not 1 <= value <= maximum:
        raise RemoteProtocolError(
            ErrorCode.ARGUMENT_INVALID,
            f"{name.decode()} must be a whole number of seconds from 1 to {int(maximum)}",
        )
    return float(value)


def parse_initiate_headers(
    headers: Sequence[tuple[bytes, bytes]], *, default_timeout: float, max_timeout: float
) -> InitiateHeaders:
    """Read an initiate's headers (names lower-case), as the hub does.

    A timeout header absent gives *default_timeout*; present, it must be a whole number from
    1 to *max_timeout*. Each may appear once. The checks run in a fixed order (a header
    repeated, connect timeout, response timeout, mode, window), and the first that fails
    raises :class:`RemoteProtocolError` (``ARGUMENT_INVALID``) naming the header.
    """
    found = _initiate_values(headers)
    connect = _timeout(
        found.get(HEADER_CONNECT_TIMEOUT), HEADER_CONNECT_TIMEOUT, default_timeout, max_timeout
    )
    response = _timeout(
        found.get(HEADER_RESPONSE_TIMEOUT), HEADER_RESPONSE_TIMEOUT, default_timeout, max_timeout
    )
    raw = found.get(HEADER_STREAM_MODE)
    mode = MODE_RAW if raw is None else raw.decode("latin-1").strip()
    if mode not in STREAM_MODES:
        raise RemoteProtocolError(
            ErrorCode.ARGUMENT_INVALID,
            f"{HEADER_STREAM_MODE.decode()} must be one of {', '.join(sorted(STREAM_MODES))}",
        )
    raw = found.get(HEADER_STREAM_WINDOW)
    window: int | None = None
    if raw is not None:
        try:
            window = int(raw)
        except ValueError:
            window = -1
        if not MIN_WINDOW <= window <= MAX_WINDOW:
            raise RemoteProtocolError(
                ErrorCode.ARGUMENT_INVALID,
                f"{HEADER_STREAM_WINDOW.decode()} must be a whole number of bytes from "
                f"{MIN_WINDOW} to {MAX_WINDOW}",
            )
    return InitiateHeaders(connect, response, mode, window)


# --- the initiate's answer -------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True, slots=True)
class InitiateAccepted:
    """The device accepted: join the stream at *url*.

    *token* is the service's stream token; None in a one-step open's answer, whose connection
    is the service's side of the stream already (*url* is then where it resumes).
    """

    url: str
    token: str | None
    mode: str
    window: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class InitiateRejected:
    """The device (or the hub on its behalf) said no, with the code and the reason."""

    code: ErrorCode
    message: str

    def error(self) -> HubError:
        """The exception a client raises for it (``StreamRejected``, …)."""
        return error_for(self.code, self.message)


@dataclass(frozen=True, slots=True)
class OneStepUnsupported:
    """The hub does not open streams in one step: initiate with a ``POST`` instead."""


class InitiateAnswer(NamedTuple):
    """An initiate's answer as the hub sends it (headers in the order they go out)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


def build_initiate_answer(outcome: InitiateAccepted | InitiateRejected) -> InitiateAnswer:
    """The hub's ``200`` answer to an initiate, Azure's way.

    Accepted: ``is-accepted: True``, the URL, the token (unless None), the mode and the
    window (if any), no body. A one-step open sends these headers with its ``101``.
    Rejected: ``is-accepted: False`` and the JSON error body.
    """
    if isinstance(outcome, InitiateRejected):
        return InitiateAnswer(
            200,
            [(HEADER_IS_ACCEPTED, NOT_ACCEPTED), (b"content-type", JSON_CONTENT_TYPE)],
            build_error_body(outcome.code, outcome.message),
        )
    return InitiateAnswer(
        200, accepted_headers(outcome.url, outcome.token, outcome.mode, outcome.window), b""
    )


def accepted_headers(
    url: str, token: str | None, mode: str, window: int | None
) -> list[tuple[bytes, bytes]]:
    """The headers of an accepted answer (see :func:`build_initiate_answer`), for a hub that
    has the fields at hand: no :class:`InitiateAccepted` made on the stream setup's path."""
    headers = [(HEADER_IS_ACCEPTED, ACCEPTED), (HEADER_STREAM_URL, url.encode())]
    if token is not None:
        headers.append((HEADER_AUTH_TOKEN, token.encode()))
    headers.append((HEADER_STREAM_MODE, mode.encode()))
    if window is not None:
        headers.append((HEADER_STREAM_WINDOW, str(window).encode()))
    return headers


def _incomplete(one_step: bool) -> HubError:
    what = "one-step answer" if one_step else "answer"
    return HubError(ErrorCode.PROTOCOL_ERROR, f"the hub's {what} is incomplete")


def parse_initiate_answer(
    status: int,
    headers: Sequence[tuple[bytes, bytes]],
    body: bytes,
    *,
    one_step: bool = False,
    mode: str | None = None,
) -> InitiateAccepted | InitiateRejected | OneStepUnsupported:
    """Read the hub's answer to an initiate (header names lower-case).

    A ``POST``'s answer (*one_step* false): ``200`` with ``is-accepted: True`` is
    :class:`InitiateAccepted` (it must name a URL and a token); ``200`` otherwise is
    :class:`InitiateRejected` with the body's code (``STREAM_REJECTED`` if it has none); any
    other status raises the exception for the body's code (:func:`error_from_response`).

    A one-step open's answer (*one_step* true, *mode* the mode asked for): ``101`` is
    :class:`InitiateAccepted` with no token (it must be accepted, name a URL, and grant
    *mode*); ``405``, or ``404`` without a devstream error code, is
    :class:`OneStepUnsupported`; ``200`` is :class:`InitiateRejected`; anything else raises
    as above. An incomplete accepted answer raises :class:`HubError` (``PROTOCOL_ERROR``).
    """
    if status == 200 and not one_step:
        found = _first_values(headers)
        if found.get(HEADER_IS_ACCEPTED) == ACCEPTED:
            return _accepted(found, one_step=False, mode=None)
        return _rejected(body)
    if one_step:
        if status == 101:
            return _accepted(_first_values(headers), one_step=True, mode=mode)
        if status == 200:
            return _rejected(body)
        if status == 405 or (status == 404 and parse_error_body(body)[0] is None):
            return OneStepUnsupported()
    raise error_from_response(status, body)


def _rejected(body: bytes) -> InitiateRejected:
    code, message = parse_error_body(body)
    if code is None:
        return InitiateRejected(
            code=ErrorCode.STREAM_REJECTED, message=ErrorCode.STREAM_REJECTED.message
        )
    return InitiateRejected(code=code, message=message or code.message)


def _accepted(found: dict[bytes, bytes], *, one_step: bool, mode: str | None) -> InitiateAccepted:
    try:
        url = found.get(HEADER_STREAM_URL, b"").decode()
        raw_token = found.get(HEADER_AUTH_TOKEN)
        token = None if raw_token is None else raw_token.decode()
        granted = found.get(HEADER_STREAM_MODE, _RAW).decode()
    except UnicodeDecodeError:
        raise _incomplete(one_step) from None
    if (
        found.get(HEADER_IS_ACCEPTED) != ACCEPTED
        or not url
        or (one_step and mode is not None and granted != mode)
        or (not one_step and not token)
    ):
        raise _incomplete(one_step)
    raw_window = found.get(HEADER_STREAM_WINDOW)
    window: int | None = None
    if raw_window is not None:
        try:
            window = int(raw_window)
        except ValueError:
            window = None  # the window is the service's own choice; the hub only echoes it
    return InitiateAccepted(url=url, token=None if one_step else token, mode=granted, window=window)
