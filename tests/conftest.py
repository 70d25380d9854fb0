"""Shared fixtures.

Test rules: loopback only, port 0; anything that waits runs on trio's clock (``autojump_clock``
for in-memory tests, ``trio.fail_after`` on every real-socket test); no wall-clock sleeps.

``hub_env`` gives a whole hub wired to clients through in-memory streams: the clients' opener
hands each new connection to ``Hub.handle_connection``, so device, service and hub all run on
the test's clock with no socket at all.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import trio
import trio.testing

from devstream_core.credentials import ConnectionString
from devstream_core.registry import Policy
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import ServiceClient
from devstream_trio.server.hub import Hub, HubConfig, ensure_owner_policy, load_or_create_secret
from devstream_trio.server.store import RegistryStore
from devstream_trio.transport.connect import HubAddress

PUBLIC_URL = "http://hub.test:8080"
#: What the command line and the clients read from the environment: a test sets what it needs.
CLIENT_ENV = ("DEVSTREAM_CONNECTION_STRING", "DEVSTREAM_CA_FILE", "HTTPS_PROXY", "https_proxy")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing leaks in from the environment running the tests (child processes inherit it)."""
    for name in CLIENT_ENV:
        monkeypatch.delenv(name, raising=False)


@dataclass
class HubEnv:
    """A hub on in-memory streams, with helpers to make clients of it."""

    hub: Hub
    store: RegistryStore
    owner: Policy
    nursery: trio.Nursery
    #: Every server-side stream handed to the hub, in order (tests may break them).
    server_streams: list[trio.abc.Stream] = field(default_factory=list)

    async def open(self, address: HubAddress) -> trio.abc.Stream:
        """The clients' opener: a new in-memory connection served by the hub."""
        assert address.host == "hub.test" and address.port == 8080, address
        client, server = trio.testing.memory_stream_pair()
        self.server_streams.append(server)
        self.nursery.start_soon(self.hub.handle_connection, server)
        return client

    def service_cs(self, policy: Policy | None = None) -> ConnectionString:
        policy = policy or self.owner
        return ConnectionString(
            host_name="hub.test:8080",
            shared_access_key_name=policy.name,
            shared_access_key=policy.primary_key,
            use_tls=False,
        )

    def service(self, policy: Policy | None = None) -> ServiceClient:
        return ServiceClient(self.service_cs(policy), opener=self.open)

    async def create_device(self, device_id: str) -> ConnectionString:
        device = await self.service().create_device(device_id)
        return self.service().device_connection_string(device)

    def device(self, cs: ConnectionString, **options: float) -> DeviceClient:
        return DeviceClient(cs, opener=self.open, **options)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Clients honour HTTPS_PROXY / NO_PROXY; tests decide their proxy themselves."""
    for name in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
async def hub_env(nursery: trio.Nursery) -> AsyncIterator[HubEnv]:
    store = await RegistryStore.open(None)
    owner, _ = await ensure_owner_policy(store)
    secret = await load_or_create_secret(store)
    hub = Hub(store, public_url=PUBLIC_URL, secret=secret, config=HubConfig())
    await nursery.start(hub.run)
    yield HubEnv(hub=hub, store=store, owner=owner, nursery=nursery)
    await store.aclose()


def random_payload(size: int) -> bytes:
    """Incompressible test data."""
    return os.urandom(size)


def require_tool(*names: str) -> None:
    """Skip the test when an outside program is missing, or fail when CI says it must exist
    (``.ci/run`` installs them and sets ``DEVSTREAM_REQUIRE_TOOLS=1``)."""
    import shutil

    missing = [
        name
        for name in names
        if shutil.which(name) is None and shutil.which(name, path="/usr/sbin:/sbin") is None
    ]
    if missing:
        message = f"outside program(s) not installed: {', '.join(missing)}"
        if os.environ.get("DEVSTREAM_REQUIRE_TOOLS"):
            pytest.fail(message)
        pytest.skip(message)
