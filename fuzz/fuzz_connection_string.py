"""Fuzz ``ConnectionString.parse``: every input is parsed, or refused with ``CredentialError``.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_connection_string.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_connection_string.py --iterations 100000 [--seed 0]

Any other exception is a crash: the input's ``repr`` is printed and the exit status is 1.
A string that parses must also survive ``parse(str(cs)) == cs`` and produce a SAS token that
verifies against its own key.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import traceback
from collections.abc import Sequence

from devstream_core.credentials import ConnectionString, verify_sas_token
from devstream_core.errors import CredentialError

KEY = "ZGV2c3RyZWFtIGZ1enoga2V5IDAwMDE="

SEEDS: list[bytes] = [
    f"HostName=hub.example.com;DeviceId=d1;SharedAccessKey={KEY}".encode(),
    f"HostName=hub.example.com:443;SharedAccessKeyName=service;SharedAccessKey={KEY}".encode(),
    f"HostName=127.0.0.1:8080;DeviceId=dev-1;SharedAccessKey={KEY};UseTls=false".encode(),
    f" hostname = [::1]:8080 ; deviceid=d ;sharedaccesskey={KEY};;".encode(),
    f"HostName=h;DeviceId=a.b+c%d_e#f*g?h!i(j)k,l:m=n@o$p'q;SharedAccessKey={KEY}".encode(),
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};GatewayHostName=gw;Other=1".encode(),
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};ModuleId=m".encode(),
    f"HostName=h;DeviceId=d;SharedAccessKeyName=s;SharedAccessKey={KEY}".encode(),
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};HostName=h".encode(),
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};UseTls=maybe".encode(),
    b"HostName=x y;DeviceId=d;SharedAccessKey=Zm9v",
    b"HostName=[::1;DeviceId=d;SharedAccessKey=Zm9v",
    b"HostName=h:99999;DeviceId=d;SharedAccessKey=Zm9v",
    b"HostName=h;DeviceId=d;SharedAccessKey=Zm9",
    b"HostName=h;DeviceId=d;abc",
    b"HostName=;DeviceId=;SharedAccessKey=",
    b"=;=;=",
    b"",
    "HostName=h\u00e9;DeviceId=\u00e9;SharedAccessKey=\u00e9".encode(),
]

# Fragments the mutator splices in, so the loop reaches deeper than random bytes would.
_TOKENS: list[bytes] = [
    b";",
    b"=",
    b" ",
    b"[",
    b"]",
    b":",
    b"%",
    b"==",
    b"HostName=",
    b"DeviceId=",
    b"SharedAccessKey=",
    b"SharedAccessKeyName=",
    b"UseTls=",
    b"ModuleId=",
    b"true",
    b"false",
    b"\x00",
    b"\xff",
    b"\xed\xa0\x80",
]


def check(data: bytes) -> None:
    """One fuzz case: parse *data*; anything but success or CredentialError is a crash."""
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        cs = ConnectionString.parse(text)
    except CredentialError:
        return
    again = ConnectionString.parse(str(cs))
    if again != cs:
        raise AssertionError("parse(str(cs)) != cs")
    token = cs.sas_token(expiry=2_000_000_000)
    verify_sas_token(token, keys=[cs.shared_access_key], resource=cs.resource, now=0.0)


def mutate(rng: random.Random, data: bytes) -> bytes:
    """Apply one to four random edits to *data*."""
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
        elif choice == 3:
            buf[pos:pos] = rng.choice(_TOKENS)
        elif choice == 4 and buf:
            start = rng.randrange(len(buf))
            buf[pos:pos] = buf[start : start + rng.randint(1, 16)]
        else:
            other = rng.choice(SEEDS)
            cut = rng.randint(0, len(other))
            buf = buf[:pos] + bytearray(other[cut:])
    return bytes(buf)


class Crash(Exception):
    """An input made :func:`check` raise something other than the documented error."""

    def __init__(self, data: bytes) -> None:
        super().__init__(repr(data))
        self.data = data


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """Check every seed, then *iterations* mutated seeds; raise :class:`Crash` on a crash."""
    rng = random.Random(seed)
    cases = [*SEEDS, *(mutate(rng, rng.choice(SEEDS)) for _ in range(iterations))]
    for data in cases:
        try:
            check(data)
        except Exception as exc:
            raise Crash(data) from exc


def main(argv: Sequence[str]) -> int:
    """Run under atheris if it is installed, else the fallback loop; 1 on a crash."""
    args = list(argv)
    wants_fallback = "--fallback" in args or any(a.startswith("--iterations") for a in args)
    if not wants_fallback:
        try:
            atheris = importlib.import_module("atheris")
        except ImportError:
            pass
        else:
            atheris.Setup([sys.argv[0], *args], check)
            atheris.Fuzz()
            return 0
    parser = argparse.ArgumentParser(description="fuzz ConnectionString.parse")
    parser.add_argument("--fallback", action="store_true", help="do not use atheris")
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(args)
    try:
        run_fallback(options.iterations, seed=options.seed)
    except Crash as crash:
        traceback.print_exception(crash.__cause__ or crash)
        print(f"CRASH on input {crash.data!r}")
        return 1
    print(f"ok: {len(SEEDS) + options.iterations} inputs, seed {options.seed}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
