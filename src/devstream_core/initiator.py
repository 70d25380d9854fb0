"""A client's side of opening a stream: how a service asks for one, and how either side joins.

The same decisions for every I/O layer, so that a driver only moves bytes:

* :class:`Initiator`, one per service client, says how the next initiate goes (in one step,
  a ``GET`` upgrade whose ``101`` is the stream, or Azure's way, a ``POST`` then a WebSocket
  to the streaming endpoint), remembers what the hub told it, and reads every answer into the
  stream to join or the exception to raise.
* :func:`stream_subprotocols` and :func:`check_joined`: what a side offers when it joins a
  stream of a mode, and whether the ``101`` it got carries that mode.
* :func:`close_error`: the exception for a WebSocket the hub closed with a devstream error.
* :func:`attempt_failure`: what a stream driver is told about a failed reconnection.
* :data:`JOIN_TIMEOUT` and :func:`answer_timeout`: how long a side waits for the hub's answer
  when it joins a stream, and a service for the answer to its initiate. A connection that
  goes silent during a handshake (no reset, no close) is given up, not waited on for ever.

Rules every change must keep:

* **The hub's word is remembered, not guessed.** ``one_step`` is None until a hub answered a
  one-step initiate; an answer saying it cannot (``405``, or ``404`` without a devstream error
  code) makes it False for good, a ``101`` True. A refusal says nothing about it.
* **Typed errors only**: a refusal raises the exception for the hub's code
  (:func:`~devstream_core.exceptions.error_for`); a broken answer, ``HubError`` with
  ``PROTOCOL_ERROR``; a mode this version does not know, ``HubError`` with
  ``ARGUMENT_INVALID`` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from .control import MODE_FRAMED, MODE_RAW
from .errors import DevstreamError, ErrorCode, parse_close_reason
from .exceptions import HubError, HubUnreachable, error_for
from .streamdriver import FIRST_RESUME_DELAY, MAX_RESUME_DELAY
from .wire import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_RESPONSE_TIMEOUT,
    InitiateAccepted,
    InitiateRejected,
    InitiateRequest,
    OneStepUnsupported,
    build_initiate_request,
    parse_initiate_answer,
)

__all__ = [
    "JOIN_TIMEOUT",
    "Initiator",
    "answer_timeout",
    "attempt_failure",
    "check_joined",
    "close_error",
    "no_answer",
    "stream_subprotocols",
]

#: Seconds a side waits for the ``101`` when it joins a stream (the hub answers a join at
#: once), as a resume attempt waits its ``ping_timeout`` (10 s by default).
JOIN_TIMEOUT: Final = 10.0


def answer_timeout(response_timeout: float) -> float:
    """Seconds a service waits for the answer to an initiate that gave the device
    *response_timeout* seconds to answer: that, then :data:`JOIN_TIMEOUT` for the hub's."""
    return response_timeout + JOIN_TIMEOUT


def join_retry_delay(attempt: int, rand: float) -> float:
    """How long to wait before trying a join again after *attempt* tries (1: the first) were
    lost on the way (no answer from the hub: :func:`join_may_retry`), *rand* drawn in
    ``[0, 1)``: as a resume's delays (50 ms doubling up to 5 s, each jittered to between half
    and all of it). The caller gives up at :data:`JOIN_TIMEOUT` after the first try."""
    if not 0.0 <= rand < 1.0 or attempt < 1:
        raise HubError(ErrorCode.ARGUMENT_INVALID, "attempt >= 1 and rand in [0, 1)")
    delay: float = min(FIRST_RESUME_DELAY * 2 ** min(attempt - 1, 16), MAX_RESUME_DELAY)
    return delay / 2 + rand * delay / 2


def join_may_retry(error: BaseException) -> bool:
    """Whether a join that failed with *error* may be tried again with the same token: the
    connection was lost or refused before any answer (the request may not have reached the
    hub, or its ``101`` may have been lost; the hub takes the token again until a message
    comes on the connection it opened). Never after an answer of the hub's, or a TLS
    mismatch."""
    return type(error) is HubUnreachable or isinstance(error, ConnectionError)


