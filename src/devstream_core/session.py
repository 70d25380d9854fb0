"""A device's session with the hub: its control channels over time, as one machine.

A device that serves streams keeps a control channel open to the hub (:mod:`.control` holds
the messages on it). Around those messages lie decisions that every device client has to make
the same way, whatever its I/O: when to ping, when a silent channel is dead, when to renew
the SAS token and how to hand over to the renewed channel, whether to reconnect after a loss
and after how long, and which errors end it all. :class:`DeviceSession` makes them.

What it knows: the channels it asked the adapter to open (numbered 1, 2, … in order), which
one serves (took the device's Register), which one is on its way (opening or registering),
which ones drain after a renewal; when each channel's token is due for renewal; the ping in
flight; how many attempts in a row failed. What it does not know: sockets, WebSockets, the
control messages' contents, SAS signing, the clock or randomness. Every call that depends on
time takes ``now`` (the adapter's monotonic clock, in seconds), every random choice takes a
``random_fraction`` in ``[0, 1]``, and what to do comes back as a list of actions
(:data:`Action`) and one deadline (:meth:`~DeviceSession.next_deadline`).

The adapter's loop, the same for every I/O layer::

    session = DeviceSession(...)
    actions = session.start(now)
    forever:
        carry out actions:
            OpenChannel(n)   open a connection; expiry = session.token_expiry(n, now=, wall_time=)
                             is the ``se`` of its SAS token; do the WebSocket handshake
            SendRegister(n)  send the control Register on channel n
            SendPing(n)      send a WebSocket ping on channel n
            CloseChannel(n)  close channel n (and report nothing more about it)
            Online(n)        the device is online on channel n (``replaced`` drains)
            Reconnect(after) offline; the next OpenChannel comes from timer() after that long
                             (``code``: why it is a long wait, a replacement or a refusal)
            GiveUp(n, code)  stop, with the error that channel n met (or ``message``, if any)
        wait for an event on a channel, or for next_deadline():
            handshake done        actions = session.channel_opened(n, now)
            Registered arrived    actions = session.registered(n, now)
            refused, closed, lost actions = session.channel_lost(n, now, code=, random_fraction=)
            deadline reached      actions = session.timer(now, random_fraction=,
                                      last_received={n: <when its last bytes came>, ...})
                                  (or data_received(n, at=) for each open channel first)

The machine, one :class:`SessionState` at a time, moved by :class:`SessionInput`\\ s along
:data:`SESSION_TRANSITIONS` (a call that would make a move missing from it raises
:class:`LocalProtocolError`, unless it is about a channel the machine let go: see below)::

    IDLE --start--> CONNECTING --opened--> REGISTERING --registered--> ONLINE
    ONLINE --renewal due--> RENEWING --successor opened--> HANDING_OVER --registered--> ONLINE
    CONNECTING / REGISTERING / ONLINE --lost--> WAITING --backoff over--> CONNECTING
    RENEWING / HANDING_OVER --successor lost--> CONNECTING (the old channel closed too)
    RENEWING --serving lost--> CONNECTING;  HANDING_OVER --serving lost--> REGISTERING
    CONNECTING ... HANDING_OVER --final error--> FAILED (nothing leaves it)

Rules every change must keep:

* **Keepalive.** The serving channel is pinged every ``ping_interval`` seconds from its
  registration, with at most one ping in flight: while one is unanswered, the next is not
  sent. Any bytes received on the channel at or after a ping's sending answer it (a pong or
  anything else, as :meth:`~DeviceSession.data_received` reports). A ping unanswered for
  ``ping_timeout`` makes the channel dead: it is closed and counts as lost. So a hub silent
  from time ``t`` is found out between ``t + ping_timeout`` and
  ``t + ping_interval + ping_timeout``, and a hub that answers each ping within
  ``ping_interval`` hears from the device at least that often (one that answers later, at
  least every ``ping_interval + ping_timeout``): the hub drops a control channel silent for
  :data:`CONTROL_IDLE_TIMEOUT` (90 s by default), and the defaults (20 s, 20 s) stay well
  inside it.
* **Registration.** A channel whose Register is not answered within ``ping_timeout`` of its
  handshake is closed and counts as lost.
* **Renewal.** Each channel's SAS token is signed with the expiry
  :meth:`~DeviceSession.token_expiry` gives (``sas_lifetime`` seconds on); at
  :func:`~devstream_core.credentials.sas_renewal_time` of it (85 % of the lifetime) the
  serving channel's successor is opened with a fresh token and registered while the old one
  still serves. From the successor's registration, the hub sends new requests to it; the old
  one drains (answers what the hub had sent it) until the hub closes it, and is closed by the
  device ``ping_timeout`` after the hand-over at the latest. The old channel's loss during
  the hand-over is no loss: the successor carries on. The successor's failure closes the old
  channel too and opens a new one at once, the usual way (no backoff: nothing failed twice).
* **A given token.** A device whose connection string carries a SAS token instead of a key
  (``token_expires_at``, its ``se``) signs nothing: every channel presents that token and is
  never renewed. Once the wall time reaches ``se``, :meth:`~DeviceSession.token_expiry`
  raises :func:`~devstream_core.credentials.expired_signature_error` (``UNAUTHORIZED``); the
  adapter reports the channel lost with that code, final at an opening: the session ends with
  an error saying the token expired and cannot be renewed without a key.
* **Backoff.** After a loss with no other channel to carry on (states ``CONNECTING``,
  ``REGISTERING``, ``ONLINE``), the next channel is opened after
  ``random_fraction * min(backoff_cap, backoff_base * 2 ** attempt)`` seconds (full jitter),
  ``attempt`` counting the losses since the last registration from 0. A registration resets
  it: a channel that registered "stayed up". A delay of 0 opens the next channel in the same
  call.
* **Final errors.** An error code in :data:`FINAL_AT_OPEN` refusing a channel's opening, or in
  :data:`FINAL_ONCE_OPEN` closing an open channel, ends the session (``FAILED``): every
  channel still open is closed and :class:`GiveUp` says which error to raise. Any other loss is
  retried. The two tables differ by ``UNAUTHORIZED`` alone: an open channel the hub closes
  with it had a token that expired (this device's clock runs behind the hub's) or a key that
  was replaced; a fresh token settles the first, and the second is refused at the next open.
* **Refusals, retried.** With a :class:`RefusalBackoff` (``refusal_backoff``; none by
  default), a final error among its ``codes`` (by default ``401002``, ``403902``, ``404001``:
  a wrong key, a disabled or a deleted device) does not end the session: the next channel
  opens after ``(1 + random_fraction) / 2 * min(cap, base * 2 ** attempt)`` seconds (half
  the ceiling, plus a random half: 5 s growing to 300 s by default), ``attempt`` counting the
  losses since the last registration as above. An agent far away then comes back by itself
  once the device is enabled, created again or given its key back.
* **Replacement.** The hub closes a registered channel with ``DEVICE_REPLACED`` when another
  channel with the same device id registers. During a renewal that is this session's own
  successor, and no news: the successor carries on (the old channel drains or is lost the
  usual way). Otherwise (no channel of this session carries on: states ``REGISTERING`` and
  ``ONLINE``) another client uses this device id. The first time, the next channel opens
  after ``(1 + random_fraction) / 2 * backoff_cap`` seconds (15 to 30 s by default), never at
  once, and :class:`Reconnect` says why (``code``). Replaced again no more than
  ``replaced_window`` seconds (:data:`DEFAULT_REPLACED_WINDOW`, 10 minutes) after the last
  replacement, the session ends (:class:`GiveUp` with ``DEVICE_REPLACED`` and a message saying
  so), unless ``keep_trying_when_replaced``: then each replacement is waited out the same
  way. So of two clients with one device id, the older one gives way, comes back once, and
  stops; the newer one is disturbed once, for one backoff. Registrations do not reset the
  count (a replaced client registers every time it comes back); time does.
* **Deadlines.** Every deadline a call sets is later than its ``now``, and :meth:`timer`
  does whatever is due by its ``now``: an adapter that calls :meth:`timer` at each
  :meth:`next_deadline` never finds one in the past. ``now`` never goes back.
* **Channels.** At most one channel is on its way and one serves; the draining ones are each
  closed ``ping_timeout`` after their hand-over. A report about a channel the machine already
  let go (closed, lost or drained) is ignored: the adapter's reader may see a close that the
  machine asked for. A report about a channel number it never gave out, or one that does not
  fit the state (``registered`` before ``channel_opened``), raises :class:`LocalProtocolError`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from .common import IdentityEnum
from .credentials import SAS_RENEW_FRACTION, expired_signature_error, sas_renewal_time
from .errors import ErrorCode, LocalProtocolError
from .wire import DEFAULT_SAS_LIFETIME

__all__ = [
    "CONTROL_IDLE_TIMEOUT",
    "DEFAULT_BACKOFF_BASE",
    "DEFAULT_BACKOFF_CAP",
    "DEFAULT_PING_INTERVAL",
    "DEFAULT_PING_TIMEOUT",
    "DEFAULT_REFUSALS",
    "DEFAULT_REPLACED_WINDOW",
    "DEFAULT_SAS_LIFETIME",
    "FINAL_AT_OPEN",
    "FINAL_ONCE_OPEN",
    "MIN_TIMEOUT",
    "SESSION_TRANSITIONS",
    "Action",
    "CloseChannel",
    "CloseReason",
    "DeviceSession",
    "GiveUp",
    "Online",
    "OpenChannel",
    "Reconnect",
    "RefusalBackoff",
    "SendPing",
    "SendRegister",
    "SessionInput",
    "SessionState",
    "backoff_ceiling",
    "is_final",
    "long_wait_cause",
]

#: How often the serving channel is pinged, by default (seconds).
DEFAULT_PING_INTERVAL: Final = 20.0
#: How long a ping (or a Register) may go unanswered before the channel is dead, by default.
DEFAULT_PING_TIMEOUT: Final = 20.0
#: The first reconnect's longest wait (seconds); it doubles with every loss in a row.
DEFAULT_BACKOFF_BASE: Final = 0.5
#: The longest wait before a reconnect, however many losses in a row.
DEFAULT_BACKOFF_CAP: Final = 30.0
#: The shortest ``ping_interval`` and ``ping_timeout`` (seconds): a deadline set at ``now`` is
#: then later than ``now`` on any clock that counts seconds in a double.
MIN_TIMEOUT: Final = 0.001
#: The hub drops a control channel it heard nothing from (no message, no ping) for this long,
#: by default: a device's ``ping_interval`` must stay well inside it.
CONTROL_IDLE_TIMEOUT: Final = 90.0

#: Two replacements (``DEVICE_REPLACED``) no more than this far apart (seconds) end a device's
#: session, by default.
DEFAULT_REPLACED_WINDOW: Final = 600.0

#: Errors refusing a channel's opening that retrying would not cure: the device may not
#: connect (wrong key, unknown or disabled device, a credential without the permission), or
#: its settings are malformed (a connection string, a proxy URL).
FINAL_AT_OPEN: Final = frozenset(
    {
        ErrorCode.UNAUTHORIZED,
        ErrorCode.PERMISSION_DENIED,
        ErrorCode.DEVICE_NOT_FOUND,
        ErrorCode.DEVICE_DISABLED,
        ErrorCode.INVALID_CONNECTION_STRING,
        ErrorCode.ARGUMENT_INVALID,
    }
)
#: Errors closing an open channel that end the session: those of :data:`FINAL_AT_OPEN` but
#: ``UNAUTHORIZED`` (an expired token or a replaced key: the next open tells which).
FINAL_ONCE_OPEN: Final = FINAL_AT_OPEN - {ErrorCode.UNAUTHORIZED}


#: The refusals a :class:`RefusalBackoff` retries by default: a wrong key, a disabled device,
#: a deleted one (an operator can put each right at the hub, far from the device).
DEFAULT_REFUSALS: Final = frozenset(
    {ErrorCode.UNAUTHORIZED, ErrorCode.DEVICE_DISABLED, ErrorCode.DEVICE_NOT_FOUND}
)


def is_final(code: ErrorCode | None, *, opened: bool) -> bool:
    """Whether *code* ending a channel ends the session: refusing its opening (*opened*
    false) or closing it once open. ``None`` (no error code: a drop, a timeout) never is."""
    return code is not None and code in (FINAL_ONCE_OPEN if opened else FINAL_AT_OPEN)


def backoff_ceiling(attempt: int, *, base: float, cap: float) -> float:
    """The longest wait before reconnect number *attempt* (from 0): ``min(cap, base * 2 **
    attempt)``, without overflow however large *attempt* is."""
    if attempt < 0:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "attempt must be >= 0")
    ceiling = base
    for _ in range(attempt):
        if ceiling >= cap:
            break
        ceiling *= 2
    return min(cap, ceiling)


@dataclass(frozen=True, kw_only=True)
class RefusalBackoff:
    """Keep trying a device the hub refuses for good (one of ``codes``, each final by
    :func:`is_final`), waiting half of ``min(cap, base * 2 ** attempt)`` plus a random half
    before each try (seconds). Bad values raise :class:`LocalProtocolError`."""

    codes: frozenset[ErrorCode] = DEFAULT_REFUSALS
    #: The first wait's ceiling; it doubles with every loss in a row.
    base: float = 5.0
    #: The longest wait's ceiling.
    cap: float = 300.0

    def __post_init__(self) -> None:
        if not isinstance(self.codes, frozenset) or not all(
            isinstance(code, ErrorCode) for code in self.codes
        ):
            raise _invalid("codes must be a frozenset of ErrorCode")
        _at_least("base", self.base, MIN_TIMEOUT)
        _at_least("cap", self.cap, self.base)

    def delay(self, attempt: int, random_fraction: float) -> float:
        """The wait before try number *attempt* (from 0)."""
        ceiling = backoff_ceiling(attempt, base=self.base, cap=self.cap)
        return _half_jitter(ceiling, random_fraction)


def _half_jitter(ceiling: float, fraction: float) -> float:
    """Half of *ceiling*, plus *fraction* of the other half."""
    return ceiling / 2 + fraction * ceiling / 2


# --------------------------------------------------------------------------------------------
# Actions
# --------------------------------------------------------------------------------------------


class CloseReason(IdentityEnum):
    """Why the machine closes a channel (for the adapter's log)."""

    #: A ping went unanswered for ``ping_timeout``.
    DEAD = "no answer to a ping"
    #: The Register went unanswered for ``ping_timeout``.
    NOT_REGISTERED = "no answer to the Register"
    #: A renewed channel took over, and this one had ``ping_timeout`` to drain.
    REPLACED = "replaced by a renewed channel"
    #: The renewed channel failed: this one is closed and a new one opened the usual way.
    RENEWAL_FAILED = "its renewal failed"
    #: The session ended with a final error on another channel.
    GIVEN_UP = "the session ended"


@dataclass(frozen=True, kw_only=True)
class OpenChannel:
    """Open control channel ``channel``: a connection, a SAS token whose expiry
    :meth:`DeviceSession.token_expiry` gives, the WebSocket handshake."""

    channel: int


@dataclass(frozen=True, kw_only=True)
class SendRegister:
    """Send the control ``Register`` on ``channel`` (its handshake is done)."""

    channel: int


@dataclass(frozen=True, kw_only=True)
class SendPing:
    """Send a WebSocket ping on ``channel``."""

    channel: int


@dataclass(frozen=True, kw_only=True)
class CloseChannel:
    """Close ``channel``; the machine has let it go, and ignores any later report about it."""

    channel: int
    reason: CloseReason


@dataclass(frozen=True, kw_only=True)
class Online:
    """The device is online on ``channel`` (its Register was answered); new requests come on
    it. ``replaced``, when not None, is the channel it renewed: that one drains."""

    channel: int
    replaced: int | None = None


@dataclass(frozen=True, kw_only=True)
class Reconnect:
    """The device is offline; the next :class:`OpenChannel` comes after ``after`` seconds
    (from :meth:`DeviceSession.timer` at :meth:`DeviceSession.next_deadline`, or at once in
    the same list when ``after`` is 0). ``attempt`` counts the losses in a row, from 1.
    ``code`` says why the wait is a long one: ``DEVICE_REPLACED`` (another connection took
    the device over) or the refusal a :class:`RefusalBackoff` retries; None for any other
    loss (a drop, a timeout, an error that a reconnect may cure)."""

    after: float
    attempt: int
    code: ErrorCode | None = None


@dataclass(frozen=True, kw_only=True)
class GiveUp:
    """The session is over: ``code``, met by ``channel``, is final. Raise it, with
    ``message`` when there is one (else the hub's own message for it)."""

    channel: int
    code: ErrorCode
    message: str = ""


#: Anything the machine asks the adapter to do.
Action = OpenChannel | SendRegister | SendPing | CloseChannel | Online | Reconnect | GiveUp


def long_wait_cause(code: ErrorCode, message: str = "") -> str:
    """What a device says a long wait (a :class:`Reconnect` with a ``code``) is for, in its
    log: a replacement by another client with the same device id, or the hub's refusal
    (*message*: the hub's words for it; else the code's own)."""
    if code is ErrorCode.DEVICE_REPLACED:
        return "replaced by a newer connection (another client uses this device id)"
    return f"the hub refuses it: {message or code.message} (error {int(code)})"


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


class SessionState(IdentityEnum):
    """Where the device's session is."""

    #: :meth:`DeviceSession.start` not called yet.
    IDLE = "idle"
    #: A channel is being opened; none serves.
    CONNECTING = "connecting"
    #: A channel is open and its Register sent; none serves yet.
    REGISTERING = "registering"
    #: A channel serves.
    ONLINE = "online"
    #: A channel serves; its successor (with a fresh token) is being opened.
    RENEWING = "renewing"
    #: A channel serves; its successor is open and its Register sent.
    HANDING_OVER = "handing over"
    #: No channel; the next one opens when the backoff is over.
    WAITING = "waiting"
    #: A final error ended the session.
    FAILED = "failed"


class SessionInput(IdentityEnum):
    """What moves the session."""

    #: :meth:`DeviceSession.start`.
    START = "start"
    #: The channel on its way finished its handshake.
    OPENED = "opened"
    #: The channel on its way had its Register answered.
    REGISTERED = "registered"
    #: The channel on its way was refused, dropped, or not registered in time (retryable).
    PENDING_LOST = "pending channel lost"
    #: The serving channel ended or went dead (retryable).
    SERVING_LOST = "serving channel lost"
    #: The serving channel's token reached its renewal time.
    RENEWAL_DUE = "renewal due"
    #: The backoff after a loss is over.
    BACKOFF_OVER = "backoff over"
    #: A final error on the channel on its way or the serving one.
    FINAL_ERROR = "final error"


_S = SessionState
_I = SessionInput
#: The session's legal moves.
SESSION_TRANSITIONS: Final[Mapping[tuple[SessionState, SessionInput], SessionState]] = {
    (_S.IDLE, _I.START): _S.CONNECTING,
    (_S.CONNECTING, _I.OPENED): _S.REGISTERING,
    (_S.CONNECTING, _I.PENDING_LOST): _S.WAITING,
    (_S.CONNECTING, _I.FINAL_ERROR): _S.FAILED,
    (_S.REGISTERING, _I.REGISTERED): _S.ONLINE,
    (_S.REGISTERING, _I.PENDING_LOST): _S.WAITING,
    (_S.REGISTERING, _I.FINAL_ERROR): _S.FAILED,
    (_S.ONLINE, _I.RENEWAL_DUE): _S.RENEWING,
    (_S.ONLINE, _I.SERVING_LOST): _S.WAITING,
    (_S.ONLINE, _I.FINAL_ERROR): _S.FAILED,
    (_S.RENEWING, _I.OPENED): _S.HANDING_OVER,
    (_S.RENEWING, _I.PENDING_LOST): _S.CONNECTING,
    (_S.RENEWING, _I.SERVING_LOST): _S.CONNECTING,
    (_S.RENEWING, _I.FINAL_ERROR): _S.FAILED,
    (_S.HANDING_OVER, _I.REGISTERED): _S.ONLINE,
    (_S.HANDING_OVER, _I.PENDING_LOST): _S.CONNECTING,
    (_S.HANDING_OVER, _I.SERVING_LOST): _S.REGISTERING,
    (_S.HANDING_OVER, _I.FINAL_ERROR): _S.FAILED,
    (_S.WAITING, _I.BACKOFF_OVER): _S.CONNECTING,
}

#: The states with a channel on its way, and those of them where it is open.
_PENDING_STATES: Final = frozenset({_S.CONNECTING, _S.REGISTERING, _S.RENEWING, _S.HANDING_OVER})
_PENDING_OPEN_STATES: Final = frozenset({_S.REGISTERING, _S.HANDING_OVER})
#: The states with a serving channel.
_SERVING_STATES: Final = frozenset({_S.ONLINE, _S.RENEWING, _S.HANDING_OVER})


def _invalid(message: str) -> LocalProtocolError:
    return LocalProtocolError(ErrorCode.ARGUMENT_INVALID, message)


def _at_least(name: str, value: object, least: float) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < least
        or value <= 0
    ):
        raise _invalid(f"{name} must be a finite number > 0 and >= {least}")
    return float(value)


