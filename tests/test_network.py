"""The asyncio network backend under httpcore: reads, writes, timeouts, closes, TLS."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpcore
import httpx
import pytest
import trustme

from bfl_async import APIConnectionError, AsyncBFL
from bfl_async._network import NetworkBackend, _Stream
from bfl_async.testing import FakeBFL, fake_client

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def server(handler: Handler, tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    """A loopback server running `handler` per connection; yields its port."""
    listening = await asyncio.start_server(handler, "127.0.0.1", 0, ssl=tls)
    async with listening:
        yield listening.sockets[0].getsockname()[1]


async def until(condition: Callable[[], bool]) -> None:
    """Let the loop run until `condition` holds (a bounded wait on an event, not a delay)."""
    for _ in range(2000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError("the condition never held")


async def test_an_asyncio_client_connects_through_the_backend() -> None:
    async with fake_client() as client:
        assert await client.credits() > 0
        pools = client._http._transport._pools  # type: ignore[attr-defined]
        (pool,) = pools.values()
        assert isinstance(pool._pool._network_backend, NetworkBackend)
        (connection,) = pool._pool.connections
        assert isinstance(connection._connection._network_stream, _Stream)


async def test_reads_come_in_order_in_pieces_no_larger_than_asked() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, sixteen times the connection's buffer

    async def send(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(payload)
        await writer.drain()
        writer.close()

    async with server(send) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, _Stream)
        await until(lambda: stream._protocol.paused)  # full: the socket is no longer read
        assert stream._protocol.end - stream._protocol.start == 64 * 1024
        got = bytearray()
        while piece := await stream.read(65536, timeout=5):
            assert len(piece) <= 65536
            got += piece
        assert got == payload
        assert await stream.read(10) == b""
        await stream.aclose()


async def test_an_idle_connection_knows_when_the_server_closed_it() -> None:
    go = asyncio.Event()

    async def close_when_told(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await go.wait()
        writer.close()

    async with server(close_when_told) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert stream.get_extra_info("is_readable") is False
        go.set()
        await until(lambda: bool(stream.get_extra_info("is_readable")))
        await stream.aclose()


async def test_small_writes_leave_together_at_the_next_read_and_large_ones_at_once() -> None:
    big = b"b" * (200 * 1024)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(8))
        await writer.drain()
        await reader.readexactly(len(big))
        writer.write(b"ok")
        await writer.drain()

    async with server(answer) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        assert isinstance(stream, _Stream)
        sent: list[bytes] = []
        write = stream._transport.write

        def record(data: bytes | bytearray | memoryview) -> None:
            sent.append(bytes(data))
            write(data)

        stream._transport.write = record  # type: ignore[method-assign]
        await stream.write(b"head", timeout=5)
        await stream.write(b"body", timeout=5)
        assert sent == []
        assert await stream.read(100, timeout=5) == b"headbody"
        assert sent == [b"headbody"]
        await stream.write(big, timeout=5)
        assert sent[1:] == [big]
        assert await stream.read(100, timeout=5) == b"ok"
        await stream.aclose()


async def test_a_kept_alive_connection_the_server_dropped_is_not_reused() -> None:
    requests = 0
    closed = asyncio.Event()

    async def answer_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.readuntil(b"\r\n\r\n")
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()  # without saying so: the client's pool keeps the connection
        closed.set()

    async with server(answer_then_close) as port:
        backend = NetworkBackend()
        async with httpcore.AsyncConnectionPool(network_backend=backend) as pool:
            url = f"http://127.0.0.1:{port}/"
            assert (await pool.request("GET", url)).content == b"ok"
            await closed.wait()
            await until(lambda: all(c.has_expired() for c in pool.connections))
            assert (await pool.request("GET", url)).content == b"ok"
    assert requests == 2


async def test_a_silent_server_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with server(silent) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(100, timeout=0.05)
        await stream.aclose()


async def test_an_unread_upload_is_a_write_timeout() -> None:
    stop = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()

    async with server(never_reads) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        with pytest.raises(httpcore.WriteTimeout):
            await stream.write(b"x" * (32 * 1024 * 1024), timeout=0.05)
        await stream.aclose()
        stop.set()


async def test_a_reset_connection_is_a_read_error() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with server(reset) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        await stream.write(b"x", timeout=5)
        with pytest.raises(httpcore.ReadError):
            await stream.read(100, timeout=5)
        with pytest.raises(httpcore.WriteError):
            await stream.write(b"more", timeout=5)
        await stream.aclose()


async def test_refused_and_slow_connects_are_connect_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there once it is closed
    with pytest.raises(httpcore.ConnectError):
        await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", hang)
    with pytest.raises(httpcore.ConnectTimeout):
        await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=0.05)


async def test_httpx_sees_its_own_errors() -> None:
    """What the submit path classifies: a refused connect is ConnectError (not sent), a
    silent server a ReadTimeout (sent: maybe created)."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async with server(silent) as port:
        pool = httpcore.AsyncConnectionPool(network_backend=NetworkBackend())
        transport = httpx.AsyncHTTPTransport()
        transport._pool = pool
        async with httpx.AsyncClient(transport=transport, timeout=0.05) as client:
            with pytest.raises(httpx.ReadTimeout):
                await client.post(f"http://127.0.0.1:{port}/v1/flux-2-pro", json={})
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                closed = probe.getsockname()[1]
            with pytest.raises(httpx.ConnectError):
                await client.get(f"http://127.0.0.1:{closed}/")


