"""The hub's timer wakes for a new deadline only when it is due before the one it sleeps to.

Most initiates and joins add a deadline a minute or more away, behind others, so the timer
is no longer woken for each of them. These tests make the timer sleep towards a far deadline
(an initiate waiting 300 s for a device that never answers, once its stream's tokens have
expired), then add earlier ones: a shorter response timeout, and an accepted stream nobody
joins (its tokens expire after 60 s). Each must still fire on time.

Test rules: in-memory streams (``hub_env``) on the autojump clock, under ``trio.fail_after``;
devices that speak the control channel by hand decide every answer.
"""

from __future__ import annotations

import trio

from devstream_core import control

from .conftest import HubEnv
from .test_hub import ManualDevice, error_code, initiate, metrics

TIMEOUT = 400
FAR = [("iothub-streaming-response-timeout-in-seconds", "300")]


async def wait_far_initiate(env: HubEnv, nursery: trio.Nursery) -> None:
    """An initiate that waits 300 s for a device that never answers, in the background."""
    silent = await ManualDevice.connect(env, await env.create_device("silent"))

    async def run() -> None:
        response = await initiate(env, "silent", "echo", headers=FAR)
        assert error_code(response) == 504101

    async def keep_alive() -> None:
        while True:
            await trio.sleep(30)
            await silent.ws.ping()

    nursery.start_soon(run)
    await silent.next_request()  # the hub now waits for its answer, for 300 s
    nursery.start_soon(keep_alive)
    # The stream made for it ends when its tokens expire (60 s); then the timer sleeps
    # towards the far response deadline only.
    await trio.sleep(61)
    assert (await metrics(env))["devstream_streams_waiting"] == 0


async def test_a_shorter_response_timeout_fires_on_time(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await wait_far_initiate(hub_env, nursery)
            quiet = await ManualDevice.connect(hub_env, await hub_env.create_device("quiet"))
            nursery.start_soon(quiet.next_request)
            start = trio.current_time()
            response = await initiate(
                hub_env,
                "quiet",
                "echo",
                headers=[("iothub-streaming-response-timeout-in-seconds", "5")],
            )
            elapsed = trio.current_time() - start
            assert response.status == 504
            assert error_code(response) == 504101
            assert 5 <= elapsed < 5.5
            nursery.cancel_scope.cancel()


async def test_a_stream_nobody_joins_expires_on_time(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            await wait_far_initiate(hub_env, nursery)
            device = await ManualDevice.connect(hub_env, await hub_env.create_device("d1"))

            async def accept_and_never_join() -> None:
                request = await device.next_request()
                await device.send(
                    control.StreamResponse(request_id=request.request_id, accepted=True)
                )

            nursery.start_soon(accept_and_never_join)
            response = await initiate(hub_env, "d1", "echo", headers=FAR)
            assert response.header(b"iothub-streaming-is-accepted") == b"True"
            assert (await metrics(hub_env))["devstream_streams_waiting"] == 1
            await trio.sleep(59)
            assert (await metrics(hub_env))["devstream_streams_waiting"] == 1
            await trio.sleep(2)  # past the tokens' 60 s, long before the far deadline
            assert (await metrics(hub_env))["devstream_streams_waiting"] == 0
            nursery.cancel_scope.cancel()