def _fraction(value: object) -> float:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not 0 <= value <= 1  # NaN fails too
    ):
        raise _invalid("random_fraction must be a number from 0 to 1")
    return float(value)


@dataclass(kw_only=True)
class _Channel:
    """What the machine holds about the channel on its way or the serving one."""

    number: int
    #: When its token is due for renewal (set by token_expiry, before its handshake).
    renew_at: float | None = None
    #: When its Register must be answered by (set when its handshake is done).
    register_by: float | None = None


class DeviceSession:
    """The life of a device's control channels, from the first open to a final error (sans-IO).

    ``ping_interval`` and ``ping_timeout`` rule the keepalive (and the time a Register and a
    draining channel get); ``backoff_base`` and ``backoff_cap`` the waits before reconnects;
    ``sas_lifetime`` (whole seconds, at least 2) the tokens' expiry and so their renewal;
    ``token_expires_at`` (Unix seconds), when the connection string carries a token instead
    of a key, that token's expiry (see "A given token" above).
    ``refusal_backoff`` (None: refusals are final) retries the refusals it names;
    ``keep_trying_when_replaced`` and ``replaced_window`` rule what a replacement by another
    connection does (see the module's rules). Bad arguments raise
    :class:`LocalProtocolError` (``ARGUMENT_INVALID``).
    """

    def __init__(
        self,
        *,
        ping_interval: float = DEFAULT_PING_INTERVAL,
        ping_timeout: float = DEFAULT_PING_TIMEOUT,
        backoff_base: float = DEFAULT_BACKOFF_BASE,
        backoff_cap: float = DEFAULT_BACKOFF_CAP,
        sas_lifetime: int = DEFAULT_SAS_LIFETIME,
        refusal_backoff: RefusalBackoff | None = None,
        keep_trying_when_replaced: bool = False,
        replaced_window: float = DEFAULT_REPLACED_WINDOW,
        token_expires_at: int | None = None,
    ) -> None:
        self.ping_interval = _at_least("ping_interval", ping_interval, MIN_TIMEOUT)
        self.ping_timeout = _at_least("ping_timeout", ping_timeout, MIN_TIMEOUT)
        self.backoff_base = _at_least("backoff_base", backoff_base, 0)
        self.backoff_cap = _at_least("backoff_cap", backoff_cap, 0)
        if self.backoff_cap < self.backoff_base:
            raise _invalid("backoff_cap must be at least backoff_base")
        if not isinstance(sas_lifetime, int) or isinstance(sas_lifetime, bool) or sas_lifetime < 2:
            raise _invalid("sas_lifetime must be an integer >= 2")
        self.sas_lifetime = sas_lifetime
        if refusal_backoff is not None and not isinstance(refusal_backoff, RefusalBackoff):
            raise _invalid("refusal_backoff must be a RefusalBackoff or None")
        self.refusal_backoff = refusal_backoff
        if not isinstance(keep_trying_when_replaced, bool):
            raise _invalid("keep_trying_when_replaced must be a bool")
        self.keep_trying_when_replaced = keep_trying_when_replaced
        self.replaced_window = _at_least("replaced_window", replaced_window, MIN_TIMEOUT)
        if token_expires_at is not None and (
            not isinstance(token_expires_at, int) or isinstance(token_expires_at, bool)
        ):
            raise _invalid("token_expires_at must be an integer or None")
        self.token_expires_at = token_expires_at
        self._state = SessionState.IDLE
        self._now = -math.inf
        #: The last channel number given out (0: none yet).
        self._last_channel = 0
        self._pending: _Channel | None = None
        self._serving: _Channel | None = None
        #: Draining channels, each with when it is closed.
        self._draining: dict[int, float] = {}
        #: The serving channel's next ping, and when the ping in flight went (None: none).
        self._next_ping: float | None = None
        self._ping_sent: float | None = None
        #: Losses since the last registration, and when the next channel opens (WAITING).
        self._attempt = 0
        self._reconnect_at: float | None = None
        #: When a channel was last replaced by another connection (None: never).
        self._replaced_at: float | None = None

    # -- what the adapter reads ---------------------------------------------------------------

    @property
    def state(self) -> SessionState:
        """Where the session is."""
        return self._state

    @property
    def online(self) -> bool:
        """Whether a channel serves (the device takes stream requests)."""
        return self._serving is not None

    @property
    def serving_channel(self) -> int | None:
        """The number of the channel that serves, if any."""
        return None if self._serving is None else self._serving.number

    @property
    def ping_in_flight(self) -> bool:
        """Whether a ping on the serving channel is unanswered."""
        return self._ping_sent is not None

    @property
    def attempt(self) -> int:
        """Losses since the last registration (the backoff's exponent for the next one)."""
        return self._attempt

    def next_deadline(self) -> float | None:
        """When :meth:`timer` has something to do next (the adapter's clock), or None."""
        due = list(self._draining.values())
        if self._reconnect_at is not None:
            due.append(self._reconnect_at)
        pending, serving = self._pending, self._serving
        if pending is not None and pending.register_by is not None:
            due.append(pending.register_by)
        if serving is not None:
            assert self._next_ping is not None
            due.append(self._next_ping)
            if self._ping_sent is not None:
                due.append(self._ping_sent + self.ping_timeout)
            if self._state is SessionState.ONLINE:
                assert serving.renew_at is not None
                due.append(serving.renew_at)
        return min(due, default=None)

    # -- inputs -------------------------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Begin: open the first channel."""
        self._clock(now)
        self._move(SessionInput.START)
        return [self._open_next()]

    def token_expiry(self, channel: int, *, now: float, wall_time: float) -> int:
        """The expiry (``se``, Unix seconds) to sign channel *channel*'s SAS token with, the
        token being signed at *now* (the adapter's clock) and *wall_time* (Unix time). The
        channel's renewal falls due :func:`~devstream_core.credentials.sas_renewal_time` of
        it, counted from *now*. Call it for the channel on its way, before its handshake (for
        a channel the machine let go meanwhile, it gives an expiry and remembers nothing).

        With ``token_expires_at`` it gives that expiry and the channel is never renewed, or,
        once *wall_time* reached it, raises
        :func:`~devstream_core.credentials.expired_signature_error`."""
        self._clock(now)
        if not isinstance(wall_time, (int, float)) or not math.isfinite(wall_time):
            raise _invalid("wall_time must be finite")
        number = self._known(channel)
        fixed = self.token_expires_at
        if fixed is not None and not wall_time < fixed:
            raise expired_signature_error(fixed)
        expiry = int(wall_time) + self.sas_lifetime if fixed is None else fixed
        pending = self._pending
        if pending is None or pending.number != number:
            self._ignored(number)
            return expiry  # a channel let go: nothing to remember
        if self._state in _PENDING_OPEN_STATES:
            raise _invalid(f"channel {channel}'s handshake is done already")
        if fixed is not None:
            pending.renew_at = math.inf  # nothing to renew it with
            return expiry
        renewal = sas_renewal_time(issued_at=wall_time, expiry=expiry, fraction=SAS_RENEW_FRACTION)
        pending.renew_at = now + (renewal - wall_time)
        return expiry

    def channel_opened(self, channel: int, now: float) -> list[Action]:
        """Channel *channel*'s WebSocket handshake is done: register on it."""
        self._clock(now)
        number = self._known(channel)
        pending = self._pending
        if pending is None or pending.number != number:
            return self._ignored(number)
        if pending.renew_at is None:
            raise _invalid(f"channel {channel}'s token was not signed with token_expiry()")
        self._move(SessionInput.OPENED)
        pending.register_by = now + self.ping_timeout
        return [SendRegister(channel=channel)]

    def registered(self, channel: int, now: float) -> list[Action]:
        """Channel *channel*'s Register was answered: the device is online on it."""
        self._clock(now)
        number = self._known(channel)
        pending = self._pending
        if pending is None or pending.number != number:
            return self._ignored(number)
        self._move(SessionInput.REGISTERED)
        old = self._serving
        self._pending, self._serving = None, pending
        pending.register_by = None
        self._next_ping, self._ping_sent = now + self.ping_interval, None
        self._attempt = 0
        actions: list[Action] = [
            Online(channel=channel, replaced=None if old is None else old.number)
        ]
        if old is not None:
            self._draining[old.number] = now + self.ping_timeout
        assert pending.renew_at is not None
        if pending.renew_at <= now:  # registered later than its renewal time: renew at once
            actions += self._renew()
        return actions

    def data_received(self, channel: int, *, at: float) -> None:
        """Bytes arrived on channel *channel* at *at* (the adapter's clock): any bytes at or
        after a ping's sending answer it. The adapter may report this late, but before it
        calls :meth:`timer`."""
        if not isinstance(at, (int, float)) or not math.isfinite(at):
            raise _invalid("at must be finite")
        number = self._known(channel)
        serving = self._serving
        if (
            serving is not None
            and serving.number == number
            and self._ping_sent is not None
            and at >= self._ping_sent
        ):
            self._ping_sent = None

    def channel_lost(
        self, channel: int, now: float, *, code: ErrorCode | None, random_fraction: float
    ) -> list[Action]:
        """Channel *channel* ended: its opening was refused or failed, or it closed or dropped
        once open. *code* is the error the hub gave (the refusal's ``errorCode``, the close
        reason's code), or None. *random_fraction* picks the backoff, if one follows."""
        self._clock(now)
        fraction = _fraction(random_fraction)
        if code is not None and not isinstance(code, ErrorCode):
            raise _invalid("code must be an ErrorCode or None")
        number = self._known(channel)
        pending, serving = self._pending, self._serving
        if pending is not None and pending.number == number:
            opened = self._state in _PENDING_OPEN_STATES
            waits = serving is None
        elif serving is not None and serving.number == number:
            opened, waits = True, pending is None
        else:
            self._draining.pop(number, None)
            return []
        cause: ErrorCode | None = None
        if code is not None:
            if code is ErrorCode.DEVICE_REPLACED and waits:
                replaced_at, self._replaced_at = self._replaced_at, now
                if (
                    not self.keep_trying_when_replaced
                    and replaced_at is not None
                    and now - replaced_at <= self.replaced_window
                ):
                    return self._give_up(
                        channel,
                        code,
                        f"{code.message} again, {now - replaced_at:.0f} s after the last time: "
                        "another client uses this device id",
                    )
                cause = code
            elif is_final(code, opened=opened):
                retry = self.refusal_backoff
                if retry is None or code not in retry.codes:
                    return self._give_up(channel, code)
                cause = code
        if pending is not None and pending.number == number:
            return self._pending_lost(now, fraction, closing=None, cause=cause)
        return self._serving_lost(now, fraction, closing=None, cause=cause)

    def timer(
        self,
        now: float,
        *,
        random_fraction: float,
        last_received: Mapping[int, float] | None = None,
    ) -> list[Action]:
        """Do what is due by *now*: close drained channels, reconnect after the backoff, give
        up on a Register or a ping unanswered, renew, ping. *random_fraction* picks the
        backoff, if a channel is lost here. *last_received* (channel -> the time bytes last
        arrived on it), when given, is reported first as :meth:`data_received` would be: an
        adapter that only notes the time of each read hands it over here, at the one moment
        it must be known."""
        for channel, at in (last_received or {}).items():
            self.data_received(channel, at=at)
        self._clock(now)
        fraction = _fraction(random_fraction)
        actions: list[Action] = []
        for number, close_at in list(self._draining.items()):
            if close_at <= now:
                del self._draining[number]
                actions.append(CloseChannel(channel=number, reason=CloseReason.REPLACED))
        if self._reconnect_at is not None and self._reconnect_at <= now:
            actions += self._reconnect()
        pending = self._pending
        if pending is not None and pending.register_by is not None and pending.register_by <= now:
            actions += self._pending_lost(now, fraction, closing=CloseReason.NOT_REGISTERED)
        serving = self._serving
        if (
            serving is not None
            and self._ping_sent is not None
            and self._ping_sent + self.ping_timeout <= now
        ):
            actions += self._serving_lost(now, fraction, closing=CloseReason.DEAD)
            serving = self._serving
        if serving is None:
            return actions
        assert serving.renew_at is not None and self._next_ping is not None
        if self._state is SessionState.ONLINE and serving.renew_at <= now:
            actions += self._renew()
        if self._next_ping <= now:
            self._next_ping = now + self.ping_interval
            if self._ping_sent is None:
                self._ping_sent = now
                actions.append(SendPing(channel=serving.number))
        return actions

    # -- transitions --------------------------------------------------------------------------

    def _clock(self, now: object) -> None:
        if not isinstance(now, (int, float)) or not math.isfinite(now):
            raise _invalid("now must be finite")
        if now < self._now:
            raise _invalid("now went back")
        self._now = float(now)

    def _known(self, channel: object) -> int:
        if (
            not isinstance(channel, int)
            or isinstance(channel, bool)
            or not 1 <= channel <= self._last_channel
        ):
            raise _invalid(f"no channel {channel!r} was opened")
        return channel

    def _ignored(self, channel: int) -> list[Action]:
        """A report about *channel* that is not on its way: ignored if the machine let it go
        (or it drains), an error if it serves."""
        if self._serving is not None and self._serving.number == channel:
            raise _invalid(f"channel {channel} serves already")
        return []

    def _move(self, event: SessionInput) -> None:
        next_state = SESSION_TRANSITIONS.get((self._state, event))
        if next_state is None:
            raise _invalid(f"{event.value} when the session is {self._state.value}")
        self._state = next_state

    def _open_next(self) -> OpenChannel:
        self._last_channel += 1
        self._pending = _Channel(number=self._last_channel)
        return OpenChannel(channel=self._last_channel)

    def _renew(self) -> list[Action]:
        self._move(SessionInput.RENEWAL_DUE)
        return [self._open_next()]

    def _reconnect(self) -> list[Action]:
        self._move(SessionInput.BACKOFF_OVER)
        self._reconnect_at = None
        return [self._open_next()]

    def _wait(self, now: float, fraction: float, cause: ErrorCode | None) -> list[Action]:
        """Offline after a loss: the backoff, or the next channel at once if it is 0. A
        *cause* (a replacement, a refusal retried) makes the wait a long one."""
        if cause is ErrorCode.DEVICE_REPLACED:
            delay = _half_jitter(self.backoff_cap, fraction)
        elif cause is not None:
            assert self.refusal_backoff is not None
            delay = self.refusal_backoff.delay(self._attempt, fraction)
        else:
            ceiling = backoff_ceiling(self._attempt, base=self.backoff_base, cap=self.backoff_cap)
            delay = fraction * ceiling
        self._attempt += 1
        actions: list[Action] = [Reconnect(after=delay, attempt=self._attempt, code=cause)]
        self._reconnect_at = now + delay
        if self._reconnect_at <= now:  # no wait (or one too small to tell from now)
            actions += self._reconnect()
        return actions

    def _pending_lost(
        self,
        now: float,
        fraction: float,
        *,
        closing: CloseReason | None,
        cause: ErrorCode | None = None,
    ) -> list[Action]:
        """The channel on its way failed (and is closed for *closing*, if given; *cause* as
        :meth:`_wait` takes it)."""
        pending = self._pending
        assert pending is not None
        self._move(SessionInput.PENDING_LOST)
        self._pending = None
        actions: list[Action] = []
        if closing is not None:
            actions.append(CloseChannel(channel=pending.number, reason=closing))
        serving = self._serving
        if serving is None:
            return actions + self._wait(now, fraction, cause)
        # A renewal failed: the old channel goes too, and a new one opens the usual way.
        self._drop_serving()
        actions.append(CloseChannel(channel=serving.number, reason=CloseReason.RENEWAL_FAILED))
        return [*actions, self._open_next()]

    def _serving_lost(
        self,
        now: float,
        fraction: float,
        *,
        closing: CloseReason | None,
        cause: ErrorCode | None = None,
    ) -> list[Action]:
        """The serving channel ended (and is closed for *closing*, if given; *cause* as
        :meth:`_wait` takes it)."""
        serving = self._serving
        assert serving is not None
        self._move(SessionInput.SERVING_LOST)
        self._drop_serving()
        actions: list[Action] = []
        if closing is not None:
            actions.append(CloseChannel(channel=serving.number, reason=closing))
        if self._pending is not None:
            return actions  # the successor carries on
        return actions + self._wait(now, fraction, cause)

    def _drop_serving(self) -> None:
        self._serving = None
        self._next_ping = self._ping_sent = None

    def _give_up(self, channel: int, code: ErrorCode, message: str = "") -> list[Action]:
        self._move(SessionInput.FINAL_ERROR)
        others = [c.number for c in (self._pending, self._serving) if c is not None]
        others += self._draining
        self._pending = None
        self._drop_serving()
        self._draining.clear()
        actions: list[Action] = [
            CloseChannel(channel=number, reason=CloseReason.GIVEN_UP)
            for number in sorted(others)
            if number != channel
        ]
        actions.append(GiveUp(channel=channel, code=code, message=message))
        return actions
