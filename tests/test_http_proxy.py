"""Clients reaching the hub through an HTTP ``CONNECT`` proxy.

Three layers: :func:`resolve_proxy` / :meth:`ProxyConfig.from_url` as pure functions; the
tunnel (:func:`connect_tunnel`, :func:`open_hub_stream`) against a small fake proxy written
here, which records what the client sends and answers as each test tells it; and a real
tinyproxy between a real hub and both clients (and the ``devstream`` command line).

Test rules: loopback only. Servers written here listen on 127.0.0.1 port 0; tinyproxy cannot
report a port it picked, so it gets one the kernel has just handed out. Every real-socket test
runs under ``trio.fail_after`` and waits on events, never on time: tinyproxy's readiness is
seen through inotify on its log file. tinyproxy writes a ``Request ... CONNECT host:port`` log
line before it answers the ``CONNECT``, so once a client call has returned, the lines for its
tunnels are already in the file and can be counted without waiting.
"""

from __future__ import annotations

import base64
import ctypes
import hashlib
import os
import re
import shutil
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing
import trustme
from hypothesis import given
from hypothesis import strategies as st

from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_core.registry import Policy
from devstream_trio.cli import main
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.framed import FramedStream
from devstream_trio.client.service import AnyStream, ServiceClient
from devstream_trio.exceptions import HubError, HubUnreachable
from devstream_trio.server.hub import Hub, ensure_owner_policy, serve_hub
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import (
    HubAddress,
    ProxyConfig,
    connect_tunnel,
    hub_opener,
    open_hub_stream,
    resolve_proxy,
)

from ._helpers import free_port, one_error_line, refused_port
from .conftest import random_payload, require_tool

TIMEOUT = 15
HUB = HubAddress(host="hub.example.com", port=8443, tls=False, host_header="hub.example.com:8443")
KEY = base64.b64encode(bytes(32)).decode()


# -- resolve_proxy and ProxyConfig.from_url ---------------------------------------------------


def test_from_url_reads_host_port_and_defaults() -> None:
    assert ProxyConfig.from_url("http://proxy.example.com:3128") == ProxyConfig(
        host="proxy.example.com", port=3128
    )
    assert ProxyConfig.from_url("http://proxy.example.com").port == 80
    assert ProxyConfig.from_url("proxy.example.com:3128") == ProxyConfig(
        host="proxy.example.com", port=3128
    )
    assert ProxyConfig.from_url("http://PROXY.example.com:3128/").host == "proxy.example.com"
    assert ProxyConfig.from_url("http://[::1]:3128") == ProxyConfig(host="::1", port=3128)


def test_from_url_percent_decodes_credentials() -> None:
    proxy = ProxyConfig.from_url("http://al%40ice:p%40ss%3Aw%25rd%20x@proxy.example.com:3128")
    assert (proxy.username, proxy.password) == ("al@ice", "p@ss:w%rd x")
    only_user = ProxyConfig.from_url("http://bob@proxy.example.com:3128")
    assert (only_user.username, only_user.password) == ("bob", "")


@pytest.mark.parametrize(
    "url",
    [
        "",
        "http://",
        "http://:3128",
        "http://user:pass@",
        "https://proxy.example.com:3128",
        "socks5://proxy.example.com:1080",
        "ftp://proxy.example.com",
        "http://proxy.example.com:notaport",
        "http://proxy.example.com:99999",
        "http://proxy.example.com:0",
        "http://[::1",
        "http://user:s3cret@proxy.example.com:-1",
    ],
)
def test_from_url_rejects_what_is_not_an_http_proxy(url: str) -> None:
    with pytest.raises(HubError) as info:
        ProxyConfig.from_url(url)
    assert info.value.code is ErrorCode.ARGUMENT_INVALID
    assert "s3cret" not in str(info.value)


