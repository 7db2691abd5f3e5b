"""The batch API: journal, resume, budgets, the manifest and what never leaks."""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream

from bfl_async import (
    AsyncBFL,
    Backoff,
    Batch,
    BatchInUseError,
    BudgetExceededError,
    JobRecord,
    ParameterError,
    SubmissionUncertainError,
    Task,
    _download,
)
from bfl_async._batch import _Job, job_key
from bfl_async._journal import JobRow, Journal
from bfl_async.testing import FakeBFL

pytestmark = pytest.mark.anyio
BOTH = pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
KEY = "batch-test-key-SECRET-0c4f1e"
PNG_HEAD = b"\x89PNG\r\n\x1a\n" + bytes(24)  # an image signature: enough for a reference


def jobs(count: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        {"model": "flux-2-klein-4b", "prompt": f"job {n}", "width": 256, "height": 256, **extra}
        for n in range(count)
    ]


def client_for(fake: FakeBFL, **kwargs: Any) -> AsyncBFL:
    options: dict[str, Any] = {
        "api_key": fake.api_key,
        "http_client": fake.client(),
        "poll_schedule": Backoff(initial=0.005, factor=1.5, maximum=0.01, jitter=0.1),
        "retry_base_delay": 0.005,
        "poll_rate": None,
        "close_grace": 0.0,
    }
    return AsyncBFL(**{**options, **kwargs})


async def run(fake: FakeBFL, out: Path, job_list: list[dict[str, Any]], **options: Any) -> Batch:
    async with client_for(fake) as client, client.batch(job_list, out, **options) as batch:
        async for _ in batch:
            pass
    return batch


def never(model: str, rng: random.Random) -> float:
    return 3600.0


@BOTH
async def test_a_batch_runs_every_job_and_a_rerun_pays_nothing(tmp_path: Path) -> None:
    fake = FakeBFL(api_key=KEY, generation_time=0.01)
    first = await run(
        fake, tmp_path, [*jobs(5), {"model": "flux-2-pro", "prompt": "x", "name": "n"}]
    )
    assert first.counts() == {"downloaded": 6}
    assert (tmp_path / "n.jpg").is_file()
    assert first.spent == first.estimated == 5 * 1.4 + 3.0
    polls = fake.polls
    again = await run(
        fake, tmp_path, [*jobs(5), {"model": "flux-2-pro", "prompt": "x", "name": "n"}]
    )
    assert fake.submits == 6 and fake.polls == polls and fake.downloads == 6
    assert all(r.previous and r.ok for r in again.records)
    assert again.spent == first.spent
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["states"] == {"downloaded": 6}
    assert manifest["summary"]["spent_credits"] == 10.0
    assert [job["index"] for job in manifest["jobs"]] == list(range(6))


async def test_editing_the_job_list_runs_only_what_changed(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    await run(fake, tmp_path, jobs(4))
    edited = jobs(4)
    edited[2]["prompt"] = "something else"
    batch = await run(fake, tmp_path, edited)
    assert fake.submits == 5
    assert [r.previous for r in batch.records] == [True, True, False, True]


@pytest.fixture
def never_fake() -> FakeBFL:
    return FakeBFL(generation_time=never, limits={"standard": 4})


async def test_stop_keeps_paid_tasks_submitted_and_the_next_run_attaches_them_first(
    never_fake: FakeBFL, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="bfl_async")
    fake = never_fake
    seen: list[str] = []
    async with (
        client_for(fake, limits={"standard": 4}) as client,
        client.batch(jobs(10), tmp_path) as batch,
    ):

        async def stop_when_full() -> None:
            while fake.submits < 4:
                await anyio.sleep(0.005)
            batch.stop(grace=0.05)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_full)
            async for record in batch:
                seen.append(record.state)
    assert batch.stopping
    assert batch.counts() == {"submitted": 4, "queued": 6}
    # The client closed on 4 running tasks the journal holds: no handles logged to resume
    # them in Python, since the next run of the batch does.
    assert caplog.text.count("its batch's journal holds it") == 4
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert sorted(seen) == ["queued"] * 6 + ["submitted"] * 4
    assert fake.submits == 4
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["states"] == {"submitted": 4, "queued": 6}
    # The next run: the 4 paid tasks take their slots before any new submit, so a full
    # account never answers 429; nothing is submitted twice.
    for task in fake.tasks.values():  # still running on BFL's side for a moment
        task.ends_at = time.monotonic() + 0.2
    fake.generation_time = 0.01
    async with (
        client_for(fake, limits={"standard": 4}) as client,
        client.batch(jobs(10), tmp_path) as batch,
    ):
        async for _ in batch:
            pass
    assert batch.counts() == {"downloaded": 10}
    assert fake.submits == 10 and fake.duplicate_submits == 0
    assert fake.rate_limited == 0


async def test_leaving_the_loop_early_stops_the_batch(never_fake: FakeBFL, tmp_path: Path) -> None:
    fake = never_fake
    fake.fail_next("submit", "500")  # the first job ends at once: uncertain
    async with client_for(fake) as client, client.batch(jobs(6), tmp_path) as batch:
        async for record in batch:
            assert record.state == "uncertain"
            break
    assert batch.stopping
    assert set(batch.counts()) <= {"uncertain", "submitted", "queued"}


