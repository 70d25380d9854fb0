"""The hub's initiation coordinator: who is online, what they accept, which requests wait.

What the coordinator knows: which devices are online (a control channel that has registered),
the stream names each registered, and every stream request sent to a device and not yet
answered, with its response deadline. It gives each request a request id and a stream id.

It also knows until when each control channel's credential holds (the expiry of the SAS
token that opened it, given by the caller in the caller's clock): a channel is online only
until then.

What it does not know: the registry (whether a device exists or is disabled), how credentials
are checked (the caller checks the device's and the service's SAS tokens), sockets, or the
clock. Every input takes ``now``; every output is an event or a deadline
(:meth:`Coordinator.next_deadline`) that the caller arms and answers with
:meth:`Coordinator.advance`.

Rules:

* One control channel per device. A device that registers on a second connection replaces the
  first: new requests go to the new one at once. Requests already sent on the old one stay
  answerable there until they are answered or time out (a device renewing its credential
  answers them while its new channel registers); then :class:`DeviceReplaced` tells the caller
  to close the old one (at once, if nothing was pending on it) with ``DEVICE_REPLACED``, an
  error of its own: a device client told so knows that another connection with its device
  id took over (its own renewed channel, or another client) and must not take the device
  back at once (:mod:`.session` decides what it does). Should the old one end or its
  credential expire first, its pending requests fail with ``DEVICE_NOT_ONLINE``.
* Every :meth:`~Coordinator.initiate` is answered by exactly one of :class:`InitiationAccepted`,
  :class:`InitiationRejected` or :class:`InitiationFailed`, carrying the request id it was
  given (immediately, or later from a response, a disconnect, a replacement or a timeout).
* A request never outlives its deadline once :meth:`~Coordinator.advance` has passed it; at
  ``now == deadline`` it has timed out, and a response arriving then is ignored.
* A device has at most ``max_pending_per_device`` pending requests: one more fails at once with
  ``THROTTLED``, and a message that names the limit (requests still pending on a replaced
  channel count). A request leaves the count when it is
  answered, times out, fails with its connection, or is withdrawn by the caller
  (:meth:`~Coordinator.withdraw`: it could not be sent); the capacity is back at once.
* A control channel whose credential expired is not online: from ``now >= expires_at`` no
  request goes to it, and :meth:`~Coordinator.advance` returns :class:`CredentialsExpired`
  (close it) followed by ``InitiationFailed(DEVICE_NOT_ONLINE)`` for each of its pending
  requests. The caller's device client renews its token and reconnects before then.
* Memory is bounded: at most ``max_pending_per_device`` pending requests per device, and at most
  :data:`MAX_REGISTERED_NAMES` names per device.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from .common import b64url
from .errors import ErrorCode, LocalProtocolError

__all__ = [
    "MAX_REGISTERED_NAMES",
    "WILDCARD_NAME",
    "Coordinator",
    "CoordinatorEvent",
    "CredentialsExpired",
    "DeviceReplaced",
    "ForgetRequest",
    "InitiationAccepted",
    "InitiationFailed",
    "InitiationRejected",
    "SendStreamRequest",
]

#: The stream name that accepts every name.
WILDCARD_NAME = "*"
#: The most stream names one device may register.
MAX_REGISTERED_NAMES = 1024
_MIN_STREAM_NONCE = 16
_MAX_STREAM_NONCE = 64


@dataclass(frozen=True, kw_only=True)
class SendStreamRequest:
    """Send a stream request to the device on control connection ``connection_id``."""

    connection_id: int
    request_id: str
    stream_id: str
    device_id: str
    name: str
    #: When the device's answer is due; past it the request fails with a timeout.
    deadline: float


@dataclass(frozen=True, kw_only=True)
class InitiationAccepted:
    """The device accepted request ``request_id``; hand the service its stream token."""

    request_id: str
    stream_id: str
    device_id: str
    name: str


@dataclass(frozen=True, kw_only=True)
class InitiationRejected:
    """Request ``request_id`` was refused: by the device, or because it did not register the name.

    ``code`` is ``STREAM_REJECTED`` (``reason`` is the device's) or
    ``STREAM_NAME_NOT_REGISTERED``.
    """

    request_id: str
    stream_id: str
    device_id: str
    name: str
    code: ErrorCode
    reason: str


@dataclass(frozen=True, kw_only=True)
class InitiationFailed:
    """Request ``request_id`` failed without an answer from the device.

    ``code`` is ``DEVICE_NOT_ONLINE``, ``THROTTLED`` or ``DEVICE_RESPONSE_TIMEOUT``.
    ``message`` says more than the code's own message where there is more to say (for
    ``THROTTLED``: which limit the device reached), else it is empty.
    """

    request_id: str
    stream_id: str
    device_id: str
    name: str
    code: ErrorCode
    message: str = ""


@dataclass(frozen=True, kw_only=True)
class ForgetRequest:
    """Tell control connection ``connection_id`` to drop request ``request_id`` (timed out)."""

    connection_id: int
    request_id: str


@dataclass(frozen=True, kw_only=True)
class DeviceReplaced:
    """Device ``device_id`` registered on a new connection; close the old ``connection_id``
    with ``code`` (``DEVICE_REPLACED``: close code 4409, reason ``"409902 replaced by a newer
    connection"``), so that the client it belonged to can tell a replacement from a drop."""

    device_id: str
    connection_id: int
    code: ErrorCode = ErrorCode.DEVICE_REPLACED


@dataclass(frozen=True, kw_only=True)
class CredentialsExpired:
    """The credential of control connection ``connection_id`` expired; close it with
    ``code`` (``UNAUTHORIZED``) and ``message``."""

    device_id: str
    connection_id: int
    code: ErrorCode = ErrorCode.UNAUTHORIZED
    message: str = "SAS token expired"


CoordinatorEvent = (
    SendStreamRequest
    | InitiationAccepted
    | InitiationRejected
    | InitiationFailed
    | ForgetRequest
    | DeviceReplaced
    | CredentialsExpired
)


#: A registration of at most this many names keeps the caller's tuple as it is (searched in
#: order, and shared with whoever else holds it: a hub keeps the same tuple in its control
#: machine); a longer one is kept as a frozenset.
_SHARED_NAMES = 8


@dataclass(kw_only=True, slots=True)
class _Connection:
    device_id: str
    names: frozenset[str] | tuple[str, ...]
    #: Request ids pending on this connection, in the order they were made.
    pending: dict[str, None] = field(default_factory=dict)
    #: Replaced by another connection of its device: only its pending requests are left, and
    #: it is closed (DeviceReplaced) once they are settled.
    replaced: bool = False


@dataclass(frozen=True, kw_only=True, slots=True)
class _Pending:
    request_id: str
    connection_id: int
    stream_id: str
    device_id: str
    name: str
    deadline: float


def _argument_invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.ARGUMENT_INVALID, message)


