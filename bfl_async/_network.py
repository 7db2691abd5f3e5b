"""httpcore's sockets, on asyncio's own transports when the loop is asyncio.

httpcore reaches asyncio through anyio streams, and pays for it on every socket operation: a
cancel scope with a timer per read and write, exception mapping, a checkpoint per send, and a
`poll()` syscall per idle connection each time the pool looks for one. Polls are small and
many, so that overhead is most of a poll's CPU. `NetworkBackend` is httpcore's public
backend interface over `loop.create_connection` and a protocol: a read takes what is
buffered or waits on one future, a write hands bytes to the transport and waits only under
backpressure, and an idle connection knows from its own state whether the server closed it.
Under trio, and on Python 3.10, it hands over to httpcore's own backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import sys
from collections.abc import Iterable
from typing import Any, TypeAlias

import anyio
import httpcore

SocketOption: TypeAlias = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)

_BUFFER = 64 * 1024  # bytes a connection receives ahead of its reader (httpcore reads 64 KiB)
_HELD_WRITES = 64 * 1024  # bytes of small writes held until the next read
_HAPPY_EYEBALLS_DELAY = 0.25  # as anyio.connect_tcp (RFC 6555)


def _library() -> str:
    try:
        import sniffio
    except ImportError:  # pragma: no cover - trio depends on sniffio
        return "asyncio"
    return sniffio.current_async_library()


class _Protocol(asyncio.BufferedProtocol):
    """Receives into one fixed buffer and wakes the one reader or writer waiting.

    The socket is read straight into the buffer, and not read while it is full: a
    connection holds at most `_BUFFER` bytes however fast a download arrives (and, once
    the server has closed, what TLS still holds).
    """

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray(_BUFFER)
        self.start = 0  # unread bytes are buffer[start:end]
        self.end = 0
        self.closed = False
        self.error: Exception | None = None
        self.reader: asyncio.Future[None] | None = None
        self.drained: asyncio.Future[None] | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.start == self.end:
            self.start = self.end = 0
        elif self.end == len(self.buffer):  # room only before the unread bytes: move them
            unread = self.end - self.start
            self.buffer[:unread] = self.buffer[self.start : self.end]
            self.start, self.end = 0, unread
        return memoryview(self.buffer)[self.end :]

    def buffer_updated(self, nbytes: int) -> None:
        self.end += nbytes
        if self.end - self.start == len(self.buffer) and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake_reader()

    def eof_received(self) -> bool:
        self._take_decrypted()
        self.closed = True
        self._wake_reader()
        return False  # the transport closes itself: HTTP/1.1 has no use for a half-open one

    def _take_decrypted(self) -> None:
        """What asyncio's TLS layer has not handed over when the server closes: it hands
        over one buffer's worth then, and drops the rest (Python 3.11 to 3.13 at least)."""
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        if ssl_object is None:
            return
        pieces = [self.buffer[self.start : self.end]]
        with contextlib.suppress(ssl.SSLError):  # a partial record, or the close_notify
            while piece := ssl_object.read(_BUFFER):
                pieces.append(piece)
        if len(pieces) > 1:
            self.buffer = bytearray().join(pieces)
            self.start, self.end = 0, len(self.buffer)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake_reader()
        self.resume_writing()

    def pause_writing(self) -> None:
        if self.drained is None:
            self.drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self.drained = self.drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    def _wake_reader(self) -> None:
        reader, self.reader = self.reader, None
        if reader is not None and not reader.done():
            reader.set_result(None)

    @property
    def unread(self) -> bool:
        return self.end > self.start

    def take(self, max_bytes: int) -> bytes:
        """Up to `max_bytes` of the unread bytes (there are some)."""
        end = min(self.end, self.start + max_bytes)
        piece = bytes(memoryview(self.buffer)[self.start : end])
        self.start = end
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return piece


def _expire(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def _wait(future: asyncio.Future[None], timeout: float | None) -> None:
    """Await `future`; TimeoutError after `timeout` seconds (None: no limit)."""
    if timeout is None:
        await future
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, future)
    try:
        await future
    finally:
        timer.cancel()


