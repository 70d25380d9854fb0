"""Connection strings and SAS tokens, in Azure IoT Hub's formats.

This module knows two kinds of text and nothing else:

* A **connection string**: ``;``-separated ``Key=Value`` pairs naming a hub, an identity and
  its base64 key. A device holds ``HostName=…;DeviceId=…;SharedAccessKey=…``; a service holds
  ``HostName=…;SharedAccessKeyName=…;SharedAccessKey=…``. devstream adds one key,
  ``UseTls=false``, for a hub that speaks plain http/ws. In place of the key, a connection
  string may carry a SAS token signed by someone who holds it, as Azure's clients accept:
  ``SharedAccessSignature=SharedAccessSignature sr=…&sig=…&se=…[&skn=…]``. Such a connection
  string works until the token expires, and cannot sign another.
* A **SAS token**: ``SharedAccessSignature sr=…&sig=…&se=…[&skn=…]``, where ``sr`` is the
  url-encoded resource, ``se`` the expiry in Unix seconds, ``skn`` the shared-access policy
  name, and ``sig`` the url-encoded base64 HMAC-SHA256 of ``sr + "\\n" + se`` under the
  base64-decoded key.

Rules every change must keep:

1. **No secret in a message.** No exception message names a key, a signature or a token; a
   fragment of the input is only quoted when it cannot hold the key (see :func:`_echo`).
2. **Parse, then format, gives the same value**: ``ConnectionString.parse(str(cs)) == cs``.
   Validation accepts only values that survive the ``;``/``=`` syntax unchanged.
3. **Sign what is written.** The signature covers ``sr`` exactly as it appears in the token
   (already url-encoded) and ``se`` as written; parsing keeps both as written.
4. **A token is used as given.** A connection string that carries a SAS token instead of a
   key sends that token, never changed, until its ``se``; from then on asking it for a token
   raises :class:`~devstream_core.exceptions.Unauthorized` (``UNAUTHORIZED``, what a client
   raises for the hub's refusal too) saying that it expired and cannot be renewed without a
   key (:func:`expired_signature_error`).
5. **Errors are typed.** Malformed or wrong input raises :class:`CredentialError` (code
   ``INVALID_CONNECTION_STRING`` for connection strings, ``UNAUTHORIZED`` for SAS tokens);
   misuse of the API (a key that is not base64, a negative expiry) raises
   :class:`LocalProtocolError` with ``ARGUMENT_INVALID``. Anything else escaping is a bug.

There is no clock here: :func:`verify_sas_token` takes ``now`` and callers choose ``expiry``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import ipaddress
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, unquote

from .common import Role
from .errors import CredentialError, ErrorCode, LocalProtocolError
from .exceptions import Unauthorized

__all__ = [
    "MAX_CONNECTION_STRING_LENGTH",
    "MAX_SAS_TOKEN_LENGTH",
    "SAS_CACHE_SIZE",
    "SAS_PREFIX",
    "SAS_RENEW_FRACTION",
    "ConnectionString",
    "RequestTokens",
    "SasToken",
    "SasVerifier",
    "device_resource",
    "expired_signature_error",
    "make_sas_token",
    "parse_sas_token",
    "sas_renewal_time",
    "sign",
    "verify_sas_token",
]

#: Longest connection string :meth:`ConnectionString.parse` reads.
MAX_CONNECTION_STRING_LENGTH = 4096
#: Longest SAS token :func:`parse_sas_token` reads.
MAX_SAS_TOKEN_LENGTH = 4096
#: Every SAS token starts with this (case-sensitive, one space), as in Azure.
SAS_PREFIX = "SharedAccessSignature "

# --- connection-string vocabulary ------------------------------------------------------------

_HOST_NAME = "HostName"
_DEVICE_ID = "DeviceId"
_KEY_NAME = "SharedAccessKeyName"
_KEY = "SharedAccessKey"
_SIGNATURE = "SharedAccessSignature"
_USE_TLS = "UseTls"
_MODULE_ID = "ModuleId"

#: Lower-cased key -> canonical spelling, for the keys devstream reads.
_KNOWN_KEYS: dict[str, str] = {
    name.lower(): name for name in (_HOST_NAME, _DEVICE_ID, _KEY_NAME, _KEY, _SIGNATURE, _USE_TLS)
}

# Azure's rule for device ids: up to 128 ASCII alphanumerics and - . + % _ # * ? ! ( ) , : = @ $ '
# devstream uses the same rule for shared-access policy names.
_ID_RE = re.compile(r"[A-Za-z0-9\-.+%_#*?!(),:=@$']{1,128}")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_\-]{0,61}[A-Za-z0-9_])?"
_NAME_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_MAX_HOST_LENGTH = 253

# --- SAS vocabulary --------------------------------------------------------------------------

_SAS_FIELDS = ("sr", "sig", "se", "skn")
_SAS_REQUIRED = ("sr", "sig", "se")
# Everything after the prefix is printable ASCII without spaces (url-encoded by construction).
_SAS_BODY_RE = re.compile(r"[\x21-\x7e]*")
# Unix seconds, written canonically (no sign, no leading zero) so str(se) is what was signed.
_SE_RE = re.compile(r"0|[1-9][0-9]{0,14}")
_FIELD_NAME_RE = re.compile(r"[A-Za-z0-9]{1,16}")

_ECHO_LIMIT = 64
# A run of base64 this long may be (part of) a key; such text is never quoted in a message.
_KEYLIKE_RE = re.compile(r"[A-Za-z0-9+/=]{20,}")
# Standard base64 with its padding, strictly (no stray '=', no whitespace, length % 4 == 0).
_BASE64_RE = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def _must_withhold(fragment: str, key_values: Sequence[str]) -> bool:
    """True when *fragment* of the input could hold a key and must not be quoted.

    That is when it contains any of *key_values* (the key values seen in the same input, with or
    without their padding), the word ``SharedAccess`` (a key that slipped into the wrong field
    for want of a ``;``), or a run of base64 long enough to be a key.
    """
    if "sharedaccess" in fragment.lower() or _KEYLIKE_RE.search(fragment) is not None:
        return True
    return any(s.rstrip("=") and s.rstrip("=") in fragment for s in key_values)


def _echo(fragment: str, key_values: Sequence[str] = ()) -> str:
    """Quote *fragment* of the input for an error message, unless it could hold a secret.

    Withheld fragments (see :func:`_must_withhold`) are replaced by a placeholder; others are
    shortened to a fixed length.
    """
    if _must_withhold(fragment, key_values):
        return "(value withheld)"
    if len(fragment) > _ECHO_LIMIT:
        fragment = fragment[:_ECHO_LIMIT] + "..."
    return repr(fragment)


def _b64decode(text: str) -> bytes | None:
    """Strictly decode standard base64 *text*; ``None`` when it is not valid base64."""
    if _BASE64_RE.fullmatch(text) is None:
        return None
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):  # pragma: no cover - the pattern already refused it
        return None


def _host_problem(host_name: str) -> bool:
    """True when *host_name* is not ``host``, ``host:port``, or ``[ipv6]:port``."""
    if not host_name or len(host_name) > _MAX_HOST_LENGTH + 8:
        return True
    port: str | None = None
    if host_name.startswith("["):
        end = host_name.find("]")
        if end < 0:
            return True
        literal = host_name[1:end]
        rest = host_name[end + 1 :]
        if "%" in literal or not literal.isascii():
            return True
        try:
            ipaddress.IPv6Address(literal)
        except ValueError:
            return True
        if rest:
            if not rest.startswith(":"):
                return True
            port = rest[1:]
    else:
        host, colon, port_text = host_name.partition(":")
        if len(host) > _MAX_HOST_LENGTH or _NAME_RE.fullmatch(host) is None:
            return True
        if colon:
            port = port_text
    if port is not None:
        if _PORT_RE.fullmatch(port) is None:
            return True
        if not 1 <= int(port) <= 65535:
            return True
    return False


def _field_problem(
    *,
    host_name: str,
    shared_access_key: str | None,
    device_id: str | None,
    shared_access_key_name: str | None,
    shared_access_signature: str | None = None,
    key_values: Sequence[str] = (),
) -> str | None:
    """The first thing wrong with these connection-string fields, or ``None``.

    The returned text never contains the key or the token (rule 1).
    """
    if not host_name:
        return f"missing {_HOST_NAME}"
    if shared_access_key is not None and shared_access_signature is not None:
        return f"has both {_KEY} and {_SIGNATURE}: give one of them"
    if not shared_access_key and not shared_access_signature:
        return f"missing {_KEY}"
    if device_id is not None and shared_access_key_name is not None:
        return f"has both {_DEVICE_ID} and {_KEY_NAME}"
    if device_id is None and shared_access_key_name is None:
        return f"has neither {_DEVICE_ID} nor {_KEY_NAME}"
    if _host_problem(host_name):
        withheld = (*key_values, shared_access_key or "", shared_access_signature or "")
        return f"{_HOST_NAME} {_echo(host_name, withheld)} is not a valid host[:port]"
    if device_id is not None and _ID_RE.fullmatch(device_id) is None:
        return (
            f"{_DEVICE_ID} is not a valid device id "
            "(1 to 128 ASCII letters, digits or - . + % _ # * ? ! ( ) , : = @ $ ')"
        )
    if shared_access_key_name is not None and _ID_RE.fullmatch(shared_access_key_name) is None:
        return (
            f"{_KEY_NAME} is not a valid policy name "
            "(1 to 128 ASCII letters, digits or - . + % _ # * ? ! ( ) , : = @ $ ')"
        )
    if shared_access_key:
        if _b64decode(shared_access_key) is None:
            return f"{_KEY} is not valid base64"
        return None
    assert shared_access_signature is not None
    return _signature_problem(
        shared_access_signature,
        host_name=host_name,
        device_id=device_id,
        shared_access_key_name=shared_access_key_name,
    )


def _signature_problem(
    text: str, *, host_name: str, device_id: str | None, shared_access_key_name: str | None
) -> str | None:
    """What is wrong with ``SharedAccessSignature`` *text* for these fields, or ``None``.

    It must be a SAS token for the identity the other fields name: for a device, a token
    whose resource covers ``host/devices/{id}`` (signed with the device's key, or by a
    policy); for a service, a token for the host signed by the policy ``SharedAccessKeyName``
    names (its ``skn``).
    """
    try:
        token = parse_sas_token(text)
    except CredentialError as exc:
        return f"{_SIGNATURE} is not a SAS token ({exc.message})"
    if device_id is not None:
        resource = device_resource(host_name, device_id)
    else:
        resource = host_name
        if token.skn != shared_access_key_name:
            return f"{_SIGNATURE} is not signed by the policy {_KEY_NAME} names (its skn differs)"
    if not _resource_covers(token.resource, resource):
        return f"{_SIGNATURE} is for another resource (its sr must be {resource!r})"
    return None


@dataclass(frozen=True, kw_only=True)
class ConnectionString:
    """A device or service connection string.

    Build one with :meth:`parse`, or directly (invalid fields then raise
    :class:`LocalProtocolError`); ``str()`` gives the canonical text. The key is left out of
    ``repr()`` so a connection string can be logged by accident without leaking it.
    """

    #: The hub, ``host`` or ``host:port`` (``[ipv6]:port`` for IPv6 literals).
    host_name: str
    #: The identity's key, standard base64 text; None when the connection string carries a
    #: SAS token instead (:attr:`shared_access_signature`).
    shared_access_key: str | None = field(default=None, repr=False)
    #: The device id, for a device connection string.
    device_id: str | None = None
    #: The shared-access policy name, for a service connection string.
    shared_access_key_name: str | None = None
    #: False when the hub speaks plain http/ws (``UseTls=false``).
    use_tls: bool = True
    #: A SAS token (``SharedAccessSignature sr=…``) given in place of the key, used as is
    #: until it expires; None when the connection string holds a key.
    shared_access_signature: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.host_name, str):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "host_name must be a str")
        for name in (
            "shared_access_key",
            "device_id",
            "shared_access_key_name",
            "shared_access_signature",
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise LocalProtocolError(
                    ErrorCode.ARGUMENT_INVALID, f"{name} must be a str or None"
                )
        if not isinstance(self.use_tls, bool):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "use_tls must be a bool")
        problem = _field_problem(
            host_name=self.host_name,
            shared_access_key=self.shared_access_key,
            device_id=self.device_id,
            shared_access_key_name=self.shared_access_key_name,
            shared_access_signature=self.shared_access_signature,
        )
        if problem is not None:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, f"connection string: {problem}")

    @property
    def role(self) -> Role:
        """:attr:`Role.DEVICE` for a device connection string, else :attr:`Role.SERVICE`."""
        return Role.DEVICE if self.device_id is not None else Role.SERVICE

    @classmethod
    def parse(cls, text: str) -> ConnectionString:
        """Parse Azure-format connection-string *text*.

        Pairs are split on ``;`` and each pair on its first ``=``; whitespace around pairs,
        keys and values is ignored, as are empty pairs. Keys are matched case-insensitively.
        ``ModuleId`` is refused (modules are not supported); other unknown keys (such as
        ``GatewayHostName``) are ignored, but no key may appear twice.

        Raises :class:`CredentialError` with ``INVALID_CONNECTION_STRING`` and a message that
        names the bad field and never contains the key.
        """
        if not isinstance(text, str):
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "connection string must be a str")

        def fail(problem: str) -> CredentialError:
            return CredentialError(
                ErrorCode.INVALID_CONNECTION_STRING, f"connection string: {problem}"
            )

        if len(text) > MAX_CONNECTION_STRING_LENGTH:
            raise fail(f"longer than {MAX_CONNECTION_STRING_LENGTH} characters")

        pairs: list[tuple[str, str]] = []
        bare: list[str] = []
        for raw in text.split(";"):
            pair = raw.strip()
            if not pair:
                continue
            key, equals, value = pair.partition("=")
            if not equals:
                bare.append(pair)
                continue
            pairs.append((key.strip(), value.strip()))

        # Every value given for the key or a token, whatever else is wrong, is withheld from
        # messages.
        key_values = [
            value
            for key, value in pairs
            if key.lower() in (_KEY.lower(), _SIGNATURE.lower()) and value
        ]
        # And a token's signature on its own, as written and url-decoded.
        for value in list(key_values):
            for part in value.split("&"):
                name, _, sig = part.partition("=")
                if name.strip() == "sig" and sig:
                    key_values += [sig, unquote(sig)]

        for pair in bare:
            # A long pair without '=' may be a key pasted without its name: never quote it.
            if len(pair) <= 16 and not _must_withhold(pair, key_values):
                raise fail(f"pair {_echo(pair)} has no '='")
            raise fail(f"a pair of {len(pair)} characters has no '='")

        values: dict[str, str] = {}
        seen: set[str] = set()
        for key, value in pairs:
            lowered = key.lower()
            if not lowered:
                raise fail("a pair has an empty key")
            if lowered in seen:
                canonical = _KNOWN_KEYS.get(lowered)
                if canonical is None:
                    raise fail("an unknown key appears twice")
                raise fail(f"duplicate key {canonical}")
            seen.add(lowered)
            if lowered == _MODULE_ID.lower():
                raise fail(f"{_MODULE_ID} is not supported (devstream has no modules)")
            canonical = _KNOWN_KEYS.get(lowered)
            if canonical is not None:
                values[canonical] = value

        use_tls = True
        if _USE_TLS in values:
            flag = values[_USE_TLS].lower()
            if flag not in ("true", "false"):
                raise fail(f"{_USE_TLS} must be true or false")
            use_tls = flag == "true"

        for canonical in (_HOST_NAME, _DEVICE_ID, _KEY_NAME, _KEY, _SIGNATURE):
            if canonical in values and not values[canonical]:
                raise fail(f"{canonical} is empty")

        host_name = values.get(_HOST_NAME, "")
        shared_key = values.get(_KEY)
        signature = values.get(_SIGNATURE)
        device_id = values.get(_DEVICE_ID)
        key_name = values.get(_KEY_NAME)
        problem = _field_problem(
            host_name=host_name,
            shared_access_key=shared_key,
            device_id=device_id,
            shared_access_key_name=key_name,
            shared_access_signature=signature,
            key_values=key_values,
        )
        if problem is not None:
            raise fail(problem)
        return cls(
            host_name=host_name,
            shared_access_key=shared_key,
            device_id=device_id,
            shared_access_key_name=key_name,
            use_tls=use_tls,
            shared_access_signature=signature,
        )

    def __str__(self) -> str:
        """The canonical text: canonical key spelling and order, ``UseTls`` only when false."""
        parts = [f"{_HOST_NAME}={self.host_name}"]
        if self.device_id is not None:
            parts.append(f"{_DEVICE_ID}={self.device_id}")
        if self.shared_access_key_name is not None:
            parts.append(f"{_KEY_NAME}={self.shared_access_key_name}")
        if self.shared_access_key is not None:
            parts.append(f"{_KEY}={self.shared_access_key}")
        else:
            parts.append(f"{_SIGNATURE}={self.shared_access_signature}")
        if not self.use_tls:
            parts.append(f"{_USE_TLS}=false")
        return ";".join(parts)

    @property
    def http_base_url(self) -> str:
        """``https://host[:port]``, or ``http://…`` when TLS is off."""
        return f"{'https' if self.use_tls else 'http'}://{self.host_name}"

    @property
    def ws_base_url(self) -> str:
        """``wss://host[:port]``, or ``ws://…`` when TLS is off."""
        return f"{'wss' if self.use_tls else 'ws'}://{self.host_name}"

    @property
    def resource(self) -> str:
        """The resource this identity signs for (not url-encoded).

        ``host/devices/{id}`` for a device, ``host`` for a service.
        """
        if self.device_id is not None:
            return device_resource(self.host_name, self.device_id)
        return self.host_name

    @property
    def signature_expiry(self) -> int | None:
        """The expiry (``se``, Unix seconds) of the SAS token this connection string carries
        in place of a key; None when it holds a key."""
        if self.shared_access_signature is None:
            return None
        return parse_sas_token(self.shared_access_signature).se

    def sas_token(self, *, expiry: int) -> str:
        """A SAS token for this identity that expires at *expiry* (Unix seconds).

        A device token is scoped to ``host/devices/{id}``; a service token to the host, with
        ``skn`` naming the policy. A connection string that carries a token gives that token,
        and only for its own expiry (:attr:`signature_expiry`): asked for another, it raises
        :class:`LocalProtocolError` (``ARGUMENT_INVALID``), having no key to sign with.
        """
        if self.shared_access_key is None:
            assert self.shared_access_signature is not None
            if expiry != self.signature_expiry:
                raise LocalProtocolError(
                    ErrorCode.ARGUMENT_INVALID,
                    "this connection string carries a SAS token, not a key: it cannot sign "
                    "a token with another expiry",
                )
            return self.shared_access_signature
        return make_sas_token(
            resource=self.resource,
            key=self.shared_access_key,
            expiry=expiry,
            policy_name=self.shared_access_key_name,
        )

    def token_at(self, now: float, *, expiry: int) -> str:
        """The SAS token to present at *now* (Unix time): one signed for *expiry*, or, for a
        connection string that carries a token, that token, as long as it has not expired
        (else :func:`expired_signature_error` is raised)."""
        fixed = self.signature_expiry
        if fixed is None:
            return self.sas_token(expiry=expiry)
        if not now < fixed:  # written so that a NaN clock counts as expired
            raise expired_signature_error(fixed)
        return self.sas_token(expiry=fixed)


