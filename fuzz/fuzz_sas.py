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

import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash

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


_ABOUT = "fuzz parse_sas_token and verify_sas_token"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
