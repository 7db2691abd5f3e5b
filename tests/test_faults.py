"""The fault matrix: batches against FakeBFL's injected faults over real loopback HTTP.

Each case checks the batch's guarantees: every image paid for is saved (or, when the
answer that named its task was lost, its job is `uncertain`), no job is submitted twice
(the fake's ledger), and every job that truly failed carries a typed error.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Any

import httpx
import pytest

from bfl_async import (
    AsyncBFL,
    AuthenticationError,
    Backoff,
    Batch,
    BFLError,
    DownloadRefusedError,
    InsufficientCreditsError,
    SubmissionUncertainError,
)
from bfl_async._journal import Journal
from bfl_async.testing import FakeBFL, Fault, FaultKind

pytestmark = pytest.mark.anyio

JOBS = 6
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"RIFF")


def jobs(count: int = JOBS) -> list[dict[str, Any]]:
    return [
        {"model": "flux-2-klein-4b", "prompt": f"job {n}", "width": 256, "height": 256}
        for n in range(count)
    ]


def client_for(fake: FakeBFL, **kwargs: Any) -> AsyncBFL:
    options: dict[str, Any] = {
        "api_key": fake.api_key,
        "base_url": fake.base_url,
        "poll_schedule": Backoff(initial=0.01, factor=1.5, maximum=0.02, jitter=0.1),
        "retry_base_delay": 0.01,
        "poll_rate": None,
        "close_grace": 0.0,
        "timeout": httpx.Timeout(2.0),
    }
    return AsyncBFL(**{**options, **kwargs})


async def run(
    fake: FakeBFL, out: Path, job_list: list[dict[str, Any]] | None = None, **options: Any
) -> Batch:
    client_options = {
        k: options.pop(k) for k in list(options) if k in ("api_key", "max_download_bytes")
    }
    async with (
        client_for(fake, **client_options) as client,
        client.batch(job_list or jobs(), out, **options) as batch,
    ):
        async for _ in batch:
            pass
    return batch


def check(fake: FakeBFL, batch: Batch, *, lost: int = 0) -> None:
    """The guarantees, whatever the faults were."""
    assert fake.duplicate_submits == 0
    prompts = collections.Counter(task.body["prompt"] for task in fake.tasks.values())
    assert max(prompts.values(), default=0) <= 1, "a job was submitted twice"
    known = {r.task.id: r for r in batch.records if r.task is not None}
    unknown = [t for t in fake.tasks.values() if t.id not in known]
    uncertain = [r for r in batch.records if r.state == "uncertain"]
    # A task the client never heard of can only come from a submit it reports uncertain.
    assert len(unknown) == lost <= len(uncertain)
    for record in batch.records:
        if record.state == "downloaded":
            assert record.path is not None and record.path.is_file()
            assert record.path.read_bytes().startswith(IMAGE_MAGIC)
        else:
            assert record.error, record
            assert isinstance(record.exception, BFLError), record
    for task_id, record in known.items():
        if fake.tasks[task_id].final_status == "Ready" and record.state != "downloaded":
            assert record.state in ("ready", "submitted", "expired"), record


async def test_a_clean_batch_downloads_everything(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02) as fake:
        batch = await run(fake, tmp_path)
    check(fake, batch)
    assert batch.counts() == {"downloaded": JOBS}
    assert fake.submits == JOBS


# --- submit -----------------------------------------------------------------------------


async def test_submits_refused_before_any_task_are_retried(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02) as fake:
        fake.fail_next("submit", "503", count=3)
        batch = await run(fake, tmp_path)
    check(fake, batch)
    assert fake.submit_attempts == JOBS + 3
    assert batch.counts() == {"downloaded": JOBS}


@pytest.mark.parametrize(
    ("fault", "creates_task"),
    [
        ("500", False),
        ("502", False),
        ("drop_before", False),
        ("drop_after", True),
        ("slow", True),
        ("malformed", True),
        ("incomplete", True),
    ],
)
async def test_a_submit_that_may_have_reached_bfl_is_uncertain_never_resent(
    fault: Fault, creates_task: bool, tmp_path: Path
) -> None:
    async with FakeBFL(generation_time=0.02, slow_seconds=3.0) as fake:
        fake.fail_next("submit", fault)
        batch = await run(fake, tmp_path)
        check(fake, batch, lost=int(creates_task))
        assert batch.counts() == {"downloaded": JOBS - 1, "uncertain": 1}
        [uncertain] = [r for r in batch.records if r.state == "uncertain"]
        assert isinstance(uncertain.exception, SubmissionUncertainError)
        attempts = fake.submit_attempts
        # A rerun leaves it alone...
        again = await run(fake, tmp_path)
        assert fake.submit_attempts == attempts
        assert again.counts() == {"downloaded": JOBS - 1, "uncertain": 1}
        # ...unless asked to resubmit it.
        final = await run(fake, tmp_path, resubmit_uncertain=True)
    assert final.counts() == {"downloaded": JOBS}
    assert fake.submits == JOBS + int(creates_task)
    assert fake.duplicate_submits == int(creates_task)  # the one the user asked for


async def test_a_huge_submit_answer_with_extra_fields_is_accepted(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02, huge_bytes=4 << 20) as fake:
        fake.fail_next("submit", "huge", count=2)
        batch = await run(fake, tmp_path)
    check(fake, batch)
    assert batch.counts() == {"downloaded": JOBS}


async def test_a_429_storm_is_waited_out(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.05, limits={"standard": 2}) as fake:
        batch = await run(fake, tmp_path, jobs(10))
    check(fake, batch)
    assert batch.counts() == {"downloaded": 10}
    assert fake.peak_in_flight["standard"] <= 2


async def test_running_out_of_credits_mid_batch_fails_the_rest_unpaid(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02, credits=1.5 * 3) as fake:
        batch = await run(fake, tmp_path)
        check(fake, batch)
        assert batch.counts() == {"downloaded": 3, "failed": 3}
        for record in batch.records:
            if record.state == "failed":
                assert isinstance(record.exception, InsufficientCreditsError)
                assert record.task is None
        fake.credits = 100.0
        rest = await run(fake, tmp_path)
    check(fake, rest)
    assert rest.counts() == {"downloaded": JOBS}
    assert fake.submits == JOBS


async def test_a_key_revoked_mid_batch_keeps_every_paid_task_for_the_next_run(
    tmp_path: Path,
) -> None:
    async with FakeBFL(generation_time=0.3) as fake:
        valid = fake.api_key

        def revoke_after_three(model: str, body: dict[str, Any]) -> str:
            if fake.submits == 2:  # this is the third
                fake.api_key = "revoked"
            return "Ready"

        fake.outcome = revoke_after_three
        batch = await run(fake, tmp_path, api_key=valid)
        check(fake, batch)
        paid = [r for r in batch.records if r.task is not None]
        assert len(paid) == 3 and fake.submits == 3
        for record in batch.records:
            assert record.state != "downloaded"
            assert isinstance(record.exception, AuthenticationError)
            assert record.state == ("submitted" if record.task else "failed")
        fake.api_key = valid
        fake.outcome = None
        rest = await run(fake, tmp_path, api_key=valid)
    check(fake, rest)
    assert rest.counts() == {"downloaded": JOBS}
    assert fake.submits == JOBS  # the three paid tasks were watched again, not resent


# --- poll -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        "500",
        "502",
        "503",
        "drop_before",
        "drop_after",
        "truncate",
        "slow",
        "malformed",
        "huge",
        "incomplete",
        "unknown_status",
    ],
)
async def test_poll_faults_are_retried(fault: Fault, tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02, slow_seconds=3.0, huge_bytes=2 << 20) as fake:
        fake.fail_next("poll", fault, count=2)
        batch = await run(fake, tmp_path)
    check(fake, batch)
    assert batch.counts() == {"downloaded": JOBS}


# --- download ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault", ["500", "502", "503", "drop_before", "drop_after", "truncate", "slow"]
)
async def test_download_faults_are_retried(fault: Fault, tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02, slow_seconds=3.0) as fake:
        fake.fail_next("download", fault, count=2)
        batch = await run(fake, tmp_path)
    check(fake, batch)
    assert batch.counts() == {"downloaded": JOBS}


async def test_a_refusal_before_the_url_expires_is_tried_again(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02) as fake:
        fake.fail_next("download", "expired")  # a 403, though the URL's `se=` is ahead
        batch = await run(fake, tmp_path)
    check(fake, batch)
    assert batch.counts() == {"downloaded": JOBS}


async def test_a_refusal_that_lasts_leaves_the_paid_job_ready_for_the_next_run(
    tmp_path: Path,
) -> None:
    async with FakeBFL(generation_time=0.02) as fake:
        fake.fail_next("download", "expired", count=3)  # every attempt of the one job
        first = await run(fake, tmp_path, jobs(1))
        assert first.counts() == {"ready": 1}
        [record] = first.records
        assert "HTTP 403 before the URL's expiry" in (record.error or "")
        second = await run(fake, tmp_path, jobs(1))
    check(fake, second)
    assert second.counts() == {"downloaded": 1} and fake.submits == 1


async def test_an_expired_url_saved_by_an_earlier_run_is_asked_for_again(tmp_path: Path) -> None:
    async with FakeBFL(generation_time=0.02) as fake:
        fake.fail_next("download", "malformed", count=JOBS)  # every download refused
        first = await run(fake, tmp_path)
        assert first.counts() == {"ready": JOBS}
        # The URLs expire now, whatever the time the first run took: the fake signs them
        # (and every URL it gives from now on) with an expiry already past.
        fake.result_ttl = -3600.0
        journal = await Journal.open(tmp_path / Batch.journal_name)
        try:
            for record in first.records:
                assert record.task is not None
                await journal.update(record.key, sample=fake.sign_url(record.task.id))
        finally:
            await journal.aclose()
        polls = fake.polls
        second = await run(fake, tmp_path)
    check(fake, second)
    assert second.counts() == {"expired": JOBS}
    assert fake.polls >= polls + JOBS  # the saved URLs had expired: BFL was asked again


@pytest.mark.parametrize("kind", ["not an image", "too large"])
async def test_a_refused_download_keeps_the_paid_task_for_the_next_run(
    kind: str, tmp_path: Path
) -> None:
    image_bytes = 300_000 if kind == "too large" else None
    async with FakeBFL(generation_time=0.02, image_bytes=image_bytes) as fake:
        if kind == "not an image":
            fake.fail_next("download", "malformed")
        batch = await run(fake, tmp_path, max_download_bytes=200_000)
        check(fake, batch)
        refused = [r for r in batch.records if r.state == "ready"]
        assert len(refused) == (1 if kind == "not an image" else JOBS)
        for record in refused:
            assert isinstance(record.exception, DownloadRefusedError) and record.task
        assert not list(tmp_path.glob("*.part"))
        submits = fake.submits
        again = await run(fake, tmp_path, max_download_bytes=1 << 20)
    check(fake, again)
    assert again.counts() == {"downloaded": JOBS}
    assert fake.submits == submits


async def test_the_matrix_kinds_are_all_known_to_the_fake() -> None:
    fake = FakeBFL()
    kinds: tuple[FaultKind, ...] = ("submit", "poll", "download")
    for kind in kinds:
        fake.fail_next(kind, "500")
    with pytest.raises(ValueError, match="polls only"):
        fake.fail_next("submit", "unknown_status")
