"""FakeBFL: Black Forest Labs' FLUX API, faked over real HTTP on loopback or in memory.

The fake plays the three kinds of host a client meets: the API host (submit, credits), a
regional polling host (the `polling_url` of each task) and a delivery host that serves the
images from signed, expiring URLs. It serves them on three loopback listeners (`async with
fake`) and through an httpx transport under their production names (`fake.transport()`),
both at once if asked; each answer names the hosts of the front it was asked through. The
fake keeps BFL's per-account in-flight limits on a server-side clock, answers with BFL's wire
shapes, and can inject faults on request.
"""

from __future__ import annotations

import base64
import datetime as dt
import hmac
import json
import math
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from email.utils import formatdate
from functools import partial
from types import TracebackType
from typing import Any, Literal, get_args
from urllib.parse import urlencode

import anyio
import httpx

from ..webhooks import WebhookScheme
from ._http import HTTPServer, Request, Response
from ._images import CONTENT_TYPES, render
from ._memory import MemoryHost, MemoryTransport
from ._webhooks import WebhookSender

__all__ = [
    "MEMORY_URLS",
    "MODELS",
    "FakeBFL",
    "FakeTask",
    "Fault",
    "FaultKind",
    "HostURLs",
    "ModelSpec",
    "run_fake_server",
]

FaultKind = Literal["submit", "poll", "download"]
"""Which requests `FakeBFL.fail_next` makes misbehave: submits, polls or image downloads."""
Fault = Literal[
    "500",
    "502",
    "503",
    "drop_before",
    "drop_after",
    "truncate",
    "slow",
    "expired",
    "malformed",
    "hold",
    "huge",
    "incomplete",
    "unknown_status",
]
"""How a request misbehaves under `FakeBFL.fail_next`: an error status (`"500"`, `"502"`,
`"503"`), a dropped connection before or after a submit creates its task (`"drop_before"`,
`"drop_after"`), a `"truncate"`d body, a `"slow"` answer, an `"expired"` result URL, a
`"malformed"`, `"huge"` or `"incomplete"` JSON answer, a submit `"hold"` (its task created,
never answered), or a poll with an `"unknown_status"`.

```python
fake.fail_next("submit", "drop_after")  # the next submit's task exists; its answer is lost
```
"""
HostKind = Literal["api", "polling", "delivery"]

STATUSES = ("Ready", "Request Moderated", "Content Moderated", "Error", "Task not found")
DEFAULT_LIMITS: Mapping[str, int] = {"standard": 24, "kontext-max": 6}
_POLL_HEADERS = (("retry-after", "1"), ("x-ratelimit-limit", "1200"))
_MEGAPIXEL = 1 << 20
_FLUX2_MAX_MP = 4.0
_IMAGES_KEPT = 64
"""Rendered images kept for repeated downloads; older ones are rendered again if asked."""
_SAS_TIME = "%Y-%m-%dT%H:%M:%SZ"
_UTC = dt.timezone.utc
_LAST_SAS_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
_SERVER_NAMES: Mapping[HostKind, str] = {
    "api": "fake-bfl",
    "polling": "fake-bfl",
    "delivery": "Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0",
}


@dataclass(frozen=True)
class HostURLs:
    """The base URL of each kind of host, as one front of the fake names them in answers."""

    api: str
    polling: str
    """Where `polling_url`s point: a regional cluster host."""
    delivery: str
    """Where signed result URLs point."""


MEMORY_URLS = HostURLs(
    api="https://api.bfl.ai",
    polling="https://api.eu2.bfl.ai",
    delivery="https://delivery-eu1.bfl.ai",
)
"""The production base URLs the in-memory transport names in its answers."""
_MEMORY_HOSTS: Mapping[str, HostKind] = {
    "api.bfl.ai": "api",
    "api.eu.bfl.ai": "api",
    "api.us.bfl.ai": "api",
    "api.eu2.bfl.ai": "polling",
    "delivery-eu1.bfl.ai": "delivery",
}
"""The host names the in-memory transport answers on: those of MEMORY_URLS and the regional
API hosts."""


