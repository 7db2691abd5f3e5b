"""Many worker processes, one account: 4 processes share one FakeBFL (limit 24) through
one Redis; and the arq recipe (examples/workers/) survives a SIGKILLed worker.

The fake runs in this process (on a background event loop) so its ledger outlives the
workers; each worker is a real process with its own RedisLimiter.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from anyio.from_thread import start_blocking_portal

from bfl_async.testing import FakeBFL

from .redis_server import RedisServer, free_port

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX processes and signals")

ROOT = Path(__file__).resolve().parent.parent
KEY = "workers-test-key-SECRET-90ab"
IMAGE_SUFFIXES = (".jpg", ".png", ".webp")
CLI = [sys.executable, "-m", "bfl_async.cli"]


def generation_time(model: str, rng: random.Random) -> float:
    return rng.uniform(0.2, 0.6)


@pytest.fixture
def fake() -> Iterator[FakeBFL]:
    with start_blocking_portal(backend="asyncio") as portal:
        server = FakeBFL(api_key=KEY, generation_time=generation_time, limits={"standard": 24})
        with portal.wrap_async_context_manager(server):
            yield server


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BFL_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["BFL_API_KEY"] = KEY
    return env


class Processes:
    """Child processes, killed at the end of the test whatever happened."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[str]] = []

    def start(self, args: list[str], log: Path) -> subprocess.Popen[str]:
        out = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed with the process
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, text=True, env=environment(), cwd=ROOT,
            start_new_session=True,
        )  # fmt: skip
        out.close()
        self.started.append(process)
        return process

    def stop(self) -> None:
        """Kill each process with the processes it started (uvicorn's workers outlive a
        supervisor killed alone), each in its own session."""
        for process in self.started:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            if process.poll() is None:  # not a session leader after all
                process.kill()
            process.wait(10)


@pytest.fixture
def processes() -> Iterator[Processes]:
    running = Processes()
    try:
        yield running
    finally:
        running.stop()


