"""What every ``devstream`` subcommand shares: the one-line user error, where a hub keeps its
data, and the options and clients of the commands that talk to a hub."""

from __future__ import annotations

import argparse
import os
import ssl
from collections.abc import Callable
from pathlib import Path

from devstream_core.credentials import ConnectionString
from devstream_core.errors import CredentialError, DevstreamError
from devstream_core.registry import Policy

from ..client.device import DeviceClient
from ..client.service import SAS_LIFETIME, ServiceClient
from ..transport.connect import ProxyConfig, client_ssl_context

CS_ENV = "DEVSTREAM_CONNECTION_STRING"
CA_ENV = "DEVSTREAM_CA_FILE"


class UsageError(Exception):
    """A mistake in how the command was called; printed as one line."""


def default_data_dir() -> Path:
    """``$DEVSTREAM_DATA``, else ``$XDG_DATA_HOME/devstream``, else ``~/.local/share/devstream``."""
    if os.environ.get("DEVSTREAM_DATA"):
        return Path(os.environ["DEVSTREAM_DATA"])
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "devstream"


def owner_connection_string(policy: Policy, public_url: str) -> ConnectionString:
    """The service connection string of *policy* for a hub reached at *public_url*."""
    tls = public_url.startswith("https://")
    host = public_url.split("://", 1)[1].rstrip("/")
    return ConnectionString(
        host_name=host,
        shared_access_key_name=policy.name,
        shared_access_key=policy.primary_key,
        use_tls=tls,
    )


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT``; an empty host is 127.0.0.1) for ``--listen``."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen must be HOST:PORT, not {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def seconds(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of seconds, at least *minimum*."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be a whole number of seconds >= {minimum}")
        return value

    return parse


def client_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to a hub."""
    p.add_argument("--connection-string", help=f"or set {CS_ENV}")
    p.add_argument("--ca-file", help=f"CA bundle to verify the hub (or {CA_ENV})")
    p.add_argument(
        "--http-proxy",
        help="reach the hub through this HTTP CONNECT proxy, http://[user:pass@]host:port "
        "(default: $HTTPS_PROXY, honouring $NO_PROXY)",
    )
    p.add_argument(
        "--sas-lifetime",
        type=seconds(2),
        default=SAS_LIFETIME,
        metavar="SECONDS",
        help="how long the SAS tokens it signs live (default %(default)s; at most the "
        "hub's --max-sas-lifetime)",
    )


def connection_string(args: argparse.Namespace) -> ConnectionString:
    """The connection string from ``--connection-string`` or the environment."""
    text = args.connection_string or os.environ.get(CS_ENV)
    if not text:
        raise UsageError(f"no connection string: pass --connection-string or set {CS_ENV}")
    try:
        return ConnectionString.parse(text)
    except CredentialError as exc:
        source = "--connection-string" if args.connection_string else f"${CS_ENV}"
        raise UsageError(
            f"{source}: {exc.message.removeprefix('connection string: ')}; expected "
            "HostName=HOST:PORT;SharedAccessKeyName=NAME;SharedAccessKey=KEY (a service's, "
            "from `devstream connection-string`) or HostName=HOST:PORT;DeviceId=ID;"
            "SharedAccessKey=KEY (a device's, from `devstream device create`)"
        ) from exc


def ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """The client TLS context for ``--ca-file`` (None: the system's trust store)."""
    ca_file = args.ca_file or os.environ.get(CA_ENV)
    if ca_file:
        if not Path(ca_file).is_file():
            raise UsageError(f"CA file {ca_file!r} does not exist")
        try:
            return client_ssl_context(ca_file)
        except ssl.SSLError as exc:
            source = "--ca-file" if args.ca_file else f"${CA_ENV}"
            raise UsageError(
                f"{source} {ca_file!r} holds no certificate ({exc.reason or exc}): give the "
                "PEM certificate of the CA that signed the hub's certificate"
            ) from exc
        except OSError as exc:
            raise UsageError(f"cannot read the CA file {ca_file!r}: {exc.strerror}") from exc
    return None


def http_proxy(args: argparse.Namespace) -> str | None:
    """``--http-proxy``, checked."""
    proxy: str | None = args.http_proxy
    if proxy is not None:
        try:
            ProxyConfig.from_url(proxy)
        except DevstreamError as exc:
            raise UsageError(f"--http-proxy: {exc.message}") from exc
    return proxy


def service_client(args: argparse.Namespace) -> ServiceClient:
    """A service client from the command's options; a device connection string is a mistake."""
    cs = connection_string(args)
    if cs.device_id is not None:
        raise UsageError("this command needs a service connection string, not a device's")
    return ServiceClient(
        cs,
        ssl_context=ssl_context(args),
        http_proxy=http_proxy(args),
        sas_lifetime=args.sas_lifetime,
    )


def device_client(args: argparse.Namespace, cs: ConnectionString) -> DeviceClient:
    """A device client for *cs*; a service connection string is a mistake."""
    if cs.device_id is None:
        raise UsageError("this command needs a device connection string, not a service's")
    return DeviceClient(
        cs,
        ssl_context=ssl_context(args),
        http_proxy=http_proxy(args),
        sas_lifetime=args.sas_lifetime,
    )