@dataclass(frozen=True)
class ModelSpec:
    """How the fake treats one model path: its family, price, pool and required field."""

    family: Literal["flux1", "flux2"]
    price: float
    """Credits: the whole price for FLUX.1, the first megapixel for FLUX.2."""
    price_per_mp: float = 0.0
    """FLUX.2 only: credits per further output megapixel and per input megapixel."""
    pool: str = "standard"
    needs: str = "prompt"
    """The body field without which a submit answers 422."""


MODELS: Mapping[str, ModelSpec] = {
    "flux-2-klein-4b": ModelSpec("flux2", 1.4, 0.1),
    "flux-2-klein-9b": ModelSpec("flux2", 1.5, 0.2),
    "flux-2-pro": ModelSpec("flux2", 3.0, 1.5),
    "flux-2-max": ModelSpec("flux2", 7.0, 3.0),
    "flux-2-flex": ModelSpec("flux2", 5.0, 5.0),
    "flux-kontext-pro": ModelSpec("flux1", 4.0),
    "flux-kontext-max": ModelSpec("flux1", 8.0, pool="kontext-max"),
    "flux-pro-1.1": ModelSpec("flux1", 4.0),
    "flux-pro-1.1-ultra": ModelSpec("flux1", 6.0),
    "flux-pro-1.0-fill": ModelSpec("flux1", 5.0, needs="image"),
    "flux-pro-1.0-expand": ModelSpec("flux1", 5.0, needs="image"),
}
"""The models the fake knows, by path under /v1/. `FakeBFL.models` is a copy a test may edit."""


@dataclass
class FakeTask:
    """One accepted task, as the fake sees it."""

    id: str
    model: str
    family: Literal["flux1", "flux2"]
    body: dict[str, Any]
    pools: tuple[str, ...]
    created_at: float
    """`time.monotonic()` when the submit was accepted."""
    ends_at: float
    """`time.monotonic()` when generation ends and the task leaves its pools."""
    start_time: float
    """`time.time()` when the submit was accepted: the result's `start_time`."""
    final_status: str
    seed: int
    cost: float | None
    output_format: str
    polls: int = 0
    """Poll requests answered for this task."""

    @property
    def duration(self) -> float:
        """Seconds of generation."""
        return self.ends_at - self.created_at

    @property
    def end_time(self) -> float:
        """`time.time()` when generation ends."""
        return self.start_time + self.duration

    def in_flight(self, now: float | None = None) -> bool:
        """Whether the task still holds its slots."""
        return (time.monotonic() if now is None else now) < self.ends_at


