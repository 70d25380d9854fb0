"""A whole device stream over in-memory streams on the autojump clock."""

from __future__ import annotations

import trio

from devstream_trio.client.stream import HubStream

from .conftest import HubEnv


async def echo(stream: HubStream) -> None:
    async for data in stream:
        await stream.send_all(data)


async def test_echo_stream_in_memory(hub_env: HubEnv, autojump_clock: trio.abc.Clock) -> None:
    cs = await hub_env.create_device("d1")
    device = hub_env.device(cs)
    await hub_env.nursery.start(device.serve, {"echo": echo})
    with trio.fail_after(30):
        stream = await hub_env.service().open_stream("d1", "echo")
        payload = bytes(range(256)) * 1000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, payload)
            received = bytearray()
            while len(received) < len(payload):
                received += await stream.receive_some()
        assert bytes(received) == payload
        await stream.send_eof()
        assert await stream.receive_some() == b""
        await stream.aclose()
