"""Who may do what at the hub: the decisions on a request's credentials, sans-IO.

Deciding takes two steps, because the registry is the adapter's to read:

1. :func:`read_credential` reads the request's ``Authorization`` value. The
   :class:`Credential` names the registry record the decision needs: the shared-access policy
   of a policy token (:attr:`Credential.policy_name`), or, for a device token, the device.
2. The adapter fetches that record and asks for the decision: :func:`authorize_policy` for a
   request that needs a permission (registry, initiate), :func:`authorize_control_channel`
   for a device opening its control channel. Each returns what the hub keeps, or raises
   :class:`~devstream_core.errors.DevstreamError` with the code to answer with.

Rules every change must keep:

* **Unauthorized first, for a policy token.** A request whose policy token does not verify
  learns nothing more: not whether a device exists, not which permissions the policy has.
  The order is: no or malformed credential, unknown policy, a token that does not verify
  (expired, wrong key or resource, too long-lived) — all ``UNAUTHORIZED`` (401002) — then a
  missing permission (``PERMISSION_DENIED``), then the device (``DEVICE_NOT_FOUND``,
  ``DEVICE_DISABLED``). A device token is checked against the keys of its device's record,
  so a device that does not exist is ``DEVICE_NOT_FOUND`` before its token is looked at
  (:func:`~devstream_core.registry.check_device_access`).
* **Both keys count.** A token verifies under either key of its policy or device, so a key
  can be regenerated while the other keeps clients working.
* **Tokens are never in a message.** Error messages name policies and devices, never a
  token or a signature.
* **Verified tokens may be remembered.** With a :class:`~devstream_core.credentials.SasVerifier`,
  a token seen again with the same keys is not parsed or signed again; its expiry is checked
  every time.
"""

from __future__ import annotations

from dataclasses import dataclass

from .credentials import (
    SasToken,
    SasVerifier,
    device_resource,
    parse_sas_token,
    verify_sas_token,
)
from .errors import DevstreamError, ErrorCode
from .registry import Device, Permission, Policy, check_device_access, format_permissions

__all__ = [
    "ChannelGrant",
    "Credential",
    "authorize_control_channel",
    "authorize_policy",
    "check_device_usable",
    "read_credential",
]


@dataclass(frozen=True, slots=True)
class Credential:
    """A request's SAS token, read but not yet verified."""

    #: The ``Authorization`` value as sent (a :class:`SasVerifier` remembers tokens by it).
    text: str
    token: SasToken

    @property
    def policy_name(self) -> str | None:
        """The policy to look up for a policy token (``skn``); None for a device token."""
        return self.token.skn

    def __repr__(self) -> str:
        return f"Credential(policy_name={self.policy_name!r})"


@dataclass(frozen=True, slots=True)
class ChannelGrant:
    """A control channel the hub may open."""

    #: When the token that opened the channel expires (``se``, Unix time): the hub closes the
    #: channel then (``UNAUTHORIZED``), unless the device renewed it on a new channel first.
    expires_at: int
    #: The device token, which the hub checks again when the device's keys change; None for a
    #: channel opened with a policy token (``DeviceConnect``).
    device_token: SasToken | None


def _unauthorized(message: str) -> DevstreamError:
    return DevstreamError(ErrorCode.UNAUTHORIZED, message)


def read_credential(authorization: bytes | None, verifier: SasVerifier | None = None) -> Credential:
    """The SAS token of a request's ``Authorization`` header (None: the request had none).

    With *verifier*, a token it verified before is not parsed again. Raises ``UNAUTHORIZED``
    for a missing or malformed token.
    """
    if authorization is None:
        raise _unauthorized("missing Authorization header")
    text = authorization.decode("latin-1")
    try:
        token = verifier.parse(text) if verifier is not None else parse_sas_token(text)
    except DevstreamError as exc:
        raise _unauthorized(exc.message) from None
    return Credential(text=text, token=token)


