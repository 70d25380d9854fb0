"""The control channel between a device and the hub: its messages and its two state machines.

A device keeps one WebSocket (subprotocol ``devstream.control.v1``) open to the hub. Each
WebSocket message carries exactly one JSON object with a ``"type"`` member; this module knows
the five message types, how they look as JSON, and in which order each side may send them.
It knows nothing about sockets, WebSocket framing, clocks or timeouts: the adapter feeds it
the text (or fragments of text) it received and writes the text it is given back.

The exchange::

    device                                   hub
      Register(names)          ------->                    (again at any time: re-register)
                               <-------      Registered(names)
                               <-------      StreamRequest(request_id, name, url, token, mode)
      StreamResponse(request_id, accepted)  ------->
      ErrorMessage(code, message)  <------>  (either side, just before it closes)

Rules every change must keep:

* One table per side and direction (``DEVICE_SEND_TRANSITIONS`` and friends) maps
  ``(state, message type)`` to the next state. A pair missing from the table is a protocol
  error by construction. A few guards that a table cannot express (a ``Registered`` answers
  a ``Register``; a ``StreamResponse`` answers a pending ``StreamRequest``) are checked next
  to the table and documented on each class.
* Anything wrong that the peer sent raises :class:`RemoteProtocolError`; anything wrong that
  this program tried to send raises :class:`LocalProtocolError`. Either one poisons the
  machine (state ``ERROR``): every later ``send``/``receive`` raises
  ``LocalProtocolError(PROTOCOL_ERROR)``. The only exception is the hub's cap on outstanding
  requests (``THROTTLED``), which refuses one send and leaves the machine usable.
* Every buffer is bounded: a message is at most :data:`MAX_CONTROL_MESSAGE_SIZE` bytes of
  UTF-8 in at most :data:`MAX_CONTROL_MESSAGE_FRAGMENTS` WebSocket fragments (both checked
  while fragments arrive, before any JSON parsing), the hub tracks at most
  :data:`MAX_OUTSTANDING_REQUESTS` requests and remembers at most
  :data:`MAX_FORGOTTEN_REQUESTS` timed-out ones, a device at most
  :data:`MAX_PENDING_REQUESTS` unanswered ones.
* Stream tokens never appear in a ``repr``, an exception message or a log line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from .common import IdentityEnum, strict_json
from .errors import DevstreamError, ErrorCode, LocalProtocolError, RemoteProtocolError
from .framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL

__all__ = [
    "CONTROL_SUBPROTOCOL",
    "DEVICE_RECEIVE_TRANSITIONS",
    "DEVICE_SEND_TRANSITIONS",
    "HUB_RECEIVE_TRANSITIONS",
    "HUB_SEND_TRANSITIONS",
    "MAX_CONTROL_MESSAGE_FRAGMENTS",
    "MAX_CONTROL_MESSAGE_SIZE",
    "MAX_FORGOTTEN_REQUESTS",
    "MAX_OUTSTANDING_REQUESTS",
    "MAX_PENDING_REQUESTS",
    "MAX_REGISTERED_NAMES",
    "MODE_FRAMED",
    "MODE_RAW",
    "ControlMessage",
    "ControlState",
    "DeviceControl",
    "ErrorMessage",
    "HubControl",
    "MessageAssembler",
    "Register",
    "Registered",
    "StreamRequest",
    "StreamResponse",
    "decode_message",
    "encode_message",
    "is_valid_stream_name",
]

#: The WebSocket subprotocol of the control channel.
CONTROL_SUBPROTOCOL: Final = "devstream.control.v1"
#: The largest control message, in bytes of UTF-8.
MAX_CONTROL_MESSAGE_SIZE: Final = 64 * 1024
#: The most WebSocket fragments one control message may come in (empty ones count: each one
#: costs the receiver a little, whatever its size).
MAX_CONTROL_MESSAGE_FRAGMENTS: Final = 1024
#: The most names one ``Register`` may carry.
MAX_REGISTERED_NAMES: Final = 64
#: The most stream requests the hub may have sent and not yet seen answered or forgotten.
MAX_OUTSTANDING_REQUESTS: Final = 1000
#: How many timed-out request ids the hub remembers, to drop their late responses quietly.
MAX_FORGOTTEN_REQUESTS: Final = 1024
#: The most stream requests a device may hold unanswered (the hub's outstanding requests plus
#: the ones it gave up on and still remembers).
MAX_PENDING_REQUESTS: Final = MAX_OUTSTANDING_REQUESTS + MAX_FORGOTTEN_REQUESTS
#: Data-plane mode: each binary WebSocket message is relayed intact (Azure-compatible).
MODE_RAW: Final = "raw"
#: Data-plane mode: devstream's framed channel (sequence numbers, acks, EOF, resume).
MODE_FRAMED: Final = FRAMED_SUBPROTOCOL

#: The flow-control window a devstream.v1 stream may use, in bytes (carried in a request).
MIN_WINDOW: Final = 1024
MAX_WINDOW: Final = 64 * 1024 * 1024

MAX_REASON_LENGTH: Final = 256
MAX_ERROR_MESSAGE_LENGTH: Final = 1024
MAX_REQUEST_ID_LENGTH: Final = 128
MAX_URL_LENGTH: Final = 4096
MAX_TOKEN_LENGTH: Final = 4096

_NAME_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
# Printable ASCII without space: safe inside an HTTP header and a URL.
_VISIBLE_RE: Final = re.compile(r"[\x21-\x7e]+")


def is_valid_stream_name(name: object, *, allow_wildcard: bool = False) -> bool:
    """Whether *name* is a legal stream name: 1 to 64 characters of ``[A-Za-z0-9._-]``.

    With *allow_wildcard*, the single name ``"*"`` (any stream name) is legal too.
    """
    if type(name) is not str:
        return False
    if allow_wildcard and name == "*":
        return True
    return _NAME_RE.fullmatch(name) is not None


def _invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.PROTOCOL_ERROR, message)


def _is_visible(value: object, max_length: int) -> bool:
    return (
        type(value) is str and len(value) <= max_length and _VISIBLE_RE.fullmatch(value) is not None
    )


def _is_text(value: object, max_length: int) -> bool:
    if type(value) is not str or len(value) > max_length:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_names(names: object) -> None:
    if type(names) is not tuple:
        raise _invalid("names must be a tuple of stream names")
    if not 1 <= len(names) <= MAX_REGISTERED_NAMES:
        raise _invalid(f"names must hold 1 to {MAX_REGISTERED_NAMES} stream names")
    for name in names:
        if not is_valid_stream_name(name, allow_wildcard=True):
            raise _invalid('each name must be 1 to 64 characters of [A-Za-z0-9._-], or "*"')
    if len(set(names)) != len(names):
        raise _invalid("names must not repeat")


def _check_request_id(request_id: object) -> None:
    if not _is_visible(request_id, MAX_REQUEST_ID_LENGTH):
        raise _invalid(f"requestId must be 1 to {MAX_REQUEST_ID_LENGTH} printable ASCII characters")


@dataclass(frozen=True, kw_only=True)
class Register:
    """Device to hub: the stream names the device accepts (``"*"`` accepts any name).

    Sent first, and again whenever the device's set of names changes (re-register).
    """

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_names(self.names)


@dataclass(frozen=True, kw_only=True)
class Registered:
    """Hub to device: the registration is in effect, for these names."""

    names: tuple[str, ...]

    def __post_init__(self) -> None:
        _check_names(self.names)


@dataclass(frozen=True, kw_only=True)
class StreamResponse:
    """Device to hub: the device accepts or rejects the stream request *request_id*."""

    request_id: str
    accepted: bool
    reason: str = ""

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if type(self.accepted) is not bool:
            raise _invalid("accepted must be a boolean")
        if not _is_text(self.reason, MAX_REASON_LENGTH):
            raise _invalid(f"reason must be a string of at most {MAX_REASON_LENGTH} characters")


@dataclass(frozen=True, kw_only=True, repr=False)
class StreamRequest:
    """Hub to device: a service wants stream *name*; join it at *url* with *token*.

    *mode* is the data-plane mode both sides use (:data:`MODE_RAW` or :data:`MODE_FRAMED`;
    any other name-shaped mode is carried through, for the device to reject). *window* is the
    flow-control window of a devstream.v1 stream, chosen by the service at initiation, which
    the device must use too (None: the protocol's default). The ``repr`` hides the token.
    """

    request_id: str
    name: str
    url: str
    token: str
    mode: str = MODE_RAW
    window: int | None = None

    def __post_init__(self) -> None:
        _check_request_id(self.request_id)
        if not is_valid_stream_name(self.name):
            raise _invalid("name must be 1 to 64 characters of [A-Za-z0-9._-]")
        if not (_is_visible(self.url, MAX_URL_LENGTH) and self.url.startswith(("ws://", "wss://"))):
            raise _invalid(
                f"url must be a ws:// or wss:// URL of at most {MAX_URL_LENGTH} characters"
            )
        if not _is_visible(self.token, MAX_TOKEN_LENGTH):
            raise _invalid(
                f"authorizationToken must be 1 to {MAX_TOKEN_LENGTH} printable ASCII characters"
            )
        if not is_valid_stream_name(self.mode):
            raise _invalid("mode must be 1 to 64 characters of [A-Za-z0-9._-]")
        if self.window is not None and not (
            type(self.window) is int and MIN_WINDOW <= self.window <= MAX_WINDOW
        ):
            raise _invalid(f"window must be a whole number from {MIN_WINDOW} to {MAX_WINDOW}")

    def __repr__(self) -> str:
        return (
            f"StreamRequest(request_id={self.request_id!r}, name={self.name!r}, "
            f"url={self.url!r}, token=<hidden>, mode={self.mode!r}, window={self.window!r})"
        )

    def accept(self) -> StreamResponse:
        """The response that accepts this request."""
        return StreamResponse(request_id=self.request_id, accepted=True)

    def reject(self, reason: str = "") -> StreamResponse:
        """The response that rejects this request, with an optional *reason*."""
        return StreamResponse(request_id=self.request_id, accepted=False, reason=reason)

    def handler_key(self, names: Collection[str]) -> str | None:
        """Which of a device's registered *names* serves this request: its own name, else
        the wildcard ``"*"`` (every name not listed), else None (:meth:`unhandled`)."""
        if self.name in names:
            return self.name
        return "*" if "*" in names else None

    def unhandled(self) -> StreamResponse:
        """The rejection of a request no handler serves, with a reason the service reads."""
        return self.reject(f"no handler for stream name {self.name!r}")


@dataclass(frozen=True, kw_only=True)
class ErrorMessage:
    """Either way: the sender is about to close the channel because of error *code*.

    *code* is a six-digit devstream error code (see :class:`ErrorCode`); a peer may send
    codes this version does not know, so it is kept as an ``int``.
    """

    code: int
    message: str

    def __post_init__(self) -> None:
        if not isinstance(self.code, int) or isinstance(self.code, bool):
            raise _invalid("errorCode must be an integer")
        if not 100000 <= self.code <= 999999:
            raise _invalid("errorCode must be a six-digit number")
        # An ErrorCode member is stored as the plain int it stands for.
        object.__setattr__(self, "code", int(self.code))
        if not _is_text(self.message, MAX_ERROR_MESSAGE_LENGTH):
            raise _invalid(
                f"message must be a string of at most {MAX_ERROR_MESSAGE_LENGTH} characters"
            )

    @classmethod
    def from_code(cls, code: ErrorCode, message: str | None = None) -> ErrorMessage:
        """The message for *code*, with *code*'s default message unless one is given."""
        return cls(code=int(code), message=code.message if message is None else message)

    @property
    def error_code(self) -> ErrorCode | None:
        """The :class:`ErrorCode` for :attr:`code`, or ``None`` if this version lacks it."""
        try:
            return ErrorCode(self.code)
        except ValueError:
            return None


#: Any control-channel message.
ControlMessage = Register | Registered | StreamRequest | StreamResponse | ErrorMessage

_TYPE_NAMES: Final[Mapping[type[ControlMessage], str]] = {
    Register: "register",
    Registered: "registered",
    StreamRequest: "streamRequest",
    StreamResponse: "streamResponse",
    ErrorMessage: "error",
}


# --------------------------------------------------------------------------------------------
# Codec
# --------------------------------------------------------------------------------------------


def _to_json(msg: ControlMessage) -> dict[str, object]:
    if isinstance(msg, Register | Registered):
        return {"type": _TYPE_NAMES[type(msg)], "names": list(msg.names)}
    if isinstance(msg, StreamRequest):
        request: dict[str, object] = {
            "type": "streamRequest",
            "requestId": msg.request_id,
            "name": msg.name,
            "url": msg.url,
            "authorizationToken": msg.token,
            "mode": msg.mode,
        }
        if msg.window is not None:
            request["window"] = msg.window
        return request
    if isinstance(msg, StreamResponse):
        return {
            "type": "streamResponse",
            "requestId": msg.request_id,
            "accepted": msg.accepted,
            "reason": msg.reason,
        }
    return {"type": "error", "errorCode": msg.code, "message": msg.message}


def encode_message(msg: ControlMessage) -> str:
    """The compact JSON text of *msg*, ready to send as one WebSocket text message.

    Raises :class:`LocalProtocolError` if *msg* is not a control message. The limits on
    each message's fields keep every message's text well under
    :data:`MAX_CONTROL_MESSAGE_SIZE` (about 10 KB at most, a StreamRequest with the longest
    URL and token).
    """
    if type(msg) not in _TYPE_NAMES:
        raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, "not a control message")
    return json.dumps(_to_json(msg), separators=(",", ":"), ensure_ascii=False)


