"""Every benchmark script runs on a tiny size and prints its table.

Functional only: each script runs as a subprocess with ``--tiny`` (its hub, peers and clients
in processes of their own, on 127.0.0.1), must exit 0 and print a ``metric | devstream | peer
| ratio`` table with devstream's figure, the peer's figure and their ratio. No figure is
compared with a time or a speed; where a benchmark checks data (concurrent streams), the count
of intact streams is checked exactly.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import require_tool

BENCH = Path(__file__).resolve().parent.parent / "bench"
#: A safety net for a wedged script, not a timing assertion.
RUN_LIMIT = 120


def run(script: str, *options: str) -> str:
    result = subprocess.run(
        [sys.executable, str(BENCH / script), "--tiny", *options],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def tables(output: str) -> list[tuple[list[str], dict[str, list[str]]]]:
    """Every ``| … |`` table in *output*: (header cells, {metric: [devstream, peer, ratio]})."""
    found: list[tuple[list[str], dict[str, list[str]]]] = []
    block: list[list[str]] = []
    for line in [*output.splitlines(), ""]:
        if line.startswith("|"):
            block.append([cell.strip() for cell in line.strip().strip("|").split("|")])
            continue
        if block:
            header, _rule, *rows = block
            found.append((header, {row[0]: row[1:] for row in rows}))
            block = []
    return found


def number(cell: str) -> float:
    return float(cell.replace(",", ""))


def check_table(output: str, peer: str, metric: str) -> dict[str, list[str]]:
    """The first table: its header names devstream and *peer*; *metric*'s row has devstream's
    figure, the peer's and their ratio, all numbers."""
    found = tables(output)
    assert found, output
    header, rows = found[0]
    assert header == ["metric", "devstream", peer, "ratio"]
    assert all(len(cells) == 3 for cells in rows.values()), rows
    ours, theirs, ratio = rows[metric]
    assert number(ours) > 0 and number(theirs) > 0
    assert number(ratio) == pytest.approx(number(ours) / number(theirs), rel=0.2)
    return rows


def test_relay_cost_prints_its_table() -> None:
    output = run("relay_cost.py")
    rows = check_table(output, "websockets relay", "raw 64 KiB: MB/s (client-bound)")
    for mode in ("raw", "devstream.v1"):
        for size in ("4 KiB", "64 KiB", "1 MiB"):
            assert f"{mode} {size}: relay CPU-s/GB" in rows
            assert f"{mode} {size}: MB/s (client-bound)" in rows
    assert "C speedups" in output


def test_tunnel_throughput_prints_its_table() -> None:
    require_tool("socat")
    output = run("tunnel_throughput.py")
    rows = check_table(output, "3 x socat", "throughput, MB/s")
    assert "CPU-s/GB, the three relay processes" in rows


def test_stream_setup_prints_its_table() -> None:
    output = run("stream_setup.py")
    rows = check_table(output, "bare WS connect + echo", "raw setup + 1-byte echo, median ms")
    for mode in ("raw", "devstream.v1"):
        assert f"{mode} setup + 1-byte echo, p99 ms" in rows
        assert number(rows[f"{mode} streams/s, wall"][0]) > 0


def test_idle_devices_prints_its_table() -> None:
    output = run("idle_devices.py")
    rows = check_table(output, "websockets server", "resident memory after, MB")
    assert "KB per idle device (KiB of VmRSS)" in rows


def test_concurrent_streams_checks_every_stream() -> None:
    output = run("concurrent_streams.py", "--count", "20")
    found = tables(output)
    assert [header for header, _ in found] == [
        ["metric", "devstream", "websockets relay", "ratio"]
    ] * 2
    for _, rows in found:
        assert rows["streams open"][:2] == ["20", "20"]
        assert rows["streams whose data came back intact"][:2] == ["20", "20"]
    check_table(output, "websockets relay", "resident memory, all open, MB")


def test_fragment_flood_prints_its_tables() -> None:
    """A hostile-peer run, not a comparison: one table per flood, metric and value."""
    output = run("fragment_flood.py")
    found = tables(output)
    assert [header for header, _ in found] == [["metric", "value"]] * 4
    raw, pings, control, framed = (rows for _, rows in found)
    assert raw["arrived intact"] == ["yes"]
    assert number(raw["echo round trips during"][0]) >= 0
    assert pings["arrived intact"] == ["yes"]
    assert number(pings["hub CPU-s until the message arrived"][0]) >= 0
    assert control["hub's close"][0].startswith("4413 413901")
    assert framed["hub's close"] == ["1009 message in too many fragments"]


def test_resume_overhead_prints_its_table() -> None:
    output = run("resume_overhead.py")
    rows = check_table(output, "no cuts", "cuts every 1 MiB: time, s")
    for step in ("4 MiB", "1 MiB", "4 MiB at one end", "1 MiB at one end"):
        assert f"cuts every {step}: extra ms per cut (target 50)" in rows
