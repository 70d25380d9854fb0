"""The registry's data model: device identities, shared-access policies and their JSON.

This module knows what a device identity and a shared-access policy *are*, how they look in
the Azure IoT Hub device-identity JSON that ``PUT/GET /devices/{id}`` and ``GET /devices``
speak, and which values are legal. It does not know where they are stored (that is
``devstream_trio.server.store``) or who may change them (that is the hub's job).

Rules:

* No randomness of its own: every key, generation id and etag is made from ``random_bytes``
  the caller passes in. A device needs :data:`DEVICE_RANDOM_BYTES` of them, laid out as
  ``primary key (32) | secondary key (32) | generation id (16) | etag (16)``; a policy needs
  :data:`POLICY_RANDOM_BYTES` (two keys).
* A ``PUT`` body may hold any subset of the fields. What it leaves out is kept from the
  existing device, or made fresh for a new one. Read-only fields (``etag``, ``generationId``,
  ``connectionState``, ``lastActivityTime``, ...) are ignored, so the JSON a ``GET`` returns
  can be sent straight back. The etag changes on every update; the generation id only when
  the device is created.
* Anything wrong in a body is a :class:`RemoteProtocolError`: ``PAYLOAD_TOO_LARGE`` for a body
  over the cap, ``INVALID_JSON`` for bytes that are not one JSON object, ``ARGUMENT_INVALID``
  naming the bad field. Misuse of this API by the hub itself is a :class:`LocalProtocolError`.
* A ``PUT`` goes ahead only if its ``If-Match`` allows it (:func:`check_put_precondition`):
  without one it creates (an existing id is ``DEVICE_ALREADY_EXISTS``); ``*`` updates a device
  that exists; an etag (or a list of them) updates the device only while one of them is its
  current etag (``PRECONDITION_FAILED`` otherwise). Either form on an unknown id is
  ``DEVICE_NOT_FOUND``: ``If-Match`` never creates.
* A device's control channel lives only as long as the registry admits it
  (:func:`check_device_access`): the device exists, is enabled, and the SAS token that opened
  the channel verifies under the device's keys. The hub asks when the channel opens and again
  whenever the device's record changes or goes; a ``No`` closes the channel.
* Shared-access policies are managed the same way (:func:`policy_from_json`,
  :func:`check_policy_put_precondition`): a ``PUT`` without ``If-Match`` creates
  (``POLICY_ALREADY_EXISTS`` if the name is taken), with ``If-Match: *`` it updates
  (``POLICY_NOT_FOUND`` if there is none); policies have no etag. The owner policy
  (:data:`OWNER_POLICY`) keeps every permission and cannot be deleted
  (``OWNER_POLICY_PROTECTED``), so the registry always has a credential that can manage it.
* Rotating a key (:func:`rotate_device_key`, :func:`rotate_policy_key`) replaces one of the
  two keys with a fresh one and keeps the other, so clients can move to the other key first.
* A key never appears in an exception message or a ``repr``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
from dataclasses import dataclass, field, replace
from typing import Final

from .common import strict_json
from .credentials import SasToken, verify_sas_token
from .errors import (
    CredentialError,
    DevstreamError,
    ErrorCode,
    LocalProtocolError,
    RemoteProtocolError,
)

__all__ = [
    "ALL_PERMISSIONS",
    "DEVICE_RANDOM_BYTES",
    "DEVICE_STATUSES",
    "KEY_RANDOM_BYTES",
    "MAX_DEVICE_ID_LENGTH",
    "NEVER",
    "OWNER_POLICY",
    "PERMISSION_NAMES",
    "POLICY_ADMIN",
    "POLICY_RANDOM_BYTES",
    "Device",
    "Permission",
    "Policy",
    "check_device_access",
    "check_policy_delete",
    "check_policy_put_precondition",
    "check_put_precondition",
    "device_from_json",
    "device_to_json",
    "format_permissions",
    "new_device",
    "new_key",
    "new_policy",
    "parse_permissions",
    "policy_from_json",
    "policy_to_json",
    "rotate_device_key",
    "rotate_policy_key",
    "validate_device_id",
    "validate_policy_name",
]


class Permission(enum.Flag):
    """The rights a shared-access policy grants (Azure names in :data:`PERMISSION_NAMES`)."""

    REGISTRY_READ = enum.auto()
    REGISTRY_WRITE = enum.auto()
    SERVICE_CONNECT = enum.auto()
    DEVICE_CONNECT = enum.auto()


#: The one table of permission names, in the order Azure writes them.
PERMISSION_NAMES: Final[dict[Permission, str]] = {
    Permission.REGISTRY_READ: "RegistryRead",
    Permission.REGISTRY_WRITE: "RegistryWrite",
    Permission.SERVICE_CONNECT: "ServiceConnect",
    Permission.DEVICE_CONNECT: "DeviceConnect",
}
_PERMISSIONS_BY_LOWER_NAME: Final[dict[str, Permission]] = {
    name.lower(): permission for permission, name in PERMISSION_NAMES.items()
}

#: The policy created on first run; it holds every permission.
OWNER_POLICY: Final = "iothubowner"
#: All four permissions (what :data:`OWNER_POLICY` holds).
ALL_PERMISSIONS: Final = (
    Permission.REGISTRY_READ
    | Permission.REGISTRY_WRITE
    | Permission.SERVICE_CONNECT
    | Permission.DEVICE_CONNECT
)

#: What managing shared-access policies (``/policies``) needs: every permission, as the owner
#: holds, since a credential that can create policies can grant itself any of them.
POLICY_ADMIN: Final = ALL_PERMISSIONS

#: The legal values of :attr:`Device.status`.
DEVICE_STATUSES: Final = ("enabled", "disabled")
#: Random bytes behind one generated key.
KEY_RANDOM_BYTES: Final = 32
#: Random bytes :func:`new_device` and :func:`device_from_json` need.
DEVICE_RANDOM_BYTES: Final = 96
#: Random bytes :func:`new_policy` needs.
POLICY_RANDOM_BYTES: Final = 2 * KEY_RANDOM_BYTES
#: Azure's limit on a device id.
MAX_DEVICE_ID_LENGTH: Final = 128
#: Azure's limit on a status reason.
MAX_STATUS_REASON_LENGTH: Final = 128
#: Decoded key sizes a client may choose (Azure: 16 to 64 bytes).
MIN_KEY_BYTES: Final = 16
MAX_KEY_BYTES: Final = 64
#: What Azure reports as ``lastActivityTime`` for a device never seen (the core has no clock).
NEVER: Final = "0001-01-01T00:00:00Z"

_GENERATION_ID_SLICE: Final = slice(64, 80)
_ETAG_SLICE: Final = slice(80, 96)

# Azure: up to 128 ASCII letters, digits and - . + % _ # * ? ! ( ) , : = @ $ '
_DEVICE_ID_RE: Final = re.compile(r"[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}")
# Azure: up to 64 ASCII letters, digits and - . _
_POLICY_NAME_RE: Final = re.compile(r"[A-Za-z0-9\-._]{1,64}")


@dataclass(frozen=True, kw_only=True)
class Device:
    """One device identity: its id, its two SAS keys, its status and its version stamps."""

    device_id: str
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)
    #: ``"enabled"`` or ``"disabled"``.
    status: str
    status_reason: str | None = None
    #: Set when the device is created; a deleted and re-created device gets a new one.
    generation_id: str
    #: Changes on every update (for ``If-Match``).
    etag: str

    def __post_init__(self) -> None:
        if self.status not in DEVICE_STATUSES:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "Device.status must be 'enabled' or 'disabled'"
            )

    @property
    def enabled(self) -> bool:
        """Whether the device may connect."""
        return self.status == "enabled"


@dataclass(frozen=True, kw_only=True)
class Policy:
    """One shared-access policy: a key name, its two keys and the rights it grants."""

    name: str
    primary_key: str = field(repr=False)
    secondary_key: str = field(repr=False)
    permissions: Permission

    def allows(self, permission: Permission) -> bool:
        """Whether this policy grants every right in *permission*."""
        return permission in self.permissions


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(ErrorCode.ARGUMENT_INVALID, message)


def validate_device_id(device_id: str) -> str:
    """Return *device_id* if Azure would accept it, else raise ``ARGUMENT_INVALID``.

    Legal: 1 to 128 ASCII letters, digits and ``- . + % _ # * ? ! ( ) , : = @ $ '``.
    """
    if not isinstance(device_id, str) or _DEVICE_ID_RE.fullmatch(device_id) is None:
        raise _invalid(
            "deviceId must be 1 to 128 ASCII letters, digits or characters of -.+%_#*?!(),:=@$'"
        )
    return device_id


def validate_policy_name(name: str) -> str:
    """Return *name* if it is a legal policy (key) name, else raise ``ARGUMENT_INVALID``.

    Legal: 1 to 64 ASCII letters, digits and ``- . _``.
    """
    if not isinstance(name, str) or _POLICY_NAME_RE.fullmatch(name) is None:
        raise _invalid("keyName must be 1 to 64 ASCII letters, digits or characters of -._")
    return name


def new_key(random_bytes: bytes) -> str:
    """A new SAS key: the base64 of exactly :data:`KEY_RANDOM_BYTES` (32) random bytes."""
    if len(random_bytes) != KEY_RANDOM_BYTES:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, f"new_key needs exactly {KEY_RANDOM_BYTES} random bytes"
        )
    return base64.b64encode(random_bytes).decode("ascii")


def _check_random(random_bytes: bytes, size: int, who: str) -> None:
    if len(random_bytes) != size:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, f"{who} needs exactly {size} random bytes"
        )


def _generation_id(random_bytes: bytes) -> str:
    return random_bytes[_GENERATION_ID_SLICE].hex()


def _etag(random_bytes: bytes) -> str:
    return base64.b64encode(random_bytes[_ETAG_SLICE]).decode("ascii").rstrip("=")


def new_device(*, device_id: str, random_bytes: bytes, status: str = "enabled") -> Device:
    """A new device with fresh keys, generation id and etag made from 96 *random_bytes*."""
    _check_random(random_bytes, DEVICE_RANDOM_BYTES, "new_device")
    validate_device_id(device_id)
    return Device(
        device_id=device_id,
        primary_key=new_key(random_bytes[0:32]),
        secondary_key=new_key(random_bytes[32:64]),
        status=status,
        generation_id=_generation_id(random_bytes),
        etag=_etag(random_bytes),
    )


def new_policy(*, name: str, random_bytes: bytes, permissions: Permission) -> Policy:
    """A new policy with two fresh keys made from 64 *random_bytes*."""
    _check_random(random_bytes, POLICY_RANDOM_BYTES, "new_policy")
    validate_policy_name(name)
    return Policy(
        name=name,
        primary_key=new_key(random_bytes[0:32]),
        secondary_key=new_key(random_bytes[32:64]),
        permissions=permissions,
    )


def device_to_json(
    device: Device, *, connected: bool, include_keys: bool = True
) -> dict[str, object]:
    """The Azure device-identity JSON object for *device*.

    With ``include_keys=False`` both keys are ``null`` (the shape stays the same).
    """
    return {
        "deviceId": device.device_id,
        "generationId": device.generation_id,
        "etag": device.etag,
        "status": device.status,
        "statusReason": device.status_reason,
        "connectionState": "Connected" if connected else "Disconnected",
        "authentication": {
            "type": "sas",
            "symmetricKey": {
                "primaryKey": device.primary_key if include_keys else None,
                "secondaryKey": device.secondary_key if include_keys else None,
            },
            "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None},
        },
        "capabilities": {"iotEdge": False},
        "lastActivityTime": NEVER,
    }


def _parse_object(body: bytes, max_size: int) -> dict[str, object]:
    if len(body) > max_size:
        raise RemoteProtocolError(
            ErrorCode.PAYLOAD_TOO_LARGE, f"request body is larger than {max_size} bytes"
        )
    try:
        value = strict_json(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RemoteProtocolError(
            ErrorCode.INVALID_JSON, "request body is not valid JSON"
        ) from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(ErrorCode.INVALID_JSON, "request body must be a JSON object")
    return value


def _optional_str(obj: dict[str, object], key: str, path: str) -> str | None:
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _invalid(f"{path} must be a string")


def _optional_object(obj: dict[str, object], key: str, path: str) -> dict[str, object]:
    """The object at *key*, or an empty one if the key is absent or null."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _invalid(f"{path} must be an object")
    return value