def _too_large() -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.PAYLOAD_TOO_LARGE, "control message too large")


def _too_many_fragments(limit: int) -> RemoteProtocolError:
    return RemoteProtocolError(
        ErrorCode.PAYLOAD_TOO_LARGE, f"control message in more than {limit} fragments"
    )


def _bad_json(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.INVALID_JSON, message)


def _bad_message(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.PROTOCOL_ERROR, message)


_T = TypeVar("_T")
_MISSING: Final = object()


def _field(obj: dict[str, object], key: str, kind: type[_T], default: object = _MISSING) -> _T:
    """``obj[key]``, which must have exactly type *kind* (a ``bool`` is not an ``int``)."""
    if key not in obj:
        if default is _MISSING:
            raise _bad_message(f"{obj['type']} message lacks {key!r}")
        value = default
    else:
        value = obj[key]
    if type(value) is not kind:
        raise _bad_message(f"{key!r} of {obj['type']} message must be of type {kind.__name__}")
    return value


def _names_field(obj: dict[str, object]) -> tuple[str, ...]:
    names = _field(obj, "names", list)
    if not all(type(name) is str for name in names):
        raise _bad_message(f"'names' of {obj['type']} message must be a list of strings")
    return tuple(names)


def _decode_register(obj: dict[str, object]) -> ControlMessage:
    return Register(names=_names_field(obj))


