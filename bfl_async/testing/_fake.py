"""FakeBFL: Black Forest Labs' FLUX API, faked over real HTTP on loopback.

Three listeners play the three kinds of host a client meets: the API host (submit, credits),
a regional polling host (the `polling_url` of each task) and a delivery host that serves the
images from signed, expiring URLs. The fake keeps BFL's per-account in-flight limits on a
server-side clock, answers with BFL's wire shapes, and can inject faults on request.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
import secrets
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from email.utils import formatdate
from types import TracebackType
from typing import Any, Literal, get_args

import anyio

from ._http import HTTPServer, Request, Response
from ._images import CONTENT_TYPES, render

__all__ = ["MODELS", "FakeBFL", "FakeTask", "Fault", "FaultKind", "ModelSpec", "run_fake_server"]

FaultKind = Literal["submit", "poll", "download"]
Fault = Literal[
    "500", "502", "503", "drop_before", "drop_after", "truncate", "slow", "expired", "malformed"
]
HostKind = Literal["api", "polling", "delivery"]

STATUSES = ("Ready", "Request Moderated", "Content Moderated", "Error", "Task not found")
DEFAULT_LIMITS: Mapping[str, int] = {"standard": 24, "kontext-max": 6}
_POLL_HEADERS = (("retry-after", "1"), ("x-ratelimit-limit", "1200"))
_MEGAPIXEL = 1 << 20


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
    """A fake of BFL's FLUX API on three loopback listeners; use it as an async context.

    ```
    async with FakeBFL(time_scale=0.01) as fake, httpx.AsyncClient() as http:
        answer = await http.post(f"{fake.base_url}/v1/flux-2-pro", json={"prompt": "a fox"},
                                 headers={"x-key": fake.api_key})
    ```

    Every generation time is multiplied by `time_scale`. `outcome(model, body)` picks each
    task's final status. `fail_next` injects faults. Counters (`submits`, `rate_limited`,
    `peak_in_flight`...) and `tasks` tell a test what the client did.
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
        slow_seconds: float = 2.0,
        seed: int = 0,
        host: str = "127.0.0.1",
        delivery_host: str = "127.0.0.2",
        api_port: int = 0,
        polling_port: int = 0,
        delivery_port: int = 0,
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
        self.slow_seconds = slow_seconds
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
        self.downloads = 0
        """Every request for an image on the delivery host, whatever the answer."""
        self.duplicate_submits = 0
        """Accepted submits whose model and JSON body equal an earlier accepted one."""
        self.peak_in_flight: dict[str, int] = dict.fromkeys(self.limits, 0)
        self.keys_seen: dict[str, list[str | None]] = {"api": [], "polling": [], "delivery": []}
        """Per host kind, the `x-key` header of each request (None if absent)."""
        self.server_errors: list[BaseException] = []
        """Exceptions raised inside the fake; the context exit raises if there are any."""

        self._secret = secrets.token_bytes(32)
        self._faults: dict[str, deque[Fault]] = {kind: deque() for kind in get_args(FaultKind)}
        self._active: list[FakeTask] = []
        self._bodies_seen: set[tuple[str, str]] = set()
        self._images: dict[tuple[str, str], list[bytes]] = {}
        self._stack: AsyncExitStack | None = None
        self._servers: dict[HostKind, HTTPServer] = {
            "api": HTTPServer(
                self._serve_api, host=host, port=api_port, on_error=self.server_errors.append
            ),
            "polling": HTTPServer(
                self._serve_polling,
                host=host,
                port=polling_port,
                on_error=self.server_errors.append,
            ),
            "delivery": HTTPServer(
                self._serve_delivery,
                host=delivery_host,
                port=delivery_port,
                on_error=self.server_errors.append,
                server_name="Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0",
            ),
        }

    # -- lifecycle -----------------------------------------------------------------------

    async def __aenter__(self) -> FakeBFL:
        if self._stack is not None:
            raise RuntimeError("this FakeBFL is already running")
        async with AsyncExitStack() as stack:
            for server in self._servers.values():
                stack.push_async_callback(server.aclose)  # after the task group has exited
            task_group = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(task_group.cancel_scope.cancel)
            for server in self._servers.values():
                await server.start(task_group)
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            await stack.aclose()
        if exc_type is None and self.server_errors:
            count = len(self.server_errors)
            raise RuntimeError(f"FakeBFL failed on {count} request(s)") from self.server_errors[0]

    @property
    def base_url(self) -> str:
        """The API host, `http://127.0.0.1:PORT`."""
        return self._servers["api"].base_url

    @property
    def polling_base_url(self) -> str:
        """The regional host that `polling_url`s point to."""
        return self._servers["polling"].base_url

    @property
    def delivery_base_url(self) -> str:
        """The host that serves the images (on another loopback address)."""
        return self._servers["delivery"].base_url

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

    def fail_next(self, kind: FaultKind, fault: Fault, count: int = 1) -> None:
        """Make the next `count` requests of `kind` misbehave, after any faults already queued.

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
        """
        if kind not in self._faults:
            raise ValueError(f"unknown request kind {kind!r}")
        if fault not in get_args(Fault):
            raise ValueError(f"unknown fault {fault!r}")
        if fault == "expired" and kind != "download":
            raise ValueError('the "expired" fault applies to downloads only')
        if count < 1:
            raise ValueError("count must be at least 1")
        self._faults[kind].extend([fault] * count)

    def sign_url(
        self, task_id: str, *, expires_at: float | None = None, output_format: str | None = None
    ) -> str:
        """The signed delivery URL of a task's image; it expires `result_ttl` seconds after
        the task ends, or at `expires_at` (epoch seconds)."""
        task = self.tasks[task_id]
        path = f"/results/{task_id}/sample.{output_format or task.output_format}"
        expiry = task.end_time + self.result_ttl if expires_at is None else expires_at
        se = f"{expiry:.3f}"
        return f"{self.delivery_base_url}{path}?se={se}&sig={self._signature(path, se)}"

    # -- the API host --------------------------------------------------------------------

    async def _serve_api(self, request: Request) -> Response:
        self.keys_seen["api"].append(request.headers.get("x-key"))
        if request.method == "POST" and request.path.startswith("/v1/"):
            self.submit_attempts += 1
            return self._with_fault("submit", "api", lambda: self._submit(request))
        if request.path == "/v1/credits" and request.method == "GET":
            if not self._authorised(request):
                return _forbidden()
            return Response.json(200, {"credits": round(self.credits, 4)})
        if request.path.removeprefix("/v1/") in self.models:
            return Response.json(405, {"detail": "Method Not Allowed"})
        # /v1/get_result lands here too: the API host does not know regional tasks.
        return _not_found()

    def _submit(self, request: Request) -> Response:
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
        polling_url = f"{self.polling_base_url}/v1/get_result?id={task.id}"
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

    async def _serve_polling(self, request: Request) -> Response:
        self.keys_seen["polling"].append(request.headers.get("x-key"))
        if request.path != "/v1/get_result" or request.method not in ("GET", "HEAD"):
            return _not_found()
        self.polls += 1
        return self._with_fault("poll", "polling", lambda: self._poll(request))

    def _poll(self, request: Request) -> Response:
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
            answer.update(self._task_state(task))
        return Response.json(200, answer, _POLL_HEADERS)

    def _task_state(self, task: FakeTask) -> dict[str, Any]:
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
                "sample": self.sign_url(task.id),
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

    async def _serve_delivery(self, request: Request) -> Response:
        self.keys_seen["delivery"].append(request.headers.get("x-key"))
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
        if not hmac.compare_digest(sig, self._signature(request.path, se)):
            return _auth_failed("Signature did not match.")
        expiry = float(se)  # it parses: the signature matched, so the fake wrote it
        if expiry <= time.time():
            return _auth_failed(_expired_detail(expiry))
        task = self.tasks.get(task_id)
        if task is None:
            return _azure_error(404, "BlobNotFound", "The specified blob does not exist.")
        parts = self._images.get((task_id, ext))
        if parts is None:
            parts = render(ext, task_id, self.image_size, self.image_bytes)
            self._images[(task_id, ext)] = parts
        return Response(200, parts, CONTENT_TYPES[ext], [("x-ms-blob-type", "BlockBlob")])

    def _signature(self, path: str, se: str) -> str:
        return hmac.new(self._secret, f"{path}\n{se}".encode(), hashlib.sha256).hexdigest()

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
        if fault == "drop_after":
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
    return body, None


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