def _check_key(value: str | None, path: str) -> str | None:
    if value is None:
        return None
    try:
        size = len(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise _invalid(f"{path} must be base64") from None
    if not MIN_KEY_BYTES <= size <= MAX_KEY_BYTES:
        raise _invalid(f"{path} must be base64 of {MIN_KEY_BYTES} to {MAX_KEY_BYTES} bytes")
    return value


def device_from_json(
    body: bytes,
    *,
    device_id: str,
    random_bytes: bytes,
    existing: Device | None,
    max_size: int = 64 * 1024,
) -> Device:
    """The device a ``PUT /devices/{device_id}`` with *body* asks for.

    *existing* is the stored device with that id, or ``None`` to create one. Fields the body
    leaves out (or sets to ``null``) are kept from *existing* or, for a new device, generated
    from the 96 *random_bytes*; the etag is always new.
    """
    _check_random(random_bytes, DEVICE_RANDOM_BYTES, "device_from_json")
    validate_device_id(device_id)
    if existing is not None and existing.device_id != device_id:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, "existing device has another device id"
        )
    obj = _parse_object(body, max_size)

    body_id = _optional_str(obj, "deviceId", "deviceId")
    if body_id is not None and body_id != device_id:
        raise _invalid("deviceId in the body does not match the deviceId in the path")

    status_text = _optional_str(obj, "status", "status")
    if status_text is None:
        status = existing.status if existing is not None else "enabled"
    else:
        status = status_text.lower()
        if status not in DEVICE_STATUSES:
            raise _invalid("status must be 'enabled' or 'disabled'")

    if "statusReason" in obj:
        status_reason = _optional_str(obj, "statusReason", "statusReason")
        if status_reason is not None and len(status_reason) > MAX_STATUS_REASON_LENGTH:
            raise _invalid(f"statusReason must be at most {MAX_STATUS_REASON_LENGTH} characters")
    else:
        status_reason = existing.status_reason if existing is not None else None

    auth = _optional_object(obj, "authentication", "authentication")
    auth_type = _optional_str(auth, "type", "authentication.type")
    if auth_type is not None and auth_type.lower() != "sas":
        raise _invalid("authentication.type must be 'sas'")
    thumbprints = _optional_object(auth, "x509Thumbprint", "authentication.x509Thumbprint")
    if any(value is not None for value in thumbprints.values()):
        raise _invalid("authentication.x509Thumbprint is not supported; use 'sas'")
    sym = _optional_object(auth, "symmetricKey", "authentication.symmetricKey")
    primary = _check_key(
        _optional_str(sym, "primaryKey", "authentication.symmetricKey.primaryKey"),
        "authentication.symmetricKey.primaryKey",
    )
    secondary = _check_key(
        _optional_str(sym, "secondaryKey", "authentication.symmetricKey.secondaryKey"),
        "authentication.symmetricKey.secondaryKey",
    )

    capabilities = _optional_object(obj, "capabilities", "capabilities")
    iot_edge = capabilities.get("iotEdge")
    if iot_edge is not None and not isinstance(iot_edge, bool):
        raise _invalid("capabilities.iotEdge must be a boolean")
    if iot_edge:
        raise _invalid("capabilities.iotEdge: IoT Edge devices are not supported")

    if primary is None:
        primary = existing.primary_key if existing is not None else new_key(random_bytes[0:32])
    if secondary is None:
        secondary = existing.secondary_key if existing is not None else new_key(random_bytes[32:64])
    return Device(
        device_id=device_id,
        primary_key=primary,
        secondary_key=secondary,
        status=status,
        status_reason=status_reason,
        generation_id=(
            existing.generation_id if existing is not None else _generation_id(random_bytes)
        ),
        etag=_etag(random_bytes),
    )


