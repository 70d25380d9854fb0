"""The hub server: one port for the registry API, the initiate API, device control channels
and the streaming endpoint.

The hub drives the sans-IO core from trio; :class:`Hub` holds the core machines and the
parts that carry out their decisions, each in a module of its own (each part names what it
uses of the hub in a protocol beside it, ``ChannelsHost``, ``InitiationsHost``,
``RegistryHost``, ``RequestsHost``, and does not import this module):

* each accepted connection is read by one task (:meth:`Hub.handle_connection`), whose
  requests :class:`~.requests.Requests` answers or routes: a device's control channel to
  :class:`~.control_channels.ControlChannels` (kept for the channel's lifetime), an initiate
  to :class:`~.initiation.Initiations`, the registry routes to
  :class:`~.registry_api.RegistryApi`, a stream's WebSocket to
  :class:`~.streaming.StreamingEndpoint`;
* one timer task (:meth:`Hub.run`) sleeps until the core's next deadline and feeds the expired
  deadlines back in (:meth:`Hub.dispatch` carries out the coordinator's events), so every
  timeout is a core decision; the same task closes control channels that went silent;
* time for the core is ``trio.current_time()`` (so tests run on an autojump clock); SAS
  expiry uses the wall clock passed in (``wall_clock``), since SAS ``se`` is a Unix time. A
  control channel's token expiry is handed to the coordinator on the timer's clock, and the
  coordinator's deadline closes the channel;
* a registry change (a key replaced, a device disabled or deleted) asks the registry's
  ``check_device_access`` again for each of the device's channels, and revokes the device's
  streams in the bridge when the device may no longer connect (:meth:`Hub.device_changed`).

A failure on one connection never reaches another: every handler catches what its peer causes
and answers it with the documented error code.
"""

from __future__ import annotations

import errno
import functools
import gc
import logging
import math
import os
import resource
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable

import trio

from devstream_core import control
from devstream_core.admission import Admission, ConnectionLimits, Tally
from devstream_core.authorization import (
    authorize_policy,
    check_device_usable,
    read_credential,
)
from devstream_core.bridge import Bridge
from devstream_core.coordinator import (
    Coordinator,
    CoordinatorEvent,
    CredentialsExpired,
    DeviceReplaced,
    ForgetRequest,
    InitiationAccepted,
    InitiationFailed,
    InitiationRejected,
)
from devstream_core.credentials import SasVerifier
from devstream_core.errors import DevstreamError
from devstream_core.registry import (
    OWNER_POLICY,
    Device,
    Permission,
    Policy,
    new_key,
)

from ..transport.http import HttpError, HttpRequest, close_forcefully
from .config import HubConfig
from .control_channels import ControlChannels
from .initiation import Initiations
from .metrics import Metrics
from .registry_api import RegistryApi
from .requests import Requests
from .store import RegistryStore, StoreError
from .streaming import StreamingEndpoint

__all__ = [
    "ACCEPT_RETRY_DELAY",
    "HUB_GC_THRESHOLDS",
    "Hub",
    "HubConfig",
    "accept_loop",
    "default_max_connections",
    "serve_hub",
    "tune_gc_for_hub",
]

log = logging.getLogger("devstream.hub")

#: Python's garbage collector thresholds ``devstream hub`` runs with (see tune_gc_for_hub).
HUB_GC_THRESHOLDS = (50_000, 50, 50)


def tune_gc_for_hub() -> None:
    """Make Python's cyclic garbage collector run less often, as ``devstream hub`` does.

    A hub holds many long-lived objects (each connection, stream and task) and makes short-lived
    ones for every message. With the default thresholds (700, 10, 10) the collector walks the
    long-lived ones over and over: with 4,000 streams open, the hub spent half its CPU time
    exchanging data in the collector (``bench/concurrent_streams.py``). Cycles are still
    collected, after 50,000 allocations instead of 700. Process-wide, so :func:`serve_hub`
    does not do it on its own: a program that embeds a hub calls this when it suits it.
    """
    gc.set_threshold(*HUB_GC_THRESHOLDS)


