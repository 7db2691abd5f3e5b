"""FakeBFL, driven with plain httpx over real HTTP and in memory, under asyncio and trio."""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import anyio
import httpx
import pytest

from bfl_async import AsyncBFL, Backoff, Limiter
from bfl_async._download import url_expiry
from bfl_async.testing import (
    FAKE_TIME_SCALE_ENV,
    MEMORY_URLS,
    FakeBFL,
    FakeTask,
    Fault,
    FaultKind,
    HostURLs,
    fake_client,
)

pytestmark = pytest.mark.anyio

KEY = {"x-key": "fake-key"}
POLL_KEYS = {"id", "status", "result", "progress", "details", "preview"}


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run every async test under both event loops."""
    return str(request.param)


@asynccontextmanager
async def running(**kwargs: Any) -> AsyncIterator[tuple[FakeBFL, httpx.AsyncClient]]:
    """A started fake and a client to talk to it."""
    async with FakeBFL(**kwargs) as fake, httpx.AsyncClient(timeout=10) as client:
        yield fake, client


@asynccontextmanager
async def fronted(
    front: str, **kwargs: Any
) -> AsyncIterator[tuple[FakeBFL, httpx.AsyncClient, HostURLs]]:
    """A fake reached through `front` ("loopback" or "memory"), a client, and its URLs."""
    fake = FakeBFL(**kwargs)
    if front == "memory":
        async with fake.client(timeout=10) as client:
            yield fake, client, fake.memory_urls
    else:
        async with fake, httpx.AsyncClient(timeout=10) as client:
            yield fake, client, fake.loopback_urls


async def submit(
    client: httpx.AsyncClient, fake: FakeBFL, model: str = "flux-2-pro", **body: Any
) -> httpx.Response:
    return await submit_to(client, fake.base_url, model, **body)


async def submit_to(
    client: httpx.AsyncClient, api_url: str, model: str = "flux-2-pro", **body: Any
) -> httpx.Response:
    body.setdefault("prompt", "a red fox")
    return await client.post(f"{api_url}/v1/{model}", json=body, headers=KEY)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (bounded) until `condition()` holds."""
    with anyio.fail_after(timeout):
        while True:
            if condition():
                return
            await anyio.sleep(0.005)


async def poll_until_done(client: httpx.AsyncClient, polling_url: str) -> httpx.Response:
    """Poll until a terminal status (bounded)."""
    with anyio.fail_after(5):
        while True:
            answer = await client.get(polling_url, headers=KEY)
            if answer.json()["status"] != "Pending":
                return answer
            await anyio.sleep(0.005)


async def ready_sample(
    client: httpx.AsyncClient, fake: FakeBFL, api_url: str | None = None, **body: Any
) -> str:
    """Submit (to `api_url`, by default the loopback API host), finish the task and return
    its signed URL."""
    accepted = await submit_to(client, api_url or fake.base_url, **body)
    fake.finish_now(accepted.json()["id"])
    answer = await poll_until_done(client, accepted.json()["polling_url"])
    return str(answer.json()["result"]["sample"])


# -- image checks ------------------------------------------------------------------------


def decode_png(data: bytes) -> tuple[int, int, bytes]:
    """Check every chunk's CRC and the zlib stream; return (width, height, raw scanlines)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    position, idat, kinds = 8, b"", []
    width = height = 0
    while position < len(data):
        (length,) = struct.unpack(">I", data[position : position + 4])
        kind = data[position + 4 : position + 8]
        payload = data[position + 8 : position + 8 + length]
        (crc,) = struct.unpack(">I", data[position + 8 + length : position + 12 + length])
        assert zlib.crc32(payload, zlib.crc32(kind)) == crc, kind
        kinds.append(kind)
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", payload[:10])
            assert (depth, colour) == (8, 2)
        elif kind == b"IDAT":
            idat += payload
        position += 12 + length
    assert kinds[0] == b"IHDR" and kinds[-1] == b"IEND"
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)
    assert all(raw[row * (1 + 3 * width)] in (0, 2) for row in range(height))  # filter bytes
    return width, height, raw


def jpeg_size(data: bytes) -> tuple[int, int]:
    """Walk the JPEG's segments up to the scan; return (width, height) from SOF0."""
    assert data[:2] == b"\xff\xd8" and data[-2:] == b"\xff\xd9"
    position, size = 2, (0, 0)
    while True:
        marker, length = struct.unpack(">HH", data[position : position + 4])
        assert marker >> 8 == 0xFF
        if marker == 0xFFC0:
            height, width = struct.unpack(">HH", data[position + 5 : position + 9])
            size = (width, height)
        if marker == 0xFFDA:
            return size
        position += 2 + length


def webp_size(data: bytes) -> tuple[int, int]:
    """Walk the RIFF chunks; return (width, height) from the VP8L header."""
    assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
    assert struct.unpack("<I", data[4:8])[0] == len(data) - 8
    position, size = 12, (0, 0)
    while position < len(data):
        kind = data[position : position + 4]
        (length,) = struct.unpack("<I", data[position + 4 : position + 8])
        if kind == b"VP8L":
            assert data[position + 8] == 0x2F
            (bits,) = struct.unpack("<I", data[position + 9 : position + 13])
            size = ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
        position += 8 + length + length % 2
    assert position == len(data)
    return size


