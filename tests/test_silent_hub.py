"""A hub that goes silent during a handshake (a connection dead without a reset or a close):
the service's initiate and either side's join give up on time, with ``HubUnreachable``,
instead of waiting for ever.

Test rules: no sockets (the "hub" is the far end of an in-memory stream that reads nothing and
answers nothing), everything that waits runs on ``autojump_clock``, and each test asserts the
virtual time the wait took.
"""

from __future__ import annotations

import logging

import pytest
import trio
import trio.testing

from devstream_core.common import Role
from devstream_core.credentials import ConnectionString
from devstream_core.errors import ErrorCode
from devstream_core.framing import SUBPROTOCOL as FRAMED_SUBPROTOCOL
from devstream_core.initiator import JOIN_TIMEOUT, answer_timeout
from devstream_trio.client.device import DeviceClient
from devstream_trio.client.join import join_stream
from devstream_trio.client.service import ServiceClient
from devstream_trio.exceptions import HubUnreachable
from devstream_trio.transport.connect import HubAddress

MODES = ["raw", FRAMED_SUBPROTOCOL]
SERVICE_CS = ConnectionString(
    host_name="hub.test:8080",
    shared_access_key_name="iothubowner",
    shared_access_key="c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==",
    use_tls=False,
)


class SilentHub:
    """Opens connections whose far end takes the request and never answers."""

    def __init__(self) -> None:
        self.far_ends: list[trio.testing.MemoryReceiveStream] = []

    async def open(self, address: HubAddress) -> trio.abc.Stream:
        near, far = trio.testing.memory_stream_pair()
        self.far_ends.append(far)  # type: ignore[arg-type]
        return near


@pytest.mark.parametrize("one_step", [True, False], ids=["one-step", "post"])
@pytest.mark.parametrize("mode", MODES)
async def test_an_initiate_the_hub_never_answers_is_given_up_after_the_response_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, mode: str, one_step: bool
) -> None:
    hub = SilentHub()
    service = ServiceClient(SERVICE_CS, opener=hub.open, nursery=nursery)
    service.initiator.one_step = None if one_step else False
    start = trio.current_time()
    with trio.fail_after(600), pytest.raises(HubUnreachable) as info:
        await service.open_stream("dev", "echo", mode=mode, response_timeout=5)
    assert trio.current_time() - start == pytest.approx(answer_timeout(5)) == 5 + JOIN_TIMEOUT
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert "within 15 s" in info.value.message
    assert len(hub.far_ends) == 1  # the one connection, not retried


@pytest.mark.parametrize("mode", MODES)
async def test_a_join_the_hub_never_answers_is_given_up_after_join_timeout(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, mode: str
) -> None:
    hub = SilentHub()
    start = trio.current_time()
    with trio.fail_after(600), pytest.raises(HubUnreachable) as info:
        await join_stream(
            "ws://hub.test:8080/bridges/abc?role=device",
            "token",
            role=Role.DEVICE,
            opener=hub.open,
            mode=mode,
            nursery=nursery,
        )
    assert trio.current_time() - start == pytest.approx(JOIN_TIMEOUT)
    assert info.value.code is ErrorCode.HUB_UNREACHABLE
    assert "join within 10 s" in info.value.message


async def test_a_device_whose_join_goes_unanswered_logs_one_line_and_goes_on(
    nursery: trio.Nursery, autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    from devstream_core.control import StreamRequest

    caplog.set_level(logging.INFO, logger="devstream")
    hub = SilentHub()
    device = DeviceClient(
        ConnectionString(
            host_name="hub.test:8080",
            device_id="dev",
            shared_access_key="c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seQ==",
            use_tls=False,
        ),
        opener=hub.open,
    )
    handled: list[object] = []

    async def handler(stream: object) -> None:
        handled.append(stream)

    request = StreamRequest(
        request_id="r1",
        name="echo",
        url="ws://hub.test:8080/bridges/abc?role=device",
        token="token",
        mode=FRAMED_SUBPROTOCOL,
    )
    start = trio.current_time()
    with trio.fail_after(600):
        await device._run_stream(request, handler, nursery)
    assert trio.current_time() - start == pytest.approx(JOIN_TIMEOUT)
    assert handled == []
    lines = [r.getMessage() for r in caplog.records if "could not join" in r.getMessage()]
    assert lines == [
        "device 'dev': could not join stream 'echo': no answer from the hub to the join within 10 s"
    ]


# -- the asyncio driver ------------------------------------------------------------------------
# asyncio has no virtual clock here: the timeouts are cut to 50 ms, and a real loopback
# listener that reads and never answers plays the silent hub.


@pytest.mark.parametrize(
    ("join", "one_step"),
    [(False, True), (False, False), (True, False)],
    ids=["initiate-one-step", "initiate-post", "join"],
)
def test_the_asyncio_clients_give_up_on_a_silent_hub_too(
    monkeypatch: pytest.MonkeyPatch, join: bool, one_step: bool
) -> None:
    import asyncio

    import devstream_asyncio.service as aio_service

    monkeypatch.setattr(aio_service, "JOIN_TIMEOUT", 0.05)
    monkeypatch.setattr(aio_service, "answer_timeout", lambda response_timeout: 0.05)

    async def main() -> tuple[float, HubUnreachable]:
        held: list[asyncio.StreamWriter] = []

        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)
            await reader.read(65536)

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            if join:
                await aio_service.join_stream(
                    f"ws://127.0.0.1:{port}/bridges/abc?role=device",
                    "token",
                    FRAMED_SUBPROTOCOL,
                    None,
                    aio_service.StreamOptions(),
                )
            else:
                cs = ConnectionString(
                    host_name=f"127.0.0.1:{port}",
                    shared_access_key_name="iothubowner",
                    shared_access_key=SERVICE_CS.shared_access_key,
                    use_tls=False,
                )
                client = aio_service.ServiceClient(cs)
                client.initiator.one_step = None if one_step else False
                await client.open_stream("dev", "echo")
        except HubUnreachable as exc:
            return loop.time() - start, exc
        finally:
            for writer in held:
                writer.close()
            server.close()
            await server.wait_closed()
        raise AssertionError("the open did not give up")

    elapsed, error = asyncio.run(main())
    assert 0.04 < elapsed < 5
    assert error.code is ErrorCode.HUB_UNREACHABLE
    assert "within 0.05 s" in error.message
    assert ("join" if join else "initiate") in error.message
