"""``devstream hub`` and ``devstream connection-string``: run a hub, show its owner credential."""

from __future__ import annotations

import argparse
import errno
import ssl
from pathlib import Path

import trio

from devstream_core.registry import OWNER_POLICY

from ..client.service import SAS_LIFETIME
from ..server.datafolder import DB_NAME, open_data_folder
from ..server.hub import (
    HubConfig,
    ensure_owner_policy,
    raise_open_files_limit,
    serve_hub,
    tune_gc_for_hub,
)
from ..server.store import RegistryStore
from .failures import listen_hint
from .logs import set_default_level
from .options import UsageError, default_data_dir, owner_connection_string, parse_listen, seconds


async def cmd_hub(args: argparse.Namespace) -> int:
    host, port = parse_listen(args.listen)
    ssl_context = None
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UsageError("--tls-cert and --tls-key go together")
    if args.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        for flag, path in (("--tls-cert", args.tls_cert), ("--tls-key", args.tls_key)):
            if not Path(path).is_file():
                raise UsageError(f"cannot load the TLS certificate: {flag} {path!r} is no file")
        try:
            ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
        except ssl.SSLError as exc:
            why = "they do not match" if exc.reason == "KEY_VALUES_MISMATCH" else "not PEM"
            raise UsageError(
                f"cannot load the TLS certificate {args.tls_cert!r} with the key "
                f"{args.tls_key!r} ({why}): --tls-cert takes the certificate chain and "
                "--tls-key its private key, both PEM"
            ) from exc
        except OSError as exc:
            raise UsageError(f"cannot load the TLS certificate or key: {exc.strerror}") from exc
    if args.public_url and not args.public_url.startswith(("http://", "https://")):
        raise UsageError("--public-url must start with http:// or https://")
    data = Path(args.data) if args.data else default_data_dir()
    tune_gc_for_hub()
    raise_open_files_limit()
    async with open_data_folder(data) as store:
        policy, created = await ensure_owner_policy(store)
        async with trio.open_nursery() as nursery:
            try:
                hub = await nursery.start(
                    lambda task_status: serve_hub(
                        store,
                        host=host,
                        port=port,
                        public_url=args.public_url,
                        ssl_context=ssl_context,
                        config=HubConfig(max_sas_lifetime=args.max_sas_lifetime),
                        task_status=task_status,
                    )
                )
            except OSError as exc:
                hint = listen_hint(exc.errno)
                if exc.errno == errno.EADDRINUSE and 0 < port < 65535:
                    hint += f", e.g. --listen {args.listen.rpartition(':')[0]}:{port + 1}"
                raise UsageError(
                    f"cannot listen on {args.listen}: {exc.strerror}"
                    + (f"; {hint}" if hint else "")
                ) from exc
            await store.set_setting("public_url", hub.public_url.encode())
            listen_host, listen_port = hub.listen_address or (host, port)
            print(
                f"devstream hub listening on {listen_host}:{listen_port}; "
                f"clients reach it at {hub.public_url}",
                flush=True,
            )
            print(f"data folder: {data}", flush=True)
            if created:
                cs = owner_connection_string(policy, hub.public_url)
                print(
                    "first start: created the owner policy. Its service connection string "
                    "(shown once; `devstream connection-string` shows it again):",
                    flush=True,
                )
                print(cs, flush=True)
    return 0


async def cmd_connection_string(args: argparse.Namespace) -> int:
    data = Path(args.data) if args.data else default_data_dir()
    if not (data / DB_NAME).exists():
        raise UsageError(f"no hub data in {str(data)!r}: run `devstream hub` first")
    async with await RegistryStore.open(data / DB_NAME) as store:
        policy = await store.get_policy(OWNER_POLICY)
        stored_url = await store.get_setting("public_url")
    url = args.public_url or (stored_url.decode() if stored_url else None)
    if policy is None or url is None:
        raise UsageError(f"the hub in {str(data)!r} has not started yet: run `devstream hub`")
    print(owner_connection_string(policy, url))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``hub`` and ``connection-string`` to the command line."""
    hub = sub.add_parser(
        "hub",
        help="run a hub",
        epilog="""\
examples:
  devstream hub --listen 127.0.0.1:8080
  devstream hub --listen 0.0.0.0:8443 --public-url https://hub.example.com:8443 \\
      --tls-cert chain.pem --tls-key key.pem""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hub.add_argument(
        "--data", help="data folder (default: $DEVSTREAM_DATA or ~/.local/share/devstream)"
    )
    hub.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT (default %(default)s)")
    hub.add_argument("--public-url", help="address clients use, e.g. https://hub.example.com")
    hub.add_argument("--tls-cert", help="certificate chain (PEM) to serve https/wss")
    hub.add_argument("--tls-key", help="private key (PEM) of --tls-cert")
    hub.add_argument(
        "--max-sas-lifetime",
        type=seconds(1),
        metavar="SECONDS",
        help="refuse SAS tokens that expire further out than this (default: no limit; "
        f"devstream's clients sign for {SAS_LIFETIME} s unless given --sas-lifetime)",
    )
    hub.set_defaults(func=cmd_hub)
    # A hub's info lines (devices that come and go, streams that end, limits reached) are
    # its operator's record.
    set_default_level(hub, "info")

    cs = sub.add_parser(
        "connection-string",
        help="print the hub's owner connection string",
        epilog="""\
example (on the hub's machine, with the hub's --data folder):
  CS_OWNER=$(devstream connection-string)""",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cs.add_argument("--data")
    cs.add_argument("--public-url", help="print it for this address instead")
    cs.set_defaults(func=cmd_connection_string)