def test_four_workers_share_one_accounts_limit(
    fake: FakeBFL, redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    started = time.monotonic()
    script = str(ROOT / "tests" / "batch_worker.py")

    def worker(n: int) -> list[str]:
        return [sys.executable, script, fake.base_url, redis.url, str(tmp_path / f"out{n}"),
                "48", f"worker{n}"]  # fmt: skip

    workers = [processes.start(worker(n), tmp_path / f"worker{n}.log") for n in range(4)]
    for worker in workers:
        worker.wait(120)
    elapsed = time.monotonic() - started
    logs = [(tmp_path / f"worker{n}.log").read_text(encoding="utf-8") for n in range(4)]
    for worker, log in zip(workers, logs, strict=True):
        assert worker.returncode == 0, log
        assert KEY not in log
    summaries = [json.loads(log.strip().splitlines()[-1]) for log in logs]
    images = [p for n in range(4) for p in (tmp_path / f"out{n}").iterdir()]
    images = [p for p in images if p.suffix in IMAGE_SUFFIXES]
    print(
        f"4 workers x 48 jobs: {elapsed:.1f} s, peak in flight {fake.peak_in_flight}, "
        f"429s {fake.rate_limited}, submits {fake.submits}, polls {fake.polls}"
    )
    assert [s["states"] for s in summaries] == [{"downloaded": 48}] * 4
    assert len(images) == 192
    assert fake.rate_limited == 0
    assert fake.peak_in_flight["standard"] <= 24
    assert fake.peak_in_flight["standard"] >= 12  # the workers did run side by side
    assert fake.submits == 192 and fake.duplicate_submits == 0


def test_bfl_batch_takes_its_slots_from_redis(
    fake: FakeBFL, redis: RedisServer, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text(
        "".join(
            json.dumps({"model": "flux-2-klein-4b", "prompt": f"cli {n}", "name": f"cli-{n}"})
            + "\n"
            for n in range(3)
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    args = [*CLI, "batch", str(jobs), "-o", str(out), "--base-url", fake.base_url]
    done = subprocess.run(
        [*args, "--limiter", redis.url], env=environment(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert sorted(p.name for p in out.iterdir() if p.suffix in IMAGE_SUFFIXES) == [
        "cli-0.jpg", "cli-1.jpg", "cli-2.jpg"
    ]  # fmt: skip
    # Redis saw this batch: its leases came and went through the shared sorted set.
    assert b"bfl:seq" in redis.command("KEYS", "bfl:*")

    unreachable = f"redis://:pw-SECRET-x@127.0.0.1:{free_port()}/0"
    env = {**environment(), "BFL_LIMITER_URL": unreachable}
    failed = subprocess.run(
        [*args, "-o", str(tmp_path / "other")], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert failed.returncode == 1
    assert "cannot reach the Redis limiter at redis://:***@127.0.0.1" in failed.stderr
    assert "pw-SECRET-x" not in failed.stdout + failed.stderr
    assert fake.submits == 3


# --- the arq recipe: examples/workers/ ---------------------------------------------------


def recipe_environment(fake: FakeBFL, redis: RedisServer, out: Path, ttl: float) -> dict[str, str]:
    env = environment()
    env.update(
        BFL_LIMITER_URL=redis.url, BFL_BASE_URL=fake.base_url, BFL_OUTPUT_DIR=str(out),
        BFL_LEASE_TTL=str(ttl), BFL_JOB_TIMEOUT="8", BFL_MAX_JOBS="12",
    )  # fmt: skip
    return env


def worker_id(log: Path, process: subprocess.Popen[str]) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and process.poll() is None:
        for line in log.read_text(encoding="utf-8").splitlines():
            if "bfl worker " in line and " ready" in line:
                return line.split("bfl worker ", 1)[1].split()[0]
        time.sleep(0.01)
    raise AssertionError(f"the worker did not start: {log.read_text(encoding='utf-8')}")


def test_a_killed_arq_worker_loses_nothing_and_pays_nothing_twice(
    fake: FakeBFL, redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    import redis as redis_client

    sys.path.insert(0, str(ROOT / "examples" / "workers"))
    try:
        from enqueue import enqueue
    finally:
        sys.path.pop(0)
    ttl = 2.0
    out = tmp_path / "images"
    jobs = [
        (f"job-{n}", {"model": "flux-2-klein-4b", "prompt": f"recipe {n}", "width": 256})
        for n in range(48)
    ]
    assert asyncio.run(enqueue(jobs, redis.url)) == 48
    assert asyncio.run(enqueue(jobs, redis.url)) == 0  # one job per id
    store = redis_client.Redis.from_url(redis.url, decode_responses=True)
    env = recipe_environment(fake, redis, out, ttl)
    command = [sys.executable, str(ROOT / "examples" / "workers" / "bfl_worker.py"), "--burst"]
    workers = []
    for n in range(3):
        log = tmp_path / f"worker{n}.log"
        out_file = open(log, "w", encoding="utf-8")  # noqa: SIM115 - handed to the process
        workers.append(
            subprocess.Popen(
                command,
                stdout=out_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=tmp_path,
                start_new_session=True,
            )
        )
        out_file.close()
        processes.started.append(workers[-1])
    victim = workers[0]
    victim_id = worker_id(tmp_path / "worker0.log", victim)

    def victims_leases() -> list[str]:
        """The victim's unexpired leases (an expired one counts for nobody, even before the
        next acquire sweeps it away)."""
        seconds, micros = store.time()
        now = seconds * 1000 + micros // 1000
        leases = store.zrange("bfl:lease:standard", now, "+inf", byscore=True)
        return [m for m in leases if m.startswith(victim_id)]

    def submitting() -> list[str]:
        # The victim's jobs whose POST may be on its way: killing it then would leave them
        # uncertain (correctly, but this test is about what can be recovered).
        found = []
        for key in store.scan_iter("bfl-jobs:*"):
            record = store.hgetall(key)
            if record.get("state") == "submitting" and record.get("worker") == victim_id:
                found.append(key)
        return found

    deadline = time.monotonic() + 60
    while True:  # mid-batch: some images saved, the victim holding slots, none mid-submit
        assert time.monotonic() < deadline and victim.poll() is None, "no moment to kill"
        if len(list(out.glob("*.jpg"))) >= 8 and victims_leases():
            os.kill(victim.pid, signal.SIGSTOP)
            if victims_leases() and not submitting():
                break
            os.kill(victim.pid, signal.SIGCONT)
        time.sleep(0.005)
    held = victims_leases()
    os.kill(victim.pid, signal.SIGKILL)
    killed = time.monotonic()
    victim.wait(10)
    while victims_leases():
        assert time.monotonic() - killed < ttl + 2, "the dead worker's slots did not come back"
        time.sleep(0.01)
    recovered = time.monotonic() - killed
    for survivor in workers[1:]:
        survivor.wait(120)
    elapsed = time.monotonic() - killed
    logs = [(tmp_path / f"worker{n}.log").read_text(encoding="utf-8") for n in range(3)]
    assert all(KEY not in log for log in logs)
    records = {key: store.hgetall(key) for key in store.scan_iter("bfl-jobs:*")}
    reattached = sum(1 for r in records.values() if r.get("worker") == victim_id)
    print(
        f"SIGKILL: the victim held {len(held)} slots; back after {recovered:.2f} s (TTL {ttl} s);"
        f" survivors done {elapsed:.1f} s after the kill; {reattached} jobs had been submitted"
        f" by the victim; submits {fake.submits}, duplicates {fake.duplicate_submits}"
    )
    assert [w.returncode for w in workers[1:]] == [0, 0], logs
    assert ttl / 2 <= recovered <= ttl + 0.5  # when its tasks would have ended, not sooner
    assert len(records) == 48
    assert {r["state"] for r in records.values()} == {"done"}, records
    assert sorted(p.stem for p in out.glob("*.jpg")) == sorted(job_id for job_id, _ in jobs)
    assert fake.duplicate_submits == 0
    assert fake.submits == 48  # every job paid once: reruns re-attached to the victim's tasks
    assert fake.rate_limited == 0
    store.close()


# --- FastAPI under uvicorn --workers 2: webhooks reach whichever worker ---------------------


def test_uvicorn_workers_hand_webhooks_over_through_redis(
    redis: RedisServer, processes: Processes, tmp_path: Path
) -> None:
    """The example app under `uvicorn --workers 2`: BFL's webhook for a task lands on either
    worker; the one whose request waits for it gets it through Redis, at once. Polls are
    only a slow safety net with webhooks on, so a result missing its push would take far
    longer than the bound below."""
    port = free_port()
    secret = "whsec-workers-0123456789"
    with start_blocking_portal(backend="asyncio") as portal:
        fake = FakeBFL(api_key=KEY, generation_time=0.3)
        with portal.wrap_async_context_manager(fake):
            env = environment()
            env.update(
                BFL_BASE_URL=fake.base_url, BFL_LIMITER_URL=redis.url,
                PUBLIC_URL=f"http://127.0.0.1:{port}", BFL_WEBHOOK_SECRET=secret,
                IMAGES_DIR=str(tmp_path / "images"), BFL_MODEL="flux-2-klein-4b",
            )  # fmt: skip
            command = [
                sys.executable, "-m", "uvicorn", "--factory",
                "examples.fastapi_app.app:app_from_environment", "--workers", "2",
                "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
            ]  # fmt: skip
            log = tmp_path / "uvicorn.log"
            with open(log, "w", encoding="utf-8") as out:
                server = subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
                )
            processes.started.append(server)  # type: ignore[arg-type]
            base = f"http://127.0.0.1:{port}"
            with httpx.Client(timeout=30) as http:
                deadline = time.monotonic() + 30
                workers: set[str] = set()
                while len(workers) < 2:  # both workers up: each answers with its own pid
                    assert time.monotonic() < deadline, log.read_text(encoding="utf-8")
                    try:
                        # a new connection each time, for the kernel to pick a worker
                        answer = http.get(f"{base}/health", headers={"connection": "close"})
                        workers.add(answer.json()["worker"])
                    except (httpx.HTTPError, ValueError, KeyError):
                        time.sleep(0.05)
                started = time.monotonic()
                with ThreadPoolExecutor(8) as pool:
                    answers = list(
                        pool.map(
                            lambda n: http.post(f"{base}/images", json={"prompt": f"fox {n}"}),
                            range(8),
                        )
                    )
                elapsed = time.monotonic() - started
            assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
            assert all(a.json()["status"] == "ready" for a in answers)
            print(
                f"uvicorn --workers 2: 8 images in {elapsed:.2f} s, webhooks sent "
                f"{fake.webhooks.delivered}, polls {fake.polls}"
            )
            assert fake.webhooks.delivered == 8
            assert elapsed < 4.0
            assert fake.polls <= 4  # the results came by push, not by polling