# -- round trip --------------------------------------------------------------------------


async def test_submit_poll_download_round_trip(anyio_backend: str) -> None:
    async with running(generation_time=0.05) as (fake, client):
        accepted = await submit(client, fake, output_format="png", width=1024, height=2048)
        assert accepted.status_code == 200
        task = accepted.json()
        assert set(task) == {"id", "polling_url", "cost", "input_mp", "output_mp"}
        assert task["polling_url"] == f"{fake.polling_base_url}/v1/get_result?id={task['id']}"
        assert (task["cost"], task["input_mp"], task["output_mp"]) == (4.5, 0.0, 2.0)
        assert fake.submits == fake.submit_attempts == 1
        assert fake.credits == 1000 - 4.5

        pending = await client.get(task["polling_url"], headers=KEY)
        assert pending.json() == {
            "id": task["id"],
            "status": "Pending",
            "result": None,
            "progress": None,
            "details": None,
            "preview": None,
        }
        ready = await poll_until_done(client, task["polling_url"])
        assert ready.status_code == 200
        assert ready.headers["retry-after"] == "1"
        assert ready.headers["x-ratelimit-limit"] == "1200"
        body = ready.json()
        assert set(body) == POLL_KEYS and body["status"] == "Ready"
        result = body["result"]
        assert set(result) == {"start_time", "prompt", "seed", "sample"}
        assert result["prompt"] == "a red fox" and isinstance(result["seed"], int)
        assert abs(result["start_time"] - time.time()) < 60
        assert result["sample"].startswith(f"{fake.delivery_base_url}/results/{task['id']}/")
        assert fake.tasks[task["id"]].polls >= 2

        image = await client.get(result["sample"])
        assert image.status_code == 200
        assert image.headers["content-type"] == "image/png"
        assert int(image.headers["content-length"]) == len(image.content)
        assert decode_png(image.content)[:2] == (64, 64)
        again = await client.get(result["sample"])
        assert again.content == image.content  # deterministic per task

        assert fake.keys_seen["api"] == ["fake-key"]
        assert set(fake.keys_seen["polling"]) == {"fake-key"}
        assert fake.keys_seen["delivery"] == [None, None]
        assert fake.polls == len(fake.keys_seen["polling"]) and fake.downloads == 2
        assert (await client.get(f"{fake.base_url}/v1/credits", headers=KEY)).json() == {
            "credits": 995.5
        }


async def test_api_host_does_not_answer_polls(anyio_backend: str) -> None:
    async with running() as (fake, client):
        task = (await submit(client, fake)).json()
        answer = await client.get(f"{fake.base_url}/v1/get_result?id={task['id']}", headers=KEY)
        assert (answer.status_code, answer.json()) == (404, {"detail": "Not Found"})
        assert fake.polls == 0


async def test_flux1_progress_and_timings(anyio_backend: str) -> None:
    async with running(generation_time=60) as (fake, client):
        accepted = await submit(client, fake, "flux-pro-1.1")
        task = accepted.json()
        assert (task["cost"], task["input_mp"], task["output_mp"]) == (None, None, None)
        assert fake.credits == 996
        pending = (await client.get(task["polling_url"], headers=KEY)).json()
        assert pending["status"] == "Pending"
        assert isinstance(pending["progress"], float) and 0 <= pending["progress"] < 1
        fake.finish_now()
        result = (await poll_until_done(client, task["polling_url"])).json()["result"]
        assert set(result) == {"start_time", "prompt", "seed", "sample", "end_time", "duration"}
        assert result["end_time"] == pytest.approx(result["start_time"] + result["duration"])
        assert result["sample"].endswith(".jpeg?" + result["sample"].split("?")[1])


async def test_generation_time_callable_and_time_scale(anyio_backend: str) -> None:
    seen: list[str] = []

    def seconds(model: str, rng: random.Random) -> float:
        seen.append(model)
        return 100.0 + rng.random()

    async with running(generation_time=seconds, time_scale=0.001) as (fake, client):
        task_id = (await submit(client, fake, "flux-2-max")).json()["id"]
        assert seen == ["flux-2-max"]
        assert 0.1 <= fake.tasks[task_id].duration <= 0.102
        await until(lambda: fake.in_flight() == 0)


# -- limits ------------------------------------------------------------------------------


async def test_429_at_the_limit_creates_nothing(anyio_backend: str) -> None:
    async with running(limits={"standard": 3}, generation_time=60) as (fake, client):
        for _ in range(3):
            assert (await submit(client, fake)).status_code == 200
        refused = await submit(client, fake)
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["detail"].startswith("Too many active tasks")
        assert (fake.submits, fake.submit_attempts, fake.rate_limited) == (3, 4, 1)
        assert len(fake.tasks) == 3 and fake.in_flight() == 3
        assert fake.peak_in_flight["standard"] == 3
        assert fake.credits == 1000 - 3 * 3

        fake.finish_now(next(iter(fake.tasks)))
        assert fake.in_flight() == 2
        assert (await submit(client, fake)).status_code == 200
        assert fake.peak_in_flight["standard"] == 3


