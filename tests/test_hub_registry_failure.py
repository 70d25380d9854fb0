"""A registry database that fails while the hub serves (damage found late, disk full, I/O
error): the request is answered 500001 with the JSON error body, the log gets one line (no
traceback, no key), and the hub goes on serving.

Test rules: no sockets (clients reach the hub through ``HubEnv.open``), ``autojump_clock``,
every wait bounded by ``trio.fail_after``. The store is the real one over a real SQLite
connection that the test makes fail.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from pathlib import Path

import pytest
import trio

from devstream_core.errors import ErrorCode
from devstream_trio.server.hub import Hub, HubConfig, ensure_owner_policy, load_or_create_secret
from devstream_trio.server.store import RegistryStore

from .conftest import PUBLIC_URL, HubEnv
from .test_hub import auth, call, error_code
from .test_store import failing_store


async def test_database_error_while_serving_answers_500001_and_the_hub_serves_on(
    tmp_path: Path,
    nursery: trio.Nursery,
    autojump_clock: trio.abc.Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "registry.sqlite3"
    async with await RegistryStore.open(path):
        pass
    store, conn = failing_store(path)
    owner, _ = await ensure_owner_policy(store)
    secret = await load_or_create_secret(store)
    hub = Hub(store, public_url=PUBLIC_URL, secret=secret, config=HubConfig())
    await nursery.start(hub.run)
    env = HubEnv(hub=hub, store=store, owner=owner, nursery=nursery)
    caplog.set_level(logging.INFO, logger="devstream")

    with trio.fail_after(10):
        device_cs = await env.create_device("d1")
        conn.failure = sqlite3.OperationalError("disk I/O error")

        response = await call(env, "GET", "/devices", headers=[auth(env)])
        assert response.status == 500
        assert error_code(response) == ErrorCode.SERVER_ERROR
        response = await call(env, "DELETE", "/devices/d1", headers=[auth(env)])
        assert response.status == 500
        assert error_code(response) == ErrorCode.SERVER_ERROR
        # Requests that need no database are served meanwhile.
        assert (await call(env, "GET", "/healthz")).status == 200

        conn.failure = None
        response = await call(env, "GET", "/devices", headers=[auth(env)])
        assert response.status == 200
        assert [device["deviceId"] for device in json.loads(response.body)] == ["d1"]

    # One line per failed request, naming SQLite's reason; no traceback, no key.
    problems = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(problems) == 2, problems
    assert all(p.endswith(": registry database error: disk I/O error") for p in problems)
    assert all(r.exc_info is None for r in caplog.records)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert owner.primary_key not in logged and device_cs.shared_access_key not in logged
    await store.aclose()