def _decode_registered(obj: dict[str, object]) -> ControlMessage:
    return Registered(names=_names_field(obj))


def _decode_stream_request(obj: dict[str, object]) -> ControlMessage:
    return StreamRequest(
        request_id=_field(obj, "requestId", str),
        name=_field(obj, "name", str),
        url=_field(obj, "url", str),
        token=_field(obj, "authorizationToken", str),
        mode=_field(obj, "mode", str, MODE_RAW),
        window=_field(obj, "window", int) if "window" in obj else None,
    )


def _decode_stream_response(obj: dict[str, object]) -> ControlMessage:
    return StreamResponse(
        request_id=_field(obj, "requestId", str),
        accepted=_field(obj, "accepted", bool),
        reason=_field(obj, "reason", str, ""),
    )


def _decode_error(obj: dict[str, object]) -> ControlMessage:
    return ErrorMessage(code=_field(obj, "errorCode", int), message=_field(obj, "message", str))


_DECODERS: Final[Mapping[str, Callable[[dict[str, object]], ControlMessage]]] = {
    "register": _decode_register,
    "registered": _decode_registered,
    "streamRequest": _decode_stream_request,
    "streamResponse": _decode_stream_response,
    "error": _decode_error,
}


def decode_message(
    data: str | bytes, *, max_size: int = MAX_CONTROL_MESSAGE_SIZE
) -> ControlMessage:
    """Parse one whole control message (the payload of one WebSocket message).

    The size is counted in bytes of UTF-8 and checked before any parsing. Members the
    message type does not define are ignored; ``mode`` defaults to ``"raw"`` and ``reason``
    to ``""``. Raises :class:`RemoteProtocolError` with

    * ``PAYLOAD_TOO_LARGE``: more than *max_size* bytes;
    * ``INVALID_JSON``: not UTF-8, not strict JSON (no NaN, no repeated member names, no
      absurd nesting), or not a JSON object;
    * ``PROTOCOL_ERROR``: unknown ``type``, a missing member, a member of the wrong JSON type,
      or a value the message does not allow (an invalid stream name, ...).
    """
    if isinstance(data, str):
        if len(data) > max_size:  # every character is at least one byte
            raise _too_large()
        try:
            size = len(data.encode("utf-8"))
        except UnicodeEncodeError:
            raise _bad_json("control message is not valid UTF-8") from None
        if size > max_size:
            raise _too_large()
        text = data
    else:
        if len(data) > max_size:
            raise _too_large()
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise _bad_json("control message is not valid UTF-8") from None
    try:
        obj = strict_json(text)
    except (ValueError, RecursionError):
        raise _bad_json("control message is not valid JSON") from None
    if type(obj) is not dict:
        raise _bad_json("control message is not a JSON object")
    kind = obj.get("type", _MISSING)
    if kind is _MISSING:
        raise _bad_message("control message lacks 'type'")
    if type(kind) is not str:
        raise _bad_message("'type' of control message must be a string")
    decoder = _DECODERS.get(kind)
    if decoder is None:
        raise _bad_message("unknown control message type")
    try:
        return decoder(obj)
    except LocalProtocolError as exc:  # a value the message's own rules refuse
        raise RemoteProtocolError(exc.code, exc.message) from None


