"""Stateful tests: the coordinator and the bridge driven together, as the hub drives them.

The machine below plays the hub's glue with a plain model beside the real objects: devices
connect, register, re-register, get replaced and disconnect; services (authorised or not, a
stand-in for the SAS check the hub does before ``initiate``) initiate streams to registered
names, unregistered names and offline devices; devices accept, reject or answer too late; the
clock jumps forward (0 to 120 s) with or without ``advance``; tokens are presented by their
rightful holders, reused, for the wrong role, for the wrong stream, forged or expired; sides
leave (a close) or drop (no close: a paired ``devstream.v1`` side is held for 30 s); sides
resume with their latest resume token, held or still attached, or lose the answer to a resume
and try again with the token they still hold (the hub may or may not have noticed the lost
connection drop); the first message on a side's connection confirms it; attackers replay
spent resume tokens, present them for the other role or stream, forge them, or swap join and
resume tokens. Every output is compared with what the model expects, and after every step:

* a stream only ever pairs (and re-pairs after a resume) the named device's side (holding the
  device token of that device's accepted request, then that side's resume tokens) with the
  service that initiated it, and that service was authorised;
* every stream token is accepted at most once, and never at or after its mint time + 60 s;
* a resume token is accepted while it is the latest for its role, and again (a retry after a
  lost answer) only while it is the one that opened its role's unconfirmed connection; never
  once it is spent (that connection confirmed, or a later token of the role presented); a
  retry after a lost answer succeeds until the new connection is confirmed, and then fails
  with ``STREAM_TOKEN_REUSED``; the bridge keeps at most one such earlier token per role;
* no pending request outlives its deadline once ``advance`` has passed it, and no held side
  outlives its grace deadline once ``advance`` has passed it;
* ``online_count``, ``pending_count``, ``stream_count``, ``paired_count``, ``held_count``,
  every stream's state and both ``next_deadline`` values match the model.

Rules: no clock and no randomness. Time moves in half seconds from 1000 s, so every deadline
is exact; nonces are counter-derived.
"""

from __future__ import annotations

