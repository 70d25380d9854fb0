"""A hub's limits and timeouts (:class:`HubConfig`): what :class:`~.hub.Hub` and the parts it
runs read of its configuration."""

from __future__ import annotations

from dataclasses import dataclass

from devstream_core import control
from devstream_core.bridge import DEFAULT_MAX_STREAMS_PER_DEVICE

__all__ = ["HubConfig"]


@dataclass(kw_only=True)
class HubConfig:
    """Limits and timeouts of a hub. The defaults suit a hub on the internet."""

    #: Time a client has to send a whole request (headers and body).
    header_timeout: float = 10.0
    #: Time a kept-alive HTTP connection may sit idle between requests.
    idle_timeout: float = 30.0
    max_header_size: int = 16 * 1024
    max_body_size: int = 64 * 1024
    max_control_message_size: int = control.MAX_CONTROL_MESSAGE_SIZE
    #: A control channel silent this long (no message, no ping) is dropped.
    control_idle_timeout: float = 90.0
    #: Response and connect timeouts when the initiate request does not say (Azure: 60 s).
    default_timeout: float = 60.0
    #: The largest response or connect timeout a service may ask for.
    max_timeout: float = 300.0
    #: Time given to a peer to answer a WebSocket close.
    close_timeout: float = 5.0
    #: How long a devstream.v1 stream waits for a side whose WebSocket dropped to resume.
    grace_period: float = 30.0
    #: A devstream.v1 side silent this long (no frame, no ping) counts as dropped. Clients
    #: ping every 10 s by default.
    stream_idle_timeout: float = 45.0
    #: The most streams one device may have open or waiting to be joined (a stream is
    #: counted from its initiation until it ends, whichever sides have joined): past it an
    #: initiation is refused with 429001. Each stream holds a socket in the hub per joined side
    #: and one in the device.
    max_streams_per_device: int = DEFAULT_MAX_STREAMS_PER_DEVICE
    #: The most stream requests one device may leave unanswered: past it an initiation is
    #: refused with 429001. At most ``control.MAX_OUTSTANDING_REQUESTS`` (1000).
    max_pending_per_device: int = 100
    #: The most connections the hub serves at once (control channels, stream sides, HTTP
    #: requests). None: :func:`~.hub.default_max_connections`, the open-files limit
    #: (``RLIMIT_NOFILE``) less 256 descriptors (or half the limit, if that is less) for the
    #: listeners, the registry's files, the event loop, the answers below and a batch of
    #: connections accepted at once.
    #:
    #: Why a cap below the open-files limit: at the limit itself the hub cannot accept, the
    #: listen backlog fills, and every client waits unanswered, ``/healthz`` too. Below it the
    #: hub still has descriptors to take a new connection, read its request and answer:
    #: ``GET /healthz`` with 200 (the hub is alive; a probe that restarted it would drop every
    #: stream), anything else with 503 (503901), and close it. Connections served already,
    #: streams among them, go on as before.
    max_connections: int | None = None
    #: The most connections past ``max_connections`` answered at once (each has 2 s, or
    #: ``header_timeout`` if shorter, to send its request, TLS handshake included: a probe
    #: sends it at once, and a connection that sends nothing holds its slot no longer); past
    #: them a new connection is closed at once.
    max_over_limit_answers: int = 32
    #: The least time between two log lines about refused connections, about failed
    #: ``accept`` calls, about initiations refused for a limit (429001), or about requests
    #: refused with one error code; each line gives the count since the last one.
    limit_log_interval: float = 10.0
    #: The longest a SAS token may still have to live when it is presented (its ``se`` at
    #: most this many seconds from now), for devices and services alike; a token signed for
    #: longer is refused with 401002. None (the default, as in Azure): no limit. devstream's
    #: clients sign tokens for an hour (``sas_lifetime``): a limit below that needs clients
    #: with a shorter ``sas_lifetime``.
    max_sas_lifetime: float | None = None
