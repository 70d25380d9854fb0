"""Tests for devstream_core.coordinator: online devices, pending requests, deadlines.

Rules: no clock and no randomness; ``now`` is a literal and stream nonces are counter-derived.
Every test looks from both sides: what the service is told (Initiation* events) and what the
device's control connection is told (SendStreamRequest, ForgetRequest, DeviceReplaced).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator

import pytest

from devstream_core.coordinator import (
    MAX_REGISTERED_NAMES,
    Coordinator,
    CoordinatorEvent,
    CredentialsExpired,
    DeviceReplaced,
    ForgetRequest,
    InitiationAccepted,
    InitiationFailed,
    InitiationRejected,
    SendStreamRequest,
)
from devstream_core.errors import ErrorCode, LocalProtocolError

NOW = 500.0
_nonces: Iterator[int] = itertools.count(1)


def nonce() -> bytes:
    return next(_nonces).to_bytes(16, "big")


def sid(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def online(*names: str, device: str = "dev", conn: int = 1) -> Coordinator:
    coordinator = Coordinator()
    assert (
        coordinator.device_registered(
            device_id=device, connection_id=conn, names=list(names), now=NOW
        )
        == []
    )
    return coordinator


def initiate(
    coordinator: Coordinator,
    *,
    device: str = "dev",
    name: str = "ssh",
    now: float = NOW,
    timeout: float = 30.0,
    raw: bytes | None = None,
) -> CoordinatorEvent:
    events = coordinator.initiate(
        device_id=device,
        name=name,
        now=now,
        response_timeout=timeout,
        stream_nonce=raw if raw is not None else nonce(),
    )
    assert len(events) == 1
    return events[0]


def request_id(event: CoordinatorEvent) -> str:
    assert isinstance(event, SendStreamRequest | InitiationFailed | InitiationRejected)
    return event.request_id


def send(event: CoordinatorEvent) -> SendStreamRequest:
    assert isinstance(event, SendStreamRequest)
    return event


# -- registration ------------------------------------------------------------------------------


def test_registered_device_is_online_with_its_names() -> None:
    coordinator = online("ssh", "echo")
    assert coordinator.is_online("dev")
    assert coordinator.registered_names("dev") == frozenset({"ssh", "echo"})
    assert coordinator.online_count() == 1
    assert not coordinator.is_online("other")
    assert coordinator.registered_names("other") == frozenset()


def test_reregister_on_the_same_connection_updates_names_and_keeps_requests() -> None:
    coordinator = online("ssh")
    request = send(initiate(coordinator))
    events = coordinator.device_registered(
        device_id="dev", connection_id=1, names=["echo"], now=NOW
    )
    assert events == []
    assert coordinator.registered_names("dev") == frozenset({"echo"})
    assert coordinator.pending_count() == 1
    rejected = initiate(coordinator, name="ssh")
    assert isinstance(rejected, InitiationRejected)
    assert rejected.code is ErrorCode.STREAM_NAME_NOT_REGISTERED
    # The request made before the re-register is still answerable.
    accepted = coordinator.device_responded(
        connection_id=1, request_id=request.request_id, accepted=True, reason="", now=NOW
    )
    assert [type(e) for e in accepted] == [InitiationAccepted]


def test_a_connection_cannot_register_as_another_device() -> None:
    coordinator = online("ssh")
    with pytest.raises(LocalProtocolError) as info:
        coordinator.device_registered(device_id="other", connection_id=1, names=["ssh"], now=NOW)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert coordinator.registered_names("dev") == frozenset({"ssh"})


def accepted(request: SendStreamRequest) -> InitiationAccepted:
    return InitiationAccepted(
        request_id=request.request_id,
        stream_id=request.stream_id,
        device_id=request.device_id,
        name=request.name,
    )


def not_online(request: SendStreamRequest) -> InitiationFailed:
    return InitiationFailed(
        request_id=request.request_id,
        stream_id=request.stream_id,
        device_id=request.device_id,
        name=request.name,
        code=ErrorCode.DEVICE_NOT_ONLINE,
    )


def test_new_connection_replaces_the_old_one() -> None:
    coordinator = online("ssh", conn=1)
    events = coordinator.device_registered(
        device_id="dev", connection_id=2, names=["echo"], now=NOW + 1
    )
    # Nothing was pending on the old one: it is closed at once, and forgotten.
    assert events == [DeviceReplaced(device_id="dev", connection_id=1)]
    assert coordinator.online_count() == 1
    assert coordinator.registered_names("dev") == frozenset({"echo"})
    assert coordinator.device_disconnected(connection_id=1, now=NOW + 1) == []
    assert coordinator.is_online("dev")
    # New requests go to the new connection.
    assert send(initiate(coordinator, name="echo")).connection_id == 2


def test_requests_pending_on_a_replaced_connection_are_answered_there() -> None:
    coordinator = online("ssh", conn=1)
    first = send(initiate(coordinator))
    second = send(initiate(coordinator))
    events = coordinator.device_registered(
        device_id="dev", connection_id=2, names=["ssh"], now=NOW + 1
    )
    assert events == []  # the old one stays open while requests are pending on it
    assert coordinator.pending_count() == 2
    assert coordinator.online_count() == 1
    # New requests go to the new connection at once.
    third = send(initiate(coordinator, now=NOW + 1))
    assert third.connection_id == 2
    # The old connection answers its own requests; its last answer closes it.
    assert coordinator.device_responded(
        connection_id=1, request_id=first.request_id, accepted=True, reason="", now=NOW + 2
    ) == [accepted(first)]
    assert coordinator.device_responded(
        connection_id=1, request_id=second.request_id, accepted=True, reason="", now=NOW + 2
    ) == [accepted(second), DeviceReplaced(device_id="dev", connection_id=1)]
    # Then it is forgotten; the new one carries on.
    assert coordinator.device_disconnected(connection_id=1, now=NOW + 2) == []
    assert coordinator.device_responded(
        connection_id=2, request_id=third.request_id, accepted=True, reason="", now=NOW + 2
    ) == [accepted(third)]
    assert coordinator.pending_count() == 0


def test_a_replaced_connection_is_closed_when_its_last_request_times_out() -> None:
    coordinator = online("ssh", conn=1)
    request = send(initiate(coordinator, timeout=10.0))
    assert (
        coordinator.device_registered(device_id="dev", connection_id=2, names=["ssh"], now=NOW + 1)
        == []
    )
    assert coordinator.next_deadline() == NOW + 10
    events = coordinator.advance(NOW + 10)
    assert events == [
        InitiationFailed(
            request_id=request.request_id,
            stream_id=request.stream_id,
            device_id="dev",
            name="ssh",
            code=ErrorCode.DEVICE_RESPONSE_TIMEOUT,
        ),
        ForgetRequest(connection_id=1, request_id=request.request_id),
        DeviceReplaced(device_id="dev", connection_id=1),
    ]
    assert coordinator.is_online("dev")


def test_a_replaced_connection_that_ends_fails_its_pending_requests() -> None:
    coordinator = online("ssh", conn=1)
    request = send(initiate(coordinator))
    coordinator.device_registered(device_id="dev", connection_id=2, names=["ssh"], now=NOW + 1)
    assert coordinator.device_disconnected(connection_id=1, now=NOW + 2) == [not_online(request)]
    assert coordinator.is_online("dev")
    assert coordinator.pending_count() == 0


def test_a_replaced_connection_closes_at_its_credentials_expiry() -> None:
    coordinator = Coordinator()
    coordinator.channel_opened(device_id="dev", connection_id=1, expires_at=NOW + 5, now=NOW)
    coordinator.device_registered(device_id="dev", connection_id=1, names=["ssh"], now=NOW)
    request = send(initiate(coordinator))
    coordinator.device_registered(device_id="dev", connection_id=2, names=["ssh"], now=NOW + 1)
    assert coordinator.next_deadline() == NOW + 5
    assert coordinator.advance(NOW + 5) == [
        CredentialsExpired(device_id="dev", connection_id=1),
        not_online(request),
    ]
    assert coordinator.is_online("dev")


def test_requests_pending_on_a_replaced_connection_count_towards_the_limit() -> None:
    coordinator = Coordinator(max_pending_per_device=2)
    coordinator.device_registered(device_id="dev", connection_id=1, names=["ssh"], now=NOW)
    old = send(initiate(coordinator))
    coordinator.device_registered(device_id="dev", connection_id=2, names=["ssh"], now=NOW)
    send(initiate(coordinator))
    throttled = initiate(coordinator)
    assert isinstance(throttled, InitiationFailed)
    assert throttled.code is ErrorCode.THROTTLED
    assert coordinator.withdraw(request_id=old.request_id, now=NOW) == [
        DeviceReplaced(device_id="dev", connection_id=1)
    ]
    assert send(initiate(coordinator)).connection_id == 2


def test_a_replaced_connection_that_registers_again_takes_the_device_back() -> None:
    coordinator = online("ssh", conn=1)
    request = send(initiate(coordinator))
    coordinator.device_registered(device_id="dev", connection_id=2, names=["echo"], now=NOW)
    # Connection 1 registers again while its request is pending: it is online again and 2,
    # with nothing pending, is closed.
    assert coordinator.device_registered(
        device_id="dev", connection_id=1, names=["ssh"], now=NOW
    ) == [DeviceReplaced(device_id="dev", connection_id=2)]
    assert coordinator.registered_names("dev") == frozenset({"ssh"})
    assert send(initiate(coordinator)).connection_id == 1
    # Its answer settles the request and does not close it.
    assert coordinator.device_responded(
        connection_id=1, request_id=request.request_id, accepted=True, reason="", now=NOW
    ) == [accepted(request)]
    assert coordinator.is_online("dev")


def test_replacement_does_not_touch_other_devices() -> None:
    coordinator = online("ssh", device="a", conn=1)
    coordinator.device_registered(device_id="b", connection_id=2, names=["ssh"], now=NOW)
    request_b = send(initiate(coordinator, device="b"))
    events = coordinator.device_registered(device_id="a", connection_id=3, names=["*"], now=NOW)
    assert events == [DeviceReplaced(device_id="a", connection_id=1)]
    assert coordinator.pending_count() == 1
    assert coordinator.online_count() == 2
    assert coordinator.device_responded(
        connection_id=2, request_id=request_b.request_id, accepted=False, reason="no", now=NOW
    )


@pytest.mark.parametrize(
    "names",
    ["ssh", [""], ["ssh", 3], [f"n{i}" for i in range(MAX_REGISTERED_NAMES + 1)]],
)
def test_register_refuses_bad_names(names: object) -> None:
    coordinator = Coordinator()
    with pytest.raises(LocalProtocolError) as info:
        coordinator.device_registered(
            device_id="dev",
            connection_id=1,
            names=names,  # type: ignore[arg-type]
            now=NOW,
        )
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert not coordinator.is_online("dev")


def test_register_accepts_the_name_cap_and_no_names() -> None:
    coordinator = Coordinator()
    names = [f"n{i}" for i in range(MAX_REGISTERED_NAMES)]
    coordinator.device_registered(device_id="dev", connection_id=1, names=names, now=NOW)
    assert len(coordinator.registered_names("dev")) == MAX_REGISTERED_NAMES
    coordinator.device_registered(device_id="dev", connection_id=1, names=[], now=NOW)
    assert coordinator.is_online("dev")
    rejected = initiate(coordinator, name="n1")
    assert isinstance(rejected, InitiationRejected)


# -- disconnect --------------------------------------------------------------------------------


def test_disconnect_fails_pending_requests_oldest_first() -> None:
    coordinator = online("*")
    requests = [send(initiate(coordinator, name=f"s{i}", timeout=30 - i)) for i in range(3)]
    events = coordinator.device_disconnected(connection_id=1, now=NOW + 1)
    assert events == [
        InitiationFailed(
            request_id=r.request_id,
            stream_id=r.stream_id,
            device_id="dev",
            name=r.name,
            code=ErrorCode.DEVICE_NOT_ONLINE,
        )
        for r in requests
    ]
    assert not coordinator.is_online("dev")
    assert coordinator.online_count() == 0
    assert coordinator.pending_count() == 0
    assert coordinator.next_deadline() is None
    assert coordinator.advance(NOW + 1000) == []
    assert coordinator.device_disconnected(connection_id=1, now=NOW + 1) == []


def test_disconnect_of_unknown_connection_is_ignored() -> None:
    coordinator = online("ssh")
    assert coordinator.device_disconnected(connection_id=99, now=NOW) == []
    assert coordinator.is_online("dev")


def test_device_can_come_back_after_disconnect() -> None:
    coordinator = online("ssh")
    coordinator.device_disconnected(connection_id=1, now=NOW)
    assert (
        coordinator.device_registered(device_id="dev", connection_id=7, names=["ssh"], now=NOW)
        == []
    )
    assert send(initiate(coordinator)).connection_id == 7


# -- initiate ----------------------------------------------------------------------------------


def test_initiate_sends_a_stream_request() -> None:
    coordinator = online("ssh", conn=4)
    raw = b"\xfb" * 20
    event = initiate(coordinator, raw=raw, timeout=12.5)
    assert event == SendStreamRequest(
        connection_id=4,
        request_id="1",
        stream_id=sid(raw),
        device_id="dev",
        name="ssh",
        deadline=NOW + 12.5,
    )
    assert "=" not in event.stream_id
    assert "+" not in event.stream_id and "/" not in event.stream_id
    assert coordinator.pending_count() == 1
    assert coordinator.next_deadline() == NOW + 12.5


def test_initiate_to_offline_device_fails_at_once() -> None:
    coordinator = Coordinator()
    raw = nonce()
    assert initiate(coordinator, device="ghost", raw=raw) == InitiationFailed(
        request_id="1",
        stream_id=sid(raw),
        device_id="ghost",
        name="ssh",
        code=ErrorCode.DEVICE_NOT_ONLINE,
    )
    assert coordinator.pending_count() == 0
    assert coordinator.next_deadline() is None


def test_initiate_unregistered_name_is_rejected_at_once() -> None:
    coordinator = online("ssh")
    event = initiate(coordinator, name="ftp")
    assert isinstance(event, InitiationRejected)
    assert event.code is ErrorCode.STREAM_NAME_NOT_REGISTERED
    assert (event.request_id, event.device_id, event.name) == ("1", "dev", "ftp")
    assert coordinator.pending_count() == 0


def test_wildcard_accepts_any_name() -> None:
    coordinator = online("*")
    assert send(initiate(coordinator, name="anything")).name == "anything"


def test_request_ids_count_up_over_every_outcome() -> None:
    coordinator = online("ssh")
    ids = [
        request_id(initiate(coordinator)),
        request_id(initiate(coordinator, name="ftp")),
        request_id(initiate(coordinator, device="ghost")),
        request_id(initiate(coordinator)),
    ]
    assert ids == ["1", "2", "3", "4"]


def test_throttled_past_the_per_device_cap() -> None:
    coordinator = Coordinator(max_pending_per_device=2)
    coordinator.device_registered(device_id="a", connection_id=1, names=["*"], now=NOW)
    coordinator.device_registered(device_id="b", connection_id=2, names=["*"], now=NOW)
    first = send(initiate(coordinator, device="a"))
    send(initiate(coordinator, device="a"))
    third = initiate(coordinator, device="a")
    assert isinstance(third, InitiationFailed)
    assert third.code is ErrorCode.THROTTLED
    assert third.request_id == "3"
    # Another device has its own budget.
    send(initiate(coordinator, device="b"))
    # An answer frees a slot.
    coordinator.device_responded(
        connection_id=1, request_id=first.request_id, accepted=True, reason="", now=NOW
    )
    send(initiate(coordinator, device="a"))
    assert coordinator.pending_count() == 3


@pytest.mark.parametrize(
    "kwargs",
    [
        {"response_timeout": 0.0},
        {"response_timeout": -1.0},
        {"response_timeout": float("nan")},
        {"response_timeout": float("inf")},
        {"stream_nonce": b"x" * 15},
        {"stream_nonce": b"x" * 65},
        {"device_id": ""},
        {"name": ""},
        {"now": float("nan")},
    ],
)
def test_initiate_refuses_bad_arguments(kwargs: dict[str, object]) -> None:
    coordinator = online("*")
    arguments: dict[str, object] = {
        "device_id": "dev",
        "name": "ssh",
        "now": NOW,
        "response_timeout": 10.0,
        "stream_nonce": nonce(),
    }
    arguments.update(kwargs)
    with pytest.raises(LocalProtocolError) as info:
        coordinator.initiate(**arguments)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert coordinator.pending_count() == 0


def test_throttled_names_the_device_and_the_limit() -> None:
    coordinator = Coordinator(max_pending_per_device=2)
    coordinator.device_registered(device_id="a", connection_id=1, names=["*"], now=NOW)
    send(initiate(coordinator, device="a"))
    send(initiate(coordinator, device="a"))
    third = initiate(coordinator, device="a")
    assert isinstance(third, InitiationFailed)
    assert third.code is ErrorCode.THROTTLED
    assert third.message.startswith("device 'a' has 2 stream requests waiting for its answer")
    # The other failures say nothing more than their code.
    ghost = initiate(coordinator, device="ghost")
    assert isinstance(ghost, InitiationFailed) and ghost.message == ""


def test_capacity_returns_after_a_timeout_and_a_withdrawal() -> None:
    coordinator = Coordinator(max_pending_per_device=1)
    coordinator.device_registered(device_id="a", connection_id=1, names=["*"], now=NOW)
    first = send(initiate(coordinator, device="a", timeout=5.0))
    assert isinstance(initiate(coordinator, device="a"), InitiationFailed)
    # Timed out: the slot is free again.
    coordinator.advance(NOW + 5.0)
    second = send(initiate(coordinator, device="a", now=NOW + 5.0))
    assert second.request_id != first.request_id
    assert isinstance(initiate(coordinator, device="a", now=NOW + 5.0), InitiationFailed)
    # Withdrawn (the caller could not send it): free at once, and nothing is due any more.
    coordinator.withdraw(request_id=second.request_id, now=NOW + 5.0)
    assert coordinator.pending_count() == 0
    assert coordinator.next_deadline() is None
    assert coordinator.advance(NOW + 100.0) == []
    send(initiate(coordinator, device="a", now=NOW + 5.0))
    # A late answer to the withdrawn request is ignored; withdrawing twice is harmless.
    assert (
        coordinator.device_responded(
            connection_id=1, request_id=second.request_id, accepted=True, reason="", now=NOW + 6
        )
        == []
    )
    coordinator.withdraw(request_id=second.request_id, now=NOW + 6.0)
    assert coordinator.pending_count() == 1


@pytest.mark.parametrize("cap", [0, -1])
def test_max_pending_must_be_positive(cap: int) -> None:
    with pytest.raises(LocalProtocolError):
        Coordinator(max_pending_per_device=cap)


# -- responses ---------------------------------------------------------------------------------


def test_accept() -> None:
    coordinator = online("ssh")
    request = send(initiate(coordinator))
    events = coordinator.device_responded(
        connection_id=1, request_id=request.request_id, accepted=True, reason="", now=NOW + 1
    )
    assert events == [
        InitiationAccepted(
            request_id=request.request_id, stream_id=request.stream_id, device_id="dev", name="ssh"
        )
    ]
    assert coordinator.pending_count() == 0
    assert coordinator.next_deadline() is None
    assert coordinator.advance(NOW + 1000) == []


def test_reject_carries_the_devices_reason() -> None:
    coordinator = online("ssh")
    request = send(initiate(coordinator))
    events = coordinator.device_responded(
        connection_id=1, request_id=request.request_id, accepted=False, reason="busy", now=NOW
    )
    assert events == [
        InitiationRejected(
            request_id=request.request_id,
            stream_id=request.stream_id,
            device_id="dev",
            name="ssh",
            code=ErrorCode.STREAM_REJECTED,
            reason="busy",
        )
    ]
    assert coordinator.pending_count() == 0


def test_second_answer_unknown_request_and_wrong_connection_are_ignored() -> None:
    coordinator = online("ssh", conn=1)
    coordinator.device_registered(device_id="other", connection_id=2, names=["ssh"], now=NOW)
    request = send(initiate(coordinator))
    # From another device's connection: ignored, still pending.
    assert (
        coordinator.device_responded(
            connection_id=2, request_id=request.request_id, accepted=True, reason="", now=NOW
        )
        == []
    )
    assert coordinator.pending_count() == 1
    assert (
        coordinator.device_responded(
            connection_id=1, request_id="999", accepted=True, reason="", now=NOW
        )
        == []
    )
    assert coordinator.device_responded(
        connection_id=1, request_id=request.request_id, accepted=True, reason="", now=NOW
    )
    assert (
        coordinator.device_responded(
            connection_id=1, request_id=request.request_id, accepted=False, reason="", now=NOW
        )
        == []
    )


# -- deadlines ---------------------------------------------------------------------------------


def test_timeout_exactly_at_the_deadline() -> None:
    coordinator = online("ssh", conn=3)
    request = send(initiate(coordinator, timeout=10.0))
    deadline = NOW + 10.0
    assert coordinator.next_deadline() == deadline
    assert coordinator.advance(deadline - 1e-9) == []
    assert coordinator.pending_count() == 1
    assert coordinator.advance(deadline) == [
        InitiationFailed(
            request_id=request.request_id,
            stream_id=request.stream_id,
            device_id="dev",
            name="ssh",
            code=ErrorCode.DEVICE_RESPONSE_TIMEOUT,
        ),
        ForgetRequest(connection_id=3, request_id=request.request_id),
    ]
    assert coordinator.pending_count() == 0
    assert coordinator.next_deadline() is None
    assert coordinator.advance(deadline + 100) == []
    # A late answer after the timeout is ignored.
    assert (
        coordinator.device_responded(
            connection_id=3, request_id=request.request_id, accepted=True, reason="", now=deadline
        )
        == []
    )


def test_answer_just_before_the_deadline_counts_and_at_it_does_not() -> None:
    coordinator = online("ssh")
    early = send(initiate(coordinator, timeout=10.0))
    late = send(initiate(coordinator, timeout=10.0))
    deadline = NOW + 10.0
    assert coordinator.device_responded(
        connection_id=1, request_id=early.request_id, accepted=True, reason="", now=deadline - 1e-9
    )
    assert (
        coordinator.device_responded(
            connection_id=1, request_id=late.request_id, accepted=True, reason="", now=deadline
        )
        == []
    )
    # The unanswered one still times out through advance.
    events = coordinator.advance(deadline)
    assert [type(e) for e in events] == [InitiationFailed, ForgetRequest]
    assert isinstance(events[0], InitiationFailed)
    assert events[0].request_id == late.request_id


def test_advance_reports_earliest_deadline_first_and_only_those_due() -> None:
    coordinator = online("*")
    slow = send(initiate(coordinator, timeout=30))
    fast = send(initiate(coordinator, timeout=10))
    mid = send(initiate(coordinator, timeout=20))
    assert coordinator.next_deadline() == NOW + 10
    events = coordinator.advance(NOW + 25)
    assert [e.request_id for e in events if isinstance(e, InitiationFailed)] == [
        fast.request_id,
        mid.request_id,
    ]
    assert [e for e in events if isinstance(e, ForgetRequest)] == [
        ForgetRequest(connection_id=1, request_id=fast.request_id),
        ForgetRequest(connection_id=1, request_id=mid.request_id),
    ]
    assert coordinator.next_deadline() == NOW + 30
    assert coordinator.pending_count() == 1
    assert coordinator.advance(NOW + 30)[1] == ForgetRequest(
        connection_id=1, request_id=slow.request_id
    )


def test_next_deadline_skips_answered_requests() -> None:
    coordinator = online("*")
    first = send(initiate(coordinator, timeout=5))
    send(initiate(coordinator, timeout=8))
    coordinator.device_responded(
        connection_id=1, request_id=first.request_id, accepted=False, reason="", now=NOW
    )
    assert coordinator.next_deadline() == NOW + 8


def test_answered_requests_do_not_grow_memory() -> None:
    coordinator = online("*")
    for _ in range(2000):
        request = send(initiate(coordinator, timeout=3600))
        coordinator.device_responded(
            connection_id=1, request_id=request.request_id, accepted=True, reason="", now=NOW
        )
        # Entries of answered requests are dropped lazily but never pile up.
        assert coordinator.deadline_entries() <= 2 * coordinator.pending_count() + 67
    assert coordinator.pending_count() == 0
    assert coordinator.next_deadline() is None


# -- credential expiry of control channels ---------------------------------------------------


def test_a_channel_is_online_until_its_credential_expires_then_closed() -> None:
    coordinator = Coordinator()
    assert (
        coordinator.channel_opened(device_id="dev", connection_id=1, expires_at=NOW + 50, now=NOW)
        == []
    )
    coordinator.device_registered(device_id="dev", connection_id=1, names=["ssh"], now=NOW)
    assert coordinator.next_deadline() == NOW + 50
    # A request just before the expiry goes to the device and waits past the expiry.
    request = initiate(coordinator, now=NOW + 49.999, timeout=30)
    assert isinstance(request, SendStreamRequest)
    assert coordinator.next_deadline() == NOW + 50
    assert coordinator.advance(NOW + 49.999) == []
    # From the expiry on, nothing goes to it, even before advance() closes it.
    refused = initiate(coordinator, now=NOW + 50)
    assert isinstance(refused, InitiationFailed) and refused.code is ErrorCode.DEVICE_NOT_ONLINE
    events = coordinator.advance(NOW + 50)
    assert events == [
        CredentialsExpired(device_id="dev", connection_id=1),
        InitiationFailed(
            request_id=request.request_id,
            stream_id=request.stream_id,
            device_id="dev",
            name="ssh",
            code=ErrorCode.DEVICE_NOT_ONLINE,
        ),
    ]
    assert events[0].code is ErrorCode.UNAUTHORIZED  # type: ignore[union-attr]
    assert "expired" in events[0].message  # type: ignore[union-attr]
    assert not coordinator.is_online("dev")
    assert coordinator.next_deadline() is None
    assert coordinator.advance(NOW + 1000) == []


def test_a_renewed_channel_replaces_the_expiring_one_and_keeps_its_own_expiry() -> None:
    coordinator = Coordinator()
    coordinator.channel_opened(device_id="dev", connection_id=1, expires_at=NOW + 100, now=NOW)
    coordinator.device_registered(device_id="dev", connection_id=1, names=["ssh"], now=NOW)
    # The device renews at 85 %: the old channel ends, the new one opens with a new expiry.
    assert coordinator.device_disconnected(connection_id=1, now=NOW + 85) == []
    coordinator.channel_opened(device_id="dev", connection_id=2, expires_at=NOW + 185, now=NOW + 85)
    coordinator.device_registered(device_id="dev", connection_id=2, names=["ssh"], now=NOW + 85)
    assert coordinator.next_deadline() == NOW + 185
    assert coordinator.advance(NOW + 100) == []
    assert isinstance(initiate(coordinator, now=NOW + 100), SendStreamRequest)


def test_an_unregistered_channel_is_closed_at_expiry_too() -> None:
    coordinator = Coordinator()
    coordinator.channel_opened(device_id="dev", connection_id=7, expires_at=NOW + 5, now=NOW)
    assert coordinator.advance(NOW + 5) == [CredentialsExpired(device_id="dev", connection_id=7)]
    # And one opened past its expiry (a caller's slip) at the next advance.
    coordinator.channel_opened(device_id="dev", connection_id=8, expires_at=NOW, now=NOW + 1)
    assert coordinator.next_deadline() == NOW
    assert coordinator.advance(NOW + 1) == [CredentialsExpired(device_id="dev", connection_id=8)]
    with pytest.raises(LocalProtocolError):
        coordinator.channel_opened(
            device_id="dev", connection_id=9, expires_at=float("nan"), now=NOW
        )


def test_a_connection_cannot_be_opened_twice() -> None:
    coordinator = Coordinator()
    coordinator.channel_opened(device_id="dev", connection_id=1, expires_at=NOW + 50, now=NOW)
    with pytest.raises(LocalProtocolError):
        coordinator.channel_opened(device_id="dev", connection_id=1, expires_at=NOW + 60, now=NOW)
    # Nor one that registered without being opened here.
    coordinator.device_registered(device_id="dev", connection_id=2, names=["ssh"], now=NOW)
    with pytest.raises(LocalProtocolError):
        coordinator.channel_opened(device_id="dev", connection_id=2, expires_at=NOW + 60, now=NOW)
    assert coordinator.next_deadline() == NOW + 50


def test_many_channels_that_came_and_went_leave_the_live_ones_expiries_right() -> None:
    """Channels that end leave their expiries behind in the schedule; however many come and
    go, the live channels' expiries still come due on time, and the ended ones never do."""
    coordinator = Coordinator()
    coordinator.channel_opened(device_id="live", connection_id=0, expires_at=NOW + 500, now=NOW)
    for i in range(1, 301):
        coordinator.channel_opened(
            device_id=f"d{i}", connection_id=i, expires_at=NOW + 10 + i, now=NOW
        )
        assert coordinator.device_disconnected(connection_id=i, now=NOW) == []
    assert coordinator.next_deadline() == NOW + 500
    assert coordinator.advance(NOW + 499) == []
    assert coordinator.advance(NOW + 500) == [CredentialsExpired(device_id="live", connection_id=0)]