async def test_the_budget_counts_spent_and_in_flight_credits(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    batch = await run(fake, tmp_path, jobs(6), max_cost=5.0)  # 1.4 credits each
    assert batch.counts() == {"downloaded": 3, "skipped": 3}
    assert fake.submits == 3 and batch.spent == pytest.approx(4.2)
    for record in batch.records:
        if record.state == "skipped":
            assert isinstance(record.exception, BudgetExceededError)
            assert record.exception.max_cost == 5.0 and record.task is None
    # Across runs: what earlier runs spent counts.
    batch = await run(fake, tmp_path, jobs(6), max_cost=6.9)
    assert batch.counts() == {"downloaded": 4, "skipped": 2}
    batch = await run(fake, tmp_path, jobs(6), max_cost=7.0)  # exactly 5 jobs' worth
    assert batch.counts() == {"downloaded": 5, "skipped": 1}
    batch = await run(fake, tmp_path, jobs(6))
    assert batch.counts() == {"downloaded": 6} and fake.submits == 6
    assert batch.spent == pytest.approx(6 * 1.4)


async def test_flux1_jobs_count_their_catalog_price(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-pro-1.1", "prompt": f"p{n}"} for n in range(3)]
    batch = await run(fake, tmp_path, job_list, max_cost=8.0)
    assert batch.counts() == {"downloaded": 2, "skipped": 1}
    assert [r.cost for r in batch.records if r.ok] == [4.0, 4.0]


async def test_invalid_jobs_fail_alone_and_names_cannot_escape(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list: list[dict[str, Any]] = [
        {"model": "flux-2-klein-4b", "prompt": "ok", "name": "fine"},
        {"model": "flux-2-klein-4b", "prompt": "a", "name": "../escape"},
        {"model": "flux-2-klein-4b", "prompt": "b", "name": "/etc/passwd"},
        {"model": "flux-2-klein-4b", "prompt": "c", "name": "bad\x00name"},
        {"model": "flux-2-klein-4b", "prompt": "d", "name": "fine"},
        {"model": "flux-2-klein-4b", "prompt": "e", "name": 7},
        {"prompt": "no model"},
        {"model": "flux-2-klein-4b", "prompt": "f", "width": 3},
    ]
    batch = await run(fake, tmp_path / "out", job_list)
    assert [r.state for r in batch.records] == ["downloaded"] + ["failed"] * 7
    assert all(isinstance(r.exception, ParameterError) for r in batch.records[1:])
    assert fake.submits == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unnamed_files_never_take_a_path_from_the_server() -> None:
    job = _Job(0, "k", None, None, {}, {}, 0.0, None)  # type: ignore[arg-type]
    for task_id in ("../../etc/passwd", "/abs", "a/b", "..", "x" * 300, "bad\nname", ""):
        task = Task(id=task_id, polling_url="https://api.bfl.ai/x", model="flux-2-pro")
        name = Batch._file_name(job, task)
        assert name.startswith("task-") and "/" not in name and len(name) < 40
    task = Task(id="0f3c-ab_9", polling_url="https://api.bfl.ai/x", model="flux-2-pro")
    assert Batch._file_name(job, task) == "0f3c-ab_9"


def test_job_keys_are_stable_and_leave_secrets_out() -> None:
    params = {"prompt": "a fox", "webhook_url": "https://x", "webhook_secret": "s1"}
    key = job_key("flux-2-pro", params)
    assert key.startswith("hash:") and key == job_key("flux-2-pro", dict(reversed(params.items())))
    assert key == job_key("flux-2-pro", {**params, "webhook_secret": "rotated"})
    assert key != job_key("flux-2-max", params)
    assert key != job_key("flux-2-pro", {**params, "prompt": "a wolf"})
    assert job_key("flux-2-pro", params, "fox") == "name:fox"


class _ImageFile(os.PathLike[str]):
    """A path object without a `__str__` of its own (its repr holds its address)."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def __fspath__(self) -> str:
        return str(self._path)


async def test_a_job_keeps_its_key_whatever_holds_its_image(tmp_path: Path) -> None:
    # str() of a memoryview or of a bare os.PathLike is `<... at 0x...>`: an address, new in
    # every run. A key built from it made every rerun submit (and pay for) the jobs again.
    fake = FakeBFL(generation_time=0.01)
    png = PNG_HEAD
    (tmp_path / "ref.png").write_bytes(png)
    out = tmp_path / "out"

    def with_images(view: memoryview, path: _ImageFile) -> list[dict[str, Any]]:
        return [
            {"model": "flux-2-klein-4b", "prompt": "a", "input_image": view},
            {"model": "flux-2-klein-4b", "prompt": "b", "input_image": path},
        ]

    first = (memoryview(bytes(png)), _ImageFile(tmp_path / "ref.png"))
    second = (memoryview(bytearray(png)), _ImageFile(tmp_path / "ref.png"))  # both alive
    assert (await run(fake, out, with_images(*first))).counts() == {"downloaded": 2}
    again = await run(fake, out, with_images(*second))  # the same jobs, run again
    assert again.counts() == {"downloaded": 2} and all(r.previous for r in again.records)
    assert fake.submits == 2
    # Same content, same key, whichever object holds it (a Path's key is unchanged).
    assert job_key("flux-2-pro", {"input_image": first[0]}) == job_key(
        "flux-2-pro", {"input_image": png}
    )
    assert job_key("flux-2-pro", {"input_image": first[1]}) == job_key(
        "flux-2-pro", {"input_image": tmp_path / "ref.png"}
    )


async def test_the_same_request_twice_is_two_jobs(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    batch = await run(fake, tmp_path, jobs(1) * 2)
    assert [r.key.endswith("#2") for r in batch.records] == [False, True]
    assert fake.submits == 2
    await run(fake, tmp_path, jobs(1) * 2)
    assert fake.submits == 2


async def test_the_key_never_reaches_journal_manifest_logs_errors_or_reprs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake = FakeBFL(api_key=KEY, generation_time=0.01)
    fake.fail_next("submit", "drop_after")  # uncertain
    fake.fail_next("poll", "500")
    fake.fail_next("download", "malformed")  # refused download
    async with (
        client_for(fake) as client,
        client.batch(jobs(4, webhook_secret="hush-SECRET"), tmp_path) as batch,
    ):
        texts = [repr(client), repr(batch)]
        async for record in batch:
            texts += [repr(record), str(record.exception), repr(record.exception)]
            texts.append(json.dumps(record.manifest_entry()))
    assert {r.state for r in batch.records} >= {"uncertain", "ready", "downloaded"}
    texts.append(caplog.text)
    for path in tmp_path.iterdir():
        texts.append(path.read_bytes().decode("latin-1"))
    for text in texts:
        assert KEY not in text
        assert "hush-SECRET" not in text


async def test_the_journal_records_each_step_before_it(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    journal_path = tmp_path / "j.sqlite"
    steps: list[tuple[str, str]] = []

    def outcome(model: str, body: dict[str, Any]) -> str:
        # The fake creates the task: the journal must already say "submitting".
        with sqlite3.connect(journal_path) as db:
            steps.extend(db.execute("SELECT key, state FROM jobs"))
        return "Ready"

    fake.outcome = outcome
    batch = await run(fake, tmp_path, jobs(1), journal=journal_path)
    assert steps == [(batch.records[0].key, "submitting")]
    with sqlite3.connect(journal_path) as db:
        [(mode,)] = db.execute("PRAGMA journal_mode")
        row = db.execute("SELECT state, task, cost, path, attempts FROM jobs").fetchone()
    assert mode == "wal"
    assert row[0] == "downloaded" and Task.model_validate_json(row[1]).cost == 1.4
    assert row[2] == 1.4 and Path(row[3]).is_file() and row[4] == 1


async def test_journal_refuses_unknown_fields_and_states(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        await journal.add([JobRow("k", 0, None, "flux-2-pro", 3.0, "queued")])
        await journal.add([JobRow("k", 0, None, "flux-2-pro", 9.0, "failed")])  # ignored
        with pytest.raises(ValueError, match="not journal fields"):
            await journal.update("k", model="other")
        with pytest.raises(ValueError, match="unknown job state"):
            await journal.update("k", state="paid")
        rows = await journal.load()
        assert rows["k"].state == "queued" and rows["k"].estimate == 3.0
        assert repr(journal) == f"Journal({str(tmp_path / 'j.sqlite')!r})"
    finally:
        await journal.aclose()


async def test_misuse_is_explained(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    async with client_for(fake) as client:
        with pytest.raises(ValueError, match="max_cost"):
            client.batch(jobs(1), tmp_path, max_cost=-1)
        batch = client.batch(jobs(1), tmp_path)
        with pytest.raises(RuntimeError, match="async with"):
            async for _ in batch:
                pass
        async with batch:
            async for _ in batch:
                pass
            with pytest.raises(RuntimeError, match="runs once"):
                async for _ in batch:
                    pass


async def test_an_error_in_the_loop_body_stops_the_batch_and_keeps_the_journal(
    never_fake: FakeBFL, tmp_path: Path
) -> None:
    fake = never_fake
    fake.fail_next("submit", "500")  # the first job ends at once: uncertain
    async with client_for(fake) as client:
        with pytest.raises(RuntimeError, match="boom"):
            async with client.batch(jobs(6), tmp_path) as batch:
                async for _ in batch:
                    raise RuntimeError("boom")
    assert batch.counts() == {"uncertain": 1, "submitted": 4, "queued": 1}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["states"] == batch.counts()
    # The journal agrees: the next run attaches the 4 paid tasks and submits the last one.
    fake.finish_now()
    fake.generation_time = 0.01
    again = await run(fake, tmp_path, jobs(6))
    assert again.counts() == {"uncertain": 1, "downloaded": 5}
    assert fake.submits == 5 and fake.duplicate_submits == 0


async def test_an_existing_image_is_not_paid_for_again_and_timeouts_keep_tasks(
    never_fake: FakeBFL, tmp_path: Path
) -> None:
    fake = never_fake
    (tmp_path / "taken.jpg").write_bytes(b"mine")
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "taken"}, *jobs(1)]
    batch = await run(fake, tmp_path, job_list, timeout=0.05)
    first, second = batch.records
    assert first.state == "failed" and first.error_type == "OutputExistsError"
    assert (tmp_path / "taken.jpg").read_bytes() == b"mine"
    assert second.state == "submitted" and second.error_type == "WaitTimeoutError"
    assert fake.submits == 1


async def test_a_paid_job_removed_from_the_list_is_still_saved(
    never_fake: FakeBFL, tmp_path: Path
) -> None:
    fake = never_fake
    async with client_for(fake) as client, client.batch(jobs(2), tmp_path) as batch:

        async def stop_when_paid() -> None:
            while fake.submits < 2:
                await anyio.sleep(0.005)
            batch.stop(grace=0)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_when_paid)
            async for _ in batch:
                pass
    paid = {r.key for r in batch.records if r.state == "submitted"}
    assert len(paid) == 2
    fake.finish_now()
    fake.generation_time = 0.01
    edited = jobs(2)
    edited[1]["prompt"] = "changed while it was running"
    again = await run(fake, tmp_path, edited)
    assert [(r.listed, r.state) for r in again.records] == [
        (True, "downloaded"), (True, "downloaded"), (False, "downloaded")
    ]  # fmt: skip
    assert again.records[2].index == 2 and again.records[2].key in paid
    assert fake.submits == 3 and fake.duplicate_submits == 0
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [job["listed"] for job in manifest["jobs"]] == [True, True, False]


# --- paid work is never lost nor paid twice ----------------------------------------------


class _Garbled(httpx.AsyncByteStream):
    """A body that cannot be decoded as its headers say (gzip): httpx's DecodingError."""

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"\x00 not gzip at all"


class _Rewrite(httpx.AsyncBaseTransport):
    """The fake in memory, with accepted submit answers rewritten by `change`."""

    def __init__(self, fake: FakeBFL, change: Callable[[httpx.Response], httpx.Response]) -> None:
        self._inner = fake.transport()
        self._change = change

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method == "POST" and response.status_code == 200:
            await response.aread()
            return self._change(response)
        return response


def rewriting_client(
    fake: FakeBFL, change: Callable[[httpx.Response], httpx.Response], **kwargs: Any
) -> AsyncBFL:
    http = httpx.AsyncClient(transport=_Rewrite(fake, change))
    return client_for(fake, http_client=http, **kwargs)


async def run_with(
    client: AsyncBFL, out: Path, job_list: list[dict[str, Any]], **options: Any
) -> Batch:
    async with client, client.batch(job_list, out, **options) as batch:
        async for _ in batch:
            pass
    return batch


async def test_a_raising_client_on_submitted_loses_no_paid_task(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeBFL(generation_time=0.01)
    journaled: list[str] = []

    def broken(task: Task) -> None:
        # The batch's journal is written first: the handle is safe before user code runs.
        with sqlite3.connect(tmp_path / Batch.journal_name) as db:
            [(state,)] = db.execute("SELECT state FROM jobs WHERE task LIKE ?", (f"%{task.id}%",))
        journaled.append(state)
        raise OSError("the user's disk is full")

    batch = await run_with(client_for(fake, on_submitted=broken), tmp_path, jobs(3))
    assert batch.counts() == {"downloaded": 3} and journaled == ["submitted"] * 3
    assert all(r.path is not None and r.path.is_file() for r in batch.records)
    assert "on_submitted failed" in caplog.text
    again = await run(fake, tmp_path, jobs(3))
    assert again.counts() == {"downloaded": 3} and fake.submits == 3


async def test_a_journal_failing_to_record_an_accepted_task_leaves_it_uncertain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeBFL(generation_time=0.01)
    original = Journal._update

    def failing(self: Journal, key: str, values: dict[str, Any]) -> None:
        if values.get("state") == "submitted":
            raise sqlite3.OperationalError("disk I/O error")
        original(self, key, values)

    monkeypatch.setattr(Journal, "_update", failing)
    batch = await run(fake, tmp_path, jobs(1))
    [record] = batch.records
    assert record.state == "uncertain" and record.task is not None
    assert record.error_type == "OperationalError" and batch.at_risk == 1.4
    assert batch.spent == 0
    monkeypatch.undo()
    again = await run(fake, tmp_path, jobs(1))
    assert again.counts() == {"uncertain": 1} and fake.submits == 1


async def test_a_task_the_journal_failed_to_record_stays_in_the_budget_meanwhile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first accepted task cannot be journaled (so it ends `uncertain`). Until then its
    # price must stay counted: a submit checked meanwhile must not see it missing.
    fake = FakeBFL(generation_time=0.01)
    original = Journal._update
    failed: list[str] = []

    def failing_once(self: Journal, key: str, values: dict[str, Any]) -> None:
        if values.get("state") == "submitted" and not failed:
            failed.append(key)
            raise sqlite3.OperationalError("database is locked")
        original(self, key, values)

    monkeypatch.setattr(Journal, "_update", failing_once)
    third_checked = anyio.Event()
    callbacks = 0

    async def hold_the_first(task: Task) -> None:
        # The unjournaled task's own callback runs in that window: let the third job's
        # budget check happen then (a slot frees up as the second task ends).
        nonlocal callbacks
        callbacks += 1
        if callbacks == 1:
            with anyio.move_on_after(5):
                await third_checked.wait()

    client = client_for(fake, on_submitted=hold_the_first, limits={"standard": 2})
    async with client, client.batch(jobs(3), tmp_path, max_cost=2.8) as batch:
        check = batch._before_send

        async def observed(job: _Job) -> None:
            if job.index == 2:
                third_checked.set()
            await check(job)

        batch._before_send = observed  # type: ignore[method-assign]
        async for _ in batch:
            pass
    assert third_checked.is_set() and len(failed) == 1
    # 1.4 at risk (the unjournaled task) + 1.4 charged: no room for a third 1.4 job.
    assert batch.counts() == {"uncertain": 1, "downloaded": 1, "skipped": 1}
    assert fake.submits == 2 and batch.spent + batch.at_risk == pytest.approx(2.8)


async def test_a_garbled_submit_answer_is_uncertain_and_never_resent(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    garbled = 0

    def garble_first(response: httpx.Response) -> httpx.Response:
        nonlocal garbled
        if garbled:
            return response
        garbled += 1
        headers = {"content-type": "application/json", "content-encoding": "gzip"}
        return httpx.Response(200, headers=headers, stream=_Garbled())

    batch = await run_with(rewriting_client(fake, garble_first), tmp_path, jobs(3))
    assert batch.counts() == {"downloaded": 2, "uncertain": 1}
    [uncertain] = [r for r in batch.records if r.state == "uncertain"]
    assert isinstance(uncertain.exception, SubmissionUncertainError)
    assert "DecodingError" in str(uncertain.exception) and batch.at_risk == 1.4
    assert fake.submits == 3 and fake.duplicate_submits == 0
    again = await run(fake, tmp_path, jobs(3))
    assert again.counts() == {"downloaded": 2, "uncertain": 1}
    assert fake.submits == 3 and fake.duplicate_submits == 0


@pytest.mark.parametrize("cost", [math.nan, math.inf, -5.0, "lots", 1e300])
async def test_a_garbled_cost_never_switches_the_budget_off(cost: Any, tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)

    def with_cost(response: httpx.Response) -> httpx.Response:
        answer = json.loads(response.content)  # NaN and Infinity parse, as they may
        answer["cost"] = cost
        return httpx.Response(200, content=json.dumps(answer).encode(), headers=response.headers)

    batch = await run_with(rewriting_client(fake, with_cost), tmp_path, jobs(6), max_cost=5.0)
    assert math.isfinite(batch.spent)
    json.loads((tmp_path / "manifest.json").read_text(), parse_constant=pytest.fail)
    if cost == 1e300:  # a real (if absurd) charge: the budget is spent
        assert 1 <= fake.submits <= 3 and batch.spent >= 1e300
    else:  # counted at the catalog's price
        assert batch.counts() == {"downloaded": 3, "skipped": 3} and fake.submits == 3
        assert batch.spent == pytest.approx(4.2)
        assert {r.cost for r in batch.records if r.ok} == {1.4}
    submits = fake.submits
    again = await run(fake, tmp_path, jobs(6), max_cost=5.0)
    assert fake.submits == submits and again.spent == batch.spent


async def test_unlisted_uncertain_and_paid_jobs_still_count(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    fake.fail_next("submit", "drop_after")  # the task is created, its answer lost
    first = await run(fake, tmp_path, jobs(4))
    assert first.counts() == {"downloaded": 3, "uncertain": 1}
    [lost] = [r.index for r in first.records if r.state == "uncertain"]
    removed = next(r.index for r in first.records if r.ok)
    kept = [job for n, job in enumerate(jobs(4)) if n not in (lost, removed)]
    again = await run(fake, tmp_path, kept)
    assert fake.submits == 4
    assert [(r.listed, r.state) for r in again.records] == [
        (True, "downloaded"), (True, "downloaded"), (False, "uncertain")
    ]  # fmt: skip
    assert again.records[2].key == first.records[lost].key
    assert again.at_risk == 1.4 and again.spent == pytest.approx(3 * 1.4)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["uncertain_credits"] == 1.4
    assert [(j["listed"], j["state"]) for j in manifest["jobs"]][-1] == (False, "uncertain")
    # The budget sees it all: 3 paid + 1 at risk leaves no room for a new 1.4 job.
    new = await run(fake, tmp_path, [*kept, *jobs(1, seed=7)], max_cost=6.9)
    assert new.counts() == {"downloaded": 2, "skipped": 1, "uncertain": 1}
    # Asked to resubmit, an unlisted job is not sent: it is not in the list any more.
    again = await run(fake, tmp_path, kept, resubmit_uncertain=True)
    assert again.records[2].state == "uncertain" and fake.submits == 4


@pytest.mark.parametrize("how", ["stopped", "budget", "file exists", "not sent"])
async def test_resubmitting_an_uncertain_job_that_is_not_sent_keeps_it_uncertain(
    how: str, tmp_path: Path
) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "n"}]
    fake.fail_next("submit", "drop_after")
    first = await run(fake, tmp_path, job_list)
    assert first.counts() == {"uncertain": 1} and fake.submits == 1
    options: dict[str, Any] = {"resubmit_uncertain": True}
    client = client_for(fake)
    if how == "budget":
        options["max_cost"] = 1.0
    elif how == "file exists":
        (tmp_path / "n.png").write_bytes(b"mine")
    elif how == "not sent":
        client = client_for(fake, base_url="https://nowhere.invalid", submit_retries=0)
    async with client, client.batch(job_list, tmp_path, **options) as batch:
        if how == "stopped":
            batch.stop()
        async for _ in batch:
            pass
    [record] = batch.records
    assert record.state == "uncertain" and batch.at_risk == 1.4, record
    assert fake.submits == 1
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["uncertain_credits"] == 1.4
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        [(state,)] = db.execute("SELECT state FROM jobs")
    assert state == "uncertain"
    # Without the flag it stays uncertain; with it and nothing in the way, it is sent.
    assert (await run(fake, tmp_path, job_list)).counts() == {"uncertain": 1}
    (tmp_path / "n.png").unlink(missing_ok=True)
    assert (await run(fake, tmp_path, job_list, resubmit_uncertain=True)).counts() == {
        "downloaded": 1
    }
    assert fake.submits == 2


async def test_a_resubmitted_uncertain_submit_stays_at_risk_and_in_the_budget(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "n"}]
    fake.fail_next("submit", "drop_after")  # a task is created (and charged), its answer lost
    await run(fake, tmp_path, job_list)
    # Sending it again may pay twice: 1.4 at risk + 1.4 would pass a budget of 2.
    skipped = await run(fake, tmp_path, job_list, resubmit_uncertain=True, max_cost=2.0)
    assert skipped.counts() == {"uncertain": 1} and skipped.at_risk == 1.4
    assert fake.submits == 1
    again = await run(fake, tmp_path, job_list, resubmit_uncertain=True, max_cost=3.0)
    [record] = again.records
    assert record.ok and record.at_risk == 1.4 and fake.submits == 2
    assert again.spent == 1.4 and again.at_risk == 1.4  # the first task may be paid too
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["uncertain_credits"] == 1.4
    assert manifest["jobs"][0]["at_risk"] == 1.4
    later = await run(fake, tmp_path, job_list, max_cost=2.7)
    assert later.counts() == {"downloaded": 1} and later.at_risk == 1.4
    # ... and it leaves no room for another 1.4 job under 4.1 (1.4 spent + 1.4 at risk).
    more = await run(fake, tmp_path, [*job_list, *jobs(1)], max_cost=4.1)
    assert more.counts() == {"downloaded": 1, "skipped": 1} and fake.submits == 2


async def test_every_uncertain_submit_of_a_job_counts(tmp_path: Path) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "n"}]
    fake.fail_next("submit", "drop_after", count=2)
    await run(fake, tmp_path, job_list)
    again = await run(fake, tmp_path, job_list, resubmit_uncertain=True)
    assert again.counts() == {"uncertain": 1} and again.at_risk == 2.8 and fake.submits == 2
    assert (await run(fake, tmp_path, job_list)).at_risk == 2.8
    # A run killed while resubmitting leaves the row `submitting`, its risk still 2.8.
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        db.execute("UPDATE jobs SET state = 'submitting'")
    killed = await run(fake, tmp_path, job_list)
    assert killed.counts() == {"uncertain": 1} and killed.at_risk == 4.2
    assert killed.records[0].at_risk == 4.2 and fake.submits == 2


async def test_a_journal_from_before_the_risk_column_keeps_its_uncertain_jobs_at_risk(
    tmp_path: Path,
) -> None:
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        db.execute(
            "CREATE TABLE jobs (key TEXT PRIMARY KEY, position INTEGER NOT NULL, name TEXT, "
            "model TEXT NOT NULL, estimate REAL NOT NULL, state TEXT NOT NULL, task TEXT, "
            "cost REAL, sample TEXT, seed TEXT, path TEXT, error_type TEXT, error TEXT, "
            "attempts INTEGER NOT NULL DEFAULT 0, updated_at REAL NOT NULL)"
        )
        db.execute(
            "INSERT INTO jobs (key, position, name, model, estimate, state, attempts, "
            "updated_at) VALUES ('name:n', 0, 'n', 'flux-2-klein-4b', 1.4, 'uncertain', 1, 0)"
        )
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "n"}]
    batch = await run(fake, tmp_path, job_list, resubmit_uncertain=True)
    assert batch.counts() == {"downloaded": 1} and batch.at_risk == 1.4 and fake.submits == 1
    journal = await Journal.open(tmp_path / Batch.journal_name)
    try:
        assert (await journal.load())["name:n"].risk == 1.4
    finally:
        await journal.aclose()