def test_password_never_appears_in_repr() -> None:
    proxy = ProxyConfig.from_url("http://user:s3cret-pw@proxy.example.com:3128")
    assert proxy.password == "s3cret-pw"
    assert "s3cret" not in repr(proxy)
    assert "s3cret" not in str(proxy)
    assert "user" in repr(proxy)


@given(
    user=st.text(st.characters(codec="utf-8"), min_size=1),
    password=st.text(st.characters(codec="utf-8")),
)
def test_any_percent_encoded_credentials_round_trip_outside_repr(user: str, password: str) -> None:
    quoted = f"{urllib.parse.quote(user, safe='')}:{urllib.parse.quote(password, safe='')}"
    proxy = ProxyConfig.from_url(f"http://{quoted}@proxy.example.com:3128")
    assert (proxy.username, proxy.password) == (user, password)
    assert repr(proxy) == f"ProxyConfig(host='proxy.example.com', port=3128, username={user!r})"


def test_explicit_setting_wins_and_empty_disables() -> None:
    env = {"HTTPS_PROXY": "http://env-proxy:3128"}
    assert resolve_proxy(HUB, "http://mine:8080", env) == ProxyConfig(host="mine", port=8080)
    assert resolve_proxy(HUB, "", env) is None
    assert resolve_proxy(HUB, None, {}) is None
    assert resolve_proxy(HUB, None, {"HTTPS_PROXY": ""}) is None


@pytest.mark.parametrize(
    ("env", "host"),
    [
        ({"HTTPS_PROXY": "http://upper:3128"}, "upper"),
        ({"https_proxy": "http://lower:3128"}, "lower"),
        ({"HTTPS_PROXY": "http://upper:3128", "https_proxy": "http://lower:3128"}, "upper"),
    ],
)
def test_environment_proxy_upper_and_lower_case(env: dict[str, str], host: str) -> None:
    proxy = resolve_proxy(HUB, None, env)
    assert proxy == ProxyConfig(host=host, port=3128)


async def test_environment_is_read_when_no_mapping_is_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("https_proxy", "http://u:p@env-proxy:3128")
    assert resolve_proxy(HUB, None) == ProxyConfig(
        host="env-proxy", port=3128, username="u", password="p"
    )
    monkeypatch.setenv("no_proxy", ".example.com")
    assert resolve_proxy(HUB, None) is None


def test_bad_environment_proxy_is_argument_invalid() -> None:
    with pytest.raises(HubError) as info:
        resolve_proxy(HUB, None, {"HTTPS_PROXY": "socks5://proxy:1080"})
    assert info.value.code is ErrorCode.ARGUMENT_INVALID


@pytest.mark.parametrize(
    ("hub_url", "no_proxy", "bypassed"),
    [
        ("http://hub.example.com", "hub.example.com", True),
        ("http://hub.example.com", "HUB.Example.COM", True),
        ("http://hub.example.com", "other.example.com", False),
        ("http://hub.example.com", ".example.com", True),
        ("http://hub.example.com", "example.com", True),
        ("http://example.com", ".example.com", True),
        ("http://notexample.com", "example.com", False),
        ("http://hub.example.com.evil.test", "example.com", False),
        ("http://hub.example.com", "*", True),
        ("http://hub.example.com", "localhost, *", True),
        ("http://hub.example.com", " localhost , hub.example.com ", True),
        ("http://hub.example.com", ",, ,", False),
        ("http://hub.example.com:8443", "hub.example.com:8443", True),
        ("http://hub.example.com", ".example.com:443", True),
        ("http://127.0.0.1:8080", "127.0.0.1", True),
        ("http://127.0.0.1:8080", "localhost,127.0.0.1:8080", True),
        ("http://127.0.0.10:8080", "127.0.0.1", False),
        ("http://[::1]:8080", "::1", True),
        ("http://[::1]:8080", "[::1]", True),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("http://[::1]:8080", "::2,[::3]:8080", False),
        ("http://[2001:db8::1]:8080", "[2001:DB8::1]", True),
    ],
)
def test_no_proxy(hub_url: str, no_proxy: str, bypassed: bool) -> None:
    address = HubAddress.from_url(hub_url)
    expected = None if bypassed else ProxyConfig(host="proxy", port=3128)
    for name in ("NO_PROXY", "no_proxy"):
        assert resolve_proxy(
            address, None, {"HTTPS_PROXY": "http://proxy:3128", name: no_proxy}
        ) == (expected)
        # NO_PROXY applies to an explicit setting too.
        assert resolve_proxy(address, "http://proxy:3128", {name: no_proxy}) == expected


