"""Fuzz SAS tokens: every input is parsed and verified, or refused with ``CredentialError``.

Run with atheris when it is installed (extra arguments go to libFuzzer)::

    python fuzz/fuzz_sas.py [atheris/libFuzzer args]

or, without atheris (or with ``--fallback``), a seeded random-mutation loop over the inline
seed corpus::

    python fuzz/fuzz_sas.py --iterations 100000 [--seed 0]

Each input goes through ``parse_sas_token`` and then ``verify_sas_token`` against a fixed
device resource, a fixed host resource and fixed keys. Any exception other than
``CredentialError`` is a crash: the input's ``repr`` is printed and the exit status is 1.
"""

from __future__ import annotations

import argparse
import importlib
import random
import sys
import traceback
from collections.abc import Sequence

from devstream_core.credentials import make_sas_token, parse_sas_token, verify_sas_token
from devstream_core.errors import CredentialError

PRIMARY = "ZGV2c3RyZWFtIGZ1enoga2V5IDAwMDE="
SECONDARY = "c2Vjb25kYXJ5IGtleQ=="
HOST = "hub.example.com:8080"
DEVICE_RESOURCE = f"{HOST}/devices/d1"
EXPIRY = 2_000_000_000

_VALID_DEVICE = make_sas_token(resource=DEVICE_RESOURCE, key=PRIMARY, expiry=EXPIRY)
_VALID_SERVICE = make_sas_token(resource=HOST, key=SECONDARY, expiry=EXPIRY, policy_name="svc")
_BODY = _VALID_DEVICE.removeprefix("SharedAccessSignature ")
_SR, _SIG, _SE = _BODY.split("&")

SEEDS: list[bytes] = [
    _VALID_DEVICE.encode(),
    _VALID_SERVICE.encode(),
    f"SharedAccessSignature {_SE}&{_SIG}&{_SR}".encode(),
    f"SharedAccessSignature {_SIG}&{_SR}&{_SE}&skn=a%20b".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}&se=1".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}&se=0123".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}&se=-1".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}&{_SE}&{_SE}".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}&{_SE}&x=1".encode(),
    f"SharedAccessSignature {_SR}&{_SIG}&{_SE}&".encode(),
    f"SharedAccessSignature sr=hub.example.com:8080/devices/d1&{_SIG}&{_SE}".encode(),
    f"SharedAccessSignature sr=%ZZ%&{_SIG}&{_SE}".encode(),
    f"sharedaccesssignature {_BODY}".encode(),
    f"SharedAccessSignature  {_BODY}".encode(),
    b"SharedAccessSignature ",
    b"SharedAccessSignature sr=&sig=&se=",
    b"",
    "SharedAccessSignature sr=h\u00e9&sig=x&se=1".encode(),
]

# Fragments the mutator splices in, so the loop reaches deeper than random bytes would.
_TOKENS: list[bytes] = [
    b"&",
    b"=",
    b"%",
    b"%2F",
    b"%3D",
    b"%2B",
    b"sr=",
    b"sig=",
    b"se=",
    b"skn=",
    b"9999999999",
    b"SharedAccessSignature ",
    b" ",
    b"\x00",
    b"\xff",
    b"\xed\xa0\x80",
]


def check(data: bytes) -> None:
    """One fuzz case: parse and verify *data*; anything but CredentialError is a crash."""
    text = data.decode("utf-8", errors="surrogateescape")
    try:
        token = parse_sas_token(text)
    except CredentialError:
        return
    _ = token.resource
    for resource in (DEVICE_RESOURCE, HOST):
        for now in (0.0, float(EXPIRY)):
            try:
                verified = verify_sas_token(
                    token, keys=[PRIMARY, SECONDARY], resource=resource, now=now
                )
            except CredentialError:
                continue
            if verified != token:
                raise AssertionError("verify_sas_token returned a different token")


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
    parser = argparse.ArgumentParser(description="fuzz parse_sas_token and verify_sas_token")
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
