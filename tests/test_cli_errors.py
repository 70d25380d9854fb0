"""What a newcomer's mistakes look like on the ``devstream`` command line: one line
``devstream: error: …`` naming the problem and a way out, exit status 1, never a traceback
(argparse's usage errors keep status 2 and name the flag).

Every case runs the console script's module as a user would (``python -m devstream_trio.cli``,
a child process) against real sockets on loopback: hubs on port 0 in the test's event loop,
ports held busy by the test itself. A few in-process checks follow for how ``main`` treats an
``OSError`` (a line) and any other exception (a bug: its traceback).

Test rules: loopback only, port 0; every test body runs under ``trio.fail_after`` and waits on
processes and output, never on time.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.metadata
import os
import ssl
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest
import trio
import trustme

import devstream_asyncio
from devstream_core.credentials import ConnectionString
from devstream_core.exceptions import HubUnreachable, TlsMismatch
from devstream_core.registry import DEVICE_RANDOM_BYTES, Device, new_device
from devstream_trio.cli import echo as echo_module
from devstream_trio.cli import main
from devstream_trio.server.hub import Hub, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore

from ._helpers import free_port, one_error_line, policy_cs, refused_port

TIMEOUT = 30


async def devstream(argv: Sequence[str]) -> tuple[int, str, str]:
    """Run ``devstream ARGV`` as a child process until it exits: status, stdout, stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "devstream_trio.cli", *argv],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    return result.returncode, result.stdout.decode(), result.stderr.decode()


async def mistake(argv: Sequence[str]) -> str:
    """Run ``devstream ARGV``, which must fail as a user mistake; its one error line."""
    with trio.fail_after(TIMEOUT):
        status, out, err = await devstream(argv)
    assert status == 1, (out, err)
    assert out == ""
    return one_error_line(err)


@dataclass
class Hubs:
    """A plain-HTTP hub and a TLS hub (certificate for 127.0.0.1 and localhost), sharing one
    in-memory registry, with the owner's connection string for each."""

    plain: Hub
    tls: Hub
    plain_cs: ConnectionString
    tls_cs: ConnectionString
    ca_file: Path
    device: Device


@pytest.fixture
async def hubs(tmp_path: Path) -> AsyncIterator[Hubs]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(server)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        owner, _ = await ensure_owner_policy(store)
        device = new_device(device_id="d1", random_bytes=os.urandom(DEVICE_RANDOM_BYTES))
        await store.create_device(device)
        plain: Hub = await nursery.start(partial(serve_hub, store, host="127.0.0.1", port=0))
        tls: Hub = await nursery.start(
            partial(serve_hub, store, host="127.0.0.1", port=0, ssl_context=server)
        )
        tls_cs = policy_cs(tls.host_name, owner)
        yield Hubs(
            plain=plain,
            tls=tls,
            plain_cs=policy_cs(plain.host_name, owner),
            tls_cs=ConnectionString(
                host_name=tls_cs.host_name,
                shared_access_key_name=tls_cs.shared_access_key_name,
                shared_access_key=tls_cs.shared_access_key,
            ),
            ca_file=ca_file,
            device=device,
        )
        nursery.cancel_scope.cancel()


async def busy_port(nursery: trio.Nursery) -> int:
    """A port on 127.0.0.1 that the test listens on for the rest of *nursery*'s life."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    nursery.start_soon(trio.serve_listeners, lambda stream: stream.aclose(), listeners)
    port: int = listeners[0].socket.getsockname()[1]
    return port


# -- ports in use -----------------------------------------------------------------------------


async def test_hub_on_a_port_in_use_names_it_and_suggests_another_listen(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await busy_port(nursery)
            line = await mistake(
                ["hub", "--data", str(tmp_path / "data"), "--listen", f"127.0.0.1:{port}"]
            )
            nursery.cancel_scope.cancel()
    assert line.startswith(
        f"devstream: error: cannot listen on 127.0.0.1:{port}: Address already in use; "
        "the port is in use"
    )
    assert line.endswith(f"e.g. --listen 127.0.0.1:{port + 1}")


async def test_two_forwards_on_one_local_port(hubs: Hubs) -> None:
    port = free_port()
    line = await mistake(
        [
            "proxy",
            "service",
            "--device",
            "d1",
            "--forward",
            f"{port}=ssh",
            "--forward",
            f"{port}=web",
            "--connection-string",
            str(hubs.plain_cs),
        ]
    )
    assert line == (
        f"devstream: error: --forward {port}=ssh and --forward {port}=web both listen on "
        f"127.0.0.1:{port}: give each forward a LOCALPORT of its own"
    )


@pytest.mark.parametrize("busy_is_second", [False, True], ids=["first", "second"])
async def test_forward_on_a_port_in_use(hubs: Hubs, busy_is_second: bool) -> None:
    """Whichever forward's port is taken, the line names it; none of them serves."""
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            port = await busy_port(nursery)
            forwards = [f"{port}=ssh", "0=web"]
            if busy_is_second:
                forwards.reverse()
            argv = ["proxy", "service", "--device", "d1", "--connection-string", str(hubs.plain_cs)]
            for forward in forwards:
                argv += ["--forward", forward]
            line = await mistake(argv)
            nursery.cancel_scope.cancel()
    assert line == (
        f"devstream: error: cannot listen on 127.0.0.1:{port}: Address already in use; the port "
        "is in use (by another hub or program): choose another port in --forward"
    )


