"""An httpx transport that serves the fake's handlers in memory, without sockets.

Requests go straight to the handler of their host, so tests run fast and nothing leaves the
process. The answers keep HTTP's semantics: bodies stream in chunks, a HEAD gets only the
head, and the handlers' misbehaviour becomes the exception httpx raises over a real
connection (a hang-up is a `RemoteProtocolError`, a late answer a `ReadTimeout` when it is
later than the request's read timeout).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import httpx

from ._http import Handler, Request, Response, answer, reason_phrase

__all__ = ["MemoryHost", "MemoryTransport"]


@dataclass(frozen=True)
class MemoryHost:
    """What answers on one host name."""

    handler: Handler
    server_name: str = "fake-bfl"


class MemoryTransport(httpx.AsyncBaseTransport):
    """Serves `hosts` (host name -> handler) on https and the default port, in memory.

    A request to any other origin raises `httpx.ConnectError`, as an unreachable host would.
    An exception escaping a handler is passed to `on_error` and answered with a 500.
    """

    def __init__(
        self,
        hosts: Mapping[str, MemoryHost],
        *,
        on_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._hosts = dict(hosts)
        self._on_error = on_error

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        host = self._hosts.get(url.host) if url.scheme == "https" and url.port is None else None
        if host is None:
            raise httpx.ConnectError(
                f"the fake BFL serves no {url.scheme}://{url.netloc.decode('ascii')} in memory",
                request=request,
            )
        parsed = Request.parse(
            request.method,
            url.raw_path.decode("ascii"),
            request.headers.multi_items(),
            await request.aread(),
        )
        response = await answer(host.handler, parsed, self._on_error)
        if response.delay > 0:
            await _wait(response.delay, request)
        if response.drop:
            raise httpx.RemoteProtocolError(
                "Server disconnected without sending a response.", request=request
            )
        return httpx.Response(
            response.status,
            headers=response.head(host.server_name),
            stream=_Body(response, request),
            extensions={
                "http_version": b"HTTP/1.1",
                "reason_phrase": reason_phrase(response.status),
            },
        )


async def _wait(seconds: float, request: httpx.Request) -> None:
    """Wait for a late answer, or time out as httpx would if the read timeout is shorter."""
    read_timeout = request.extensions.get("timeout", {}).get("read")
    if read_timeout is not None and read_timeout < seconds:
        await anyio.sleep(read_timeout)
        raise httpx.ReadTimeout("timed out", request=request)
    await anyio.sleep(seconds)


class _Body(httpx.AsyncByteStream):
    """A response body streamed chunk by chunk from the answer's parts (no copy of the
    whole); a truncated answer breaks off after half of it, as a closed connection does."""

    def __init__(self, response: Response, request: httpx.Request) -> None:
        self._response = response
        self._request = request
        self._head_only = request.method == "HEAD"

    async def __aiter__(self) -> AsyncIterator[bytes]:
        received = 0
        for chunk in self._response.chunks(head_only=self._head_only):
            await anyio.lowlevel.checkpoint()  # let other tasks run, as socket reads would
            received += len(chunk)
            yield chunk
        if self._response.truncate and not self._head_only:
            raise httpx.RemoteProtocolError(
                "peer closed connection without sending complete message body: "
                f"received {received} bytes, expected {self._response.length}",
                request=self._request,
            )
