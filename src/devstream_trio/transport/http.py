"""HTTP/1.1 over any ``trio.abc.Stream`` with h11, and the WebSocket opening handshake.

Server side: :class:`HttpServerConnection` reads requests with hard limits (header size, body
size, time to receive a whole request), answers them, and upgrades a request to a
:class:`~devstream_trio.transport.websocket.WebSocket`. Client side: :func:`http_request` and
:func:`websocket_connect` speak to a hub over a stream the caller opened.

The messages of a WebSocket handshake that go as expected skip h11: the hub reads a plain
upgrade request that came whole in the connection's first read, and writes its ``101``
itself; the client writes its upgrade request and reads a plain ``101`` itself. Both readers
take only what h11's rules allow for names, values and targets, and leave anything else to h11
with the bytes already read (differential tests and fuzz harnesses hold them to h11's
reading). Everything else goes through h11.

Errors the peer causes become :class:`HttpError` with an :class:`ErrorCode`; the server answers
them with a JSON body ``{"errorCode": …, "message": …}`` and the status taken from the code.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import h11
import trio

from devstream_core import handshake, websocket
from devstream_core.errors import DevstreamError, ErrorCode, RemoteProtocolError
from devstream_core.handshake import REQUEST_TARGET as _REQUEST_TARGET
from devstream_core.handshake import accept_token, request_head
from devstream_core.handshake import header_line as _header_line
from devstream_core.response import Response, ResponseReader
from devstream_core.wire import JSON_CONTENT_TYPE, build_error_body, parse_error_body

from . import io as _io
from . import mask as _mask
from .websocket import WebSocket, close_forcefully

__all__ = [
    "HttpError",
    "HttpRequest",
    "HttpResponse",
    "HttpServerConnection",
    "HttpStatusError",
    "accept_token",
    "close_forcefully",
    "error_body",
    "http_request",
    "parse_101",
    "parse_upgrade_request",
    "websocket_connect",
]

_RECEIVE_SIZE = 65536
#: One header line as :func:`_plain_fields` takes it: a name, a colon, the value with the
#: spaces and tabs around it left out: the core's ``FIELD_NAME`` and ``FIELD_VALUE`` (of a
#: stripped value) in one regular expression, so that a line is read in one call. Trailing
#: spaces only after a value (``FIELD_VALUE`` without its final ``?``, which makes it
#: optional), so a line of spaces that fails, fails in linear time.
assert handshake.FIELD_VALUE.pattern.endswith(b")?")
_FIELD_LINE = re.compile(
    b"(" + handshake.FIELD_NAME.pattern + rb"):[\t ]*"
    b"(?:(" + handshake.FIELD_VALUE.pattern[:-1] + rb")[\t ]*)?"
)
#: The status line and the header lines of a ``101`` the client reads itself; anything else
#: (another status, another HTTP version, a line these refuse) goes to h11.
_STATUS_101 = re.compile(rb"HTTP/1\.1 101(?: [\t\x20-\x7e\x80-\xff]*)?")
#: Header fields whose values h11 checks in every response: a 101 with one goes to h11.
_FRAMING_FIELDS = frozenset({b"content-length", b"transfer-encoding"})
#: Where h11 ends a head: the first empty line, with or without its carriage return.
_BLANK_LINE = re.compile(rb"\n\r?\n")
#: The longest response head the client reads (h11's default limit).
_MAX_RESPONSE_HEAD = 16 * 1024
#: What a ``426`` adds after ``connection: close`` (see send_error).
_UPGRADE_REQUIRED = (
    ", upgrade\r\nupgrade: websocket\r\n"
    f"sec-websocket-version: {handshake.WEBSOCKET_VERSION.decode()}"
)
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    412: "Precondition Failed",
    413: "Payload Too Large",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}

Headers = list[tuple[bytes, bytes]]


class HttpError(DevstreamError):
    """A request the server refuses; answered with the code's status and a JSON body, and
    *headers* (an ``Allow`` for a ``405``)."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        super().__init__(code, message)
        self.headers = headers


#: The JSON body of an error response (the hub's and every client's shape, from the core).
error_body = build_error_body