async def test_tasks_leave_their_pool_when_generation_ends(anyio_backend: str) -> None:
    async with running(limits={"standard": 2}, generation_time=0.05) as (fake, client):
        for _ in range(2):
            assert (await submit(client, fake)).status_code == 200
        await until(lambda: fake.in_flight() == 0)  # nobody polled: the slots free anyway
        assert (await submit(client, fake)).status_code == 200


async def test_kontext_max_pool_counts_in_both_pools(anyio_backend: str) -> None:
    async with running(generation_time=60) as (fake, client):
        for _ in range(6):
            assert (await submit(client, fake, "flux-kontext-max")).status_code == 200
        assert (await submit(client, fake, "flux-kontext-max")).status_code == 429
        assert fake.in_flight("kontext-max") == 6 and fake.in_flight("standard") == 6
        assert fake.tasks[next(iter(fake.tasks))].pools == ("kontext-max", "standard")
        for _ in range(18):
            assert (await submit(client, fake, "flux-kontext-pro")).status_code == 200
        assert (await submit(client, fake, "flux-2-pro")).status_code == 429
        assert fake.peak_in_flight == {"standard": 24, "kontext-max": 6}
        assert fake.rate_limited == 2 and fake.submits == 24


async def test_kontext_max_pool_alone(anyio_backend: str) -> None:
    async with running(generation_time=60, kontext_counts_in_standard=False) as (fake, client):
        for _ in range(6):
            assert (await submit(client, fake, "flux-kontext-max")).status_code == 200
        for _ in range(24):
            assert (await submit(client, fake)).status_code == 200
        assert (await submit(client, fake, "flux-kontext-max")).status_code == 429
        assert (await submit(client, fake)).status_code == 429
        assert fake.in_flight("standard") == 24 and fake.in_flight("kontext-max") == 6


async def test_peak_in_flight_and_duplicate_submits(anyio_backend: str) -> None:
    async with running(generation_time=60) as (fake, client):
        await submit(client, fake, prompt="same", seed=1)
        await submit(client, fake, prompt="same", seed=1)
        await submit(client, fake, prompt="same", seed=2)
        await submit(client, fake, "flux-2-max", prompt="same", seed=1)
        assert fake.duplicate_submits == 1
        assert fake.peak_in_flight == {"standard": 4, "kontext-max": 0}
        fake.finish_now()
        assert fake.in_flight() == 0
        await submit(client, fake, prompt="other")
        assert fake.peak_in_flight["standard"] == 4
        assert [task.seed for task in fake.tasks.values()][:2] == [1, 1]


# -- errors ------------------------------------------------------------------------------


async def test_wrong_key_is_refused_on_api_and_polling_hosts(anyio_backend: str) -> None:
    async with running() as (fake, client):
        refused = {"detail": "Not authenticated - Invalid Authentication"}
        url = f"{fake.base_url}/v1/flux-2-pro"
        wrong = await client.post(url, json={"prompt": "x"}, headers={"x-key": "nope"})
        missing = await client.post(url, json={"prompt": "x"})
        assert (wrong.status_code, wrong.json()) == (403, refused)
        assert (missing.status_code, missing.json()) == (403, refused)
        credits = await client.get(f"{fake.base_url}/v1/credits", headers={"x-key": "nope"})
        assert credits.status_code == 403
        assert fake.submits == 0 and fake.submit_attempts == 2

        task = (await submit(client, fake)).json()
        poll = await client.get(task["polling_url"], headers={"x-key": "nope"})
        assert (poll.status_code, poll.json()) == (403, refused)
        assert (await client.get(task["polling_url"])).status_code == 403
        assert fake.keys_seen == {
            "api": ["nope", None, "nope", "fake-key"],
            "polling": ["nope", None],
            "delivery": [],
        }


async def test_validation_unknown_model_and_credits(anyio_backend: str) -> None:
    async with running(credits=5.0) as (fake, client):
        url = f"{fake.base_url}/v1/flux-2-pro"
        not_json = await client.post(url, content=b"{nope", headers=KEY)
        assert not_json.status_code == 422
        assert isinstance(not_json.json()["detail"], list)
        no_prompt = await client.post(url, json={"seed": 1}, headers=KEY)
        assert no_prompt.json() == {
            "detail": [{"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"}]
        }
        no_image = await submit(client, fake, "flux-pro-1.0-fill")
        assert no_image.status_code == 422
        assert no_image.json()["detail"][0]["loc"] == ["body", "image"]
        unknown = await submit(client, fake, "flux-9-ultra")
        assert (unknown.status_code, unknown.json()) == (404, {"detail": "Not Found"})
        assert fake.submits == 0 and fake.submit_attempts == 4

        fill = await client.post(
            f"{fake.base_url}/v1/flux-pro-1.0-fill", json={"image": "aGk="}, headers=KEY
        )
        assert fill.status_code == 200 and fill.json()["cost"] is None
        assert fake.credits == 0
        broke = await submit(client, fake, "flux-2-klein-4b")
        assert (broke.status_code, broke.json()) == (402, {"detail": "Insufficient credits"})
        assert fake.submits == 1


