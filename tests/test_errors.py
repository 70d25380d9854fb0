"""Tests for devstream_core.errors: the one table of error codes and the close reasons made
from them. No I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devstream_core.errors import (
    MESSAGES,
    DevstreamError,
    ErrorCode,
    close_code_for,
    close_reason_for,
    parse_close_reason,
)


def test_every_code_has_a_message_a_status_and_a_close_code() -> None:
    assert set(MESSAGES) == set(ErrorCode)
    for code in ErrorCode:
        assert 100000 <= code <= 599999
        assert code.http_status == int(code) // 1000
        assert close_code_for(code) == code.close_code == 4000 + code.http_status
        assert code.message == MESSAGES[code]
        assert DevstreamError(code).message == code.message


@pytest.mark.parametrize("code", list(ErrorCode))
def test_a_close_reason_splits_back_into_its_code_and_message(code: ErrorCode) -> None:
    assert parse_close_reason(close_reason_for(code)) == (code, code.message)
    assert parse_close_reason(close_reason_for(code, "why")) == (code, "why")


def test_a_long_close_reason_is_cut_to_123_bytes_on_a_character_boundary() -> None:
    reason = close_reason_for(ErrorCode.STREAM_RESET, "é" * 100)  # 2 bytes each
    assert len(reason.encode("utf-8")) <= 123
    assert reason.startswith("410901 éé")
    code, message = parse_close_reason(reason)
    assert code is ErrorCode.STREAM_RESET
    assert message == "é" * 58  # 7 bytes of "410901 ", then 58 whole characters


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        (None, (None, "")),
        ("", (None, "")),
        ("going away", (None, "going away")),
        ("123456 not a known code", (None, "123456 not a known code")),
        ("404001", (ErrorCode.DEVICE_NOT_FOUND, "")),
    ],
)
def test_a_reason_without_a_known_code_is_kept_whole(
    reason: str | None, expected: tuple[ErrorCode | None, str]
) -> None:
    assert parse_close_reason(reason) == expected


@given(st.text(max_size=200))
def test_any_reason_parses_without_error(reason: str) -> None:
    code, message = parse_close_reason(reason)
    if code is None:
        assert message == reason
    else:
        assert reason.startswith(str(int(code)))