import base64
import math
from collections import Counter
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from devstream_core.bridge import (
    Bridge,
    BridgeEvent,
    CloseLoneSide,
    ClosePeer,
    Joined,
    ResetPeer,
    Resumed,
    SideHeld,
    StreamExpired,
    StreamState,
)
from devstream_core.common import Role
from devstream_core.coordinator import (
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
from devstream_core.errors import DevstreamError, ErrorCode, StreamTokenError
from devstream_core.tokens import mint_resume_token, mint_stream_token, verify_resume_token

SECRET = b"stateful-hub-secret-0123456789ab"
LIFETIME = 60.0
GRACE = 30.0
V1 = "devstream.v1"
START = 1000.0
MAX_PENDING = 3
#: Service -> whether it holds a valid credential with the service_connect permission.
SERVICES = {"svc-ok": True, "svc-denied": False, "svc-ok-2": True}
DEVICES = ["dev-0", "dev-1", "dev-2"]

# Clock jumps of 0 to 120 s, in half seconds; small ones often, so streams get a chance to pair.
half_seconds = st.one_of(
    st.integers(min_value=0, max_value=10), st.integers(min_value=0, max_value=240)
).map(lambda n: n / 2)
timeouts = st.integers(min_value=1, max_value=180).map(lambda n: n / 2)
registered_names = st.lists(st.sampled_from(["ssh", "echo", "*"]), max_size=3, unique=True)
asked_names = st.sampled_from(["ssh", "echo", "ftp"])

Holder = tuple[str, str]
ATTACKER: Holder = ("attacker", "")


@dataclass
class ModelRequest:
    request_id: str
    stream_id: str
    device_id: str
    name: str
    connection_id: int
    deadline: float


@dataclass
class ModelStream:
    stream_id: str
    device_id: str
    service: str
    mode: str
    minted: float
    tokens: dict[Role, str]
    accepted: bool = False
    #: A :class:`StreamState` value: "waiting", "half", "paired", "held", "both_held", "ended".
    state: str = "waiting"
    #: Attached sides.
    sides: dict[Role, int] = field(default_factory=dict)
    #: Held sides and their grace deadlines.
    held: dict[Role, float] = field(default_factory=dict)
    #: Every resume token issued per role, the latest last.
    resume_tokens: dict[Role, list[str]] = field(default_factory=dict)
    #: Per role whose connection is unconfirmed: the token that opened it, and that connection.
    previous: dict[Role, tuple[str, int]] = field(default_factory=dict)
    was_paired: bool = False

    def holder(self, role: Role) -> Holder:
        """Who rightfully holds side ``role``'s credentials."""
        return ("device", self.device_id) if role is Role.DEVICE else ("service", self.service)

    def attached(self, conn: int) -> bool:
        return self.state != "ended" and conn in self.sides.values()

    def resettle(self) -> None:
        """The state after a drop or resume, from who is attached and who is held."""
        if self.state != "half":
            self.state = ("paired", "held", "both_held")[len(self.held)]


@dataclass(frozen=True)
class ModelToken:
    stream_id: str
    role: Role
    minted: float
    holder: Holder
    forged: bool = False


@dataclass(frozen=True)
class ModelResume:
    stream_id: str
    role: Role
    forged: bool = False


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class HubMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.coordinator = Coordinator(max_pending_per_device=MAX_PENDING)
        self.bridge = Bridge(secret=SECRET, token_lifetime=LIFETIME, grace_period=GRACE)
        self.now = START
        self.advanced_to = START
        self.counter = 0
        self.next_request = 1
        # Coordinator model.
        self.conn_device: dict[int, str] = {}
        self.online: dict[str, int] = {}
        self.names: dict[str, frozenset[str]] = {}
        self.dead_conns: list[int] = []
        #: Replaced connections still open for the requests pending on them.
        self.replaced: set[int] = set()
        #: When each open connection's credential expires (connections opened with one).
        self.expiry: dict[int, float] = {}
        self.pending: dict[str, ModelRequest] = {}
        self.answered: list[ModelRequest] = []
        # Bridge model.
        self.streams: dict[str, ModelStream] = {}
        self.tokens: dict[str, ModelToken] = {}
        self.used: set[str] = set()
        self.accepted_joins: list[tuple[str, float]] = []
        self.conn_holder: dict[int, Holder] = {}
        #: Every connection that ever was a side, and its stream.
        self.conn_stream: dict[int, str] = {}
        self.resumes: dict[str, ModelResume] = {}
        #: Every accepted resume: the token, whether it was its role's latest then, and
        #: whether it was spent already (never, if the bridge is right).
        self.accepted_resumes: list[tuple[str, bool, bool]] = []
        #: Resume tokens that must never work again.
        self.spent_resumes: set[str] = set()

    # -- helpers -----------------------------------------------------------------------------

    def fresh(self) -> int:
        self.counter += 1
        return self.counter

    def fresh_bytes(self) -> bytes:
        return self.fresh().to_bytes(16, "big")

    def failed(self, request: ModelRequest, code: ErrorCode) -> InitiationFailed:
        return InitiationFailed(
            request_id=request.request_id,
            stream_id=request.stream_id,
            device_id=request.device_id,
            name=request.name,
            code=code,
        )

    def drop_connection(self, conn: int) -> list[CoordinatorEvent]:
        self.expiry.pop(conn, None)
        self.replaced.discard(conn)
        device = self.conn_device.pop(conn)
        if self.online.get(device) == conn:
            del self.online[device]
            del self.names[device]
        self.dead_conns.append(conn)
        gone = sorted(
            (r for r in self.pending.values() if r.connection_id == conn),
            key=lambda r: int(r.request_id),
        )
        for request in gone:
            del self.pending[request.request_id]
            self.answered.append(request)
        return [self.failed(r, ErrorCode.DEVICE_NOT_ONLINE) for r in gone]

    # -- devices -----------------------------------------------------------------------------

    @initialize(names=registered_names, timeout=timeouts)
    def first_device_online_and_asked(self, names: list[str], timeout: float) -> None:
        self.connect_and_register("dev-0", ["ssh", *names])
        self.hub_initiate("svc-ok", "dev-0", "ssh", timeout, "raw")

    @rule(
        device=st.sampled_from(DEVICES),
        names=registered_names,
        lifetime=st.none() | st.sampled_from([0.5, 5.0, 30.0, 90.0]),
    )
    def connect_and_register(
        self, device: str, names: list[str], lifetime: float | None = None
    ) -> None:
        conn = self.fresh()
        if lifetime is not None:
            # Opened with a SAS token that expires after lifetime seconds.
            assert (
                self.coordinator.channel_opened(
                    device_id=device,
                    connection_id=conn,
                    expires_at=self.now + lifetime,
                    now=self.now,
                )
                == []
            )
            self.expiry[conn] = self.now + lifetime
        events = self.coordinator.device_registered(
            device_id=device, connection_id=conn, names=names, now=self.now
        )
        self.conn_device[conn] = device
        assert events == self.take_over(device, conn)
        self.names[device] = frozenset(names)

    def take_over(self, device: str, conn: int) -> list[CoordinatorEvent]:
        """Connection ``conn`` becomes ``device``'s; the old one stays open while requests
        are pending on it, else it is closed at once."""
        old = self.online.get(device)
        self.online[device] = conn
        self.replaced.discard(conn)
        if old is None:
            return []
        self.replaced.add(old)
        event(f"device replaced, {len(self.pending_on(old))} requests pending on it")
        return self.close_if_drained(old)

    def pending_on(self, conn: int) -> list[ModelRequest]:
        return [r for r in self.pending.values() if r.connection_id == conn]

    def close_if_drained(self, conn: int) -> list[CoordinatorEvent]:
        if conn not in self.replaced or self.pending_on(conn):
            return []
        device = self.conn_device[conn]
        self.drop_connection(conn)
        return [DeviceReplaced(device_id=device, connection_id=conn)]

    @precondition(lambda self: self.conn_device)
    @rule(data=st.data(), names=registered_names)
    def reregister(self, data: st.DataObject, names: list[str]) -> None:
        conn = data.draw(st.sampled_from(sorted(self.conn_device)))
        device = self.conn_device[conn]
        events = self.coordinator.device_registered(
            device_id=device, connection_id=conn, names=names, now=self.now
        )
        if conn in self.replaced:
            # A replaced connection still open takes its device back.
            event("replaced connection registered again")
            assert events == self.take_over(device, conn)
        else:
            assert events == []
        self.names[device] = frozenset(names)

    @rule(data=st.data(), registered=st.booleans())
    def disconnect(self, data: st.DataObject, registered: bool) -> None:
        if registered and self.conn_device:
            conn = data.draw(st.sampled_from(sorted(self.conn_device)))
            expected = self.drop_connection(conn)
        else:
            # A replaced or closed control channel, or one that never registered.
            conn = data.draw(st.sampled_from([*self.dead_conns, self.fresh()]))
            expected = []
        assert self.coordinator.device_disconnected(connection_id=conn, now=self.now) == expected

    # -- services ----------------------------------------------------------------------------

    @rule(
        data=st.data(),
        service=st.sampled_from(sorted(SERVICES)),
        timeout=timeouts,
        mode=st.sampled_from(["raw", "devstream.v1"]),
    )
    def initiate(self, data: st.DataObject, service: str, timeout: float, mode: str) -> None:
        # Often an online device and a name it registered; sometimes anything at all.
        device = data.draw(
            st.one_of(st.sampled_from(sorted(self.online) or DEVICES), st.sampled_from(DEVICES))
        )
        known = sorted(self.names.get(device, frozenset()) - {"*"})
        name = data.draw(st.one_of(st.sampled_from(known or ["ssh"]), asked_names))
        self.hub_initiate(service, device, name, timeout, mode)

    def hub_initiate(self, service: str, device: str, name: str, timeout: float, mode: str) -> None:
        """What the hub does for a service's initiate request."""
        if not SERVICES[service]:
            # The hub's SAS check refuses it (401) before the coordinator hears of it.
            return
        raw = self.fresh_bytes()
        stream_id = b64(raw)
        request_id = str(self.next_request)
        self.next_request += 1
        events = self.coordinator.initiate(
            device_id=device,
            name=name,
            now=self.now,
            response_timeout=timeout,
            stream_nonce=raw,
        )
        conn = self.online.get(device)
        if conn is not None and self.now >= self.expiry.get(conn, math.inf):
            conn = None  # its credential expired: not online, whether advanced or not
        common = {"request_id": request_id, "stream_id": stream_id, "device_id": device}
        if conn is None:
            assert events == [
                InitiationFailed(**common, name=name, code=ErrorCode.DEVICE_NOT_ONLINE)
            ]
            return
        names = self.names[device]
        if name not in names and "*" not in names:
            code = ErrorCode.STREAM_NAME_NOT_REGISTERED
            assert events == [
                InitiationRejected(**common, name=name, code=code, reason=code.message)
            ]
            return
        if sum(r.device_id == device for r in self.pending.values()) >= MAX_PENDING:
            (event,) = events
            assert isinstance(event, InitiationFailed)
            assert event == InitiationFailed(
                **common, name=name, code=ErrorCode.THROTTLED, message=event.message
            )
            # The message names the device and the limit it reached.
            assert f"device {device!r} has {MAX_PENDING} stream requests waiting" in event.message
            return
        deadline = self.now + timeout
        assert events == [
            SendStreamRequest(**common, connection_id=conn, name=name, deadline=deadline)
        ]
        self.pending[request_id] = ModelRequest(
            request_id=request_id,
            stream_id=stream_id,
            device_id=device,
            name=name,
            connection_id=conn,
            deadline=deadline,
        )
        # The hub creates the stream and puts the device token in the stream request.
        device_token, service_token = self.bridge.create_stream(
            stream_id=stream_id,
            device_id=device,
            now=self.now,
            device_nonce=self.fresh_bytes(),
            service_nonce=self.fresh_bytes(),
            mode=mode,
        )
        self.streams[stream_id] = ModelStream(
            stream_id=stream_id,
            device_id=device,
            service=service,
            mode=mode,
            minted=self.now,
            tokens={Role.DEVICE: device_token, Role.SERVICE: service_token},
        )
        self.tokens[device_token] = ModelToken(
            stream_id=stream_id, role=Role.DEVICE, minted=self.now, holder=("device", device)
        )

    @precondition(lambda self: self.pending or self.answered)
    @rule(
        data=st.data(),
        answer=st.sampled_from(["accept", "accept", "reject", "stray"]),
        reason=st.sampled_from(["", "busy"]),
    )
    def respond(self, data: st.DataObject, answer: str, reason: str) -> None:
        if answer == "stray" or not self.pending:
            self.respond_stray(data)
            return
        request = self.pending[data.draw(st.sampled_from(sorted(self.pending)))]
        self.answer(request, answer == "accept", reason)

    def answer(self, request: ModelRequest, accepted: bool, reason: str) -> None:
        """The device answers ``request`` on its control channel."""
        events = self.coordinator.device_responded(
            connection_id=request.connection_id,
            request_id=request.request_id,
            accepted=accepted,
            reason=reason,
            now=self.now,
        )
        if self.now >= request.deadline:
            # Too late: ignored; the timeout comes from advance.
            assert events == []
            return
        del self.pending[request.request_id]
        self.answered.append(request)
        common = {
            "request_id": request.request_id,
            "stream_id": request.stream_id,
            "device_id": request.device_id,
            "name": request.name,
        }
        drained = self.close_if_drained(request.connection_id)
        if drained:
            event("replaced connection answered its last request")
        if not accepted:
            code = ErrorCode.STREAM_REJECTED
            assert events == [InitiationRejected(**common, code=code, reason=reason), *drained]
            return
        assert events == [InitiationAccepted(**common), *drained]
        # The hub answers the initiating service with the service token.
        stream = self.streams[request.stream_id]
        stream.accepted = True
        self.tokens[stream.tokens[Role.SERVICE]] = ModelToken(
            stream_id=stream.stream_id,
            role=Role.SERVICE,
            minted=stream.minted,
            holder=("service", stream.service),
        )

    @precondition(lambda self: any(names - {"*"} for names in self.names.values()))
    @rule(data=st.data(), service=st.sampled_from(["svc-ok", "svc-ok-2"]), timeout=timeouts)
    def quick_v1_stream(self, data: st.DataObject, service: str, timeout: float) -> None:
        """The common path in one step: initiate, accept, both sides join (devstream.v1)."""
        device = data.draw(st.sampled_from(sorted(d for d, n in self.names.items() if n - {"*"})))
        name = data.draw(st.sampled_from(sorted(self.names[device] - {"*"})))
        before = set(self.pending)
        self.hub_initiate(service, device, name, timeout, V1)
        (request_id,) = set(self.pending) - before or {None}
        if request_id is None:
            return  # throttled
        self.answer(self.pending[request_id], True, "")
        stream = self.streams[self.pending_or_answered(request_id).stream_id]
        for role in data.draw(st.permutations(list(Role))):
            self.try_join(stream.stream_id, stream.tokens[role], role, stream.holder(role))

    def pending_or_answered(self, request_id: str) -> ModelRequest:
        return next(r for r in self.answered if r.request_id == request_id)

    def respond_stray(self, data: st.DataObject) -> None:
        """An answer to a request already settled, or from the wrong connection: ignored."""
        choices = [("late", r) for r in self.answered] + [
            ("wrong-connection", r) for r in self.pending.values()
        ]
        kind, request = data.draw(st.sampled_from(choices))
        conn = request.connection_id
        if kind == "wrong-connection":
            others = [c for c in [*self.conn_device, *self.dead_conns] if c != conn]
            conn = data.draw(st.sampled_from([*others, self.fresh()]))
        before = self.coordinator.pending_count()
        events = self.coordinator.device_responded(
            connection_id=conn,
            request_id=request.request_id,
            accepted=data.draw(st.booleans()),
            reason="",
            now=self.now,
        )
        assert events == []
        assert self.coordinator.pending_count() == before

    # -- time --------------------------------------------------------------------------------

    @rule(data=st.data(), wake=st.sampled_from([True, True, False]))
    def clock(self, data: st.DataObject, wake: bool) -> None:
        # A random jump, or one that lands exactly on a response deadline or a token expiry.
        boundaries = sorted(
            {r.deadline - self.now for r in self.pending.values()}
            | {s.minted + LIFETIME - self.now for s in self.streams.values()}
            | {d - self.now for s in self.streams.values() for d in s.held.values()}
            | {e - self.now for e in self.expiry.values()}
        )
        exact = [jump for jump in boundaries if 0 <= jump <= 120]
        jump = data.draw(st.one_of(half_seconds, st.sampled_from(exact)) if exact else half_seconds)
        self.now += jump
        if wake:
            # Otherwise time passed but the adapter has not woken up yet.
            self.advance()

    def advance(self) -> None:
        now = self.now
        expected: list[CoordinatorEvent] = []
        for _, conn in sorted((e, c) for c, e in self.expiry.items() if e <= now):
            expected.append(
                CredentialsExpired(device_id=self.conn_device[conn], connection_id=conn)
            )
            expected.extend(self.drop_connection(conn))
        due = sorted(
            (r for r in self.pending.values() if r.deadline <= now),
            key=lambda r: (r.deadline, int(r.request_id)),
        )
        events = self.coordinator.advance(now)
        for request in due:
            expected.append(self.failed(request, ErrorCode.DEVICE_RESPONSE_TIMEOUT))
            expected.append(
                ForgetRequest(connection_id=request.connection_id, request_id=request.request_id)
            )
            del self.pending[request.request_id]
            self.answered.append(request)
            expected.extend(self.close_if_drained(request.connection_id))
        assert events == expected
        self.advanced_to = now

        bridge_events = self.bridge.advance(now)
        expected_bridge: list[BridgeEvent] = []
        for stream in self.streams.values():
            if stream.state in ("held", "both_held") and min(stream.held.values()) <= now:
                if stream.sides:
                    ((_, conn),) = stream.sides.items()
                    expected_bridge.append(
                        ResetPeer(
                            stream_id=stream.stream_id,
                            connection_id=conn,
                            code=ErrorCode.PEER_LOST,
                        )
                    )
                else:
                    expected_bridge.append(StreamExpired(stream_id=stream.stream_id))
                stream.state = "ended"
            if stream.state in ("waiting", "half") and stream.minted + LIFETIME <= now:
                if stream.state == "waiting":
                    expected_bridge.append(StreamExpired(stream_id=stream.stream_id))
                else:
                    ((role, conn),) = stream.sides.items()
                    expected_bridge.append(
                        CloseLoneSide(
                            stream_id=stream.stream_id,
                            connection_id=conn,
                            role=role,
                            code=ErrorCode.PEER_NEVER_CONNECTED,
                        )
                    )
                stream.state = "ended"
        assert Counter(bridge_events) == Counter(expected_bridge)
        for item in bridge_events:
            event(f"bridge: {type(item).__name__}")
        if due:
            event("request timed out")

    # -- the streaming endpoint --------------------------------------------------------------

    def expected_join(self, stream_id: str, token: str, role: Role | None) -> ErrorCode | None:
        claims = self.tokens[token]
        if claims.forged:
            return ErrorCode.STREAM_TOKEN_INVALID
        if claims.stream_id != stream_id:
            return ErrorCode.STREAM_TOKEN_WRONG_STREAM
        if role is not None and role is not claims.role:
            return ErrorCode.STREAM_TOKEN_WRONG_ROLE
        if self.now >= claims.minted + LIFETIME:
            return ErrorCode.STREAM_TOKEN_EXPIRED
        if token in self.used:
            return ErrorCode.STREAM_TOKEN_REUSED
        if self.streams[stream_id].state == "ended":
            return ErrorCode.NOT_FOUND
        return None

    def try_join(self, stream_id: str, token: str, role: Role | None, holder: Holder) -> None:
        conn = self.fresh()
        expected = self.expected_join(stream_id, token, role)
        event(f"join: {expected.name if expected else 'accepted'}")
        try:
            joined = self.bridge.join(
                stream_id=stream_id,
                token=token,
                role=role,
                connection_id=conn,
                now=self.now,
                resume_nonce=self.fresh_bytes(),
            )
        except DevstreamError as error:
            assert error.code is expected, (error.code, expected)
            if expected is not ErrorCode.NOT_FOUND:
                assert isinstance(error, StreamTokenError)
            assert token not in str(error)
            return
        assert expected is None, f"join accepted, expected {expected!r}"
        claims = self.tokens[token]
        stream = self.streams[stream_id]
        peer = stream.sides.get(claims.role.other)
        assert joined == Joined(
            stream_id=stream_id,
            role=claims.role,
            device_id=stream.device_id,
            mode=stream.mode,
            connection_id=conn,
            paired=peer is not None,
            peer_connection_id=peer,
            resume_token=joined.resume_token,
        )
        if stream.mode == V1:
            assert joined.resume_token is not None
            self.issued_resume(stream, claims.role, joined.resume_token)
        else:
            assert joined.resume_token is None
        self.used.add(token)
        self.accepted_joins.append((token, self.now))
        self.conn_holder[conn] = holder
        self.conn_stream[conn] = stream_id
        stream.sides[claims.role] = conn
        stream.state = "paired" if peer is not None else "half"
        stream.was_paired = stream.was_paired or peer is not None
        if peer is not None:
            event("stream paired")

    @precondition(lambda self: any(not claims.forged for claims in self.tokens.values()))
    @rule(data=st.data())
    def join_by_rightful_holder(self, data: st.DataObject) -> None:
        genuine = sorted(token for token, claims in self.tokens.items() if not claims.forged)
        # Mostly a token not used yet; sometimes the holder tries again.
        unused = [token for token in genuine if token not in self.used]
        # Often the token whose peer is already in, so that streams get to pair.
        awaited = [t for t in unused if self.streams[self.tokens[t].stream_id].state == "half"]
        choices = st.sampled_from(unused or genuine)
        if awaited:
            choices = st.one_of(st.sampled_from(awaited), choices)
        token = data.draw(choices)
        claims = self.tokens[token]
        role = data.draw(st.sampled_from([claims.role, None]))
        self.try_join(claims.stream_id, token, role, claims.holder)

    @precondition(lambda self: self.streams)
    @rule(data=st.data(), kind=st.sampled_from(["reuse", "other-role", "other-stream", "forged"]))
    def join_by_attacker(self, data: st.DataObject, kind: str) -> None:
        if kind == "reuse" and self.used:
            token = data.draw(st.sampled_from(sorted(self.used)))
            claims = self.tokens[token]
            self.try_join(claims.stream_id, token, claims.role, ATTACKER)
        elif kind == "other-stream" and len(self.streams) >= 2:
            token = data.draw(st.sampled_from(sorted(self.tokens)))
            claims = self.tokens[token]
            target = data.draw(st.sampled_from(sorted(set(self.streams) - {claims.stream_id})))
            role = data.draw(st.sampled_from([claims.role, None]))
            self.try_join(target, token, role, ATTACKER)
        elif kind == "forged":
            stream_id = data.draw(st.sampled_from(sorted(self.streams)))
            role = data.draw(st.sampled_from(list(Role)))
            token = mint_stream_token(
                secret=b"a guessed secret",
                stream_id=stream_id,
                role=role,
                now=self.now,
                nonce=self.fresh_bytes(),
            )
            self.tokens[token] = ModelToken(
                stream_id=stream_id, role=role, minted=self.now, holder=ATTACKER, forged=True
            )
            self.try_join(stream_id, token, role, ATTACKER)
        else:
            # The other side's token, presented for this side.
            token = data.draw(st.sampled_from(sorted(self.tokens)))
            claims = self.tokens[token]
            self.try_join(claims.stream_id, token, claims.role.other, ATTACKER)

    def issued_resume(self, stream: ModelStream, role: Role, token: str) -> None:
        claims = verify_resume_token(
            token, secret=SECRET, stream_id=stream.stream_id, role=role, now=self.now
        )
        assert claims.role is role
        assert token not in self.resumes
        stream.resume_tokens.setdefault(role, []).append(token)
        self.resumes[token] = ModelResume(stream_id=stream.stream_id, role=role)

    def expect_leave(self, stream: ModelStream, conn: int) -> list[BridgeEvent]:
        """What a close of ``conn`` gives, and the model after it."""
        if not stream.attached(conn):
            return []
        expected: list[BridgeEvent] = []
        if stream.state == "paired":
            (peer,) = (c for c in stream.sides.values() if c != conn)
            expected.append(ClosePeer(stream_id=stream.stream_id, connection_id=peer))
            event("paired side left")
        stream.state = "ended"
        return expected

    def draw_side(self, data: st.DataObject) -> int:
        # Often a side attached to a paired devstream.v1 stream, so that drops hold something.
        live = sorted(
            conn
            for conn, stream_id in self.conn_stream.items()
            if self.streams[stream_id].mode == V1
            and self.streams[stream_id].state in ("paired", "held")
            and self.streams[stream_id].attached(conn)
        )
        choices = st.sampled_from(sorted(self.conn_stream))
        return data.draw(st.one_of(st.sampled_from(live), choices) if live else choices)

    @precondition(lambda self: self.conn_stream)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        conn = self.draw_side(data)
        stream = self.streams[self.conn_stream[conn]]
        expected = self.expect_leave(stream, conn)
        assert self.bridge.leave(stream_id=stream.stream_id, connection_id=conn, now=self.now) == (
            expected
        )

    @precondition(lambda self: self.conn_stream)
    @rule(data=st.data())
    def drop(self, data: st.DataObject) -> None:
        self.drop_side(self.draw_side(data))

    def drop_side(self, conn: int) -> None:
        """The hub notices that side connection ``conn`` ended without a close."""
        stream = self.streams[self.conn_stream[conn]]
        events = self.bridge.drop(stream_id=stream.stream_id, connection_id=conn, now=self.now)
        if stream.mode == V1 and stream.state in ("paired", "held") and stream.attached(conn):
            (role,) = (r for r, c in stream.sides.items() if c == conn)
            deadline = self.now + GRACE
            assert events == [
                SideHeld(
                    stream_id=stream.stream_id, role=role, connection_id=conn, deadline=deadline
                )
            ]
            del stream.sides[role]
            stream.held[role] = deadline
            stream.resettle()
            event(f"side held, stream {stream.state}")
        else:
            assert events == self.expect_leave(stream, conn)

    # -- resume ------------------------------------------------------------------------------

    def expected_resume(self, stream_id: str, token: str, role: Role | None) -> ErrorCode | None:
        claims = self.resumes[token]
        if claims.forged:
            return ErrorCode.STREAM_TOKEN_INVALID
        if claims.stream_id != stream_id:
            return ErrorCode.STREAM_TOKEN_WRONG_STREAM
        if role is not None and role is not claims.role:
            return ErrorCode.STREAM_TOKEN_WRONG_ROLE
        stream = self.streams[stream_id]
        if stream.state == "ended" or any(d <= self.now for d in stream.held.values()):
            return ErrorCode.NOT_FOUND
        previous = stream.previous.get(claims.role)
        if token != stream.resume_tokens[claims.role][-1] and (
            previous is None or token != previous[0]
        ):
            return ErrorCode.STREAM_TOKEN_REUSED
        return None

    def try_resume(
        self, stream_id: str, token: str, role: Role | None, holder: Holder
    ) -> int | ErrorCode:
        """Present resume ``token``; the new connection, or the code it was refused with."""
        conn = self.fresh()
        expected = self.expected_resume(stream_id, token, role)
        event(f"resume: {expected.name if expected else 'accepted'}")
        try:
            resumed = self.bridge.resume(
                stream_id=stream_id,
                token=token,
                role=role,
                connection_id=conn,
                now=self.now,
                resume_nonce=self.fresh_bytes(),
            )
        except DevstreamError as error:
            assert error.code is expected, (error.code, expected)
            if expected is not ErrorCode.NOT_FOUND:
                assert isinstance(error, StreamTokenError)
            assert token not in str(error)
            return error.code
        assert expected is None, f"resume accepted, expected {expected!r}"
        stream = self.streams[stream_id]
        claims = self.resumes[token]
        replaced = stream.sides.get(claims.role)
        event("resume replaced an attached side" if replaced else "held side resumed")
        stream.sides[claims.role] = conn
        stream.held.pop(claims.role, None)
        stream.resettle()
        assert resumed == Resumed(
            stream_id=stream_id,
            role=claims.role,
            connection_id=conn,
            peer_connection_id=stream.sides.get(claims.role.other),
            replaced_connection_id=replaced,
            resume_token=resumed.resume_token,
        )
        latest = stream.resume_tokens[claims.role][-1]
        self.accepted_resumes.append((token, token == latest, token in self.spent_resumes))
        previous = stream.previous.get(claims.role)
        if token == latest:
            # The side read the last answer: the token before it is spent.
            if previous is not None:
                self.spent_resumes.add(previous[0])
        else:
            # A retry after a lost answer: the token of that answer is spent.
            event("resume retried with the previous token")
            self.spent_resumes.add(latest)
        stream.previous[claims.role] = (token, conn)
        self.issued_resume(stream, claims.role, resumed.resume_token)
        self.conn_holder[conn] = holder
        self.conn_stream[conn] = stream_id
        return conn

    def confirm_side(self, conn: int) -> None:
        """The first message arrives on side connection ``conn``."""
        stream = self.streams[self.conn_stream[conn]]
        self.bridge.confirm(stream_id=stream.stream_id, connection_id=conn, now=self.now)
        for role, (token, opened) in list(stream.previous.items()):
            if opened == conn and stream.sides.get(role) == conn and stream.state != "ended":
                event("connection confirmed")
                self.spent_resumes.add(token)
                del stream.previous[role]

    @precondition(lambda self: self.conn_stream)
    @rule(data=st.data())
    def confirm(self, data: st.DataObject) -> None:
        # Often a connection that is still unconfirmed.
        unconfirmed = sorted(
            conn for stream in self.streams.values() for _, conn in stream.previous.values()
        )
        choices = st.sampled_from(sorted(self.conn_stream))
        conn = data.draw(
            st.one_of(st.sampled_from(unconfirmed), choices) if unconfirmed else choices
        )
        self.confirm_side(conn)

    @precondition(lambda self: any(stream.resume_tokens for stream in self.streams.values()))
    @rule(data=st.data(), notice_drop=st.booleans(), confirm_after=st.booleans())
    def resume_whose_answer_is_lost(
        self, data: st.DataObject, notice_drop: bool, confirm_after: bool
    ) -> None:
        """A side resumes, the answer with its fresh token is lost, and it tries again."""
        sides = sorted(
            (
                (stream.stream_id, role)
                for stream in self.streams.values()
                for role in stream.resume_tokens
                if self.expected_resume(stream.stream_id, stream.resume_tokens[role][-1], role)
                is None
            ),
            key=lambda side: (side[0], side[1].value),
        )
        if not sides:
            return
        stream_id, role = data.draw(st.sampled_from(sides))
        stream = self.streams[stream_id]
        token = stream.resume_tokens[role][-1]
        lost = self.try_resume(stream_id, token, role, stream.holder(role))
        assert isinstance(lost, int)
        if notice_drop:
            # The hub sees the lost connection drop (held, or the end of an unpaired stream).
            self.drop_side(lost)
        retry = self.try_resume(stream_id, token, role, stream.holder(role))
        if stream.state == "ended":
            assert retry is ErrorCode.NOT_FOUND
            return
        assert isinstance(retry, int), "a retry after a lost answer must be accepted"
        event("lost answer retried")
        if confirm_after:
            self.confirm_side(retry)
            again = self.try_resume(stream_id, token, role, stream.holder(role))
            assert again is ErrorCode.STREAM_TOKEN_REUSED

    @precondition(lambda self: any(not claims.forged for claims in self.resumes.values()))
    @rule(data=st.data())
    def resume_by_rightful_holder(self, data: st.DataObject) -> None:
        latest = sorted(
            (
                (stream.stream_id, role)
                for stream in self.streams.values()
                for role in stream.resume_tokens
            ),
            key=lambda side: (side[0], side[1].value),
        )
        # Often a side that is held, so that streams get to pair again.
        waiting = [(sid, role) for sid, role in latest if role in self.streams[sid].held]
        choices = st.sampled_from(latest)
        stream_id, role = data.draw(
            st.one_of(st.sampled_from(waiting), choices) if waiting else choices
        )
        stream = self.streams[stream_id]
        # Mostly the latest; sometimes the side retries with the one before (which works only
        # while the connection it opened is unconfirmed).
        token = data.draw(st.sampled_from(stream.resume_tokens[role][-1:-3:-1]))
        expected_role = data.draw(st.sampled_from([role, None]))
        self.try_resume(stream_id, token, expected_role, stream.holder(role))

    @precondition(lambda self: any(not claims.forged for claims in self.resumes.values()))
    @rule(
        data=st.data(),
        kind=st.sampled_from(
            ["older", "other-role", "other-stream", "forged", "join-as-resume", "resume-as-join"]
        ),
    )
    def resume_by_attacker(self, data: st.DataObject, kind: str) -> None:
        tokens = sorted(t for t, claims in self.resumes.items() if not claims.forged)
        # An attacker who stole an older token: one that is spent (the one before the latest
        # still works for whoever holds it while its connection is unconfirmed).
        older = sorted(self.spent_resumes)
        if kind == "older" and older:
            token = data.draw(st.sampled_from(older))
            claims = self.resumes[token]
            self.try_resume(claims.stream_id, token, claims.role, ATTACKER)
        elif kind == "other-stream" and len(self.streams) >= 2:
            token = data.draw(st.sampled_from(tokens))
            claims = self.resumes[token]
            target = data.draw(st.sampled_from(sorted(set(self.streams) - {claims.stream_id})))
            role = data.draw(st.sampled_from([claims.role, None]))
            self.try_resume(target, token, role, ATTACKER)
        elif kind == "forged":
            stream_id = data.draw(st.sampled_from(sorted(self.streams)))
            role = data.draw(st.sampled_from(list(Role)))
            token = mint_resume_token(
                secret=b"a guessed secret", stream_id=stream_id, role=role, nonce=self.fresh_bytes()
            )
            self.resumes[token] = ModelResume(stream_id=stream_id, role=role, forged=True)
            self.try_resume(stream_id, token, role, ATTACKER)
        elif kind in ("join-as-resume", "resume-as-join"):
            # The two kinds of token never stand in for each other.
            genuine = tokens if kind == "resume-as-join" else sorted(self.tokens)
            token = data.draw(st.sampled_from(genuine))
            stream_id = (self.resumes.get(token) or self.tokens[token]).stream_id
            method = self.bridge.join if kind == "resume-as-join" else self.bridge.resume
            with pytest.raises(StreamTokenError) as info:
                method(
                    stream_id=stream_id,
                    token=token,
                    role=None,
                    connection_id=self.fresh(),
                    now=self.now,
                    resume_nonce=self.fresh_bytes(),
                )
            assert info.value.code is ErrorCode.STREAM_TOKEN_INVALID
        else:
            # A side's resume token, presented for the other side.
            token = data.draw(st.sampled_from(tokens))
            claims = self.resumes[token]
            self.try_resume(claims.stream_id, token, claims.role.other, ATTACKER)

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def counts_match_the_model(self) -> None:
        assert self.coordinator.online_count() == len(self.online)
        assert self.coordinator.pending_count() == len(self.pending)
        live = [s for s in self.streams.values() if s.state != "ended"]
        assert self.bridge.stream_count() == len(live)
        assert self.bridge.paired_count() == sum(
            s.state in ("paired", "held", "both_held") for s in live
        )
        assert self.bridge.held_count() == sum(s.state in ("held", "both_held") for s in live)
        for stream in self.streams.values():
            assert self.bridge.stream_state(stream.stream_id) is StreamState(stream.state)
        for device in DEVICES:
            assert self.coordinator.is_online(device) == (device in self.online)
            assert self.coordinator.registered_names(device) == self.names.get(device, frozenset())

    @invariant()
    def deadlines_match_the_model(self) -> None:
        deadlines = [r.deadline for r in self.pending.values()]
        due = deadlines + list(self.expiry.values())
        assert self.coordinator.next_deadline() == (min(due) if due else None)
        # Nothing pending outlives a deadline that advance has passed.
        assert all(deadline > self.advanced_to for deadline in deadlines)
        expiries = [
            s.minted + LIFETIME for s in self.streams.values() if s.state in ("waiting", "half")
        ]
        holds = [
            deadline
            for s in self.streams.values()
            if s.state in ("held", "both_held")
            for deadline in s.held.values()
        ]
        assert self.bridge.next_deadline() == (min(expiries + holds) if expiries + holds else None)
        # No held side outlives a grace deadline that advance has passed.
        assert all(deadline > self.advanced_to for deadline in holds)

    @invariant()
    def tokens_work_once_and_only_before_expiry(self) -> None:
        uses = Counter(token for token, _ in self.accepted_joins)
        assert all(count == 1 for count in uses.values())
        for token, when in self.accepted_joins:
            claims = self.tokens[token]
            assert not claims.forged
            assert when < claims.minted + LIFETIME

    @invariant()
    def resume_tokens_work_only_until_spent(self) -> None:
        as_latest = Counter(token for token, latest, _ in self.accepted_resumes if latest)
        assert all(count == 1 for count in as_latest.values())
        for token, _, was_spent in self.accepted_resumes:
            assert not was_spent
            assert not self.resumes[token].forged
        for stream in self.streams.values():
            for role, (token, conn) in stream.previous.items():
                # An earlier token of that role, for a connection of that stream.
                assert token in stream.resume_tokens[role][:-1]
                assert token not in self.spent_resumes
                assert self.conn_stream[conn] == stream.stream_id
            if stream.state != "ended":
                # The bridge keeps exactly the model's earlier tokens: one per role at most.
                kept = self.bridge.unconfirmed_roles(stream.stream_id)
                assert kept == set(stream.previous)

    @invariant()
    def streams_pair_only_the_named_device_and_an_authorised_initiator(self) -> None:
        for stream in self.streams.values():
            # Only an authorised service's initiate ever creates a stream.
            assert SERVICES[stream.service]
            for role in [*stream.sides, *stream.held]:
                # Whoever is (or was, if held) on a side got in with that side's join token.
                assert stream.tokens[role] in self.used
                assert self.tokens[stream.tokens[role]].holder == stream.holder(role)
            for role, conn in stream.sides.items():
                # Joined or resumed, the connection belongs to the side's rightful holder.
                assert self.conn_holder[conn] == stream.holder(role)
            if stream.was_paired:
                assert stream.accepted
                assert stream.holder(Role.DEVICE) == ("device", stream.device_id)
                assert set(stream.sides) | set(stream.held) == set(Role)


HubMachine.TestCase.settings = settings(
    max_examples=250,
    stateful_step_count=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHub = HubMachine.TestCase
