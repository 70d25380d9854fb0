"""The hub's admission of connections: how many it serves, and what it does past that.

What it knows: how many connections the hub serves and how many it is turning away right now,
its two limits, and what it has not yet reported about the turned-away connections. It does
not know sockets, requests or the clock: every call that depends on time takes ``now``.

Rules:

* A new connection is :attr:`Admission.SERVE`\\ d while fewer than ``max_connections`` are
  served; past that it is :attr:`Admission.ANSWER`\\ ed (the hub reads one request, answers it
  without serving it, and closes the connection) while fewer than ``max_answering`` are being
  answered; past both it is :attr:`Admission.CLOSE`\\ d at once. So the hub keeps the
  descriptors to say why it refuses, and never more than a fixed number for that.
* Every decision :meth:`ConnectionLimits.admit` makes is given back once with
  :meth:`ConnectionLimits.release` when its connection is closed; the capacity is back then.
* Turned-away connections are reported at most once per ``report_interval`` (a
  :class:`Tally`, which a hub also keeps for failed ``accept`` calls): the first at once, the
  rest as a count with the next one due. A flood costs a log line per interval, not one per
  connection.
"""

from __future__ import annotations

import math

from .common import IdentityEnum
from .errors import ErrorCode, LocalProtocolError

__all__ = ["Admission", "ConnectionLimits", "Tally"]


class Admission(IdentityEnum):
    """What the hub does with a new connection."""

    #: Serve it.
    SERVE = "serve"
    #: Read one request and answer it without serving it (the hub is full); then close.
    ANSWER = "answer"
    #: Close it at once, without a word (the hub is full, and so are its answering slots).
    CLOSE = "close"


class Tally:
    """Counts events and says when to report them: at most once per ``interval``.

    :meth:`add` returns the number of events to report (those since the last report, this one
    included) when the last report is at least ``interval`` old, else None.
    """

    def __init__(self, interval: float) -> None:
        if not isinstance(interval, (int, float)) or not math.isfinite(interval) or interval < 0:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "the report interval must be a number >= 0"
            )
        self._interval = float(interval)
        self._count = 0
        self._next_report = -math.inf

    def add(self, now: float) -> int | None:
        """One more event at ``now``: the count to report now, or None."""
        if not isinstance(now, (int, float)) or not math.isfinite(now):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "now must be finite")
        self._count += 1
        if now < self._next_report:
            return None
        count, self._count = self._count, 0
        self._next_report = now + self._interval
        return count


class ConnectionLimits:
    """Admission of a hub's connections (sans-IO).

    ``max_connections`` caps the connections served at once; ``max_answering`` the connections
    past it that are answered (and closed) at once; ``report_interval`` is the least time
    between two reports of turned-away connections.
    """

    def __init__(self, *, max_connections: int, max_answering: int, report_interval: float) -> None:
        for name, value, least in (
            ("max_connections", max_connections, 1),
            ("max_answering", max_answering, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise LocalProtocolError(
                    ErrorCode.ARGUMENT_INVALID, f"{name} must be an integer >= {least}"
                )
        self.max_connections = max_connections
        self.max_answering = max_answering
        self._counts = {Admission.SERVE: 0, Admission.ANSWER: 0, Admission.CLOSE: 0}
        self._refusals = Tally(report_interval)

    def admit(self, now: float) -> tuple[Admission, int | None]:
        """A new connection at ``now``: what to do with it, and (when it is turned away and a
        report is due) how many were turned away since the last report, this one included."""
        if self._counts[Admission.SERVE] < self.max_connections:
            decision = Admission.SERVE
        elif self._counts[Admission.ANSWER] < self.max_answering:
            decision = Admission.ANSWER
        else:
            decision = Admission.CLOSE
        self._counts[decision] += 1
        if decision is Admission.SERVE:
            return decision, None
        return decision, self._refusals.add(now)

    def release(self, decision: Admission) -> None:
        """A connection admitted with ``decision`` is closed."""
        if self._counts[decision] <= 0:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "released more than admitted")
        self._counts[decision] -= 1

    @property
    def served(self) -> int:
        """How many connections are served now."""
        return self._counts[Admission.SERVE]

    @property
    def turned_away(self) -> int:
        """How many connections are being answered or closed without being served now."""
        return self._counts[Admission.ANSWER] + self._counts[Admission.CLOSE]