async def test_device_with_a_malformed_proxy_stops_instead_of_retrying(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    cs = ConnectionString(host_name="hub.test:8080", device_id="d1", shared_access_key=KEY)
    for device in (
        DeviceClient(cs, http_proxy="http://127.0.0.1:notaport"),
        DeviceClient(cs),  # takes the malformed HTTPS_PROXY below
    ):
        monkeypatch.setenv("HTTPS_PROXY", "socks5://127.0.0.1:1080")
        with trio.fail_after(600), pytest.raises(HubError) as info:
            await device.serve({"echo": echo})
        assert info.value.code is ErrorCode.ARGUMENT_INVALID
        assert device.connections == 0


# -- the tunnel, against a fake proxy ---------------------------------------------------------

Answer = Callable[[trio.SocketStream, bytes], Awaitable[None]]


@dataclass
class FakeProxy:
    """A proxy that records each request head it receives and answers with *answer*."""

    port: int
    heads: list[bytes] = field(default_factory=list)

    @property
    def config(self) -> ProxyConfig:
        return ProxyConfig(host="127.0.0.1", port=self.port)

    def request(self, index: int = -1) -> tuple[str, dict[str, str]]:
        """The request line and the (lower-cased) headers of a recorded request."""
        line, *rest = self.heads[index].decode().split("\r\n")
        headers = {}
        for header in rest:
            name, _, value = header.partition(":")
            assert name.lower() not in headers, f"header {name!r} sent twice"
            headers[name.lower()] = value.strip()
        return line, headers


async def start_fake_proxy(nursery: trio.Nursery, answer: Answer) -> FakeProxy:
    proxy = FakeProxy(port=0)

    async def handle(stream: trio.SocketStream) -> None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        assert rest == b"", "the client spoke before the proxy answered"
        proxy.heads.append(head)
        try:
            await answer(stream, head)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    proxy.port = listeners[0].socket.getsockname()[1]
    return proxy


async def echo_bytes(stream: trio.abc.Stream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def accept_and_echo(stream: trio.SocketStream, head: bytes) -> None:
    await stream.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
    await echo_bytes(stream)


def refuse(status: int, reason: str) -> Answer:
    async def answer(stream: trio.SocketStream, head: bytes) -> None:
        body = f"<h1>{status} {reason}</h1>".encode()
        await stream.send_all(
            f"HTTP/1.1 {status} {reason}\r\nContent-Length: {len(body)}\r\n"
            'Proxy-Authenticate: Basic realm="test"\r\n\r\n'.encode()
            + body
        )

    return answer


def send_then_close(data: bytes) -> Answer:
    async def answer(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(data)

    return answer


async def ping(stream: trio.abc.Stream) -> bytes:
    await stream.send_all(b"ping")
    received = b""
    while len(received) < 4:
        chunk = await stream.receive_some()
        assert chunk
        received += chunk
    return received


async def test_tunnel_sends_connect_and_host_without_credentials() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, accept_and_echo)
            stream = await connect_tunnel(proxy.config, HUB)
            assert await ping(stream) == b"ping"  # the stream is the tunnel
            await stream.aclose()
            line, headers = proxy.request()
            assert line == "CONNECT hub.example.com:8443 HTTP/1.1"
            assert headers["host"] == "hub.example.com:8443"
            assert "proxy-authorization" not in headers
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("userinfo", "credentials"),
    [
        ("al%40ice:p%40ss%3Aw%25rd@", b"al@ice:p@ss:w%rd"),
        ("bob@", b"bob:"),
        ("bob:@", b"bob:"),
    ],
)
async def test_tunnel_sends_basic_auth_only_with_credentials(
    userinfo: str, credentials: bytes
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, accept_and_echo)
            config = ProxyConfig.from_url(f"http://{userinfo}127.0.0.1:{proxy.port}")
            stream = await open_hub_stream(HUB, proxy=config)
            assert await ping(stream) == b"ping"
            await stream.aclose()
            _, headers = proxy.request()
            assert (
                headers["proxy-authorization"] == "Basic " + base64.b64encode(credentials).decode()
            )
            nursery.cancel_scope.cancel()


async def test_tunnel_to_an_ipv6_hub_brackets_the_address() -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, accept_and_echo)
            stream = await connect_tunnel(proxy.config, HubAddress.from_url("http://[::1]:8080"))
            await stream.aclose()
            line, headers = proxy.request()
            assert line == "CONNECT [::1]:8080 HTTP/1.1"
            assert headers["host"] == "[::1]:8080"
            nursery.cancel_scope.cancel()


