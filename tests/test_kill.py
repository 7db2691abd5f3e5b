"""SIGKILL a running `bfl batch`, run it again, and check that nothing was paid twice or lost.

The fake runs in this process (on a background event loop) so its ledger outlives the
killed command. Set BFL_KILL_RUNS=20 to repeat each variant with 20 different kill points.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from anyio.from_thread import start_blocking_portal

from bfl_async.testing import FakeBFL

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

ROOT = Path(__file__).resolve().parent.parent
JOBS = 60
KEY = "kill-test-key-SECRET-51d0"
RUNS = int(os.environ.get("BFL_KILL_RUNS", "1"))
IMAGE_SUFFIXES = (".jpg", ".png", ".webp")


def generation_time(model: str, rng: random.Random) -> float:
    return rng.uniform(0.02, 0.15)


@pytest.fixture
def fake() -> Iterator[FakeBFL]:
    with start_blocking_portal(backend="asyncio") as portal:
        server = FakeBFL(api_key=KEY, generation_time=generation_time)
        with portal.wrap_async_context_manager(server):
            yield server


def write_jobs(path: Path) -> Path:
    lines = []
    for n in range(JOBS):
        job: dict[str, Any] = {"model": "flux-2-klein-4b", "prompt": f"job {n}"}
        job.update(width=256, height=256)
        if n % 3 == 0:
            job["name"] = f"image-{n}"
        lines.append(json.dumps(job))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def command(fake: FakeBFL, jobs: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "bfl_async.cli", "batch", str(jobs), "-o", str(out),
        "--base-url", fake.base_url, *extra,
    ]  # fmt: skip


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BFL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["BFL_API_KEY"] = KEY
    return env


def rerun(fake: FakeBFL, jobs: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        command(fake, jobs, out, *extra),
        capture_output=True,
        text=True,
        env=environment(),
        timeout=120,
    )
    assert done.returncode in (0, 1), done.stderr
    assert KEY not in done.stdout + done.stderr
    return done


def wait_until(
    condition: Any, process: subprocess.Popen[bytes], fake: FakeBFL | None = None
) -> None:
    """Until `condition()` holds (checked every 2 ms) or the process has ended."""
    deadline = time.monotonic() + 120
    while not condition() and process.poll() is None:
        if time.monotonic() > deadline:
            counters = "" if fake is None else (
                f" (submits {fake.submits}, polls {fake.polls}, downloads {fake.downloads}, "
                f"held {fake.held})"
            )  # fmt: skip
            raise AssertionError(f"the batch made no progress{counters}")
        time.sleep(0.002)


def check(fake: FakeBFL, out: Path, *, duplicates: int = 0, lost: int = 0) -> dict[str, int]:
    """The manifest lists every job, each saved or `uncertain`; nothing was paid twice; no
    paid task is unaccounted for but those of uncertain jobs (and `lost` more known to be
    lost). Returns the state counts."""
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    jobs = manifest["jobs"]
    assert len(jobs) == JOBS
    states = collections.Counter(job["state"] for job in jobs)
    assert set(states) <= {"downloaded", "uncertain"}, states
    images = [p for p in out.iterdir() if p.suffix in IMAGE_SUFFIXES]
    assert len(images) == states["downloaded"]
    assert len(images) + states["uncertain"] == JOBS
    for job in jobs:
        if job["state"] == "downloaded":
            assert Path(job["path"]).is_file() and job["task_id"] in fake.tasks
        else:
            assert job["error_type"] == "SubmissionUncertainError"
    assert fake.duplicate_submits == duplicates
    named = {job["task_id"] for job in jobs if job["task_id"]}
    unknown = [task for task in fake.tasks.values() if task.id not in named]
    assert len(unknown) <= states["uncertain"] + lost
    assert not list(out.glob("*.part"))
    results = (out / "results.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(results) == JOBS
    for path in (out / "manifest.json", out / "results.jsonl", out / "bfl-batch.sqlite"):
        assert KEY.encode() not in path.read_bytes()
    return dict(states)


@pytest.mark.parametrize("seed", range(RUNS))
def test_a_batch_killed_at_a_random_point_resumes_without_paying_twice(
    seed: int, fake: FakeBFL, tmp_path: Path
) -> None:
    rng = random.Random(seed)
    phase = rng.choice(["submit", "poll", "download"])
    point = rng.randint(1, JOBS)
    jobs = write_jobs(tmp_path / "jobs.jsonl")
    out = tmp_path / "out"
    process = subprocess.Popen(
        command(fake, jobs, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=environment(),
    )  # fmt: skip
    try:
        if phase == "submit":

            def kill_inside(model: str, body: dict[str, Any]) -> str:
                # Called as the fake creates a task: its answer has not been sent yet.
                if fake.submits == point - 1:
                    os.kill(process.pid, signal.SIGKILL)
                return "Ready"

            fake.outcome = kill_inside
            wait_until(lambda: False, process, fake)
        else:
            counter = {"poll": lambda: fake.polls, "download": lambda: fake.downloads}[phase]
            wait_until(lambda: counter() >= point, process, fake)
            process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL, f"not killed at {phase} {point}"
    finally:
        fake.outcome = None
        if process.poll() is None:
            process.kill()
            process.wait()
    rerun(fake, jobs, out)
    states = check(fake, out)
    assert fake.submits - states.get("uncertain", 0) <= JOBS


@pytest.mark.parametrize("seed", range(RUNS))
def test_a_batch_killed_inside_the_submit_window_reports_that_job_uncertain(
    seed: int, fake: FakeBFL, tmp_path: Path
) -> None:
    point = random.Random(seed).randint(1, 3)
    jobs = write_jobs(tmp_path / "jobs.jsonl")
    out = tmp_path / "out"

    def hold_the_next(model: str, body: dict[str, Any]) -> str:
        if fake.submits == point - 2:  # creating submit point-1: hold the one after
            fake.fail_next("submit", "hold")
        return "Ready"

    if point == 1:
        fake.fail_next("submit", "hold")
    fake.outcome = hold_the_next
    # One task at a time, so no other submit is on its way when the held one is.
    process = subprocess.Popen(
        command(fake, jobs, out, "--concurrency", "1"), stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, env=environment(),
    )  # fmt: skip
    try:
        wait_until(lambda: fake.held == 1, process, fake)
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        fake.outcome = None
        if process.poll() is None:
            process.kill()
            process.wait()
    held = [task for task in fake.tasks.values() if task.body["prompt"] == f"job {point - 1}"]
    assert len(held) == 1  # the held submit created its (paid) task

    done = rerun(fake, jobs, out)
    assert check(fake, out) == {"downloaded": JOBS - 1, "uncertain": 1}
    manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    [uncertain] = [job for job in manifest["jobs"] if job["state"] == "uncertain"]
    assert uncertain["index"] == point - 1
    assert "rerun with --resubmit-uncertain" in done.stdout and done.returncode == 1
    submits = fake.submits

    rerun(fake, jobs, out, "--resubmit-uncertain")
    # The one duplicate is the resubmit asked for: the held task was paid too.
    assert check(fake, out, duplicates=1, lost=1) == {"downloaded": JOBS}
    assert fake.submits == submits + 1