# --- SAS tokens ------------------------------------------------------------------------------


#: The share of a SAS token's lifetime after which a client that holds a connection open with
#: it (a device's control channel) renews it: the hub closes the connection at the expiry.
SAS_RENEW_FRACTION = 0.85


def sas_renewal_time(
    *, issued_at: float, expiry: float, fraction: float = SAS_RENEW_FRACTION
) -> float:
    """When a client should replace a SAS token signed at *issued_at* that expires at *expiry*
    (both in the same clock, Unix seconds for a token's ``se``): *fraction* of the way there,
    so that a new connection is up well before the hub closes the old one at the expiry.

    Raises :class:`LocalProtocolError` (``ARGUMENT_INVALID``) unless ``0 < fraction < 1`` and
    ``issued_at < expiry``.
    """
    if not 0 < fraction < 1:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "fraction must be between 0 and 1")
    if not issued_at < expiry:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "a token must expire after it is made")
    return issued_at + fraction * (expiry - issued_at)


def expired_signature_error(expiry: int) -> Unauthorized:
    """The error a client meets when the SAS token its connection string carries (in place of
    a key) expired at *expiry*: there is no key to sign a new one with. The class is the one a
    client raises when the hub refuses a credential, so one ``except`` covers both."""
    return Unauthorized(
        ErrorCode.UNAUTHORIZED,
        f"the connection string's SAS token expired (se={expiry}); it carries no key "
        f"({_KEY}), so no new token can be signed: get a new token, or use a connection "
        "string with a key",
    )