async def test_flux2_output_over_4_mp_is_a_400_and_credits_stay_floats(
    anyio_backend: str,
) -> None:
    async with running(credits=10) as (fake, client):
        too_big = await submit(client, fake, width=4096, height=2048)
        assert too_big.status_code == 400 and "at most 4 MP" in too_big.json()["detail"]
        assert fake.submits == 0 and fake.credits == 10
        assert (await submit(client, fake, width=2048, height=2048)).status_code == 200
        credits = (await client.get(f"{fake.base_url}/v1/credits", headers=KEY)).json()
        assert credits == {"credits": 2.5} and isinstance(credits["credits"], float)
        fake.credits = 2  # an int from a test still answers as a float
        assert (await client.get(f"{fake.base_url}/v1/credits", headers=KEY)).text == (
            '{"credits": 2.0}'
        )


async def test_unknown_task_is_task_not_found(anyio_backend: str) -> None:
    async with running() as (fake, client):
        answer = await client.get(
            f"{fake.polling_base_url}/v1/get_result?id=no-such-task", headers=KEY
        )
        assert answer.status_code == 200
        assert answer.json() == {
            "id": "no-such-task",
            "status": "Task not found",
            "result": None,
            "progress": None,
            "details": None,
            "preview": None,
        }


@pytest.mark.parametrize(
    ("status", "details"),
    [
        ("Request Moderated", {"Moderation Reasons": ["Derivative Works Filter"]}),
        ("Content Moderated", {"Moderation Reasons": ["Explicit Content"]}),
        ("Error", {"message": "Generation failed: internal error"}),
        ("Task not found", None),
    ],
)
async def test_outcomes(anyio_backend: str, status: str, details: Any) -> None:
    def outcome(model: str, body: dict[str, Any]) -> str:
        return status if body["prompt"] == "bad" else "Ready"

    async with running(outcome=outcome) as (fake, client):
        bad = (await submit(client, fake, prompt="bad")).json()
        good = (await submit(client, fake, prompt="good")).json()
        fake.finish_now()
        answer = (await poll_until_done(client, bad["polling_url"])).json()
        assert set(answer) == POLL_KEYS
        assert (answer["status"], answer["result"], answer["details"]) == (status, None, details)
        assert (await poll_until_done(client, good["polling_url"])).json()["status"] == "Ready"
        assert fake.tasks[bad["id"]].final_status == status


# -- delivery ----------------------------------------------------------------------------


async def test_expired_and_forged_urls_are_refused(anyio_backend: str) -> None:
    async with running(result_ttl=0.05) as (fake, client):
        sample = await ready_sample(client, fake)
        expiry = url_expiry(sample)
        assert expiry is not None
        await until(lambda: time.time() > expiry)
        expired = await client.get(sample)
        assert expired.status_code == 403
        assert expired.text.startswith('<?xml version="1.0" encoding="utf-8"?><Error>')
        assert "<Code>AuthenticationFailed</Code>" in expired.text
        assert "time frame" in expired.text

        task_id = next(iter(fake.tasks))
        fresh = fake.sign_url(task_id, expires_at=time.time() + 60)
        assert (await client.get(fresh)).status_code == 200
        forged = await client.get(fresh.replace("sig=", "sig=0"))
        assert forged.status_code == 403 and "Signature did not match" in forged.text
        mangled = await client.get(fresh.replace("sig=", "sig=%C3%A9"))  # not ASCII
        assert mangled.status_code == 403
        unsigned = await client.get(fresh.split("?")[0])
        assert unsigned.status_code == 403


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
async def test_image_formats(anyio_backend: str, fmt: str) -> None:
    async with running(image_size=(40, 24)) as (fake, client):
        body = {} if fmt == "jpeg" else {"output_format": fmt}  # jpeg is the default
        image = await client.get(await ready_sample(client, fake, **body))
        assert image.headers["content-type"] == f"image/{fmt}"
        data = image.content
        if fmt == "png":
            assert decode_png(data)[:2] == (40, 24)
        elif fmt == "jpeg":
            assert data[:3] == b"\xff\xd8\xff" and jpeg_size(data) == (40, 24)
        else:
            assert data[:4] == b"RIFF" and data[8:12] == b"WEBP"
            assert webp_size(data) == (40, 24)


@pytest.mark.parametrize("fmt", ["jpeg", "png", "webp"])
async def test_image_bytes_pads_and_keeps_the_image_valid(anyio_backend: str, fmt: str) -> None:
    async with running(image_bytes=300_000) as (fake, client):
        sample = await ready_sample(client, fake, output_format=fmt)
        async with client.stream("GET", sample) as streamed:
            data = b"".join([chunk async for chunk in streamed.aiter_bytes()])
        assert abs(len(data) - 300_000) <= 4
        assert int(streamed.headers["content-length"]) == len(data)
        size = {"png": lambda d: decode_png(d)[:2], "jpeg": jpeg_size, "webp": webp_size}[fmt]
        assert size(data) == (64, 64)


async def test_delivery_rate_paces_each_image(anyio_backend: str) -> None:
    async with running(image_bytes=256 * 1024, delivery_rate=1024 * 1024) as (fake, client):
        sample = await ready_sample(client, fake)
        started = anyio.current_time()
        image = await client.get(sample)
        assert len(image.content) == int(image.headers["content-length"])
        assert anyio.current_time() - started >= 0.24  # 256 KiB at 1 MiB/s