def test_an_advance_passes_over_the_expiries_of_channels_that_ended() -> None:
    """A caller that advances without asking for the next deadline first still hears only of
    the live channel whose credential expired, not of the ones that ended before theirs."""
    coordinator = Coordinator()
    coordinator.channel_opened(device_id="gone", connection_id=1, expires_at=NOW + 5, now=NOW)
    coordinator.channel_opened(device_id="left", connection_id=2, expires_at=NOW + 6, now=NOW)
    coordinator.channel_opened(device_id="live", connection_id=3, expires_at=NOW + 8, now=NOW)
    coordinator.device_registered(device_id="left", connection_id=2, names=["ssh"], now=NOW)
    assert coordinator.device_disconnected(connection_id=1, now=NOW + 1) == []
    assert coordinator.device_disconnected(connection_id=2, now=NOW + 1) == []
    assert coordinator.advance(NOW + 10) == [CredentialsExpired(device_id="live", connection_id=3)]
    assert coordinator.next_deadline() is None


@pytest.mark.parametrize("names", [("ssh", "echo"), ["ssh", "echo"]], ids=["tuple", "list"])
def test_registered_names_read_alike_whatever_sequence_they_came_in(
    names: tuple[str, ...] | list[str],
) -> None:
    coordinator = Coordinator()
    coordinator.device_registered(device_id="dev", connection_id=1, names=names, now=NOW)
    assert coordinator.registered_names("dev") == frozenset({"ssh", "echo"})
    assert isinstance(initiate(coordinator, name="echo"), SendStreamRequest)
    assert isinstance(initiate(coordinator, name="ftp"), InitiationRejected)
