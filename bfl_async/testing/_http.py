"""A small HTTP/1.1 server on anyio and h11, just enough for the fake BFL hosts.

It keeps connections alive across requests, streams large bodies in chunks, and can misbehave
on purpose (answer late, close without answering, cut a body short) so that tests can exercise a
client's handling of broken connections over real sockets. Running on anyio, it serves from the
event loop of the test that starts it, under asyncio and trio alike.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio
import h11
from anyio.abc import SocketAttribute, SocketStream, TaskGroup
from anyio.streams.stapled import MultiListener

__all__ = ["HTTPServer", "Handler", "Request", "Response", "answer", "reason_phrase"]

_CHUNK = 1 << 16
_MAX_BODY = 64 << 20


@dataclass(frozen=True)
class Request:
    """One parsed request, body included."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    """Header names lower-cased; a repeated header keeps its last value."""
    body: bytes

    @classmethod
    def parse(
        cls, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes
    ) -> Request:
        """A request from its request-target (path and query) as sent on the wire."""
        url = urlsplit(target)
        return cls(
            method=method,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers={name.lower(): value for name, value in headers},
            body=body,
        )


@dataclass
class Response:
    """An answer, and how to (mis)deliver it."""

    status: int
    body: bytes | Sequence[bytes] = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    """Seconds to wait before answering."""
    drop: bool = False
    """Close the connection without answering."""
    truncate: bool = False
    """Announce the full Content-Length, send half the body, then close the connection."""
    rate: float | None = None
    """Send the body at most this many bytes per second (a CDN's pace per connection)."""

    @classmethod
    def json(cls, status: int, data: Any, headers: Sequence[tuple[str, str]] = ()) -> Response:
        """A JSON answer."""
        body = json.dumps(data).encode()
        return cls(status, body, "application/json", list(headers))

    @classmethod
    def hang_up(cls) -> Response:
        """Close the connection without answering."""
        return cls(0, drop=True)

    @property
    def parts(self) -> Sequence[bytes]:
        """The body as a sequence of byte strings."""
        return [self.body] if isinstance(self.body, bytes) else self.body

    @property
    def length(self) -> int:
        """Bytes in the whole body."""
        return sum(len(part) for part in self.parts)

    def head(self, server_name: str) -> list[tuple[str, str]]:
        """The headers to send: the whole body's Content-Length (even when truncated), then
        the content type and the answer's own headers."""
        headers = [("server", server_name), ("content-length", str(self.length))]
        if self.content_type is not None:
            headers.append(("content-type", self.content_type))
        return headers + self.headers

    def chunks(self, *, head_only: bool = False) -> Iterator[bytes]:
        """The body to send, in pieces of at most 64 KiB: nothing for a HEAD request, only
        the first half when `truncate` is set."""
        budget = 0 if head_only else self.length // 2 if self.truncate else self.length
        for part in self.parts:
            for start in range(0, len(part), _CHUNK):
                if budget <= 0:
                    return
                piece = part[start : start + min(_CHUNK, budget)]
                budget -= len(piece)
                yield piece


Handler = Callable[[Request], Awaitable[Response]]


async def answer(
    handler: Handler, request: Request, on_error: Callable[[BaseException], None] | None
) -> Response:
    """`handler`'s answer to `request`; an exception escaping it is passed to `on_error` and
    answered with a 500, as a server framework would."""
    try:
        return await handler(request)
    except Exception as exc:
        if on_error is not None:
            on_error(exc)
        return Response(500, f"fake server error: {exc!r}".encode(), "text/plain")


class HTTPServer:
    """Serves `handler` on `host:port` (port 0: an ephemeral one) inside a task group.

    An exception escaping `handler` is answered with a 500 and passed to `on_error`, so that one
    broken request does not take the whole server down.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        host: str,
        port: int = 0,
        on_error: Callable[[BaseException], None] | None = None,
        idle_timeout: float = 75.0,
        server_name: str = "fake-bfl",
    ) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._on_error = on_error
        self._idle_timeout = idle_timeout
        self._server_name = server_name
        self._listener: MultiListener[SocketStream] | None = None
        self.connections = 0
        """Connections accepted so far."""

    @property
    def base_url(self) -> str:
        """`http://host:port`, once started."""
        if self._listener is None:
            raise RuntimeError("the server is not started")
        port = self._listener.extra(SocketAttribute.local_port)
        return f"http://{self._host}:{port}"

    async def start(self, task_group: TaskGroup) -> None:
        """Bind the socket, then accept connections in `task_group` until it is cancelled."""
        self._listener = await anyio.create_tcp_listener(
            local_host=self._host, local_port=self._port
        )
        task_group.start_soon(self._listener.serve, self._serve_connection, task_group)

    async def aclose(self) -> None:
        """Stop accepting connections."""
        if self._listener is not None:
            await self._listener.aclose()

    async def _serve_connection(self, stream: SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        try:
            async with stream:
                while True:
                    request = await self._read_request(conn, stream)
                    if request is None:
                        return
                    response = await answer(self._handler, request, self._on_error)
                    head_only = request.method == "HEAD"
                    if not await self._send(conn, stream, response, head_only=head_only):
                        return
                    if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
        except (OSError, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the client went away; nothing to answer
        except Exception as exc:  # a bug here must not stop the other connections
            if self._on_error is not None:
                self._on_error(exc)

    async def _read_request(self, conn: h11.Connection, stream: SocketStream) -> Request | None:
        """Read one whole request; None when the connection is over or unusable."""
        head: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, stream, exc.error_status_hint)
                return None
            if event is h11.NEED_DATA:
                with anyio.move_on_after(self._idle_timeout):
                    try:
                        data = await stream.receive(_CHUNK)
                    except anyio.EndOfStream:
                        data = b""
                    conn.receive_data(data)
                    continue
                return None  # idle too long
            if isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > _MAX_BODY:
                    await self._send_error(conn, stream, 413)
                    return None
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                return Request.parse(
                    head.method.decode("ascii"),
                    head.target.decode("ascii", "replace"),
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in head.headers],
                    bytes(body),
                )
            else:
                return None  # ConnectionClosed, or PAUSED after a protocol switch

    async def _send(
        self, conn: h11.Connection, stream: SocketStream, response: Response, *, head_only: bool
    ) -> bool:
        """Send `response` (only its head for a HEAD request); False when the connection
        must now be closed."""
        if response.delay > 0:
            await anyio.sleep(response.delay)
        if response.drop:
            return False
        head = h11.Response(
            status_code=response.status,
            headers=response.head(self._server_name),
            reason=reason_phrase(response.status),
        )
        await _send_bytes(stream, conn.send(head))
        started, sent = anyio.current_time(), 0
        for piece in response.chunks(head_only=head_only):
            for data in conn.send_with_data_passthrough(h11.Data(data=piece)) or ():
                await _send_bytes(stream, data)
            if response.rate:
                sent += len(piece)
                await anyio.sleep(max(0.0, started + sent / response.rate - anyio.current_time()))
        if response.truncate:
            return False
        await _send_bytes(stream, conn.send(h11.EndOfMessage()))
        return True

    async def _send_error(self, conn: h11.Connection, stream: SocketStream, status: int) -> None:
        """Answer a request that could not be read, if the protocol state still allows it."""
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = reason_phrase(status)
        headers = [("content-length", str(len(body))), ("connection", "close")]
        head = h11.Response(status_code=status, headers=headers, reason=body)
        try:
            await _send_bytes(stream, conn.send(head))
            await _send_bytes(stream, conn.send(h11.Data(data=body)))
            await _send_bytes(stream, conn.send(h11.EndOfMessage()))
        except h11.LocalProtocolError:
            return


async def _send_bytes(stream: SocketStream, data: bytes | None) -> None:
    if data:
        await stream.send(data)


def reason_phrase(status: int) -> bytes:
    """The standard reason phrase of `status` ("Not Found"), empty when it has none."""
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
