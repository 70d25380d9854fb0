"""The README documents every error code exactly as the core defines it."""

from __future__ import annotations

import re
from pathlib import Path

from devstream_core.errors import ErrorCode

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_error_code_is_in_the_readme_table() -> None:
    rows = re.findall(
        r"^\| (\d{6}) \| (\d{3}) \| (\d{4}) \| `([A-Z_]+)` \|", README.read_text(), re.MULTILINE
    )
    documented = {int(code): (int(status), int(close), name) for code, status, close, name in rows}
    expected = {int(c): (c.http_status, c.close_code, c.name) for c in ErrorCode}
    assert documented == expected


def test_quick_start_has_exactly_two_commands() -> None:
    text = README.read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = re.findall(r"```sh\n(.*?)\n```", quick, re.DOTALL)
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/devstream demo",
        "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest",
    ]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "pip\" install --quiet -e '.[test]'" in ci and 'coverage" run -m pytest -q' in ci