@BOTH
@pytest.mark.parametrize("abandon", [False, True])
async def test_stop_waits_for_a_submit_on_its_way_unless_told_to_abandon_it(
    abandon: bool, never_fake: FakeBFL, tmp_path: Path
) -> None:
    fake = never_fake
    fake.slow_seconds = 1.0
    fake.fail_next("submit", "slow")  # BFL holds the POST (the task is created at once)
    async with client_for(fake) as client, client.batch(jobs(1), tmp_path) as batch:

        async def stop_while_posting() -> None:
            while fake.submits < 1:
                await anyio.sleep(0.001)
            batch.stop(grace=0, abandon=abandon)

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_while_posting)
            [record] = [record async for record in batch]
    if abandon:  # not waited for: nobody knows whether it was paid
        assert record.state == "uncertain" and batch.at_risk == 1.4
        assert isinstance(record.exception, SubmissionUncertainError)
        assert "abandoned" in str(record.exception)
    else:  # its answer came: the paid handle is kept for the next run
        assert record.state == "submitted" and record.task is not None
        assert batch.at_risk == 0 and batch.spent == 1.4
    assert fake.submits == 1


@BOTH
@pytest.mark.parametrize("refused_first", [False, True])
async def test_a_client_closed_before_the_post_leaves_the_job_unpaid(
    refused_first: bool, tmp_path: Path
) -> None:
    fake = FakeBFL(generation_time=0.01)
    if refused_first:
        fake.fail_next("submit", "503")  # refused: nothing created, the submit is retried
    async with client_for(fake) as client, client.batch(jobs(1), tmp_path) as batch:
        journal_it = batch._before_send

        async def then_close(job: _Job) -> None:
            await journal_it(job)  # `submitting` is journaled...
            if job.attempts == 1 + refused_first:
                await client.aclose()  # ... and the app shuts the client down before the POST

        batch._before_send = then_close  # type: ignore[method-assign]
        [record] = [record async for record in batch]
    assert fake.submits == 0
    assert record.state == "failed" and batch.at_risk == 0  # resubmitted by the next run
    assert "closed" in (record.error or "")