class MessageAssembler:
    """Joins the fragments of one WebSocket message and decodes the whole.

    Memory stays bounded: as soon as the fragments buffered for the current message exceed
    *max_size* bytes (of UTF-8), or *max_fragments* fragments have come without the message's
    end, :meth:`feed` raises ``PAYLOAD_TOO_LARGE`` and drops them. Empty fragments count, and
    are not kept. A fragment is a WebSocket frame: one fed in pieces (``frame_finished=False``
    on all but its last, as a frame that arrives in several reads is) counts once; its pieces
    are joined whenever more than *max_fragments* are kept. Text and binary fragments may be
    mixed; text is counted as its UTF-8 encoding.
    """

    __slots__ = ("_count", "_parts", "_size", "max_fragments", "max_size")

    def __init__(
        self,
        max_size: int = MAX_CONTROL_MESSAGE_SIZE,
        max_fragments: int = MAX_CONTROL_MESSAGE_FRAGMENTS,
    ) -> None:
        self.max_size = max_size
        self.max_fragments = max_fragments
        self._parts: list[bytes] = []
        self._size = 0
        #: Fragments (frames) of the current message that have ended.
        self._count = 0

    @property
    def buffered(self) -> int:
        """Bytes buffered for the message in progress."""
        return self._size

    def _reset(self) -> None:
        self._parts = []
        self._size = 0
        self._count = 0

    def feed(
        self, fragment: str | bytes, *, message_finished: bool, frame_finished: bool = True
    ) -> ControlMessage | None:
        """Add *fragment*; return the decoded message when *message_finished*, else ``None``.
        With *frame_finished* false, *fragment* is a piece of a frame whose end is still to come
        (not counted as a fragment of its own).

        Raises :class:`RemoteProtocolError` as :func:`decode_message` does; after an error
        the partial message is discarded.
        """
        if isinstance(fragment, str):
            if self._size + len(fragment) > self.max_size:
                self._reset()
                raise _too_large()
            try:
                raw = fragment.encode("utf-8")
            except UnicodeEncodeError:
                self._reset()
                raise _bad_json("control message is not valid UTF-8") from None
        else:
            raw = bytes(fragment)
        self._size += len(raw)
        if self._size > self.max_size:
            self._reset()
            raise _too_large()
        if raw:
            self._parts.append(raw)
        if not message_finished:
            if frame_finished:
                self._count += 1
                if self._count >= self.max_fragments:
                    self._reset()
                    raise _too_many_fragments(self.max_fragments)
            elif len(self._parts) > self.max_fragments:
                # Pieces of frames: joined once there are more than fragments allowed, so a
                # message fed in many small pieces keeps no more objects than one in many
                # frames. A join copies at most max_size bytes, after max_fragments pieces.
                self._parts = [b"".join(self._parts)]
            return None
        data = b"".join(self._parts)
        self._reset()
        return decode_message(data, max_size=self.max_size)


