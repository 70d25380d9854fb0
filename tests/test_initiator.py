"""The client's side of opening a stream (:mod:`devstream_core.initiator`): what a service
sends, which way, what each answer means, and what a side joining a stream offers and takes.

Pure functions and one small machine: no I/O, no clock. The answers are built with the
hub's own builders (:func:`devstream_core.wire.build_initiate_answer`), so the two sides are
held to one contract.
"""

from __future__ import annotations

import pytest

from devstream_core.control import MODE_FRAMED, MODE_RAW
from devstream_core.errors import DevstreamError, ErrorCode, close_reason_for
from devstream_core.exceptions import (
    DeviceNotOnline,
    HubError,
    StreamNameNotRegistered,
    StreamRejected,
)
from devstream_core.initiator import (
    Initiator,
    attempt_failure,
    check_joined,
    close_error,
    stream_subprotocols,
)
from devstream_core.wire import (
    HEADER_STREAM_MODE,
    HEADER_STREAM_WINDOW,
    InitiateAccepted,
    InitiateRejected,
    InitiateRequest,
    build_error_body,
    build_initiate_answer,
)

URL = "wss://hub.test/bridges/s1?role=service"


def headers_of(request: InitiateRequest) -> dict[str, str]:
    return dict(request.headers)


def test_the_request_carries_the_window_for_a_framed_stream_only() -> None:
    initiator = Initiator()
    framed = initiator.request("d1", "ssh", mode=MODE_FRAMED, window=8192)
    raw = initiator.request("d1", "ssh", mode=MODE_RAW, window=8192)
    assert framed.target == raw.target == "/twins/d1/streams/ssh?api-version=2020-09-30"
    assert headers_of(framed)[HEADER_STREAM_MODE.decode()] == MODE_FRAMED
    assert headers_of(framed)[HEADER_STREAM_WINDOW.decode()] == "8192"
    assert HEADER_STREAM_MODE.decode() not in headers_of(raw)
    assert HEADER_STREAM_WINDOW.decode() not in headers_of(raw)


def test_an_unknown_mode_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(HubError) as info:
        Initiator().request("d1", "ssh", mode="telepathy", window=None)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_a_101_opens_the_stream_and_the_hub_is_remembered_to_open_in_one_step() -> None:
    initiator = Initiator()
    assert initiator.one_step is None and initiator.tries_one_step
    accepted = InitiateAccepted(url=URL, token=None, mode=MODE_FRAMED, window=None)
    _, headers, _ = build_initiate_answer(accepted)
    answer = initiator.one_step_answer(101, headers, b"", mode=MODE_FRAMED)
    assert answer == accepted
    assert initiator.one_step is True and initiator.tries_one_step


@pytest.mark.parametrize(
    ("status", "body"),
    [(405, b""), (404, b"not here"), (404, b'{"message": "no code"}')],
)
def test_a_hub_that_cannot_open_in_one_step_is_asked_with_a_post_from_then_on(
    status: int, body: bytes
) -> None:
    initiator = Initiator()
    assert initiator.one_step_answer(status, [], body, mode=MODE_RAW) is None
    assert initiator.one_step is False and not initiator.tries_one_step


def test_a_refusal_in_one_step_raises_and_says_nothing_of_the_hub() -> None:
    initiator = Initiator()
    rejected = InitiateRejected(code=ErrorCode.STREAM_NAME_NOT_REGISTERED, message="no ssh")
    status, headers, body = build_initiate_answer(rejected)
    with pytest.raises(StreamNameNotRegistered):
        initiator.one_step_answer(status, headers, body, mode=MODE_FRAMED)
    with pytest.raises(DeviceNotOnline):
        initiator.one_step_answer(
            404, [], build_error_body(ErrorCode.DEVICE_NOT_ONLINE), mode=MODE_FRAMED
        )
    assert initiator.one_step is None


def test_a_post_answer_is_the_stream_to_join_or_the_refusal_raised() -> None:
    initiator = Initiator()
    accepted = InitiateAccepted(url=URL, token="tok", mode=MODE_RAW, window=None)
    assert initiator.post_answer(*build_initiate_answer(accepted)) == accepted
    rejected = InitiateRejected(code=ErrorCode.STREAM_REJECTED, message="busy")
    with pytest.raises(StreamRejected, match="busy"):
        initiator.post_answer(*build_initiate_answer(rejected))
    with pytest.raises(DeviceNotOnline):
        initiator.post_answer(404, [], build_error_body(ErrorCode.DEVICE_NOT_ONLINE))
    assert initiator.one_step is None


def test_what_a_side_offers_to_join_a_stream_of_each_mode() -> None:
    assert stream_subprotocols(MODE_RAW) == ()
    assert stream_subprotocols(MODE_FRAMED) == (MODE_FRAMED,)
    with pytest.raises(HubError) as info:
        stream_subprotocols("telepathy")
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_a_joined_framed_stream_must_carry_its_subprotocol() -> None:
    check_joined(MODE_RAW, None)
    check_joined(MODE_RAW, MODE_FRAMED)  # a raw side takes any answer
    check_joined(MODE_FRAMED, MODE_FRAMED)
    with pytest.raises(HubError) as info:
        check_joined(MODE_FRAMED, None)
    assert info.value.code is ErrorCode.PROTOCOL_ERROR


def test_a_close_with_a_devstream_error_is_that_error() -> None:
    error = close_error(close_reason_for(ErrorCode.DEVICE_NOT_ONLINE, "gone"))
    assert isinstance(error, DeviceNotOnline) and error.message == "gone"
    assert close_error("") is None
    assert close_error("bye") is None


def test_what_a_stream_driver_is_told_about_a_failed_reconnection() -> None:
    assert attempt_failure(None) == (None, "no answer from the hub")
    hub = HubError(ErrorCode.STREAM_TOKEN_EXPIRED, "too late")
    assert attempt_failure(hub) == (ErrorCode.STREAM_TOKEN_EXPIRED, "too late")
    broken = DevstreamError(ErrorCode.HUB_UNREACHABLE, "bad 101")
    assert attempt_failure(broken) == (None, "bad 101")


def test_a_lost_join_is_tried_again_after_a_resumes_delays() -> None:
    from devstream_core.initiator import join_retry_delay
    from devstream_core.streamdriver import FIRST_RESUME_DELAY, MAX_RESUME_DELAY

    assert join_retry_delay(1, 0.0) == FIRST_RESUME_DELAY / 2
    assert join_retry_delay(1, 0.999) < FIRST_RESUME_DELAY
    assert join_retry_delay(2, 0.0) == FIRST_RESUME_DELAY
    assert join_retry_delay(50, 0.0) == MAX_RESUME_DELAY / 2
    for bad in ((0, 0.5), (1, 1.0), (1, -0.1)):
        with pytest.raises(HubError):
            join_retry_delay(*bad)


def test_only_a_join_lost_before_any_answer_is_tried_again() -> None:
    from devstream_core.exceptions import HubUnreachable, TlsMismatch, Unauthorized
    from devstream_core.initiator import join_may_retry

    assert join_may_retry(HubUnreachable(ErrorCode.HUB_UNREACHABLE, "connection lost"))
    assert join_may_retry(ConnectionResetError())
    assert join_may_retry(ConnectionRefusedError())
    assert not join_may_retry(TlsMismatch(ErrorCode.HUB_UNREACHABLE, "TLS"))
    assert not join_may_retry(Unauthorized(ErrorCode.STREAM_TOKEN_REUSED, "used"))
    assert not join_may_retry(HubError(ErrorCode.NOT_FOUND, "stream closed"))
    assert not join_may_retry(ValueError())