@pytest.mark.parametrize("resubmitted", [False, True], ids=["new", "uncertain before"])
async def test_a_refused_attempt_is_journaled_unpaid_while_the_retry_waits(
    resubmitted: bool, tmp_path: Path
) -> None:
    """Killed while waiting to retry a refused submit, the batch must come back with the job
    as it was before the attempt (nothing was paid), not `submitting` (uncertain, at risk)."""
    fake = FakeBFL(generation_time=0.01)
    job_list = jobs(1)
    if resubmitted:
        fake.fail_next("submit", "drop_after")
        assert (await run(fake, tmp_path, job_list)).counts() == {"uncertain": 1}
    fake.fail_next("submit", "503")  # refused: nothing created, the submit is retried
    seen: list[str] = []
    async with (
        client_for(fake) as client,
        client.batch(job_list, tmp_path, resubmit_uncertain=resubmitted) as batch,
    ):
        journal_it = batch._before_send

        async def look_then_journal(job: _Job) -> None:
            assert batch._journal is not None
            # Before each attempt, the retry's included: what a process killed now would leave.
            seen.append((await batch._journal.load())[job.key].state)
            await journal_it(job)

        batch._before_send = look_then_journal  # type: ignore[method-assign]
        [record] = [record async for record in batch]
    before = "uncertain" if resubmitted else "queued"
    assert seen == [before, before]
    assert record.state == "downloaded"