async def test_tls_runs_inside_the_tunnel_and_the_proxy_resolves_the_name() -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("hub.example.com").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    async def tls_echo(stream: trio.SocketStream, head: bytes) -> None:
        await stream.send_all(b"HTTP/1.0 200 Connection established\r\n\r\n")
        await echo_bytes(trio.SSLStream(stream, server_context, server_side=True))

    address = HubAddress.from_url("https://hub.example.com")
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, tls_echo)
            stream = await open_hub_stream(address, client_context, proxy.config)
            assert isinstance(stream, trio.SSLStream)
            assert await ping(stream) == b"ping"
            await trio.aclose_forcefully(stream)
            assert proxy.request()[0] == "CONNECT hub.example.com:443 HTTP/1.1"
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("status", "reason", "expected"),
    [
        (407, "Proxy Authentication Required", "HTTP 407 (proxy authentication required)"),
        (401, "Unauthorized", "HTTP 401 (proxy authentication failed)"),
        (403, "Forbidden", "HTTP 403"),
        (502, "Bad Gateway", "HTTP 502"),
    ],
)
async def test_refused_connect_names_the_status(status: int, reason: str, expected: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, refuse(status, reason))
            config = ProxyConfig.from_url(f"http://user:s3cret@127.0.0.1:{proxy.port}")
            with pytest.raises(HubUnreachable) as info:
                await open_hub_stream(HUB, proxy=config)
            message = info.value.message
            assert info.value.code is ErrorCode.HUB_UNREACHABLE
            assert expected in message
            assert f"127.0.0.1:{proxy.port}" in message
            assert "hub.example.com:8443" in message
            assert "s3cret" not in message
            assert ("authentication" in message) == (status in (401, 407))
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "closed the connection"),
        (b"HTTP/1.1 200 Conn", "closed the connection"),
        (b"SSH-2.0-OpenSSH_9.2\r\n\r\n", "bad answer"),
    ],
    ids=["silent", "half-a-status-line", "not-http"],
)
async def test_proxy_that_closes_early_or_babbles(data: bytes, expected: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, send_then_close(data))
            with pytest.raises(HubUnreachable) as info:
                await connect_tunnel(proxy.config, HUB)
            assert expected in info.value.message
            assert f"127.0.0.1:{proxy.port}" in info.value.message
            assert len(proxy.heads) == 1
            nursery.cancel_scope.cancel()


