"""Tests for devstream_core.bridge: pairing the two sides of a stream, holding and resuming.

Rules: no clock and no randomness; ``now`` is a literal and nonces are counter-derived. Every
pairing test runs with either side arriving first, every drop and resume test with either
side dropping.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from devstream_core.bridge import (
    DEFAULT_CLOSE_TIMEOUT,
    DEFAULT_GRACE_PERIOD,
    MAX_FAREWELL_SIZE,
    TRANSITIONS,
    Bridge,
    CloseLoneSide,
    ClosePeer,
    CloseUnanswered,
    Farewell,
    Joined,
    ResetPeer,
    Resumed,
    SideHeld,
    StreamExpired,
    StreamInput,
    StreamRevoked,
    StreamState,
)
from devstream_core.common import Role
from devstream_core.errors import (
    DevstreamError,
    ErrorCode,
    LocalProtocolError,
)
from devstream_core.tokens import mint_resume_token, verify_resume_token, verify_stream_token

SECRET = b"bridge-test-secret-0123456789abcdef"
NOW = 2000.0
EXPIRES = NOW + 60.0
_counter: Iterator[int] = itertools.count(1)


def nonce() -> bytes:
    return next(_counter).to_bytes(16, "big")


def create(
    bridge: Bridge,
    stream_id: str = "s1",
    *,
    now: float = NOW,
    mode: str = "raw",
    service_token: bool = True,
) -> dict[Role, str]:
    device_token, service_token_text = bridge.create_stream(
        stream_id=stream_id,
        device_id="dev",
        now=now,
        device_nonce=nonce(),
        service_nonce=nonce(),
        mode=mode,
        service_token=service_token,
    )
    return {Role.DEVICE: device_token, Role.SERVICE: service_token_text}


def join(
    bridge: Bridge,
    token: str,
    *,
    role: Role | None,
    conn: int,
    stream_id: str = "s1",
    now: float = NOW + 1,
) -> Joined:
    return bridge.join(
        stream_id=stream_id,
        token=token,
        role=role,
        connection_id=conn,
        now=now,
        resume_nonce=nonce(),
    )


def refused(
    bridge: Bridge,
    token: str,
    *,
    role: Role | None,
    conn: int = 99,
    stream_id: str = "s1",
    now: float = NOW + 1,
) -> ErrorCode:
    with pytest.raises(DevstreamError) as info:
        join(bridge, token, role=role, conn=conn, stream_id=stream_id, now=now)
    if len(token) >= 8:
        assert token not in str(info.value)
    return info.value.code


def paired_bridge(first: Role) -> tuple[Bridge, dict[Role, str], dict[Role, int]]:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    conns = {first: 1, first.other: 2}
    join(bridge, tokens[first], role=first, conn=1)
    join(bridge, tokens[first.other], role=first.other, conn=2)
    return bridge, tokens, conns


# -- the state table ---------------------------------------------------------------------------


def test_transition_table_has_no_way_out_of_ended_and_no_expiry_of_a_pair() -> None:
    assert all(state is not StreamState.ENDED for state, _ in TRANSITIONS)
    assert (StreamState.PAIRED, StreamInput.EXPIRE) not in TRANSITIONS
    assert (StreamState.PAIRED, StreamInput.JOIN) not in TRANSITIONS
    assert (StreamState.WAITING, StreamInput.LEAVE) not in TRANSITIONS


# -- create ------------------------------------------------------------------------------------


def test_create_mints_one_token_per_role_expiring_together() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    assert tokens[Role.DEVICE] != tokens[Role.SERVICE]
    for role, token in tokens.items():
        claims = verify_stream_token(token, secret=SECRET, stream_id="s1", role=role, now=NOW)
        assert claims.expires_at == EXPIRES
    assert bridge.stream_count() == 1
    assert bridge.paired_count() == 0
    assert bridge.next_deadline() == EXPIRES


def test_token_lifetime_is_configurable() -> None:
    bridge = Bridge(secret=SECRET, token_lifetime=5.0)
    create(bridge)
    assert bridge.next_deadline() == NOW + 5.0


@pytest.mark.parametrize(
    ("kwargs", "code"),
    [
        ({"stream_id": "live"}, ErrorCode.ARGUMENT_INVALID),
        ({"stream_id": "bad.id"}, ErrorCode.ARGUMENT_INVALID),
        ({"stream_id": ""}, ErrorCode.ARGUMENT_INVALID),
        ({"device_id": ""}, ErrorCode.ARGUMENT_INVALID),
        ({"mode": "telnet"}, ErrorCode.ARGUMENT_INVALID),
        ({"device_nonce": b"same-nonce-16byt", "service_nonce": b"same-nonce-16byt"},
         ErrorCode.ARGUMENT_INVALID),
        ({"device_nonce": b"short"}, ErrorCode.ARGUMENT_INVALID),
        ({"service_nonce": b"short"}, ErrorCode.ARGUMENT_INVALID),
        ({"service_nonce": b"short", "service_token": False}, ErrorCode.ARGUMENT_INVALID),
        ({"service_nonce": "not bytes, 16 long", "service_token": False},
         ErrorCode.ARGUMENT_INVALID),
        ({"now": float("nan")}, ErrorCode.ARGUMENT_INVALID),
    ],
)  # fmt: skip
def test_create_refuses_bad_arguments(kwargs: dict[str, object], code: ErrorCode) -> None:
    bridge = Bridge(secret=SECRET)
    create(bridge, "live")
    arguments: dict[str, object] = {
        "stream_id": "new",
        "device_id": "dev",
        "now": NOW,
        "device_nonce": nonce(),
        "service_nonce": nonce(),
    }
    arguments.update(kwargs)
    with pytest.raises(LocalProtocolError) as info:
        bridge.create_stream(**arguments)  # type: ignore[arg-type]
    assert info.value.code is code
    assert bridge.stream_count() == 1


def test_create_refuses_a_nonce_already_used() -> None:
    bridge = Bridge(secret=SECRET)
    raw = nonce()
    device_token, _ = bridge.create_stream(
        stream_id="a", device_id="dev", now=NOW, device_nonce=raw, service_nonce=nonce()
    )
    join(bridge, device_token, role=Role.DEVICE, conn=1, stream_id="a")
    with pytest.raises(LocalProtocolError):
        bridge.create_stream(
            stream_id="b", device_id="dev", now=NOW, device_nonce=raw, service_nonce=nonce()
        )


def test_create_is_throttled_past_max_streams() -> None:
    bridge = Bridge(secret=SECRET, max_streams=2)
    create(bridge, "a")
    create(bridge, "b")
    with pytest.raises(DevstreamError) as info:
        create(bridge, "c")
    assert info.value.code is ErrorCode.THROTTLED
    assert bridge.stream_count() == 2
    bridge.advance(EXPIRES)
    create(bridge, "c", now=EXPIRES)
    assert bridge.stream_count() == 1


def test_create_is_throttled_past_max_streams_per_device() -> None:
    bridge = Bridge(secret=SECRET, max_streams_per_device=2)
    tokens = create(bridge, "a")
    create(bridge, "b")
    with pytest.raises(DevstreamError) as info:
        create(bridge, "c")
    assert info.value.code is ErrorCode.THROTTLED
    assert info.value.message.startswith(
        "device 'dev' has 2 streams open or waiting to be joined, the most the hub allows"
    )
    assert bridge.device_stream_count("dev") == 2
    # Another device has its own budget.
    bridge.create_stream(
        stream_id="other", device_id="dev2", now=NOW, device_nonce=nonce(), service_nonce=nonce()
    )
    assert bridge.device_stream_count("dev2") == 1
    # Paired streams count as much as waiting ones; one that ends frees its slot at once.
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1, stream_id="a")
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2, stream_id="a")
    with pytest.raises(DevstreamError):
        create(bridge, "c", now=NOW + 1)
    bridge.leave(stream_id="a", connection_id=1, now=NOW + 2)
    assert bridge.device_stream_count("dev") == 1
    create(bridge, "c", now=NOW + 2)
    # Streams whose tokens expire unjoined free theirs too.
    bridge.advance(EXPIRES + 2)
    assert bridge.device_stream_count("dev") == 0
    assert bridge.device_stream_count("dev2") == 0
    create(bridge, "d", now=EXPIRES + 2)
    create(bridge, "e", now=EXPIRES + 2)


def test_cancel_ends_an_unpaired_stream_and_frees_its_slot() -> None:
    bridge = Bridge(secret=SECRET, max_streams_per_device=2)
    waiting = create(bridge, "a")
    half = create(bridge, "b")
    join(bridge, half[Role.DEVICE], role=Role.DEVICE, conn=7, stream_id="b")
    assert bridge.cancel(stream_id="a", now=NOW + 1) == [StreamExpired(stream_id="a")]
    assert bridge.cancel(stream_id="b", now=NOW + 1) == [
        CloseLoneSide(
            stream_id="b", connection_id=7, role=Role.DEVICE, code=ErrorCode.PEER_NEVER_CONNECTED
        )
    ]
    assert bridge.device_stream_count("dev") == 0
    assert bridge.stream_state("a") is StreamState.ENDED
    # A late join finds the stream gone; cancelling again, or an unknown stream, does nothing.
    with pytest.raises(DevstreamError) as info:
        join(bridge, waiting[Role.DEVICE], role=Role.DEVICE, conn=8, stream_id="a")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert bridge.cancel(stream_id="a", now=NOW + 2) == []
    assert bridge.cancel(stream_id="nope", now=NOW + 2) == []
    # Nothing of them is left due.
    assert bridge.next_deadline() is None
    assert bridge.advance(EXPIRES + 1) == []


def test_cancel_leaves_a_paired_stream_alone() -> None:
    bridge, _, _ = paired_bridge(Role.DEVICE)
    assert bridge.cancel(stream_id="s1", now=NOW + 2) == []
    assert bridge.stream_state("s1") is StreamState.PAIRED


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": b""},
        {"secret": SECRET, "token_lifetime": 0.0},
        {"secret": SECRET, "token_lifetime": float("nan")},
        {"secret": SECRET, "max_streams": 0},
        {"secret": SECRET, "max_streams_per_device": 0},
        {"secret": SECRET, "max_streams_per_device": True},
    ],
)
def test_bridge_refuses_bad_settings(kwargs: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        Bridge(**kwargs)  # type: ignore[arg-type]


# -- pairing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", list(Role))
@pytest.mark.parametrize("mode", ["raw", "devstream.v1"])
def test_both_sides_pair(first: Role, mode: str) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=mode)
    one = join(bridge, tokens[first], role=first, conn=10)
    # Only a devstream.v1 side gets a resume token.
    assert (one.resume_token is None) == (mode == "raw")
    assert one == Joined(
        stream_id="s1",
        role=first,
        device_id="dev",
        mode=mode,
        connection_id=10,
        paired=False,
        peer_connection_id=None,
        resume_token=one.resume_token,
    )
    assert bridge.paired_count() == 0
    two = join(bridge, tokens[first.other], role=first.other, conn=20)
    assert two == Joined(
        stream_id="s1",
        role=first.other,
        device_id="dev",
        mode=mode,
        connection_id=20,
        paired=True,
        peer_connection_id=10,
        resume_token=two.resume_token,
    )
    assert (two.resume_token is None) == (mode == "raw")
    assert bridge.paired_count() == 1
    assert bridge.stream_count() == 1
    # A paired stream no longer waits for anything.
    assert bridge.next_deadline() is None
    assert bridge.advance(EXPIRES + 1000) == []
    assert bridge.stream_count() == 1


@pytest.mark.parametrize("role", list(Role))
def test_role_none_takes_the_role_from_the_token(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    assert join(bridge, tokens[role], role=None, conn=1).role is role


def test_one_connection_cannot_be_both_sides() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1)
    with pytest.raises(LocalProtocolError):
        join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=1)
    # The refused join did not use the token.
    assert join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2).paired


@pytest.mark.parametrize("mode", ["raw", "devstream.v1"])
def test_the_opener_joins_without_its_token_which_is_then_used_up(mode: str) -> None:
    """A one-step open: the connection that asked for the stream joins as the service without
    presenting a token. It pairs like a token's join; its token is spent (a copy of it is
    refused as reused) and the device joins with its own token as usual."""
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=mode)
    opener = bridge.join_opener(
        stream_id="s1", role=Role.SERVICE, connection_id=10, now=NOW + 1, resume_nonce=nonce()
    )
    assert opener == Joined(
        stream_id="s1",
        role=Role.SERVICE,
        device_id="dev",
        mode=mode,
        connection_id=10,
        paired=False,
        peer_connection_id=None,
        resume_token=opener.resume_token,
    )
    assert (opener.resume_token is None) == (mode == "raw")
    if opener.resume_token is not None:  # the side's first resume token works
        verify_resume_token(
            opener.resume_token, secret=SECRET, stream_id="s1", role=Role.SERVICE, now=NOW + 1
        )
    token = tokens[Role.SERVICE]
    assert refused(bridge, token, role=Role.SERVICE) is ErrorCode.STREAM_TOKEN_REUSED
    assert join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=20).paired
    assert bridge.paired_count() == 1


def test_a_one_step_stream_has_no_service_token_and_its_opener_joins_once() -> None:
    """``service_token=False`` (the hub's one-step open): no service token is made, ``""``
    stands in for it; the opener joins without one, once, and the device as usual."""
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1", service_token=False)
    assert tokens[Role.SERVICE] == ""
    joined = bridge.join_opener(
        stream_id="s1", role=Role.SERVICE, connection_id=2, now=NOW + 1, resume_nonce=nonce()
    )
    assert joined.resume_token is not None and not joined.paired
    with pytest.raises(DevstreamError) as info:
        bridge.join_opener(
            stream_id="s1", role=Role.SERVICE, connection_id=3, now=NOW + 1, resume_nonce=nonce()
        )
    assert info.value.code is ErrorCode.STREAM_TOKEN_REUSED
    assert join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=4, stream_id="s1").paired


def test_the_opener_is_refused_as_its_token_would_be() -> None:
    """Once its token was presented: reused. At the token's expiry (not a moment before): expired.
    After the stream ended: not found. A devstream.v1 join without a resume nonce: refused, and
    nothing is used up."""
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=1)
    with pytest.raises(DevstreamError) as info:
        bridge.join_opener(stream_id="s1", role=Role.SERVICE, connection_id=2, now=NOW + 1)
    assert info.value.code is ErrorCode.STREAM_TOKEN_REUSED

    bridge = Bridge(secret=SECRET)
    create(bridge)
    with pytest.raises(DevstreamError) as info:
        bridge.join_opener(stream_id="s1", role=Role.SERVICE, connection_id=2, now=EXPIRES)
    assert info.value.code is ErrorCode.STREAM_TOKEN_EXPIRED
    joined = bridge.join_opener(
        stream_id="s1", role=Role.SERVICE, connection_id=2, now=EXPIRES - 1e-9
    )
    assert joined.role is Role.SERVICE

    bridge = Bridge(secret=SECRET)
    create(bridge)
    bridge.cancel(stream_id="s1", now=NOW + 1)
    with pytest.raises(DevstreamError) as info:
        bridge.join_opener(stream_id="s1", role=Role.SERVICE, connection_id=2, now=NOW + 1)
    assert info.value.code is ErrorCode.NOT_FOUND

    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1")
    with pytest.raises(LocalProtocolError):
        bridge.join_opener(stream_id="s1", role=Role.SERVICE, connection_id=2, now=NOW + 1)
    assert join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=3).role is Role.SERVICE
    with pytest.raises(LocalProtocolError):
        bridge.join_opener(stream_id="s1", role=Role.DEVICE, connection_id=3, now=float("nan"))


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_token_works_once(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[role], role=role, conn=1)
    assert refused(bridge, tokens[role], role=role) is ErrorCode.STREAM_TOKEN_REUSED
    assert refused(bridge, tokens[role], role=None) is ErrorCode.STREAM_TOKEN_REUSED


@pytest.mark.parametrize("first", list(Role))
def test_reuse_is_reported_as_reuse_after_the_stream_ended(first: Role) -> None:
    bridge, tokens, conns = paired_bridge(first)
    bridge.leave(stream_id="s1", connection_id=conns[first], now=NOW + 2)
    assert bridge.stream_count() == 0
    for role in Role:
        assert (
            refused(bridge, tokens[role], role=role, now=NOW + 3) is ErrorCode.STREAM_TOKEN_REUSED
        )
    # Past the token's expiry the nonce is forgotten and the answer is "expired".
    bridge.advance(EXPIRES)
    assert bridge.table_sizes()["used_nonces"] == 0
    for role in Role:
        assert (
            refused(bridge, tokens[role], role=role, now=EXPIRES) is ErrorCode.STREAM_TOKEN_EXPIRED
        )


@pytest.mark.parametrize("role", list(Role))
def test_the_other_sides_token_is_wrong_role_and_stays_unused(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    assert refused(bridge, tokens[role.other], role=role) is ErrorCode.STREAM_TOKEN_WRONG_ROLE
    # Not used up: its rightful holder still gets in.
    assert join(bridge, tokens[role.other], role=role.other, conn=1).role is role.other


def test_another_streams_token_is_wrong_stream() -> None:
    bridge = Bridge(secret=SECRET)
    tokens_a = create(bridge, "a")
    create(bridge, "b")
    for role in Role:
        code = refused(bridge, tokens_a[role], role=role, stream_id="b")
        assert code is ErrorCode.STREAM_TOKEN_WRONG_STREAM
    assert join(bridge, tokens_a[Role.DEVICE], role=Role.DEVICE, conn=1, stream_id="a")


def test_forged_tokens_are_invalid() -> None:
    bridge = Bridge(secret=SECRET)
    create(bridge)
    other = Bridge(secret=b"another hub's secret")
    foreign = create(other)
    assert refused(bridge, foreign[Role.DEVICE], role=Role.DEVICE) is ErrorCode.STREAM_TOKEN_INVALID
    assert refused(bridge, "not a token", role=None) is ErrorCode.STREAM_TOKEN_INVALID
    assert refused(bridge, "", role=Role.SERVICE) is ErrorCode.STREAM_TOKEN_INVALID


@pytest.mark.parametrize("role", list(Role))
def test_token_expires_exactly_at_expires_at(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    assert refused(bridge, tokens[role], role=role, now=EXPIRES) is ErrorCode.STREAM_TOKEN_EXPIRED
    assert join(bridge, tokens[role], role=role, conn=1, now=EXPIRES - 1e-9).role is role


def test_refusal_order_token_checks_before_reuse_before_not_found() -> None:
    bridge, tokens, conns = paired_bridge(Role.DEVICE)
    bridge.leave(stream_id="s1", connection_id=conns[Role.DEVICE], now=NOW + 2)
    token = tokens[Role.DEVICE]
    # Used, stream gone, and also the wrong role / expired: the token checks come first.
    assert refused(bridge, token, role=Role.SERVICE) is ErrorCode.STREAM_TOKEN_WRONG_ROLE
    assert refused(bridge, token, role=Role.DEVICE, stream_id="zz") is (
        ErrorCode.STREAM_TOKEN_WRONG_STREAM
    )
    assert refused(bridge, token, role=Role.DEVICE, now=EXPIRES) is ErrorCode.STREAM_TOKEN_EXPIRED
    assert refused(bridge, token, role=Role.DEVICE) is ErrorCode.STREAM_TOKEN_REUSED


@pytest.mark.parametrize("first", list(Role))
def test_peer_of_a_side_that_left_before_pairing_gets_not_found(first: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[first], role=first, conn=1)
    assert bridge.leave(stream_id="s1", connection_id=1, now=NOW + 2) == []
    assert bridge.stream_count() == 0
    with pytest.raises(DevstreamError) as info:
        join(bridge, tokens[first.other], role=first.other, conn=2, now=NOW + 3)
    assert type(info.value) is DevstreamError
    assert info.value.code is ErrorCode.NOT_FOUND
    assert info.value.message == "stream closed"
    assert bridge.next_deadline() is None
    assert bridge.advance(EXPIRES) == []


def test_valid_token_for_a_stream_this_bridge_never_had_is_not_found() -> None:
    # Another bridge with the same secret minted it (say, before a hub restart).
    tokens = create(Bridge(secret=SECRET))
    assert refused(Bridge(secret=SECRET), tokens[Role.DEVICE], role=Role.DEVICE) is (
        ErrorCode.NOT_FOUND
    )


def test_tokens_of_an_earlier_stream_with_the_same_id_are_invalid() -> None:
    bridge = Bridge(secret=SECRET)
    old = create(bridge, now=NOW)
    join(bridge, old[Role.DEVICE], role=Role.DEVICE, conn=1)
    bridge.leave(stream_id="s1", connection_id=1, now=NOW + 1)
    new = create(bridge, now=NOW + 2)
    # The old service token is signed, unexpired and unused, but not this stream's.
    assert refused(bridge, old[Role.SERVICE], role=Role.SERVICE, now=NOW + 3) is (
        ErrorCode.STREAM_TOKEN_INVALID
    )
    assert join(bridge, new[Role.SERVICE], role=Role.SERVICE, conn=2, now=NOW + 3).role is (
        Role.SERVICE
    )


# -- leaving -----------------------------------------------------------------------------------


@pytest.mark.parametrize("first", list(Role))
@pytest.mark.parametrize("leaver", list(Role))
def test_leave_after_pairing_closes_the_peer_once(first: Role, leaver: Role) -> None:
    bridge, _, conns = paired_bridge(first)
    events = bridge.leave(stream_id="s1", connection_id=conns[leaver], now=NOW + 5)
    assert events == [ClosePeer(stream_id="s1", connection_id=conns[leaver.other])]
    assert bridge.stream_count() == 0
    assert bridge.paired_count() == 0
    assert bridge.leave(stream_id="s1", connection_id=conns[leaver.other], now=NOW + 5) == []
    assert bridge.leave(stream_id="s1", connection_id=conns[leaver], now=NOW + 5) == []


def test_leave_of_unknown_stream_or_connection_is_ignored() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1)
    assert bridge.leave(stream_id="nope", connection_id=1, now=NOW) == []
    assert bridge.leave(stream_id="s1", connection_id=2, now=NOW) == []
    assert bridge.stream_count() == 1
    assert join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2).paired


# -- expiry ------------------------------------------------------------------------------------


@pytest.mark.parametrize("role", list(Role))
def test_lone_side_is_closed_exactly_at_expiry(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[role], role=role, conn=7)
    assert bridge.next_deadline() == EXPIRES
    assert bridge.advance(EXPIRES - 1e-9) == []
    assert bridge.stream_count() == 1
    assert bridge.advance(EXPIRES) == [
        CloseLoneSide(
            stream_id="s1", connection_id=7, role=role, code=ErrorCode.PEER_NEVER_CONNECTED
        )
    ]
    assert bridge.stream_count() == 0
    assert bridge.next_deadline() is None
    assert bridge.advance(EXPIRES + 1) == []
    # The side's later disconnect is a no-op.
    assert bridge.leave(stream_id="s1", connection_id=7, now=EXPIRES + 1) == []


def test_stream_nobody_joined_expires() -> None:
    bridge = Bridge(secret=SECRET)
    create(bridge, "a")
    create(bridge, "b", now=NOW + 10)
    assert bridge.advance(EXPIRES) == [StreamExpired(stream_id="a")]
    assert bridge.next_deadline() == EXPIRES + 10
    assert bridge.advance(EXPIRES + 100) == [StreamExpired(stream_id="b")]
    assert bridge.stream_count() == 0


def test_advance_handles_many_streams_earliest_first() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = {name: create(bridge, name, now=NOW + i) for i, name in enumerate("abcd")}
    join(bridge, tokens["b"][Role.SERVICE], role=Role.SERVICE, conn=1, stream_id="b")
    join(bridge, tokens["c"][Role.DEVICE], role=Role.DEVICE, conn=2, stream_id="c", now=NOW + 3)
    join(bridge, tokens["c"][Role.SERVICE], role=Role.SERVICE, conn=3, stream_id="c", now=NOW + 3)
    events = bridge.advance(NOW + 1000)
    assert events == [
        StreamExpired(stream_id="a"),
        CloseLoneSide(
            stream_id="b", connection_id=1, role=Role.SERVICE, code=ErrorCode.PEER_NEVER_CONNECTED
        ),
        StreamExpired(stream_id="d"),
    ]
    assert bridge.stream_count() == 1
    assert bridge.paired_count() == 1


def test_next_deadline_skips_ended_streams() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, "a")
    create(bridge, "b", now=NOW + 5)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1, stream_id="a")
    bridge.leave(stream_id="a", connection_id=1, now=NOW + 1)
    assert bridge.next_deadline() == EXPIRES + 5


def test_memory_stays_bounded() -> None:
    bridge = Bridge(secret=SECRET)
    now = NOW
    for i in range(3000):
        now = NOW + i * 0.1
        tokens = create(bridge, f"s{i}", now=now)
        join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=2 * i, stream_id=f"s{i}", now=now)
        join(
            bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2 * i + 1, stream_id=f"s{i}",
            now=now,
        )  # fmt: skip
        bridge.leave(stream_id=f"s{i}", connection_id=2 * i, now=now)
        assert bridge.table_sizes()["expiries"] <= 2 * bridge.stream_count() + 67
        # Used nonces are kept only for one token lifetime (600 streams at 10 per second).
        assert bridge.table_sizes()["used_nonces"] <= 2 * 601
    assert bridge.stream_count() == 0
    bridge.advance(now + 60)
    assert bridge.table_sizes()["used_nonces"] == 0


# == devstream.v1: drop, hold, resume ===========================================================

V1 = "devstream.v1"
GRACE = DEFAULT_GRACE_PERIOD
DROP_AT = NOW + 10
DEADLINE = DROP_AT + GRACE


def resume(
    bridge: Bridge,
    token: str,
    *,
    role: Role | None,
    conn: int,
    stream_id: str = "s1",
    now: float = DROP_AT + 1,
    resume_nonce: bytes | None = None,
) -> Resumed:
    return bridge.resume(
        stream_id=stream_id,
        token=token,
        role=role,
        connection_id=conn,
        now=now,
        resume_nonce=nonce() if resume_nonce is None else resume_nonce,
    )


def resume_refused(
    bridge: Bridge,
    token: str,
    *,
    role: Role | None,
    conn: int = 99,
    stream_id: str = "s1",
    now: float = DROP_AT + 1,
) -> ErrorCode:
    state = bridge.stream_state(stream_id)
    with pytest.raises(DevstreamError) as info:
        resume(bridge, token, role=role, conn=conn, stream_id=stream_id, now=now)
    if len(token) >= 8:
        assert token not in str(info.value)
    # A refusal changes nothing.
    assert bridge.stream_state(stream_id) is state
    return info.value.code


@dataclass
class V1Stream:
    """A paired devstream.v1 stream "s1" and what its sides hold."""

    bridge: Bridge
    tokens: dict[Role, str]
    resume_tokens: dict[Role, str]
    conns: dict[Role, int]


def v1_paired(first: Role = Role.DEVICE, **settings: float) -> V1Stream:
    bridge = Bridge(secret=SECRET, **settings)  # type: ignore[arg-type]
    tokens = create(bridge, mode=V1)
    conns = {first: 1, first.other: 2}
    resume_tokens = {}
    for role in (first, first.other):
        joined = join(bridge, tokens[role], role=role, conn=conns[role])
        assert joined.resume_token is not None
        resume_tokens[role] = joined.resume_token
    assert bridge.stream_state("s1") is StreamState.PAIRED
    return V1Stream(bridge=bridge, tokens=tokens, resume_tokens=resume_tokens, conns=conns)


def held(role: Role, conn: int, deadline: float = DEADLINE) -> SideHeld:
    return SideHeld(stream_id="s1", role=role, connection_id=conn, deadline=deadline)


# -- settings and joins -------------------------------------------------------------------------


@pytest.mark.parametrize("grace", [0.0, -1.0, float("nan"), float("inf")])
def test_bridge_refuses_a_bad_grace_period(grace: float) -> None:
    with pytest.raises(LocalProtocolError) as info:
        Bridge(secret=SECRET, grace_period=grace)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


def test_default_grace_period_is_30_seconds() -> None:
    assert DEFAULT_GRACE_PERIOD == 30.0
    s = v1_paired()
    assert s.bridge.drop(stream_id="s1", connection_id=1, now=DROP_AT) == [
        held(Role.DEVICE, 1, DROP_AT + 30.0)
    ]


@pytest.mark.parametrize("role", list(Role))
def test_v1_join_needs_a_resume_nonce_and_keeps_the_token_unused(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=V1)
    with pytest.raises(LocalProtocolError) as info:
        bridge.join(stream_id="s1", token=tokens[role], role=role, connection_id=1, now=NOW + 1)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    for bad in (b"short", b"x" * 65):
        with pytest.raises(LocalProtocolError):
            bridge.join(
                stream_id="s1",
                token=tokens[role],
                role=role,
                connection_id=1,
                now=NOW + 1,
                resume_nonce=bad,
            )
    assert bridge.stream_state("s1") is StreamState.WAITING
    joined = join(bridge, tokens[role], role=role, conn=1)
    assert joined.resume_token is not None


@pytest.mark.parametrize("role", list(Role))
def test_v1_join_gives_a_resume_token_for_that_role(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=V1)
    raw_nonce = nonce()
    joined = bridge.join(
        stream_id="s1",
        token=tokens[role],
        role=role,
        connection_id=1,
        now=NOW + 1,
        resume_nonce=raw_nonce,
    )
    assert joined.resume_token is not None
    claims = verify_resume_token(
        joined.resume_token, secret=SECRET, stream_id="s1", role=role, now=NOW
    )
    assert claims.nonce == base64.urlsafe_b64encode(raw_nonce).rstrip(b"=").decode()


def test_raw_join_ignores_the_resume_nonce() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    assert join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1).resume_token is None
    joined = bridge.join(
        stream_id="s1", token=tokens[Role.SERVICE], role=Role.SERVICE, connection_id=2, now=NOW
    )
    assert joined.paired
    assert joined.resume_token is None


def test_v1_join_refuses_the_peers_resume_nonce() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=V1)
    same = nonce()
    bridge.join(
        stream_id="s1",
        token=tokens[Role.DEVICE],
        role=Role.DEVICE,
        connection_id=1,
        now=NOW,
        resume_nonce=same,
    )
    with pytest.raises(LocalProtocolError):
        bridge.join(
            stream_id="s1",
            token=tokens[Role.SERVICE],
            role=Role.SERVICE,
            connection_id=2,
            now=NOW,
            resume_nonce=same,
        )
    assert join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2).paired


# -- drop ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", list(Role))
@pytest.mark.parametrize("dropper", list(Role))
def test_drop_of_a_paired_v1_side_holds_it_and_keeps_the_peer(first: Role, dropper: Role) -> None:
    s = v1_paired(first)
    bridge = s.bridge
    events = bridge.drop(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT)
    assert events == [held(dropper, s.conns[dropper])]
    assert bridge.stream_state("s1") is StreamState.HELD
    assert bridge.stream_count() == 1
    assert bridge.paired_count() == 1
    assert bridge.held_count() == 1
    assert bridge.next_deadline() == DEADLINE
    # The held side's old connection is gone: a later drop or leave for it is ignored.
    assert bridge.drop(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT + 1) == []
    assert bridge.leave(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT + 1) == []
    assert bridge.stream_state("s1") is StreamState.HELD


def test_grace_period_is_configurable() -> None:
    s = v1_paired(grace_period=2.5)
    assert s.bridge.drop(stream_id="s1", connection_id=2, now=DROP_AT) == [
        held(Role.SERVICE, 2, DROP_AT + 2.5)
    ]
    assert s.bridge.next_deadline() == DROP_AT + 2.5


@pytest.mark.parametrize("first", list(Role))
@pytest.mark.parametrize("leaver", list(Role))
def test_drop_of_a_raw_stream_is_exactly_leave(first: Role, leaver: Role) -> None:
    by_drop, _, conns = paired_bridge(first)
    by_leave, _, _ = paired_bridge(first)
    dropped = by_drop.drop(stream_id="s1", connection_id=conns[leaver], now=NOW + 5)
    left = by_leave.leave(stream_id="s1", connection_id=conns[leaver], now=NOW + 5)
    assert dropped == left == [ClosePeer(stream_id="s1", connection_id=conns[leaver.other])]
    assert by_drop.stream_count() == by_leave.stream_count() == 0
    assert by_drop.held_count() == 0


@pytest.mark.parametrize("mode", ["raw", V1])
@pytest.mark.parametrize("role", list(Role))
def test_drop_of_an_unpaired_stream_is_exactly_leave(mode: str, role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=mode)
    join(bridge, tokens[role], role=role, conn=1)
    assert bridge.drop(stream_id="s1", connection_id=1, now=NOW + 2) == []
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert bridge.stream_count() == 0
    with pytest.raises(DevstreamError) as info:
        join(bridge, tokens[role.other], role=role.other, conn=2, now=NOW + 3)
    assert info.value.code is ErrorCode.NOT_FOUND


def test_drop_of_an_unknown_stream_or_connection_is_ignored() -> None:
    s = v1_paired()
    assert s.bridge.drop(stream_id="nope", connection_id=1, now=DROP_AT) == []
    assert s.bridge.drop(stream_id="s1", connection_id=77, now=DROP_AT) == []
    assert s.bridge.stream_state("s1") is StreamState.PAIRED
    assert s.bridge.held_count() == 0


def test_drop_refuses_a_non_finite_now() -> None:
    s = v1_paired()
    with pytest.raises(LocalProtocolError):
        s.bridge.drop(stream_id="s1", connection_id=1, now=float("nan"))
    assert s.bridge.stream_state("s1") is StreamState.PAIRED


@pytest.mark.parametrize("first_dropper", list(Role))
def test_both_sides_held_with_their_own_deadlines(first_dropper: Role) -> None:
    s = v1_paired()
    bridge, conns = s.bridge, s.conns
    second = first_dropper.other
    assert bridge.drop(stream_id="s1", connection_id=conns[first_dropper], now=DROP_AT) == [
        held(first_dropper, conns[first_dropper], DEADLINE)
    ]
    assert bridge.drop(stream_id="s1", connection_id=conns[second], now=DROP_AT + 4) == [
        held(second, conns[second], DEADLINE + 4)
    ]
    assert bridge.stream_state("s1") is StreamState.BOTH_HELD
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (1, 1, 1)
    assert bridge.next_deadline() == DEADLINE
    # No side is attached: nothing to leave.
    for conn in conns.values():
        assert bridge.leave(stream_id="s1", connection_id=conn, now=DROP_AT + 5) == []
    assert bridge.stream_state("s1") is StreamState.BOTH_HELD


# -- resume -------------------------------------------------------------------------------------


@pytest.mark.parametrize("first", list(Role))
@pytest.mark.parametrize("dropper", list(Role))
def test_held_side_resumes_and_the_stream_is_paired_again(first: Role, dropper: Role) -> None:
    s = v1_paired(first)
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT)
    back = resume(bridge, s.resume_tokens[dropper], role=dropper, conn=30)
    assert back == Resumed(
        stream_id="s1",
        role=dropper,
        connection_id=30,
        peer_connection_id=s.conns[dropper.other],
        replaced_connection_id=None,
        resume_token=back.resume_token,
    )
    assert back.resume_token != s.resume_tokens[dropper]
    assert (
        verify_resume_token(
            back.resume_token, secret=SECRET, stream_id="s1", role=dropper, now=NOW
        ).role
        is dropper
    )
    assert bridge.stream_state("s1") is StreamState.PAIRED
    assert (bridge.paired_count(), bridge.held_count()) == (1, 0)
    assert bridge.next_deadline() is None
    assert bridge.advance(DEADLINE + 1000) == []
    # The resumed side is attached on its new connection: its leave closes the peer.
    assert bridge.leave(stream_id="s1", connection_id=30, now=DEADLINE + 1000) == [
        ClosePeer(stream_id="s1", connection_id=s.conns[dropper.other])
    ]
    assert bridge.stream_count() == 0


@pytest.mark.parametrize("role", list(Role))
def test_role_none_resumes_the_tokens_role(role: Role) -> None:
    s = v1_paired()
    s.bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    assert resume(s.bridge, s.resume_tokens[role], role=None, conn=30).role is role


@pytest.mark.parametrize("dropper", list(Role))
def test_grace_boundary_is_exactly_the_deadline(dropper: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT)
    token = s.resume_tokens[dropper]
    # At the deadline the side is lost, whether or not advance has run yet.
    assert resume_refused(bridge, token, role=dropper, now=DEADLINE) is ErrorCode.NOT_FOUND
    assert bridge.advance(DEADLINE - 1e-9) == []
    assert bridge.stream_state("s1") is StreamState.HELD
    assert bridge.advance(DEADLINE) == [
        ResetPeer(stream_id="s1", connection_id=s.conns[dropper.other], code=ErrorCode.PEER_LOST)
    ]
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (0, 0, 0)
    assert bridge.next_deadline() is None
    assert bridge.advance(DEADLINE + 1) == []
    assert resume_refused(bridge, token, role=dropper, now=DEADLINE + 1) is ErrorCode.NOT_FOUND
    # The reset side's later close is a no-op.
    assert bridge.leave(stream_id="s1", connection_id=s.conns[dropper.other], now=DEADLINE) == []


@pytest.mark.parametrize("dropper", list(Role))
def test_resume_just_before_the_deadline_works(dropper: Role) -> None:
    s = v1_paired()
    s.bridge.drop(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT)
    back = resume(s.bridge, s.resume_tokens[dropper], role=dropper, conn=30, now=DEADLINE - 1e-9)
    assert back.peer_connection_id == s.conns[dropper.other]
    assert s.bridge.advance(DEADLINE) == []
    assert s.bridge.stream_state("s1") is StreamState.PAIRED


@pytest.mark.parametrize("first_dropper", list(Role))
def test_both_held_expire_as_stream_expired_at_the_first_deadline(first_dropper: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[first_dropper], now=DROP_AT)
    bridge.drop(stream_id="s1", connection_id=s.conns[first_dropper.other], now=DROP_AT + 4)
    # The later side cannot come back into a stream its peer can no longer rejoin.
    code = resume_refused(
        bridge, s.resume_tokens[first_dropper.other], role=first_dropper.other, now=DEADLINE
    )
    assert code is ErrorCode.NOT_FOUND
    assert bridge.advance(DEADLINE - 1e-9) == []
    assert bridge.advance(DEADLINE) == [StreamExpired(stream_id="s1")]
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (0, 0, 0)
    assert bridge.next_deadline() is None
    assert bridge.advance(DEADLINE + 10) == []


@pytest.mark.parametrize("first_back", list(Role))
def test_both_held_resume_one_after_the_other(first_back: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[Role.DEVICE], now=DROP_AT)
    bridge.drop(stream_id="s1", connection_id=s.conns[Role.SERVICE], now=DROP_AT)
    one = resume(bridge, s.resume_tokens[first_back], role=first_back, conn=30)
    assert one.peer_connection_id is None
    assert one.replaced_connection_id is None
    assert bridge.stream_state("s1") is StreamState.HELD
    assert bridge.held_count() == 1
    # Only the still-held side's deadline is left.
    assert bridge.next_deadline() == DEADLINE
    two = resume(bridge, s.resume_tokens[first_back.other], role=first_back.other, conn=31)
    assert two.peer_connection_id == 30
    assert bridge.stream_state("s1") is StreamState.PAIRED
    assert bridge.held_count() == 0
    assert bridge.next_deadline() is None


@pytest.mark.parametrize("first", list(Role))
@pytest.mark.parametrize("resumer", list(Role))
def test_resume_while_attached_replaces_the_old_connection(first: Role, resumer: Role) -> None:
    s = v1_paired(first)
    bridge = s.bridge
    old = s.conns[resumer]
    back = resume(bridge, s.resume_tokens[resumer], role=resumer, conn=40)
    assert back.replaced_connection_id == old
    assert back.peer_connection_id == s.conns[resumer.other]
    assert bridge.stream_state("s1") is StreamState.PAIRED
    # The hub closes the old connection; its drop or leave is ignored.
    assert bridge.drop(stream_id="s1", connection_id=old, now=DROP_AT + 2) == []
    assert bridge.leave(stream_id="s1", connection_id=old, now=DROP_AT + 2) == []
    assert bridge.stream_state("s1") is StreamState.PAIRED
    assert bridge.held_count() == 0
    # The new connection is the side now.
    assert bridge.drop(stream_id="s1", connection_id=40, now=DROP_AT + 3) == [
        held(resumer, 40, DROP_AT + 3 + GRACE)
    ]


@pytest.mark.parametrize("dropper", list(Role))
def test_attached_side_of_a_held_stream_may_replace_itself(dropper: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    other = dropper.other
    bridge.drop(stream_id="s1", connection_id=s.conns[dropper], now=DROP_AT)
    back = resume(bridge, s.resume_tokens[other], role=other, conn=50)
    assert back.replaced_connection_id == s.conns[other]
    assert back.peer_connection_id is None
    assert bridge.stream_state("s1") is StreamState.HELD
    # The reset at the end of the grace period goes to the new connection.
    assert bridge.advance(DEADLINE) == [
        ResetPeer(stream_id="s1", connection_id=50, code=ErrorCode.PEER_LOST)
    ]


@pytest.mark.parametrize("role", list(Role))
def test_lone_side_may_replace_itself_before_pairing(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=V1)
    joined = join(bridge, tokens[role], role=role, conn=1)
    assert joined.resume_token is not None
    back = resume(bridge, joined.resume_token, role=role, conn=5, now=NOW + 2)
    assert (back.replaced_connection_id, back.peer_connection_id) == (1, None)
    assert bridge.stream_state("s1") is StreamState.HALF
    assert bridge.leave(stream_id="s1", connection_id=1, now=NOW + 2) == []
    # The peer pairs with the new connection.
    assert join(bridge, tokens[role.other], role=role.other, conn=6).peer_connection_id == 5


@pytest.mark.parametrize("role", list(Role))
def test_lone_side_replaced_is_closed_on_its_new_connection_at_expiry(role: Role) -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode=V1)
    joined = join(bridge, tokens[role], role=role, conn=1)
    assert joined.resume_token is not None
    resume(bridge, joined.resume_token, role=role, conn=5, now=NOW + 2)
    assert bridge.advance(EXPIRES) == [
        CloseLoneSide(
            stream_id="s1", connection_id=5, role=role, code=ErrorCode.PEER_NEVER_CONNECTED
        )
    ]


@pytest.mark.parametrize("role", list(Role))
def test_chain_of_resumes_each_with_a_fresh_token_older_ones_reused(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    history = [s.resume_tokens[role]]
    conn = s.conns[role]
    now = DROP_AT
    for step in range(6):
        if step % 2 == 0:
            # A clean drop, then a resume into the hold.
            assert bridge.drop(stream_id="s1", connection_id=conn, now=now) == [
                held(role, conn, now + GRACE)
            ]
        new_conn = 100 + step
        back = resume(bridge, history[-1], role=role, conn=new_conn, now=now + 1)
        # Odd steps resume while attached (a half-open drop the hub has not seen).
        assert back.replaced_connection_id == (None if step % 2 == 0 else conn)
        assert back.peer_connection_id == s.conns[role.other]
        assert back.resume_token not in history
        history.append(back.resume_token)
        conn = new_conn
        now += 5
        # The side's first message on the new connection: the token it came with is spent.
        bridge.confirm(stream_id="s1", connection_id=conn, now=now)
        for older in history[:-1]:
            assert resume_refused(bridge, older, role=role, now=now) is (
                ErrorCode.STREAM_TOKEN_REUSED
            )
    assert len(set(history)) == 7
    assert bridge.stream_state("s1") is StreamState.PAIRED
    # The latest still works, and once its connection is confirmed, never again.
    resume(bridge, history[-1], role=role, conn=500, now=now)
    bridge.confirm(stream_id="s1", connection_id=500, now=now)
    assert resume_refused(bridge, history[-1], role=role, now=now) is ErrorCode.STREAM_TOKEN_REUSED
    # The other side's token was never touched.
    assert resume(bridge, s.resume_tokens[role.other], role=role.other, conn=501, now=now)


@pytest.mark.parametrize("role", list(Role))
def test_join_tokens_and_resume_tokens_never_stand_in_for_each_other(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    assert resume_refused(bridge, s.tokens[role], role=role) is ErrorCode.STREAM_TOKEN_INVALID
    assert resume_refused(bridge, s.tokens[role], role=None) is ErrorCode.STREAM_TOKEN_INVALID
    for expected_role in (role, None):
        assert refused(bridge, s.resume_tokens[role], role=expected_role, now=DROP_AT + 1) is (
            ErrorCode.STREAM_TOKEN_INVALID
        )
    # Neither attempt used anything up.
    assert resume(bridge, s.resume_tokens[role], role=role, conn=30).role is role


@pytest.mark.parametrize("role", list(Role))
def test_resume_refusals_by_the_token(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    token = s.resume_tokens[role]
    assert resume_refused(bridge, token, role=role.other) is ErrorCode.STREAM_TOKEN_WRONG_ROLE
    assert resume_refused(bridge, s.resume_tokens[role.other], role=role) is (
        ErrorCode.STREAM_TOKEN_WRONG_ROLE
    )
    assert resume_refused(bridge, token, role=role, stream_id="s2") is (
        ErrorCode.STREAM_TOKEN_WRONG_STREAM
    )
    forged = mint_resume_token(
        secret=b"another hub's secret", stream_id="s1", role=role, nonce=nonce()
    )
    assert resume_refused(bridge, forged, role=role) is ErrorCode.STREAM_TOKEN_INVALID
    assert resume_refused(bridge, "", role=role) is ErrorCode.STREAM_TOKEN_INVALID
    assert resume_refused(bridge, "r1.garbage", role=None) is ErrorCode.STREAM_TOKEN_INVALID
    # A token this hub could have signed but never issued for this stream.
    unissued = mint_resume_token(secret=SECRET, stream_id="s1", role=role, nonce=nonce())
    assert resume_refused(bridge, unissued, role=role) is ErrorCode.STREAM_TOKEN_INVALID
    # None of that used the real token up.
    assert resume(bridge, token, role=role, conn=30).role is role


def test_resume_refusal_order_token_before_not_found() -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.leave(stream_id="s1", connection_id=1, now=DROP_AT)
    token = s.resume_tokens[Role.DEVICE]
    assert resume_refused(bridge, token, role=Role.SERVICE) is ErrorCode.STREAM_TOKEN_WRONG_ROLE
    assert resume_refused(bridge, token, role=Role.DEVICE, stream_id="zz") is (
        ErrorCode.STREAM_TOKEN_WRONG_STREAM
    )
    assert resume_refused(bridge, token, role=Role.DEVICE) is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("leaver", list(Role))
def test_leave_of_a_v1_stream_ends_it_and_a_held_peer_just_ends(leaver: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[leaver.other], now=DROP_AT)
    # The attached side closes normally: nothing to tell the held side.
    assert bridge.leave(stream_id="s1", connection_id=s.conns[leaver], now=DROP_AT + 1) == []
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (0, 0, 0)
    assert bridge.next_deadline() is None
    assert bridge.advance(DEADLINE) == []
    code = resume_refused(bridge, s.resume_tokens[leaver.other], role=leaver.other)
    assert code is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("leaver", list(Role))
def test_leave_of_a_paired_v1_stream_closes_the_peer(leaver: Role) -> None:
    s = v1_paired()
    assert s.bridge.leave(stream_id="s1", connection_id=s.conns[leaver], now=DROP_AT) == [
        ClosePeer(stream_id="s1", connection_id=s.conns[leaver.other])
    ]
    for role in Role:
        assert resume_refused(s.bridge, s.resume_tokens[role], role=role) is ErrorCode.NOT_FOUND


def test_a_raw_stream_cannot_be_resumed() -> None:
    bridge, _, _ = paired_bridge(Role.DEVICE)
    token = mint_resume_token(secret=SECRET, stream_id="s1", role=Role.DEVICE, nonce=nonce())
    with pytest.raises(DevstreamError) as info:
        resume(bridge, token, role=Role.DEVICE, conn=30)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert bridge.stream_state("s1") is StreamState.PAIRED


def test_resume_of_a_stream_never_known_is_not_found() -> None:
    token = mint_resume_token(secret=SECRET, stream_id="s1", role=Role.DEVICE, nonce=nonce())
    assert resume_refused(Bridge(secret=SECRET), token, role=Role.DEVICE) is ErrorCode.NOT_FOUND


def test_resume_tokens_of_an_earlier_stream_with_the_same_id_are_invalid() -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.leave(stream_id="s1", connection_id=1, now=DROP_AT)
    tokens = create(bridge, mode=V1, now=DROP_AT)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=10, now=DROP_AT)
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=11, now=DROP_AT)
    for role in Role:
        assert resume_refused(bridge, s.resume_tokens[role], role=role) is (
            ErrorCode.STREAM_TOKEN_INVALID
        )


@pytest.mark.parametrize("role", list(Role))
def test_resume_misuse_is_local_and_leaves_the_token_usable(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    token = s.resume_tokens[role]
    cases: list[dict[str, Any]] = [
        {"connection_id": s.conns[role.other]},  # the peer's connection
        {"resume_nonce": b"short"},
        {"resume_nonce": b"x" * 65},
        {"now": float("nan")},
    ]
    for case in cases:
        arguments: dict[str, Any] = {
            "stream_id": "s1",
            "token": token,
            "role": role,
            "connection_id": 30,
            "now": DROP_AT + 1,
            "resume_nonce": nonce(),
        }
        arguments.update(case)
        with pytest.raises(LocalProtocolError) as info:
            bridge.resume(**arguments)
        assert info.value.code is ErrorCode.ARGUMENT_INVALID
        assert bridge.stream_state("s1") is StreamState.HELD
    assert resume(bridge, token, role=role, conn=30).connection_id == 30


def test_a_resume_nonce_is_never_issued_twice() -> None:
    s = v1_paired()
    bridge = s.bridge
    first = nonce()
    back = resume(
        bridge, s.resume_tokens[Role.DEVICE], role=Role.DEVICE, conn=30, resume_nonce=first
    )
    # Reissuing the same nonce would bring back the spent token: refused.
    with pytest.raises(LocalProtocolError):
        resume(bridge, back.resume_token, role=Role.DEVICE, conn=31, resume_nonce=first)
    with pytest.raises(LocalProtocolError):
        resume(
            bridge, s.resume_tokens[Role.SERVICE], role=Role.SERVICE, conn=31, resume_nonce=first
        )
    assert resume(bridge, back.resume_token, role=Role.DEVICE, conn=31).replaced_connection_id == 30


# -- lost answers: a token is spent once its connection is confirmed ----------------------------


def confirm(bridge: Bridge, conn: int, *, stream_id: str = "s1", now: float = DROP_AT + 2) -> None:
    bridge.confirm(stream_id=stream_id, connection_id=conn, now=now)


@pytest.mark.parametrize("held_first", [True, False])
@pytest.mark.parametrize("role", list(Role))
def test_a_resume_whose_answer_is_lost_is_retried_with_the_same_token(
    role: Role, held_first: bool
) -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[role]
    if held_first:
        bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    lost = resume(bridge, token, role=role, conn=30)
    # The answer with lost.resume_token never reached the side: it tries the old token again,
    # and the new connection replaces the one whose answer was lost.
    back = resume(bridge, token, role=role, conn=31, now=DROP_AT + 2)
    assert (back.connection_id, back.replaced_connection_id) == (31, 30)
    assert back.peer_connection_id == s.conns[role.other]
    assert back.resume_token not in (token, lost.resume_token)
    assert bridge.stream_state("s1") is StreamState.PAIRED
    # The token of the lost answer was never seen by the side: it is retired at once.
    assert resume_refused(bridge, lost.resume_token, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    # The side's first message arrives on connection 31: the old token is spent for good.
    confirm(bridge, 31)
    assert resume_refused(bridge, token, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    assert resume_refused(bridge, token, role=None) is ErrorCode.STREAM_TOKEN_REUSED
    assert resume(bridge, back.resume_token, role=role, conn=32).replaced_connection_id == 31
    # The peer's credentials were never touched.
    assert resume(bridge, s.resume_tokens[role.other], role=role.other, conn=33).role is role.other


@pytest.mark.parametrize("role", list(Role))
def test_retry_for_a_held_side_whose_unconfirmed_connection_dropped(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[role]
    bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    lost = resume(bridge, token, role=role, conn=30)
    # The hub notices the drop of the connection whose answer was lost: held again, with the
    # grace period counted from this drop, as for any drop.
    assert bridge.drop(stream_id="s1", connection_id=30, now=DROP_AT + 2) == [
        held(role, 30, DROP_AT + 2 + GRACE)
    ]
    back = resume(bridge, token, role=role, conn=31, now=DROP_AT + 3)
    assert (back.replaced_connection_id, back.peer_connection_id) == (None, s.conns[role.other])
    assert bridge.stream_state("s1") is StreamState.PAIRED
    assert bridge.next_deadline() is None
    assert resume_refused(bridge, lost.resume_token, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    # The dropped connection cannot confirm anything; the new one can.
    confirm(bridge, 30)
    assert resume(bridge, token, role=role, conn=32).replaced_connection_id == 31
    confirm(bridge, 32)
    assert resume_refused(bridge, token, role=role) is ErrorCode.STREAM_TOKEN_REUSED


@pytest.mark.parametrize("role", list(Role))
def test_the_grace_deadline_binds_a_retry_like_any_resume(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[role]
    bridge.drop(stream_id="s1", connection_id=s.conns[role], now=DROP_AT)
    resume(bridge, token, role=role, conn=30)
    bridge.drop(stream_id="s1", connection_id=30, now=DROP_AT + 2)
    deadline = DROP_AT + 2 + GRACE
    assert bridge.next_deadline() == deadline
    assert resume_refused(bridge, token, role=role, now=deadline) is ErrorCode.NOT_FOUND
    assert bridge.advance(deadline) == [
        ResetPeer(stream_id="s1", connection_id=s.conns[role.other], code=ErrorCode.PEER_LOST)
    ]
    assert resume_refused(bridge, token, role=role, now=deadline) is ErrorCode.NOT_FOUND


@pytest.mark.parametrize("role", list(Role))
def test_presenting_the_latest_spends_the_one_before(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    first = s.resume_tokens[role]
    second = resume(bridge, first, role=role, conn=30).resume_token
    # The side read that answer, but connection 30 died before its first message.
    third = resume(bridge, second, role=role, conn=31).resume_token
    assert resume_refused(bridge, first, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    # Connection 31 is not confirmed: its own token and the fresh one both work, once more.
    fourth = resume(bridge, second, role=role, conn=32)
    assert fourth.replaced_connection_id == 31
    assert resume_refused(bridge, third, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    fifth = resume(bridge, fourth.resume_token, role=role, conn=33)
    assert resume_refused(bridge, second, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    confirm(bridge, 33)
    assert resume_refused(bridge, fourth.resume_token, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    assert resume(bridge, fifth.resume_token, role=role, conn=34).replaced_connection_id == 33


@pytest.mark.parametrize("role", list(Role))
def test_answers_lost_again_and_again_keep_the_stream(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[role]
    lost: list[str] = []
    conn = s.conns[role]
    for attempt in range(6):
        if attempt % 2:
            bridge.drop(stream_id="s1", connection_id=conn, now=DROP_AT + attempt)
        back = resume(bridge, token, role=role, conn=40 + attempt, now=DROP_AT + attempt + 1)
        assert back.replaced_connection_id == (None if attempt % 2 else conn)
        lost.append(back.resume_token)
        conn = back.connection_id
    assert len(set(lost)) == len(lost)
    for retired in lost[:-1]:
        assert resume_refused(bridge, retired, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    confirm(bridge, conn)
    assert resume_refused(bridge, token, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    assert resume(bridge, lost[-1], role=role, conn=60).replaced_connection_id == conn
    assert bridge.stream_state("s1") is StreamState.PAIRED


@pytest.mark.parametrize("role", list(Role))
def test_confirm_ignores_every_connection_but_the_unconfirmed_one(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[role]
    resume(bridge, token, role=role, conn=30)
    resume(bridge, token, role=role, conn=31)
    for other in (s.conns[role], 30, s.conns[role.other], 77):
        confirm(bridge, other)  # an old, a replaced, the peer's, an unknown connection
    confirm(bridge, 31, stream_id="s2")  # an unknown stream
    # None of that spent the token: connection 31 is still unconfirmed.
    assert resume(bridge, token, role=role, conn=32).replaced_connection_id == 31
    confirm(bridge, 32)
    confirm(bridge, 32)  # twice is harmless
    assert resume_refused(bridge, token, role=role) is ErrorCode.STREAM_TOKEN_REUSED
    with pytest.raises(LocalProtocolError) as info:
        bridge.confirm(stream_id="s1", connection_id=32, now=float("nan"))
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize("role", list(Role))
def test_confirm_of_a_joined_connection_changes_nothing(role: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    for conn in s.conns.values():
        confirm(bridge, conn)
    assert bridge.stream_state("s1") is StreamState.PAIRED
    # A join's stream token is spent at the join, confirmed or not; its resume token works.
    assert refused(bridge, s.tokens[role], role=role) is ErrorCode.STREAM_TOKEN_REUSED
    assert resume(bridge, s.resume_tokens[role], role=role, conn=30).role is role
    raw, _, raw_conns = paired_bridge(role)
    confirm(raw, raw_conns[role], now=NOW + 2)
    assert raw.stream_state("s1") is StreamState.PAIRED


def test_an_unconfirmed_nonce_is_never_issued_again() -> None:
    s = v1_paired()
    bridge = s.bridge
    first = nonce()
    back = resume(
        bridge, s.resume_tokens[Role.DEVICE], role=Role.DEVICE, conn=30, resume_nonce=first
    )
    # The token made from ``first`` opens connection 31 and stays usable while 31 is unconfirmed.
    resume(bridge, back.resume_token, role=Role.DEVICE, conn=31)
    with pytest.raises(LocalProtocolError):
        resume(bridge, back.resume_token, role=Role.DEVICE, conn=32, resume_nonce=first)
    assert resume(bridge, back.resume_token, role=Role.DEVICE, conn=32).replaced_connection_id == 31


def test_lost_answer_bookkeeping_stays_bounded() -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[Role.DEVICE]
    conn = 1
    for i in range(300):
        now = DROP_AT + i
        if i % 3 == 0:
            bridge.drop(stream_id="s1", connection_id=conn, now=now)
        back = resume(bridge, token, role=Role.DEVICE, conn=1000 + i, now=now)
        conn = back.connection_id
        if i % 5 == 4:
            # Now and then the answer arrives and the side proves itself.
            confirm(bridge, conn, now=now)
            token = back.resume_token
        unconfirmed = bridge.unconfirmed_roles("s1")
        # At most one previous token per role; every other token issued is latest or spent.
        assert len(unconfirmed) <= 1
        assert bridge.retired_resume_token_count("s1") + len(unconfirmed) == i + 1
        assert bridge.table_sizes()["holds"] <= 2 * bridge.stream_count() + 65
    confirm(bridge, conn, now=DROP_AT + 300)
    assert bridge.unconfirmed_roles("s1") == frozenset()
    bridge.leave(stream_id="s1", connection_id=conn, now=DROP_AT + 301)
    assert bridge.stream_count() == 0


# -- time with holds ----------------------------------------------------------------------------


def test_advance_orders_holds_and_token_expiries_by_deadline() -> None:
    bridge = Bridge(secret=SECRET, grace_period=30.0)
    tokens = {name: create(bridge, name, mode=V1) for name in ("a", "b")}
    for name in ("a", "b"):
        join(bridge, tokens[name][Role.DEVICE], role=Role.DEVICE, conn=ord(name), stream_id=name)
        join(bridge, tokens[name][Role.SERVICE], role=Role.SERVICE, conn=-ord(name), stream_id=name)
    create(bridge, "c", now=NOW + 15)  # tokens expire at NOW + 75
    bridge.drop(stream_id="a", connection_id=ord("a"), now=NOW + 50)  # held until NOW + 80
    bridge.drop(stream_id="b", connection_id=-ord("b"), now=NOW + 40)  # held until NOW + 70
    assert bridge.next_deadline() == NOW + 70
    assert bridge.advance(NOW + 100) == [
        ResetPeer(stream_id="b", connection_id=ord("b"), code=ErrorCode.PEER_LOST),
        StreamExpired(stream_id="c"),
        ResetPeer(stream_id="a", connection_id=-ord("a"), code=ErrorCode.PEER_LOST),
    ]
    assert bridge.stream_count() == 0


def test_next_deadline_forgets_a_hold_that_resumed() -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=1, now=DROP_AT)
    resume(bridge, s.resume_tokens[Role.DEVICE], role=Role.DEVICE, conn=30)
    bridge.drop(stream_id="s1", connection_id=30, now=DROP_AT + 20)
    # The first hold's deadline is stale; only the second counts.
    assert bridge.next_deadline() == DEADLINE + 20
    assert bridge.advance(DEADLINE) == []
    assert bridge.stream_state("s1") is StreamState.HELD


def test_hold_bookkeeping_stays_bounded() -> None:
    s = v1_paired()
    bridge = s.bridge
    token = s.resume_tokens[Role.DEVICE]
    conn = 1
    for i in range(500):
        now = DROP_AT + i
        bridge.drop(stream_id="s1", connection_id=conn, now=now)
        conn = 1000 + i
        token = resume(bridge, token, role=Role.DEVICE, conn=conn, now=now).resume_token
        assert bridge.table_sizes()["holds"] <= 2 * bridge.stream_count() + 65
    assert bridge.next_deadline() is None


# -- a side that closed normally and one that has not answered ----------------------------------

LAST_WORDS = (b"\x02" + b"\x00" * 3 + b"\x08" + b"\x00" * 7 + b"\x2a",)
CLOSE_TIMEOUT = DEFAULT_CLOSE_TIMEOUT


def close(s: V1Stream, closer: Role, *, now: float = DROP_AT, **kwargs: Any) -> list[Any]:
    arguments: dict[str, Any] = {"code": 1000, "messages": LAST_WORDS, **kwargs}
    return s.bridge.close(stream_id="s1", connection_id=s.conns[closer], now=now, **arguments)


@pytest.mark.parametrize("closer", list(Role))
def test_a_close_waits_for_the_other_sides_answer_which_ends_the_stream(closer: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    assert close(s, closer) == []
    assert bridge.stream_state("s1") is StreamState.CLOSING
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (1, 1, 0)
    # The other side has close_timeout to answer.
    assert bridge.next_deadline() == DROP_AT + CLOSE_TIMEOUT
    # The closed side cannot come back: only the other side is left.
    assert resume_refused(bridge, s.resume_tokens[closer], role=closer) is ErrorCode.NOT_FOUND
    assert bridge.leave(stream_id="s1", connection_id=s.conns[closer], now=DROP_AT) == []
    # The other side answers the close (a close of its own is the same): the stream ends.
    answer = bridge.close(
        stream_id="s1", connection_id=s.conns[closer.other], now=DROP_AT, code=1000
    )
    assert answer == []
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert bridge.stream_count() == 0
    assert bridge.next_deadline() is None


@pytest.mark.parametrize("closer", list(Role))
def test_a_side_lost_before_it_answers_a_close_is_held_and_resumes_to_the_last_words(
    closer: Role,
) -> None:
    s = v1_paired()
    bridge = s.bridge
    other = closer.other
    close(s, closer, reason="bye")
    assert bridge.drop(stream_id="s1", connection_id=s.conns[other], now=DROP_AT + 1) == [
        held(other, s.conns[other], DROP_AT + 1 + GRACE)
    ]
    assert bridge.stream_state("s1") is StreamState.CLOSING_HELD
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (1, 1, 1)
    assert bridge.next_deadline() == DROP_AT + 1 + GRACE
    assert resume_refused(bridge, s.resume_tokens[closer], role=closer) is ErrorCode.NOT_FOUND
    back = resume(bridge, s.resume_tokens[other], role=other, conn=30, now=DROP_AT + 2)
    assert back.farewell == Farewell(messages=LAST_WORDS, code=1000, reason="bye")
    assert back.peer_connection_id is None and back.replaced_connection_id is None
    assert bridge.stream_state("s1") is StreamState.CLOSING
    # The resumed side got the close just now: its time to answer starts.
    assert bridge.next_deadline() == DROP_AT + 2 + CLOSE_TIMEOUT
    # Lost again before it answered: held again, and its next resume gets them again.
    bridge.drop(stream_id="s1", connection_id=30, now=DROP_AT + 3)
    again = resume(bridge, back.resume_token, role=other, conn=31, now=DROP_AT + 4)
    assert again.farewell == back.farewell
    # Resumed while still attached (its drop went unnoticed): the same.
    replaced = resume(bridge, again.resume_token, role=other, conn=32, now=DROP_AT + 5)
    assert replaced.replaced_connection_id == 31
    assert replaced.farewell == back.farewell
    assert bridge.stream_state("s1") is StreamState.CLOSING
    assert bridge.leave(stream_id="s1", connection_id=32, now=DROP_AT + 6) == []
    assert bridge.stream_state("s1") is StreamState.ENDED


@pytest.mark.parametrize("closer", list(Role))
def test_a_side_held_when_the_other_closes_keeps_its_deadline_then_gets_the_last_words(
    closer: Role,
) -> None:
    s = v1_paired()
    bridge = s.bridge
    other = closer.other
    bridge.drop(stream_id="s1", connection_id=s.conns[other], now=DROP_AT)
    assert close(s, closer, now=DROP_AT + 5) == []
    assert bridge.stream_state("s1") is StreamState.CLOSING_HELD
    assert bridge.next_deadline() == DEADLINE
    back = resume(bridge, s.resume_tokens[other], role=other, conn=30, now=DROP_AT + 6)
    assert back.farewell == Farewell(messages=LAST_WORDS, code=1000, reason="")
    assert bridge.stream_state("s1") is StreamState.CLOSING


@pytest.mark.parametrize("closer", list(Role))
def test_a_side_that_never_comes_back_for_the_last_words_ends_the_stream(closer: Role) -> None:
    s = v1_paired()
    bridge = s.bridge
    other = closer.other
    close(s, closer)
    bridge.drop(stream_id="s1", connection_id=s.conns[other], now=DROP_AT)
    assert bridge.advance(DEADLINE - 0.001) == []
    assert bridge.advance(DEADLINE) == [StreamExpired(stream_id="s1")]
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert bridge.stream_count() == 0
    assert resume_refused(bridge, s.resume_tokens[other], role=other) is ErrorCode.NOT_FOUND


def test_only_the_newest_last_words_that_fit_are_kept() -> None:
    s = v1_paired()
    big, small = b"a" * (MAX_FAREWELL_SIZE - 100), b"b" * 60
    close(s, Role.DEVICE, messages=[b"c" * 200, big, small, bytearray(b"d" * 40)])
    s.bridge.drop(stream_id="s1", connection_id=s.conns[Role.SERVICE], now=DROP_AT)
    back = resume(s.bridge, s.resume_tokens[Role.SERVICE], role=Role.SERVICE, conn=30)
    assert back.farewell is not None
    assert back.farewell.messages == (big, small, b"d" * 40)
    assert all(type(message) is bytes for message in back.farewell.messages)
    assert sum(map(len, back.farewell.messages)) == MAX_FAREWELL_SIZE


@pytest.mark.parametrize("closer", list(Role))
def test_a_close_that_is_not_normal_ends_the_stream_as_a_leave(closer: Role) -> None:
    s = v1_paired()
    assert close(s, closer, code=4400) == [
        ClosePeer(stream_id="s1", connection_id=s.conns[closer.other])
    ]
    assert s.bridge.stream_state("s1") is StreamState.ENDED
    bridge, _, conns = paired_bridge(closer)
    assert bridge.close(stream_id="s1", connection_id=conns[closer], now=NOW + 2, code=1000) == [
        ClosePeer(stream_id="s1", connection_id=conns[closer.other])
    ]
    assert bridge.stream_state("s1") is StreamState.ENDED


def test_a_close_refuses_a_non_finite_now() -> None:
    s = v1_paired()
    with pytest.raises(LocalProtocolError):
        close(s, Role.DEVICE, now=float("nan"))
    assert s.bridge.stream_state("s1") is StreamState.PAIRED


# -- a side that never answers the close ------------------------------------------------------


def unanswered(s: V1Stream, role: Role, conn: int | None = None) -> CloseUnanswered:
    connection_id = s.conns[role] if conn is None else conn
    return CloseUnanswered(stream_id="s1", connection_id=connection_id, role=role)


@pytest.mark.parametrize("closer", list(Role))
def test_a_close_left_unanswered_ends_the_stream_at_the_close_timeout(closer: Role) -> None:
    """A side that keeps its connection without answering the other side's close holds the
    stream (and its device's count) for ``close_timeout``, then the stream ends and the hub
    is told to drop that side's connection."""
    s = v1_paired()
    bridge = s.bridge
    other = closer.other
    assert DEFAULT_CLOSE_TIMEOUT == 5.0
    close(s, closer)
    assert bridge.next_deadline() == DROP_AT + CLOSE_TIMEOUT
    assert bridge.advance(DROP_AT + CLOSE_TIMEOUT - 0.001) == []
    assert bridge.stream_state("s1") is StreamState.CLOSING
    assert bridge.device_stream_count("dev") == 1
    assert bridge.advance(DROP_AT + CLOSE_TIMEOUT) == [unanswered(s, other)]
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (0, 0, 0)
    assert bridge.device_stream_count("dev") == 0
    assert bridge.next_deadline() is None
    # Its answer, coming later, changes nothing; nor can it come back.
    assert (
        bridge.close(stream_id="s1", connection_id=s.conns[other], now=DROP_AT + 6, code=1000) == []
    )
    assert resume_refused(bridge, s.resume_tokens[other], role=other, now=DROP_AT + 6) is (
        ErrorCode.NOT_FOUND
    )
    assert bridge.advance(DROP_AT + 1000) == []


@pytest.mark.parametrize("answer", ["close", "leave", "drop then resume then close"])
def test_an_answer_before_the_close_timeout_ends_the_stream_on_its_own(answer: str) -> None:
    s = v1_paired()
    bridge = s.bridge
    close(s, Role.SERVICE)
    conn = s.conns[Role.DEVICE]
    answer_by = DROP_AT + CLOSE_TIMEOUT
    if answer == "drop then resume then close":
        bridge.drop(stream_id="s1", connection_id=conn, now=DROP_AT + 1)
        conn = 30
        resume(bridge, s.resume_tokens[Role.DEVICE], role=Role.DEVICE, conn=conn, now=DROP_AT + 2)
        answer_by = DROP_AT + 2 + CLOSE_TIMEOUT
    assert bridge.next_deadline() == answer_by
    just_before = answer_by - 0.001
    assert bridge.advance(just_before) == []
    if answer == "leave":
        assert bridge.leave(stream_id="s1", connection_id=conn, now=just_before) == []
    else:
        assert bridge.close(stream_id="s1", connection_id=conn, now=just_before, code=1000) == []
    assert bridge.stream_state("s1") is StreamState.ENDED
    assert bridge.next_deadline() is None
    assert bridge.advance(DROP_AT + 1000) == []


def test_the_close_timeout_is_configurable_and_checked() -> None:
    s = v1_paired(close_timeout=0.25)
    close(s, Role.DEVICE)
    assert s.bridge.next_deadline() == DROP_AT + 0.25
    assert s.bridge.advance(DROP_AT + 0.25) == [unanswered(s, Role.SERVICE)]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(LocalProtocolError) as info:
            Bridge(secret=SECRET, close_timeout=bad)
        assert info.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize("closer", list(Role))
def test_a_side_resumed_into_closing_gets_a_fresh_close_timeout(closer: Role) -> None:
    """Held, the side has the grace period, not the close's time; once it is back (resumed
    after a drop, or a new connection replacing one still attached) it was given the close
    again and has ``close_timeout`` from then."""
    s = v1_paired()
    bridge = s.bridge
    other = closer.other
    close(s, closer)
    bridge.drop(stream_id="s1", connection_id=s.conns[other], now=DROP_AT + 1)
    assert bridge.next_deadline() == DROP_AT + 1 + GRACE
    # The close's time no longer counts while the side is held.
    assert bridge.advance(DROP_AT + CLOSE_TIMEOUT + 1) == []
    assert bridge.stream_state("s1") is StreamState.CLOSING_HELD
    back = resume(bridge, s.resume_tokens[other], role=other, conn=30, now=DROP_AT + 20)
    assert back.farewell is not None
    assert bridge.next_deadline() == DROP_AT + 20 + CLOSE_TIMEOUT
    # A replace is given the close too: its time starts afresh.
    again = resume(bridge, back.resume_token, role=other, conn=31, now=DROP_AT + 23)
    assert again.replaced_connection_id == 30 and again.farewell == back.farewell
    assert bridge.next_deadline() == DROP_AT + 23 + CLOSE_TIMEOUT
    assert bridge.advance(DROP_AT + 23 + CLOSE_TIMEOUT - 0.001) == []
    assert bridge.stream_state("s1") is StreamState.CLOSING
    assert bridge.advance(DROP_AT + 23 + CLOSE_TIMEOUT) == [unanswered(s, other, 31)]
    assert bridge.stream_state("s1") is StreamState.ENDED


def test_a_side_held_when_the_other_closes_has_its_grace_period_then_the_close_timeout() -> None:
    s = v1_paired()
    bridge = s.bridge
    bridge.drop(stream_id="s1", connection_id=s.conns[Role.SERVICE], now=DROP_AT)
    close(s, Role.DEVICE, now=DROP_AT + 1)
    assert bridge.next_deadline() == DEADLINE
    assert bridge.advance(DEADLINE - 0.001) == []
    back = resume(
        bridge, s.resume_tokens[Role.SERVICE], role=Role.SERVICE, conn=30, now=DEADLINE - 1
    )
    assert back.farewell is not None
    assert bridge.next_deadline() == DEADLINE - 1 + CLOSE_TIMEOUT
    assert bridge.advance(DEADLINE - 1 + CLOSE_TIMEOUT) == [unanswered(s, Role.SERVICE, 30)]


def test_no_new_connection_once_the_time_to_answer_is_over() -> None:
    """As with a hold: at the deadline the stream is lost, whether the timer ran or not."""
    s = v1_paired()
    close(s, Role.DEVICE)
    token = s.resume_tokens[Role.SERVICE]
    at = DROP_AT + CLOSE_TIMEOUT
    assert resume_refused(s.bridge, token, role=Role.SERVICE, now=at) is ErrorCode.NOT_FOUND
    assert resume(s.bridge, token, role=Role.SERVICE, conn=30, now=at - 0.001).farewell
    assert s.bridge.next_deadline() == at - 0.001 + CLOSE_TIMEOUT


def test_advance_orders_closes_holds_and_token_expiries_by_deadline() -> None:
    bridge = Bridge(secret=SECRET, grace_period=30.0, close_timeout=10.0)
    tokens = {name: create(bridge, name, mode=V1) for name in ("a", "b", "d")}
    for name in ("a", "b", "d"):
        join(bridge, tokens[name][Role.DEVICE], role=Role.DEVICE, conn=ord(name), stream_id=name)
        join(bridge, tokens[name][Role.SERVICE], role=Role.SERVICE, conn=-ord(name), stream_id=name)
    create(bridge, "c", now=NOW + 15)  # tokens expire at NOW + 75
    bridge.drop(stream_id="a", connection_id=ord("a"), now=NOW + 50)  # held until NOW + 80
    bridge.close(stream_id="b", connection_id=-ord("b"), now=NOW + 60, code=1000)  # NOW + 70
    bridge.close(stream_id="d", connection_id=ord("d"), now=NOW + 65, code=1000)  # NOW + 75
    assert bridge.next_deadline() == NOW + 70
    assert bridge.advance(NOW + 100) == [
        CloseUnanswered(stream_id="b", connection_id=ord("b"), role=Role.DEVICE),
        StreamExpired(stream_id="c"),
        CloseUnanswered(stream_id="d", connection_id=-ord("d"), role=Role.SERVICE),
        ResetPeer(stream_id="a", connection_id=-ord("a"), code=ErrorCode.PEER_LOST),
    ]
    assert bridge.stream_count() == 0


def test_close_bookkeeping_stays_bounded() -> None:
    s = v1_paired()
    bridge = s.bridge
    close(s, Role.DEVICE)
    token = s.resume_tokens[Role.SERVICE]
    for i in range(300):
        now = DROP_AT + i
        token = resume(bridge, token, role=Role.SERVICE, conn=100 + i, now=now).resume_token
        assert bridge.table_sizes()["closings"] <= 2 * bridge.stream_count() + 65
    assert bridge.next_deadline() == DROP_AT + 299 + CLOSE_TIMEOUT
    assert bridge.leave(stream_id="s1", connection_id=399, now=DROP_AT + 300) == []
    assert bridge.next_deadline() is None


# -- the state table, walked pair by pair -------------------------------------------------------

#: Inputs the table does not name for a state but the bridge accepts under another name: a
#: drop or a close of an unpaired stream is a leave, and so is the answer to a close.
ALIASES = {
    (StreamState.HALF, StreamInput.DROP): StreamInput.LEAVE,
    (StreamState.HALF, StreamInput.CLOSE): StreamInput.LEAVE,
    (StreamState.CLOSING, StreamInput.CLOSE): StreamInput.LEAVE,
}


@dataclass
class Staged:
    bridge: Bridge
    tokens: dict[Role, str]
    resume_tokens: dict[Role, str]
    #: Every connection that ever was a side of the stream.
    conns: list[int]
    #: The roles attached now.
    attached: set[Role]


def staged(state: StreamState) -> Staged:
    """A bridge whose v1 stream "s1" is in ``state`` (at time ``DROP_AT``)."""
    bridge = Bridge(secret=SECRET)
    stage = Staged(bridge, create(bridge, mode=V1), {}, [], set())
    if state is not StreamState.WAITING:
        roles = [Role.DEVICE] if state is StreamState.HALF else list(Role)
        for conn, role in enumerate(roles, start=1):
            joined = join(bridge, stage.tokens[role], role=role, conn=conn)
            assert joined.resume_token is not None
            stage.resume_tokens[role] = joined.resume_token
            stage.conns.append(conn)
            stage.attached.add(role)
    if state in (StreamState.HELD, StreamState.BOTH_HELD):
        bridge.drop(stream_id="s1", connection_id=1, now=DROP_AT)
        stage.attached.discard(Role.DEVICE)
    if state is StreamState.BOTH_HELD:
        bridge.drop(stream_id="s1", connection_id=2, now=DROP_AT)
        stage.attached.discard(Role.SERVICE)
    if state in (StreamState.CLOSING, StreamState.CLOSING_HELD):
        bridge.close(stream_id="s1", connection_id=1, now=DROP_AT, code=1000)
        stage.attached.discard(Role.DEVICE)
    if state is StreamState.CLOSING_HELD:
        bridge.drop(stream_id="s1", connection_id=2, now=DROP_AT)
        stage.attached.discard(Role.SERVICE)
    if state is StreamState.ENDED:
        bridge.leave(stream_id="s1", connection_id=1, now=DROP_AT)
        stage.attached.clear()
    assert bridge.stream_state("s1") is state
    return stage


def ways(state: StreamState, action: StreamInput) -> list[Role | int | str | None]:
    """Every way to feed ``action`` to a stream in ``state``: a role, a connection id or (to
    revoke) a device id."""
    stage = staged(state)
    if action is StreamInput.REVOKE:
        return ["dev", "another-device"]
    if action is StreamInput.JOIN:
        return list(Role)
    if action in (StreamInput.LEAVE, StreamInput.DROP, StreamInput.CLOSE):
        return [*stage.conns, 77]
    if action is StreamInput.EXPIRE:
        return [None]
    # RESUME is a resume of a side not attached; REPLACE one of a side attached.
    if action is StreamInput.RESUME:
        return sorted(set(Role) - stage.attached, key=str)
    return sorted(stage.attached, key=str)


def feed(stage: Staged, action: StreamInput, way: Role | int | str | None) -> bool:
    """Feed ``action`` to ``stage`` one ``way``; whether the bridge acted (not refused, not
    ignored)."""
    bridge = stage.bridge
    before = bridge.stream_state("s1")
    now = DROP_AT + 1
    try:
        if action is StreamInput.JOIN:
            assert isinstance(way, Role)
            join(bridge, stage.tokens[way], role=way, conn=50, now=now)
        elif action in (StreamInput.RESUME, StreamInput.REPLACE):
            assert isinstance(way, Role)
            # The side's latest resume token, or (never joined) one this hub could sign.
            token = stage.resume_tokens.get(way) or mint_resume_token(
                secret=SECRET, stream_id="s1", role=way, nonce=nonce()
            )
            resume(bridge, token, role=way, conn=60, now=now)
        else:
            if action is StreamInput.EXPIRE:
                events = bridge.advance(DROP_AT + 10_000)
            elif action is StreamInput.REVOKE:
                assert isinstance(way, str)
                events = bridge.revoke_device(
                    device_id=way, code=ErrorCode.DEVICE_DISABLED, now=now
                )
            elif action is StreamInput.CLOSE:
                assert isinstance(way, int)
                events = bridge.close(stream_id="s1", connection_id=way, now=now, code=1000)
            else:
                assert isinstance(way, int)
                method = bridge.leave if action is StreamInput.LEAVE else bridge.drop
                events = method(stream_id="s1", connection_id=way, now=now)
            return bool(events) or bridge.stream_state("s1") is not before
    except DevstreamError:
        return False
    return True


@pytest.mark.parametrize("state", list(StreamState))
@pytest.mark.parametrize("action", list(StreamInput))
def test_every_state_input_pair_follows_the_table(state: StreamState, action: StreamInput) -> None:
    assert not set(ALIASES) & set(TRANSITIONS)
    legal = (state, action) in TRANSITIONS or (state, action) in ALIASES
    expected = TRANSITIONS.get((state, ALIASES.get((state, action), action)))
    acted = False
    for way in ways(state, action):
        stage = staged(state)
        if feed(stage, action, way):
            acted = True
            assert legal, f"{action.name} acted on a {state.name} stream"
            assert stage.bridge.stream_state("s1") is expected
        else:
            # Refused or ignored: nothing changed.
            assert stage.bridge.stream_state("s1") is state
    if legal:
        assert acted, f"no way to {action.name} a {state.name} stream"


@pytest.mark.parametrize("state", list(StreamState))
def test_confirm_changes_no_state(state: StreamState) -> None:
    for conn in [*staged(state).conns, 60, 77]:
        stage = staged(state)
        if state in (StreamState.HALF, StreamState.PAIRED, StreamState.HELD):
            # An unconfirmed connection 60 replaces the service (or the lone device).
            role = Role.DEVICE if state is StreamState.HALF else Role.SERVICE
            resume(stage.bridge, stage.resume_tokens[role], role=role, conn=60)
        deadline = stage.bridge.next_deadline()
        confirm(stage.bridge, conn)
        assert stage.bridge.stream_state("s1") is state
        assert stage.bridge.next_deadline() == deadline


def test_counts_follow_the_states() -> None:
    expected = {
        StreamState.WAITING: (1, 0, 0),
        StreamState.HALF: (1, 0, 0),
        StreamState.PAIRED: (1, 1, 0),
        StreamState.HELD: (1, 1, 1),
        StreamState.BOTH_HELD: (1, 1, 1),
        StreamState.CLOSING: (1, 1, 0),
        StreamState.CLOSING_HELD: (1, 1, 1),
        StreamState.ENDED: (0, 0, 0),
    }
    for state, counts in expected.items():
        bridge = staged(state).bridge
        assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == counts


# -- a device that may no longer stream ---------------------------------------------------------


def test_revoking_a_device_ends_its_streams_in_every_state() -> None:
    bridge = Bridge(secret=SECRET)
    # s1 waiting, s2 half (device on 1), s3 paired (2, 3), s4 held (service 5 attached),
    # s5 of another device, paired (6, 7).
    tokens = {sid: create(bridge, sid, mode=V1) for sid in ("s1", "s2", "s3", "s4")}
    join(bridge, tokens["s2"][Role.DEVICE], role=Role.DEVICE, conn=1, stream_id="s2")
    join(bridge, tokens["s3"][Role.DEVICE], role=Role.DEVICE, conn=2, stream_id="s3")
    join(bridge, tokens["s3"][Role.SERVICE], role=Role.SERVICE, conn=3, stream_id="s3")
    held = join(bridge, tokens["s4"][Role.DEVICE], role=Role.DEVICE, conn=4, stream_id="s4")
    join(bridge, tokens["s4"][Role.SERVICE], role=Role.SERVICE, conn=5, stream_id="s4")
    bridge.drop(stream_id="s4", connection_id=4, now=NOW + 1)
    other_device, other_service = bridge.create_stream(
        stream_id="s5",
        device_id="other",
        now=NOW,
        device_nonce=nonce(),
        service_nonce=nonce(),
        mode=V1,
    )
    join(bridge, other_device, role=Role.DEVICE, conn=6, stream_id="s5")
    join(bridge, other_service, role=Role.SERVICE, conn=7, stream_id="s5")

    events = bridge.revoke_device(device_id="dev", code=ErrorCode.DEVICE_DISABLED, now=NOW + 2)
    assert events == [
        StreamRevoked(
            stream_id="s1", device_id="dev", connection_ids=(), code=ErrorCode.DEVICE_DISABLED
        ),
        StreamRevoked(
            stream_id="s2", device_id="dev", connection_ids=(1,), code=ErrorCode.DEVICE_DISABLED
        ),
        StreamRevoked(
            stream_id="s3", device_id="dev", connection_ids=(2, 3), code=ErrorCode.DEVICE_DISABLED
        ),
        StreamRevoked(
            stream_id="s4", device_id="dev", connection_ids=(5,), code=ErrorCode.DEVICE_DISABLED
        ),
    ]
    for sid in ("s1", "s2", "s3", "s4"):
        assert bridge.stream_state(sid) is StreamState.ENDED
    assert bridge.stream_state("s5") is StreamState.PAIRED
    assert (bridge.stream_count(), bridge.paired_count(), bridge.held_count()) == (1, 1, 0)
    # Nothing of them is left to join, resume or time out.
    with pytest.raises(DevstreamError) as info:
        join(bridge, tokens["s1"][Role.SERVICE], role=Role.SERVICE, conn=8, stream_id="s1")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert held.resume_token is not None
    with pytest.raises(DevstreamError) as info:
        resume(bridge, held.resume_token, role=Role.DEVICE, conn=9, stream_id="s4")
    assert info.value.code is ErrorCode.NOT_FOUND
    assert bridge.next_deadline() is None
    assert bridge.advance(NOW + 10_000) == []
    assert bridge.revoke_device(device_id="dev", code=ErrorCode.DEVICE_NOT_FOUND, now=NOW + 2) == []


# -- a join whose 101 was lost: the stream token again ------------------------------------------


def rejoin(
    bridge: Bridge, token: str, *, role: Role | None, conn: int, now: float = NOW + 2
) -> Resumed:
    return bridge.rejoin(
        stream_id="s1",
        token=token,
        role=role,
        connection_id=conn,
        now=now,
        resume_nonce=nonce(),
    )


def rejoin_refused(bridge: Bridge, token: str, role: Role, *, now: float = NOW + 2) -> ErrorCode:
    with pytest.raises(DevstreamError) as info:
        rejoin(bridge, token, role=role, conn=50, now=now)
    return info.value.code


@pytest.mark.parametrize("side", list(Role))
def test_a_side_whose_join_answer_was_lost_joins_again_with_its_stream_token(side: Role) -> None:
    """Until a message comes on the connection its join opened, the side may present its
    stream token again: its connection is replaced, with a fresh resume token; the one the
    lost 101 carried is spent."""
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1")
    conns = {side: 1, side.other: 2}
    lost = join(bridge, tokens[side], role=side, conn=1)
    join(bridge, tokens[side.other], role=side.other, conn=2)
    assert lost.resume_token is not None
    again = rejoin(bridge, tokens[side], role=side, conn=3)
    assert again.replaced_connection_id == conns[side]
    assert again.peer_connection_id == conns[side.other]
    assert again.resume_token != lost.resume_token
    assert bridge.stream_state("s1") is StreamState.PAIRED
    # The lost 101's resume token is spent; the fresh one works.
    with pytest.raises(DevstreamError) as info:
        bridge.resume(
            stream_id="s1",
            token=lost.resume_token,
            role=side,
            connection_id=4,
            now=NOW + 3,
            resume_nonce=nonce(),
        )
    assert info.value.code is ErrorCode.STREAM_TOKEN_REUSED
    # Once a message came on the new connection, the stream token is spent for good.
    bridge.confirm(stream_id="s1", connection_id=3, now=NOW + 3)
    assert rejoin_refused(bridge, tokens[side], side) is ErrorCode.STREAM_TOKEN_REUSED
    assert refused(bridge, tokens[side], role=side) is ErrorCode.STREAM_TOKEN_REUSED


def test_a_held_side_whose_join_answer_was_lost_comes_back_with_its_stream_token() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1")
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=1)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=2)
    [held] = bridge.drop(stream_id="s1", connection_id=2, now=NOW + 1.5)
    assert isinstance(held, SideHeld)
    back = rejoin(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=3)
    assert back.replaced_connection_id is None and back.peer_connection_id == 1
    assert bridge.stream_state("s1") is StreamState.PAIRED