def raise_open_files_limit() -> int:
    """Raise this process's open-files soft limit (``RLIMIT_NOFILE``) to its hard limit, as
    ``devstream hub`` does at start, and return the soft limit now in force.

    Every stream holds a socket per side in the hub, and the default ``max_connections``
    follows the soft limit, which many systems set at 1024 while allowing far more: a hub
    left there would refuse connections past about 768. The hard limit is the most an
    unprivileged process may take (systemd's ``LimitNOFILE=`` sets both). Process-wide, so
    :func:`serve_hub` does not do it on its own.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # refused (a sandbox): keep what there is
            return soft
        return hard
    return soft


#: Descriptors :func:`default_max_connections` leaves for everything but served connections.
_RESERVED_DESCRIPTORS = 256


def default_max_connections() -> int:
    """The connection cap that suits this process's open-files limit (``RLIMIT_NOFILE``'s
    soft limit): the limit less 256, or half of it when that is more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft > 1 << 24:
        soft = 1 << 24
    return max(soft // 2, soft - _RESERVED_DESCRIPTORS, 1)


class Hub:
    """A hub's state and request handlers; serve it with :func:`serve_hub`."""

    def __init__(
        self,
        store: RegistryStore,
        *,
        public_url: str,
        secret: bytes,
        config: HubConfig | None = None,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.store = store
        self.config = config or HubConfig()
        self.wall_clock = wall_clock
        self.random_bytes = random_bytes
        self.metrics = Metrics()
        if not 1 <= self.config.max_pending_per_device <= control.MAX_OUTSTANDING_REQUESTS:
            raise ValueError(
                f"max_pending_per_device must be 1 to {control.MAX_OUTSTANDING_REQUESTS}"
            )
        self.coordinator = Coordinator(max_pending_per_device=self.config.max_pending_per_device)
        self.bridge = Bridge(
            secret=secret,
            grace_period=self.config.grace_period,
            close_timeout=self.config.close_timeout,
            max_streams_per_device=self.config.max_streams_per_device,
        )
        self.limits = ConnectionLimits(
            max_connections=self.config.max_connections or default_max_connections(),
            max_answering=self.config.max_over_limit_answers,
            report_interval=self.config.limit_log_interval,
        )
        self.streaming = StreamingEndpoint(
            self.bridge,
            self.metrics,
            random_bytes=random_bytes,
            close_timeout=self.config.close_timeout,
            idle_timeout=self.config.stream_idle_timeout,
            wake=self.wake,
        )
        self.channels = ControlChannels(self)
        self.initiations = Initiations(self)
        self.registry = RegistryApi(self)
        self.requests = Requests(self)
        #: Refusals for a limit (429001), reported at most once per ``limit_log_interval``.
        self._limit_reports = Tally(self.config.limit_log_interval)
        #: Policy SAS tokens that verified (services send one token with every initiate).
        self._policy_tokens = SasVerifier()
        self._next_connection_id = 0
        self._timer_wakeup = trio.Event()
        #: When the timer wakes up on its own (the earliest deadline when it went to sleep).
        self._timer_alarm = math.inf
        #: The (host, port) :func:`serve_hub` listens on, once it does.
        self.listen_address: tuple[str, int] | None = None
        self.set_public_url(public_url)

    # -- addresses ---------------------------------------------------------------------------

    def set_public_url(self, public_url: str) -> None:
        """Set the address clients use to reach the hub (stream URLs, SAS resource)."""
        parsed = urllib.parse.urlsplit(public_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"public URL must be http(s)://host[:port], not {public_url!r}")
        self.public_url = public_url.rstrip("/")
        self.host_name = parsed.netloc.lower()
        self.ws_url = ("wss://" if parsed.scheme == "https" else "ws://") + parsed.netloc
        self.use_tls = parsed.scheme == "https"

    # -- the timer ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire the core's deadlines for as long as the hub runs (and hold the short tasks
        the relays start meanwhile)."""
        async with trio.open_nursery() as tasks:
            self.streaming.tasks = tasks
            task_status.started()
            try:
                while True:
                    self._timer_alarm = self._next_deadline()
                    with trio.move_on_at(self._timer_alarm):
                        await self._timer_wakeup.wait()
                    self._timer_wakeup = trio.Event()
                    now = trio.current_time()
                    self.dispatch(self.coordinator.advance(now))
                    self.streaming.handle(self.bridge.advance(now))
                    self.streaming.check_idle(now)
                    self.channels.drop_idle(now)
            finally:
                self.streaming.tasks = None

    def _next_deadline(self) -> float:
        deadlines = [
            d
            for d in (
                self.coordinator.next_deadline(),
                self.bridge.next_deadline(),
                self.streaming.next_idle_check(),
            )
            if d is not None
        ]
        idle_due = self.channels.silence.next_deadline()
        if idle_due is not None:
            deadlines.append(idle_due)
        return min(deadlines, default=math.inf)

    def wake(self, due: float | None = math.inf) -> None:
        """Call after adding a deadline: the timer looks again if it is due before its alarm.

        *due* is the next deadline of the one machine that added it, when the caller has it
        (the others' are where they were): the earliest of all is only worked out without it.
        (Most are not due before the alarm: an initiate's or a join's deadline is a minute
        away, behind others.)
        """
        if due == math.inf:
            due = self._next_deadline()
        if due is not None and due < self._timer_alarm:
            self._timer_wakeup.set()

    def dispatch(self, events: list[CoordinatorEvent]) -> None:
        """Carry out what the coordinator decided."""
        sessions = self.channels.sessions
        for event in events:
            if isinstance(event, (InitiationAccepted, InitiationRejected, InitiationFailed)):
                self.initiations.settle(event)
            elif isinstance(event, ForgetRequest):
                session = sessions.get(event.connection_id)
                if session is not None:
                    session.machine.forget_request(event.request_id)
            elif isinstance(event, DeviceReplaced):
                self.channels.close_replaced(event)
            elif isinstance(event, CredentialsExpired):
                session = sessions.get(event.connection_id)
                if session is not None:
                    session.leave_reason = "token expired"
                    session.close(event.code, event.message)

    def limit_reached(self, limit: str, message: str) -> None:
        """A request was refused for *limit* (``message`` says which, for whom): one warning
        per ``limit_log_interval`` at most, with the count of refusals since the last one."""
        count = self._limit_reports.add(trio.current_time())
        if count is not None:
            log.warning(
                "limit reached: %s (%d refusal%s since the last report)",
                message,
                count,
                "" if count == 1 else "s",
                extra={"event": "limit_reached", "limit": limit, "count": count},
            )

    # -- connections -------------------------------------------------------------------------

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        """Serve one client connection until it closes. Never raises for a client's fault.

        Past ``max_connections`` the connection is answered without being served, or closed
        (:mod:`devstream_core.admission`).
        """
        admission, refused = self.limits.admit(trio.current_time())
        if admission is not Admission.SERVE:
            self.metrics.connections_refused_total += 1
        if refused is not None:
            log.warning(
                "at the connection limit (%d served): refused %d new connection%s since the "
                "last report",
                self.limits.max_connections,
                refused,
                "" if refused == 1 else "s",
                extra={"event": "limit_reached", "limit": "connections", "count": refused},
            )
        self._next_connection_id += 1
        connection_id = self._next_connection_id
        try:
            if admission is Admission.SERVE:
                session = await self.requests.serve(stream, connection_id)
                if session is not None:
                    # The HTTP side (h11's state, the request and its headers) went with
                    # the request's frame: a device's control channel holds only its session.
                    await self.channels.run(session)
            elif admission is Admission.ANSWER:
                await self.requests.answer_over_limit(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except StoreError as exc:  # after the connection became a WebSocket
            log.error("connection %d: %s", connection_id, exc.message)
        except Exception:
            log.exception("unexpected error on connection %d", connection_id)
        finally:
            await close_forcefully(stream)
            self.limits.release(admission)

    # -- authorisation -----------------------------------------------------------------------

    async def authorize_policy(self, request: HttpRequest, needed: Permission) -> Policy:
        """Check a policy SAS token for *needed* (the core's :func:`authorize_policy`); raise
        HttpError otherwise.

        A service sends one token with every request until it nears expiry: the token is
        verified once and remembered (:class:`~devstream_core.credentials.SasVerifier`), for
        as long as it has not expired and the policy's keys are the ones that verified it.
        """
        try:
            credential = read_credential(request.header(b"authorization"), self._policy_tokens)
            name = credential.policy_name
            return authorize_policy(
                credential,
                None if name is None else await self.store.get_policy(name),
                needed,
                host_name=self.host_name,
                now=self.wall_clock(),
                max_lifetime=self.config.max_sas_lifetime,
                verifier=self._policy_tokens,
            )
        except HttpError:
            raise
        except DevstreamError as exc:
            raise HttpError(exc.code, exc.message) from None

    async def usable_device(self, device_id: str) -> Device:
        try:
            return check_device_usable(device_id, await self.store.get_device(device_id))
        except HttpError:
            raise
        except DevstreamError as exc:
            raise HttpError(exc.code, exc.message) from None

    # -- registry changes --------------------------------------------------------------------

    def device_changed(self, device_id: str, device: Device | None) -> None:
        """The registry's record of *device_id* changed to *device* (None: deleted).

        Every control channel of the device is asked again whether it may stay open, and
        closed with the error if not. A device disabled or deleted loses its streams too: the
        bridge ends them, and their sides are reset with the same error at once.
        """
        changes = self.channels.device_changes
        changes[device_id] = changes.get(device_id, 0) + 1
        self.check_device(device_id, device)

    def policy_changed(self, name: str, policy: Policy | None) -> None:
        """The registry's record of policy *name* changed to *policy* (None: deleted).

        Requests are checked against the new record from now on; every control channel opened
        with a token of that policy is asked again whether it may stay open (its token still
        verifies under the policy's keys, and the policy still grants ``DeviceConnect``), and
        closed with the error if not.
        """
        changes = self.channels.policy_changes
        changes[name] = changes.get(name, 0) + 1
        self.channels.close_refused_by_policy(name, policy)

    def check_device(self, device_id: str, device: Device | None) -> None:
        """Close each control channel of *device_id* that *device* (its registry record, None
        when deleted) no longer lets in, and end the device's streams if it may no longer
        connect at all."""
        self.channels.close_refused(device_id, device)
        try:
            check_device_usable(device_id, device)
        except DevstreamError as exc:
            self.streaming.handle(
                self.bridge.revoke_device(
                    device_id=device_id, code=exc.code, now=trio.current_time()
                )
            )


async def load_or_create_secret(store: RegistryStore) -> bytes:
    """The hub secret that signs stream tokens, created on first use."""
    secret = await store.get_setting("hub_secret")
    if secret is None:
        secret = os.urandom(32)
        await store.set_setting("hub_secret", secret)
    return secret


async def ensure_owner_policy(store: RegistryStore) -> tuple[Policy, bool]:
    """Return the owner policy, creating it with fresh keys on first start."""
    policy = await store.get_policy(OWNER_POLICY)
    if policy is not None:
        return policy, False
    policy = Policy(
        name=OWNER_POLICY,
        primary_key=new_key(os.urandom(32)),
        secondary_key=new_key(os.urandom(32)),
        permissions=Permission.REGISTRY_READ
        | Permission.REGISTRY_WRITE
        | Permission.SERVICE_CONNECT
        | Permission.DEVICE_CONNECT,
    )
    await store.put_policy(policy)
    return policy, True


#: ``accept`` failures that mean "out of file descriptors or memory for now": wait and retry.
_ACCEPT_CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: How long to wait before accepting again after one of those.
ACCEPT_RETRY_DELAY = 0.1
#: ``accept`` failures that concern only the connection being taken (it was gone, or refused,
#: before the hub took it): skip it and take the next.
_ACCEPT_SKIP_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNABORTED",
        "EPERM",
        "EPROTO",
        "ENETDOWN",
        "ENOPROTOOPT",
        "EHOSTDOWN",
        "ENONET",
        "EHOSTUNREACH",
        "EOPNOTSUPP",
        "ENETUNREACH",
    )
    if hasattr(errno, name)
)
#: The most connections taken from the backlog at once, before other tasks run.
_ACCEPT_BATCH = 64


async def accept_loop(
    sock: socket.socket,
    ssl_context: ssl.SSLContext | None,
    hub: Hub,
    nursery: trio.Nursery,
    *,
    log_interval: float = 10.0,
    retry_delay: float = ACCEPT_RETRY_DELAY,
) -> None:
    """Accept connections on the listening socket *sock* (non-blocking, owned by this task)
    for as long as the hub runs, each served in a task of its own.

    Out of descriptors (or memory), ``accept`` is tried again every *retry_delay* seconds;
    the failures are logged at most once per *log_interval*, with their count.

    Like :func:`trio.serve_listeners`, with two differences: no second, forced close of every
    connection (:meth:`Hub.handle_connection` always closes its own); and each time the socket
    is readable, every connection waiting (up to ``_ACCEPT_BATCH``) is taken after one wait,
    rather than with a trip through the scheduler and an ``accept`` bound to fail apiece.
    """
    failures = Tally(log_interval)
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_ACCEPT_BATCH):
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in _ACCEPT_SKIP_ERRNOS:
                        continue
                    if exc.errno not in _ACCEPT_CAPACITY_ERRNOS:
                        raise
                    failed = failures.add(trio.current_time())
                    if failed is not None:
                        log.error(
                            "accept failed (%s), %d time%s since the last report; "
                            "retrying every %.1f s",
                            errno.errorcode.get(exc.errno or 0, exc.errno),
                            failed,
                            "" if failed == 1 else "s",
                            retry_delay,
                        )
                    await trio.sleep(retry_delay)
                    break
                stream: trio.abc.Stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
                if ssl_context is not None:
                    stream = trio.SSLStream(
                        stream, ssl_context, server_side=True, https_compatible=True
                    )
                nursery.start_soon(hub.handle_connection, stream)
    finally:
        trio.lowlevel.notify_closing(sock)
        sock.close()


async def serve_hub(
    store: RegistryStore,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    public_url: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    config: HubConfig | None = None,
    wall_clock: Callable[[], float] = time.time,
    task_status: trio.TaskStatus[Hub] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on *host*:*port* and serve a hub until cancelled.

    ``task_status.started()`` receives the :class:`Hub`; its ``public_url`` tells the bound
    address when ``port`` was 0 and no ``public_url`` was given.
    """
    secret = await load_or_create_secret(store)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = listeners[0].socket.getsockname()[1]
    scheme = "https" if ssl_context is not None else "http"
    host_part = f"[{host}]" if ":" in host else host
    url = public_url or f"{scheme}://{host_part}:{bound_port}"
    hub = Hub(store, public_url=url, secret=secret, config=config, wall_clock=wall_clock)
    hub.listen_address = (host, bound_port)
    # The accept loops take the listening sockets over from trio's listeners.
    sockets = [socket.socket(fileno=listener.socket.detach()) for listener in listeners]
    for sock in sockets:
        sock.setblocking(False)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(hub.run)
            for sock in sockets:
                nursery.start_soon(
                    functools.partial(
                        accept_loop,
                        sock,
                        ssl_context,
                        hub,
                        nursery,
                        log_interval=hub.config.limit_log_interval,
                    )
                )
            task_status.started(hub)
    finally:
        for sock in sockets:
            sock.close()  # those whose accept loop never started