async def test_proxy_down_names_the_proxy() -> None:
    port = refused_port()
    with trio.fail_after(TIMEOUT):
        with pytest.raises(HubUnreachable) as info:
            await open_hub_stream(HUB, proxy=ProxyConfig(host="127.0.0.1", port=port))
        assert info.value.code is ErrorCode.HUB_UNREACHABLE
        assert f"proxy at 127.0.0.1:{port}" in info.value.message
        with pytest.raises(HubUnreachable, match=re.escape(f"proxy at [::1]:{port}")):
            await open_hub_stream(HUB, proxy=ProxyConfig.from_url(f"http://[::1]:{port}"))
        # hub_opener resolves the proxy per connection, from the environment by default.
        opener = hub_opener(http_proxy=f"http://127.0.0.1:{port}")
        with pytest.raises(HubUnreachable, match=f"proxy at 127.0.0.1:{port}"):
            await opener(HUB)


async def test_default_opener_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_fake_proxy(nursery, accept_and_echo)
            monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{proxy.port}")
            stream = await hub_opener()(HUB)
            assert await ping(stream) == b"ping"
            await stream.aclose()
            assert len(proxy.heads) == 1
            # "" means no proxy even when the environment names one.
            port = refused_port()
            with pytest.raises(HubUnreachable, match=f"cannot reach the hub at 127.0.0.1:{port}"):
                await hub_opener(http_proxy="")(HubAddress.from_url(f"http://127.0.0.1:{port}"))
            assert len(proxy.heads) == 1
            nursery.cancel_scope.cancel()


# -- a real tinyproxy between the clients and a real hub --------------------------------------

IN_MODIFY = 0x2
CONNECT_LINE = re.compile(r"Request \(file descriptor \d+\): CONNECT (\S+) HTTP/1\.[01]$", re.M)