# --------------------------------------------------------------------------------------------
# State machines
# --------------------------------------------------------------------------------------------


class ControlState(IdentityEnum):
    """The state of one side of a control channel."""

    #: Nothing registered yet (the device has not sent, or the hub not received, Register).
    AWAITING_REGISTER = "awaiting register"
    #: Registered: stream requests and responses may flow.
    READY = "ready"
    #: An ErrorMessage went one way or the other; the channel is being closed.
    CLOSED = "closed"
    #: A protocol error happened; the machine refuses every further call.
    ERROR = "error"


_AWAITING: Final = ControlState.AWAITING_REGISTER
_READY: Final = ControlState.READY
_CLOSED: Final = ControlState.CLOSED

Transitions = Mapping[tuple[ControlState, type[ControlMessage]], ControlState]

#: What a device may send. Guard: a StreamResponse answers a pending request id.
DEVICE_SEND_TRANSITIONS: Final[Transitions] = {
    (_AWAITING, Register): _AWAITING,
    (_AWAITING, ErrorMessage): _CLOSED,
    (_READY, Register): _READY,
    (_READY, StreamResponse): _READY,
    (_READY, ErrorMessage): _CLOSED,
}

#: What a device may receive. Guards: a Registered answers a Register the device sent; a
#: StreamRequest's id is not already pending.
DEVICE_RECEIVE_TRANSITIONS: Final[Transitions] = {
    (_AWAITING, Registered): _READY,
    (_AWAITING, ErrorMessage): _CLOSED,
    (_READY, Registered): _READY,
    (_READY, StreamRequest): _READY,
    (_READY, ErrorMessage): _CLOSED,
}