async def test_head_request_on_delivery(anyio_backend: str) -> None:
    async with running(image_bytes=100_000) as (fake, client):
        sample = await ready_sample(client, fake)
        head = await client.head(sample)
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len((await client.get(sample)).content))


async def test_connections_are_kept_alive(anyio_backend: str) -> None:
    async with running() as (fake, client):
        task = (await submit(client, fake)).json()
        for _ in range(20):
            await client.get(task["polling_url"], headers=KEY)
            await client.get(f"{fake.base_url}/v1/credits", headers=KEY)
        assert fake.connections == {"api": 1, "polling": 1, "delivery": 0}


async def test_served_images_do_not_pile_up_in_memory(anyio_backend: str) -> None:
    # A benchmark serves many padded JPEGs (the default format): each must not keep a copy.
    fake = FakeBFL(image_bytes=2 << 20, generation_time=0)
    async with fake.client() as client:
        tracemalloc.start()
        try:
            for _ in range(16):
                sample = await ready_sample(client, fake, MEMORY_URLS.api)
                async with client.stream("GET", sample) as streamed:
                    assert sum([len(chunk) async for chunk in streamed.aiter_raw()]) > 2e6
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
    assert held < 4 << 20, f"{held / 2**20:.0f} MiB held after 16 images of 2 MiB"


async def test_signed_urls_look_like_azure_sas(anyio_backend: str) -> None:
    # Production: ?se=2025-01-07T08%3A46%3A02Z&sp=r&sv=2024-11-04&sr=b&rsct=image/jpeg&sig=...
    async with running(result_ttl=600) as (fake, client):
        sample = await ready_sample(client, fake, output_format="png")
        query = urlsplit(sample).query
        params = parse_qs(query)
        assert list(params) == ["se", "sp", "sv", "sr", "rsct", "sig"]
        assert query.startswith("se=") and "%3A" in query.split("&")[0]
        expiry = params["se"][0]
        end_time = fake.tasks[next(iter(fake.tasks))].end_time
        assert expiry == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(end_time + 600))
        assert params["rsct"] == ["image/png"]
        assert (await client.get(sample)).status_code == 200


async def test_a_webhook_url_that_is_no_url_is_a_422(anyio_backend: str) -> None:
    async with running(generation_time=0) as (fake, client):
        for url in ("http://[::1/hook", "ftp://example.com/hook", "/hook", 7):
            refused = await submit(client, fake, webhook_url=url, webhook_secret="s")
            assert refused.status_code == 422, url
            assert refused.json()["detail"][0]["loc"] == ["body", "webhook_url"]
        assert fake.submits == 0
        await anyio.sleep(0.05)  # the fake's webhook sender is still fine
        assert (await submit(client, fake)).status_code == 200


async def test_webhooks_ignore_the_environments_proxy(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # BFL calls the receiver from its own servers, not through the developer's proxy.
    async with httpx.AsyncClient(timeout=10) as client, FakeBFL() as receiver:
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")
        async with FakeBFL(generation_time=0, webhook_retries=0) as fake:
            hook = f"{receiver.base_url}/v1/credits"  # any loopback answer will do
            await submit(client, fake, webhook_url=hook, webhook_secret="s")
            await until(lambda: bool(fake.webhooks.delivered or fake.webhooks.failed))
            assert len(receiver.keys_seen["api"]) == 1  # it reached the receiver directly


# -- faults ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "content_type"),
    [("500", "text/plain"), ("502", "text/html"), ("503", "application/json")],
)
async def test_submit_server_errors_create_nothing(
    anyio_backend: str, fault: Fault, content_type: str
) -> None:
    async with running() as (fake, client):
        fake.fail_next("submit", fault)
        answer = await submit(client, fake)
        assert answer.status_code == int(fault)
        assert answer.headers["content-type"].startswith(content_type)
        if fault == "503":
            assert answer.headers["retry-after"] == "1"
        assert fake.submits == 0 and fake.tasks == {} and fake.credits == 1000
        assert (await submit(client, fake)).status_code == 200
        assert fake.submit_attempts == 2


@pytest.mark.parametrize(("fault", "created"), [("drop_before", 0), ("drop_after", 1)])
async def test_submit_dropped_connection(anyio_backend: str, fault: Fault, created: int) -> None:
    async with running() as (fake, client):
        fake.fail_next("submit", fault)
        with pytest.raises(httpx.RemoteProtocolError):
            await submit(client, fake)
        assert len(fake.tasks) == fake.submits == created
        assert (await submit(client, fake)).status_code == 200


async def test_submit_truncated_and_malformed_answers_still_create(anyio_backend: str) -> None:
    async with running() as (fake, client):
        fake.fail_next("submit", "truncate")
        fake.fail_next("submit", "malformed")
        with pytest.raises(httpx.RemoteProtocolError):
            await submit(client, fake)
        malformed = await submit(client, fake)
        assert malformed.status_code == 200
        with pytest.raises(json.JSONDecodeError):
            json.loads(malformed.content)
        assert fake.submits == 2 and fake.submit_attempts == 2


