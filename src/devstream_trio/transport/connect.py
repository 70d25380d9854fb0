"""Opening a transport (TCP, optionally TLS) to a hub, for the device and service clients."""

from __future__ import annotations

import base64
import errno
import functools
import ipaddress
import os
import socket
import ssl
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field

import h11
import trio

from devstream_core import diagnosis
from devstream_core.errors import ErrorCode
from devstream_core.wire import HubAddress, connection_string_for

from ..exceptions import HubError, HubUnreachable

__all__ = [
    "HubAddress",
    "Opener",
    "ProxyConfig",
    "client_ssl_context",
    "connect_tunnel",
    "connection_string_for",
    "hub_opener",
    "open_hub_stream",
    "resolve_proxy",
]


#: How a client opens a transport to the hub. The default is :func:`open_hub_stream`; tests
#: pass one that returns an in-memory stream served by a :class:`~devstream_trio.server.hub.Hub`.
Opener = Callable[[HubAddress], Awaitable[trio.abc.Stream]]


def client_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A context that verifies the hub against the system store, or against *ca_file*."""
    return ssl.create_default_context(cafile=ca_file)


@dataclass(frozen=True, kw_only=True)
class ProxyConfig:
    """An HTTP proxy that tunnels to the hub with ``CONNECT`` (optionally basic auth)."""

    host: str
    port: int
    username: str = ""
    password: str = field(default="", repr=False)

    @classmethod
    def from_url(cls, url: str) -> ProxyConfig:
        """Parse ``http://[user:password@]host[:port]`` (the port defaults to 80)."""
        problem = "proxy must be an http://[user:password@]host[:port] URL"
        try:
            parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
            port = parts.port  # raises ValueError for a port that is not 0-65535
        except ValueError:
            raise HubError(ErrorCode.ARGUMENT_INVALID, problem) from None
        if parts.scheme != "http" or not parts.hostname or port == 0:
            raise HubError(ErrorCode.ARGUMENT_INVALID, problem)
        return cls(
            host=parts.hostname,
            port=port or 80,
            username=urllib.parse.unquote(parts.username or ""),
            password=urllib.parse.unquote(parts.password or ""),
        )


def _bypassed(host: str, no_proxy: str) -> bool:
    """True when *host* matches an entry of a ``NO_PROXY`` list (``*`` matches every host)."""
    host = host.lower().strip("[]")
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if entry.startswith("["):  # [v6 address] or [v6 address]:port
            entry = entry[1:].partition("]")[0]
        elif entry.count(":") == 1:  # host:port
            entry = entry.rsplit(":", 1)[0]
        if not entry:
            continue
        if entry == "*":
            return True
        entry = entry.lstrip(".")
        if host == entry or host.endswith("." + entry):
            return True
    return False


def resolve_proxy(
    address: HubAddress, setting: str | None, environ: Mapping[str, str] | None = None
) -> ProxyConfig | None:
    """The proxy to reach *address* through, or None for a direct connection.

    *setting* is the client's ``http_proxy`` option: a URL, ``""`` for no proxy, or None to
    take ``HTTPS_PROXY`` / ``https_proxy`` from the environment. ``NO_PROXY`` / ``no_proxy``
    (comma-separated hosts or domain suffixes, ``*`` for all) is honoured either way.
    """
    env = os.environ if environ is None else environ
    url = setting
    if url is None:
        url = env.get("HTTPS_PROXY") or env.get("https_proxy") or ""
    if not url:
        return None
    no_proxy = env.get("NO_PROXY") or env.get("no_proxy") or ""
    if _bypassed(address.host, no_proxy):
        return None
    return ProxyConfig.from_url(url)


