"""`AsyncBFL`: validate → take a slot → submit → watch until terminal → release → download."""

from __future__ import annotations

import contextlib
import enum
import inspect
import logging
import math
import os
import random
import re
import ssl
import time
import urllib.request
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Literal, overload

import anyio
import anyio.abc
import httpcore
import httpx

from ._batch import Batch
from ._catalog import CATALOG, ModelSpec
from ._download import DEFAULT_MAX_BYTES, Downloader, check_output_dir, saved_as
from ._download import check_file_name as _check_name
from ._errors import (
    APIConnectionError,
    BFLError,
    DownloadError,
    MissingAPIKeyError,
    OutputExistsError,
    ParameterError,
    Problem,
    SubmissionUncertainError,
    TaskError,
    WaitTimeoutError,
)
from ._http import (
    API,
    REGIONS,
    Accepted,
    NotSent,
    Refused,
    cost_or_none,
    float_or_none,
    is_api_host,
    is_http_url,
    resendable,
    retry_delay,
)
from ._limits import InFlightLimiter, InFlightSlot, Limiter
from ._models import GeneratedImage, Outcome, Result, Task, Timings
from ._network import NetworkBackend
from ._polling import PollSchedule, _terminal, has_sample, watch_task
from ._push import EarlyEvents, FirstNow, Slowed, poll_answer
from ._requests import build_job, build_request
from ._schedule import LearnedSchedule
from .webhooks import WebhookEvent, verify_webhook

__all__ = ["AsyncBFL", "OnSubmitted"]

logger = logging.getLogger("bfl_async")

OnSubmitted = Callable[[Task], Awaitable[None] | None]
"""Called with each task handle the moment BFL accepts it (sync or async): store it there.

```python
def save(task: Task) -> None:
    Path(f"tasks/{task.id}.json").write_text(task.model_dump_json())

AsyncBFL(on_submitted=save)
```
"""

Region = Literal["global", "eu", "us"]


class _Unset(enum.Enum):
    UNSET = enum.auto()


_UNSET = _Unset.UNSET
_KEEP_FINISHED = 900.0  # seconds a finished watch is kept for late `wait` calls
_OUTPUT_DIRS_KEPT = 256  # output directories known to take files, checked again past that
_RAW_PATH = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(?:/[A-Za-z0-9][A-Za-z0-9._-]*)*")
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)


class _RoutingTransport(httpx.AsyncBaseTransport):
    """One connection pool per origin, sized by the kind of host.

    Large downloads then never hold the connections that polls and submits need, and each
    request scans only its own origin's idle connections: httpcore checks every idle
    connection of a pool on each request (quadratically in places), so few are kept alive.
    The https pools share one TLS context (each costs tens of milliseconds of CPU to load),
    and their connections run on `NetworkBackend` (asyncio's transports under asyncio).
    Proxies come from the environment, as httpx's own client takes them (`HTTPS_PROXY`,
    `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`), which it does not once given a transport.
    """

    def __init__(self, base_url: httpx.URL, verify: bool | ssl.SSLContext = True) -> None:
        self._base_url = base_url
        self._verify = verify
        self._pools: dict[tuple[str, str, int | None], httpx.AsyncHTTPTransport] = {}
        self._tls: ssl.SSLContext | None = None
        self._network = NetworkBackend()

    def _pool(self, url: httpx.URL) -> httpx.AsyncHTTPTransport:
        origin = (url.scheme, url.host, url.port)
        pool = self._pools.get(origin)
        if pool is None:
            size = _API_CONNECTIONS if is_api_host(url, self._base_url) else _DELIVERY_CONNECTIONS
            limits = httpx.Limits(
                max_connections=size,
                max_keepalive_connections=_KEEP_ALIVE,
                keepalive_expiry=_IDLE_EXPIRY,
            )
            tls = self._tls_for(url.scheme)
            proxy = _proxy_for(url)
            pool = self._pools[origin] = httpx.AsyncHTTPTransport(
                limits=limits, verify=tls, proxy=proxy
            )
            # httpx has no network_backend option: the same pool, built again with ours. A
            # future httpx building something else keeps its own, as does a proxy's.
            if proxy is None and isinstance(pool._pool, httpcore.AsyncConnectionPool):
                pool._pool = httpcore.AsyncConnectionPool(
                    ssl_context=tls,
                    max_connections=size,
                    max_keepalive_connections=_KEEP_ALIVE,
                    keepalive_expiry=_IDLE_EXPIRY,
                    network_backend=self._network,
                )
        return pool

    def _tls_for(self, scheme: str) -> ssl.SSLContext:
        if isinstance(self._verify, ssl.SSLContext):
            return self._verify
        if self._verify is False:
            return httpx.create_ssl_context(verify=False)
        if scheme != "https":
            # No TLS on this origin: a context that trusts nothing spares loading the CA
            # bundle, and would fail closed if ever used.
            return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        if self._tls is None:
            self._tls = httpx.create_ssl_context()
        return self._tls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self._pool(request.url).handle_async_request(request)

    async def aclose(self) -> None:
        for pool in self._pools.values():
            await pool.aclose()


def _proxy_for(url: httpx.URL) -> str | None:
    """The proxy the environment names for `url` (as urllib and requests read it), if any."""
    proxies = urllib.request.getproxies()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass(f"{url.host}:{url.port}" if url.port else url.host):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


_API_CONNECTIONS = 32  # room for a burst of 24 submits, and polls beside them
_DELIVERY_CONNECTIONS = 32
_KEEP_ALIVE = 8  # after the first burst, requests come a few at a time
# The pool reuses its oldest idle connection first, so connections a burst added beyond the
# ones in steady use idle until they expire.
_IDLE_EXPIRY = 10.0