def _check_now(now: float) -> None:
    if not isinstance(now, (int, float)) or not math.isfinite(now):
        raise _argument_invalid("now must be a finite number")


def _check_text(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise _argument_invalid(f"{what} must be a non-empty string")


class Coordinator:
    """The hub's view of online devices and pending stream requests (sans-IO).

    ``max_pending_per_device`` caps the unanswered requests of one device; one more fails with
    ``THROTTLED``.
    """

    def __init__(self, *, max_pending_per_device: int = 100) -> None:
        if (
            not isinstance(max_pending_per_device, int)
            or isinstance(max_pending_per_device, bool)
            or max_pending_per_device < 1
        ):
            raise _argument_invalid("max_pending_per_device must be a positive integer")
        self._max_pending = max_pending_per_device
        self._connections: dict[int, _Connection] = {}
        self._online: dict[str, int] = {}
        self._pending: dict[str, _Pending] = {}
        #: device id -> its pending requests, on all its connections (replaced ones included).
        self._device_pending: dict[str, int] = {}
        #: (deadline, request number, request id); entries of answered requests are left in
        #: place and skipped when they surface.
        self._deadlines: list[tuple[float, int, str]] = []
        self._counter = 0
        #: connection id -> when its credential expires, for every channel opened and not yet
        #: ended; and (expiry, connection id, device id) as a heap (stale entries are skipped).
        self._credentials: dict[int, float] = {}
        self._expiries: list[tuple[float, int, str]] = []

    # -- device side -----------------------------------------------------------------------

    def channel_opened(
        self, *, device_id: str, connection_id: int, expires_at: float, now: float
    ) -> list[CoordinatorEvent]:
        """Control connection ``connection_id`` of ``device_id`` opened with a credential that
        holds until ``expires_at`` (the SAS token's expiry, in the clock of ``now``).

        From ``now >= expires_at`` the connection is not online, and :meth:`advance` closes it
        (:class:`CredentialsExpired`); :meth:`next_deadline` includes the expiry (a credential
        already expired is closed by the next :meth:`advance`). The expiry is forgotten when
        the connection ends or is closed as replaced (:class:`DeviceReplaced`: the caller
        closes it anyway). Returns ``[]``. A connection that registers without being opened
        here has no expiry.
        """
        _check_now(now)
        _check_text("device id", device_id)
        if not isinstance(expires_at, (int, float)) or math.isnan(expires_at):
            raise _argument_invalid("expires_at must be a number")
        if connection_id in self._credentials or connection_id in self._connections:
            raise _argument_invalid("connection already opened")
        self._credentials[connection_id] = expires_at
        heapq.heappush(self._expiries, (expires_at, connection_id, device_id))
        if len(self._expiries) > 2 * len(self._credentials) + 64:
            self._expiries = [e for e in self._expiries if not self._is_stale_expiry(e)]
            heapq.heapify(self._expiries)
        return []

    def device_registered(
        self, *, device_id: str, connection_id: int, names: Sequence[str], now: float
    ) -> list[CoordinatorEvent]:
        """Control connection ``connection_id`` of ``device_id`` registered ``names``.

        A re-register on the same connection replaces its names. If another connection of the
        same device is registered, the new one replaces it: new requests go to the new one.
        The old one keeps its pending requests, which it may still answer
        (:meth:`device_responded`) until they time out; once none is left, it is forgotten and
        :class:`DeviceReplaced` tells the caller to close it. That is returned here when
        nothing was pending on it, else by the :meth:`device_responded` or :meth:`advance`
        that settles its last request. A replaced connection that registers again before
        then takes the device back (and replaces the current one in turn); one registering
        after it was forgotten counts as a new connection.
        """
        _check_now(now)
        _check_text("device id", device_id)
        if isinstance(names, (str, bytes)) or not all(
            isinstance(name, str) and name for name in names
        ):
            raise _argument_invalid("names must be a sequence of non-empty strings")
        name_set = frozenset(names)
        if len(name_set) > MAX_REGISTERED_NAMES:
            raise _argument_invalid(f"at most {MAX_REGISTERED_NAMES} stream names per device")
        kept: frozenset[str] | tuple[str, ...] = name_set
        if type(names) is tuple and len(names) <= _SHARED_NAMES:
            kept = names
        existing = self._connections.get(connection_id)
        if existing is not None:
            if existing.device_id != device_id:
                raise _argument_invalid("a connection cannot register as another device")
            existing.names = kept
            if not existing.replaced:
                return []
            existing.replaced = False
        else:
            self._connections[connection_id] = _Connection(device_id=device_id, names=kept)
        events: list[CoordinatorEvent] = []
        old_id = self._online.get(device_id)
        self._online[device_id] = connection_id
        if old_id is not None:
            old = self._connections[old_id]
            old.replaced = True
            events.extend(self._close_if_drained(old_id))
        return events

    def device_disconnected(self, *, connection_id: int, now: float) -> list[CoordinatorEvent]:
        """Control connection ``connection_id`` ended.

        Its pending requests fail with ``DEVICE_NOT_ONLINE``, oldest first (a replaced
        connection's too). Connections that never registered, or were replaced and closed
        (:class:`DeviceReplaced`), are ignored.
        """
        _check_now(now)
        self._credentials.pop(connection_id, None)
        if connection_id not in self._connections:
            return []
        return self._drop_connection(connection_id)

    def _drop_connection(self, connection_id: int) -> list[CoordinatorEvent]:
        connection = self._connections.pop(connection_id)
        self._credentials.pop(connection_id, None)
        if self._online.get(connection.device_id) == connection_id:
            del self._online[connection.device_id]
        events: list[CoordinatorEvent] = []
        for request_id in connection.pending:
            pending = self._pending.pop(request_id)
            self._count(pending.device_id, -1)
            events.append(self._failed(pending, ErrorCode.DEVICE_NOT_ONLINE))
        return events

    def _close_if_drained(self, connection_id: int) -> list[CoordinatorEvent]:
        """A replaced connection with nothing pending is forgotten, and closed."""
        connection = self._connections.get(connection_id)
        if connection is None or not connection.replaced or connection.pending:
            return []
        del self._connections[connection_id]
        self._credentials.pop(connection_id, None)
        return [DeviceReplaced(device_id=connection.device_id, connection_id=connection_id)]

    def device_responded(
        self, *, connection_id: int, request_id: str, accepted: bool, reason: str, now: float
    ) -> list[CoordinatorEvent]:
        """The device on ``connection_id`` answered request ``request_id``.

        Returns :class:`InitiationAccepted`, or :class:`InitiationRejected` with
        ``STREAM_REJECTED`` and the device's ``reason``; followed by :class:`DeviceReplaced`
        when it was the last request pending on a replaced connection. An answer to an
        unknown, answered or timed-out request (``now >= deadline``), or from another
        connection, returns ``[]``: late answers are normal.
        """
        _check_now(now)
        pending = self._pending.get(request_id)
        if pending is None or pending.connection_id != connection_id or now >= pending.deadline:
            return []
        answer: CoordinatorEvent
        if accepted:
            answer = InitiationAccepted(
                request_id=pending.request_id,
                stream_id=pending.stream_id,
                device_id=pending.device_id,
                name=pending.name,
            )
        else:
            answer = InitiationRejected(
                request_id=pending.request_id,
                stream_id=pending.stream_id,
                device_id=pending.device_id,
                name=pending.name,
                code=ErrorCode.STREAM_REJECTED,
                reason=reason,
            )
        return [answer, *self._remove(pending)]

    # -- service side ----------------------------------------------------------------------

    def initiate(
        self,
        *,
        device_id: str,
        name: str,
        now: float,
        response_timeout: float,
        stream_nonce: bytes,
    ) -> list[CoordinatorEvent]:
        """An authorised service asks for stream ``name`` to ``device_id``.

        The stream id is the base64url (unpadded) text of ``stream_nonce`` (16 to 64 random
        bytes). Returns exactly one event, carrying a fresh request id:

        * ``InitiationFailed(DEVICE_NOT_ONLINE)`` when the device has no registered channel;
        * ``InitiationRejected(STREAM_NAME_NOT_REGISTERED)`` when it registered neither
          ``name`` nor ``"*"``;
        * ``InitiationFailed(THROTTLED)`` when the device has too many pending requests;
        * otherwise :class:`SendStreamRequest`, due at ``now + response_timeout``.

        Raises :class:`LocalProtocolError` (``ARGUMENT_INVALID``) on a bad argument.
        """
        _check_now(now)
        _check_text("device id", device_id)
        _check_text("stream name", name)
        if (
            not isinstance(response_timeout, (int, float))
            or not math.isfinite(response_timeout)
            or response_timeout <= 0
        ):
            raise _argument_invalid("response timeout must be a positive number")
        if (
            not isinstance(stream_nonce, bytes)
            or not _MIN_STREAM_NONCE <= len(stream_nonce) <= _MAX_STREAM_NONCE
        ):
            raise _argument_invalid(
                f"stream nonce must be {_MIN_STREAM_NONCE} to {_MAX_STREAM_NONCE} bytes"
            )
        stream_id = b64url(stream_nonce)
        self._counter += 1
        number = self._counter
        request_id = str(number)
        connection_id = self._online.get(device_id)
        if connection_id is not None and not self._credential_holds(connection_id, now):
            connection_id = None  # expired: advance() closes it
        if connection_id is None:
            return [
                InitiationFailed(
                    request_id=request_id,
                    stream_id=stream_id,
                    device_id=device_id,
                    name=name,
                    code=ErrorCode.DEVICE_NOT_ONLINE,
                )
            ]
        connection = self._connections[connection_id]
        if name not in connection.names and WILDCARD_NAME not in connection.names:
            code = ErrorCode.STREAM_NAME_NOT_REGISTERED
            return [
                InitiationRejected(
                    request_id=request_id,
                    stream_id=stream_id,
                    device_id=device_id,
                    name=name,
                    code=code,
                    reason=code.message,
                )
            ]
        waiting = self._device_pending.get(device_id, 0)
        if waiting >= self._max_pending:
            return [
                InitiationFailed(
                    request_id=request_id,
                    stream_id=stream_id,
                    device_id=device_id,
                    name=name,
                    code=ErrorCode.THROTTLED,
                    message=f"device {device_id!r} has {waiting} stream requests "
                    "waiting for its answer, the most the hub allows; try again later",
                )
            ]
        deadline = now + response_timeout
        pending = _Pending(
            request_id=request_id,
            connection_id=connection_id,
            stream_id=stream_id,
            device_id=device_id,
            name=name,
            deadline=deadline,
        )
        self._pending[request_id] = pending
        connection.pending[request_id] = None
        self._count(device_id, 1)
        heapq.heappush(self._deadlines, (deadline, number, request_id))
        self._compact()
        return [
            SendStreamRequest(
                connection_id=connection_id,
                request_id=request_id,
                stream_id=stream_id,
                device_id=device_id,
                name=name,
                deadline=deadline,
            )
        ]

    def withdraw(self, *, request_id: str, now: float) -> list[CoordinatorEvent]:
        """The caller could not send request ``request_id`` (say, the bridge refused its
        stream): forget it, and answer the service itself. Its device's capacity is back at
        once. An unknown or settled request is ignored. Returns :class:`DeviceReplaced` if it
        was the last request pending on a replaced connection, else ``[]``."""
        _check_now(now)
        pending = self._pending.get(request_id)
        if pending is None:
            return []
        return self._remove(pending)

    # -- time ------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest response deadline of a pending request or credential expiry of a
        control connection, or None when there is none."""
        self._drop_stale_heads()
        heads = [heap[0][0] for heap in (self._deadlines, self._expiries) if heap]
        return min(heads) if heads else None

    def advance(self, now: float) -> list[CoordinatorEvent]:
        """Time is ``now``: close every connection whose credential expired and fail every
        request whose deadline is ``<= now``.

        An expired connection gives :class:`CredentialsExpired`, followed by
        ``InitiationFailed(DEVICE_NOT_ONLINE)`` for each of its pending requests, oldest first.
        Then each request past its deadline gives ``InitiationFailed(DEVICE_RESPONSE_TIMEOUT)``
        followed by :class:`ForgetRequest` for its control connection (and by
        :class:`DeviceReplaced` if it was the last pending on a replaced connection), earliest
        deadline first.
        """
        _check_now(now)
        events: list[CoordinatorEvent] = []
        while self._expiries and self._expiries[0][0] <= now:
            entry = heapq.heappop(self._expiries)
            if self._is_stale_expiry(entry):
                continue
            _, connection_id, device_id = entry
            events.append(CredentialsExpired(device_id=device_id, connection_id=connection_id))
            if connection_id in self._connections:
                events.extend(self._drop_connection(connection_id))
            else:
                del self._credentials[connection_id]
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, request_id = heapq.heappop(self._deadlines)
            pending = self._pending.get(request_id)
            if pending is None:
                continue
            drained = self._remove(pending)
            events.append(self._failed(pending, ErrorCode.DEVICE_RESPONSE_TIMEOUT))
            events.append(ForgetRequest(connection_id=pending.connection_id, request_id=request_id))
            events.extend(drained)
        return events

    # -- queries ---------------------------------------------------------------------------

    def is_online(self, device_id: str) -> bool:
        """Whether ``device_id`` has a registered control channel."""
        return device_id in self._online

    def registered_names(self, device_id: str) -> frozenset[str]:
        """The stream names ``device_id`` registered (empty when it is offline)."""
        connection_id = self._online.get(device_id)
        if connection_id is None:
            return frozenset()
        return frozenset(self._connections[connection_id].names)

    def online_count(self) -> int:
        """How many devices are online."""
        return len(self._online)

    def pending_count(self) -> int:
        """How many stream requests wait for a device's answer."""
        return len(self._pending)

    def deadline_entries(self) -> int:
        """For observability (memory accounting, tests): the entries of the requests' deadline
        schedule, those of answered requests included until they are dropped."""
        return len(self._deadlines)

    # -- internals -------------------------------------------------------------------------

    def _failed(self, pending: _Pending, code: ErrorCode) -> InitiationFailed:
        return InitiationFailed(
            request_id=pending.request_id,
            stream_id=pending.stream_id,
            device_id=pending.device_id,
            name=pending.name,
            code=code,
        )

    def _remove(self, pending: _Pending) -> list[CoordinatorEvent]:
        """Settle a pending request; returns DeviceReplaced if that drained its connection."""
        del self._pending[pending.request_id]
        self._count(pending.device_id, -1)
        # A connection outlives its pending requests: dropping it fails them all first.
        self._connections[pending.connection_id].pending.pop(pending.request_id, None)
        return self._close_if_drained(pending.connection_id)

    def _count(self, device_id: str, delta: int) -> None:
        left = self._device_pending.get(device_id, 0) + delta
        if left:
            self._device_pending[device_id] = left
        else:
            del self._device_pending[device_id]

    def _credential_holds(self, connection_id: int, now: float) -> bool:
        expires_at = self._credentials.get(connection_id)
        return expires_at is None or now < expires_at

    def _is_stale_expiry(self, entry: tuple[float, int, str]) -> bool:
        return self._credentials.get(entry[1]) != entry[0]

    def _drop_stale_heads(self) -> None:
        while self._deadlines and self._deadlines[0][2] not in self._pending:
            heapq.heappop(self._deadlines)
        while self._expiries and self._is_stale_expiry(self._expiries[0]):
            heapq.heappop(self._expiries)

    def _compact(self) -> None:
        # Lazy deletion leaves entries of answered requests behind; rebuild the heap when
        # they outnumber the live ones, so memory stays proportional to pending requests.
        if len(self._deadlines) > 2 * len(self._pending) + 64:
            self._deadlines = [entry for entry in self._deadlines if entry[2] in self._pending]
            heapq.heapify(self._deadlines)