#: What the hub may receive. Guard: a StreamResponse answers an outstanding (or forgotten)
#: request id.
HUB_RECEIVE_TRANSITIONS: Final[Transitions] = {
    (_AWAITING, Register): _READY,
    (_AWAITING, ErrorMessage): _CLOSED,
    (_READY, Register): _READY,
    (_READY, StreamResponse): _READY,
    (_READY, ErrorMessage): _CLOSED,
}

#: What the hub may send. Guards: a Registered answers a Register received; a StreamRequest
#: follows the first Registered, uses a fresh id, and respects the outstanding cap.
HUB_SEND_TRANSITIONS: Final[Transitions] = {
    (_AWAITING, ErrorMessage): _CLOSED,
    (_READY, Registered): _READY,
    (_READY, StreamRequest): _READY,
    (_READY, ErrorMessage): _CLOSED,
}


class _ControlMachine:
    """What both sides share: tables, message assembly, poisoning after an error.

    The machines use ``__slots__``: a hub holds one per connected device.
    """

    __slots__ = ("_assembler", "_state")

    _send_table: Transitions
    _receive_table: Transitions
    _side: str

    def __init__(self, *, max_message_size: int = MAX_CONTROL_MESSAGE_SIZE) -> None:
        self._state = ControlState.AWAITING_REGISTER
        self._assembler = MessageAssembler(max_message_size)

    @property
    def state(self) -> ControlState:
        """The current state."""
        return self._state

    def _check_usable(self) -> None:
        if self._state is ControlState.ERROR:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, "control channel is broken by an earlier error"
            )
        if self._state is ControlState.CLOSED:
            self._state = ControlState.ERROR
            raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, "control channel is closed")

    def send(self, msg: ControlMessage) -> str:
        """Check that this side may send *msg* now; return the text to send.

        Raises :class:`LocalProtocolError` (and poisons the machine) if it may not.
        """
        self._check_usable()
        try:
            if type(msg) not in _TYPE_NAMES:
                raise LocalProtocolError(ErrorCode.PROTOCOL_ERROR, "not a control message")
            next_state = self._send_table.get((self._state, type(msg)))
            if next_state is None:
                raise LocalProtocolError(
                    ErrorCode.PROTOCOL_ERROR,
                    f"{self._side} may not send {_TYPE_NAMES[type(msg)]} "
                    f"in state {self._state.name}",
                )
            self._check_send(msg)
            text = encode_message(msg)
        except DevstreamError:
            self._state = ControlState.ERROR
            raise
        self._after_send(msg)
        self._state = next_state
        return text

    def receive(
        self, fragment: str | bytes, *, message_finished: bool = True, frame_finished: bool = True
    ) -> list[ControlMessage]:
        """Feed one WebSocket message, or one fragment of it (or a piece of a fragment, with
        *frame_finished* false: see :class:`MessageAssembler`); return the messages it completes.

        Raises :class:`RemoteProtocolError` (and poisons the machine) if the peer broke the
        protocol, :class:`LocalProtocolError` if the channel is already closed or broken.
        """
        self._check_usable()
        try:
            msg = self._assembler.feed(
                fragment, message_finished=message_finished, frame_finished=frame_finished
            )
            if msg is None:
                return []
            next_state = self._receive_table.get((self._state, type(msg)))
            if next_state is None:
                raise _bad_message(
                    f"{self._side} may not receive {_TYPE_NAMES[type(msg)]} "
                    f"in state {self._state.name}"
                )
            deliver = self._on_receive(msg)
        except DevstreamError:
            self._state = ControlState.ERROR
            raise
        self._state = next_state
        return [msg] if deliver else []

    def _check_send(self, msg: ControlMessage) -> None:
        """Raise LocalProtocolError if a guard forbids sending *msg*; change nothing."""

    def _after_send(self, msg: ControlMessage) -> None:
        """Record that *msg* was sent."""

    def _on_receive(self, msg: ControlMessage) -> bool:
        """Check guards and record *msg*; return whether to hand it to the caller."""
        raise NotImplementedError  # each side's machine has its own


