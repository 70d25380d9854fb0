"""devstream_core.diagnosis: what a failed connection to a hub most likely means.

Pure functions: each symptom a driver can see, in, one message and class out.
"""

from __future__ import annotations

import errno
import ssl

import pytest

from devstream_core import diagnosis
from devstream_core.errors import ErrorCode
from devstream_core.exceptions import HubUnreachable, TlsMismatch

WHERE = "hub.example.com:8443"
#: The first bytes of a TLS alert record, as a TLS server sends to a plain-HTTP request.
TLS_ALERT = bytes([0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 0x46])


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (TLS_ALERT, True),
        (bytes([0x16, 0x03, 0x01]), True),
        (b"HTTP/1.1 400 Bad Request\r\n", False),
        (b"SSH-2.0-OpenSSH_9.2\r\n", False),
        (b"\x15", False),
        (b"", False),
    ],
)
def test_looks_like_tls(data: bytes, expected: bool) -> None:
    assert diagnosis.looks_like_tls(data) is expected


def test_refused_everywhere_says_no_hub_runs_there() -> None:
    exc = diagnosis.connect_failure(WHERE, [errno.ECONNREFUSED] * 2, "Connection refused")
    assert type(exc) is HubUnreachable
    assert exc.code is ErrorCode.HUB_UNREACHABLE
    assert exc.message.startswith(f"cannot reach the hub at {WHERE}: connection refused, no hub")


@pytest.mark.parametrize("numbers", [[], [errno.ECONNREFUSED, errno.ENETUNREACH]])
def test_other_connect_failures_keep_the_systems_words(numbers: list[int]) -> None:
    exc = diagnosis.connect_failure(WHERE, numbers, "Network is unreachable")
    assert exc.message == f"cannot reach the hub at {WHERE}: Network is unreachable"


def test_a_non_tls_answer_to_a_tls_handshake_is_a_tls_mismatch() -> None:
    exc = diagnosis.tls_handshake_failure(
        WHERE, reason="WRONG_VERSION_NUMBER", verify_message=None, detail="wrong version number"
    )
    assert isinstance(exc, TlsMismatch)
    assert "add UseTls=false" in exc.message


def test_another_tls_failure_keeps_its_own_words() -> None:
    exc = diagnosis.tls_handshake_failure(
        WHERE, reason="SSLV3_ALERT_HANDSHAKE_FAILURE", verify_message=None, detail="alert 40"
    )
    assert not isinstance(exc, TlsMismatch)
    assert exc.message == f"TLS handshake with the hub at {WHERE} failed: alert 40"


@pytest.mark.parametrize(
    ("verify_message", "hint"),
    [
        ("unable to get local issuer certificate", "--ca-file"),
        ("self-signed certificate", "--ca-file"),
        ("Hostname mismatch, certificate is not valid for 'x'.", "HostName must be a name"),
        ("certificate has expired", None),
    ],
)
def test_a_refused_certificate_says_why_and_what_to_do(
    verify_message: str, hint: str | None
) -> None:
    exc = diagnosis.tls_handshake_failure(
        WHERE, reason="CERTIFICATE_VERIFY_FAILED", verify_message=verify_message, detail="…"
    )
    assert type(exc) is HubUnreachable
    assert exc.message.startswith(
        f"TLS handshake with the hub at {WHERE} failed: certificate refused: {verify_message}"
    )
    if hint is None:
        assert exc.message.endswith(verify_message)
    else:
        assert hint in exc.message


@pytest.mark.parametrize(
    ("received", "tls", "kind", "words"),
    [
        (b"", False, HubUnreachable, "before it answered; if the hub serves https"),
        (b"", True, HubUnreachable, "before it answered"),
        (TLS_ALERT, False, TlsMismatch, "answered in TLS to a plain HTTP request"),
        (b"HTTP/1.1 200 OK\r\nbad", False, HubUnreachable, "bad HTTP response from the hub"),
        (b"SSH-2.0-OpenSSH_9.2p1 Debian", False, HubUnreachable, "is not a devstream hub"),
    ],
)
def test_no_http_answer(received: bytes, tls: bool, kind: type, words: str) -> None:
    exc = diagnosis.no_http_answer(WHERE, received, tls=tls, detail="h11 said no")
    assert type(exc) is kind
    assert words in exc.message
    assert WHERE in exc.message
    if tls:
        assert "UseTls" not in exc.message


def test_a_long_foreign_answer_is_quoted_only_in_part() -> None:
    exc = diagnosis.no_http_answer(WHERE, b"X" * 1000, tls=False)
    assert repr(b"X" * diagnosis.QUOTED_BYTES) in exc.message
    assert "X" * (diagnosis.QUOTED_BYTES + 1) not in exc.message


def test_a_connect_error_with_its_own_number() -> None:
    exc = diagnosis.connect_error(WHERE, ConnectionRefusedError(errno.ECONNREFUSED, "refused"))
    assert "connection refused, no hub is running there" in exc.message


def test_a_connect_error_whose_cause_groups_every_attempt() -> None:
    error = OSError("all attempts to connect failed")
    error.__cause__ = ExceptionGroup(
        "attempts",
        [
            OSError(errno.ECONNREFUSED, "refused"),
            OSError(errno.ECONNREFUSED, "refused"),
            ValueError(),
        ],
    )
    assert "no hub is running there" in diagnosis.connect_error(WHERE, error).message
    error.__cause__ = ExceptionGroup(
        "attempts", [OSError(errno.ECONNREFUSED, "a"), OSError(errno.EHOSTUNREACH, "b")]
    )
    mixed = diagnosis.connect_error(WHERE, error)
    assert mixed.message == f"cannot reach the hub at {WHERE}: all attempts to connect failed"


def test_a_connect_error_without_a_number_says_what_it_says() -> None:
    exc = diagnosis.connect_error(WHERE, OSError("Multiple exceptions: [...]"))
    assert exc.message == f"cannot reach the hub at {WHERE}: Multiple exceptions: [...]"


def test_a_tls_error_is_read_for_its_reason_and_verify_message() -> None:
    wrong = ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER] wrong version number")
    wrong.reason = "WRONG_VERSION_NUMBER"  # type: ignore[misc]  # as OpenSSL's errors carry it
    assert type(diagnosis.tls_error(WHERE, wrong)) is TlsMismatch
    refused = ssl.SSLCertVerificationError(1, "certificate verify failed")
    refused.verify_message = "self-signed certificate"
    assert "trust the CA" in diagnosis.tls_error(WHERE, refused).message
    other = diagnosis.tls_error(WHERE, EOFError("the peer hung up"))
    assert other.message == f"TLS handshake with the hub at {WHERE} failed: the peer hung up"