async def test_a_cancelled_caller_never_skips_a_journal_write(tmp_path: Path) -> None:
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        await journal.add([JobRow("k", 0, None, "flux-2-pro", 3.0, "queued")])
        with anyio.CancelScope() as scope:
            scope.cancel()
            await journal.update("k", state="submitting")
        assert (await journal.load())["k"].state == "submitting"
    finally:
        await journal.aclose()


async def test_a_full_disk_is_reported_as_such_and_the_journal_works_again_after(
    tmp_path: Path,
) -> None:
    journal = await Journal.open(tmp_path / "j.sqlite")
    try:
        await journal.add([JobRow("k", 0, None, "flux-2-pro", 3.0, "queued")])
        # No room to grow: SQLite fails the write with SQLITE_FULL and rolls back itself.
        [(pages,)] = journal._db.execute("PRAGMA page_count")
        journal._db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(sqlite3.OperationalError, match="full"):  # not "cannot rollback"
            await journal.update("k", state="uncertain", error="x" * 100_000)
        journal._db.execute("PRAGMA max_page_count = 1073741823")  # room again
        await journal.update("k", state="uncertain", error="y" * 100_000)
        assert (await journal.load())["k"].error == "y" * 100_000
    finally:
        await journal.aclose()


def test_job_reprs_leave_out_bodies_and_signed_urls() -> None:
    body = {"prompt": "x", "webhook_secret": "hush-SECRET"}
    record = JobRecord(0, "k", None, "flux-2-pro", "queued", 3.0)
    job = _Job(0, "k", None, None, body, body, 3.0, record, sample="https://d/x?sig=SIG")
    row = JobRow("k", 0, None, "flux-2-pro", 3.0, "ready", sample="https://d/x?sig=SIG")
    for text in (repr(job), repr(row)):
        assert "hush-SECRET" not in text and "SIG" not in text