@functools.lru_cache(maxsize=256)
def _address_family(host: str) -> int | None:
    """The address family of *host* when it is an IP address, else None (a name). Cached:
    a client connects to the same hub for every stream, and parsing the address costs
    about as much as the rest of the connect's Python."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


async def open_tcp(host: str, port: int) -> trio.SocketStream:
    """A TCP connection to *host*:*port*.

    An IP address is connected to directly: ``trio.open_tcp_stream`` runs its resolver and
    its happy-eyeballs tasks for an address too, about 100 µs of CPU per connection (a
    stream's setup opens one on each side). A connection the kernel completes within the
    ``connect`` call (on loopback it does) is used at once, without waiting for the socket to
    turn writable: a cancellation point then, not a schedule point (the caller's next read
    is one). A name goes through ``open_tcp_stream``. A failure raises ``OSError`` either way.
    """
    family = _address_family(host)
    if family is None:
        return await trio.open_tcp_stream(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await trio.lowlevel.checkpoint_if_cancelled()
        error = sock.connect_ex((host, port))
        if error in (errno.EINPROGRESS, errno.EAGAIN):
            try:
                sock.getpeername()  # connected already
                error = 0
            except OSError:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def connect_tunnel(proxy: ProxyConfig, address: HubAddress) -> trio.abc.Stream:
    """A TCP connection to the proxy, tunnelled to *address* with ``CONNECT``."""
    via = f"[{proxy.host}]:{proxy.port}" if ":" in proxy.host else f"{proxy.host}:{proxy.port}"
    try:
        tcp = await open_tcp(proxy.host, proxy.port)
    except OSError as exc:
        raise HubUnreachable(
            ErrorCode.HUB_UNREACHABLE, f"cannot reach the proxy at {via}: {exc.strerror or exc}"
        ) from exc
    host = f"[{address.host}]" if ":" in address.host else address.host
    authority = f"{host}:{address.port}"
    headers = [("host", authority)]
    if proxy.username or proxy.password:
        credentials = base64.b64encode(f"{proxy.username}:{proxy.password}".encode()).decode()
        headers.append(("proxy-authorization", f"Basic {credentials}"))
    conn = h11.Connection(h11.CLIENT)
    try:
        await tcp.send_all(
            conn.send(h11.Request(method="CONNECT", target=authority, headers=headers)) or b""
        )
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await tcp.receive_some(16384)
                if not data:
                    raise HubUnreachable(
                        ErrorCode.HUB_UNREACHABLE, f"the proxy at {via} closed the connection"
                    )
                conn.receive_data(bytes(data))
                continue
            if isinstance(event, h11.Response):
                break
    except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
        await trio.aclose_forcefully(tcp)
        raise HubUnreachable(
            ErrorCode.HUB_UNREACHABLE, f"bad answer from the proxy at {via}"
        ) from exc
    except BaseException:
        await trio.aclose_forcefully(tcp)
        raise
    if not 200 <= event.status_code < 300:
        await trio.aclose_forcefully(tcp)
        # Some proxies (tinyproxy) answer wrong credentials with 401, not 407.
        hint = {
            407: " (proxy authentication required)",
            401: " (proxy authentication failed)",
        }.get(event.status_code, "")
        raise HubUnreachable(
            ErrorCode.HUB_UNREACHABLE,
            f"the proxy at {via} refused CONNECT {authority}: HTTP {event.status_code}{hint}",
        )
    trailing, _ = conn.trailing_data
    if trailing:  # pragma: no cover - a proxy speaks only after the client's first bytes
        await trio.aclose_forcefully(tcp)
        raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"the proxy at {via} sent extra bytes")
    return tcp


async def open_hub_stream(
    address: HubAddress,
    ssl_context: ssl.SSLContext | None = None,
    proxy: ProxyConfig | None = None,
) -> trio.abc.Stream:
    """Connect to the hub, through *proxy* if given; raise :class:`HubUnreachable` on failure."""
    where = f"{address.host}:{address.port}"
    if proxy is not None:
        tcp = await connect_tunnel(proxy, address)
    else:
        try:
            tcp = await open_tcp(address.host, address.port)
        except OSError as exc:
            raise diagnosis.connect_error(where, exc) from exc
    if not address.tls:
        return tcp
    context = ssl_context or client_ssl_context()
    stream = trio.SSLStream(tcp, context, server_hostname=address.host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        raise diagnosis.tls_error(where, exc.__cause__ or exc) from exc
    except BaseException:  # cancelled (a resume attempt that timed out): no socket left open
        await trio.aclose_forcefully(tcp)
        raise
    return stream


def hub_opener(ssl_context: ssl.SSLContext | None = None, http_proxy: str | None = None) -> Opener:
    """The default :data:`Opener`: TCP (through the proxy :func:`resolve_proxy` picks), TLS."""

    async def open_stream(address: HubAddress) -> trio.abc.Stream:
        return await open_hub_stream(address, ssl_context, resolve_proxy(address, http_proxy))

    return open_stream
