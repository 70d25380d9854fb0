"""Opening a transport (TCP, optionally TLS) to a hub, for the device and service clients."""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from devstream_core.common import Role
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode

from .exceptions import HubError, HubUnreachable

__all__ = [
    "HubAddress",
    "Opener",
    "client_ssl_context",
    "connection_string_for",
    "open_hub_stream",
]


@dataclass(frozen=True, kw_only=True)
class HubAddress:
    """Where a hub listens: host, port, whether it speaks TLS, and the ``Host`` header."""

    host: str
    port: int
    tls: bool
    host_header: str

    @classmethod
    def from_connection_string(cls, cs: ConnectionString) -> HubAddress:
        """The hub a connection string names (``HostName`` may carry a port)."""
        return cls.from_url(cs.http_base_url)

    @classmethod
    def from_url(cls, url: str) -> HubAddress:
        """The hub an ``http(s)://`` or ``ws(s)://`` URL names."""
        parts = urllib.parse.urlsplit(url)
        tls = parts.scheme in ("https", "wss")
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise HubUnreachable(ErrorCode.HUB_UNREACHABLE, f"not a hub URL: {url!r}")
        port = parts.port or (443 if tls else 80)
        return cls(host=parts.hostname, port=port, tls=tls, host_header=parts.netloc)


#: How a client opens a transport to the hub. The default is :func:`open_hub_stream`; tests
#: pass one that returns an in-memory stream served by a :class:`~devstream_trio.hub.Hub`.
Opener = Callable[[HubAddress], Awaitable[trio.abc.Stream]]


def connection_string_for(role: Role, value: str | ConnectionString) -> ConnectionString:
    """Parse *value* if needed and check it is a *role* connection string."""
    cs = value if isinstance(value, ConnectionString) else ConnectionString.parse(value)
    if cs.role is not role:
        needs = "DeviceId" if role is Role.DEVICE else "SharedAccessKeyName, not DeviceId"
        raise HubError(
            ErrorCode.INVALID_CONNECTION_STRING,
            f"a {role.value} needs a connection string with {needs}",
        )
    return cs


def client_ssl_context(ca_file: str | None = None) -> ssl.SSLContext:
    """A context that verifies the hub against the system store, or against *ca_file*."""
    return ssl.create_default_context(cafile=ca_file)


async def open_hub_stream(
    address: HubAddress, ssl_context: ssl.SSLContext | None = None
) -> trio.abc.Stream:
    """Connect to the hub; raise :class:`HubUnreachable` with the reason if that fails."""
    where = f"{address.host}:{address.port}"
    try:
        tcp = await trio.open_tcp_stream(address.host, address.port)
    except OSError as exc:
        raise HubUnreachable(
            ErrorCode.HUB_UNREACHABLE, f"cannot reach the hub at {where}: {exc.strerror or exc}"
        ) from exc
    if not address.tls:
        return tcp
    context = ssl_context or client_ssl_context()
    stream = trio.SSLStream(tcp, context, server_hostname=address.host)
    try:
        await stream.do_handshake()
    except trio.BrokenResourceError as exc:
        await trio.aclose_forcefully(tcp)
        cause = exc.__cause__
        detail = getattr(cause, "verify_message", None) or str(cause or exc)
        raise HubUnreachable(
            ErrorCode.HUB_UNREACHABLE, f"TLS handshake with the hub at {where} failed: {detail}"
        ) from exc
    return stream
