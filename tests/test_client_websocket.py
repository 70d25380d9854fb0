"""devstream_core.client_websocket: a client's open WebSocket, sans-IO.

Both sides of every exchange: the hub's side is the codec as a server
(``websocket.Connection(client=False)``), which makes the frames the client reads and parses
what the client answers.
"""

from __future__ import annotations

import itertools

import pytest

from devstream_core import websocket
from devstream_core.client_websocket import ClientWebSocket, ConnectionClosed
from devstream_core.websocket import BytesMessage, CloseConnection, Ping, Pong, TextMessage


def _keys() -> ClientWebSocket:
    counter = itertools.count(1)
    return ClientWebSocket(lambda: next(counter).to_bytes(4, "big"))


def _hub() -> websocket.Connection:
    return websocket.Connection(client=False)


def _data(hub: websocket.Connection, data: bytes) -> bytes:
    head, body = hub.send_data(data)
    return head + bytes(body)


def test_data_and_a_ping_in_one_read() -> None:
    ws, hub = _keys(), _hub()
    received = ws.receive_data(_data(hub, b"abc") + hub.send_ping(b"p1") + _data(hub, b"d"))
    assert [bytes(m.data) for m in received.messages] == [b"abc", b"d"]
    assert hub.receive_data(received.to_send) == [Pong(payload=b"p1")]
    assert ws.closed is None


def test_text_is_handed_on_as_text() -> None:
    ws, hub = _keys(), _hub()
    head, body = hub.send_data("héllo")
    assert ws.receive_data(head + bytes(body)).messages == [TextMessage("héllo")]


def test_a_pong_needs_no_answer() -> None:
    ws, hub = _keys(), _hub()
    assert ws.receive_data(hub.send_pong(b"x")).to_send == b""


def test_no_pong_once_this_side_closes() -> None:
    ws, hub = _keys(), _hub()
    sent = ws.close(4000, "done")
    late = hub.send_ping(b"late") + _data(hub, b"tail")  # sent before the close arrived
    assert hub.receive_data(sent) == [CloseConnection(code=4000, reason="done")]
    received = ws.receive_data(late)
    assert received.to_send == b""
    assert received.messages == [BytesMessage(b"tail")]
    assert ws.ping() == b""  # closing: no ping either
    assert ws.close() == b""  # and no second close


def test_the_peers_close_is_answered_and_ends_the_websocket() -> None:
    ws, hub = _keys(), _hub()
    received = ws.receive_data(_data(hub, b"last") + hub.send_close(4504, "504901 never came"))
    assert [bytes(m.data) for m in received.messages] == [b"last"]
    assert hub.receive_data(received.to_send) == [
        CloseConnection(code=4504, reason="504901 never came")
    ]
    assert ws.closed is not None
    assert (ws.closed.code, ws.closed.reason) == (4504, "504901 never came")
    with pytest.raises(ConnectionClosed) as info:
        ws.receive_data(b"")
    # The same end, raised as a new exception each time (tests/test_no_cycles.py says why).
    assert (info.value.code, info.value.reason) == (4504, "504901 never came")
    with pytest.raises(ConnectionClosed):
        ws.send(b"x")
    assert ws.ping() == b""
    assert ws.close() == b""


def test_a_close_without_a_code_is_answered_with_going_away() -> None:
    ws, hub = _keys(), _hub()
    head = bytes([0x88, 0x00])  # a close frame without a payload
    received = ws.receive_data(head)
    assert hub.receive_data(received.to_send) == [CloseConnection(code=1001, reason="")]
    assert ws.closed is not None and ws.closed.code == 1005


def test_a_frame_refused_is_closed_with_its_code() -> None:
    ws, hub = _keys(), _hub()
    received = ws.receive_data(bytes([0x82 | 0x40, 0x00]))  # a reserved bit set
    [close] = hub.receive_data(received.to_send)
    assert isinstance(close, CloseConnection) and close.code == 1002
    assert ws.closed is not None and ws.closed.code == 1002


def test_the_peer_answers_this_sides_close() -> None:
    ws, hub = _keys(), _hub()
    hub.receive_data(ws.close())
    received = ws.receive_data(hub.send_close(1000, ""))
    assert received.to_send == b""  # the close was sent already
    assert ws.closed is not None and ws.closed.code == 1000


def test_a_lost_connection_ends_with_1006_and_the_first_end_counts() -> None:
    ws = _keys()
    ws.connection_lost()
    ws.end(1000, "later")
    assert ws.closed is not None
    assert (ws.closed.code, ws.closed.reason) == (1006, "connection lost")


def test_messages_and_pings_go_with_a_fresh_key_each() -> None:
    keys: list[bytes] = []

    def key() -> bytes:
        keys.append(len(keys).to_bytes(4, "big"))
        return keys[-1]

    ws, hub = ClientWebSocket(key), _hub()
    data = ws.send(b"one") + ws.send("two") + ws.ping()
    events = hub.receive_data(data)
    assert events == [BytesMessage(b"one"), TextMessage("two"), Ping(payload=b"")]
    assert len(set(keys)) == 3


def test_the_masking_function_given_is_used() -> None:
    calls: list[bytes] = []

    def mask(data: bytes | bytearray | memoryview, key: bytes) -> bytes:
        calls.append(key)
        return websocket.pure_apply_mask(data, key)

    ws, hub = ClientWebSocket(lambda: b"\x01\x02\x03\x04", apply_mask=mask), _hub()
    assert hub.receive_data(ws.send(b"masked")) == [BytesMessage(b"masked")]
    assert calls == [b"\x01\x02\x03\x04"]


def test_a_long_read_is_parsed_in_batches() -> None:
    ws, hub = _keys(), _hub()
    count = websocket.MAX_BATCH_FRAMES + 3
    received = ws.receive_data(b"".join(_data(hub, b"x") for _ in range(count)))
    assert len(received.messages) == websocket.MAX_BATCH_FRAMES
    assert ws.holds_more
    rest = ws.receive_data(b"")
    assert len(rest.messages) == 3
    assert not ws.holds_more
