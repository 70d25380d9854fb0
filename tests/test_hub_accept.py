"""The hub's accept loop: every waiting connection taken after one wait, errors that concern
one connection skipped, running out of descriptors waited out (and logged once per interval),
the listening socket closed.

Real loopback sockets, port 0; the loop serves connections with a stand-in for the hub that
answers each connection with a line and closes it.
"""

from __future__ import annotations

import errno
import logging
import re
import socket
import ssl
from functools import partial
from typing import Any

import pytest
import trio
import trustme

from devstream_trio.server.hub import accept_loop


class Greeter:
    """Stands in for the hub: answers each connection with its number and closes it."""

    def __init__(self) -> None:
        self.served = 0

    async def handle_connection(self, stream: trio.abc.Stream) -> None:
        self.served += 1
        number = self.served
        async with stream:
            await stream.send_all(b"connection %d\n" % number)


class FlakyListener(socket.socket):
    """A listening socket whose next accepts fail with the errors queued in ``failures``."""

    failures: list[OSError]

    def accept(self) -> tuple[socket.socket, Any]:
        if self.failures:
            raise self.failures.pop(0)
        return super().accept()


def listening_socket(cls: type[socket.socket] = socket.socket) -> socket.socket:
    sock = cls(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)  # room for every connection the tests make at once
    sock.setblocking(False)
    return sock


async def greeting(port: int) -> bytes:
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    async with tcp:
        received = b""
        async for chunk in tcp:
            received += chunk
        return received


async def test_every_connection_waiting_is_served() -> None:
    sock = listening_socket()
    port = sock.getsockname()[1]
    greeter = Greeter()
    greetings: list[bytes] = []

    async def connect() -> None:
        greetings.append(await greeting(port))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, sock, None, greeter, nursery)
            async with trio.open_nursery() as clients:
                # Three batches' worth, and 400 descriptors: within a default limit of 1,024.
                for _ in range(200):
                    clients.start_soon(connect)
            nursery.cancel_scope.cancel()
    assert greeter.served == 200
    assert sorted(greetings) == sorted(b"connection %d\n" % n for n in range(1, 201))
    # The loop closed the listening socket on its way out.
    assert sock.fileno() == -1


async def test_an_error_about_one_connection_is_skipped() -> None:
    sock = listening_socket(FlakyListener)
    assert isinstance(sock, FlakyListener)
    sock.failures = [OSError(errno.ECONNABORTED, "Software caused connection abort")]
    greeter = Greeter()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, sock, None, greeter, nursery)
            assert await greeting(sock.getsockname()[1]) == b"connection 1\n"
            nursery.cancel_scope.cancel()
    assert sock.failures == []


async def test_running_out_of_descriptors_is_logged_and_waited_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sock = listening_socket(FlakyListener)
    assert isinstance(sock, FlakyListener)
    sock.failures = [OSError(errno.EMFILE, "Too many open files")] * 2
    greeter = Greeter()
    with caplog.at_level(logging.ERROR, logger="devstream_trio.server.hub"):
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(accept_loop, sock, None, greeter, nursery, retry_delay=0)
                )
                assert await greeting(sock.getsockname()[1]) == b"connection 1\n"
                nursery.cancel_scope.cancel()
    # Two failures within the log interval: one line.
    failures = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert failures == [
        "accept failed (EMFILE), 1 time since the last report; retrying every 0.0 s"
    ]


async def test_at_the_open_files_limit_accept_backs_off_and_logs_once_per_interval(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    sock = listening_socket(FlakyListener)
    assert isinstance(sock, FlakyListener)
    sock.failures = [OSError(errno.EMFILE, "Too many open files")] * 10_000
    # A connection waits in the backlog: the socket stays readable, and accept keeps failing.
    client = socket.create_connection(sock.getsockname())
    greeter = Greeter()
    try:
        with trio.move_on_after(25):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(accept_loop, sock, None, greeter, nursery)
    finally:
        client.close()
    # It tried again every 0.1 s of (virtual) time, neither spinning nor giving up.
    assert 240 <= 10_000 - len(sock.failures) <= 251
    lines = [r.getMessage() for r in caplog.records if "accept failed" in r.getMessage()]
    assert len(lines) == 3, lines  # at 0, 10 and 20 s
    pattern = r"accept failed \(EMFILE\), (\d+) times? since the last report; retrying every 0.1 s"
    counts = [int(re.fullmatch(pattern, line)[1]) for line in lines]  # type: ignore[index]
    assert counts[0] == 1 and all(99 <= count <= 101 for count in counts[1:]), counts


async def test_any_other_accept_error_stops_the_loop() -> None:
    sock = listening_socket(FlakyListener)
    assert isinstance(sock, FlakyListener)
    sock.failures = [OSError(errno.EINVAL, "Invalid argument")]
    greeter = Greeter()
    with trio.fail_after(30), pytest.raises(ExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, sock, None, greeter, nursery)
            async with await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1]):
                await trio.sleep_forever()  # until the loop's failure cancels the nursery
    [error] = info.value.exceptions
    assert isinstance(error, OSError)
    assert error.errno == errno.EINVAL
    assert greeter.served == 0
    assert sock.fileno() == -1


async def test_the_hub_accepts_over_tls_too() -> None:
    # serve_hub hands the accept loop an SSL context: each connection is wrapped in it.
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    sock = listening_socket()
    greeter = Greeter()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_loop, sock, server_context, greeter, nursery)
            tcp = await trio.open_tcp_stream("127.0.0.1", sock.getsockname()[1])
            tls = trio.SSLStream(tcp, client_context, server_hostname="127.0.0.1")
            assert await tls.receive_some(100) == b"connection 1\n"
            await trio.aclose_forcefully(tls)
            nursery.cancel_scope.cancel()
