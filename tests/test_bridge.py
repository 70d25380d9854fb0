"""Tests for devstream_core.bridge: pairing the two sides of a stream.

Rules: no clock and no randomness; ``now`` is a literal and nonces are counter-derived. Every
pairing test runs with either side arriving first.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from devstream_core.bridge import (
    TRANSITIONS,
    Bridge,
    CloseLoneSide,
    ClosePeer,
    Joined,
    StreamExpired,
    StreamInput,
    StreamState,
)
from devstream_core.common import Role
from devstream_core.errors import (
    DevstreamError,
    ErrorCode,
    LocalProtocolError,
)
from devstream_core.tokens import verify_stream_token

SECRET = b"bridge-test-secret-0123456789abcdef"
NOW = 2000.0
EXPIRES = NOW + 60.0
_counter: Iterator[int] = itertools.count(1)


def nonce() -> bytes:
    return next(_counter).to_bytes(16, "big")


def create(
    bridge: Bridge, stream_id: str = "s1", *, now: float = NOW, mode: str = "raw"
) -> dict[Role, str]:
    device_token, service_token = bridge.create_stream(
        stream_id=stream_id,
        device_id="dev",
        now=now,
        device_nonce=nonce(),
        service_nonce=nonce(),
        mode=mode,
    )
    return {Role.DEVICE: device_token, Role.SERVICE: service_token}


def join(
    bridge: Bridge,
    token: str,
    *,
    role: Role | None,
    conn: int,
    stream_id: str = "s1",
    now: float = NOW + 1,
) -> Joined:
    return bridge.join(stream_id=stream_id, token=token, role=role, connection_id=conn, now=now)


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


@pytest.mark.parametrize(
    "kwargs",
    [
        {"secret": b""},
        {"secret": SECRET, "token_lifetime": 0.0},
        {"secret": SECRET, "token_lifetime": float("nan")},
        {"secret": SECRET, "max_streams": 0},
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
    assert one == Joined(
        stream_id="s1",
        role=first,
        device_id="dev",
        mode=mode,
        connection_id=10,
        paired=False,
        peer_connection_id=None,
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
    )
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
    assert bridge._used == {}
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
        assert len(bridge._expiries) <= 2 * bridge.stream_count() + 67
        # Used nonces are kept only for one token lifetime (600 streams at 10 per second).
        assert len(bridge._used) <= 2 * 601
    assert bridge.stream_count() == 0
    bridge.advance(now + 60)
    assert bridge._used == {}