#: Longest ``If-Match`` value read (an etag is 22 characters; a list of a few fits easily).
MAX_IF_MATCH_LENGTH: Final = 1024


def _if_match_tags(if_match: str) -> list[str]:
    """The entity tags of an ``If-Match`` value, their quotes taken off.

    ``"a", "b"`` gives ``["a", "b"]``. A weak tag (``W/"a"``) never matches (``If-Match``
    compares strongly, RFC 9110 section 13.1.1), so it is left out; a bare ``a`` (the etag as
    the JSON shows it) is taken as ``"a"``.
    """
    tags = []
    for part in if_match.split(","):
        tag = part.strip()
        if tag.startswith("W/"):
            continue
        if len(tag) >= 2 and tag[0] == tag[-1] == '"':
            tag = tag[1:-1]
        if tag:
            tags.append(tag)
    return tags


def check_put_precondition(
    *, device_id: str, existing: Device | None, if_match: str | None
) -> None:
    """Raise unless a ``PUT /devices/{device_id}`` with *if_match* may write now.

    *existing* is the stored device (None: there is none); *if_match* the request's
    ``If-Match`` value (None: no header). The rules:

    * no ``If-Match``: create; an existing device is ``DEVICE_ALREADY_EXISTS``;
    * ``*``: update a device that exists;
    * one or more etags: update if one of them is the device's current etag, else
      ``PRECONDITION_FAILED``;
    * ``*`` or etags on an unknown id: ``DEVICE_NOT_FOUND`` (``If-Match`` never creates).

    The errors are :class:`RemoteProtocolError`.
    """
    if if_match is None:
        if existing is not None:
            raise RemoteProtocolError(
                ErrorCode.DEVICE_ALREADY_EXISTS,
                f"device {device_id!r} already exists (send If-Match to update it)",
            )
        return
    if existing is None:
        raise RemoteProtocolError(
            ErrorCode.DEVICE_NOT_FOUND,
            f"device {device_id!r} not found (If-Match updates a device, it never creates one)",
        )
    if if_match.strip() == "*":
        return
    if len(if_match) > MAX_IF_MATCH_LENGTH or existing.etag not in _if_match_tags(if_match):
        raise RemoteProtocolError(
            ErrorCode.PRECONDITION_FAILED,
            f"device {device_id!r} changed: If-Match does not name its current etag "
            f"(read it again and retry)",
        )