class RequestTokens:
    """The SAS token a client sends with each request (a service's initiates and registry
    calls): one token for many requests, signed again once half of its *lifetime* has passed,
    or when the clock went back before it was signed.

    Signing costs about as much as the rest of a request's head, and the hub verifies a token
    it saw before for next to nothing (:class:`SasVerifier` remembers it by its text), so a
    fresh token per request would cost both sides. Time (Unix seconds) comes in as ``now``.

    A connection string that carries a token (in place of a key) gives that token to every
    request until it expires, then :func:`expired_signature_error`.
    """

    __slots__ = ("_connection_string", "_expiry", "_lifetime", "_token")

    def __init__(self, connection_string: ConnectionString, lifetime: int) -> None:
        if isinstance(lifetime, bool) or not isinstance(lifetime, int) or lifetime < 2:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "lifetime must be a whole number of seconds >= 2"
            )
        self._connection_string = connection_string
        self._lifetime = lifetime
        self._token = ""
        self._expiry = -math.inf

    def token(self, now: float) -> str:
        """The token to send at *now*."""
        expiry, lifetime = self._expiry, self._lifetime
        fixed = self._connection_string.signature_expiry
        if fixed is not None:
            return self._connection_string.token_at(now, expiry=fixed)
        if not expiry - lifetime <= now < expiry - lifetime / 2:
            self._expiry = int(now) + lifetime
            self._token = self._connection_string.sas_token(expiry=int(now) + lifetime)
        return self._token

    def __repr__(self) -> str:
        return f"RequestTokens(lifetime={self._lifetime})"


