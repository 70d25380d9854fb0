"""``devstream policy …``: shared-access policies, the service credentials an operator hands
out (each with only the rights it needs), through the hub's registry API. Managing them needs
a connection string with every right, as the owner policy (``iothubowner``) has."""

from __future__ import annotations

import argparse

from devstream_core.registry import format_permissions, parse_permissions

from .options import client_options, service_client
from .registry import print_json, print_table

EXAMPLES = """examples:
  devstream policy create streams-only --rights ServiceConnect   # prints its connection string
  devstream policy create ops --rights ServiceConnect,RegistryRead
  devstream policy list
  devstream policy rotate-key ops      # a new primary key: tokens signed with the old one stop
  devstream policy delete ops

rights: RegistryRead (list and show devices), RegistryWrite (create, change, delete devices),
ServiceConnect (open streams), DeviceConnect (connect as any device).
"""


async def cmd_policy(args: argparse.Namespace) -> int:
    service = service_client(args)
    if args.action == "create":
        rights = format_permissions(parse_permissions(args.rights))
        policy = await service.create_policy(args.name, rights)
        print(service.policy_connection_string(policy))
    elif args.action == "list":
        policies = await service.list_policies()
        if args.json:
            print_json(policies)
        else:
            print_table(("NAME", "RIGHTS"), [(p["keyName"], p["rights"]) for p in policies])
    elif args.action == "delete":
        await service.delete_policy(args.name)
        print(f"deleted policy {args.name!r}")
    else:
        policy = await service.rotate_policy_key(args.name, secondary=args.secondary)
        print(service.policy_connection_string(policy, secondary=args.secondary))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``policy`` to the command line."""
    policy = sub.add_parser(
        "policy",
        help="manage shared-access policies (service credentials with chosen rights)",
        description="Manage shared-access policies. Needs a connection string with every "
        "right (the owner policy's).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = policy.add_subparsers(dest="action", required=True)

    create = actions.add_parser("create", help="create a policy and print its connection string")
    create.add_argument("name", help="1-64 of A-Z a-z 0-9 - . _")
    create.add_argument(
        "--rights",
        required=True,
        help="comma-separated: RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect",
    )

    listing = actions.add_parser("list", help="list the policies and their rights")
    listing.add_argument("--json", action="store_true", help="print the hub's JSON (keys included)")

    delete = actions.add_parser("delete", help="delete a policy (not the owner's)")
    delete.add_argument("name")

    rotate = actions.add_parser(
        "rotate-key",
        help="give a policy a new key and print its new connection string; tokens signed "
        "with the old key stop working at once",
    )
    rotate.add_argument("name")
    rotate.add_argument(
        "--secondary", action="store_true", help="replace the secondary key, not the primary"
    )
    for parser in (create, listing, delete, rotate):
        client_options(parser)
        parser.set_defaults(func=cmd_policy)
