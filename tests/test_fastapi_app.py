"""bfl_async.fastapi and examples/fastapi_app: the app under uvicorn on loopback, against
FakeBFL on loopback, driven by many httpx clients (asyncio only: uvicorn runs on asyncio)."""

from __future__ import annotations

import importlib
import json
import socket
import statistics
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.requests import Request

from bfl_async import AsyncBFL, Backoff, sign_webhook
from bfl_async.fastapi import (
    MAX_WEBHOOK_BYTES,
    BFLClient,
    bfl_lifespan,
    get_client,
    webhook_router,
)
from bfl_async.testing import FakeBFL
from examples.fastapi_app.app import create_app

pytestmark = pytest.mark.anyio
SECRET = "whsec-example-0123456789"
LIMIT = 3


@asynccontextmanager
async def serve(make_app: Callable[[str], FastAPI]) -> AsyncIterator[str]:
    """Run `make_app(base_url)` under uvicorn on a free loopback port; yield its base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    config = uvicorn.Config(make_app(base_url), log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve, [sock])
        with anyio.fail_after(10):
            while not server.started:
                await anyio.sleep(0.01)
        try:
            yield base_url
        finally:
            server.should_exit = True
    sock.close()


def make_service(fake: FakeBFL, images: Path) -> Callable[[str], FastAPI]:
    def make(base_url: str) -> FastAPI:
        return create_app(
            images_dir=images,
            public_url=base_url,
            webhook_secret=SECRET,
            api_key=fake.api_key,
            base_url=fake.base_url,
            limits={"standard": LIMIT},
            # Slowed 10 times under webhooks: no poll before 10 s, so webhooks do the work.
            poll_schedule=Backoff(initial=1.0, factor=1.0, maximum=1.0, jitter=0.0),
            poll_rate=None,
            close_grace=5.0,
        )

    return make


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_many_clients_share_one_limit_and_webhooks_resolve_their_waits(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(
        limits={"standard": LIMIT},
        generation_time=0.3,  # long beside a submit, so the limit is surely reached
        outcome=lambda model, body: "Content Moderated" if body["prompt"] == "no" else "Ready",
    )
    async with fake, serve(make_service(fake, tmp_path / "images")) as url:
        singles: list[httpx.Response] = []

        async def one(index: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                singles.append(await http.post("/images", json={"prompt": f"fox {index}"}))

        async def batch() -> httpx.Response:
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                prompts = [f"lighthouse {i}" for i in range(6)] + ["no"]
                return await http.post("/images/batch", json={"prompts": prompts})

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for index in range(12):
                    tg.start_soon(one, index)
                batched = await batch()
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            assert [r.status_code for r in singles] == [200] * 12
            assert batched.status_code == 200
            answers = [r.json() for r in singles] + batched.json()[:6]
            assert batched.json()[6]["status"] == "failed"
            assert "moderated" in batched.json()[6]["error"]
            moderated = batched.json()[6]["task_id"]
            assert (await http.get(f"/tasks/{moderated}")).json() == batched.json()[6]
            for answer in answers:
                assert answer["status"] == "ready"
                image = await http.get(answer["url"])
                assert image.status_code == 200
                assert (
                    image.content == (tmp_path / "images" / Path(answer["url"]).name).read_bytes()
                )
                status = await http.get(f"/tasks/{answer['task_id']}")
                assert status.json() == answer
            assert (await http.get("/tasks/nope")).status_code == 404
    assert fake.submits == 19
    assert fake.peak_in_flight["standard"] == LIMIT  # reached, never exceeded
    assert fake.rate_limited == 0
    assert fake.polls == 0  # every wait was resolved by its webhook
    assert fake.webhooks.delivered == 19 and fake.webhooks.failed == 0


async def test_forged_webhooks_get_401_and_change_nothing(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=3600.0, webhook_copies=2)
    service = make_service(fake, tmp_path / "images")
    async with fake, serve(service) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        answer: list[httpx.Response] = []

        async def request() -> None:
            answer.append(await http.post("/images", json={"prompt": "a fox"}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(request)
            with anyio.fail_after(10):
                while not fake.tasks:
                    await anyio.sleep(0.005)
            (task,) = fake.tasks.values()
            sample = fake.sign_url(task.id)
            body = json.dumps(
                {"task_id": task.id, "status": "SUCCESS", "result": {"sample": sample}}
            ).encode()
            forgeries = [
                {},
                sign_webhook(body, "not-the-secret"),
                sign_webhook(body, "not-the-secret", scheme="secret"),
                {"X-BFL-Signature": "sha256=" + "0" * 64},
            ]
            for headers in forgeries:
                forged = await http.post("/bfl/webhook", content=body, headers=headers)
                assert forged.status_code == 401
                assert SECRET not in forged.text
            malformed = await http.post(
                "/bfl/webhook", content=b"[]", headers=sign_webhook(b"[]", SECRET)
            )
            assert malformed.status_code == 400
            await anyio.sleep(0.1)
            assert answer == []
            status = await http.get(f"/tasks/{task.id}")
            assert status.json() == {"task_id": task.id, "status": "pending"}
            assert fake.polls == 0 and fake.downloads == 0
            fake.finish_now()
        (done,) = answer
        assert done.status_code == 200 and done.json()["task_id"] == task.id
        # Duplicates (the fake sent two copies) and replays are answered fast and ignored.
        latencies = []
        for _ in range(20):
            started = time.perf_counter()
            again = await http.post(
                "/bfl/webhook", content=body, headers=sign_webhook(body, SECRET)
            )
            latencies.append(time.perf_counter() - started)
            assert again.status_code == 204
        assert statistics.median(latencies) < 0.05
    assert fake.webhooks.delivered == 2 and fake.submits == 1 and fake.downloads == 1


async def test_lifespan_dependency_and_router_without_the_example(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.0)
    seen: list[AsyncBFL] = []

    def make(base_url: str) -> FastAPI:
        app = FastAPI(
            lifespan=bfl_lifespan(
                api_key=fake.api_key,
                base_url=fake.base_url,
                webhook_url=f"{base_url}/hooks/bfl",
                webhook_secret=SECRET,
                poll_schedule=Backoff(initial=1.0, factor=1.0, maximum=1.0, jitter=0.0),
            )
        )
        app.include_router(webhook_router("/hooks/bfl"))

        @app.post("/one")
        async def one(client: BFLClient) -> dict[str, Any]:
            seen.append(client)
            result = await client.wait(await client.submit("flux-2-pro", prompt="a fox"))
            return {"seed": result.seed, "polls": result.polls}

        return app

    async with fake, serve(make) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        with anyio.fail_after(10):
            first = await http.post("/one")
            second = await http.post("/one")
        assert first.status_code == second.status_code == 200
        assert first.json()["polls"] == 0
        huge = b"{" + b" " * MAX_WEBHOOK_BYTES + b"}"
        too_large = await http.post("/hooks/bfl", content=huge, headers=sign_webhook(huge, SECRET))
        assert too_large.status_code == 413
        # Signed, but nested past what the JSON parser takes: malformed, not a server error.
        deep = b'{"task_id": "t", "status": "SUCCESS", "x": ' + b"[" * 100_000 + b"]" * 100_000
        deep += b"}"
        answer = await http.post("/hooks/bfl", content=deep, headers=sign_webhook(deep, SECRET))
        assert answer.status_code == 400 and "nested too deeply" in answer.json()["detail"]
    assert len(seen) == 2 and seen[0] is seen[1]
    assert fake.polls == 0 and fake.webhooks.delivered == 2


async def test_the_webhook_route_answers_404_when_the_client_has_no_webhook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    handled: list[bytes] = []
    monkeypatch.setattr(
        AsyncBFL, "handle_webhook", lambda self, body, headers: handled.append(body)
    )

    def make(base_url: str) -> FastAPI:
        app = FastAPI(lifespan=bfl_lifespan(api_key="bfl-key-never-used"))
        app.include_router(webhook_router())
        return app

    body = b'{"task_id": "x", "status": "SUCCESS"}'
    async with serve(make) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        for headers in ({"X-BFL-Signature": "sha256=00"}, sign_webhook(body, SECRET)):
            answer = await http.post("/bfl/webhook", content=body, headers=headers)
            assert answer.status_code == 404
            assert answer.json() == {"detail": "webhooks are not enabled on this client"}
    assert handled == []  # the client was never asked


async def test_the_example_polling_without_webhooks_has_no_webhook_route(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.0)

    def make(base_url: str) -> FastAPI:
        return create_app(
            images_dir=tmp_path / "images",
            api_key=fake.api_key,
            base_url=fake.base_url,
            poll_schedule=Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0),
            poll_rate=None,
        )

    body = b'{"task_id": "x", "status": "SUCCESS"}'
    async with fake, serve(make) as url, httpx.AsyncClient(base_url=url, timeout=10) as http:
        forged = await http.post("/bfl/webhook", content=body, headers=sign_webhook(body, "x"))
        assert forged.status_code == 404
        assert forged.json() == {"detail": "Not Found"}  # no such route
        with anyio.fail_after(10):
            image = await http.post("/images", json={"prompt": "a fox"})
        assert image.status_code == 200 and image.json()["status"] == "ready"
    assert fake.submits == 1 and fake.polls >= 1 and fake.webhooks.attempts == 0


async def test_the_webhook_route_answers_while_the_thread_pool_is_busy() -> None:
    # Sync routes, StaticFiles and sync dependencies share one small thread pool: a webhook
    # (or any route taking the client) must not queue behind them for a thread.
    release, entered = threading.Event(), threading.Event()

    def make(base_url: str) -> FastAPI:
        app = FastAPI(
            lifespan=bfl_lifespan(
                api_key="bfl-key-never-used",
                webhook_url=f"{base_url}/bfl/webhook",
                webhook_secret=SECRET,
            )
        )
        app.include_router(webhook_router())

        @app.get("/block")
        def block() -> None:  # holds the pool's only thread
            entered.set()
            release.wait(10)

        @app.get("/client")
        async def has_client(client: BFLClient) -> dict[str, str | None]:
            return {"webhook_url": client.webhook_url}

        return app

    body = b'{"task_id": "not-mine", "status": "Pending"}'
    limiter = anyio.to_thread.current_default_thread_limiter()
    tokens = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        async with (
            serve(make) as url,
            httpx.AsyncClient(base_url=url, timeout=10) as http,
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(http.get, "/block")
            try:
                with anyio.fail_after(5):
                    while not entered.is_set():
                        await anyio.sleep(0.01)
                with anyio.fail_after(2):
                    hook = await http.post(
                        "/bfl/webhook", content=body, headers=sign_webhook(body, SECRET)
                    )
                    route = await http.get("/client")
            finally:
                release.set()
        assert hook.status_code == 204
        assert route.json() == {"webhook_url": f"{url}/bfl/webhook"}
    finally:
        release.set()
        limiter.total_tokens = tokens


def test_get_client_explains_a_missing_lifespan() -> None:
    request = Request({"type": "http", "state": {}})
    with pytest.raises(RuntimeError, match="bfl_lifespan"):
        get_client(request)


def test_a_missing_fastapi_is_a_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fastapi", None)
    monkeypatch.delitem(sys.modules, "bfl_async.fastapi")
    with pytest.raises(ImportError, match=r"pip install 'bfl-async\[fastapi\]'"):
        importlib.import_module("bfl_async.fastapi")
