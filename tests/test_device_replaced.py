"""The trio device client when another client takes its device id over, and when the hub
refuses the device: it waits what the core's session chose, never at once.

Test rules: an in-memory hub (no socket) on ``autojump_clock``; every test asserts the virtual
time at which each client opened its channels and gave up. Randomness is a fixed fraction.
"""

from __future__ import annotations

import pytest
import trio

from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_core.session import RefusalBackoff
from devstream_trio.client.device import DeviceClient
from devstream_trio.exceptions import DeviceReplaced

from .conftest import HubEnv
from .test_device_client import Tap, round_trip
from .test_hub import echo
from .test_session import Fixed


class Served:
    """A device client's ``serve`` in the background: when it came online, how it ended."""

    def __init__(self, client: DeviceClient) -> None:
        self.client = client
        self.error: BaseException | None = None
        self.ended_at: float | None = None
        self.done = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            await self.client.serve({"echo": echo}, task_status=task_status)
        except Exception as exc:
            self.error = exc
        finally:
            self.ended_at = trio.current_time()
            self.done.set()


def client(cs: ConnectionString, tap: Tap, **options: bool) -> DeviceClient:
    """A device client whose replacement wait is (1 + 0.5) / 2 * 8 s = 6 s."""
    return DeviceClient(cs, opener=tap, backoff_max=8.0, rng=Fixed(0.5), **options)


async def two_clients(env: HubEnv, *, keep_first: bool) -> tuple[Served, Tap, Served, Tap, float]:
    """The first client online, then a second with the same id: both, their taps, and the
    time the second came online."""
    cs = await env.create_device("d1")
    first_tap, second_tap = Tap(env), Tap(env)
    first = Served(client(cs, first_tap, keep_trying_when_replaced=keep_first))
    second = Served(client(cs, second_tap))
    await env.nursery.start(first.run)
    await trio.sleep(1)
    await env.nursery.start(second.run)
    return first, first_tap, second, second_tap, trio.current_time()


async def test_the_older_client_waits_its_backoff_then_stops_when_replaced_again(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(300):
        first, first_tap, second, second_tap, t0 = await two_clients(hub_env, keep_first=False)
        await first.done.wait()
        # The first, replaced at t0, came back 6 s later (replacing the second, which came
        # back 6 s after that): replaced twice within the window, it stopped.
        assert [t - t0 for t in first_tap.attempts] == pytest.approx([-1.0, 6.0])
        assert [t - t0 for t in second_tap.attempts] == pytest.approx([0.0, 12.0])
        assert first.ended_at is not None and first.ended_at - t0 == pytest.approx(12.0)
        assert isinstance(first.error, DeviceReplaced)
        assert first.error.code is ErrorCode.DEVICE_REPLACED
        assert "another client uses this device id" in first.error.message
        # The second stays: no more opens, however long.
        await trio.sleep(200)
        assert len(second_tap.attempts) == 2 and second.client.online
        assert not second.done.is_set()
        await round_trip(hub_env, "d1")


async def test_keep_trying_when_replaced_outlasts_a_client_without_it(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    with trio.fail_after(300):
        first, first_tap, second, second_tap, t0 = await two_clients(hub_env, keep_first=True)
        await second.done.wait()
        # first replaced at 0, back at 6; second replaced at 6, back at 12; first replaced
        # at 12 (it keeps trying), back at 18: second replaced again, it stops.
        assert [t - t0 for t in first_tap.attempts] == pytest.approx([-1.0, 6.0, 18.0])
        assert [t - t0 for t in second_tap.attempts] == pytest.approx([0.0, 12.0])
        assert second.ended_at is not None and second.ended_at - t0 == pytest.approx(18.0)
        assert isinstance(second.error, DeviceReplaced)
        await trio.sleep(200)
        assert len(first_tap.attempts) == 3 and first.client.online
        await round_trip(hub_env, "d1")


async def test_a_disabled_device_retries_on_the_refusal_backoff_until_enabled(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    service = hub_env.service()
    tap = Tap(hub_env)
    device = DeviceClient(cs, opener=tap, refusal_backoff=RefusalBackoff(), rng=Fixed(1.0))
    served = Served(device)
    with trio.fail_after(600):
        await hub_env.nursery.start(served.run)
        t0 = trio.current_time()
        await service.set_device_status("d1", "disabled")
        await trio.sleep(20)  # refused at 5 and 15 s; the next try is at 35 s
        assert not device.online
        await service.set_device_status("d1", "enabled")
        while not device.online:
            await trio.sleep(0.5)
        # Dropped at 0 (403902): 5 s, then 10, then 20 (the ceiling doubles from 5 s).
        assert [t - t0 for t in tap.attempts] == pytest.approx([0.0, 5.0, 15.0, 35.0], abs=0.01)
        assert trio.current_time() - t0 == pytest.approx(35.0, abs=0.5)
        assert not served.done.is_set()
        await round_trip(hub_env, "d1")


async def test_without_a_refusal_backoff_a_disabled_device_still_stops(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("d1")
    await hub_env.service().set_device_status("d1", "disabled")
    served = Served(DeviceClient(cs, opener=Tap(hub_env)))
    with trio.fail_after(30):
        start = trio.current_time()
        hub_env.nursery.start_soon(served.run)
        await served.done.wait()
    assert served.error is not None and getattr(served.error, "code", None) == 403902
    assert served.ended_at == pytest.approx(start)