@contextmanager
def watch_file(path: Path) -> Iterator[Callable[[], Awaitable[None]]]:
    """Yield a function that waits until *path* is written to (inotify, Linux)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    try:
        if libc.inotify_add_watch(fd, str(path).encode(), ctypes.c_uint32(IN_MODIFY)) < 0:
            raise OSError(ctypes.get_errno(), f"inotify_add_watch {path}")

        async def changed() -> None:
            await trio.lowlevel.wait_readable(fd)
            while True:
                try:
                    os.read(fd, 4096)
                except BlockingIOError:
                    return

        yield changed
    finally:
        trio.lowlevel.notify_closing(fd)
        os.close(fd)


@dataclass
class TinyProxy:
    port: int
    log: Path

    def url(self, userinfo: str = "") -> str:
        return f"http://{userinfo}127.0.0.1:{self.port}"

    def connects(self, authority: str) -> int:
        """How many ``CONNECT authority`` requests tinyproxy has logged."""
        found = CONNECT_LINE.findall(self.log.read_text())
        return sum(1 for target in found if target == authority)


async def start_tinyproxy(
    nursery: trio.Nursery,
    folder: Path,
    connect_port: int,
    basic_auth: tuple[str, str] | None = None,
) -> TinyProxy:
    """Run tinyproxy in the foreground on a fresh port; return once it accepts connections."""
    program = shutil.which("tinyproxy") or shutil.which("tinyproxy", path="/usr/sbin:/sbin")
    assert program is not None
    folder.mkdir()
    proxy = TinyProxy(port=free_port(), log=folder / "tinyproxy.log")
    lines = [
        f"Port {proxy.port}",
        "Listen 127.0.0.1",
        "Timeout 30",
        "MaxClients 20",
        "Allow 127.0.0.1",
        f"ConnectPort {connect_port}",
        "LogLevel Info",
        f'LogFile "{proxy.log}"',
    ]
    if basic_auth is not None:
        lines.append(f"BasicAuth {basic_auth[0]} {basic_auth[1]}")
    config = folder / "tinyproxy.conf"
    config.write_text("\n".join(lines) + "\n")
    proxy.log.touch()

    async def kill(process: trio.Process) -> None:
        process.kill()

    with watch_file(proxy.log) as changed:
        process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [program, "-d", "-c", str(config)],
                check=False,
                deliver_cancel=kill,
            )
        )
        while "Accepting connections" not in proxy.log.read_text():
            assert process.returncode is None, proxy.log.read_text()
            await changed()
    return proxy


async def echo(stream: AnyStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def echo_round_trip(stream: AnyStream, payload: bytes) -> bytes:
    """Send *payload* while reading the echo; return what came back."""
    received = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.send_all, payload)
        while len(received) < len(payload):
            chunk = await stream.receive_some()
            assert chunk, "stream ended before the whole echo arrived"
            received += chunk
    return bytes(received)


@dataclass
class LiveHub:
    hub: Hub
    owner: Policy
    device_cs: ConnectionString

    @property
    def port(self) -> int:
        assert self.hub.listen_address is not None
        return self.hub.listen_address[1]

    @property
    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def service_cs(self) -> ConnectionString:
        return ConnectionString(
            host_name=self.hub.host_name,
            shared_access_key_name=self.owner.name,
            shared_access_key=self.owner.primary_key,
            use_tls=False,
        )


@pytest.fixture
async def live_hub() -> AsyncIterator[LiveHub]:
    """A hub on 127.0.0.1, port 0, with device ``d1`` registered (without any proxy)."""
    async with await RegistryStore.open(None) as store, trio.open_nursery() as nursery:
        owner, _ = await ensure_owner_policy(store)
        hub: Hub = await nursery.start(partial(serve_hub, store, host="127.0.0.1", port=0))
        cs = ConnectionString(
            host_name=hub.host_name,
            shared_access_key_name=owner.name,
            shared_access_key=owner.primary_key,
            use_tls=False,
        )
        with trio.fail_after(TIMEOUT):
            admin = ServiceClient(cs, http_proxy="")
            device_cs = admin.device_connection_string(await admin.create_device("d1"))
        yield LiveHub(hub=hub, owner=owner, device_cs=device_cs)
        nursery.cancel_scope.cancel()


async def start_device(nursery: trio.Nursery, device: DeviceClient) -> None:
    await nursery.start(partial(device.serve, {"echo": echo}))


async def check_echo(stream: AnyStream, size: int) -> None:
    assert isinstance(stream, FramedStream)  # devstream.v1
    payload = random_payload(size)
    received = await echo_round_trip(stream, payload)
    assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
    await stream.send_eof()
    assert await stream.receive_some() == b""
    await stream.aclose()


async def test_both_clients_stream_1mib_through_tinyproxy(
    live_hub: LiveHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("tinyproxy")
    hub = live_hub
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            device_proxy = await start_tinyproxy(nursery, tmp_path / "device", hub.port)
            service_proxy = await start_tinyproxy(nursery, tmp_path / "service", hub.port)
            # The service takes its proxy from the environment, the device is told its own.
            monkeypatch.setenv("HTTPS_PROXY", service_proxy.url())
            await ServiceClient(hub.service_cs, http_proxy="").list_devices()
            assert service_proxy.connects(hub.authority) == 0  # "" overrides the environment

            await start_device(nursery, DeviceClient(hub.device_cs, http_proxy=device_proxy.url()))
            assert device_proxy.connects(hub.authority) == 1  # the control channel

            service = ServiceClient(hub.service_cs, nursery=nursery)
            stream = await service.open_stream("d1", "echo")
            await check_echo(stream, 1024 * 1024)
            assert device_proxy.connects(hub.authority) == 2  # + the device's stream join
            # One for the initiate; the service joins over the same (kept-alive) connection.
            assert service_proxy.connects(hub.authority) == 1
            nursery.cancel_scope.cancel()


async def test_tinyproxy_basic_auth(
    live_hub: LiveHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("tinyproxy")
    hub = live_hub
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_tinyproxy(
                nursery, tmp_path / "auth", hub.port, basic_auth=("devstream", "s3cret-pw")
            )
            # "%2D" is "-": the password reaches tinyproxy percent-decoded.
            monkeypatch.setenv("https_proxy", proxy.url("devstream:s3cret%2Dpw@"))
            await start_device(nursery, DeviceClient(hub.device_cs))
            service = ServiceClient(hub.service_cs, nursery=nursery)
            await check_echo(await service.open_stream("d1", "echo"), 64 * 1024)
            assert proxy.connects(hub.authority) == 3  # control, initiate + join, device join

            # No credentials: 407. Wrong ones: tinyproxy says 401 where others say 407.
            for userinfo, expected in [
                ("", r"HTTP 407 \(proxy authentication required\)"),
                ("devstream:wrong-pw@", r"HTTP 40[17] \(proxy authentication (required|failed)\)"),
                ("devstream@", r"HTTP 40[17] \(proxy authentication (required|failed)\)"),
            ]:
                client = ServiceClient(hub.service_cs, http_proxy=proxy.url(userinfo))
                with pytest.raises(HubUnreachable) as info:
                    await client.list_devices()
                assert re.search(expected, info.value.message), info.value.message
                assert "pw" not in info.value.message
            assert proxy.connects(hub.authority) == 6  # refused, but they did reach tinyproxy
            nursery.cancel_scope.cancel()


async def test_no_proxy_bypasses_tinyproxy(
    live_hub: LiveHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("tinyproxy")
    hub = live_hub
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_tinyproxy(nursery, tmp_path / "bypassed", hub.port)
            monkeypatch.setenv("HTTPS_PROXY", proxy.url())
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
            await start_device(nursery, DeviceClient(hub.device_cs))
            service = ServiceClient(hub.service_cs, nursery=nursery)
            await check_echo(await service.open_stream("d1", "echo"), 64 * 1024)
            assert CONNECT_LINE.search(proxy.log.read_text()) is None
            # The same proxy is used as soon as NO_PROXY stops covering the hub.
            monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.2")
            await ServiceClient(hub.service_cs).list_devices()
            assert proxy.connects(hub.authority) == 1
            nursery.cancel_scope.cancel()


# -- the command line -------------------------------------------------------------------------


async def test_cli_device_list_through_tinyproxy(
    live_hub: LiveHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    require_tool("tinyproxy")
    hub = live_hub
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            proxy = await start_tinyproxy(
                nursery, tmp_path / "cli", hub.port, basic_auth=("user", "pass")
            )
            capsys.readouterr()

            async def device_list(http_proxy: str) -> int:
                argv = ["device", "list", "--http-proxy", http_proxy]
                argv += ["--connection-string", str(hub.service_cs)]
                return await trio.to_thread.run_sync(main, argv)

            assert await device_list(proxy.url("user:pass@")) == 0
            captured = capsys.readouterr()
            assert [line.split() for line in captured.out.splitlines()] == [
                ["DEVICE", "ID", "STATUS", "CONNECTION"],
                ["d1", "enabled", "Disconnected"],
            ]
            assert proxy.connects(hub.authority) == 1

            assert await device_list(proxy.url("user:nope@")) == 1
            line = one_error_line(capsys.readouterr().err)
            assert re.search(r"HTTP 40[17] \(proxy authentication", line), line
            assert "nope" not in line
            assert proxy.connects(hub.authority) == 2
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    "http_proxy",
    ["ftp://127.0.0.1:3128", "https://127.0.0.1:3128", "http://127.0.0.1:notaport", "http://[::1"],
)
def test_cli_malformed_http_proxy(http_proxy: str, capsys: pytest.CaptureFixture[str]) -> None:
    cs = ConnectionString(
        host_name="127.0.0.1:9", shared_access_key_name="o", shared_access_key=KEY
    )
    argv = ["device", "list", "--http-proxy", http_proxy, "--connection-string", str(cs)]
    assert main(argv) == 1
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("devstream: error: --http-proxy: proxy must be an http://")