def no_answer(what: str, seconds: float) -> HubUnreachable:
    """The error for a handshake (*what*: ``"initiate"``, ``"join"``) the hub left without an
    answer for *seconds*."""
    return HubUnreachable(
        ErrorCode.HUB_UNREACHABLE, f"no answer from the hub to the {what} within {seconds:g} s"
    )


_RAW_OFFER: Final[tuple[str, ...]] = ()
_FRAMED_OFFER: Final = (MODE_FRAMED,)


def stream_subprotocols(mode: str) -> tuple[str, ...]:
    """The WebSocket subprotocols a side offers to join a stream of *mode*: none for raw,
    ``devstream.v1`` for framed; ``HubError`` (``ARGUMENT_INVALID``) for any other mode."""
    if mode == MODE_RAW:
        return _RAW_OFFER
    if mode == MODE_FRAMED:
        return _FRAMED_OFFER
    raise HubError(ErrorCode.ARGUMENT_INVALID, f"unknown stream mode {mode!r}")


def check_joined(mode: str, subprotocol: str | None) -> None:
    """Raise ``HubError`` (``PROTOCOL_ERROR``) unless the subprotocol a ``101`` chose carries
    a stream of *mode* (raw streams take any answer: an Azure hub names none)."""
    if mode != MODE_RAW and subprotocol != mode:
        raise HubError(ErrorCode.PROTOCOL_ERROR, f"the hub did not accept {mode}")


def close_error(reason: str) -> HubError | None:
    """The exception for a WebSocket closed with *reason*, when the reason carries a devstream
    error (``"<code> <message>"``); None when it carries none."""
    code, message = parse_close_reason(reason)
    return None if code is None else error_for(code, message)


def attempt_failure(error: DevstreamError | None) -> tuple[ErrorCode | None, str]:
    """What :meth:`~devstream_core.streamdriver.StreamDriver.connect_failed` is told about a
    reconnection that failed with *error* (None: no answer in time): the hub's code when the
    hub answered with one, and a message."""
    if error is None:
        return None, "no answer from the hub"
    return (error.code if isinstance(error, HubError) else None), error.message


class Initiator:
    """One service client's initiates: what to send, which way, and what the answers mean."""

    def __init__(self) -> None:
        #: Whether the hub opens streams in one step: None until a hub said; False makes
        #: every initiate a ``POST``.
        self.one_step: bool | None = None

    def request(
        self,
        device_id: str,
        name: str,
        *,
        mode: str,
        window: int | None,
        connect_timeout: int = DEFAULT_CONNECT_TIMEOUT,
        response_timeout: int = DEFAULT_RESPONSE_TIMEOUT,
    ) -> InitiateRequest:
        """The initiate of a stream of *mode* to *device_id*'s *name*; the window goes with a
        framed stream only (the device adopts it)."""
        stream_subprotocols(mode)  # a mode this version knows
        return build_initiate_request(
            device_id,
            name,
            connect_timeout=connect_timeout,
            response_timeout=response_timeout,
            mode=mode,
            window=None if mode == MODE_RAW else window,
        )

    @property
    def tries_one_step(self) -> bool:
        """Whether the next initiate is tried in one step."""
        return self.one_step is not False

    def one_step_answer(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, *, mode: str
    ) -> InitiateAccepted | None:
        """Read the answer to a one-step initiate of *mode* (header names lower-case): the
        stream when it is a ``101`` (its connection is the stream; ``url`` is where it
        resumes), None when the hub cannot open streams in one step (ask with a ``POST``);
        a refusal raises the exception for its code."""
        answer = parse_initiate_answer(status, headers, body, one_step=True, mode=mode)
        if isinstance(answer, OneStepUnsupported):
            self.one_step = False
            return None
        if isinstance(answer, InitiateRejected):
            raise answer.error()
        self.one_step = True
        return answer

    def post_answer(
        self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes
    ) -> InitiateAccepted:
        """Read the answer to a ``POST`` initiate: the stream to join (``url``, ``token``,
        ``mode``); a refusal raises the exception for its code."""
        answer = parse_initiate_answer(status, headers, body)
        if isinstance(answer, InitiateRejected):
            raise answer.error()
        assert isinstance(answer, InitiateAccepted)  # a POST's answer is never OneStepUnsupported
        return answer