@pytest.mark.parametrize("bfl_says", ["expired", "Task not found"])
async def test_an_image_saved_just_before_a_crash_is_not_reported_lost(
    bfl_says: str, tmp_path: Path
) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [*jobs(1), {"model": "flux-2-klein-4b", "prompt": "x", "name": "fox"}]
    first = await run(fake, tmp_path, job_list)
    assert first.counts() == {"downloaded": 2}
    saved = {r.key: r.path for r in first.records}
    # Killed (a power cut...) after each image was moved into place, before the journal
    # said `downloaded`; the next run comes after BFL's result URLs expired.
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        for key, task in list(db.execute("SELECT key, task FROM jobs")):
            expired = fake.sign_url(Task.model_validate_json(task).id, expires_at=time.time() - 60)
            db.execute(
                "UPDATE jobs SET state = 'ready', path = NULL, sample = ? WHERE key = ?",
                (expired, key),
            )
    if bfl_says == "expired":
        fake.result_ttl = 0.0  # polled again, BFL answers with the same expired URL
    else:
        fake.tasks.clear()  # polled again, BFL no longer knows the tasks
    files = {path: (path.stat().st_ino, path.read_bytes()) for path in saved.values() if path}
    again = await run(fake, tmp_path, job_list)
    assert again.counts() == {"downloaded": 2}  # not `expired` or `failed`: they are there
    assert {r.key: r.path for r in again.records} == saved
    # The very files saved before: neither replaced nor rewritten (an expired URL may be
    # asked for once more, as the delivery host alone knows whether it expired).
    assert {path: (path.stat().st_ino, path.read_bytes()) for path in files} == files
    assert fake.submits == 2
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        assert {state for (state,) in db.execute("SELECT state FROM jobs")} == {"downloaded"}
    # A job whose image is not there is still `expired`.
    for path in saved.values():
        assert path is not None
        path.unlink()
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        db.execute("UPDATE jobs SET state = 'ready', path = NULL")
    lost = "expired" if bfl_says == "expired" else "failed"
    assert (await run(fake, tmp_path, job_list)).counts() == {lost: 2}


async def test_a_batch_syncs_each_image_before_journaling_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeBFL(generation_time=0.01)
    synced: list[str] = []

    def sync_directory(directory: Path) -> None:
        with sqlite3.connect(tmp_path / Batch.journal_name) as db:
            synced.extend(state for (state,) in db.execute("SELECT state FROM jobs"))

    monkeypatch.setattr(_download, "_sync_directory", sync_directory)
    batch = await run(fake, tmp_path, jobs(2))
    assert batch.counts() == {"downloaded": 2}
    assert len(synced) == 4 and "downloaded" not in synced[:2]