def check_device_access(
    device: Device | None,
    *,
    device_id: str,
    token: SasToken | None,
    resource: str,
    now: float,
    max_lifetime: float | None = None,
    established: bool = False,
) -> None:
    """Raise unless *device*, the registry's record of *device_id* (None: there is none),
    admits a control channel of that device opened with *token*.

    *token* is the device SAS token that opens (or opened) the channel, checked against the
    device's current keys for *resource* (``host/devices/{id}``) at *now*, as
    :func:`~devstream_core.credentials.verify_sas_token` does (with *max_lifetime*); None
    when the channel was opened with a policy token, checked elsewhere. In this order:

    * no device: ``DEVICE_NOT_FOUND``;
    * a token that does not verify: ``UNAUTHORIZED`` (with *established*, a channel already
      open, the message says the device's keys changed);
    * a disabled device: ``DEVICE_DISABLED``.

    Asked when a channel opens, and again (*established*) whenever the device's record changes
    or goes: a channel whose token no longer verifies (its key was replaced), whose device was
    disabled or deleted, is closed with the error's code.
    """
    if device is None:
        raise DevstreamError(ErrorCode.DEVICE_NOT_FOUND, f"device {device_id!r} not found")
    if token is not None:
        try:
            verify_sas_token(
                token,
                keys=[device.primary_key, device.secondary_key],
                resource=resource,
                now=now,
                max_lifetime=max_lifetime,
            )
        except CredentialError as exc:
            if not established:
                raise
            raise CredentialError(
                ErrorCode.UNAUTHORIZED,
                "SAS token no longer valid: the device's keys changed",
            ) from exc
    if device.status != "enabled":
        raise DevstreamError(ErrorCode.DEVICE_DISABLED, f"device {device_id!r} is disabled")


