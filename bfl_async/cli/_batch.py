"""Running a job file through `AsyncBFL.generate_many`: counters, results and the manifest."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio

from bfl_async import AsyncBFL, Outcome, ParameterError, Task, TaskError

from ._jobs import Job, describe_parameter_error

__all__ = ["MANIFEST", "BatchStats", "Display", "JobResult", "one_line", "run_batch"]

MANIFEST = "results.jsonl"


def one_line(error: BaseException) -> str:
    """An exception as one line of text: what `error:` lines and the manifest show."""
    if isinstance(error, ParameterError):
        return describe_parameter_error(error)
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class JobResult:
    """How one job ended: a line of the manifest."""

    job: Job
    status: Literal["ok", "failed"]
    task_id: str | None = None
    path: Path | None = None
    seed: int | None = None
    cost: float | None = None
    """Credits: what BFL reported at submit, else (FLUX.1 reports none) the catalog price."""
    error: str | None = None

    @classmethod
    def from_outcome(cls, job: Job, outcome: Outcome) -> JobResult:
        """The result of `job` from the Outcome that generate_many yielded for it."""
        if outcome.image is not None:
            image = outcome.image
            cost = image.cost if image.cost is not None else job.estimate
            return cls(job, "ok", image.task_id, image.path, image.seed, cost)
        error = outcome.error or RuntimeError("no image and no error")
        task: Task | None = error.task if isinstance(error, TaskError) else None
        if task is None:
            return cls(job, "failed", error=one_line(error))
        cost = task.cost if task.cost is not None else job.estimate
        return cls(job, "failed", task.id, cost=cost, error=one_line(error))

    @property
    def ok(self) -> bool:
        """True when the image was saved."""
        return self.status == "ok"

    def manifest_line(self) -> str:
        """The job as one JSON line of results.jsonl."""
        record: dict[str, Any] = {
            "name": self.job.name,
            "line": self.job.line,
            "model": self.job.model,
            "task_id": self.task_id,
            "status": self.status,
            "path": None if self.path is None else str(self.path),
            "seed": self.seed,
            "cost": self.cost,
            "error": self.error,
        }
        return json.dumps(record, ensure_ascii=False)


@dataclass
class BatchStats:
    """A batch's counters, as its progress display shows them."""

    total: int
    accepted: int = 0
    """Tasks BFL has accepted so far."""
    ok: int = 0
    failed: int = 0
    failed_unsent: int = 0
    """Failed jobs that never became a task (refused by the API, or not sent at all)."""
    credits: float = 0.0
    """Credits spent on the images saved."""
    started: float = field(default_factory=time.monotonic)
    stopped: float | None = None
    """When the last job ended: the clock stops there."""
    results: list[JobResult] = field(default_factory=list)

    @property
    def finished(self) -> int:
        """Jobs that ended, well or not."""
        return self.ok + self.failed

    @property
    def queued(self) -> int:
        """Jobs not yet accepted by BFL (waiting for a slot, or being submitted)."""
        return max(0, self.total - self.accepted - self.failed_unsent)

    @property
    def elapsed(self) -> float:
        """Seconds since the batch started, until it stopped."""
        return (self.stopped or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Images saved per minute, so far."""
        elapsed = self.elapsed
        return self.ok * 60.0 / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until every job has ended, at the pace so far (None before any ended)."""
        if not self.finished:
            return None
        return (self.total - self.finished) * self.elapsed / self.finished

    @property
    def failures(self) -> list[JobResult]:
        """The failed jobs, in the order of the job file."""
        return sorted((r for r in self.results if not r.ok), key=lambda r: r.job.line)

    def on_submitted(self, task: Task) -> None:
        """Count a task BFL accepted (the client's `on_submitted` callback)."""
        self.accepted += 1

    def record(self, result: JobResult) -> None:
        """Count a job that ended."""
        self.results.append(result)
        if result.ok:
            self.ok += 1
            self.credits += result.cost or 0.0
        else:
            self.failed += 1
            if result.task_id is None:
                self.failed_unsent += 1
        if self.finished == self.total:
            self.stopped = time.monotonic()


class Display(Protocol):
    """Shows a batch's progress: live in a terminal, plain lines elsewhere."""

    def job_finished(self, result: JobResult) -> None:
        """Report one job that ended."""
        ...


async def run_batch(
    client: AsyncBFL,
    jobs: Sequence[Job],
    output_dir: Path,
    stats: BatchStats,
    display: Display,
    *,
    overwrite: bool = False,
) -> None:
    """Generate every job into `output_dir`, writing results.jsonl as the jobs end."""
    stats.started = time.monotonic()
    requests = [job.request() for job in jobs]
    outcomes = client.generate_many(requests, output_dir=output_dir, overwrite=overwrite)
    async with (
        await anyio.open_file(output_dir / MANIFEST, "w", encoding="utf-8") as manifest,
        contextlib.aclosing(outcomes),
    ):
        async for outcome in outcomes:
            result = JobResult.from_outcome(jobs[outcome.index], outcome)
            stats.record(result)
            await manifest.write(result.manifest_line() + "\n")
            await manifest.flush()
            display.job_finished(result)