def test_the_stream_token_is_spent_once_the_side_resumed() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1")
    first = join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1)
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2)
    assert first.resume_token is not None
    bridge.resume(
        stream_id="s1",
        token=first.resume_token,
        role=Role.DEVICE,
        connection_id=3,
        now=NOW + 2,
        resume_nonce=nonce(),
    )
    # It had its resume token: the answer to its join came.
    assert rejoin_refused(bridge, tokens[Role.DEVICE], Role.DEVICE) is (
        ErrorCode.STREAM_TOKEN_REUSED
    )


def test_a_raw_streams_token_is_never_taken_twice() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1)
    assert rejoin_refused(bridge, tokens[Role.DEVICE], Role.DEVICE) is (
        ErrorCode.STREAM_TOKEN_REUSED
    )
    # Nor a token never presented, nor one of a stream that ended.
    assert rejoin_refused(bridge, tokens[Role.SERVICE], Role.SERVICE) is (
        ErrorCode.STREAM_TOKEN_REUSED
    )


def test_a_rejoin_after_the_stream_ended_or_the_side_left_is_refused() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1")
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=1)
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=2)
    bridge.close(stream_id="s1", connection_id=1, now=NOW + 1.5, code=1000)
    # The device closed normally and left: it has nothing to come back for.
    assert rejoin_refused(bridge, tokens[Role.DEVICE], Role.DEVICE) is ErrorCode.NOT_FOUND
    bridge.leave(stream_id="s1", connection_id=2, now=NOW + 1.6)
    assert rejoin_refused(bridge, tokens[Role.SERVICE], Role.SERVICE) is (
        ErrorCode.STREAM_TOKEN_REUSED
    )


def test_a_rejoin_while_the_other_side_closes_gets_its_close_and_the_time_to_answer() -> None:
    bridge = Bridge(secret=SECRET)
    tokens = create(bridge, mode="devstream.v1")
    join(bridge, tokens[Role.SERVICE], role=Role.SERVICE, conn=1)
    join(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=2)
    bridge.close(stream_id="s1", connection_id=1, now=NOW + 1.5, code=1000, messages=[b"last acks"])
    assert bridge.stream_state("s1") is StreamState.CLOSING
    back = rejoin(bridge, tokens[Role.DEVICE], role=Role.DEVICE, conn=3, now=NOW + 2)
    assert back.replaced_connection_id == 2 and back.peer_connection_id is None
    assert back.farewell is not None and back.farewell.messages == (b"last acks",)
    # Its time to answer the close runs from the rejoin.
    assert bridge.next_deadline() == NOW + 2 + DEFAULT_CLOSE_TIMEOUT