def format_permissions(permissions: Permission) -> str:
    """The Azure ``rights`` text for *permissions*: ``"RegistryRead, ServiceConnect"``."""
    return ", ".join(name for perm, name in PERMISSION_NAMES.items() if perm in permissions)


def parse_permissions(text: str) -> Permission:
    """Parse Azure ``rights`` text (comma- or space-separated names, any case).

    An unknown name, or no name at all, raises ``ARGUMENT_INVALID``.
    """
    words = [word for word in re.split(r"[,\s]+", text) if word]
    if not words:
        raise _invalid("rights must name at least one permission")
    permissions = Permission(0)
    for word in words:
        permission = _PERMISSIONS_BY_LOWER_NAME.get(word.lower())
        if permission is None:
            raise _invalid(
                "rights may only name RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect"
            )
        permissions |= permission
    return permissions


def policy_to_json(policy: Policy) -> dict[str, object]:
    """The Azure shared-access-policy JSON object for *policy*."""
    return {
        "keyName": policy.name,
        "primaryKey": policy.primary_key,
        "secondaryKey": policy.secondary_key,
        "rights": format_permissions(policy.permissions),
    }


def rotate_device_key(device: Device, *, secondary: bool, random_bytes: bytes) -> Device:
    """*device* with a fresh primary key (or secondary, with *secondary*) and a new etag, made
    from 96 *random_bytes* (the layout :data:`DEVICE_RANDOM_BYTES` describes); the other key
    is kept. Tokens signed with the replaced key no longer verify."""
    _check_random(random_bytes, DEVICE_RANDOM_BYTES, "rotate_device_key")
    if secondary:
        keys = {"secondary_key": new_key(random_bytes[32:64])}
    else:
        keys = {"primary_key": new_key(random_bytes[0:32])}
    return replace(device, **keys, etag=_etag(random_bytes))