async def test_a_manifest_that_cannot_be_written_still_lets_the_next_run_in(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(generation_time=0.01)
    (tmp_path / Batch.manifest_name).mkdir()  # the manifest cannot replace it (a full disk...)
    with pytest.raises(OSError):
        await run(fake, tmp_path, jobs(2))
    (tmp_path / Batch.manifest_name).rmdir()
    # The journal was closed all the same: the same process runs the batch again at once.
    again = await run(fake, tmp_path, jobs(2))
    assert again.counts() == {"downloaded": 2} and fake.submits == 2


@BOTH
async def test_a_second_run_of_a_batch_in_progress_is_refused_and_pays_nothing(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(generation_time=0.05)
    async with client_for(fake) as client, client.batch(jobs(4), tmp_path) as first:
        with pytest.raises(BatchInUseError) as info:
            async with client.batch(jobs(4), tmp_path):
                pass
        assert info.value.journal == str(tmp_path / Batch.journal_name)
        async for _ in first:
            pass
    assert first.counts() == {"downloaded": 4}
    assert fake.submits == 4  # not 8: the second run sent nothing
    assert (await run(fake, tmp_path, jobs(4))).counts() == {"downloaded": 4}  # then resumes
    assert fake.submits == 4


async def test_a_directory_that_takes_no_files_is_not_called_in_use(
    unwritable_dir: Path,
) -> None:
    fake = FakeBFL(generation_time=0.05)
    async with client_for(fake) as client:
        with pytest.raises(OSError) as caught:
            async with client.batch(jobs(1), unwritable_dir):
                pass
    assert not isinstance(caught.value, BatchInUseError) and fake.submits == 0


async def test_a_journal_held_by_another_process_is_refused_until_it_dies(
    tmp_path: Path,
) -> None:
    path = tmp_path / Batch.journal_name
    code = (
        "import anyio, sys, pathlib\n"
        "from bfl_async._journal import Journal\n"
        "async def main():\n"
        "    journal = await Journal.open(pathlib.Path(sys.argv[1]))\n"
        "    print('open', flush=True)\n"
        "    await anyio.sleep(60)\n"
        "anyio.run(main)\n"
    )
    async with await anyio.open_process([sys.executable, "-c", code, str(path)]) as holder:
        assert holder.stdout is not None
        said = BufferedByteReceiveStream(holder.stdout)
        assert await said.receive_until(b"\n", 100) == b"open"
        with pytest.raises(BatchInUseError):
            await Journal.open(path)
        holder.kill()  # a crash: the lock goes with the process
        await holder.wait()
    journal = await Journal.open(path)
    await journal.aclose()


async def test_a_stop_while_submitting_is_journaled_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writing = threading.Event()
    update = Journal._update

    def slow_update(self: Journal, key: str, values: dict[str, Any]) -> None:
        if values.get("state") == "submitting":
            writing.set()
            time.sleep(0.2)  # a slow disk: the stop lands meanwhile
        update(self, key, values)

    monkeypatch.setattr(Journal, "_update", slow_update)
    fake = FakeBFL(generation_time=0.01)
    async with client_for(fake) as client, client.batch(jobs(1), tmp_path) as batch:

        async def stop_while_writing() -> None:
            while not writing.is_set():
                await anyio.sleep(0.001)
            batch.stop()

        async with anyio.create_task_group() as tg:
            tg.start_soon(stop_while_writing)
            async for _ in batch:
                pass
    assert fake.submits == 0 and batch.counts() == {"queued": 1}


async def test_a_batch_run_on_a_local_fake_is_not_taken_for_one_on_bfl(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.01) as local:  # on loopback, as `bfl batch --fake`
        options = {"base_url": local.base_url, "http_client": None}
        async with client_for(local, **options) as client, client.batch(jobs(2), tmp_path) as first:
            async for _ in first:
                pass
    bfl = FakeBFL()  # answers under BFL's own names, as the real API would
    with pytest.raises(BatchInUseError, match="another API") as caught:
        await run(bfl, tmp_path, jobs(2))  # its placeholders would pass for paid images
    assert (caught.value.api or "").startswith("http://127.0.0.1") and bfl.submits == 0
    async with FakeBFL(generation_time=0.01) as local:  # another fake: resumes, pays nothing
        options = {"base_url": local.base_url, "http_client": None}
        async with client_for(local, **options) as client, client.batch(jobs(2), tmp_path) as again:
            async for _ in again:
                pass
        assert again.counts() == {"downloaded": 2} and local.submits == 0


# --- one job's trouble: reported, never silent, never the client's --------------------------


@BOTH
async def test_a_journal_that_fails_mid_run_stops_the_batch_and_raises_from_its_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A journal write that fails after the submit (a full disk, an I/O error) used to end
    # the loop early with no error and jobs unreported; the error escaped later from the
    # client's exit as nested ExceptionGroups, having cancelled all of the client's work.
    fake = FakeBFL(generation_time=0.01)
    original = Journal._update
    failed: list[str] = []

    def failing_once(self: Journal, key: str, values: dict[str, Any]) -> None:
        if values.get("state") == "ready" and not failed:
            failed.append(key)
            raise sqlite3.OperationalError("disk I/O error")
        original(self, key, values)

    monkeypatch.setattr(Journal, "_update", failing_once)
    seen: list[JobRecord] = []
    async with client_for(fake, limits={"standard": 2}) as client:
        with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
            async with client.batch(jobs(4), tmp_path) as batch:
                async for record in batch:
                    seen.append(record)
        # Every job was reported, and the client is still of use.
        assert sorted(r.key for r in seen) == sorted(r.key for r in batch.records)
        [broken] = [r for r in batch.records if r.key == failed[0]]
        assert broken.state == "submitted" and broken.task is not None
        image = await client.generate("flux-2-klein-4b", prompt="after", output_dir=tmp_path)
        assert image.path.is_file()
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["states"] == batch.counts()
    monkeypatch.undo()
    submits, unsent = fake.submits, batch.counts().get("queued", 0)
    again = await run(fake, tmp_path, jobs(4))  # the journal agrees: nothing paid twice
    assert again.counts() == {"downloaded": 4} and fake.submits == submits + unsent
    assert fake.duplicate_submits == 0


class _BadSample(httpx.AsyncBaseTransport):
    """The fake in memory, with the first `count` Ready answers' result URL made unusable."""

    def __init__(self, fake: FakeBFL, sample: str, count: int = 1) -> None:
        self._inner = fake.transport()
        self._sample = sample
        self.left = count

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self._inner.handle_async_request(request)
        if request.method != "GET" or "get_result" not in str(request.url):
            return response
        await response.aread()
        answer = json.loads(response.content)
        if answer.get("status") != "Ready" or self.left <= 0:
            return response
        self.left -= 1
        answer["result"]["sample"] = self._sample
        return httpx.Response(200, json=answer, headers={"retry-after": "1"})


@pytest.mark.parametrize("sample", ["https://delivery.bfl.ai:port/x.jpg", "https://[bad]/x.jpg"])
async def test_an_unusable_result_url_keeps_its_job_ready_and_the_batch_going(
    sample: str, tmp_path: Path
) -> None:
    fake = FakeBFL(generation_time=0.01)
    bad = _BadSample(fake, sample)
    client = client_for(fake, http_client=httpx.AsyncClient(transport=bad))
    batch = await run_with(client, tmp_path, jobs(3))
    assert batch.counts() == {"downloaded": 2, "ready": 1} and bad.left == 0
    [kept] = [r for r in batch.records if r.state == "ready"]
    assert kept.task is not None and kept.error is not None
    # The next run asks BFL again for the URL it saved, and saves the paid image.
    again = await run(fake, tmp_path, jobs(3))
    assert again.counts() == {"downloaded": 3} and fake.submits == 3


async def test_names_one_file_system_takes_for_one_file_are_refused_before_paying(
    tmp_path: Path,
) -> None:
    # On Windows and macOS "Fox" and "fox" (or "café" composed and decomposed) are one file:
    # both were paid for, and the second image overwrote the first or was left behind.
    fake = FakeBFL(generation_time=0.01)
    names = ["Fox", "fox", "caf\u00e9", "cafe\u0301", "FOX", "wolf"]
    job_list = [{"model": "flux-2-klein-4b", "prompt": n, "name": n} for n in names]
    batch = await run(fake, tmp_path, job_list)
    assert [r.state for r in batch.records] == [
        "downloaded", "failed", "downloaded", "failed", "failed", "downloaded"
    ]  # fmt: skip
    for record in (batch.records[1], batch.records[3], batch.records[4]):
        assert isinstance(record.exception, ParameterError) and record.task is None
        assert "same file" in str(record.exception)
    assert fake.submits == 3


async def test_an_image_saved_before_a_crash_survives_a_failed_poll_for_a_fresh_url(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "fox"}]
    first = await run(fake, tmp_path, job_list)
    [saved] = [r.path for r in first.records]
    assert saved is not None and saved.is_file()
    # Killed after the image was moved into place, before the journal said `downloaded`;
    # the next run comes after the URL expired, and its poll for a fresh one fails.
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        [(task,)] = db.execute("SELECT task FROM jobs")
        expired = fake.sign_url(Task.model_validate_json(task).id, expires_at=time.time() - 60)
        db.execute("UPDATE jobs SET state = 'ready', path = NULL, sample = ?", (expired,))
    key, fake.api_key = fake.api_key, "revoked"  # the key we poll with is refused
    failed = await run_with(client_for(fake, api_key=key), tmp_path, job_list)
    assert failed.records[0].error_type == "AuthenticationError"
    assert failed.records[0].state == "ready"  # not `submitted`: its image may be there
    fake.api_key = key
    fake.result_ttl = 0.0  # polled again, BFL answers with an expired URL
    again = await run(fake, tmp_path, job_list)
    assert again.counts() == {"downloaded": 1} and again.records[0].path == saved
    assert fake.submits == 1


async def test_a_journal_write_whose_commit_failed_does_not_break_every_later_one(
    tmp_path: Path,
) -> None:
    # A COMMIT refused as busy (a journal SQLite could not put in WAL mode, read meanwhile
    # by another program) leaves its transaction open: every later write then failed with
    # "cannot start a transaction within a transaction", for the rest of the run.
    path = tmp_path / "j.sqlite"
    journal = await Journal.open(path)
    try:
        await journal.add([JobRow("k", 0, None, "flux-2-pro", 3.0, "queued")])
        journal._db.execute("PRAGMA journal_mode=DELETE")
        journal._db.execute("PRAGMA busy_timeout=0")
        reader = sqlite3.connect(path, isolation_level=None)
        try:
            reader.execute("BEGIN")
            reader.execute("SELECT key FROM jobs").fetchall()  # its lock keeps COMMIT waiting
            with pytest.raises(sqlite3.OperationalError, match="locked"):
                await journal.update("k", state="submitting")
        finally:
            reader.close()
        assert not journal._db.in_transaction
        await journal.update("k", state="submitted", task="{}")
        assert (await journal.load())["k"].state == "submitted"
    finally:
        await journal.aclose()


@pytest.mark.parametrize("then", ["removed", "edited"])
async def test_a_submit_cut_short_counts_the_price_of_the_request_it_sent(
    then: str, tmp_path: Path
) -> None:
    # A named job is known by its name: its model may change between runs. A run killed
    # while its submit was on its way must count that submit's price at risk, not the price
    # the job had when first listed, nor the one it has now.
    fake = FakeBFL(generation_time=0.01)
    klein = {"model": "flux-2-klein-4b", "prompt": "x", "name": "hero", "width": 256, "height": 256}
    pro = {**klein, "model": "flux-2-pro"}
    assert (await run(fake, tmp_path, [klein], max_cost=1.0)).counts() == {"skipped": 1}
    sent = await run(fake, tmp_path, [pro])  # edited, then sent at the pro model's price
    assert sent.counts() == {"downloaded": 1} and sent.records[0].estimate == 3.0
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:  # killed in its submit
        db.execute("UPDATE jobs SET state = 'submitting', task = NULL, cost = NULL, path = NULL")
    again = await run(fake, tmp_path, [klein] if then == "edited" else [])
    assert again.counts() == {"uncertain": 1} and again.at_risk == 3.0
    assert fake.submits == 1


@pytest.mark.parametrize("timeout", [-1.0, 0.0, math.nan])
async def test_a_timeout_no_job_could_meet_is_refused_before_paying(
    timeout: float, tmp_path: Path
) -> None:
    # Every job would be paid for and then given up at once, its image left to expire.
    fake = FakeBFL(generation_time=0.01)
    async with client_for(fake) as client:
        with pytest.raises(ValueError, match="timeout"):
            client.batch(jobs(2), tmp_path, timeout=timeout)
    assert fake.submits == 0


async def test_entering_a_batch_again_is_refused_and_leaves_its_manifest_right(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(generation_time=0.01)
    async with client_for(fake) as client:
        batch = client.batch(jobs(2), tmp_path)
        async with batch:
            async for _ in batch:
                pass
        with pytest.raises(RuntimeError, match="runs once"):
            async with batch:  # planned again, every job and credit was counted twice
                pass
    assert len(batch.records) == 2 and batch.spent == 2.8
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["summary"]["jobs"] == 2 and manifest["summary"]["spent_credits"] == 2.8


async def test_a_file_that_takes_the_name_while_its_task_runs_is_never_overwritten(
    tmp_path: Path,
) -> None:
    # The image was kept beside the file, and the job left `ready`: the next run took the
    # file for one an earlier run had saved, and overwrote it (or, its URL expired, reported
    # it as the job's image).
    fake = FakeBFL(generation_time=0.01)

    def someone_writes_it(model: str, body: dict[str, Any]) -> str:
        (tmp_path / "fox.jpg").write_bytes(b"theirs")
        return "Ready"

    fake.outcome = someone_writes_it
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "fox"}]
    first = await run(fake, tmp_path, job_list)
    [record] = first.records
    assert record.state == "failed" and record.error_type == "OutputExistsError"
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("fox.") and p.suffix == ".part"]
    assert len(kept) == 1 and str(kept[0]) in (record.error or "")  # the paid image, kept
    fake.outcome = None
    for ttl in (600.0, 0.0):  # its URL still valid, then expired
        fake.result_ttl = ttl
        again = await run(fake, tmp_path, job_list)
        assert again.counts() == {"failed": 1} and again.records[0].path is None
        assert (tmp_path / "fox.jpg").read_bytes() == b"theirs"
    assert fake.submits == 1


async def test_part_files_a_killed_download_left_are_removed_once_the_image_is_saved(
    tmp_path: Path,
) -> None:
    fake = FakeBFL(generation_time=0.01)
    job_list = [{"model": "flux-2-klein-4b", "prompt": "x", "name": "fox"}]
    assert (await run(fake, tmp_path, job_list)).counts() == {"downloaded": 1}
    # Killed mid-download: the journal still says `ready`, and the part file stays.
    with sqlite3.connect(tmp_path / Batch.journal_name) as db:
        db.execute("UPDATE jobs SET state = 'ready', path = NULL")
    left = tmp_path / "fox.0123abcd.part"
    left.write_bytes(b"\x89PNG half an image")
    others = [tmp_path / "foxy.0123abcd.part", tmp_path / "fox.notours.part"]
    for path in others:
        path.write_bytes(b"not ours")
    again = await run(fake, tmp_path, job_list)
    assert again.counts() == {"downloaded": 1}
    assert not left.exists() and all(path.exists() for path in others)
    assert fake.submits == 1