# -- files that are not what they should be ---------------------------------------------------


async def test_ca_file_that_is_not_a_certificate(hubs: Hubs, tmp_path: Path) -> None:
    not_a_cert = tmp_path / "notes.txt"
    not_a_cert.write_text("this is not a certificate\n")
    line = await mistake(
        ["device", "list", "--connection-string", str(hubs.tls_cs), "--ca-file", str(not_a_cert)]
    )
    assert line.startswith(f"devstream: error: --ca-file {str(not_a_cert)!r} holds no certificate")
    assert line.endswith("give the PEM certificate of the CA that signed the hub's certificate")


@pytest.mark.parametrize("which", ["cert", "key"])
async def test_tls_cert_or_key_that_is_not_one(which: str, tmp_path: Path) -> None:
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.cert_chain_pems[0].write_to_path(str(cert))
    issued.private_key_pem.write_to_path(str(key))
    (cert if which == "cert" else key).write_text("not PEM at all\n")
    argv = ["hub", "--data", str(tmp_path / "data"), "--listen", "127.0.0.1:0"]
    line = await mistake([*argv, "--tls-cert", str(cert), "--tls-key", str(key)])
    assert line == (
        f"devstream: error: cannot load the TLS certificate {str(cert)!r} with the key "
        f"{str(key)!r} (not PEM): --tls-cert takes the certificate chain and --tls-key its "
        "private key, both PEM"
    )


async def test_data_folder_that_is_a_file(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a folder\n")
    line = await mistake(["hub", "--data", str(data), "--listen", "127.0.0.1:0"])
    assert line == (
        f"devstream: error: cannot use the data folder {str(data)!r}: it is a file, not a "
        "folder: give --data a folder (error 500901)"
    )


async def test_connection_string_that_does_not_parse() -> None:
    line = await mistake(["device", "list", "--connection-string", "hub.example.com"])
    assert line.startswith(
        "devstream: error: --connection-string: pair 'hub.example.com' has no '='; expected "
        "HostName=HOST:PORT;SharedAccessKeyName=NAME;SharedAccessKey=KEY"
    )
    assert "DeviceId=ID" in line


# -- hubs that cannot be reached or do not match ----------------------------------------------


async def test_no_hub_running_there() -> None:
    port = refused_port()
    cs = f"HostName=127.0.0.1:{port};SharedAccessKeyName=owner;SharedAccessKey=a2V5;UseTls=false"
    line = await mistake(["device", "list", "--connection-string", cs])
    assert line.startswith(
        f"devstream: error: cannot reach the hub at 127.0.0.1:{port}: connection refused, "
        "no hub is running there"
    )


async def test_use_tls_false_against_a_tls_hub(hubs: Hubs) -> None:
    cs = f"{hubs.tls_cs};UseTls=false"
    line = await mistake(["device", "list", "--connection-string", cs])
    assert line.startswith(
        f"devstream: error: connection closed by the hub at {hubs.tls.host_name} before it "
        "answered; if the hub serves https (started with --tls-cert), remove UseTls=false"
    )


async def test_tls_against_a_plain_hub(hubs: Hubs) -> None:
    cs = str(hubs.plain_cs).replace(";UseTls=false", "")
    assert "UseTls" not in cs
    line = await mistake(["device", "list", "--connection-string", cs])
    assert line.startswith(
        f"devstream: error: TLS handshake with the hub at {hubs.plain.host_name} failed: the "
        "server there does not speak TLS; if the hub serves plain http (started without "
        "--tls-cert), add UseTls=false to the connection string"
    )


async def test_tls_hub_whose_ca_is_not_given(hubs: Hubs) -> None:
    line = await mistake(["device", "list", "--connection-string", str(hubs.tls_cs)])
    assert "certificate refused" in line
    assert "trust the CA that signed the hub's certificate (--ca-file" in line


@pytest.mark.parametrize("role", ["service", "device"])
async def test_localhost_when_the_hub_signs_for_127_0_0_1(hubs: Hubs, role: str) -> None:
    """The hub signs for 127.0.0.1:PORT; a connection string saying localhost:PORT reaches it
    but signs for the other name: the line shows both names and the fix."""
    port = hubs.plain.host_name.rpartition(":")[2]
    key = hubs.plain_cs.shared_access_key
    if role == "service":
        argv = ["device", "list"]
        cs = f"HostName=localhost:{port};SharedAccessKeyName=iothubowner;SharedAccessKey={key}"
    else:
        # (An agent tries again on 401002 unless told not to: one line, then exit 1.)
        argv = ["echo", "device", "--exit-on-auth-error"]
        key = hubs.device.primary_key
        cs = f"HostName=localhost:{port};DeviceId={hubs.device.device_id};SharedAccessKey={key}"
    line = await mistake([*argv, "--connection-string", f"{cs};UseTls=false"])
    assert line == (
        f"devstream: error: SAS token is for another resource: it is signed for host "
        f"'localhost:{port}' but this hub signs for '127.0.0.1:{port}'; HostName in the "
        "connection string must be the host of the hub's --public-url (error 401002)"
    )
    assert key not in line


# -- the asyncio client reads the same symptoms the same way ----------------------------------


async def test_asyncio_client_names_the_tls_mix_ups(hubs: Hubs) -> None:
    async def open_one(cs: str) -> BaseException:
        client = devstream_asyncio.ServiceClient(cs)
        try:
            await client.open_stream("d1", "echo")
        except HubUnreachable as exc:
            return exc
        raise AssertionError("opened a stream through a mismatched hub")

    def run(cs: str) -> BaseException:
        return asyncio.run(open_one(cs))

    with trio.fail_after(TIMEOUT):
        plain_to_tls = await trio.to_thread.run_sync(run, f"{hubs.tls_cs};UseTls=false")
        tls_to_plain = await trio.to_thread.run_sync(
            run, str(hubs.plain_cs).replace(";UseTls=false", "")
        )
    assert "remove UseTls=false" in str(plain_to_tls)
    assert isinstance(tls_to_plain, TlsMismatch)
    assert "add UseTls=false" in str(tls_to_plain)


# -- argparse's usage errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["hub", "--listen"], "argument --listen"),
        (["hub", "--max-sas-lifetime", "soon"], "argument --max-sas-lifetime"),
        (["device", "list", "--sas-lifetime", "1"], "argument --sas-lifetime"),
        (["--log-level", "loud", "demo"], "argument --log-level"),
        (["proxy", "service", "--forward"], "argument --forward"),
    ],
)
async def test_usage_errors_exit_2_naming_the_flag(argv: list[str], flag: str) -> None:
    with trio.fail_after(TIMEOUT):
        status, _, err = await devstream(argv)
    assert status == 2
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("devstream")
    assert f"error: {flag}" in err.splitlines()[-1]


