"""Stateful test of devstream.v1: two endpoints over a link that splits, merges, delays and drops.

The link models what the hub does. Each ``data_to_send()`` result is one WebSocket message,
queued in its direction while both sides are attached to the hub (the hub drops frames meant
for a side that is away; a side whose socket died writes into the void). ``deliver`` hands the
peer any number of queued bytes in one ``receive_data`` call, cutting messages anywhere and
merging several. ``drop`` kills one side's socket: bytes on their way to it are lost; of the
messages it sent, the first few reached the hub whole (at least the one its peer has partly
received) and are still delivered, the rest are lost. The side learns of the drop (its
``connection_lost()``) at ``notice``, possibly several steps later, and comes back with
``connection_made(resumed=True)`` at ``reconnect``. ``drop_both`` drops both sides at once.

Application writes, reads, ``write_eof`` and resets on either side interleave with all of that
at random. After every step: each side has read exactly a prefix of what the other wrote, in
order (and all of it once at EOF); ``unacked <= window`` and the receive buffer is within the
window on both. ``settle`` reconnects whatever is down and lets the link deliver everything:
after it, once a reset happened, both sides agree on it (a side that finished before the
reset reached it stays ``DONE``). At teardown, a last settle-and-read-everything loop must end
with each side having read exactly all the other wrote, followed by EOF, and both ``done``.

Swarm testing: each run draws whether it may reset, whether it writes EOFs before teardown,
and whether its applications read everything as soon as it arrives; without that, most runs
end early (EOF, reset or a full window) and the deep cases (a Resume that rewinds, a gap after
a race with the peer) almost never happen. About 800 runs of 50 steps take a few seconds.
"""

from __future__ import annotations

import copy
import hashlib

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from devstream_core.framing import (
    MIN_SEND_LIMIT,
    ConnectionState,
    EndpointState,
    Event,
    SendState,
    StreamEndpoint,
)

A, B = "a", "b"
SIDES = st.sampled_from([A, B])
OTHER = {A: B, B: A}
LIVE = (ConnectionState.CONNECTED, ConnectionState.RESUMING)

# What each side writes: a stream of bytes without short repeats (a duplicated or skipped
# piece cannot go unnoticed).
STREAM = {
    side: b"".join(
        hashlib.blake2b(f"{side}{block}".encode(), digest_size=64).digest() for block in range(512)
    )
    for side in (A, B)
}


