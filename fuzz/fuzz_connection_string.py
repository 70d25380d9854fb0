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

import sys
from collections.abc import Sequence
from pathlib import Path

# Run as a script, Python puts this folder on sys.path; loaded by file path, it is not.
sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness
from _harness import Crash as Crash

from devstream_core.credentials import ConnectionString, make_sas_token, verify_sas_token
from devstream_core.errors import CredentialError

KEY = "ZGV2c3RyZWFtIGZ1enoga2V5IDAwMDE="
_DEVICE_TOKEN = make_sas_token(resource="h/devices/d", key=KEY, expiry=2_000_000_000)
_SERVICE_TOKEN = make_sas_token(resource="h", key=KEY, expiry=1, policy_name="s")

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
    f"HostName=h;DeviceId=d;SharedAccessSignature={_DEVICE_TOKEN}".encode(),
    f"HostName=h;SharedAccessKeyName=s;SharedAccessSignature={_SERVICE_TOKEN}".encode(),
    f"HostName=h;DeviceId=e;SharedAccessSignature={_DEVICE_TOKEN}".encode(),
    f"HostName=h;DeviceId=d;SharedAccessKey={KEY};SharedAccessSignature={_DEVICE_TOKEN}".encode(),
    b"HostName=h;DeviceId=d;SharedAccessSignature=SharedAccessSignature sr=h&se=1",
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
    b"SharedAccessSignature=",
    b"SharedAccessSignature sr=h&sig=",
    b"&skn=s",
    b"&se=",
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
    if cs.shared_access_key is None:  # it carries a token: given as is, never signed
        expiry = cs.signature_expiry
        if expiry is None or cs.sas_token(expiry=expiry) != cs.shared_access_signature:
            raise AssertionError("a given token is not given back as is")
        return
    token = cs.sas_token(expiry=2_000_000_000)
    verify_sas_token(token, keys=[cs.shared_access_key], resource=cs.resource, now=0.0)


_ABOUT = "fuzz ConnectionString.parse"


def run_fallback(iterations: int, *, seed: int = 0) -> None:
    """The fallback loop over :data:`SEEDS` (see ``_harness.run_fallback``); raises `Crash`."""
    _harness.run_fallback(check, SEEDS, iterations, seed, tokens=_TOKENS)


def main(argv: Sequence[str]) -> int:
    """Fuzz from the command line (see ``_harness.main``); returns the exit status."""
    return _harness.main(argv, check=check, seeds=SEEDS, tokens=_TOKENS, description=_ABOUT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
