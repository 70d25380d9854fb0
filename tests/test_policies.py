"""Credentials an operator hands out: shared-access policies, key rotation, and SAS tokens
given in a connection string in place of a key, against a whole hub.

Test rules: no sockets (every client reaches the hub through ``hub_env.open``), everything
that waits runs on ``autojump_clock``, and every wait is bounded by ``trio.fail_after``.
Where SAS expiry matters, the hub's and the clients' wall clocks follow trio's clock.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import trio

from devstream_core.credentials import ConnectionString, make_sas_token
from devstream_core.errors import ErrorCode
from devstream_core.exceptions import HubError, PermissionDenied, Unauthorized
from devstream_core.registry import OWNER_POLICY
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.service import ServiceClient
from devstream_trio.client.stream import HubStream

from .conftest import HubEnv

HOST = "hub.test:8080"
#: The Unix time the tests' wall clocks read when trio's clock reads 0: now, so that the tokens
#: of clients on the real clock (an hour long) still verify after the virtual time a test spends.
BASE = float(int(time.time()))


def wall() -> float:
    return BASE + trio.current_time()


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


def client(env: HubEnv, cs: ConnectionString, **options: Any) -> ServiceClient:
    return ServiceClient(cs, opener=env.open, **options)


def policy_client(env: HubEnv, policy: dict[str, Any], *, secondary: bool = False) -> ServiceClient:
    return client(env, env.service().policy_connection_string(policy, secondary=secondary))


async def code_of(call: Any) -> ErrorCode:
    """The error code the awaitable *call* fails with."""
    with pytest.raises(HubError) as info:
        await call
    return info.value.code


async def round_trip(service: ServiceClient, device_id: str) -> bytes:
    stream = await service.open_stream(device_id, "echo")
    await stream.send_all(b"ping")
    data = await stream.receive_some()
    await stream.aclose()
    return data


# -- least privilege ----------------------------------------------------------------------------


async def test_a_service_connect_policy_opens_streams_and_nothing_else(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        streams = policy_client(hub_env, await owner.create_policy("streams", "ServiceConnect"))
        cs = await hub_env.create_device("d1")
        await hub_env.nursery.start(hub_env.device(cs).serve, {"echo": echo})
        assert await round_trip(streams, "d1") == b"ping"
        for call in (
            streams.list_devices(),
            streams.get_device("d1"),
            streams.create_device("d2"),
            streams.delete_device("d1"),
            streams.rotate_device_key("d1"),
            streams.list_policies(),
            streams.create_policy("mine", "ServiceConnect, RegistryWrite"),
        ):
            with pytest.raises(PermissionDenied) as info:
                await call
            assert info.value.code is ErrorCode.PERMISSION_DENIED
        assert [d["deviceId"] for d in await owner.list_devices()] == ["d1"]


async def test_managing_policies_needs_every_permission(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        almost = await owner.create_policy("almost", "RegistryRead, RegistryWrite, ServiceConnect")
        almost_client = policy_client(hub_env, almost)
        assert await almost_client.list_devices() == []  # its registry rights work
        for call in (
            almost_client.list_policies(),
            almost_client.get_policy("almost"),
            almost_client.create_policy("all", "DeviceConnect"),
            almost_client.set_policy_rights("almost", "DeviceConnect"),
            almost_client.rotate_policy_key(OWNER_POLICY),
            almost_client.delete_policy("almost"),
        ):
            assert await code_of(call) is ErrorCode.PERMISSION_DENIED
        full = policy_client(
            hub_env,
            await owner.create_policy(
                "full", "RegistryRead,RegistryWrite,ServiceConnect,DeviceConnect"
            ),
        )
        assert [p["keyName"] for p in await full.list_policies()] == [
            "almost",
            "full",
            OWNER_POLICY,
        ]


# -- the policy routes --------------------------------------------------------------------------


async def test_policies_are_created_read_updated_and_deleted(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        created = await owner.create_policy("ops", "ServiceConnect, RegistryRead")
        assert created["keyName"] == "ops"
        assert created["rights"] == "RegistryRead, ServiceConnect"
        assert created["primaryKey"] != created["secondaryKey"]
        assert await owner.get_policy("ops") == created
        assert await code_of(owner.create_policy("ops", "ServiceConnect")) is (
            ErrorCode.POLICY_ALREADY_EXISTS
        )
        updated = await owner.set_policy_rights("ops", "ServiceConnect")
        assert updated["rights"] == "ServiceConnect"
        assert updated["primaryKey"] == created["primaryKey"]
        assert await code_of(owner.set_policy_rights("nope", "ServiceConnect")) is (
            ErrorCode.POLICY_NOT_FOUND
        )
        await owner.delete_policy("ops")
        for call in (
            owner.get_policy("ops"),
            owner.delete_policy("ops"),
            owner.rotate_policy_key("ops"),
        ):
            assert await code_of(call) is ErrorCode.POLICY_NOT_FOUND
        assert [p["keyName"] for p in await owner.list_policies()] == [OWNER_POLICY]


@pytest.mark.parametrize(
    ("method", "target", "headers", "body", "code"),
    [
        ("PUT", "/policies/ops", [], b'{"rights": "Everything"}', ErrorCode.ARGUMENT_INVALID),
        ("PUT", "/policies/ops", [], b"{}", ErrorCode.ARGUMENT_INVALID),
        ("PUT", "/policies/ops", [], b"[1]", ErrorCode.INVALID_JSON),
        ("PUT", "/policies/ops", [], None, ErrorCode.ARGUMENT_INVALID),  # no rights
        (
            "PUT",
            "/policies/ops",
            [("if-match", '"abc"')],
            b'{"rights": "ServiceConnect"}',
            ErrorCode.ARGUMENT_INVALID,
        ),
        ("PUT", "/policies/a%20b", [], b'{"rights": "ServiceConnect"}', ErrorCode.ARGUMENT_INVALID),
        ("PATCH", "/policies/ops", [], None, ErrorCode.METHOD_NOT_ALLOWED),
        ("GET", "/policies/ops/rotate-key", [], None, ErrorCode.METHOD_NOT_ALLOWED),
        ("POST", "/policies/ops/rotate-key?key=tertiary", [], None, ErrorCode.ARGUMENT_INVALID),
        ("POST", "/devices/d1/rotate-key?key=", [], None, ErrorCode.ARGUMENT_INVALID),
        ("POST", "/devices/nope/rotate-key", [], None, ErrorCode.DEVICE_NOT_FOUND),
        ("DELETE", f"/policies/{OWNER_POLICY}", [], None, ErrorCode.OWNER_POLICY_PROTECTED),
        (
            "PUT",
            f"/policies/{OWNER_POLICY}",
            [("if-match", "*")],
            b'{"rights": "ServiceConnect"}',
            ErrorCode.OWNER_POLICY_PROTECTED,
        ),
    ],
)
async def test_bad_requests_get_the_documented_codes(
    hub_env: HubEnv,
    autojump_clock: trio.abc.Clock,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes | None,
    code: ErrorCode,
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        response = await owner.request(method, target, headers=headers, body=body)
        assert response.status == code.http_status
        assert json.loads(response.body)["errorCode"] == int(code)
        # Nothing changed: the owner keeps every right, and no policy was made.
        policies = await owner.list_policies()
        assert [p["keyName"] for p in policies] == [OWNER_POLICY]
        assert policies[0]["rights"] == (
            "RegistryRead, RegistryWrite, ServiceConnect, DeviceConnect"
        )


async def test_the_owner_policy_cannot_be_deleted_or_narrowed_but_its_keys_rotate(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        with pytest.raises(HubError) as info:
            await owner.delete_policy(OWNER_POLICY)
        assert info.value.code is ErrorCode.OWNER_POLICY_PROTECTED
        assert "cannot be deleted" in info.value.message
        assert await code_of(owner.set_policy_rights(OWNER_POLICY, "RegistryRead")) is (
            ErrorCode.OWNER_POLICY_PROTECTED
        )
        rotated = await owner.rotate_policy_key(OWNER_POLICY)
        assert await code_of(owner.list_devices()) is ErrorCode.UNAUTHORIZED
        assert await policy_client(hub_env, rotated).list_devices() == []


# -- rotation: old tokens stop working at once --------------------------------------------------


async def test_a_rotated_policy_key_refuses_tokens_the_hub_verified_before(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        ops = await owner.create_policy("ops", "RegistryRead")
        primary = policy_client(hub_env, ops)
        secondary = policy_client(hub_env, ops, secondary=True)
        # Each client sends one token with every request; the hub remembers it once verified.
        assert await primary.list_devices() == []
        assert await primary.list_devices() == []
        rotated = await owner.rotate_policy_key("ops")
        assert rotated["secondaryKey"] == ops["secondaryKey"]
        assert rotated["primaryKey"] != ops["primaryKey"]
        with pytest.raises(Unauthorized):
            await primary.list_devices()  # the same token as before: refused now
        assert await secondary.list_devices() == []  # the other key carries on
        assert await policy_client(hub_env, rotated).list_devices() == []
        again = await owner.rotate_policy_key("ops", secondary=True)
        assert again["primaryKey"] == rotated["primaryKey"]
        assert await code_of(secondary.list_devices()) is ErrorCode.UNAUTHORIZED


async def test_a_right_taken_away_or_a_policy_deleted_counts_from_the_next_request(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(30):
        owner = hub_env.service()
        ops = policy_client(hub_env, await owner.create_policy("ops", "RegistryRead"))
        assert await ops.list_devices() == []
        await owner.set_policy_rights("ops", "ServiceConnect")
        assert await code_of(ops.list_devices()) is ErrorCode.PERMISSION_DENIED
        await owner.delete_policy("ops")
        assert await code_of(ops.list_devices()) is ErrorCode.UNAUTHORIZED


async def test_a_rotated_device_key_closes_its_channel_and_refuses_the_old_key(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(60):
        owner = hub_env.service()
        cs = await hub_env.create_device("d1")
        old = hub_env.device(cs)
        outcome: list[BaseException] = []

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            try:
                await old.serve({"echo": echo}, task_status=task_status)
            except Unauthorized as exc:
                outcome.append(exc)

        await hub_env.nursery.start(serve)
        # The secondary key is not what the device signs with: it stays online.
        await owner.rotate_device_key("d1", secondary=True)
        await trio.sleep(5)
        assert old.online and hub_env.hub.coordinator.is_online("d1")
        device = await owner.rotate_device_key("d1")
        assert device["authentication"]["symmetricKey"]["primaryKey"] != cs.shared_access_key
        while not outcome:
            await trio.sleep(0.1)
        assert outcome[0].code is ErrorCode.UNAUTHORIZED
        assert not hub_env.hub.coordinator.is_online("d1")
        new_cs = owner.device_connection_string(device)
        await hub_env.nursery.start(hub_env.device(new_cs).serve, {"echo": echo})
        assert await round_trip(owner, "d1") == b"ping"


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ("rotate", ErrorCode.UNAUTHORIZED),
        ("delete", ErrorCode.UNAUTHORIZED),
        ("narrow", ErrorCode.PERMISSION_DENIED),
    ],
)
async def test_a_channel_opened_with_a_policy_token_closes_when_the_policy_changes(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock, change: str, code: ErrorCode
) -> None:
    with trio.fail_after(60):
        hub_env.hub.wall_clock = wall
        owner = hub_env.service()
        await hub_env.create_device("d1")
        gateway = await owner.create_policy("gateway", "DeviceConnect")
        token = make_sas_token(
            resource=HOST,
            key=gateway["primaryKey"],
            expiry=int(wall()) + 3600,
            policy_name="gateway",
        )
        cs = ConnectionString(
            host_name=HOST, device_id="d1", shared_access_signature=token, use_tls=False
        )
        device = DeviceClient(cs, opener=hub_env.open, wall_clock=wall)
        outcome: list[HubError] = []

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            try:
                await device.serve({"echo": echo}, task_status=task_status)
            except HubError as exc:
                outcome.append(exc)

        await hub_env.nursery.start(serve)
        assert await round_trip(owner, "d1") == b"ping"
        # Another policy's change leaves the channel open.
        await owner.create_policy("other", "DeviceConnect")
        await owner.rotate_policy_key("other")
        await trio.sleep(5)
        assert not outcome and hub_env.hub.coordinator.is_online("d1")
        if change == "rotate":
            await owner.rotate_policy_key("gateway")
        elif change == "delete":
            await owner.delete_policy("gateway")
        else:
            await owner.set_policy_rights("gateway", "ServiceConnect")
        while not outcome:
            await trio.sleep(0.1)
        assert outcome[0].code is code  # refused again at the reconnection: the device stops
        assert not hub_env.hub.coordinator.is_online("d1")


# -- a SAS token in the connection string, in place of a key -------------------------------------


async def test_a_service_with_a_given_token_works_until_it_expires_then_says_why(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(900):
        hub_env.hub.wall_clock = wall
        cs = await hub_env.create_device("d1")
        await hub_env.nursery.start(
            DeviceClient(cs, opener=hub_env.open, wall_clock=wall).serve, {"echo": echo}
        )
        token = make_sas_token(
            resource=HOST,
            key=hub_env.owner.primary_key,
            expiry=int(wall()) + 600,
            policy_name=OWNER_POLICY,
        )
        given = ConnectionString.parse(
            f"HostName={HOST};SharedAccessKeyName={OWNER_POLICY};"
            f"SharedAccessSignature={token};UseTls=false"
        )
        service = client(hub_env, given, wall_clock=wall)
        assert await round_trip(service, "d1") == b"ping"
        await trio.sleep(600)
        requests_before = hub_env.hub.metrics.http_errors.copy()
        with pytest.raises(Unauthorized) as info:
            await service.open_stream("d1", "echo")
        assert "expired" in info.value.message and "no key" in info.value.message
        assert hub_env.hub.metrics.http_errors == requests_before  # refused before sending


async def test_a_device_with_a_given_token_serves_until_it_expires_then_stops_saying_why(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(7200):
        hub_env.hub.wall_clock = wall
        await hub_env.create_device("d1")
        key = (await hub_env.store.get_device("d1")).primary_key  # type: ignore[union-attr]
        lifetime = 3000  # shorter than a key-holding device's renewal (85 % of an hour)
        token = make_sas_token(
            resource=f"{HOST}/devices/d1", key=key, expiry=int(wall()) + lifetime
        )
        cs = ConnectionString.parse(
            f"HostName={HOST};DeviceId=d1;SharedAccessSignature={token};UseTls=false"
        )
        device = DeviceClient(cs, opener=hub_env.open, wall_clock=wall)
        start = trio.current_time()
        outcome: list[BaseException] = []

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            try:
                await device.serve({"echo": echo}, task_status=task_status)
            except Unauthorized as exc:
                outcome.append(exc)

        await hub_env.nursery.start(serve)
        assert await round_trip(hub_env.service(), "d1") == b"ping"
        assert device.connections == 1
        while not outcome:
            await trio.sleep(1)
        # Served on its one channel until the hub closed it at the token's expiry, then gave
        # up at the next opening, rather than present an expired token over and over.
        assert lifetime <= trio.current_time() - start <= lifetime + 2
        assert device.connections == 1
        assert "expired" in outcome[0].message and "no key" in outcome[0].message