class FramedStreams(RuleBasedStateMachine):
    """Two StreamEndpoints and the link between them."""

    def __init__(self) -> None:
        super().__init__()
        self.ep: dict[str, StreamEndpoint] = {}
        self.attached = {A: True, B: True}
        self.queue: dict[str, list[bytes]] = {A: [], B: []}  # messages *from* each side
        self.taken = {A: 0, B: 0}  # bytes of the first queued message already delivered
        self.written = {A: bytearray(), B: bytearray()}
        self.read = {A: bytearray(), B: bytearray()}
        self.events: dict[str, list[Event]] = {A: [], B: []}
        self.resets: list[tuple[str, int]] = []
        self.may_reset = False
        self.may_eof = False
        self.eager_reader = False

    @initialize(
        window=st.sampled_from([1, 16, 100, 300]),
        max_payload=st.sampled_from([1, 7, 64]),
        may_reset=st.booleans(),
        may_eof=st.booleans(),
        eager_reader=st.booleans(),
    )
    def start(
        self, window: int, max_payload: int, may_reset: bool, may_eof: bool, eager_reader: bool
    ) -> None:
        # Swarm testing: some runs never reset (so they check every byte at the end), some
        # write their EOFs only at teardown, and in some the applications read everything as
        # soon as it arrives (so more data flows; the others exercise back-pressure).
        self.may_reset = may_reset
        self.may_eof = may_eof
        self.eager_reader = eager_reader
        for side in (A, B):
            self.ep[side] = StreamEndpoint(window=window, max_payload=max_payload)
            self.ep[side].connection_made(resumed=False)

    # -- the application ---------------------------------------------------------------------

    # An adapter usually sends at once what a write or read produced (``send_now``).

    @rule(side=SIDES, size=st.integers(0, 400), send_now=st.booleans())
    def write(self, side: str, size: int, send_now: bool) -> None:
        endpoint = self.ep[side]
        if endpoint.send_state is SendState.OPEN:
            start = endpoint.written_end
            capacity = endpoint.send_capacity
            taken = endpoint.write(STREAM[side][start : start + size])
            assert taken == min(size, capacity)
            self.written[side] += STREAM[side][start : start + taken]
        if send_now:
            self._flush(side)

    @rule(side=SIDES, max_bytes=st.none() | st.integers(1, 130), send_now=st.booleans())
    def read_some(self, side: str, max_bytes: int | None, send_now: bool) -> None:
        endpoint = self.ep[side]
        if endpoint.state is not EndpointState.RESET:
            data = endpoint.read(max_bytes)
            assert max_bytes is None or len(data) <= max_bytes
            self.read[side] += data
        if send_now:
            self._flush(side)

    @precondition(lambda self: self.may_eof)
    @rule(side=SIDES, send_now=st.booleans())
    def write_eof(self, side: str, send_now: bool) -> None:
        if self.ep[side].send_state is SendState.OPEN:
            self.ep[side].write_eof()
        if send_now:
            self._flush(side)

    @precondition(lambda self: self.may_reset)
    @rule(side=SIDES, code=st.sampled_from([7, 410901, 2**32 - 1]), send_now=st.booleans())
    def reset(self, side: str, code: int, send_now: bool) -> None:
        if self.ep[side].state is EndpointState.OPEN:
            self.ep[side].reset(code, f"reset by {side}")
            self.resets.append((side, code))
        if send_now:
            self._flush(side)

    # -- the link ----------------------------------------------------------------------------

    @rule(side=SIDES, limit=st.none() | st.integers(MIN_SEND_LIMIT, 400))
    def flush(self, side: str, limit: int | None) -> None:
        self._flush(side, limit)

    def _flush(self, side: str, limit: int | None = None) -> bool:
        endpoint = self.ep[side]
        out = endpoint.data_to_send(limit)
        assert limit is None or len(out) <= limit
        if limit is None:
            assert not endpoint.has_output
        if out and self.attached[side] and self.attached[OTHER[side]]:
            self.queue[side].append(out)
        return bool(out)

    @precondition(lambda self: self.queue[A] or self.queue[B])
    @rule(side=SIDES, size=st.integers(1, 100))
    def deliver(self, side: str, size: int | None) -> None:
        self._deliver(side, size)

    def _deliver(self, side: str, size: int | None = None) -> None:
        queue = self.queue[side]
        if not queue:
            return
        assert self.attached[OTHER[side]]
        chunk = bytearray()
        while queue and (size is None or len(chunk) < size):
            message = queue[0]
            room = len(message) - self.taken[side] if size is None else size - len(chunk)
            piece = message[self.taken[side] : self.taken[side] + room]
            chunk += piece
            self.taken[side] += len(piece)
            if self.taken[side] == len(message):
                queue.pop(0)
                self.taken[side] = 0
        peer = OTHER[side]
        self.events[peer] += self.ep[peer].receive_data(bytes(chunk))
        if self.eager_reader and self.ep[peer].state is not EndpointState.RESET:
            self.read[peer] += self.ep[peer].read()

    # After a drop the side may stay down for now, notice it, or notice it and come back;
    # coming back, its peer may write and send before the side's Resume reaches it ("race":
    # the side then sees a gap).
    AFTER_DROP = st.sampled_from(["down", "noticed", "back", "race"])

    @rule(side=SIDES, keep=st.integers(0, 3), after=AFTER_DROP)
    def drop(self, side: str, keep: int, after: str) -> None:
        self._drop(side, keep)
        self._after_drop(side, after)

    def _after_drop(self, side: str, after: str) -> None:
        if after != "down":
            self.notice(side)
        if after in ("back", "race"):
            self.reconnect(side)
        if after == "race":
            self.write(OTHER[side], 10, send_now=True)

    def _drop(self, side: str, keep: int) -> None:
        if not self.attached[side]:
            return
        self.attached[side] = False
        # Bytes on their way to the side are lost, even a message half delivered: its
        # decoder is reset when it notices the drop.
        self.queue[OTHER[side]].clear()
        self.taken[OTHER[side]] = 0
        # What it sent: a message its peer has partly received was at the hub whole.
        keep = max(keep, 1 if self.taken[side] else 0)
        del self.queue[side][keep:]

    @rule(after=AFTER_DROP)
    def drop_both(self, after: str) -> None:
        self._drop(A, 0)
        self._drop(B, 0)
        self.queue[A].clear()
        self.queue[B].clear()
        self.taken = {A: 0, B: 0}
        for side in (A, B):
            self._after_drop(side, after)

    @rule(side=SIDES)
    def notice(self, side: str) -> None:
        if not self.attached[side] and self.ep[side].connection_state in LIVE:
            self.ep[side].connection_lost()

    @rule(side=SIDES)
    def reconnect(self, side: str) -> None:
        endpoint = self.ep[side]
        if endpoint.connection_state is ConnectionState.DISCONNECTED:
            endpoint.connection_made(resumed=True)
            self.attached[side] = True

    @rule()
    def settle(self) -> None:
        self._settle()
        if not self.resets:
            return
        states = {side: self.ep[side].state for side in (A, B)}
        assert EndpointState.OPEN not in states.values(), states
        reset = [self.ep[side] for side in (A, B) if states[side] is EndpointState.RESET]
        assert reset  # the side that reset first cannot be done
        assert len({endpoint.reset_info for endpoint in reset}) == 1
        codes = {code for _, code in self.resets}
        for endpoint in reset:
            assert endpoint.reset_settled
            info = endpoint.reset_info
            assert info is not None and info[0] in codes

    def _settle(self) -> None:
        for side in (A, B):
            self.notice(side)
            self.reconnect(side)
        for _ in range(10_000):
            moved = False
            for side in (A, B):
                moved = self._flush(side) or moved
                if self.queue[side]:
                    self._deliver(side)
                    moved = True
            if not moved:
                return
        raise AssertionError("the link never went quiet")

    # -- invariants --------------------------------------------------------------------------

    @invariant()
    def every_byte_once_in_order(self) -> None:
        for side in (A, B):
            got, sent = self.read[side], self.written[OTHER[side]]
            assert got == sent[: len(got)]
            if self.ep[side].at_eof:
                assert got == sent
                assert self.ep[OTHER[side]].send_state is not SendState.OPEN

    @invariant()
    def memory_is_bounded(self) -> None:
        for endpoint in self.ep.values():
            assert endpoint.unacked <= endpoint.window
            assert endpoint.received - endpoint.consumed <= endpoint.window
            assert endpoint.written_end - min(endpoint.acked, endpoint.written_end) <= (
                endpoint.window
            )
            assert endpoint.connection_state is not ConnectionState.BROKEN

    @invariant()
    def has_output_says_whether_there_is_output(self) -> None:
        # The adapters ask has_output after every message and stop sending when it says no:
        # it must say exactly whether data_to_send gives bytes (tried on a copy).
        for endpoint in self.ep.values():
            assert endpoint.has_output == bool(copy.deepcopy(endpoint).data_to_send())

    def teardown(self) -> None:
        if not self.ep:
            return
        for _ in range(10_000):
            self._settle()
            for side in (A, B):
                if self.ep[side].state is not EndpointState.RESET:
                    self.read[side] += self.ep[side].read()
                if self.ep[side].send_state is SendState.OPEN:
                    self.ep[side].write_eof()
            if not any(endpoint.has_output for endpoint in self.ep.values()):
                break
        states = {side: self.ep[side].state for side in (A, B)}
        if self.resets:
            assert EndpointState.OPEN not in states.values(), states
            return
        for side in (A, B):
            assert self.read[side] == self.written[OTHER[side]]
            assert self.ep[side].at_eof
            assert self.ep[side].done, states


FramedStreams.TestCase.settings = settings(
    max_examples=800,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFramedStreams = FramedStreams.TestCase