def device_resource(host_name: str, device_id: str) -> str:
    """The resource a device token is scoped to: ``host/devices/{id}`` (not url-encoded)."""
    return f"{host_name}/devices/{device_id}"


def sign(key: str, message: str) -> str:
    """Base64 of HMAC-SHA256 of *message* (UTF-8) under the base64-decoded *key*.

    Raises :class:`LocalProtocolError` (``ARGUMENT_INVALID``) if *key* is not valid base64.
    """
    raw_key = _key_bytes(key)
    try:
        raw_message = message.encode("utf-8")
    except UnicodeEncodeError:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, "message to sign is not encodable as UTF-8"
        ) from None
    digest = hmac.digest(raw_key, raw_message, "sha256")
    return base64.b64encode(digest).decode("ascii")


def _key_bytes(key: str) -> bytes:
    if not isinstance(key, str):
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "a key must be a str")
    raw = _b64decode(key)
    if raw is None:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "a key is not valid base64")
    return raw


def make_sas_token(*, resource: str, key: str, expiry: int, policy_name: str | None = None) -> str:
    """Build a SAS token for *resource* (not yet url-encoded) signed with *key*.

    The result is ``SharedAccessSignature sr=…&sig=…&se=…`` plus ``&skn=…`` when
    *policy_name* is given; ``sr``, ``sig`` and ``skn`` are url-encoded.
    Raises :class:`LocalProtocolError` for a key that is not base64 or a negative expiry.
    """
    if isinstance(expiry, bool) or not isinstance(expiry, int) or expiry < 0:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, "expiry must be a non-negative int (Unix seconds)"
        )
    if not isinstance(resource, str) or not resource:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "resource must be a non-empty str")
    if policy_name is not None and (not isinstance(policy_name, str) or not policy_name):
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, "policy_name must be a non-empty str or None"
        )
    try:
        sr = quote(resource, safe="")
        skn = None if policy_name is None else quote(policy_name, safe="")
    except UnicodeEncodeError:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, "resource or policy name is not encodable as UTF-8"
        ) from None
    se = str(expiry)
    sig = quote(sign(key, f"{sr}\n{se}"), safe="")
    token = f"{SAS_PREFIX}sr={sr}&sig={sig}&se={se}"
    if skn is not None:
        token += f"&skn={skn}"
    return token