class _Stream(httpcore.AsyncNetworkStream):
    """One connection: its transport (TCP, or TLS over it) and the protocol's buffer.

    Small writes wait for the next read and leave together: httpcore writes a request's
    head and body apart, and a POST would otherwise cost two segments and wake the server
    twice.
    """

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._unsent: list[bytes] = []
        self._unsent_size = 0

    def _send_unsent(self) -> None:
        if self._unsent:
            data = b"".join(self._unsent)
            self._unsent.clear()
            self._unsent_size = 0
            if not self._transport.is_closing():
                self._transport.write(data)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        self._send_unsent()
        protocol = self._protocol
        if not protocol.unread and not protocol.closed:
            protocol.reader = asyncio.get_running_loop().create_future()
            try:
                await _wait(protocol.reader, timeout)
            except TimeoutError:
                raise httpcore.ReadTimeout("timed out reading from the server") from None
        if protocol.unread:
            return protocol.take(max_bytes)
        if protocol.error is not None:
            raise httpcore.ReadError(str(protocol.error)) from protocol.error
        return b""

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        protocol = self._protocol
        if self._transport.is_closing():
            raise httpcore.WriteError(str(protocol.error or "the connection is closed"))
        if self._unsent_size + len(buffer) <= _HELD_WRITES:
            self._unsent.append(buffer)
            self._unsent_size += len(buffer)
            return
        self._send_unsent()
        self._transport.write(buffer)
        if protocol.drained is not None:
            try:
                await _wait(protocol.drained, timeout)
            except TimeoutError:
                raise httpcore.WriteTimeout("timed out writing to the server") from None
            if protocol.closed:
                raise httpcore.WriteError(str(protocol.error or "the connection is closed"))

    async def aclose(self) -> None:
        # At once, as httpcore's own backends: close() waits for a stalled server to take
        # the unsent bytes, or over TLS (up to 30 s) to answer the close_notify.
        self._transport.abort()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        protocol = self._protocol
        try:
            with anyio.fail_after(timeout):
                transport = await loop.start_tls(
                    self._transport, protocol, ssl_context, server_hostname=server_hostname
                )
        except TimeoutError:
            self._transport.close()
            raise httpcore.ConnectTimeout("timed out in the TLS handshake") from None
        except (OSError, ssl.SSLError) as exc:
            self._transport.close()
            raise httpcore.ConnectError(str(exc)) from exc
        except BaseException:
            self._transport.close()
            raise
        assert isinstance(transport, asyncio.Transport)
        protocol.transport = transport
        return _Stream(transport, protocol)

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":
            # An idle connection with something to read was closed or broken by the server.
            return self._protocol.unread or self._protocol.closed
        name = {
            "ssl_object": "ssl_object",
            "client_addr": "sockname",
            "server_addr": "peername",
            "socket": "socket",
        }.get(info)
        return None if name is None else self._transport.get_extra_info(name)


class NetworkBackend(httpcore.AsyncNetworkBackend):
    """Connections on asyncio's transports under asyncio (Python 3.11+), httpcore's own
    backends otherwise (trio)."""

    def __init__(self) -> None:
        self._others: dict[str, httpcore.AsyncNetworkBackend] = {}

    def _other(self, library: str) -> httpcore.AsyncNetworkBackend:
        """httpcore's own backend for `library`, as httpcore would pick it."""
        backend = self._others.get(library)
        if backend is None:
            backend = httpcore.TrioBackend() if library == "trio" else httpcore.AnyIOBackend()
            self._others[library] = backend
        return backend

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        library = _library()
        # Python 3.10's TLS layer feeds a buffered protocol past its buffer: anyio's there.
        if library != "asyncio" or sys.version_info < (3, 11):
            other = self._other(library)
            return await other.connect_tcp(host, port, timeout, local_address, socket_options)
        loop = asyncio.get_running_loop()
        try:
            with anyio.fail_after(timeout):
                transport, protocol = await loop.create_connection(
                    _Protocol,
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                    happy_eyeballs_delay=_HAPPY_EYEBALLS_DELAY,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"timed out connecting to {host}:{port}") from None
        except OSError as exc:
            raise httpcore.ConnectError(str(exc)) from exc
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return _Stream(transport, protocol)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        # Unused by bfl_async (no `uds=`): httpcore's own backend.
        other = self._other(_library())
        return await other.connect_unix_socket(path, timeout, socket_options)

    async def sleep(self, seconds: float) -> None:
        await anyio.sleep(seconds)