@dataclass(eq=False)
class _Watch:
    """The client's ownership of one accepted task, until it is terminal."""

    task: Task
    slot: InFlightSlot
    accepted_at: float
    done: anyio.Event
    pushed: bool = False
    """A webhook will report the task's end: poll only as a slow safety net."""
    resumed: bool = False
    """A handle from elsewhere (or polled again after an error), perhaps ended long ago:
    its first poll goes at once."""
    journaled: bool = False
    """A batch's journal holds the task: the batch's next run picks it up, so a client that
    closes on it leaves nobody a handle to log."""
    result: Result | None = None
    error: Exception | None = None
    trace: TracebackType | None = None
    """Where `error` was raised: each caller's raise starts from it again (raising the same
    exception appends the raiser's frames, which it then keeps alive with their locals)."""
    finished_at: float | None = None
    event: WebhookEvent | None = None
    """The terminal webhook event that ended the watch, if one did."""
    polling: anyio.CancelScope = field(default_factory=anyio.CancelScope)

    def outcome(self) -> Result:
        if self.result is not None:
            return self.result
        if self.error is not None:
            raise self.error.with_traceback(self.trace)
        raise WaitTimeoutError(
            f"the client closed before task {self.task.id} finished; it may still finish "
            "on BFL's side: call wait(e.task) on an open client",
            task=self.task,
        )


@dataclass(eq=False)
class _Post:
    """One submit's POST, run in the client's own task group: however its caller is
    cancelled (also natively, by `asyncio.wait_for` or a server's shutdown), the answer is
    taken in, and a paid task is watched and its handle logged, never dropped."""

    done: anyio.Event = field(default_factory=anyio.Event)
    sent_at: float = 0.0
    watch: _Watch | None = None
    failure: Refused | NotSent | None = None
    error: Exception | None = None
    caller_gone: bool = False


def _check_webhook(url: str | None, secret: str | None) -> str | None:
    """The client's webhook URL, once checked to come with a secret and to be http(s)."""
    if url is None and secret is None:
        return None
    if not isinstance(secret, str | None) or not isinstance(url, str | None):
        # Bytes would pass here and fail every delivery's check (the route answering 500).
        raise TypeError("webhook_url and webhook_secret must be str")
    if not url or not secret:
        raise ValueError("give webhook_url and webhook_secret together, both non-empty")
    if secret != secret.strip() or not (secret.isascii() and secret.isprintable()):
        # BFL may echo it in a header (X-Webhook-Secret), which would never match.
        raise ValueError(
            "webhook_secret must be printable ASCII with no spaces around it (a secret read "
            "from a file ends with a newline)"
        )
    if not is_http_url(url):
        raise ValueError("webhook_url must be an absolute http(s) URL")
    return url


def _make_limiter(
    limiter: InFlightLimiter | str | None, limits: Mapping[str, int] | None, separate: bool
) -> InFlightLimiter:
    """The limiter given, else one at `limiter` or `BFL_LIMITER_URL` (redis://, in the
    namespace `BFL_LIMITER_NAMESPACE` or "bfl"), else the in-process one."""
    url = (os.environ.get("BFL_LIMITER_URL") or None) if limiter is None else limiter
    if url is None:
        return Limiter(limits, separate_pools=separate)
    if not isinstance(url, str):
        if limits is not None or separate:
            raise ValueError(
                "limits= and separate_pools= size the limiter the client makes; with "
                "limiter=, give them to that limiter instead"
            )
        return url
    from .redis import RedisLimiter  # the optional extra, imported only when asked for

    # One namespace per account: two keys sharing a Redis would otherwise share their limits.
    namespace = os.environ.get("BFL_LIMITER_NAMESPACE") or "bfl"
    return RedisLimiter(url, namespace=namespace, limits=limits, separate_pools=separate)


def _of_the_task(error: Exception | None) -> bool:
    """Whether a finished watch ended in the task's own outcome (a result, or a `TaskError`),
    which polling again would only repeat; not in a failure of the polling itself."""
    return error is None or isinstance(error, TaskError)


def _log_left(task: Task, why: str) -> None:
    """Log a paid task that no caller will be given: its handle, to pick it up again."""
    logger.warning(
        "task %s is paid but no caller holds it (%s); it keeps running on BFL's side. "
        "Resume it with client.wait(Task.model_validate_json(%r))",
        task.id,
        why,
        task.model_dump_json(),
    )