@dataclass(frozen=True, kw_only=True, slots=True)
class SasToken:
    """A parsed SAS token. ``sr`` and ``sig`` are kept exactly as written in the token.

    The signature is left out of ``repr()`` so a token can be logged by accident without
    becoming usable.
    """

    #: The resource, url-encoded, exactly as written (this is what was signed).
    sr: str
    #: The signature exactly as written (normally url-encoded base64).
    sig: str = field(repr=False)
    #: Expiry, Unix seconds.
    se: int
    #: The shared-access policy name (url-decoded), or ``None`` for a device token.
    skn: str | None = None

    def __post_init__(self) -> None:
        for name in ("sr", "sig"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or _SAS_BODY_RE.fullmatch(value) is None:
                raise LocalProtocolError(
                    ErrorCode.ARGUMENT_INVALID,
                    f"SAS token: {name} must be non-empty printable ASCII without spaces",
                )
        if isinstance(self.se, bool) or not isinstance(self.se, int) or self.se < 0:
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "SAS token: se must be a non-negative int"
            )
        if self.skn is not None and not isinstance(self.skn, str):
            raise LocalProtocolError(
                ErrorCode.ARGUMENT_INVALID, "SAS token: skn must be a str or None"
            )

    @property
    def resource(self) -> str:
        """The resource, url-decoded."""
        return unquote(self.sr)