#: Where h11's account of a malformed request starts quoting the request's own bytes
#: (``illegal header line: bytearray(b'...')``, ``Illegal header value b'...'``).
_QUOTED_BYTES = re.compile(r":?\s*(?:bytearray\()?b['\"]")
#: The longest account of what was malformed that an error repeats.
_MAX_REASON = 100


def _malformed_request(exc: h11.ProtocolError) -> HttpError:
    """``MALFORMED_REQUEST`` for a request h11 refused: what was wrong, in h11's words, but
    none of the request's bytes. The answer and the hub's log repeat the message, and a line
    h11 refuses may be an ``Authorization`` header carrying a valid SAS token."""
    reason = _QUOTED_BYTES.split(str(exc), maxsplit=1)[0].strip()
    if not reason or len(reason) > _MAX_REASON or "'" in reason or '"' in reason:
        return HttpError(ErrorCode.MALFORMED_REQUEST, "malformed HTTP request")
    return HttpError(ErrorCode.MALFORMED_REQUEST, f"malformed HTTP request: {reason}")


@dataclass(frozen=True, kw_only=True)
class _HttpMessage:
    headers: Headers
    body: bytes = b""

    def header(self, name: bytes) -> bytes | None:
        """The first value of header *name* (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, kw_only=True)
class HttpRequest(_HttpMessage):
    """One request as the server received it (header names lower-cased)."""

    method: bytes
    target: bytes
    #: The HTTP version of the request line, as h11 gives it (``b"1.0"`` or ``b"1.1"``).
    http_version: bytes = b"1.1"

    def header(self, name: bytes) -> bytes | None:
        """The first value of header *name* (lower-case), or None."""
        values = self.field_values.get(name)
        return values[0] if values else None

    def header_tokens(self, name: bytes, *, lower: bool = True) -> list[str]:
        """Every comma-separated token of every *name* header, stripped (and lower-cased)."""
        tokens: list[str] = []
        for value in self.field_values.get(name, ()):
            tokens.extend(t.strip() for t in value.decode("latin-1").split(","))
        return [t.lower() if lower else t for t in tokens if t]

    # The four below are worked out once (the hub asks more than once) and kept in the
    # instance's dictionary: functools.cached_property takes a lock on each first look in
    # Python 3.11, and the hub looks at every request.

    @property
    def field_values(self) -> dict[bytes, list[bytes]]:
        """Each header's values by name, in order (read in one pass, for every lookup)."""
        found: dict[bytes, list[bytes]] | None = self.__dict__.get("_values")
        if found is None:
            found = self.__dict__["_values"] = handshake.field_values(self.headers)
        return found

    @property
    def subprotocols(self) -> list[str]:
        """The WebSocket subprotocols the client offers, in its order and spelling."""
        found: list[str] | None = self.__dict__.get("_subprotocols")
        if found is None:
            found = self.header_tokens(b"sec-websocket-protocol", lower=False)
            self.__dict__["_subprotocols"] = found
        return found

    @property
    def is_websocket_upgrade(self) -> bool:
        """True when the request asks to open a WebSocket (``Upgrade: websocket`` and
        ``Connection: Upgrade``); :meth:`HttpServerConnection.next_request` has then checked
        the rest of its handshake."""
        asks: bool | None = self.__dict__.get("_asks")
        if asks is None:
            asks = self.__dict__["_asks"] = handshake.asks_for_websocket(
                self.headers, values=self.field_values
            )
        return asks

    @property
    def websocket_key(self) -> bytes:
        """The key of a WebSocket handshake the hub takes (the core's
        :func:`~devstream_core.handshake.check_request`); :class:`HttpError` if it refuses
        it."""
        key: bytes | None = self.__dict__.get("_key")
        if key is None:
            try:
                key = handshake.check_request(
                    self.method, self.http_version, self.headers, values=self.field_values
                )
            except RemoteProtocolError as exc:
                raise HttpError(exc.code, exc.message) from None
            self.__dict__["_key"] = key
        return key


@dataclass(frozen=True, kw_only=True)
class HttpResponse(_HttpMessage):
    """One response as the client received it (header names lower-cased)."""

    status: int
    #: True when the connection may carry another request (kept alive, nothing left over).
    reusable: bool = False


