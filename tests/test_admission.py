"""The hub's admission of connections (sans-IO): the cap, the answering slots, the reports."""

from __future__ import annotations

import pytest

from devstream_core.admission import Admission, ConnectionLimits, Tally
from devstream_core.errors import LocalProtocolError


def limits(max_connections: int = 2, max_answering: int = 1) -> ConnectionLimits:
    return ConnectionLimits(
        max_connections=max_connections, max_answering=max_answering, report_interval=10.0
    )


def test_serve_below_the_cap_then_answer_then_close() -> None:
    admission = limits()
    assert admission.admit(0.0) == (Admission.SERVE, None)
    assert admission.admit(0.0) == (Admission.SERVE, None)
    # Full: the first refusal is reported at once.
    assert admission.admit(1.0) == (Admission.ANSWER, 1)
    # Full, and the one answering slot is taken: closed at once (reported with the next).
    assert admission.admit(2.0) == (Admission.CLOSE, None)
    assert (admission.served, admission.turned_away) == (2, 2)


def test_capacity_returns_on_release() -> None:
    admission = limits()
    admission.admit(0.0)
    admission.admit(0.0)
    decision, _ = admission.admit(0.0)
    assert decision is Admission.ANSWER
    admission.release(Admission.ANSWER)
    assert admission.admit(0.0)[0] is Admission.ANSWER
    admission.release(Admission.SERVE)
    assert admission.admit(0.0)[0] is Admission.SERVE
    assert admission.admit(0.0)[0] is Admission.CLOSE
    admission.release(Admission.CLOSE)
    assert admission.turned_away == 1


def test_no_answering_slots_closes_at_once() -> None:
    admission = limits(max_connections=1, max_answering=0)
    admission.admit(0.0)
    assert admission.admit(0.0) == (Admission.CLOSE, 1)


def test_refusals_are_reported_once_per_interval_with_their_count() -> None:
    admission = limits(max_connections=1, max_answering=0)
    admission.admit(0.0)
    reports = [
        (now, count)
        for now in [i * 0.25 for i in range(100)]
        if (count := admission.admit(now)[1]) is not None
    ]
    # At 0 s (the first), at 10 s (the 40 since, this one included), at 20 s (40 more).
    assert reports == [(0.0, 1), (10.0, 40), (20.0, 40)]


def test_tally() -> None:
    tally = Tally(5.0)
    assert [tally.add(t) for t in (0.0, 1.0, 4.9, 5.0, 5.1, 100.0)] == [1, None, None, 3, None, 2]
    every = Tally(0.0)
    assert [every.add(0.0) for _ in range(3)] == [1, 1, 1]


def test_releasing_more_than_admitted_is_a_local_error() -> None:
    admission = limits()
    with pytest.raises(LocalProtocolError):
        admission.release(Admission.SERVE)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_connections": 0},
        {"max_connections": True},
        {"max_answering": -1},
        {"report_interval": float("nan")},
        {"report_interval": -1.0},
    ],
)
def test_bad_settings(kwargs: dict[str, object]) -> None:
    arguments: dict[str, object] = {
        "max_connections": 1,
        "max_answering": 1,
        "report_interval": 1.0,
    }
    arguments.update(kwargs)
    with pytest.raises(LocalProtocolError):
        ConnectionLimits(**arguments)  # type: ignore[arg-type]


def test_now_must_be_finite() -> None:
    with pytest.raises(LocalProtocolError):
        Tally(1.0).add(float("nan"))