async def test_slow_submit_times_out_after_creating(anyio_backend: str) -> None:
    async with running(slow_seconds=0.3) as (fake, client):
        fake.fail_next("submit", "slow", count=2)
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"{fake.base_url}/v1/flux-2-pro", json={"prompt": "x"}, headers=KEY, timeout=0.05
            )
        assert fake.submits == 1
        started = time.monotonic()
        assert (await submit(client, fake)).status_code == 200
        assert time.monotonic() - started >= 0.3
        started = time.monotonic()
        assert (await submit(client, fake)).status_code == 200
        assert time.monotonic() - started < 0.3


async def test_poll_faults(anyio_backend: str) -> None:
    async with running(slow_seconds=0.1) as (fake, client):
        url = (await submit(client, fake)).json()["polling_url"]
        errors: tuple[Fault, ...] = ("500", "502", "503")
        for fault in errors:
            fake.fail_next("poll", fault)
            assert (await client.get(url, headers=KEY)).status_code == int(fault)
        hang_ups: tuple[Fault, ...] = ("drop_before", "drop_after", "truncate")
        for fault in hang_ups:
            fake.fail_next("poll", fault)
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(url, headers=KEY)
        fake.fail_next("poll", "malformed")
        with pytest.raises(json.JSONDecodeError):
            (await client.get(url, headers=KEY)).json()
        fake.fail_next("poll", "slow")
        started = time.monotonic()
        assert (await client.get(url, headers=KEY)).json()["status"] in ("Pending", "Ready")
        assert time.monotonic() - started >= 0.1
        assert fake.polls == 8
        assert set((await client.get(url, headers=KEY)).json()) == POLL_KEYS


async def test_download_faults(anyio_backend: str) -> None:
    async with running(image_bytes=200_000) as (fake, client):
        sample = await ready_sample(client, fake, output_format="png")
        fake.fail_next("download", "expired")
        expired = await client.get(sample)
        assert expired.status_code == 403 and "AuthenticationFailed" in expired.text
        fake.fail_next("download", "503")
        busy = await client.get(sample)
        assert busy.status_code == 503 and "<Code>ServerBusy</Code>" in busy.text
        assert busy.headers["retry-after"] == "1"
        fake.fail_next("download", "truncate")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(sample)
        fake.fail_next("download", "malformed")
        garbage = await client.get(sample)
        assert garbage.status_code == 200 and not garbage.content.startswith(b"\x89PNG")
        fine = await client.get(sample)
        assert decode_png(fine.content)[:2] == (64, 64) and len(fine.content) == 200_000
        assert fake.downloads == 5


async def test_fail_next_rejects_nonsense(anyio_backend: str) -> None:
    fake = FakeBFL()
    with pytest.raises(ValueError, match="downloads only"):
        fake.fail_next("submit", "expired")
    with pytest.raises(ValueError, match="unknown fault"):
        fake.fail_next("poll", "teapot")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="count"):
        fake.fail_next("poll", "500", count=0)


async def test_a_bug_in_outcome_surfaces_at_exit(anyio_backend: str) -> None:
    def outcome(model: str, body: dict[str, Any]) -> str:
        return "Finished"

    with pytest.raises(RuntimeError, match="failed on 1 request"):
        async with running(outcome=outcome) as (fake, client):
            assert (await submit(client, fake)).status_code == 500
    assert isinstance(fake.server_errors[0], ValueError)


def test_task_records_what_the_fake_saw() -> None:
    task = FakeTask(
        id="t",
        model="flux-2-pro",
        family="flux2",
        body={"prompt": "x"},
        pools=("standard",),
        created_at=10.0,
        ends_at=12.5,
        start_time=1000.0,
        final_status="Ready",
        seed=2**40,
        cost=3.0,
        output_format="jpeg",
    )
    assert task.duration == 2.5 and task.end_time == 1002.5
    assert task.in_flight(11.0) and not task.in_flight(12.5)


def test_command_line_server() -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "bfl_async.testing", "--api-key", "k", "--generation-time", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        urls = dict(process.stdout.readline().split() for _ in range(3))
        assert set(urls) == {"api", "polling", "delivery"}
        assert urls["delivery"].startswith("http://127.0.0.2:")
        with httpx.Client(timeout=10) as client:
            credits = client.get(f"{urls['api']}/v1/credits", headers={"x-key": "k"})
            assert credits.json() == {"credits": 1000.0}
    finally:
        process.terminate()
        process.wait(timeout=10)


# -- in memory ---------------------------------------------------------------------------


def fast_bfl(fake: FakeBFL, **kwargs: Any) -> AsyncBFL:
    """An AsyncBFL on the fake's in-memory transport, polling every 10 ms."""
    options: dict[str, Any] = {
        "api_key": fake.api_key,
        "http_client": fake.client(),
        "poll_schedule": Backoff(initial=0.01, factor=1.0, maximum=0.01, jitter=0.0),
        "retry_base_delay": 0.01,
        "close_grace": 5.0,
    }
    return AsyncBFL(**{**options, **kwargs})