class DeviceControl(_ControlMachine):
    """The device's side of the control channel.

    Guards beyond :data:`DEVICE_SEND_TRANSITIONS` / :data:`DEVICE_RECEIVE_TRANSITIONS`:

    * ``Registered`` is legal only while a ``Register`` the device sent is unanswered;
    * ``StreamRequest`` must not repeat a pending request id, and at most
      :data:`MAX_PENDING_REQUESTS` may be pending;
    * ``StreamResponse`` must answer a pending request id (each is answered once).
    """

    __slots__ = ("_names", "_pending", "_unanswered_registers")

    _send_table = DEVICE_SEND_TRANSITIONS
    _receive_table = DEVICE_RECEIVE_TRANSITIONS
    _side = "device"

    def __init__(self, *, max_message_size: int = MAX_CONTROL_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size=max_message_size)
        self._unanswered_registers = 0
        self._names: tuple[str, ...] = ()
        self._pending: set[str] = set()

    @property
    def pending_requests(self) -> frozenset[str]:
        """Ids of stream requests received and not yet answered."""
        return frozenset(self._pending)

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the latest ``Registered`` received (empty before the first)."""
        return self._names

    def answer(self, request: StreamRequest, names: Collection[str]) -> tuple[str, str | None]:
        """The text that answers *request*, and which of the device's *names* serves it:
        accepted when one does (:meth:`StreamRequest.handler_key`), else refused as unhandled
        (the name is then None)."""
        key = request.handler_key(names)
        return self.send(request.unhandled() if key is None else request.accept()), key

    def _check_send(self, msg: ControlMessage) -> None:
        if isinstance(msg, StreamResponse) and msg.request_id not in self._pending:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, "no pending stream request with that requestId"
            )

    def _after_send(self, msg: ControlMessage) -> None:
        if isinstance(msg, Register):
            self._unanswered_registers += 1
        elif isinstance(msg, StreamResponse):
            self._pending.discard(msg.request_id)

    def _on_receive(self, msg: ControlMessage) -> bool:
        if isinstance(msg, Registered):
            if self._unanswered_registers == 0:
                raise _bad_message("registered message without a register to answer")
            self._unanswered_registers -= 1
            self._names = msg.names
        elif isinstance(msg, StreamRequest):
            if msg.request_id in self._pending:
                raise _bad_message("stream request repeats a pending requestId")
            if len(self._pending) >= MAX_PENDING_REQUESTS:
                raise RemoteProtocolError(
                    ErrorCode.THROTTLED, "too many unanswered stream requests"
                )
            self._pending.add(msg.request_id)
        return True


class HubControl(_ControlMachine):
    """The hub's side of the control channel to one device.

    Guards beyond :data:`HUB_SEND_TRANSITIONS` / :data:`HUB_RECEIVE_TRANSITIONS`:

    * ``Registered`` is legal only while a received ``Register`` is unanswered;
    * ``StreamRequest`` is legal only after the first ``Registered`` went out (before that the
      device cannot take it), with an id neither outstanding nor forgotten, and at most
      :data:`MAX_OUTSTANDING_REQUESTS` outstanding: past the cap :meth:`send` raises
      ``LocalProtocolError(THROTTLED)`` *without* poisoning the machine;
    * a received ``StreamResponse`` must answer an outstanding request (it is returned and
      the request is settled) or a forgotten one (it is dropped: the result is ``[]``).
      The hub remembers the last :data:`MAX_FORGOTTEN_REQUESTS` forgotten ids; a response
      to an id forgotten longer ago is indistinguishable from one to an id never sent.
    """

    __slots__ = ("_acknowledged", "_forgotten", "_names", "_outstanding", "_unanswered_registers")

    _send_table = HUB_SEND_TRANSITIONS
    _receive_table = HUB_RECEIVE_TRANSITIONS
    _side = "hub"

    def __init__(self, *, max_message_size: int = MAX_CONTROL_MESSAGE_SIZE) -> None:
        super().__init__(max_message_size=max_message_size)
        self._unanswered_registers = 0
        self._acknowledged = False
        self._names: tuple[str, ...] = ()
        # Plain dicts (keys only, in insertion order): an empty one is a third of an empty set
        # or OrderedDict, and most devices never see a stream request.
        self._outstanding: dict[str, None] = {}
        self._forgotten: dict[str, None] = {}

    @property
    def names(self) -> tuple[str, ...]:
        """The names of the device's latest ``Register`` (empty before the first)."""
        return self._names

    @property
    def outstanding_requests(self) -> frozenset[str]:
        """Ids of stream requests sent and neither answered nor forgotten."""
        return frozenset(self._outstanding)

    def accepts(self, name: str) -> bool:
        """Whether the device's latest registration covers stream *name*."""
        return name in self._names or "*" in self._names

    def forget_request(self, request_id: str) -> bool:
        """Give up on outstanding request *request_id* (the hub timed it out).

        A late response to it is then dropped quietly. Returns whether it was outstanding;
        forgetting an id that is not outstanding changes nothing.
        """
        if request_id not in self._outstanding:
            return False
        del self._outstanding[request_id]
        self._forgotten[request_id] = None
        while len(self._forgotten) > MAX_FORGOTTEN_REQUESTS:
            del self._forgotten[next(iter(self._forgotten))]
        return True

    def send(self, msg: ControlMessage) -> str:
        """Check that the hub may send *msg* now; return the text to send.

        Raises :class:`LocalProtocolError`; see the class docstring for ``THROTTLED``.
        """
        if (
            self._state is ControlState.READY
            and isinstance(msg, StreamRequest)
            and len(self._outstanding) >= MAX_OUTSTANDING_REQUESTS
        ):
            raise LocalProtocolError(
                ErrorCode.THROTTLED, "too many stream requests outstanding for this device"
            )
        return super().send(msg)

    def _check_send(self, msg: ControlMessage) -> None:
        if isinstance(msg, Registered) and self._unanswered_registers == 0:
            raise LocalProtocolError(
                ErrorCode.PROTOCOL_ERROR, "registered message without a register to answer"
            )
        if isinstance(msg, StreamRequest):
            if not self._acknowledged:
                raise LocalProtocolError(
                    ErrorCode.PROTOCOL_ERROR, "stream request before the first registered"
                )
            if msg.request_id in self._outstanding or msg.request_id in self._forgotten:
                raise LocalProtocolError(
                    ErrorCode.PROTOCOL_ERROR, "requestId is already in use on this channel"
                )

    def _after_send(self, msg: ControlMessage) -> None:
        if isinstance(msg, Registered):
            self._unanswered_registers -= 1
            self._acknowledged = True
        elif isinstance(msg, StreamRequest):
            self._outstanding[msg.request_id] = None

    def _on_receive(self, msg: ControlMessage) -> bool:
        if isinstance(msg, Register):
            self._unanswered_registers += 1
            self._names = msg.names
        elif isinstance(msg, StreamResponse):
            if msg.request_id in self._outstanding:
                del self._outstanding[msg.request_id]
            elif msg.request_id in self._forgotten:
                del self._forgotten[msg.request_id]
                return False
            else:
                raise _bad_message("stream response to a requestId the hub never sent")
        return True