class FakeBFL:
    """A fake of BFL's FLUX API: on three loopback listeners, or in memory, or both.

    Over real HTTP, enter it as an async context:
    ```
    async with FakeBFL(time_scale=0.01) as fake, httpx.AsyncClient() as http:
        answer = await http.post(f"{fake.base_url}/v1/flux-2-pro", json={"prompt": "a fox"},
                                 headers={"x-key": fake.api_key})
    ```
    In memory, with no sockets, under BFL's production host names:
    ```
    fake = FakeBFL(time_scale=0.01)
    async with AsyncBFL(api_key=fake.api_key, http_client=fake.client()) as client:
        image = await client.generate("flux-2-pro", prompt="a fox", output_dir=tmp)
    ```

    Every generation time is multiplied by `time_scale`. `outcome(model, body)` picks each
    task's final status. `fail_next` injects faults. Counters (`submits`, `rate_limited`,
    `peak_in_flight`...) and `tasks` tell a test what the client did.

    A submit with a `webhook_url` is POSTed there when its task ends, while the fake is
    entered: status `SUCCESS` for a ready task (else the poll status), signed under
    `webhook_scheme`, retried `webhook_retries` times (delays from `webhook_retry_delay`,
    doubling) while the receiver fails, sent `webhook_copies` times (at-least-once), through
    `webhook_transport` if given (an ASGI app in memory, say). `webhooks` counts them.

    Images are `image_size` pixels, padded to `image_bytes` if given; over loopback each one
    is sent at `delivery_rate` bytes per second if given, as a CDN paces a connection.
    """

    def __init__(
        self,
        *,
        api_key: str = "fake-key",
        limits: Mapping[str, int] | None = None,
        kontext_counts_in_standard: bool = True,
        generation_time: float | Callable[[str, random.Random], float] = 0.05,
        time_scale: float = 1.0,
        result_ttl: float = 600.0,
        outcome: Callable[[str, dict[str, Any]], str] | None = None,
        credits: float = 1000.0,
        image_size: tuple[int, int] = (64, 64),
        image_bytes: int | None = None,
        delivery_rate: float | None = None,
        slow_seconds: float = 2.0,
        huge_bytes: int = 8 << 20,
        seed: int = 0,
        host: str = "127.0.0.1",
        delivery_host: str = "127.0.0.2",
        api_port: int = 0,
        polling_port: int = 0,
        delivery_port: int = 0,
        webhook_scheme: WebhookScheme = "signature",
        webhook_retries: int = 3,
        webhook_retry_delay: float = 0.5,
        webhook_copies: int = 1,
        webhook_transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.api_key = api_key
        self.limits: dict[str, int] = {**DEFAULT_LIMITS, **(limits or {})}
        self.kontext_counts_in_standard = kontext_counts_in_standard
        self.generation_time = generation_time
        self.time_scale = time_scale
        self.result_ttl = result_ttl
        self.outcome = outcome
        self.credits = credits
        self.image_size = image_size
        self.image_bytes = image_bytes
        self.delivery_rate = delivery_rate
        self.slow_seconds = slow_seconds
        self.huge_bytes = huge_bytes
        self.models: dict[str, ModelSpec] = dict(MODELS)
        self.rng = random.Random(seed)

        self.tasks: dict[str, FakeTask] = {}
        self.submits = 0
        """Accepted submits (tasks created)."""
        self.submit_attempts = 0
        """Every POST /v1/{model} on the API host, refused ones included."""
        self.rate_limited = 0
        """429 answers to submits."""
        self.polls = 0
        """Every request to /v1/get_result on the polling host."""
        self.poll_times: list[float] = []
        """`time.time()` of every poll request, to measure poll rates."""
        self.downloads = 0
        """Every request for an image on the delivery host, whatever the answer."""
        self.duplicate_submits = 0
        """Accepted submits whose model and JSON body equal an earlier accepted one."""
        self.held = 0
        """Requests handled and then held without an answer (the "hold" fault)."""
        self.peak_in_flight: dict[str, int] = dict.fromkeys(self.limits, 0)
        self.keys_seen: dict[str, list[str | None]] = {"api": [], "polling": [], "delivery": []}
        """Per host kind, the `x-key` header of each request (None if absent)."""
        self.server_errors: list[BaseException] = []
        """Exceptions raised inside the fake; the context exit raises if there are any."""

        self.webhooks = WebhookSender(
            self._task_state,
            scheme=webhook_scheme,
            retries=webhook_retries,
            retry_delay=webhook_retry_delay,
            copies=webhook_copies,
            transport=webhook_transport,
        )
        """Webhook deliveries and their counters (`attempts`, `delivered`, `failed`, `sent`)."""

        self._secret = secrets.token_bytes(32)
        self._faults: dict[str, deque[Fault]] = {kind: deque() for kind in get_args(FaultKind)}
        self._active: list[FakeTask] = []
        self._bodies_seen: set[tuple[str, str]] = set()
        self._images: dict[tuple[str, str], list[bytes]] = {}
        self._stack: AsyncExitStack | None = None
        self._loopback: HostURLs | None = None
        listen: dict[HostKind, tuple[str, int]] = {
            "api": (host, api_port),
            "polling": (host, polling_port),
            "delivery": (delivery_host, delivery_port),
        }
        self._servers: dict[HostKind, HTTPServer] = {
            kind: HTTPServer(
                partial(self._serve_loopback, kind),
                host=address,
                port=port,
                on_error=self.server_errors.append,
                server_name=_SERVER_NAMES[kind],
            )
            for kind, (address, port) in listen.items()
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> FakeBFL:
        if self._stack is not None:
            raise RuntimeError("this FakeBFL is already running")
        async with AsyncExitStack() as stack:
            for server in self._servers.values():
                stack.push_async_callback(server.aclose)  # after the task group has exited
            stack.push_async_callback(self.webhooks.aclose)
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            for server in self._servers.values():
                await server.start(task_group)
            self.webhooks.start(task_group)
            self._loopback = HostURLs(
                api=self._servers["api"].base_url,
                polling=self._servers["polling"].base_url,
                delivery=self._servers["delivery"].base_url,
            )
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        self._loopback = None
        if stack is not None:
            await stack.aclose()
        if exc_type is None and self.server_errors:
            count = len(self.server_errors)
            raise RuntimeError(f"FakeBFL failed on {count} request(s)") from self.server_errors[0]

    @property
    def loopback_urls(self) -> HostURLs:
        """The loopback listeners' base URLs, while the fake is entered with `async with`."""
        if self._loopback is None:
            raise RuntimeError(
                "this FakeBFL is not serving on loopback: enter it with `async with`, "
                "or use fake.client() to reach it in memory"
            )
        return self._loopback

    @property
    def memory_urls(self) -> HostURLs:
        """The production base URLs the in-memory transport serves (`MEMORY_URLS`)."""
        return MEMORY_URLS

    @property
    def base_url(self) -> str:
        """The API host on loopback, `http://127.0.0.1:PORT`."""
        return self.loopback_urls.api

    @property
    def polling_base_url(self) -> str:
        """The regional host on loopback that `polling_url`s point to."""
        return self.loopback_urls.polling

    @property
    def delivery_base_url(self) -> str:
        """The host on loopback that serves the images (on another loopback address)."""
        return self.loopback_urls.delivery

    def transport(self) -> httpx.AsyncBaseTransport:
        """An httpx transport that serves this fake in memory, with no sockets.

        It answers on BFL's production names, so a client's key routing runs as in
        production: the API on `https://api.bfl.ai` (and `api.eu.bfl.ai`, `api.us.bfl.ai`),
        `polling_url`s on `https://api.eu2.bfl.ai`, images on `https://delivery-eu1.bfl.ai`.
        A request to any other host raises `httpx.ConnectError`. It works whether or not the
        fake is also entered as a loopback server; both share one state.
        """
        return MemoryTransport(
            {
                name: MemoryHost(partial(self._serve, kind, MEMORY_URLS), _SERVER_NAMES[kind])
                for name, kind in _MEMORY_HOSTS.items()
            },
            on_error=self.server_errors.append,
        )

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        """An `httpx.AsyncClient` on `transport()`; `kwargs` go to the client (timeout...).

        `AsyncBFL(api_key=fake.api_key, http_client=fake.client())` then talks to the fake.
        """
        return httpx.AsyncClient(transport=self.transport(), **kwargs)

    # -- what a test can ask or change ---------------------------------------------------

    def in_flight(self, pool: str = "standard") -> int:
        """Tasks of `pool` accepted and not yet ended, right now."""
        now = time.monotonic()
        self._active = [task for task in self._active if task.in_flight(now)]
        return sum(pool in task.pools for task in self._active)

    @property
    def connections(self) -> dict[str, int]:
        """Connections accepted so far, per host kind ("api", "polling", "delivery")."""
        return {kind: server.connections for kind, server in self._servers.items()}

    def finish_now(self, *task_ids: str) -> None:
        """End the generation of these tasks (all tasks when none is named) right now."""
        now = time.monotonic()
        for task in [self.tasks[task_id] for task_id in task_ids] or self.tasks.values():
            task.ends_at = min(task.ends_at, now)
        self.webhooks.wake()

    def fail_next(self, kind: FaultKind, fault: Fault, count: int = 1) -> None:
        """Make the next `count` requests of `kind` misbehave, after any faults already queued.

        Over loopback the connection misbehaves; in memory the transport raises what httpx
        would (`RemoteProtocolError` for a hang-up or a cut body, `ReadTimeout` for an answer
        later than the read timeout).

        - "500", "502", "503": answer that status (text, HTML, JSON with Retry-After: 1); a
          submit creates nothing.
        - "drop_before": close the connection without answering; a submit creates nothing.
        - "drop_after": handle the request (a submit creates its task), then close the
          connection without answering.
        - "truncate": handle it, announce the full Content-Length, send half the body, close.
        - "slow": handle it, answer after `slow_seconds`.
        - "malformed": handle it, answer with invalid JSON (a download: a body that is not an
          image).
        - "expired" (downloads only): answer 403 as for an expired signed URL.
        - "hold": handle it (a submit creates its task), then never answer: the client is
          left inside the submit window. `held` counts them.
        - "huge": handle it and pad a JSON answer with `huge_bytes` of an extra field.
        - "incomplete": handle it and answer JSON with every field but `id` left out.
        - "unknown_status" (polls only): answer a status the API does not document.
        """
        if kind not in self._faults:
            raise ValueError(f"unknown request kind {kind!r}")
        if fault not in get_args(Fault):
            raise ValueError(f"unknown fault {fault!r}")
        if fault == "expired" and kind != "download":
            raise ValueError('the "expired" fault applies to downloads only')
        if fault == "unknown_status" and kind != "poll":
            raise ValueError('the "unknown_status" fault applies to polls only')
        if count < 1:
            raise ValueError("count must be at least 1")
        self._faults[kind].extend([fault] * count)

    def sign_url(
        self,
        task_id: str,
        *,
        expires_at: float | None = None,
        output_format: str | None = None,
        urls: HostURLs | None = None,
    ) -> str:
        """The signed delivery URL of a task's image, an Azure SAS as BFL's: it expires
        (`se=`, ISO 8601 to the second, rounded down) `result_ttl` seconds after the task
        ends, or at `expires_at` (epoch seconds). It points to `urls.delivery`: by default
        the loopback host while the fake is entered, else the in-memory one."""
        task = self.tasks[task_id]
        fmt = output_format or task.output_format
        path = f"/results/{task_id}/sample.{fmt}"
        expiry = task.end_time + self.result_ttl if expires_at is None else expires_at
        se = _utc(min(expiry, _LAST_SAS_TIME)).strftime(_SAS_TIME)
        sas = {"se": se, "sp": "r", "sv": "2024-11-04", "sr": "b", "rsct": CONTENT_TYPES[fmt]}
        sas["sig"] = self._signature(path, se)
        base = (urls or self._loopback or MEMORY_URLS).delivery
        return f"{base}{path}?{urlencode(sas, safe='/')}"

    # -- the hosts -----------------------------------------------------------------------

    async def _serve_loopback(self, kind: HostKind, request: Request) -> Response:
        return await self._serve(kind, self.loopback_urls, request)

    async def _serve(self, kind: HostKind, urls: HostURLs, request: Request) -> Response:
        """Answer `request` as the host of `kind`, naming hosts in answers after `urls`."""
        self.keys_seen[kind].append(request.headers.get("x-key"))
        if kind == "api":
            return self._serve_api(request, urls)
        if kind == "polling":
            return self._serve_polling(request, urls)
        return self._serve_delivery(request)

    # -- the API host --------------------------------------------------------------------

    def _serve_api(self, request: Request, urls: HostURLs) -> Response:
        if request.method == "POST" and request.path.startswith("/v1/"):
            self.submit_attempts += 1
            return self._with_fault("submit", "api", lambda: self._submit(request, urls))
        if request.path == "/v1/credits" and request.method == "GET":
            if not self._authorised(request):
                return _forbidden()
            return Response.json(200, {"credits": float(round(self.credits, 4))})
        if request.path.removeprefix("/v1/") in self.models:
            return Response.json(405, {"detail": "Method Not Allowed"})
        # /v1/get_result lands here too: the API host does not know regional tasks.
        return _not_found()

    def _submit(self, request: Request, urls: HostURLs) -> Response:
        model = request.path.removeprefix("/v1/")
        spec = self.models.get(model)
        if spec is None:
            return _not_found()
        if not self._authorised(request):
            return _forbidden()
        body, problem = _parse_body(request.body, spec.needs)
        if problem is not None:
            return Response.json(422, {"detail": [problem]})
        charge, cost, input_mp, output_mp = _price(spec, body)
        if output_mp is not None and output_mp > _FLUX2_MAX_MP:
            detail = f"Output size {output_mp} MP is too large: at most {_FLUX2_MAX_MP:g} MP"
            return Response.json(400, {"detail": detail})
        if self.credits < charge:
            return Response.json(402, {"detail": "Insufficient credits"})
        pools: tuple[str, ...] = (spec.pool,)
        if spec.pool != "standard" and self.kontext_counts_in_standard:
            pools += ("standard",)
        for pool in pools:
            limit = self.limits.get(pool)
            if limit is not None and self.in_flight(pool) >= limit:
                self.rate_limited += 1
                detail = (
                    f"Too many active tasks: at most {limit} tasks may be in flight "
                    f"in the {pool} pool. Wait for some to finish."
                )
                return Response.json(429, {"detail": detail}, [("retry-after", "1")])
        task = self._create_task(model, spec, body, pools, cost)
        self.credits -= charge
        if isinstance(body.get("webhook_url"), str):
            self.webhooks.add(task, urls)
        polling_url = f"{urls.polling}/v1/get_result?id={task.id}"
        return Response.json(
            200,
            {
                "id": task.id,
                "polling_url": polling_url,
                "cost": cost,
                "input_mp": input_mp,
                "output_mp": output_mp,
            },
        )

    def _create_task(
        self,
        model: str,
        spec: ModelSpec,
        body: dict[str, Any],
        pools: tuple[str, ...],
        cost: float | None,
    ) -> FakeTask:
        status = "Ready" if self.outcome is None else self.outcome(model, body)
        if status not in STATUSES:
            raise ValueError(f"outcome returned {status!r}, not one of {STATUSES}")
        if callable(self.generation_time):
            seconds = self.generation_time(model, self.rng)
        else:
            seconds = self.generation_time
        seed = body.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool):
            seed = self.rng.getrandbits(self.rng.choice((31, 48)))  # often past 2**32, like BFL
        output_format = body.get("output_format")
        now = time.monotonic()
        task = FakeTask(
            id=str(uuid.uuid4()),  # random even with a fixed seed, as ids outlive a fake
            model=model,
            family=spec.family,
            body=body,
            pools=pools,
            created_at=now,
            ends_at=now + max(0.0, seconds) * self.time_scale,
            start_time=time.time(),
            final_status=status,
            seed=seed,
            cost=cost,
            output_format=output_format if output_format in CONTENT_TYPES else "jpeg",
        )
        self.tasks[task.id] = task
        self._active.append(task)
        self.submits += 1
        for pool in pools:
            self.peak_in_flight[pool] = max(self.peak_in_flight.get(pool, 0), self.in_flight(pool))
        fingerprint = (model, json.dumps(body, sort_keys=True))
        if fingerprint in self._bodies_seen:
            self.duplicate_submits += 1
        self._bodies_seen.add(fingerprint)
        return task

    # -- the polling host ----------------------------------------------------------------

    def _serve_polling(self, request: Request, urls: HostURLs) -> Response:
        if request.path != "/v1/get_result" or request.method not in ("GET", "HEAD"):
            return _not_found()
        self.polls += 1
        self.poll_times.append(time.time())
        return self._with_fault("poll", "polling", lambda: self._poll(request, urls))

    def _poll(self, request: Request, urls: HostURLs) -> Response:
        if not self._authorised(request):
            return _forbidden()
        task_id = request.query.get("id")
        if task_id is None:
            missing = {"loc": ["query", "id"], "msg": "Field required", "type": "missing"}
            return Response.json(422, {"detail": [missing]})
        answer: dict[str, Any] = {
            "id": task_id,
            "status": "Task not found",
            "result": None,
            "progress": None,
            "details": None,
            "preview": None,
        }
        task = self.tasks.get(task_id)
        if task is not None:
            task.polls += 1
            answer.update(self._task_state(task, urls))
        return Response.json(200, answer, _POLL_HEADERS)

    def _task_state(self, task: FakeTask, urls: HostURLs) -> dict[str, Any]:
        flux1 = task.family == "flux1"
        now = time.monotonic()
        if task.in_flight(now):
            progress = round((now - task.created_at) / task.duration, 3) if flux1 else None
            return {"status": "Pending", "progress": progress}
        status = task.final_status
        if status == "Ready":
            result: dict[str, Any] = {
                "start_time": task.start_time,
                "prompt": task.body.get("prompt"),
                "seed": task.seed,
                "sample": self.sign_url(task.id, urls=urls),
            }
            if flux1:
                result.update(end_time=task.end_time, duration=task.duration)
            return {"status": status, "result": result}
        if status == "Request Moderated":
            return {
                "status": status,
                "details": {"Moderation Reasons": ["Derivative Works Filter"]},
            }
        if status == "Content Moderated":
            return {"status": status, "details": {"Moderation Reasons": ["Explicit Content"]}}
        if status == "Error":
            return {"status": status, "details": {"message": "Generation failed: internal error"}}
        return {"status": status}

    # -- the delivery host ---------------------------------------------------------------

    def _serve_delivery(self, request: Request) -> Response:
        task_id, dot, ext = request.path.removeprefix("/results/").partition("/sample.")
        if not request.path.startswith("/results/") or not dot or ext not in CONTENT_TYPES:
            return _azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        if request.method not in ("GET", "HEAD"):
            return _azure_error(405, "UnsupportedHttpVerb", "The resource doesn't support it.")
        self.downloads += 1
        return self._with_fault(
            "download", "delivery", lambda: self._deliver(request, task_id, ext)
        )

    def _deliver(self, request: Request, task_id: str, ext: str) -> Response:
        se = request.query.get("se", "")
        sig = request.query.get("sig", "")
        if not hmac.compare_digest(sig.encode(), self._signature(request.path, se).encode()):
            return _auth_failed("Signature did not match.")
        # It parses: the signature matched, so the fake wrote it.
        expiry = dt.datetime.strptime(se, _SAS_TIME).replace(tzinfo=_UTC).timestamp()
        if expiry <= time.time():
            return _auth_failed(_expired_detail(expiry))
        task = self.tasks.get(task_id)
        if task is None:
            return _azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        parts = self._images.pop((task_id, ext), None)
        if parts is None:
            parts = render(ext, task_id, self.image_size, self.image_bytes)
        self._images[(task_id, ext)] = parts  # the most recently served last
        if len(self._images) > _IMAGES_KEPT:
            del self._images[next(iter(self._images))]
        return Response(
            200,
            parts,
            CONTENT_TYPES[ext],
            [("x-ms-blob-type", "BlockBlob")],
            rate=self.delivery_rate,
        )

    def _signature(self, path: str, se: str) -> str:
        digest = hmac.digest(self._secret, f"{path}\n{se}".encode(), "sha256")
        return base64.b64encode(digest).decode("ascii")

    # -- shared --------------------------------------------------------------------------

    def _authorised(self, request: Request) -> bool:
        return request.headers.get("x-key") == self.api_key

    def _with_fault(
        self, kind: FaultKind, host: HostKind, handle: Callable[[], Response]
    ) -> Response:
        """Answer with `handle()`, spoiled by the next queued fault of `kind` if any."""
        queue = self._faults[kind]
        fault = queue.popleft() if queue else None
        if fault is None:
            return handle()
        if fault in ("500", "502", "503"):
            return _server_error(int(fault), host)
        if fault == "drop_before":
            return Response.hang_up()
        if fault == "expired":
            return _auth_failed(_expired_detail(time.time() - 1))
        response = handle()
        if fault == "hold":
            self.held += 1
            response.delay = math.inf
        elif fault in ("huge", "incomplete", "unknown_status"):
            _spoil_json(response, fault, self.huge_bytes)
        elif fault == "drop_after":
            response.drop = True
        elif fault == "truncate":
            response.truncate = True
        elif fault == "slow":
            response.delay = self.slow_seconds
        elif kind == "download":
            response.body = b"<html><body>not an image</body></html>"
        else:
            body = b"".join(response.parts)
            response.body = body[: len(body) // 2]
        return response


# -- answers -----------------------------------------------------------------------------


def _spoil_json(response: Response, fault: Fault, huge_bytes: int) -> None:
    """Rewrite a JSON answer as `fault` says; other answers are left alone."""
    if response.content_type != "application/json":
        return
    data = json.loads(b"".join(response.parts))
    if not isinstance(data, dict):
        return
    if fault == "huge":
        data["padding"] = "x" * huge_bytes
    elif fault == "incomplete":
        data = {"id": data["id"]} if "id" in data else {}
    else:
        data.update(status="Generating", result=None)
    response.body = json.dumps(data).encode()


def _not_found() -> Response:
    return Response.json(404, {"detail": "Not Found"})


def _forbidden() -> Response:
    return Response.json(403, {"detail": "Not authenticated - Invalid Authentication"})


def _azure_error(status: int, code: str, message: str, detail: str | None = None) -> Response:
    """An error as an Azure blob host words it."""
    request_id = uuid.uuid4()
    text = (
        f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
        f"<Message>{message}\nRequestId:{request_id}\nTime:{formatdate(usegmt=True)}</Message>"
    )
    if detail is not None:
        text += f"<AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail>"
    text += "</Error>"
    return Response(status, text.encode(), "application/xml")


def _auth_failed(detail: str) -> Response:
    message = (
        "Server failed to authenticate the request. Make sure the value of Authorization "
        "header is formed correctly including the signature."
    )
    return _azure_error(403, "AuthenticationFailed", message, detail)


def _utc(timestamp: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(timestamp, _UTC)


def _expired_detail(expiry: float) -> str:
    return (
        "Signature not valid in the specified time frame: "
        f"Expiry [{formatdate(expiry, usegmt=True)}] - Current [{formatdate(usegmt=True)}]"
    )


def _server_error(status: int, host: HostKind) -> Response:
    if status == 502:
        html = (
            "<html><head><title>502 Bad Gateway</title></head><body><center>"
            "<h1>502 Bad Gateway</h1></center><hr><center>nginx</center></body></html>"
        )
        return Response(502, html.encode(), "text/html")
    if host == "delivery":
        code = "ServerBusy" if status == 503 else "InternalError"
        response = _azure_error(status, code, "The server is busy or failed.")
    elif status == 503:
        response = Response.json(503, {"detail": "Service Unavailable"})
    else:
        response = Response(status, b"Internal Server Error", "text/plain; charset=utf-8")
    if status == 503:
        response.headers.append(("retry-after", "1"))
    return response


def _parse_body(raw: bytes, needs: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The submit body, or the FastAPI validation problem that refuses it."""
    try:
        body = json.loads(raw)
    except ValueError as exc:
        problem: dict[str, Any] = {"loc": ["body", 0], "msg": "JSON decode error"}
        problem.update(type="json_invalid", ctx={"error": str(exc)})
        return {}, problem
    if not isinstance(body, dict):
        msg = "Input should be a valid dictionary or object to extract fields from"
        return {}, {"loc": ["body"], "msg": msg, "type": "model_attributes_type"}
    if body.get(needs) is None:
        return body, {"loc": ["body", needs], "msg": "Field required", "type": "missing"}
    if "prompt" in body and body["prompt"] is not None and not isinstance(body["prompt"], str):
        msg = "Input should be a valid string"
        return body, {"loc": ["body", "prompt"], "msg": msg, "type": "string_type"}
    return body, _webhook_url_problem(body.get("webhook_url"))


def _webhook_url_problem(value: Any) -> dict[str, Any] | None:
    """Why `value` is no `webhook_url` BFL could call (pydantic's words), or None."""
    if value is None:
        return None
    problem: dict[str, Any] = {"loc": ["body", "webhook_url"], "input": value}
    if not isinstance(value, str):
        return problem | {"msg": "URL input should be a string or URL", "type": "url_type"}
    try:
        url = httpx.URL(value)
    except httpx.InvalidURL as exc:
        return problem | {"msg": f"Input should be a valid URL, {exc}", "type": "url_parsing"}
    if url.scheme not in ("http", "https") or not url.host:
        return problem | {"msg": "URL scheme should be 'http' or 'https'", "type": "url_scheme"}
    return None


def _price(
    spec: ModelSpec, body: Mapping[str, Any]
) -> tuple[float, float | None, float | None, float | None]:
    """(credits to charge, cost, input_mp, output_mp) of a submit: FLUX.1 reports no cost."""
    if spec.family == "flux1":
        return spec.price, None, None, None
    width, height = body.get("width"), body.get("height")
    pixels = width * height if isinstance(width, int) and isinstance(height, int) else _MEGAPIXEL
    output_mp = round(pixels / _MEGAPIXEL, 4)
    # The fake does not decode input images: each one counts as a megapixel.
    input_mp = float(sum(1 for k, v in body.items() if k.startswith("input_image") and v))
    extra = max(0.0, output_mp - 1) + input_mp
    cost = round(spec.price + extra * spec.price_per_mp, 4)
    return cost, cost, input_mp, output_mp


async def run_fake_server(**kwargs: Any) -> None:
    """Run a FakeBFL (built from `kwargs`) until cancelled, printing its three base URLs
    one a line as `api URL`, `polling URL`, `delivery URL`."""
    async with FakeBFL(**kwargs) as fake:
        print(f"api {fake.base_url}", flush=True)
        print(f"polling {fake.polling_base_url}", flush=True)
        print(f"delivery {fake.delivery_base_url}", flush=True)
        await anyio.sleep_forever()
