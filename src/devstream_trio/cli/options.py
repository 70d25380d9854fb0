"""What every ``devstream`` subcommand shares: the one-line user error, where a hub keeps its
data, and the options and clients of the commands that talk to a hub."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

from devstream_core.credentials import ConnectionString
from devstream_core.errors import CredentialError, DevstreamError
from devstream_core.exceptions import DeviceReplaced
from devstream_core.registry import Policy
from devstream_core.session import DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_CAP, RefusalBackoff

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


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError("must be a number of seconds > 0")
    return value


def device_options(p: argparse.ArgumentParser) -> None:
    """The options of the commands that run a device agent (``echo device``, ``proxy
    device``): what it does when the hub refuses it, or another client takes its id over."""
    p.add_argument(
        "--exit-on-auth-error",
        action="store_true",
        help="device side: exit (status 1) when the hub refuses the device (401002 wrong key, "
        "403902 disabled, 404001 deleted); by default it tries again, waiting longer each "
        "time up to 5 minutes, so it comes back by itself once the device is enabled",
    )
    p.add_argument(
        "--keep-trying-when-replaced",
        action="store_true",
        help="device side: when another client with the same device id takes the device over "
        "(409902), keep coming back every 15-30 s; by default it comes back once, and exits "
        "if it is replaced again within 10 minutes",
    )
    # For tests and the impatient: the first wait after a refusal (it doubles up to 300 s),
    # and the longest wait before a reconnect (a replacement waits half to all of it).
    p.add_argument(
        "--auth-retry-first", type=_positive_seconds, default=5.0, help=argparse.SUPPRESS
    )
    p.add_argument(
        "--reconnect-max",
        type=_positive_seconds,
        default=DEFAULT_BACKOFF_CAP,
        help=argparse.SUPPRESS,
    )


@contextlib.contextmanager
def replaced_hint() -> Iterator[None]:
    """A device agent that stops because another client took its id over says what to do."""
    try:
        yield
    except DeviceReplaced as exc:
        raise DeviceReplaced(
            exc.code, f"{exc.message}; stop it, or pass --keep-trying-when-replaced"
        ) from None


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
    """A device client for *cs* with the :func:`device_options`; a service connection string
    is a mistake. Unlike the library's default, it retries refusals (a disabled, deleted
    device, a wrong key) unless ``--exit-on-auth-error``."""
    if cs.device_id is None:
        raise UsageError("this command needs a device connection string, not a service's")
    first: float = args.auth_retry_first
    reconnect_max: float = args.reconnect_max
    return DeviceClient(
        cs,
        ssl_context=ssl_context(args),
        http_proxy=http_proxy(args),
        sas_lifetime=args.sas_lifetime,
        backoff_min=min(DEFAULT_BACKOFF_BASE, reconnect_max),
        backoff_max=reconnect_max,
        refusal_backoff=None
        if args.exit_on_auth_error
        else RefusalBackoff(base=first, cap=max(first, 300.0)),
        keep_trying_when_replaced=args.keep_trying_when_replaced,
    )