def rotate_policy_key(policy: Policy, *, secondary: bool, random_bytes: bytes) -> Policy:
    """*policy* with a fresh primary key (or secondary, with *secondary*) made from 32
    *random_bytes*; the other key is kept. Tokens signed with the replaced key no longer
    verify."""
    key = new_key(random_bytes)
    if secondary:
        return replace(policy, secondary_key=key)
    return replace(policy, primary_key=key)


def check_policy_put_precondition(
    *, name: str, existing: Policy | None, if_match: str | None
) -> None:
    """Raise unless a ``PUT /policies/{name}`` with *if_match* may write now.

    * no ``If-Match``: create; an existing policy is ``POLICY_ALREADY_EXISTS``;
    * ``*``: update a policy that exists, ``POLICY_NOT_FOUND`` otherwise;
    * anything else: ``ARGUMENT_INVALID`` (policies have no etag).

    The errors are :class:`RemoteProtocolError`.
    """
    if if_match is None:
        if existing is not None:
            raise RemoteProtocolError(
                ErrorCode.POLICY_ALREADY_EXISTS,
                f"policy {name!r} already exists (send If-Match: * to update it)",
            )
        return
    if if_match.strip() != "*":
        raise _invalid("If-Match on a policy must be * (policies have no etag)")
    if existing is None:
        raise RemoteProtocolError(
            ErrorCode.POLICY_NOT_FOUND,
            f"policy {name!r} not found (If-Match updates a policy, it never creates one)",
        )


def check_policy_delete(name: str) -> None:
    """Raise ``OWNER_POLICY_PROTECTED`` if the policy *name* may not be deleted (the owner's)."""
    if name == OWNER_POLICY:
        raise RemoteProtocolError(
            ErrorCode.OWNER_POLICY_PROTECTED,
            f"the owner policy {OWNER_POLICY!r} cannot be deleted "
            "(rotate its keys instead: `devstream policy rotate-key`)",
        )


def policy_from_json(
    body: bytes,
    *,
    name: str,
    random_bytes: bytes,
    existing: Policy | None,
    max_size: int = 64 * 1024,
) -> Policy:
    """The policy a ``PUT /policies/{name}`` with *body* asks for.

    The body is a JSON object with any of ``keyName`` (must match *name*), ``rights`` (Azure
    text, such as ``"ServiceConnect, RegistryRead"``: required to create), ``primaryKey`` and
    ``secondaryKey`` (base64 of 16 to 64 bytes). What it leaves out is kept from *existing*
    or, for a new policy, made from the 64 *random_bytes*. The owner policy cannot lose a
    permission (``OWNER_POLICY_PROTECTED``).
    """
    _check_random(random_bytes, POLICY_RANDOM_BYTES, "policy_from_json")
    validate_policy_name(name)
    if existing is not None and existing.name != name:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "existing policy has another name")
    obj = _parse_object(body, max_size)
    body_name = _optional_str(obj, "keyName", "keyName")
    if body_name is not None and body_name != name:
        raise _invalid("keyName in the body does not match the name in the path")
    rights = _optional_str(obj, "rights", "rights")
    if rights is not None:
        permissions = parse_permissions(rights)
    elif existing is not None:
        permissions = existing.permissions
    else:
        raise _invalid("rights is required to create a policy")
    if name == OWNER_POLICY and permissions != ALL_PERMISSIONS:
        raise RemoteProtocolError(
            ErrorCode.OWNER_POLICY_PROTECTED,
            f"the owner policy {OWNER_POLICY!r} keeps every permission "
            f"({format_permissions(ALL_PERMISSIONS)})",
        )
    primary = _check_key(_optional_str(obj, "primaryKey", "primaryKey"), "primaryKey")
    secondary = _check_key(_optional_str(obj, "secondaryKey", "secondaryKey"), "secondaryKey")
    if primary is None:
        primary = existing.primary_key if existing is not None else new_key(random_bytes[0:32])
    if secondary is None:
        secondary = existing.secondary_key if existing is not None else new_key(random_bytes[32:64])
    return Policy(name=name, primary_key=primary, secondary_key=secondary, permissions=permissions)