@pytest.fixture(scope="module")
def authority() -> trustme.CA:
    return trustme.CA()


def tls_contexts(authority: trustme.CA) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server's context for `localhost`, and a client's that trusts it."""
    served = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("localhost").configure_cert(served)
    trusting = ssl.create_default_context()
    authority.configure_trust(trusting)
    return served, trusting


async def test_tls_round_trip_and_a_wrong_name_is_refused(authority: trustme.CA) -> None:
    served, trusting = tls_contexts(authority)

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.readexactly(4))
        await writer.drain()
        writer.close()

    async with server(echo, tls=served) as port:
        backend = NetworkBackend()
        plain = await backend.connect_tcp("127.0.0.1", port, timeout=5)
        stream = await plain.start_tls(trusting, server_hostname="localhost", timeout=5)
        assert stream.get_extra_info("ssl_object") is not None
        assert stream.get_extra_info("server_addr")[1] == port
        await stream.write(b"ping", timeout=5)
        assert await stream.read(100, timeout=5) == b"ping"
        await stream.aclose()

        plain = await backend.connect_tcp("127.0.0.1", port, timeout=5)
        with pytest.raises(httpcore.ConnectError):
            await plain.start_tls(trusting, server_hostname="elsewhere.example", timeout=5)


async def test_the_client_talks_to_an_https_api_through_the_backend(authority: trustme.CA) -> None:
    served, trusting = tls_contexts(authority)
    body = b'{"credits": 12.5}'

    async def credits(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async with server(credits, tls=served) as port:
        url = f"https://localhost:{port}"
        async with AsyncBFL(api_key="k", base_url=url, verify=trusting) as client:
            assert await client.credits() == 12.5
            (pool,) = client._http._transport._pools.values()  # type: ignore[attr-defined]
            assert isinstance(pool._pool._network_backend, NetworkBackend)
        async with AsyncBFL(api_key="k", base_url=url) as untrusting:
            with pytest.raises(APIConnectionError):
                await untrusting.credits()


def tls_saw_eof(stream: httpcore.AsyncNetworkStream) -> bool:
    """asyncio's TLS layer under `stream` has read the server's FIN."""
    assert isinstance(stream, _Stream)
    return bool(stream._transport._ssl_protocol._eof_received)  # type: ignore[attr-defined]


@pytest.mark.parametrize("close_notify", [False, True])
async def test_a_tls_server_closing_after_its_last_bytes_loses_none_of_them(
    authority: trustme.CA, close_notify: bool
) -> None:
    """When the peer closes, asyncio's TLS layer hands over all it holds in one call and
    drops what does not fit: a response followed at once by the close was cut short
    (silently, for a body that ends with the connection)."""
    served, trusting = tls_contexts(authority)
    payload = bytes(range(256)) * 768  # 192 KiB: more than the buffer, less than TLS holds
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listening.settimeout(10)

        def send_and_close() -> None:
            connection, _ = listening.accept()
            with served.wrap_socket(connection, server_side=True) as tls:
                tls.sendall(payload)
                if close_notify:  # sent, without waiting for the client's
                    tls.setblocking(False)
                    with contextlib.suppress(ssl.SSLWantReadError):
                        tls.unwrap()

        server_thread = threading.Thread(target=send_and_close)
        server_thread.start()
        port = listening.getsockname()[1]
        plain = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        stream = await plain.start_tls(trusting, server_hostname="localhost", timeout=5)
        await asyncio.to_thread(server_thread.join)
        await until(lambda: tls_saw_eof(stream))  # everything, and the close, has arrived
        got = bytearray()
        while piece := await stream.read(65536, timeout=5):
            assert len(piece) <= 65536
            got += piece
        assert len(got) == len(payload)
        assert got == payload
        await stream.aclose()


async def test_closing_lets_go_of_the_socket_at_once_with_bytes_left_unsent() -> None:
    """As httpcore's own backends: no waiting for a stalled server to take them."""
    stop = asyncio.Event()

    async def never_reads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await stop.wait()

    async with server(never_reads) as port:
        stream = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
        sock = stream.get_extra_info("socket")
        with pytest.raises(httpcore.WriteTimeout):
            await stream.write(b"x" * (32 * 1024 * 1024), timeout=0.05)
        await stream.aclose()
        await until(lambda: sock.fileno() == -1)
        stop.set()