# -- --version and --help ---------------------------------------------------------------------


async def test_version() -> None:
    with trio.fail_after(TIMEOUT):
        status, out, err = await devstream(["--version"])
    assert status == 0, err
    assert out.strip() == f"devstream {importlib.metadata.version('devstream')}"


@pytest.mark.parametrize(
    ("command", "example"),
    [
        ([], "CS_OWNER=$(devstream connection-string)"),
        (["hub"], "devstream hub --listen 127.0.0.1:8080"),
        (["connection-string"], "CS_OWNER=$(devstream connection-string)"),
        (
            ["device"],
            'CS_DEVICE=$(devstream device create my-device --connection-string "$CS_OWNER")',
        ),
        (["echo"], "devstream echo service --device my-device"),
        (["proxy"], "devstream proxy service --device my-device --forward 2222=ssh"),
        (["demo"], "  devstream demo"),
    ],
)
async def test_help_shows_an_example(command: list[str], example: str) -> None:
    with trio.fail_after(TIMEOUT):
        status, out, err = await devstream([*command, "--help"])
    assert status == 0, err
    assert "example" in out
    assert example in out


# -- main: an OSError is a line, anything else a traceback -------------------------------------


def fail_with(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    """Make ``devstream demo`` raise *exc*."""

    async def demo(args: object) -> int:
        raise exc

    monkeypatch.setattr(echo_module, "cmd_demo", demo)


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/registry.sqlite3"),
            "No space left on device: '/data/registry.sqlite3'; free some space",
        ),
        (
            ExceptionGroup(
                "nursery",
                [ExceptionGroup("inner", [OSError(errno.EROFS, "Read-only file system", "/data")])],
            ),
            "Read-only file system: '/data'; choose a folder on a writable file system",
        ),
        (
            ssl.SSLError(1, "[SSL] PEM lib"),
            "TLS: [SSL] PEM lib: a certificate, key or CA file given is not in PEM form",
        ),
    ],
    ids=["enospc", "erofs-in-groups", "ssl"],
)
def test_main_turns_an_os_error_into_one_line(
    exc: BaseException,
    expected: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fail_with(monkeypatch, exc)
    assert main(["demo"]) == 1
    assert one_error_line(capsys.readouterr().err) == f"devstream: error: {expected}"


def test_main_lets_a_bug_show_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    fail_with(
        monkeypatch, ExceptionGroup("nursery", [OSError(errno.EIO, "I/O error"), KeyError("bug")])
    )
    with pytest.raises(ExceptionGroup):
        main(["demo"])
    fail_with(monkeypatch, KeyError("bug"))
    with pytest.raises(KeyError):
        main(["demo"])
