"""What every fuzz harness shares: the mutator, the fallback loop and the command line.

A harness module knows one parser. It supplies ``check(data: bytes) -> None`` (one case: it
returns, or raises the parser's documented error and swallows it, or raises anything else,
which is a crash), an inline seed corpus and a few protocol tokens for the mutator, and hands
them to :func:`run_fallback` and :func:`main` here. This module knows nothing about any parser.

The rules:

* :func:`check_input` turns *any* exception out of ``check`` into :class:`Crash`, carrying the
  input. ``check`` is therefore responsible for catching the documented error itself.
* :func:`run_fallback` is deterministic: the same seed corpus, tokens, ``iterations`` and
  ``seed`` produce the same inputs in the same order, so a crash found once is found again.
* :func:`main` uses atheris (coverage-guided, arguments go to libFuzzer) when it is importable
  and neither ``--fallback`` nor ``--iterations`` is given; otherwise it runs the fallback loop,
  or checks the files named on the command line. It returns the process exit status: 0 when
  nothing crashed, 1 after printing the traceback and ``CRASH on input <repr>``.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import traceback
from collections.abc import Callable, Sequence

Check = Callable[[bytes], None]
"""One fuzz case: returns, or raises something other than the documented error (a crash)."""

DEFAULT_ITERATIONS = 100_000


class Crash(Exception):
    """An input made a harness's ``check`` raise something other than the documented error.

    The original exception is the ``__cause__``; the input is :attr:`data`.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(repr(data))
        self.data = data


def mutate(
    data: bytes,
    rng: random.Random,
    *,
    tokens: Sequence[bytes] = (),
    splices: Sequence[bytes] = (),
) -> bytes:
    """Apply one to four random edits to *data*, drawing every choice from *rng*.

    An edit overwrites, inserts or deletes bytes, inserts one of *tokens* (fragments of the
    protocol, so the loop reaches deeper than random bytes would), repeats a piece of the
    input, or replaces the tail with the tail of one of *splices* (usually the seed corpus).
    """
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(6)
        pos = rng.randint(0, len(buf))
        if choice == 0 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif choice == 1:
            buf[pos:pos] = bytes([rng.randrange(256)])
        elif choice == 2 and buf:
            del buf[pos : pos + rng.randint(1, 8)]
        elif choice == 3 and tokens:
            buf[pos:pos] = rng.choice(tokens)
        elif choice == 4 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 16)]
        elif splices:
            other = rng.choice(splices)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
    return bytes(buf)


def check_input(check: Check, data: bytes) -> None:
    """Run ``check(data)``; raise :class:`Crash` (caused by what it raised) if it raises."""
    try:
        check(data)
    except Exception as exc:
        raise Crash(data) from exc


def run_fallback(
    check: Check,
    seeds: Sequence[bytes],
    iterations: int,
    seed: int = 0,
    *,
    tokens: Sequence[bytes] = (),
) -> None:
    """Check every one of *seeds*, then *iterations* mutated seeds; raise :class:`Crash`.

    The mutations come from ``random.Random(seed)``, so a run is reproducible.
    """
    rng = random.Random(seed)
    for data in seeds:
        check_input(check, data)
    for _ in range(iterations):
        check_input(check, mutate(rng.choice(seeds), rng, tokens=tokens, splices=seeds))


def main(
    argv: Sequence[str],
    *,
    check: Check,
    seeds: Sequence[bytes],
    description: str,
    tokens: Sequence[bytes] = (),
) -> int:
    """Fuzz *check* under atheris if it is installed, else with the fallback loop.

    *argv* excludes the program name. Returns the exit status: 1 on a crash, else 0.
    """
    args = list(argv)
    wants_fallback = "--fallback" in args or any(a.startswith("--iterations") for a in args)
    if not wants_fallback:
        try:
            atheris = importlib.import_module("atheris")
        except ImportError:
            pass
        else:
            atheris.instrument_all()
            atheris.Setup([sys.argv[0], *args], check)
            atheris.Fuzz()
            return 0
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--fallback", action="store_true", help="do not use atheris")
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("inputs", nargs="*", help="files to check instead of fuzzing")
    options = parser.parse_args(args)
    try:
        if options.inputs:
            for name in options.inputs:
                with open(name, "rb") as file:
                    check_input(check, file.read())
        else:
            run_fallback(check, seeds, options.iterations, options.seed, tokens=tokens)
    except Crash as crash:
        traceback.print_exception(crash.__cause__ or crash)
        print(f"CRASH on input {crash.data!r}")
        return 1
    if options.inputs:
        print(f"ok: {len(options.inputs)} inputs")
    else:
        print(f"ok: {len(seeds) + options.iterations} inputs, seed {options.seed}")
    return 0