async def test_closing_a_tls_connection_does_not_wait_for_the_server(
    authority: trustme.CA,
) -> None:
    """A hung server never answers TLS's close_notify: the socket stayed open up to 30 s,
    and past the end of the event loop (an unclosed transport)."""
    served, trusting = tls_contexts(authority)
    with socket.create_server(("127.0.0.1", 0)) as listening:
        listening.settimeout(10)
        done = threading.Event()

        def stall() -> None:  # the handshake, and then nothing
            connection, _ = listening.accept()
            with served.wrap_socket(connection, server_side=True):
                done.wait(10)

        server_thread = threading.Thread(target=stall)
        server_thread.start()
        try:
            port = listening.getsockname()[1]
            plain = await NetworkBackend().connect_tcp("127.0.0.1", port, timeout=5)
            stream = await plain.start_tls(trusting, server_hostname="localhost", timeout=5)
            sock = stream.get_extra_info("socket")
            await stream.aclose()
            await until(lambda: sock.fileno() == -1)
        finally:
            done.set()
            await asyncio.to_thread(server_thread.join)


@pytest.mark.parametrize("anyio_backend", ["trio"])
async def test_under_trio_it_hands_over_to_httpcore(anyio_backend: str) -> None:
    async with fake_client() as client:
        assert await client.credits() > 0
        (pool,) = client._http._transport._pools.values()  # type: ignore[attr-defined]
        (connection,) = pool._pool.connections
        assert not isinstance(connection._connection._network_stream, _Stream)


# --- proxies from the environment ---------------------------------------------------------


async def test_requests_go_through_the_proxy_the_environment_names(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As httpx's own client does: it stops reading the environment once given a transport.
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        seen.append(head.split(b"\r\n", 1)[0])
        body = b'{"credits": 7.5}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    async with server(proxy) as port:
        monkeypatch.setenv("HTTP_PROXY", f"127.0.0.1:{port}")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        # A host that cannot resolve: only the proxy can answer for it.
        async with AsyncBFL(api_key="k", base_url="http://api.bfl.invalid") as client:
            assert await client.credits() == 7.5
    assert seen == [b"GET http://api.bfl.invalid/v1/credits HTTP/1.1"]


async def test_no_proxy_sends_those_hosts_direct(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "localhost,127.0.0.1")
    async with (
        FakeBFL(credits=3.0) as fake,
        AsyncBFL(api_key=fake.api_key, base_url=fake.base_url) as client,
    ):
        assert await client.credits() == 3.0