def _verify(
    credential: Credential,
    keys: list[str],
    *,
    resource: str,
    now: float,
    max_lifetime: float | None,
    verifier: SasVerifier | None,
) -> None:
    try:
        if verifier is not None:
            verifier.verify(
                credential.text,
                credential.token,
                keys=keys,
                resource=resource,
                now=now,
                max_lifetime=max_lifetime,
            )
        else:
            verify_sas_token(
                credential.token, keys=keys, resource=resource, now=now, max_lifetime=max_lifetime
            )
    except DevstreamError as exc:
        raise _unauthorized(exc.message) from None


def authorize_policy(
    credential: Credential,
    policy: Policy | None,
    needed: Permission,
    *,
    host_name: str,
    now: float,
    max_lifetime: float | None = None,
    verifier: SasVerifier | None = None,
) -> Policy:
    """The policy that grants *needed* to a request with *credential*.

    *policy* is the registry's record of :attr:`Credential.policy_name` (None: there is
    none, or the token names no policy). The token must be signed with one of the policy's
    keys for the hub's *host_name*, unexpired at *now* (Unix time) and, with *max_lifetime*,
    not valid further ahead than that. Raises ``UNAUTHORIZED`` or ``PERMISSION_DENIED``.
    """
    if credential.policy_name is None:
        raise _unauthorized("SAS token has no skn (policy name)")
    if policy is None:
        raise _unauthorized("unknown shared-access policy")
    _verify(
        credential,
        [policy.primary_key, policy.secondary_key],
        resource=host_name,
        now=now,
        max_lifetime=max_lifetime,
        verifier=verifier,
    )
    if needed not in policy.permissions:
        raise DevstreamError(
            ErrorCode.PERMISSION_DENIED,
            f"policy {policy.name!r} lacks the {format_permissions(needed)} permission",
        )
    return policy


def check_device_usable(device_id: str, device: Device | None) -> Device:
    """*device*, the registry's record of *device_id*, if streams may reach it: it exists
    (else ``DEVICE_NOT_FOUND``) and is enabled (else ``DEVICE_DISABLED``)."""
    if device is None:
        raise DevstreamError(ErrorCode.DEVICE_NOT_FOUND, f"device {device_id!r} not found")
    if device.status != "enabled":
        raise DevstreamError(ErrorCode.DEVICE_DISABLED, f"device {device_id!r} is disabled")
    return device


def authorize_control_channel(
    credential: Credential,
    *,
    device_id: str,
    device: Device | None,
    policy: Policy | None,
    host_name: str,
    now: float,
    max_lifetime: float | None = None,
) -> ChannelGrant:
    """May device *device_id* open its control channel with *credential*?

    Either a device token, signed with one of the device's keys for
    ``host/devices/{id}``, or a policy token with ``DeviceConnect`` (then *policy* is the
    registry's record of its name). *device* is the registry's record of *device_id* (None:
    there is none); it must exist and be enabled. Raises ``UNAUTHORIZED``,
    ``PERMISSION_DENIED``, ``DEVICE_NOT_FOUND`` or ``DEVICE_DISABLED``, in that order of
    precedence for a policy token; for a device token, as
    :func:`~devstream_core.registry.check_device_access` orders them.
    """
    if credential.policy_name is not None:
        authorize_policy(
            credential,
            policy,
            Permission.DEVICE_CONNECT,
            host_name=host_name,
            now=now,
            max_lifetime=max_lifetime,
        )
        check_device_usable(device_id, device)
        return ChannelGrant(expires_at=credential.token.se, device_token=None)
    try:
        check_device_access(
            device,
            device_id=device_id,
            token=credential.token,
            resource=device_resource(host_name, device_id),
            now=now,
            max_lifetime=max_lifetime,
        )
    except DevstreamError as exc:
        raise DevstreamError(exc.code, exc.message) from None
    return ChannelGrant(expires_at=credential.token.se, device_token=credential.token)