@dataclass
class HttpServerConnection:
    """The server side of one HTTP/1.1 connection, with limits on everything the client sends.

    ``header_timeout`` bounds the time from the first byte of a request (or from the start of
    the connection, for the first request) until its headers and body have arrived; a client
    that trickles its headers gets ``408``. ``idle_timeout`` bounds the wait for the next
    request on a kept-alive connection.
    """

    stream: trio.abc.Stream
    max_header_size: int = 16384
    max_body_size: int = 65536
    header_timeout: float = 10.0
    idle_timeout: float = 30.0
    #: h11's state of the connection, made when first needed: a WebSocket upgrade read whole
    #: by :func:`parse_upgrade_request` and accepted never needs it.
    _h11: h11.Connection | None = field(default=None, init=False)
    _first: bool = field(default=True, init=False)
    _done: bool = field(default=False, init=False)
    _upgrade_pending: bool = field(default=False, init=False)
    #: The head of a request read without h11 (see parse_upgrade_request), until h11 is given it:
    #: only an answer that is not a ``101`` needs h11 to have seen the request.
    _unseen_head: bytes | None = field(default=None, init=False)
    #: What came after that head (the client's first WebSocket frames, if any).
    _after_head: bytes = field(default=b"", init=False)
    #: Bytes received on the connection so far: while at most ``max_header_size``, no head
    #: can be larger, and measuring one is skipped.
    _received: int = field(default=0, init=False)

    @property
    def conn(self) -> h11.Connection:
        """h11's state of the connection (made on first use)."""
        if self._h11 is None:
            self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_header_size)
        return self._h11

    async def next_request(self) -> HttpRequest | None:
        """Read the next request; None when the client closed or idled out between requests.

        Raises :class:`HttpError` for a malformed, oversized or too slow request, and for a
        request that asks to open a WebSocket with a handshake the hub refuses (the checks
        are :func:`devstream_core.handshake.check_request`'s), whichever way it was read.
        A request whose body length is given twice, by ``Content-Length`` and by
        ``Transfer-Encoding``, is refused too (``MALFORMED_REQUEST``): RFC 9112 §6.1 has the
        server close such a connection after answering, since a proxy in front may have cut
        the bytes into requests differently.
        """
        if self._done:
            return None
        self._show_h11()
        if not self._first:
            if self.conn.our_state is h11.MUST_CLOSE or self.conn.their_state is h11.MUST_CLOSE:
                return None
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None
        started = self._first
        self._first = False
        deadline = trio.current_time() + (self.header_timeout if started else self.idle_timeout)
        request: h11.Request | None = None
        headers: Headers = []
        body = bytearray()
        got_bytes = False
        while True:
            try:
                # Before h11 is made it has been given nothing, and would ask for data.
                event = h11.NEED_DATA if self._h11 is None else self._h11.next_event()
            except h11.RemoteProtocolError as exc:
                if exc.error_status_hint == 431:
                    raise HttpError(ErrorCode.HEADERS_TOO_LARGE) from exc
                raise _malformed_request(exc) from exc
            if event is h11.NEED_DATA:
                data: bytes | bytearray | None = None
                tried = self._received == 0
                try:
                    if tried:
                        # The first read of a connection, right after its task started: the
                        # request is usually there already, taken without a timer.
                        data = _io.receive_ready(self.stream, _RECEIVE_SIZE)
                    if data is None:
                        with trio.move_on_at(deadline):
                            data = await _io.receive_some(
                                self.stream, _RECEIVE_SIZE, wait_first=tried
                            )
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if data is None:  # the deadline passed
                    if not got_bytes and request is None and not started:
                        return None
                    raise HttpError(ErrorCode.REQUEST_TIMEOUT)
                if data and not got_bytes and not started:
                    # First byte of a kept-alive request: the header clock starts now.
                    deadline = trio.current_time() + self.header_timeout
                got_bytes = got_bytes or bool(data)
                self._received += len(data)
                if started and self._received == len(data):
                    # The connection's first read: a plain WebSocket upgrade that came whole,
                    # the usual case, is read here; anything else goes to h11.
                    plain = parse_upgrade_request(data, self.max_header_size)
                    if plain is not None:
                        request_read, head_end = plain
                        self._unseen_head = bytes(data[:head_end])
                        self._after_head = bytes(data[head_end:])
                        self._upgrade_pending = True
                        return _checked(request_read)
                self.conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Request):
                request = event
                headers = list(event.headers)  # h11 gives names lower-cased
                if _has_fields(headers, b"content-length", b"transfer-encoding"):
                    raise HttpError(
                        ErrorCode.MALFORMED_REQUEST,
                        "a request with both Content-Length and Transfer-Encoding",
                    )
                # h11 only bounds a head that is still incomplete; one that arrived whole in a
                # single read is measured here.
                if (
                    self._received > self.max_header_size
                    and _head_size(event, headers) > self.max_header_size
                ):
                    raise HttpError(ErrorCode.HEADERS_TOO_LARGE)
                length = _content_length(headers)
                if length is not None and length > self.max_body_size:
                    raise HttpError(ErrorCode.PAYLOAD_TOO_LARGE, "request body too large")
                if self.conn.they_are_waiting_for_100_continue:
                    # ``Expect: 100-continue``: the client sends the body once told to (curl
                    # waits a second for it, others until they give up).
                    interim = h11.InformationalResponse(status_code=100, headers=[])
                    await _io.send_all(self.stream, self.conn.send(interim) or b"")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.max_body_size:
                    raise HttpError(ErrorCode.PAYLOAD_TOO_LARGE, "request body too large")
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                # A request that asks to switch protocols: h11 pauses after it.
                self._upgrade_pending = _proposes_switch(request.method, headers)
                return _checked(_request(request, headers, body))
            elif isinstance(event, h11.ConnectionClosed):
                if request is None and not got_bytes:
                    return None
                raise HttpError(ErrorCode.MALFORMED_REQUEST, "connection closed mid-request")
            elif event is h11.PAUSED:
                # A request that asks to switch protocols, with its body already read.
                assert request is not None
                self._upgrade_pending = True
                return _checked(_request(request, headers, body))

    async def send_response(
        self,
        status: int,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes = b"",
        *,
        content_type: bytes | None = None,
    ) -> None:
        """Send a complete response with a ``Content-Length``."""
        self._show_h11()
        all_headers: Headers = list(headers)
        if content_type is not None:
            all_headers.append((b"content-type", content_type))
        all_headers.append((b"content-length", str(len(body)).encode()))
        if self._upgrade_pending:
            # Declining an upgrade: h11 would keep the connection paused; close it instead.
            all_headers.append((b"connection", b"close"))
        data = self.conn.send(
            h11.Response(status_code=status, headers=all_headers, reason=_REASONS.get(status, ""))
        )
        data = (data or b"") + (self.conn.send(h11.Data(data=body)) or b"") if body else data
        data = (data or b"") + (self.conn.send(h11.EndOfMessage()) or b"")
        await _io.send_all(self.stream, data)

    def _show_h11(self) -> None:
        """Give h11 the request read without it, so that it can answer it (or go on)."""
        head, self._unseen_head = self._unseen_head, None
        if head is None:
            return
        self.conn.receive_data(head)
        # parse_upgrade_request takes only requests that h11 reads whole (tests hold it to that);
        # were h11 to refuse one, the client gets the error h11's reading would have given.
        try:
            request = self.conn.next_event()
            end = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _malformed_request(exc) from exc
        if not isinstance(request, h11.Request) or not isinstance(end, h11.EndOfMessage):
            raise HttpError(ErrorCode.MALFORMED_REQUEST, "malformed HTTP request")
        if self._after_head:
            self.conn.receive_data(self._after_head)
            self._after_head = b""

    async def send_json(self, status: int, value: object, headers: Headers | None = None) -> None:
        """Send a JSON response."""
        await self.send_response(
            status,
            headers or [],
            json.dumps(value).encode(),
            content_type=JSON_CONTENT_TYPE,
        )

    async def send_error(
        self,
        code: ErrorCode,
        message: str | None = None,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answer with an error response and close the connection afterwards.

        Works in any state, including after h11 refused the request: the response is written
        directly and the connection is marked for closing. A ``426`` names what the hub
        requires: ``Upgrade: websocket`` (RFC 9110 §15.5.22, with the ``upgrade`` option in
        ``Connection``) and ``Sec-WebSocket-Version: 13`` (RFC 6455 §4.2.2).
        """
        body = error_body(code, message)
        status = code.http_status
        extra = "".join(f"{name.decode()}: {value.decode()}\r\n" for name, value in headers)
        head = (
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n"
            f"content-type: {JSON_CONTENT_TYPE.decode()}\r\n"
            f"content-length: {len(body)}\r\n{extra}"
            f"connection: close{_UPGRADE_REQUIRED if status == 426 else ''}\r\n\r\n"
        ).encode()
        self._first = False
        self._done = True
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await _io.send_all(self.stream, head + body)

    async def accept_websocket(
        self,
        request: HttpRequest,
        *,
        subprotocol: str | None = None,
        extra_headers: Headers | None = None,
        binary_only: bool = False,
    ) -> WebSocket:
        """Answer ``101 Switching Protocols`` and return the open WebSocket.

        The WebSocket keeps no handshake headers (the caller has *request*): a server may hold
        many idle WebSockets, and the request's headers are not needed once it is open.
        *binary_only*: a text message from the client closes it with 1003 (see
        :class:`devstream_core.websocket.Connection`).
        """
        if not self._upgrade_pending:  # h11 saw no Upgrade header in the request
            raise HttpError(
                ErrorCode.MALFORMED_REQUEST,
                "WebSocket request needs Connection: Upgrade and Upgrade: websocket",
            )
        key = request.websocket_key
        head = [
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: " + accept_token(key) + b"\r\n"
        ]
        if subprotocol is not None:
            head.append(_header_line(b"sec-websocket-protocol", subprotocol.encode()))
        head.extend(_header_line(name, value) for name, value in extra_headers or ())
        head.append(b"\r\n")
        # Written here, not by h11: the connection leaves HTTP with this response, and h11's
        # checks of a response the hub makes itself cost more than the rest of the handshake.
        await _io.send_all(self.stream, b"".join(head))
        if self._unseen_head is not None:
            trailing = self._after_head
        else:
            trailing, _ = self.conn.trailing_data
        ws = websocket.Connection(client=False, apply_mask=_mask.masker(), binary_only=binary_only)
        return WebSocket(self.stream, ws, subprotocol=subprotocol, initial_data=bytes(trailing))


def _request(request: h11.Request, headers: Headers, body: bytearray) -> HttpRequest:
    return HttpRequest(
        method=bytes(request.method),
        target=bytes(request.target),
        http_version=bytes(request.http_version),
        headers=headers,
        body=bytes(body),
    )


def _checked(request: HttpRequest) -> HttpRequest:
    """*request*, once a WebSocket handshake in it has passed the hub's checks and it has at
    most one ``Authorization``: the hub would read the first, and a proxy in front of it may
    have checked the other."""
    if len(request.field_values.get(b"authorization", ())) > 1:
        raise HttpError(ErrorCode.MALFORMED_REQUEST, "more than one Authorization header")
    if request.is_websocket_upgrade:
        request.websocket_key  # noqa: B018 - raises HttpError if the hub refuses it
    return request


def _proposes_switch(method: bytes, headers: Headers) -> bool:
    """True when a request proposes a protocol switch as h11 reads one (its documented rule:
    a ``CONNECT``, or an ``Upgrade`` header with a value; h11 then pauses after the request
    until the answer). Decided from the request itself: h11's name for that state is not
    among the names it exports."""
    return method == b"CONNECT" or _asks_upgrade(headers)


def _asks_upgrade(headers: Headers) -> bool:
    """True when *headers* hold an ``Upgrade`` with a value (an item that is not empty)."""
    return _has_upgrade_value([value for name, value in headers if name == b"upgrade"])


def _has_upgrade_value(values: Sequence[bytes]) -> bool:
    """True when an ``Upgrade`` field's *values* hold an item that is not empty."""
    return any(token.strip() for value in values for token in value.split(b","))


def _has_fields(headers: Headers, *names: bytes) -> bool:
    """True when *headers* hold a field of each of *names*."""
    present = {name for name, _ in headers}
    return all(name in present for name in names)


def parse_upgrade_request(data: bytes | bytearray, limit: int) -> tuple[HttpRequest, int] | None:
    """A plain WebSocket upgrade request at the start of *data*: the request (names
    lower-cased) and where its head ends; None for anything else, which h11 reads.

    Plain means: the head ends with ``\r\n\r\n`` within *limit* bytes, the request line is
    ``GET <target> HTTP/1.1`` with h11's rule for targets, every header line is
    ``name: value`` with h11's rules for both, exactly one ``Host``, an ``Upgrade`` with a
    value (h11 then waits for the switch), and no ``Content-Length`` or
    ``Transfer-Encoding`` (no body).
    """
    blank = _BLANK_LINE.search(data)  # where h11 sees the head end
    if blank is None or blank[0] != b"\n\r\n":
        return None
    end = blank.start() - 1
    if end < 0 or data[end] != 0x0D or end > limit:
        return None
    lines = bytes(data[:end]).split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        return None
    method, target, version = parts
    if method != b"GET" or version != b"HTTP/1.1" or not _REQUEST_TARGET.fullmatch(target):
        return None
    fields = _plain_fields(lines[1:])
    if fields is None:
        return None
    values = handshake.field_values(fields)
    if len(values.get(b"host", ())) != 1 or not _has_upgrade_value(values.get(b"upgrade", ())):
        return None
    request = HttpRequest(method=method, target=target, headers=fields)
    request.__dict__["_values"] = values  # (made already: see field_values)
    return request, end + 4


def _head_size(request: h11.Request, headers: Headers) -> int:
    """The size of a request's head on the wire, not counting optional whitespace."""
    size = len(request.method) + len(request.target) + len(b"  HTTP/1.1\r\n\r\n")
    return size + sum(len(k) + len(v) + len(b": \r\n") for k, v in headers)


def _content_length(headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    for key, value in headers:
        if key == b"content-length":  # h11 gives names lower-cased
            try:
                return int(value)
            except ValueError:
                return None
    return None


class HttpStatusError(Exception):
    """The hub answered a request (or a WebSocket handshake) with a non-success status."""

    def __init__(self, response: HttpResponse) -> None:
        self.response = response
        self.code, self.message = parse_error_body(response.body)
        super().__init__(f"HTTP {response.status}: {self.message}")


async def _read_response(
    stream: trio.abc.Stream, reader: ResponseReader, answer: Response | None = None
) -> Response:
    """Read from *stream* into *reader* until it has the whole answer (*answer*, if it had it
    already from what was fed before). The reader raises what an answer that goes wrong
    means (:mod:`devstream_core.response`)."""
    while answer is None:
        try:
            data = await _io.receive_some(stream, _RECEIVE_SIZE)
        except trio.BrokenResourceError as exc:
            raise DevstreamError(ErrorCode.HUB_UNREACHABLE, "connection lost") from exc
        answer = reader.receive_data(bytes(data))
    return answer


async def http_request(
    stream: trio.abc.Stream,
    *,
    method: str,
    host: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes | None = None,
    max_body: int = 16 * 1024 * 1024,
    keep_alive: bool = False,
) -> HttpResponse:
    """Send one request and return the response.

    The request says ``Connection: close`` unless *keep_alive*; then the response's
    ``reusable`` tells whether the connection can carry another request.
    """
    all_headers = [("host", host), *([] if keep_alive else [("connection", "close")]), *headers]
    reader = ResponseReader(
        method, target, all_headers, body, where=host, tls=_is_tls(stream), max_body=max_body
    )
    try:
        await _io.send_all(stream, reader.request)
    except trio.BrokenResourceError as exc:
        raise DevstreamError(ErrorCode.HUB_UNREACHABLE, "connection lost") from exc
    answer = await _read_response(stream, reader)
    return HttpResponse(
        status=answer.status,
        headers=answer.headers,
        body=answer.body,
        reusable=keep_alive and answer.reusable,
    )


def _is_tls(stream: trio.abc.Stream) -> bool:
    return isinstance(stream, trio.SSLStream)


async def websocket_connect(
    stream: trio.abc.Stream,
    *,
    host: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    subprotocols: Sequence[str] = (),
    nonce: bytes | None = None,
) -> WebSocket:
    """Run the client's opening handshake; raise :class:`HttpStatusError` if refused.

    The request is written here and a plain ``101`` is read here: h11's checks of a request
    the client makes itself, and its parse of the answer, cost more than the rest of the
    handshake. Names, values and the target are checked as h11 would; any other answer (a
    refusal and its body, or a response these strict rules refuse) goes through h11.

    A ``101`` that breaks RFC 6455 §4.1 (no ``Upgrade: websocket`` or ``Connection:
    Upgrade``, a wrong ``Sec-WebSocket-Accept``, an extension or a subprotocol the client did
    not offer; :func:`devstream_core.handshake.check_response` lists them) raises
    :class:`~devstream_core.errors.RemoteProtocolError` with ``HUB_UNREACHABLE`` and a
    message naming the field at fault.
    """
    key = handshake.client_key(nonce if nonce is not None else os.urandom(16))
    all_headers = handshake.upgrade_fields(host, key, headers, subprotocols)
    request = request_head(target, all_headers)
    try:
        await _io.send_all(stream, request)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        raise DevstreamError(ErrorCode.HUB_UNREACHABLE, "connection lost") from exc
    received, end, hung_up = await _receive_head(stream)
    response_headers = parse_101(received[:end]) if end >= 0 else None
    if response_headers is not None:
        trailing = received[end + 4 :]  # the first WebSocket frames, if any came with it
    else:
        # The request was written above: the reader's copy of it is not sent.
        reader = ResponseReader(
            "GET", target, all_headers, where=host, tls=_is_tls(stream), upgrade=True
        )
        answer = reader.receive_data(received)
        if answer is None and hung_up:
            answer = reader.receive_data(b"")
        answer = await _read_response(stream, reader, answer)
        if answer.status != 101:
            raise HttpStatusError(
                HttpResponse(status=answer.status, headers=answer.headers, body=answer.body)
            )
        response_headers = answer.headers
        trailing = answer.trailing
    # The same checks whichever way the 101 was read.
    chosen = handshake.check_response(response_headers, key=key, subprotocols=subprotocols)
    ws = websocket.Connection(client=True, apply_mask=_mask.masker())
    return WebSocket(
        stream,
        ws,
        subprotocol=chosen,
        handshake_headers=response_headers,
        initial_data=trailing,
    )


async def _receive_head(stream: trio.abc.Stream) -> tuple[bytes, int, bool]:
    """Read until a response head has ended; return what was read, where the head's
    ``\\r\\n\\r\\n`` starts, and whether the hub hung up. The place is -1 when the hub hung up
    first, the head grew past the limit, or it ends the way only h11 reads (a bare line feed)."""
    received = bytearray()
    while True:
        try:
            data = await _io.receive_some(stream, _RECEIVE_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # (Closed: a transport that a proxy or wrapper closed under the handshake.)
            raise DevstreamError(ErrorCode.HUB_UNREACHABLE, "connection lost") from exc
        if not data:
            return bytes(received), -1, True
        start = max(0, len(received) - 3)
        received += data
        blank = _BLANK_LINE.search(received, start)  # where h11 sees the head end
        if blank is not None:
            end = blank.start() - 1
            plain = blank[0] == b"\n\r\n" and end >= 0 and received[end] == 0x0D
            return bytes(received), end if plain else -1, False
        if len(received) > _MAX_RESPONSE_HEAD:
            return bytes(received), -1, False


def parse_101(head: bytes) -> Headers | None:
    """The header fields of a well-formed ``HTTP/1.1 101`` head (names lower-cased), or None
    for anything else."""
    lines = head.split(b"\r\n")
    if not _STATUS_101.fullmatch(lines[0]):
        return None
    return _plain_fields(lines[1:])


def _plain_fields(lines: Sequence[bytes]) -> Headers | None:
    """The header fields of a head's *lines* (names lower-cased, values without their
    surrounding spaces and tabs), or None if a line breaks h11's rules for names and values
    or is a ``Content-Length`` or ``Transfer-Encoding`` (which h11 checks, in a request or a
    response, and which the plain readers leave to it)."""
    fields: Headers = []
    line_match = _FIELD_LINE.fullmatch
    for line in lines:
        match = line_match(line)
        if match is None:
            return None
        name = match[1].lower()
        if name in _FRAMING_FIELDS:
            return None
        fields.append((name, match[2] or b""))
    return fields