async def test_async_bfl_round_trip_in_memory(anyio_backend: str, tmp_path: Path) -> None:
    fake = FakeBFL(time_scale=0.01, image_bytes=300_000)  # never entered: no sockets
    async with fast_bfl(fake) as client:
        image = await client.generate("flux-2-pro", prompt="x", output_dir=tmp_path)
        credits = await client.credits()
    task = fake.tasks[image.task_id]
    assert image.cost == 3.0 and image.seed == task.seed
    assert image.task.polling_url == f"{MEMORY_URLS.polling}/v1/get_result?id={task.id}"
    assert credits == 997.0 and fake.submits == 1 and fake.downloads == 1
    assert fake.keys_seen["api"] == ["fake-key", "fake-key"]
    assert fake.keys_seen["polling"] and set(fake.keys_seen["polling"]) == {"fake-key"}
    assert fake.keys_seen["delivery"] == [None]
    assert fake.connections == {"api": 0, "polling": 0, "delivery": 0}
    async with fake.client() as http:
        served = (await http.get(fake.sign_url(task.id))).content
    assert image.path.read_bytes() == served and len(served) == 300_000
    assert fake.server_errors == []


@pytest.mark.parametrize("region", ["eu", "us"])
async def test_regional_api_hosts_in_memory(anyio_backend: str, region: str) -> None:
    fake = FakeBFL()
    async with fast_bfl(fake, region=region) as client:
        assert await client.credits() == 1000.0
    assert fake.keys_seen["api"] == ["fake-key"]


async def test_in_memory_answers_name_production_hosts(anyio_backend: str) -> None:
    fake = FakeBFL()
    async with fake.client() as client:
        task = (await submit_to(client, "https://api.bfl.ai")).json()
        assert task["polling_url"] == f"https://api.eu2.bfl.ai/v1/get_result?id={task['id']}"
        fake.finish_now()
        answer = await client.get(task["polling_url"], headers=KEY)
        assert answer.headers["retry-after"] == "1"
        sample = answer.json()["result"]["sample"]
        assert sample.startswith(
            f"https://delivery-eu1.bfl.ai/results/{task['id']}/sample.jpeg?se="
        )
        assert fake.sign_url(task["id"]).startswith("https://delivery-eu1.bfl.ai/")
        image = await client.get(sample)
        assert (image.status_code, image.headers["content-type"]) == (200, "image/jpeg")
        assert image.headers["server"].startswith("Windows-Azure-Blob")
        assert image.content[:3] == b"\xff\xd8\xff"
        assert (await client.head(sample)).content == b""
        global_poll = await client.get(f"https://api.bfl.ai/v1/get_result?id={task['id']}")
        assert global_poll.status_code == 404  # the API host does not know regional tasks


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/v1/credits",
        "http://api.bfl.ai/v1/credits",  # BFL is https only
        "https://api.bfl.ai:8443/v1/credits",
        "https://api.eu1.bfl.ai/v1/get_result?id=x",  # a cluster host the fake does not play
        "http://127.0.0.1:9/v1/credits",
    ],
)
async def test_other_hosts_are_unreachable_in_memory(anyio_backend: str, url: str) -> None:
    fake = FakeBFL()
    async with fake.client() as client:
        with pytest.raises(httpx.ConnectError, match="serves no"):
            await client.get(url, headers=KEY)
    assert fake.keys_seen == {"api": [], "polling": [], "delivery": []}


async def test_both_fronts_share_one_state_and_name_their_own_hosts(anyio_backend: str) -> None:
    async with running() as (fake, plain), fake.client() as memory:
        over_http = (await submit(plain, fake)).json()
        in_memory = (await submit_to(memory, MEMORY_URLS.api)).json()
        assert over_http["polling_url"].startswith(f"{fake.polling_base_url}/v1/get_result?id=")
        assert in_memory["polling_url"].startswith(f"{MEMORY_URLS.polling}/v1/get_result?id=")
        assert fake.submits == 2 and fake.in_flight() == 2
        fake.finish_now()
        # A task submitted in memory is polled over loopback, and named there in loopback URLs.
        polled = await plain.get(
            f"{fake.polling_base_url}/v1/get_result?id={in_memory['id']}", headers=KEY
        )
        assert polled.json()["result"]["sample"].startswith(fake.delivery_base_url)
        assert fake.sign_url(in_memory["id"]).startswith(fake.delivery_base_url)
        memory_url = fake.sign_url(in_memory["id"], urls=MEMORY_URLS)
        assert (await memory.get(memory_url)).status_code == 200
        assert fake.keys_seen["api"] == ["fake-key", "fake-key"]


async def test_429_at_the_limit_in_memory(anyio_backend: str) -> None:
    fake = FakeBFL(limits={"standard": 2}, generation_time=60)
    async with fake.client() as client:
        for _ in range(2):
            assert (await submit_to(client, MEMORY_URLS.api)).status_code == 200
        refused = await submit_to(client, MEMORY_URLS.api)
        assert (refused.status_code, refused.headers["retry-after"]) == (429, "1")
        assert (fake.submits, fake.submit_attempts, fake.rate_limited) == (2, 3, 1)
        fake.finish_now()
        assert (await submit_to(client, MEMORY_URLS.api)).status_code == 200