def _check_seconds(
    value: object, field: str, allowed: str, *, positive: bool = False, negative: bool = False
) -> None:
    """Raise a `TypeError` or `ValueError` naming `field` unless `value` is None or a number
    of seconds it allows (`positive`: > 0; `negative`: any; else >= 0; never NaN)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{field} must be {allowed}, not {value!r}")
    if math.isnan(value) or (positive and value <= 0) or (not negative and value < 0):
        raise ValueError(f"{field} must be {allowed}, not {value!r}")


def _cut_short(task: Task | None) -> Exception:
    """The error of a `generate_many` job the client's close stopped: its paid task to wait
    for again, or that nothing was paid."""
    if task is None:
        return RuntimeError("the client closed before this job was submitted; nothing was paid")
    return WaitTimeoutError(
        f"the client closed before the image of task {task.id} was saved; call "
        "wait(e.task) on an open client to get it",
        task=task,
    )


def _pool_of(model: str) -> str:
    spec = CATALOG.get(model)
    return spec.pool if spec is not None else "standard"


class AsyncBFL:
    """Async client for Black Forest Labs' FLUX API.

    Use it as `async with AsyncBFL() as client:`. The client owns every task BFL accepts:
    a background watcher polls it to the end and holds its in-flight slot until then,
    whether or not anyone awaits it, so cancelling a caller neither leaks nor frees a slot
    early. One client serves a whole app; gather hundreds of `generate` calls on it.

    ```python
    async with AsyncBFL(region="eu") as client:  # key from BFL_API_KEY
        images = await asyncio.gather(
            *(client.generate("flux-2-pro", prompt=p, output_dir="out/") for p in prompts)
        )
    ```
    """

    def __init__(
        self,
        api_key: str | None = None,
        *,
        region: Region = "global",
        base_url: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
        limits: Mapping[str, int] | None = None,
        separate_pools: bool = False,
        limiter: InFlightLimiter | str | None = None,
        poll_schedule: PollSchedule | None = None,
        poll_rate: float | None = 20.0,
        wait_timeout: float | None = 600.0,
        close_grace: float = 30.0,
        on_submitted: OnSubmitted | None = None,
        submit_retries: int = 3,
        rate_limit_retries: int = 20,
        download_attempts: int = 3,
        max_download_bytes: int | None = DEFAULT_MAX_BYTES,
        retry_base_delay: float = 0.5,
        verify: bool | ssl.SSLContext = True,
        webhook_url: str | None = None,
        webhook_secret: str | None = None,
    ) -> None:
        # Checked here, not when used: a bad wait would raise only once a task is paid, and a
        # bad grace would stop the close half-way, leaving `async with` waiting for ever.
        _check_seconds(wait_timeout, "wait_timeout", "seconds > 0, or None", positive=True)
        _check_seconds(close_grace, "close_grace", "seconds >= 0 (math.inf: no limit)")
        key = api_key if api_key is not None else os.environ.get("BFL_API_KEY")
        key = key.strip() if key else key  # a key read from a file ends with a newline
        if not key:
            raise MissingAPIKeyError(
                "no API key: set the BFL_API_KEY environment variable or pass "
                "AsyncBFL(api_key=...). Create a key at https://dashboard.bfl.ai"
            )
        bad = next((i for i, c in enumerate(key) if not "!" <= c <= "~"), None)
        if bad is not None:  # httpx would refuse the header, and name the key in the error
            raise ValueError(
                f"the API key has a character an HTTP header cannot carry at position {bad + 1} "
                "(a space, a control or non-ASCII character): check how it was copied"
            )
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}; allowed: {', '.join(REGIONS)}")
        url = base_url or os.environ.get("BFL_BASE_URL") or REGIONS[region]
        if not is_http_url(url):
            source = "base_url" if base_url else "$BFL_BASE_URL"
            raise ValueError(
                "base_url must be an absolute http(s) URL such as https://api.bfl.ai "
                f"(check {source})"
            )
        self.base_url = httpx.URL(url.rstrip("/"))
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            timeout=timeout,
            transport=_RoutingTransport(self.base_url, verify),
            headers={"user-agent": "bfl-async"},
        )
        self._api = API(self._http, key, str(self.base_url))
        self._downloader = Downloader(
            self._http,
            attempts=download_attempts,
            max_bytes=max_download_bytes,
            retry_base_delay=retry_base_delay,
        )
        self._limiter = _make_limiter(limiter, limits, separate_pools)
        self._unsubscribe: Callable[[], None] | None = None
        self._schedule: PollSchedule = poll_schedule or LearnedSchedule()
        self.webhook_url = _check_webhook(webhook_url, webhook_secret)
        """Where BFL pushes the end of the tasks this client submits (None: polling only)."""
        self._webhook_secret = webhook_secret
        self._slowed = Slowed(self._schedule)
        self._pushes_heard = False  # any verified delivery, or one another worker relayed
        self._told_no_pushes = False
        self._early = EarlyEvents()
        self._poll_budget = self._limiter.poll_budget(poll_rate) if poll_rate is not None else None
        self._wait_timeout = wait_timeout
        self._close_grace = close_grace
        self._on_submitted = on_submitted
        self._submit_retries = submit_retries
        self._rate_limit_retries = rate_limit_retries
        self._retry_base = retry_base_delay
        self._watches: dict[str, _Watch] = {}
        self._finished: deque[_Watch] = deque()
        self._tg: anyio.abc.TaskGroup | None = None  # around the `async with` body
        self._background: anyio.abc.TaskGroup | None = None  # the watches, inside one task
        self._posts: set[_Post] = set()
        self._saving: set[anyio.Event] = set()  # `generate` calls, from acceptance to saved
        self._closed = False
        self._output_dirs: set[Path] = set()  # checked to take files (`_check_output_dir`)
        self._output_dir_check: anyio.Lock | None = None  # made on the loop, when first used

    def __repr__(self) -> str:
        return f"<AsyncBFL base_url={str(self.base_url)!r}>"

    @property
    def limiter(self) -> InFlightLimiter:
        """The in-flight limiter: `client.limiter.in_use("standard")` and friends."""
        return self._limiter

    @property
    def in_flight(self) -> list[Task]:
        """Handles of the accepted tasks the client is still watching."""
        return [w.task for w in self._watches.values() if not w.done.is_set()]

    # --- lifecycle ---------------------------------------------------------------------

    async def __aenter__(self) -> AsyncBFL:
        if self._tg is not None or self._closed:
            raise RuntimeError("an AsyncBFL can be entered once; create a new one")
        await self._limiter.start()
        self._unsubscribe = self._limiter.subscribe(self._deliver_relayed)
        tg = anyio.create_task_group()
        await tg.__aenter__()
        self._tg = tg
        self._background = await tg.start(self._serve)
        return self

    async def _serve(self, *, task_status: anyio.abc.TaskStatus[anyio.abc.TaskGroup]) -> None:
        """Host the background work (watches, `generate_many`) in a task group of its own, so
        that `aclose` cancels that work and never the caller's `async with` body."""
        async with anyio.create_task_group() as background:
            # Pushes nobody claims are logged when they expire, while their URL still works.
            background.start_soon(self._early.run, name="bfl-early-events")
            task_status.started(background)
            await anyio.sleep_forever()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        assert self._tg is not None
        try:
            await self.aclose()
        except BaseException:
            await self._tg.__aexit__(None, None, None)  # its work is cancelled already
            raise
        if exc is not None and not isinstance(exc, anyio.get_cancelled_exc_class()):
            # The body's own error leaves as it was raised, not wrapped in an ExceptionGroup
            # by the task group (which has nothing of its own to report but a failed watch).
            await self._tg.__aexit__(None, None, None)
            return None
        return await self._tg.__aexit__(exc_type, exc, tb)

    async def aclose(self) -> None:
        """Wait for submits on their way, then up to `close_grace` s for accepted tasks (and
        for `generate` calls to save their images); close.

        A task left to a webhook is polled at once and then on the normal schedule: the
        server that hears pushes most likely stops with the client. A task still running
        after that is logged at WARNING with its handle, so it can be picked up again with
        `wait`: a paid task is never dropped silently.
        """
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            try:
                await self._settle()
            finally:  # also when cancelled natively (asyncio), which no shield stops: the
                # watches left running would keep `async with` from ever exiting
                self._stop()
                if self._owns_http:
                    await self._http.aclose()
                if self._unsubscribe is not None:
                    self._unsubscribe()
                    self._unsubscribe = None
                    await self._limiter.aclose()

    async def _settle(self) -> None:
        """`aclose`'s waits: for submits on their way, then for the grace."""
        # A submit on its way may come back a paid task: its answer is waited for, however
        # long (the HTTP read timeout bounds it), before the HTTP client closes under it.
        while self._posts:
            await next(iter(self._posts)).done.wait()
        for watch in self._watches.values():
            if watch.pushed and watch.event is None:
                watch.polling.cancel()
        with anyio.move_on_after(self._close_grace):
            for watch in [w for w in self._watches.values() if not w.done.is_set()]:
                await watch.done.wait()
            while self._saving:  # `generate` calls downloading what the grace waited for
                await next(iter(self._saving)).wait()

    def _stop(self) -> None:
        """Log the tasks still in flight, and stop the background work."""
        for watch in self._watches.values():
            # A watch ended with neither was cancelled from outside (a scope around the
            # `async with` block): its task is as much in flight as a running one's.
            if watch.result is not None or watch.error is not None:
                continue
            if watch.journaled:
                logger.info("task %s is still running; its batch's journal holds it", watch.task.id)
            else:
                _log_left(watch.task, "the client closed while it was still in flight")
        self._early.close()  # pushes for tasks it never saw accepted, logged
        if self._background is not None:
            self._background.cancel_scope.cancel()

    def _task_group(self) -> anyio.abc.TaskGroup:
        if self._closed:
            raise RuntimeError("this AsyncBFL is closed; create a new one")
        if self._background is None:
            raise RuntimeError(
                "use AsyncBFL inside `async with AsyncBFL() as client:` so it can watch "
                "the tasks it submits"
            )
        return self._background

    # --- submit ------------------------------------------------------------------------

    async def submit(
        self,
        model: str,
        *,
        on_submitted: OnSubmitted | None = None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        **params: Any,
    ) -> Task:
        """Validate the parameters locally, wait for a slot, and submit one task.

        Returns the task's handle once BFL has accepted (and charged for) it. Raises
        `ParameterError` before sending anything when a parameter is invalid.
        `before_send` is awaited once a slot is held, right before each POST: record there
        that a submit may be on its way (a job queue's "submitting"), or raise to cancel it.

        ```python
        task = await client.submit("flux-2-pro", prompt="a red fox", width=1024, height=768)
        result = await client.wait(task)
        ```
        """
        spec, body = build_request(model, params)
        watch, _, _ = await self._submit(
            spec.name, spec.pool, body, params, on_submitted, before_send
        )
        return watch.task

    async def submit_raw(
        self,
        model: str,
        body: Mapping[str, Any],
        *,
        pool: str | None = None,
        on_submitted: OnSubmitted | None = None,
    ) -> Task:
        """Submit `body` as is to `/v1/{model}`, for models newer than the catalog.

        Nothing is validated but the path; `pool` defaults to the catalog's pool or
        "standard".

        ```python
        task = await client.submit_raw("flux-9-pro", {"prompt": "a red fox", "new_option": 3})
        ```
        """
        if not _RAW_PATH.fullmatch(model) or ".." in model:
            raise ParameterError(
                model, [Problem("model", "not a valid API path", "letters, digits, . _ - /")]
            )
        watch, _, _ = await self._submit(
            model, pool or _pool_of(model), dict(body), body, on_submitted
        )
        return watch.task

    async def _submit(
        self,
        model: str,
        pool: str,
        body: Mapping[str, Any],
        params: Mapping[str, Any],
        on_submitted: OnSubmitted | None,
        before_send: Callable[[], Awaitable[None]] | None = None,
        on_accepted: Callable[[Task], Awaitable[None]] | None = None,
        shield: Callable[[], anyio.CancelScope] | None = None,
        on_retry: Callable[[], Awaitable[None]] | None = None,
    ) -> tuple[_Watch, float, float]:
        """Submit with the retry rules of `post_submit`; return the watch and its timings.

        `before_send` runs once a slot is held, right before each POST (a batch records
        the attempt there, or raises to cancel it: the slot is then released). `on_accepted`
        runs first of all when BFL accepts (a batch journals the paid handle there); with
        it, a failing `on_submitted` is logged, not raised: the task is paid and recorded.
        `shield` makes the shielded scope each POST runs in, for a batch to abandon it:
        cancelled, the submit raises `SubmissionUncertainError`. `on_retry` runs when an
        attempt was refused or never sent (nothing paid), before waiting to try again.
        """
        self._task_group()  # open, and not closed
        if self.webhook_url is not None and "webhook_url" not in body:
            hook = {"webhook_url": self.webhook_url, "webhook_secret": self._webhook_secret}
            body = {**body, **hook}  # not in `params`: resent, they come from the client again
        # Only pushes to this client's own route arrive here: any other URL is polled as usual.
        pushed = self.webhook_url is not None and body.get("webhook_url") == self.webhook_url
        not_sent = refused = 0
        front = False
        started = anyio.current_time()
        while True:
            slot = await self._limiter.acquire(pool, front=front)
            queued = anyio.current_time() - started
            try:
                # A limiter may hand out a slot without a checkpoint (`Limiter` has one):
                # a caller cancelled by then must not submit.
                await anyio.lowlevel.checkpoint_if_cancelled()
                if before_send is not None:
                    await before_send()
                tg = self._task_group()
            except BaseException:
                slot.release()
                raise
            post = _Post()
            self._posts.add(post)
            tg.start_soon(
                self._post, post, model, body, params, slot, pushed, shield,
                on_submitted, on_accepted,
            )  # fmt: skip
            try:
                # Once the POST is on its way, a cancelled caller must not lose its answer.
                with anyio.CancelScope(shield=True):
                    await post.done.wait()
            except BaseException:  # cancelled natively (asyncio): the POST goes on without us
                post.caller_gone = True
                if post.watch is not None:
                    _log_left(post.watch.task, "its submit's caller was cancelled")
                elif isinstance(post.error, SubmissionUncertainError):
                    logger.warning("%s (its caller was cancelled)", post.error)
                raise
            if post.error is not None:
                raise post.error
            if post.watch is not None:
                return post.watch, queued, anyio.current_time() - post.sent_at
            failure = post.failure
            assert failure is not None
            front = True
            if isinstance(failure, Refused):
                refused += 1
                if refused > self._rate_limit_retries:
                    raise failure.error
                delay = retry_delay(self._retry_base, refused, failure.retry_after)
                logger.info(
                    "submit to %r refused (%d); retrying in %.1fs",
                    model,
                    failure.error.status_code,
                    delay,
                )
            else:
                not_sent += 1
                if not_sent > self._submit_retries:
                    raise APIConnectionError(
                        f"could not reach {self.base_url} to submit to {model!r} "
                        f"({failure.reason}); nothing was sent, so nothing was paid. "
                        "Check the network and retry"
                    )
                delay = min(8.0, self._retry_base * 2.0 ** (not_sent - 1))
                delay *= random.uniform(1.0, 1.25)
                logger.info("submit to %r not sent (%s); retrying", model, failure.reason)
            if on_retry is not None:
                await on_retry()
            await anyio.sleep(delay)

    async def _post(
        self,
        post: _Post,
        model: str,
        body: Mapping[str, Any],
        params: Mapping[str, Any],
        slot: InFlightSlot,
        pushed: bool,
        shield: Callable[[], anyio.CancelScope] | None,
        on_submitted: OnSubmitted | None,
        on_accepted: Callable[[Task], Awaitable[None]] | None,
    ) -> None:
        """Send one submit's POST and take in its answer, for `_submit` (see `_Post`)."""
        held: InFlightSlot | None = slot
        try:
            # Shielded from `aclose` too, which waits for it within its grace.
            with anyio.CancelScope(shield=True):
                post.sent_at = anyio.current_time()
                accepted: Accepted | None = None
                posting = anyio.CancelScope(shield=True) if shield is None else shield()
                with posting:  # only its batch may abandon the POST itself
                    try:
                        accepted = await self._api.post_submit(model, body, params)
                    except Refused as exc:
                        if exc.error.status_code == 429:  # at the account's limit (a 503: the
                            slot.refused()  # server is busy, not the account full)
                        post.failure = exc
                    except NotSent as exc:
                        post.failure = exc
                if accepted is not None:
                    assert self._background is not None
                    post.watch = self._adopt(self._background, accepted, model, slot, pushed)
                    held = None
                    if post.caller_gone:
                        _log_left(post.watch.task, "its submit's caller was cancelled")
                    # Answered: `aclose` (a callback may call it) now waits for the watch.
                    self._posts.discard(post)
                    await self._notify(post.watch.task, on_submitted, on_accepted)
                elif posting.cancelled_caught:
                    raise SubmissionUncertainError(
                        "abandoned on its way", model=model, params=resendable(params)
                    )
        except Exception as exc:
            post.error = exc
            if post.caller_gone and isinstance(exc, SubmissionUncertainError):
                logger.warning("%s (its caller was cancelled)", exc)
        finally:
            if held is not None:
                held.release()
            self._posts.discard(post)
            post.done.set()

    def _adopt(
        self,
        tg: anyio.abc.TaskGroup,
        accepted: Accepted,
        model: str,
        slot: InFlightSlot,
        pushed: bool,
    ) -> _Watch:
        answer = accepted.body
        task = Task(
            id=answer["id"],
            polling_url=answer["polling_url"],
            model=model,
            cost=cost_or_none(answer.get("cost")),
            input_mp=float_or_none(answer.get("input_mp")),
            output_mp=float_or_none(answer.get("output_mp")),
            submitted_at=time.time(),
        )
        slot.accepted()
        logger.debug("task %s accepted by %r", task.id, model)
        return self._start_watch(tg, task, slot, anyio.current_time(), pushed)

    def _start_watch(
        self,
        tg: anyio.abc.TaskGroup,
        task: Task,
        slot: InFlightSlot,
        accepted_at: float,
        pushed: bool,
        resumed: bool = False,
    ) -> _Watch:
        self._prune()
        watch = _Watch(
            task=task,
            slot=slot,
            accepted_at=accepted_at,
            done=anyio.Event(),
            pushed=pushed,
            resumed=resumed,
        )
        self._watches[task.id] = watch
        early = self._early.pop(task.id)
        if early is not None:
            self._resolve(watch, early)
        tg.start_soon(self._run_watch, watch, name=f"bfl-watch-{task.id}")
        return watch

    async def _run_watch(self, watch: _Watch) -> None:
        try:
            with watch.polling:  # cancelled by a webhook event (`deliver`) or by `aclose`
                first = FirstNow(self._schedule) if watch.resumed else None
                watch.result = await self._poll(watch, self._slowed if watch.pushed else first)
                if watch.pushed and not self._pushes_heard:
                    self._no_pushes(watch.task)
            if watch.result is None and watch.event is None:
                # The client closes, and with it most likely the server that hears pushes:
                # a task left to them is polled at once, then on the normal schedule.
                watch.polling = anyio.CancelScope()
                with watch.polling:
                    watch.result = await self._poll(watch, FirstNow(self._schedule))
            if watch.result is None and watch.event is not None:
                answer = poll_answer(watch.event)
                if answer["status"] == "Ready" and not has_sample(answer):
                    # The push said Ready without saying where the image is: ask now, until
                    # a poll or another push (`_deliver` ends this) says where.
                    watch.polling = anyio.CancelScope()
                    with watch.polling:
                        watch.result = await self._poll(watch, FirstNow(self._schedule))
                    answer = poll_answer(watch.event)
                if watch.result is None:
                    watch.result = _terminal(watch.task, answer, 0)
        except Exception as exc:
            watch.error, watch.trace = exc, exc.__traceback__
            logger.info("task %s ended: %s", watch.task.id, exc)
        finally:
            if watch.result is None and watch.error is None:
                watch.slot.abandon()  # the client closes while BFL still counts the task
            else:
                watch.slot.release()
            watch.finished_at = anyio.current_time()
            self._finished.append(watch)
            watch.done.set()

    def _no_pushes(self, task: Task) -> None:
        """Say once that a task left to webhooks was found done by polling, with no delivery
        heard at all: a webhook URL BFL cannot reach (a typo, a route not mounted, a
        firewall) otherwise shows only as results 10 times slower."""
        if self._told_no_pushes:
            return
        self._told_no_pushes = True
        logger.warning(
            "task %s ended without a webhook: none has reached this client since it started. "
            "Check that BFL can reach %s and that its route hands deliveries to the client "
            "(handle_webhook); until then, tasks are found by polls 10 times slower",
            task.id,
            self.webhook_url,
        )

    async def _poll(self, watch: _Watch, schedule: PollSchedule | None) -> Result:
        return await watch_task(
            self._api,
            watch.task,
            schedule or self._schedule,
            accepted_at=watch.accepted_at,
            budget=self._poll_budget,
            retry_base_delay=self._retry_base,
        )

    def _prune(self) -> None:
        horizon = anyio.current_time() - _KEEP_FINISHED
        while self._finished and (self._finished[0].finished_at or 0.0) < horizon:
            old = self._finished.popleft()
            if self._watches.get(old.task.id) is old:
                del self._watches[old.task.id]

    async def _notify(
        self,
        task: Task,
        on_submitted: OnSubmitted | None,
        on_accepted: Callable[[Task], Awaitable[None]] | None = None,
    ) -> None:
        failure: Exception | None = None
        if on_accepted is not None:
            try:
                await on_accepted(task)
            except Exception as exc:  # raised once the user's callbacks have the handle
                failure = exc
        for callback in (self._on_submitted, on_submitted):
            if callback is None:
                continue
            try:
                returned = callback(task)
                if inspect.isawaitable(returned):
                    await returned
            except Exception as exc:  # the next callback (the one storing it?) still runs
                logger.exception(
                    "on_submitted failed for task %s; the task is still watched. Its handle: %s",
                    task.id,
                    task.model_dump_json(),
                )
                if on_accepted is None and failure is None:
                    failure = exc
        if failure is not None:
            raise failure

    # --- wait --------------------------------------------------------------------------

    async def wait(self, task: Task, *, timeout: float | _Unset | None = _UNSET) -> Result:
        """Wait until `task` is terminal and return its Result.

        Raises the task's `TaskError` (moderated, failed, not found), or `WaitTimeoutError`
        after `timeout` seconds (default: the client's `wait_timeout`; None waits for ever);
        the task keeps running, so `wait(e.task)` again later. A handle rebuilt from JSON
        takes its in-flight slot at once: BFL already counts it.

        ```python
        try:
            result = await client.wait(task, timeout=60)
        except WaitTimeoutError as e:
            result = await client.wait(e.task)  # still running: keep waiting
        ```
        """
        if timeout is not _UNSET:  # a deadline already passed waits no more: negative is fine
            _check_seconds(timeout, "timeout", "seconds, or None", negative=True)
        return await self._await(self._attach(task), timeout)

    async def _check_output_dir(self, model: str, directory: Path) -> None:
        """Refuse a directory no image could be saved in, once per directory and client: the
        check makes a file there, nearly a millisecond of CPU, and a burst of `generate`
        calls into one directory waits for the first one's."""
        if directory in self._output_dirs:
            return
        if self._output_dir_check is None:
            self._output_dir_check = anyio.Lock()
        async with self._output_dir_check:
            if directory not in self._output_dirs:
                await anyio.to_thread.run_sync(check_output_dir, model, directory)
                if len(self._output_dirs) >= _OUTPUT_DIRS_KEPT:  # a directory per request
                    self._output_dirs.clear()  # would grow the set for as long as the app runs
                self._output_dirs.add(directory)

    def _attach(self, task: Task) -> _Watch:
        """The watch of `task`; a handle new to this client claims its slot at once, and so
        does one whose last watch ended in an error of the polling, not of the task."""
        watch = self._watches.get(task.id)
        if watch is None or (watch.done.is_set() and not _of_the_task(watch.error)):
            tg = self._task_group()
            slot = self._limiter.claim(_pool_of(task.model))
            elapsed = time.time() - task.submitted_at if task.submitted_at else 0.0
            accepted_at = anyio.current_time() - max(0.0, elapsed)
            # Whether this task was submitted with our webhook is unknown: poll at the full
            # rate (a push that does arrive still ends the watch at once), and first at once:
            # it may have ended long ago, where a plan from its acceptance polls sparsely.
            watch = self._start_watch(tg, task, slot, accepted_at, False, resumed=True)
        return watch

    async def _await(self, watch: _Watch, timeout: float | _Unset | None) -> Result:
        limit = self._wait_timeout if timeout is _UNSET else timeout
        with anyio.move_on_after(math.inf if limit is None else limit):
            await watch.done.wait()
        if not watch.done.is_set():
            raise WaitTimeoutError(
                f"task {watch.task.id} was not finished after {limit} s; it is still "
                "running and watched: call wait(e.task) again to keep waiting",
                task=watch.task,
            )
        return watch.outcome()

    # --- webhooks ----------------------------------------------------------------------

    def handle_webhook(self, body: bytes, headers: Mapping[str, str]) -> WebhookEvent:
        """Verify a webhook delivery with the client's `webhook_secret`, then `deliver` it.

        Takes the raw request body and headers; raises `WebhookVerificationError` for a
        forged delivery (answer 401) and `WebhookPayloadError` for a malformed one (400).
        Cheap and non-blocking: answer BFL right after it returns. Call it on the event loop
        the client runs on (from an `async def` route, not from a worker thread). With a
        shared limiter (Redis), the event is also published to the other workers.
        """
        if self._webhook_secret is None:
            raise RuntimeError(
                "this AsyncBFL has no webhook secret to verify deliveries with: create it "
                "with AsyncBFL(webhook_url=..., webhook_secret=...)"
            )
        event = verify_webhook(body, headers, self._webhook_secret)
        self.deliver(event)
        # The load balancer may have picked a worker other than the one watching the task.
        try:
            self._limiter.publish(event)
        except Exception:  # handled here all the same: no 500, or BFL would deliver again
            logger.exception("passing the webhook event of task %s on failed", event.task_id)
        return event

    def deliver(self, event: WebhookEvent) -> bool:
        """Hand a verified webhook event over: its task's watch ends at once.

        The slot is released and `wait`/`generate` get the result without another poll.
        Returns True when the event was news; duplicates (deliveries are at-least-once)
        and non-terminal events return False and change nothing. An event for a task the
        client does not know yet is kept for two minutes: it may overtake the submit's
        answer. Like `handle_webhook`, call it on the client's event loop.
        """
        # With a shared limiter, the other workers get the event too: one may claim it.
        return self._deliver(event, relayed=not isinstance(self._limiter, Limiter))

    def _deliver_relayed(self, event: WebhookEvent) -> bool:
        """An event another worker received: the one that submitted its task claims it."""
        return self._deliver(event, relayed=True)

    def _deliver(self, event: WebhookEvent, *, relayed: bool) -> bool:
        self._pushes_heard = True
        if not event.terminal:
            return False
        watch = self._watches.get(event.task_id)
        if watch is None:
            return self._early.add(event, relayed=relayed)
        if watch.done.is_set() and watch.result is None and has_sample(poll_answer(event)):
            # Polling gave up on it (a 404 from a regional host, a Ready without a URL...),
            # but BFL says, signed, where its image is: a later `wait` gets it.
            logger.info("task %s: a push brings the result its polls did not", watch.task.id)
            watch.event = event
            watch.error = None
            watch.result = _terminal(watch.task, poll_answer(event), 0)
            return True
        if watch.done.is_set():
            return False
        if watch.event is not None and (
            has_sample(poll_answer(watch.event)) or not has_sample(poll_answer(event))
        ):
            return False  # a copy, or no better than the push that ended the watch
        self._resolve(watch, event)
        return True

    @staticmethod
    def _resolve(watch: _Watch, event: WebhookEvent) -> None:
        logger.debug("task %s ended by webhook: %s", watch.task.id, event.status)
        watch.event = event
        watch.polling.cancel()

    # --- download ----------------------------------------------------------------------

    @overload
    async def download(
        self,
        result: Result,
        dest: str | os.PathLike[str],
        *,
        name: str | None = None,
        overwrite: bool = False,
    ) -> Path: ...

    @overload
    async def download(self, result: Result, dest: BinaryIO) -> int: ...

    async def download(
        self,
        result: Result,
        dest: str | os.PathLike[str] | BinaryIO,
        *,
        name: str | None = None,
        overwrite: bool = False,
    ) -> Path | int:
        """Stream the image to `dest`, a directory or a binary file object.

        Into a directory it lands as `<name or task id>.<png|jpg|webp>` (suffix from the
        image's magic bytes), atomically; an existing file raises `OutputExistsError`
        unless `overwrite`. Into a file object, returns the number of bytes written.

        ```python
        path = await client.download(result, "out/", name="fox")  # out/fox.jpg
        ```
        """
        if isinstance(dest, str | os.PathLike):
            stem = name or result.task.id
            _check_name(result.task.model, stem)
            return await self._downloader.to_directory(
                result, Path(dest), stem, overwrite=overwrite
            )
        return await self._downloader.to_file(result, dest)

    async def stream(self, result: Result) -> AsyncGenerator[bytes, None]:
        """Yield the image's bytes as they arrive, to send them elsewhere (storage, HTTP)."""
        async with contextlib.aclosing(self._downloader.stream(result)) as chunks:
            async for chunk in chunks:
                yield chunk

    # --- all together ------------------------------------------------------------------

    async def generate(
        self,
        model: str,
        *,
        output_dir: str | os.PathLike[str] = ".",
        name: str | None = None,
        overwrite: bool = False,
        timeout: float | _Unset | None = _UNSET,
        on_submitted: OnSubmitted | None = None,
        **params: Any,
    ) -> GeneratedImage:
        """Submit, wait and download one image; return where it is and how it was made.

        Everything that can be checked is checked before paying: the parameters, the name,
        and (with `name`) that the output file does not exist yet. `timeout` bounds the wait
        for the accepted task (default: the client's `wait_timeout`), not the time queued
        for a slot before it is sent; to bound the whole call, cancel it (`anyio.fail_after`):
        a call cancelled before its submit went out has paid nothing.

        ```python
        image = await client.generate("flux-2-pro", prompt="a red fox", output_dir="out/")
        print(image.path, image.seed, image.cost, image.timings.total)
        ```
        """
        started = anyio.current_time()
        spec, body = build_request(model, params)
        if timeout is not _UNSET:
            try:  # before paying: a task would be paid, then given up at once
                _check_seconds(timeout, "timeout", "seconds > 0, or None", positive=True)
            except (TypeError, ValueError):
                problem = Problem("timeout", f"{timeout!r} is no wait", "seconds > 0, or None")
                raise ParameterError(spec.name, [problem]) from None
        return await self._generate(
            spec, body, params, Path(output_dir), name, overwrite, timeout, on_submitted, started
        )

    async def _generate(
        self,
        spec: ModelSpec,
        body: Mapping[str, Any],
        params: Mapping[str, Any],
        directory: Path,
        name: str | None,
        overwrite: bool,
        timeout: float | _Unset | None,
        on_submitted: OnSubmitted | None,
        started: float,
    ) -> GeneratedImage:
        """`generate` once the request is built: check the output, submit, wait, download."""
        if name is not None:
            _check_name(spec.name, name)
            if not overwrite and (existing := saved_as(directory, name)):
                raise OutputExistsError(str(existing[0]))
        await self._check_output_dir(spec.name, directory)
        watch, queued, submit = await self._submit(spec.name, spec.pool, body, params, on_submitted)
        saved = anyio.Event()  # for `aclose`: the grace is for the image, not just the task
        self._saving.add(saved)
        try:
            result = await self._await(watch, timeout)
            seen = anyio.current_time()
            try:
                path = await self.download(result, directory, name=name, overwrite=overwrite)
            except (OutputExistsError, TaskError):  # kept as `e.kept`, or with the result
                raise
            except Exception as exc:  # a full disk; the client closed under it (RuntimeError)
                # The paid image is still at its URL: the caller needs the result to fetch it.
                raise DownloadError(
                    f"the image of task {result.task.id} could not be saved in {directory} "
                    f"({exc}); download e.result again, elsewhere, while its URL is valid",
                    task=result.task,
                    result=result,
                ) from exc
        except anyio.get_cancelled_exc_class():
            _log_left(watch.task, "generate was cancelled before its image was saved")
            raise
        finally:
            self._saving.discard(saved)
            saved.set()
        done = anyio.current_time()
        return GeneratedImage(
            path=path,
            task=result.task,
            seed=result.seed,
            result=result,
            timings=Timings(
                queued=queued,
                submit=submit,
                generation=seen - watch.accepted_at,
                download=done - seen,
                total=done - started,
            ),
        )

    async def generate_many(
        self,
        requests: Iterable[Mapping[str, Any]],
        *,
        output_dir: str | os.PathLike[str] = ".",
        overwrite: bool = False,
        timeout: float | _Unset | None = _UNSET,
    ) -> AsyncGenerator[Outcome, None]:
        """Generate every request (`{"model": ..., "prompt": ..., "name"?: ...}`).

        Yields one `Outcome` per request as it completes: the image, or that job's error.
        One job's failure never stops the others. Invalid requests and duplicate names are
        reported before anything is submitted.

        ```python
        jobs = [{"model": "flux-2-pro", "prompt": p} for p in prompts]
        async for outcome in client.generate_many(jobs, output_dir="out/"):
            print(outcome.index, outcome.image.path if outcome.ok else outcome.error)
        ```
        """
        if timeout is not _UNSET:  # before anything is paid, as each job's would be
            _check_seconds(timeout, "timeout", "seconds > 0, or None", positive=True)
        tg = self._task_group()
        jobs = list(requests)
        send, receive = anyio.create_memory_object_stream[Outcome](max_buffer_size=math.inf)
        runnable: list[tuple[int, ModelSpec, dict[str, Any], dict[str, Any], str | None]] = []
        names: dict[str, str] = {}
        for index, job in enumerate(jobs):
            params = dict(job)
            model = params.pop("model", None)
            name = params.pop("name", None)
            try:
                spec, body = build_job(model, name, params, names)
            except BFLError as exc:
                send.send_nowait(Outcome(index=index, request=job, error=exc))
                continue
            runnable.append((index, spec, body, params, name))
        directory = Path(output_dir)

        async def run_one(
            index: int,
            spec: ModelSpec,
            body: dict[str, Any],
            params: dict[str, Any],
            name: str | None,
        ) -> None:
            paid: list[Task] = []
            try:
                image = await self._generate(
                    spec,
                    body,
                    params,
                    directory,
                    name,
                    overwrite,
                    timeout,
                    paid.append,
                    anyio.current_time(),
                )
                outcome = Outcome(index=index, request=jobs[index], image=image)
            except Exception as exc:
                outcome = Outcome(index=index, request=jobs[index], error=exc)
            except anyio.get_cancelled_exc_class():
                if scope.cancel_called:  # its caller stopped: nobody to tell
                    raise
                # The client closed under it: one outcome per job all the same.
                outcome = Outcome(
                    index=index, request=jobs[index], error=_cut_short(paid[0] if paid else None)
                )
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    send.send_nowait(outcome)
                raise
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(outcome)

        scope = anyio.CancelScope()
        finished = anyio.Event()

        async def run_all() -> None:
            try:
                with scope:
                    async with send, anyio.create_task_group() as jobs_tg:
                        for job in runnable:
                            jobs_tg.start_soon(run_one, *job)
            finally:
                finished.set()

        tg.start_soon(run_all)
        try:
            async with receive:
                async for outcome in receive:
                    yield outcome
        finally:
            # Stopped early: drop the queued jobs now (accepted tasks stay watched).
            scope.cancel()
            with anyio.CancelScope(shield=True):
                await finished.wait()

    def batch(
        self,
        jobs: Iterable[Mapping[str, Any]],
        output_dir: str | os.PathLike[str],
        *,
        max_cost: float | None = None,
        resubmit_uncertain: bool = False,
        overwrite: bool = False,
        timeout: float | None = None,
        journal: str | os.PathLike[str] | None = None,
    ) -> Batch:
        """A resumable batch of jobs (`{"model": ..., "prompt": ..., "name"?: ...}`).

        Every job is journaled in `output_dir/bfl-batch.sqlite` before each step, so running
        the same batch again resumes it without paying twice. `max_cost` (credits) stops
        submits that would take the batch past it; jobs whose earlier submit may or may not
        have reached BFL stay `uncertain` unless `resubmit_uncertain`. Use it as
        `async with client.batch(jobs, "out/") as batch: async for record in batch: ...`.
        """
        return Batch(
            self,
            jobs,
            output_dir,
            max_cost=max_cost,
            resubmit_uncertain=resubmit_uncertain,
            overwrite=overwrite,
            timeout=timeout,
            journal=journal,
        )

    # --- account -----------------------------------------------------------------------

    async def credits(self) -> float:
        """The account's remaining credits (1 credit = 1 US cent)."""
        body = await self._api.call("GET", "/v1/credits", "reading credits")
        value = float_or_none(body.get("credits")) if isinstance(body, dict) else None
        if value is None:
            raise BFLError(f"unexpected answer to GET /v1/credits: {body!r:.200}")
        return value
