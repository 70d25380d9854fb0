"""The flow-control window is chosen by the service at initiation and adopted by the device.

In memory on the autojump clock, through ``hub_env``.
"""

from __future__ import annotations

import hashlib

import pytest
import trio

from devstream_core import control
from devstream_core.errors import ErrorCode, RemoteProtocolError
from devstream_trio.client.framed import FramedStream, StreamOptions
from devstream_trio.client.service import AnyStream, ServiceClient

from .conftest import HubEnv, random_payload


def test_stream_request_carries_an_optional_window() -> None:
    base = {"request_id": "1", "name": "ssh", "url": "ws://h/bridges/x", "token": "t"}
    with_window = control.StreamRequest(**base, mode=control.MODE_FRAMED, window=65536)
    text = control.encode_message(with_window)
    assert '"window":65536' in text
    assert control.decode_message(text) == with_window
    without = control.StreamRequest(**base)
    assert "window" not in control.encode_message(without)
    assert control.decode_message(control.encode_message(without)).window is None  # type: ignore[union-attr]
    for bad in ('"65536"', "1023", str(control.MAX_WINDOW + 1), "true"):
        raw = text.replace("65536", bad)
        with pytest.raises(RemoteProtocolError) as info:
            control.decode_message(raw)
        assert info.value.code in (ErrorCode.PROTOCOL_ERROR, ErrorCode.ARGUMENT_INVALID)


async def test_the_device_adopts_the_services_window(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    """A service with a 64 KiB window and a device left at the 2 MiB default: the stream works
    both ways, both ends use 64 KiB, and a reader that stops holds the writer at 64 KiB."""
    window = 64 * 1024
    seen: list[AnyStream] = []
    release = trio.Event()

    async def hold_then_echo(stream: AnyStream) -> None:
        seen.append(stream)
        await release.wait()
        async for data in stream:
            await stream.send_all(data)

    cs = await hub_env.create_device("win")
    device = hub_env.device(cs)
    await hub_env.nursery.start(device.serve, {"echo": hold_then_echo})
    payload = random_payload(1024 * 1024)
    with trio.fail_after(60):
        service = ServiceClient(
            hub_env.service_cs(),
            opener=hub_env.open,
            nursery=hub_env.nursery,
            stream_options=StreamOptions(window=window),
        )
        stream = await service.open_stream("win", "echo")
        assert isinstance(stream, FramedStream) and stream.window == window
        handed = 0

        async def write() -> None:
            nonlocal handed
            for start in range(0, len(payload), 4096):
                await stream.send_all(payload[start : start + 4096])
                handed = start + 4096
            await stream.send_eof()

        received = bytearray()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            await trio.sleep(5)  # the device does not read yet
            assert seen and isinstance(seen[0], FramedStream)
            assert seen[0].window == window
            assert handed <= window
            release.set()
            while data := await stream.receive_some():
                received += data
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        await stream.aclose()


async def test_an_invalid_window_header_is_refused(
    hub_env: HubEnv, autojump_clock: trio.abc.Clock
) -> None:
    cs = await hub_env.create_device("win2")
    await hub_env.nursery.start(hub_env.device(cs).serve, {"echo": lambda s: trio.sleep(0)})
    service = hub_env.service()
    for value in ("12", "lots", str(control.MAX_WINDOW + 1)):
        response = await service.request(
            "POST",
            "/twins/win2/streams/echo",
            headers=[
                ("devstream-stream-mode", "devstream.v1"),
                ("devstream-stream-window", value),
            ],
            body=b"",
        )
        assert response.status == 400
        assert b"400004" in response.body
