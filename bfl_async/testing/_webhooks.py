"""The fake's webhook deliveries: a task submitted with `webhook_url` is POSTed there when it
ends, signed under the chosen scheme, retried while the receiver fails."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio
import anyio.abc
import httpx

from ..webhooks import WebhookScheme, sign_webhook

if TYPE_CHECKING:
    from ._fake import FakeTask, HostURLs

__all__ = ["WebhookSender"]


class WebhookSender:
    """Sends each registered task's end to its `webhook_url`, while started."""

    def __init__(
        self,
        state: Callable[[FakeTask, HostURLs], dict[str, Any]],
        *,
        scheme: WebhookScheme,
        retries: int,
        retry_delay: float,
        copies: int,
        transport: httpx.AsyncBaseTransport | None,
    ) -> None:
        if scheme not in ("signature", "secret"):
            raise ValueError(f"unknown webhook scheme {scheme!r}; allowed: signature, secret")
        if retries < 0 or retry_delay < 0 or copies < 1:
            raise ValueError("webhook retries and retry delay must be >= 0, copies >= 1")
        self._state = state
        self.scheme: WebhookScheme = scheme
        self.retries = retries
        self.retry_delay = retry_delay
        self.copies = copies
        self._transport = transport
        self._pending: list[tuple[FakeTask, HostURLs]] = []
        self._wake: anyio.Event | None = None
        self._http: httpx.AsyncClient | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self.attempts = 0
        self.delivered = 0
        self.failed = 0
        self.sent: list[tuple[str, float]] = []
        """(task id, `time.time()`) of every POST that was answered 2xx."""

    def add(self, task: FakeTask, urls: HostURLs) -> None:
        """Deliver `task`'s end once it ends (re-read each time: `finish_now` counts)."""
        self._pending.append((task, urls))
        self.wake()

    def wake(self) -> None:
        """Look at the pending tasks' end times again now."""
        if self._wake is not None:
            self._wake.set()

    def start(self, task_group: anyio.abc.TaskGroup) -> None:
        """Send deliveries from `task_group` until it is cancelled."""
        # BFL calls receivers from its own servers, never through this machine's proxy.
        self._http = httpx.AsyncClient(transport=self._transport, timeout=5.0, trust_env=False)
        self._tg = task_group
        task_group.start_soon(self._run, name="fake-bfl-webhooks")

    async def aclose(self) -> None:
        """Close the HTTP client (after the task group has stopped)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def _run(self) -> None:
        assert self._tg is not None
        while True:
            wake = self._wake = anyio.Event()
            now = time.monotonic()
            due = [entry for entry in self._pending if not entry[0].in_flight(now)]
            self._pending = [entry for entry in self._pending if entry[0].in_flight(now)]
            for task, urls in due:
                self._tg.start_soon(self._deliver, task, urls)
            next_end = min((task.ends_at for task, _ in self._pending), default=None)
            timeout = None if next_end is None else max(0.0, next_end - time.monotonic())
            with anyio.move_on_after(timeout):
                await wake.wait()

    async def _deliver(self, task: FakeTask, urls: HostURLs) -> None:
        state = self._state(task, urls)
        status = "SUCCESS" if state["status"] == "Ready" else state["status"]
        payload = {
            "task_id": task.id,
            "status": status,
            "result": state.get("result"),
            "details": state.get("details"),
        }
        body = json.dumps(payload).encode()
        headers = {"content-type": "application/json"}
        secret = task.body.get("webhook_secret")
        if isinstance(secret, str) and secret:
            headers.update(sign_webhook(body, secret, scheme=self.scheme))
        url = str(task.body["webhook_url"])
        for copy in range(self.copies):
            if not await self._post(task.id, url, body, headers) and copy == 0:
                self.failed += 1
                return

    async def _post(self, task_id: str, url: str, body: bytes, headers: dict[str, str]) -> bool:
        assert self._http is not None
        for attempt in range(self.retries + 1):
            if attempt:
                await anyio.sleep(self.retry_delay * 2 ** (attempt - 1))
            self.attempts += 1
            try:
                response = await self._http.post(url, content=body, headers=headers)
            except httpx.HTTPError:
                continue
            if response.is_success:
                self.delivered += 1
                self.sent.append((task_id, time.time()))
                return True
        return False