def parse_sas_token(text: str) -> SasToken:
    """Parse a ``SharedAccessSignature …`` token.

    Fields may come in any order, each at most once; ``sr``, ``sig`` and ``se`` are required,
    ``skn`` is optional, any other field is refused. ``se`` is a non-negative integer written
    without sign or leading zeros. Raises :class:`CredentialError` (``UNAUTHORIZED``) with a
    message that never contains the signature.
    """
    if not isinstance(text, str):
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "a SAS token must be a str")

    def fail(problem: str) -> CredentialError:
        return CredentialError(ErrorCode.UNAUTHORIZED, f"SAS token: {problem}")

    if len(text) > MAX_SAS_TOKEN_LENGTH:
        raise fail(f"longer than {MAX_SAS_TOKEN_LENGTH} characters")
    if not text.startswith(SAS_PREFIX):
        raise fail(f"does not start with {SAS_PREFIX.strip()!r}")
    body = text[len(SAS_PREFIX) :]
    if _SAS_BODY_RE.fullmatch(body) is None:
        raise fail("contains spaces or characters outside printable ASCII")

    fields: dict[str, str] = {}
    for part in body.split("&"):
        name, equals, value = part.partition("=")
        if not equals:
            raise fail("a field has no '='")
        if name not in _SAS_FIELDS:
            if _FIELD_NAME_RE.fullmatch(name) is not None:
                raise fail(f"unknown field {name!r}")
            raise fail("unknown field")
        if name in fields:
            raise fail(f"duplicate {name}")
        if not value:
            raise fail(f"{name} is empty")
        fields[name] = value

    for name in _SAS_REQUIRED:
        if name not in fields:
            raise fail(f"missing {name}")
    if _SE_RE.fullmatch(fields["se"]) is None:
        raise fail("se is not a non-negative integer without leading zeros")
    skn = fields.get("skn")
    return SasToken(
        sr=fields["sr"],
        sig=fields["sig"],
        se=int(fields["se"]),
        skn=None if skn is None else unquote(skn),
    )


