"""``devstream sas-token``: a SAS token to hand a script or a person instead of a key, as
``az iot hub generate-sas-token`` makes one.

* With a device connection string: a device token, signed with the device's key.
* With a service connection string: a token of its policy, for the hub.
* With a service connection string and ``--device ID``: a device token, signed with that
  device's key, read from the registry (the policy needs ``RegistryRead``; the token does not
  name the policy, as in Azure).

A connection string can carry the token in place of the key
(``…;SharedAccessSignature=SharedAccessSignature sr=…``, ``--as-connection-string`` prints
it so): devstream's clients use it as is until it expires.
"""

from __future__ import annotations

import argparse
import re
import time

from devstream_core.credentials import ConnectionString

from .options import UsageError, client_options, connection_string, service_client

DESCRIPTION = """Print a SAS token to hand a script or a person instead of a key.

  device connection string:              a device token, signed with the device's key
  service connection string:             a token of its policy, for the whole hub
  service connection string + --device:  a device token, signed with that device's key,
                                         read from the registry (needs RegistryRead)

A connection string may carry the token in place of its key
(...;SharedAccessSignature=SharedAccessSignature sr=...); --as-connection-string prints one.
devstream's clients use such a token as is, until it expires.
"""

EXAMPLES = """examples:
  devstream sas-token --ttl 1h                          # with DEVSTREAM_CONNECTION_STRING set
  devstream sas-token --device my-device --ttl 30m      # a device token, from a service's
  devstream sas-token --device my-device --ttl 1d --as-connection-string
"""

_DURATION_RE = re.compile(r"([0-9]{1,9})([smhd]?)")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> int:
    """An argparse type: ``90``, ``90s``, ``15m``, ``1h``, ``7d`` as whole seconds (>= 1)."""
    match = _DURATION_RE.fullmatch(text.strip().lower())
    if match is None or int(match[1]) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: a whole number with s, m, h or d (90s, 15m, 1h, 7d)"
        )
    return int(match[1]) * _UNIT_SECONDS[match[2]]


async def cmd_sas_token(args: argparse.Namespace) -> int:
    cs = connection_string(args)
    if cs.shared_access_key is None:
        raise UsageError(
            "this connection string carries a SAS token, not a key: it cannot sign another"
        )
    if cs.device_id is not None:
        if args.device is not None and args.device != cs.device_id:
            raise UsageError(
                f"--device {args.device!r} differs from the connection string's device "
                f"{cs.device_id!r}: a device's key signs only its own tokens"
            )
        if args.key_type != "primary":
            raise UsageError("--key-type needs a service connection string and --device")
        identity = cs
    elif args.device is not None:
        service = service_client(args)
        device = await service.get_device(args.device)
        identity = service.device_connection_string(device, secondary=args.key_type == "secondary")
    else:
        if args.key_type != "primary":
            raise UsageError("--key-type needs a service connection string and --device")
        identity = cs
    token = identity.sas_token(expiry=int(time.time()) + args.ttl)
    if args.as_connection_string:
        print(
            ConnectionString(
                host_name=identity.host_name,
                device_id=identity.device_id,
                shared_access_key_name=identity.shared_access_key_name,
                shared_access_signature=token,
                use_tls=identity.use_tls,
            )
        )
    else:
        print(token)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``sas-token`` to the command line."""
    sas = sub.add_parser(
        "sas-token",
        help="print a SAS token to hand out instead of a key",
        description=DESCRIPTION,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sas.add_argument(
        "--device",
        metavar="ID",
        help="a token for this device (with a service connection string: signed with the "
        "device's key, read from the registry)",
    )
    sas.add_argument(
        "--ttl",
        type=duration,
        default=3600,
        metavar="DURATION",
        help="how long the token lives: 90s, 15m, 1h, 7d (default 1h)",
    )
    sas.add_argument(
        "--key-type",
        choices=["primary", "secondary"],
        default="primary",
        help="with --device and a service connection string: which of the device's keys signs",
    )
    sas.add_argument(
        "--as-connection-string",
        action="store_true",
        help="print a connection string carrying the token (SharedAccessSignature=…) instead",
    )
    client_options(sas)
    sas.set_defaults(func=cmd_sas_token)
