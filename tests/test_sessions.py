"""Sessions that end with their credentials: SAS expiry, key rotation, disable and delete, and
the hub's maximum SAS lifetime.

Test rules: no sockets (clients reach the hub through ``HubEnv.open``); everything that waits
runs on ``autojump_clock`` and is bounded by ``trio.fail_after``; the SAS clock of the hub and
of every client is the test's virtual clock (``BASE + trio.current_time()``), so a test asserts
the virtual time at which a channel closes or a token is renewed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import trio

from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_trio.device import DeviceClient
from devstream_trio.exceptions import Unauthorized
from devstream_trio.hub import Hub, HubConfig, ensure_owner_policy, load_or_create_secret
from devstream_trio.service import ServiceClient
from devstream_trio.store import RegistryStore

from .conftest import PUBLIC_URL, HubEnv
from .test_hub import echo, read_exactly

#: The Unix time the virtual clock starts at.
BASE = 1_800_000_000.0


def sas_clock() -> float:
    """The wall clock of the hub and its clients: Unix time that moves with the trio clock."""
    return BASE + trio.current_time()


async def start_env(nursery: trio.Nursery, config: HubConfig) -> HubEnv:
    store = await RegistryStore.open(None)
    owner, _ = await ensure_owner_policy(store)
    secret = await load_or_create_secret(store)
    hub = Hub(store, public_url=PUBLIC_URL, secret=secret, config=config, wall_clock=sas_clock)
    await nursery.start(hub.run)
    return HubEnv(hub=hub, store=store, owner=owner, nursery=nursery)


@pytest.fixture
async def env(nursery: trio.Nursery) -> AsyncIterator[HubEnv]:
    hub_env = await start_env(nursery, HubConfig())
    yield hub_env
    await hub_env.store.aclose()


def service(env: HubEnv, **options: int) -> ServiceClient:
    return ServiceClient(
        env.service_cs(), opener=env.open, wall_clock=sas_clock, nursery=env.nursery, **options
    )


def device(env: HubEnv, cs: ConnectionString, **options: int) -> DeviceClient:
    return DeviceClient(cs, opener=env.open, wall_clock=sas_clock, **options)


async def create_device(env: HubEnv, device_id: str) -> ConnectionString:
    svc = service(env)
    return svc.device_connection_string(await svc.create_device(device_id))


# -- the hub's maximum SAS lifetime --------------------------------------------------------------


async def test_max_sas_lifetime_refuses_longer_tokens_of_devices_and_services(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock
) -> None:
    env = await start_env(nursery, HubConfig(max_sas_lifetime=600))
    with trio.fail_after(30):
        # A service signing for an hour (the default) is refused, with a message that says why.
        with pytest.raises(Unauthorized) as refused:
            await service(env).create_device("d1")
        assert refused.value.code == ErrorCode.UNAUTHORIZED
        assert "600 s" in refused.value.message
        # Signing for ten minutes passes.
        svc = service(env, sas_lifetime=600)
        cs = svc.device_connection_string(await svc.create_device("d1"))

        # The same for a device's control channel.
        with pytest.raises(Unauthorized) as refused:
            await device(env, cs).serve({"echo": echo})
        assert "600 s" in refused.value.message
        online = device(env, cs, sas_lifetime=600)
        await nursery.start(online.serve, {"echo": echo})
        assert online.online

        # And for initiating a stream.
        with pytest.raises(Unauthorized):
            await service(env).open_stream("d1", "echo")
        stream = await svc.open_stream("d1", "echo")
        await stream.send_all(b"ten minutes")
        assert await read_exactly(stream, 11) == b"ten minutes"
        await stream.aclose()


async def test_no_max_sas_lifetime_by_default(env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    assert HubConfig().max_sas_lifetime is None
    year = 365 * 24 * 3600
    with trio.fail_after(30):
        svc = service(env, sas_lifetime=year)
        cs = svc.device_connection_string(await svc.create_device("d1"))
        long_lived = device(env, cs, sas_lifetime=year)
        await env.nursery.start(long_lived.serve, {"echo": echo})
        assert long_lived.online


def test_clients_refuse_a_lifetime_too_short_to_renew() -> None:
    cs = ConnectionString(
        host_name="hub.test:8080",
        device_id="d1",
        shared_access_key="a2V5a2V5a2V5a2V5",
        use_tls=False,
    )
    with pytest.raises(ValueError):
        DeviceClient(cs, sas_lifetime=1)
    service_cs = ConnectionString(
        host_name="hub.test:8080",
        shared_access_key_name="svc",
        shared_access_key="a2V5a2V5a2V5a2V5",
        use_tls=False,
    )
    with pytest.raises(ValueError):
        ServiceClient(service_cs, sas_lifetime=0)