def _resource_covers(token_resource: str, expected: str) -> bool:
    """True when a token for *token_resource* may be used for *expected*.

    Hosts compare case-insensitively, paths exactly; a token whose path is a prefix of the
    expected path ending at a ``/`` boundary covers it (a host-scoped token covers every
    device on that host).
    """
    token_host, slash, token_rest = token_resource.partition("/")
    token_path = slash + token_rest
    expected_host, slash, expected_rest = expected.partition("/")
    expected_path = slash + expected_rest
    if token_host.lower() != expected_host.lower():
        return False
    if token_path == expected_path:
        return True
    if not expected_path.startswith(token_path):
        return False
    return token_path.endswith("/") or expected_path[len(token_path)] == "/"


#: The longest host name of a refused token that an error message quotes.
_QUOTED_HOST = 64


def _other_resource(token_resource: str, expected: str) -> str:
    """Why a token for *token_resource* does not cover *expected*. When the hosts differ, the
    likely cause is a connection string whose ``HostName`` names the hub another way than
    the hub's public URL does (``localhost`` for ``127.0.0.1``): the message says both."""
    message = "SAS token is for another resource"
    token_host = token_resource.partition("/")[0]
    hub_host = expected.partition("/")[0]
    if token_host.lower() == hub_host.lower():
        return message
    quoted = token_host if len(token_host) <= _QUOTED_HOST else token_host[:_QUOTED_HOST] + "…"
    return (
        f"{message}: it is signed for host {quoted!r} but this hub signs for {hub_host!r}; "
        "HostName in the connection string must be the host of the hub's --public-url"
    )


