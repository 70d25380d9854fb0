"""A client's HTTP request to the hub and the reading of its answer, sans-IO (h11 underneath).

:class:`ResponseReader` holds one exchange: :attr:`ResponseReader.request` is the bytes to
write; then the driver feeds what it reads (``b""`` once the hub hung up) to
:meth:`ResponseReader.receive_data` until it returns a :class:`Response` (None: it needs more
bytes), or raises. The driver's loop is the same for every I/O layer::

    reader = ResponseReader("POST", target, fields, body, where=host, tls=tls)
    write(reader.request)
    while (answer := reader.receive_data(read())) is None:
        pass

Rules every change must keep:

* **Errors are the core's classes**, never h11's. An answer that is not HTTP at all (the hub
  hung up before its first byte, or sent bytes HTTP cannot read) raises what
  :func:`devstream_core.diagnosis.no_http_answer` makes of the first bytes read; an answer
  that goes wrong after its head, or ends before its body did, raises
  :class:`~devstream_core.exceptions.HubUnreachable`; a body longer than ``max_body``, a
  :class:`~devstream_core.errors.RemoteProtocolError` with ``PAYLOAD_TOO_LARGE`` (a client
  reports it as the hub unreachable, with its message).
* **The same answer however it is cut into reads.** An answer HTTP cannot read is diagnosed
  from its first :data:`~devstream_core.diagnosis.QUOTED_BYTES` bytes, or all of them if the
  hub hung up sooner: until they have come, the reader asks for more even when h11 has
  refused what came (a TLS alert read one byte at a time is still a TLS answer).
* **Bounded**: the body is kept up to ``max_body`` bytes (the head up to h11's limit), and of
  what arrives only the first :data:`~devstream_core.diagnosis.QUOTED_BYTES` bytes besides.
* **A WebSocket handshake ends at its answer's head** (``upgrade=True``): an interim ``1xx``
  is the answer there (RFC 6455 §4.1 takes any status but ``101`` as a refusal); the bytes
  that came after a ``101``'s head are the first WebSocket frames (:attr:`Response.trailing`).
  Otherwise an interim ``1xx`` is skipped, as HTTP asks, except a ``101``.
* One exchange per reader: once it has answered or raised, feeding it more is a
  :class:`~devstream_core.errors.LocalProtocolError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import h11

from . import diagnosis
from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from .exceptions import HubUnreachable

__all__ = ["MAX_BODY", "Response", "ResponseReader"]

#: The longest answer body a client reads by default (the hub's answers are small JSON).
MAX_BODY = 1024 * 1024

Headers = list[tuple[bytes, bytes]]


@dataclass(frozen=True, kw_only=True)
class Response:
    """The hub's answer: its status, its header fields (names lower-case, in order), its
    body, the bytes that followed a ``101``'s head (the first WebSocket frames, if any), and
    whether the connection may carry another request (the request did not ask to close it,
    the answer did not either, and nothing more came after it)."""

    status: int
    headers: Headers
    body: bytes = b""
    trailing: bytes = b""
    reusable: bool = False


class ResponseReader:
    """One HTTP/1.1 request to the hub at *where* (``host:port``, for messages), and its
    answer. *fields* go out in order (``Host`` among them), with ``Content-Length`` added
    when there is a *body*; *tls* says whether the connection is TLS (for the diagnosis of
    an answer that is not HTTP)."""

    def __init__(
        self,
        method: str,
        target: str,
        fields: Sequence[tuple[str, str]],
        body: bytes | None = None,
        *,
        where: str,
        tls: bool,
        max_body: int = MAX_BODY,
        upgrade: bool = False,
    ) -> None:
        self._conn = h11.Connection(h11.CLIENT)
        self._where = where
        self._tls = tls
        self._max_body = max_body
        self._upgrade = upgrade
        all_fields = list(fields)
        if body is not None:
            all_fields.append(("content-length", str(len(body))))
        conn = self._conn
        data = conn.send(h11.Request(method=method, target=target, headers=all_fields)) or b""
        if body:
            data += conn.send(h11.Data(data=body)) or b""
        #: The request's bytes, to write before reading the answer.
        self.request: bytes = data + (conn.send(h11.EndOfMessage()) or b"")
        self._head: h11.Response | None = None
        self._body = bytearray()
        self._first = b""  # the answer's first bytes, to say what it was if not HTTP
        #: h11's words on an answer it refused before its head: the diagnosis waits for the
        #: first bytes (or the hang-up).
        self._refused: str | None = None
        self._done = False

    def receive_data(self, data: bytes) -> Response | None:
        """Feed what a read brought (``b""``: the hub hung up); return the answer once it is
        whole, None while more is needed. Raises as the module's rules say."""
        if self._done:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "the answer was already read")
        if len(self._first) < diagnosis.QUOTED_BYTES:
            self._first += data[: diagnosis.QUOTED_BYTES - len(self._first)]
        try:
            answer = None
            if self._refused is None:
                self._conn.receive_data(data)
                answer = self._next()
            if self._refused is not None and (not data or self._quoted):
                raise self._not_http(self._refused)
        except BaseException:
            self._done = True
            raise
        self._done = answer is not None
        return answer

    def _next(self) -> Response | None:
        conn = self._conn
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if self._head is None:
                    self._refused = str(exc)
                    return None
                raise HubUnreachable(
                    ErrorCode.HUB_UNREACHABLE,
                    f"bad HTTP answer from the hub at {self._where}: {exc}",
                ) from None
            if event is h11.NEED_DATA:
                return None
            if isinstance(event, h11.InformationalResponse):
                if self._upgrade or event.status_code == 101:
                    return Response(
                        status=event.status_code,
                        headers=_lower(event.headers),
                        trailing=bytes(conn.trailing_data[0]),
                    )
            elif isinstance(event, h11.Response):
                self._head = event
            elif isinstance(event, h11.Data):
                self._body += event.data
                if len(self._body) > self._max_body:
                    raise RemoteProtocolError(
                        ErrorCode.PAYLOAD_TOO_LARGE,
                        f"the answer of the hub at {self._where} is larger than "
                        f"{self._max_body} bytes",
                    )
            else:
                # The end of the message. h11 raises on a close before it (a close before
                # the answer included), and PAUSED cannot come: the reader stops at a 101
                # and at the end of a message.
                assert isinstance(event, h11.EndOfMessage), event
                assert self._head is not None  # h11 ends only a message it began
                return Response(
                    status=self._head.status_code,
                    headers=_lower(self._head.headers),
                    body=bytes(self._body),
                    reusable=conn.our_state is h11.DONE
                    and conn.their_state is h11.DONE
                    and not conn.trailing_data[0],
                )

    @property
    def _quoted(self) -> bool:
        """The first bytes a diagnosis quotes have all arrived."""
        return len(self._first) >= diagnosis.QUOTED_BYTES

    def _not_http(self, detail: str) -> HubUnreachable:
        return diagnosis.no_http_answer(self._where, self._first, tls=self._tls, detail=detail)


def _lower(fields: Sequence[tuple[bytes, bytes]]) -> Headers:
    return [(bytes(name).lower(), bytes(value)) for name, value in fields]