async def test_in_memory_bodies_stream_in_chunks(anyio_backend: str) -> None:
    fake = FakeBFL(image_bytes=300_000)
    async with fake.client() as client:
        sample = await ready_sample(client, fake, MEMORY_URLS.api, output_format="png")
        async with client.stream("GET", sample) as streamed:
            chunks = [chunk async for chunk in streamed.aiter_raw()]
    assert len(chunks) >= 5 and max(len(chunk) for chunk in chunks) <= 1 << 16
    assert int(streamed.headers["content-length"]) == sum(len(chunk) for chunk in chunks)
    assert decode_png(b"".join(chunks))[:2] == (64, 64)


async def test_a_bug_in_outcome_answers_500_in_memory(anyio_backend: str) -> None:
    fake = FakeBFL(outcome=lambda model, body: "Finished")
    async with fake.client() as client:
        answer = await submit_to(client, MEMORY_URLS.api)
    assert answer.status_code == 500 and "fake server error" in answer.text
    assert isinstance(fake.server_errors[0], ValueError)


FAULTS: list[tuple[FaultKind, Fault]] = [
    (kind, fault)
    for kind in ("submit", "poll", "download")
    for fault in ("500", "502", "503", "drop_before", "drop_after", "truncate", "malformed")
] + [("download", "expired")]


@pytest.mark.parametrize("front", ["loopback", "memory"])
@pytest.mark.parametrize(("kind", "fault"), FAULTS)
async def test_each_fault_on_each_front(
    anyio_backend: str, front: str, kind: FaultKind, fault: Fault
) -> None:
    """Every fault meets a client the same way in memory as over loopback HTTP."""
    async with fronted(front, image_bytes=200_000) as (fake, client, urls):
        sample = await ready_sample(client, fake, urls.api, output_format="png")
        polling_url = f"{urls.polling}/v1/get_result?id={next(iter(fake.tasks))}"

        async def attempt() -> httpx.Response:
            if kind == "submit":
                return await submit_to(client, urls.api)
            return await client.get(polling_url if kind == "poll" else sample, headers=KEY)

        counted = {"submit": fake.submit_attempts, "poll": fake.polls, "download": fake.downloads}
        fake.fail_next(kind, fault)
        if fault in ("drop_before", "drop_after", "truncate"):
            with pytest.raises(httpx.RemoteProtocolError):
                await attempt()
        else:
            answer = await attempt()
            if fault == "malformed":
                assert answer.status_code == 200
                if kind == "download":
                    assert not answer.content.startswith(b"\x89PNG")
                else:
                    with pytest.raises(json.JSONDecodeError):
                        json.loads(answer.content)
            else:
                assert answer.status_code == (403 if fault == "expired" else int(fault))
        after = {"submit": fake.submit_attempts, "poll": fake.polls, "download": fake.downloads}
        assert after[kind] == counted[kind] + 1
        if kind == "submit":
            created = fault in ("drop_after", "truncate", "malformed")
            assert fake.submits == 1 + created
        fine = await attempt()  # the fault was spent on one request
        assert fine.status_code == 200
        if kind == "download":
            assert decode_png(fine.content)[:2] == (64, 64) and len(fine.content) == 200_000


@pytest.mark.parametrize("front", ["loopback", "memory"])
async def test_slow_answers_on_each_front(anyio_backend: str, front: str) -> None:
    async with fronted(front, slow_seconds=0.2) as (fake, client, urls):
        fake.fail_next("submit", "slow", count=2)
        with pytest.raises(httpx.ReadTimeout):
            await client.post(
                f"{urls.api}/v1/flux-2-pro", json={"prompt": "x"}, headers=KEY, timeout=0.05
            )
        assert fake.submits == 1  # the late answer still created its task
        started = time.monotonic()
        assert (await submit_to(client, urls.api)).status_code == 200
        assert time.monotonic() - started >= 0.2


async def test_fake_client_generates_on_its_own_fake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(FAKE_TIME_SCALE_ENV, "0.01")
    async with fake_client(limits={"standard": 3}) as client:
        assert client.limiter.limit("standard") == 3  # options reach the client
        assert client.base_url.host == "127.0.0.1"
        started = anyio.current_time()
        images = [
            await client.generate("flux-2-pro", prompt=f"p{n}", output_dir=tmp_path)
            for n in range(3)
        ]
        # 0.5 to 2 s per task, scaled by the environment: a few hundredths here.
        assert anyio.current_time() - started < 1.5
    assert all(image.path.read_bytes()[:2] == b"\xff\xd8" for image in images)


async def test_fake_client_time_scale_argument_wins_and_bad_env_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(FAKE_TIME_SCALE_ENV, "fast")
    with pytest.raises(ValueError, match="BFL_FAKE_TIME_SCALE must be a number >= 0, not 'fast'"):
        async with fake_client():
            pass
    async with fake_client(time_scale=0.0) as client:
        task = await client.submit("flux-2-pro", prompt="p")
        assert (await client.wait(task, timeout=5)).sample


async def test_fake_client_never_takes_the_shared_limiters_slots(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A fake run is an account of its own: a production BFL_LIMITER_URL is not used.
    monkeypatch.setenv("BFL_LIMITER_URL", "redis://:pw@127.0.0.1:1/0")
    async with fake_client(time_scale=0.0, limits={"standard": 2}) as client:
        assert type(client.limiter) is Limiter and client.limiter.limit("standard") == 2