def verify_sas_token(
    token: SasToken | str,
    *,
    keys: Sequence[str],
    resource: str,
    now: float,
    max_lifetime: float | None = None,
) -> SasToken:
    """Check *token* against the hub's expected *resource* and the identity's *keys*.

    *resource* is not url-encoded (``"hub.example.com:8080/devices/d1"`` or
    ``"hub.example.com:8080"``). *keys* holds every key that may have signed the token (a
    device's primary and secondary key). The signature is compared after url-decoding, so a
    client that did not url-encode ``sig`` is accepted too. Returns the parsed token.

    *max_lifetime* (seconds, None: no limit) is the furthest into the future ``se`` may lie:
    a token with ``se > now + max_lifetime`` is refused, however well signed.

    Raises :class:`CredentialError` (``UNAUTHORIZED``) when the token is malformed, expired
    (``now >= se``), lives too long (above), for another resource, or not signed by any of
    *keys*; raises
    :class:`LocalProtocolError` (``ARGUMENT_INVALID``) when *keys* is empty or holds a key that
    is not base64.
    """
    if isinstance(keys, str) or not keys:
        raise LocalProtocolError(
            ErrorCode.ARGUMENT_INVALID, "keys must be a non-empty sequence of base64 keys"
        )
    raw_keys = [_key_bytes(key) for key in keys]
    if not isinstance(resource, str) or not resource:
        raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "resource must be a non-empty str")
    parsed = parse_sas_token(token) if isinstance(token, str) else token
    if not now < parsed.se:  # written so that a NaN clock counts as expired
        raise CredentialError(ErrorCode.UNAUTHORIZED, "SAS token expired")
    _check_lifetime(parsed, now, max_lifetime)
    if not _resource_covers(parsed.resource, resource):
        raise CredentialError(ErrorCode.UNAUTHORIZED, _other_resource(parsed.resource, resource))
    # sr and se are printable ASCII (checked by SasToken), so this encoding cannot fail.
    message = f"{parsed.sr}\n{parsed.se}".encode("ascii")
    presented = unquote(parsed.sig).encode("utf-8")
    matched = False
    for raw_key in raw_keys:
        expected = base64.b64encode(hmac.digest(raw_key, message, "sha256"))
        # No early exit: every key is tried, so timing does not say which one matched.
        matched |= hmac.compare_digest(presented, expected)
    if not matched:
        raise CredentialError(ErrorCode.UNAUTHORIZED, "SAS token signature does not match")
    return parsed


def _check_lifetime(token: SasToken, now: float, max_lifetime: float | None) -> None:
    if max_lifetime is not None and token.se > now + max_lifetime:
        raise CredentialError(
            ErrorCode.UNAUTHORIZED,
            f"SAS token expiry (se) is more than {max_lifetime:g} s away, the longest this "
            "hub accepts: sign tokens with a shorter lifetime",
        )


#: How many verified SAS tokens a :class:`SasVerifier` remembers (the oldest go first).
SAS_CACHE_SIZE = 1024


@dataclass(frozen=True, slots=True)
class _Verified:
    token: SasToken
    keys: tuple[str, ...]
    resource: str


class SasVerifier:
    """:func:`parse_sas_token` and :func:`verify_sas_token` for a server that sees the same
    token again and again: a service signs one token and sends it with every initiate until it
    nears expiry. A token that verified is remembered, and when it comes again with the same
    keys and resource, before its expiry, it is not parsed or signed again.

    A token is remembered by the SHA-256 of its text, so no lookup compares secret text
    (and the memory holds no signature); the expiry is checked on every use, and new keys (a
    regenerated key) mean a new verification. At most :data:`SAS_CACHE_SIZE` tokens are kept.
    Errors are those of the two functions.
    """

    def __init__(self, size: int = SAS_CACHE_SIZE) -> None:
        if size < 1:
            raise LocalProtocolError(ErrorCode.ARGUMENT_INVALID, "size must be >= 1")
        self._size = size
        self._verified: dict[bytes, _Verified] = {}

    def parse(self, text: str) -> SasToken:
        """The parsed token: the one remembered for *text*, or a fresh parse."""
        if isinstance(text, str):
            entry = self._verified.get(_token_digest(text))
            if entry is not None:
                return entry.token
        return parse_sas_token(text)

    def verify(
        self,
        text: str,
        token: SasToken,
        *,
        keys: Sequence[str],
        resource: str,
        now: float,
        max_lifetime: float | None = None,
    ) -> None:
        """Check *token* (parsed from *text*) as :func:`verify_sas_token` does; remember it
        when it passes."""
        _check_lifetime(token, now, max_lifetime)
        digest = _token_digest(text)
        entry = self._verified.get(digest)
        if (
            entry is not None
            and entry.token is token
            and entry.resource == resource
            and entry.keys == tuple(keys)
            and now < token.se  # written so that a NaN clock counts as expired
        ):
            return
        verify_sas_token(token, keys=keys, resource=resource, now=now, max_lifetime=max_lifetime)
        self._verified.pop(digest, None)
        if len(self._verified) >= self._size:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = _Verified(token=token, keys=tuple(keys), resource=resource)

    def __len__(self) -> int:
        return len(self._verified)


def _token_digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()
