"""devstream_core.response: a client's request to the hub and the reading of its answer.

Sans-IO: bytes in, a Response or the core's error out. Every answer is also fed byte by byte
(chunking equivalence).
"""

from __future__ import annotations

import pytest

from devstream_core.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from devstream_core.exceptions import HubUnreachable, TlsMismatch
from devstream_core.response import Response, ResponseReader

from ._helpers import load_fuzz_harness

WHERE = "hub.example.com:8443"
FIELDS = [("host", WHERE), ("connection", "close")]


def _reader(**options: object) -> ResponseReader:
    return ResponseReader("GET", "/x", FIELDS, where=WHERE, tls=False, **options)  # type: ignore[arg-type]


def _feed(reader: ResponseReader, data: bytes, *, byte_by_byte: bool) -> Response | None:
    if not byte_by_byte:
        return reader.receive_data(data)
    answer = None
    for i in range(len(data)):
        assert answer is None
        answer = reader.receive_data(data[i : i + 1])
    return answer


def test_request_bytes_carry_the_fields_and_the_body() -> None:
    reader = ResponseReader("POST", "/t?a=1", FIELDS, b"hello", where=WHERE, tls=False)
    assert reader.request == (
        b"POST /t?a=1 HTTP/1.1\r\nhost: hub.example.com:8443\r\nconnection: close\r\n"
        b"content-length: 5\r\n\r\nhello"
    )


def test_an_empty_body_is_said_with_its_length() -> None:
    reader = ResponseReader("POST", "/t", FIELDS, b"", where=WHERE, tls=False)
    assert reader.request.endswith(b"content-length: 0\r\n\r\n")


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_an_answer_with_a_body(byte_by_byte: bool) -> None:
    data = (
        b"HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\nContent-Length: 4\r\n\r\n{}{}"
    )
    answer = _feed(_reader(), data, byte_by_byte=byte_by_byte)
    assert answer == Response(
        status=404,
        headers=[(b"content-type", b"application/json"), (b"content-length", b"4")],
        body=b"{}{}",
    )


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_a_101_ends_at_its_head_and_keeps_what_followed(byte_by_byte: bool) -> None:
    reader = ResponseReader(
        "GET",
        "/ws",
        [*FIELDS[:1], ("connection", "upgrade"), ("upgrade", "websocket")],
        where=WHERE,
        tls=False,
    )
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    answer = _feed(reader, data + b"\x82\x01x", byte_by_byte=False)
    assert answer is not None
    assert answer.status == 101
    assert answer.headers == [(b"upgrade", b"websocket"), (b"connection", b"Upgrade")]
    assert answer.trailing == b"\x82\x01x"
    if byte_by_byte:
        reader = ResponseReader(
            "GET",
            "/ws",
            [*FIELDS[:1], ("connection", "upgrade"), ("upgrade", "websocket")],
            where=WHERE,
            tls=False,
        )
        again = _feed(reader, data, byte_by_byte=True)
        assert again is not None and again.status == 101 and again.trailing == b""


def test_an_interim_answer_is_skipped_unless_it_answers_an_upgrade() -> None:
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"
    answer = _reader().receive_data(data)
    assert answer is not None and answer.status == 204
    answer = _reader(upgrade=True).receive_data(data)
    assert answer is not None and answer.status == 100


def test_reusable_only_when_neither_side_asked_to_close() -> None:
    data = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    keep = ResponseReader("GET", "/", [("host", WHERE)], where=WHERE, tls=False)
    answer = keep.receive_data(data)
    assert answer is not None and answer.reusable
    answer = _reader().receive_data(data)
    assert answer is not None and not answer.reusable


def test_a_hub_that_hangs_up_before_answering() -> None:
    with pytest.raises(HubUnreachable) as info:
        _reader().receive_data(b"")
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert f"connection closed by the hub at {WHERE} before it answered" in info.value.message


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_a_tls_answer_to_plain_http_is_a_tls_mismatch(byte_by_byte: bool) -> None:
    alert = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])
    reader = _reader()
    with pytest.raises(TlsMismatch):
        assert _feed(reader, alert, byte_by_byte=byte_by_byte) is None
        reader.receive_data(b"")  # the hub hangs up after its alert


def test_an_answer_refused_at_once_is_diagnosed_from_its_first_bytes() -> None:
    reader = _reader()
    assert reader.receive_data(b"\x00") is None  # h11 refuses it; its first bytes are awaited
    assert reader.receive_data(b"x" * 5) is None
    with pytest.raises(HubUnreachable) as info:
        reader.receive_data(b"y" * 20)
    assert "(it answered b'\\x00xxxxxyyyyyyyyyy', not HTTP)" in info.value.message


@pytest.mark.parametrize("byte_by_byte", [False, True])
def test_something_not_http_is_quoted(byte_by_byte: bool) -> None:
    data = b"SSH-2.0-OpenSSH_9.2p1 Debian\r\n\r\n"
    with pytest.raises(HubUnreachable) as info:
        _feed(_reader(), data, byte_by_byte=byte_by_byte)
    assert (
        "is not a devstream hub (it answered b'SSH-2.0-OpenSSH_', not HTTP)" in info.value.message
    )


def test_garbage_after_the_head_is_a_bad_answer() -> None:
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    with pytest.raises(HubUnreachable) as info:
        _reader().receive_data(data)
    assert info.value.message.startswith(f"bad HTTP answer from the hub at {WHERE}: ")


def test_a_hub_that_hangs_up_within_the_body() -> None:
    reader = _reader()
    assert reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc") is None
    with pytest.raises(HubUnreachable) as info:
        reader.receive_data(b"")
    assert type(info.value) is HubUnreachable
    assert info.value.message == (
        f"bad HTTP answer from the hub at {WHERE}: peer closed connection without sending "
        "complete message body (received 3 bytes, expected 10)"
    )


def test_a_hub_that_closes_after_a_head_without_a_length() -> None:
    reader = _reader()
    assert reader.receive_data(b"HTTP/1.1 200 OK\r\n\r\nabc") is None
    answer = reader.receive_data(b"")
    assert answer is not None and answer.body == b"abc"


def test_a_body_past_the_limit() -> None:
    reader = _reader(max_body=8)
    assert reader.receive_data(b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n12345678") is None
    with pytest.raises(RemoteProtocolError) as info:
        reader.receive_data(b"9")
    assert info.value.code is ErrorCode.PAYLOAD_TOO_LARGE
    assert "larger than 8 bytes" in info.value.message


def test_one_exchange_per_reader() -> None:
    reader = _reader()
    assert reader.receive_data(b"HTTP/1.1 204 No Content\r\n\r\n") is not None
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")
    failed = _reader()
    with pytest.raises(HubUnreachable):
        failed.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        failed.receive_data(b"")


def test_the_fuzz_harness_runs(capsys: pytest.CaptureFixture[str]) -> None:
    harness = load_fuzz_harness("fuzz_http_answer")
    harness.run_fallback(2000, seed=1)
    assert harness.main(["--iterations", "200", "--seed", "2"]) == 0
    assert "ok: " in capsys.readouterr().out


def test_the_fuzz_harness_finds_a_chunking_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    harness = load_fuzz_harness("fuzz_http_answer")
    real = harness._read

    def cut_matters(data: bytes, size: int, upgrade: bool) -> object:
        return (real(data, size, upgrade), size)

    monkeypatch.setattr(harness, "_read", cut_matters)
    with pytest.raises(harness.Crash):
        harness.run_fallback(1)
