"""Running a job file through `AsyncBFL.batch`: signals, counters, results and the manifest."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import anyio

from bfl_async import AsyncBFL, Batch, JobRecord, ParameterError, Task

from ._jobs import Job, describe_parameter_error

__all__ = [
    "MANIFEST",
    "BatchStats",
    "Display",
    "JobResult",
    "one_line",
    "parse_budget",
    "run_batch",
]

MANIFEST = "results.jsonl"
_THOUSANDS = re.compile(r"\d{1,3}(,\d{3})+(\.\d+)?")

Status = Literal["ok", "failed", "uncertain", "skipped", "expired", "pending"]


def parse_budget(text: str) -> float:
    """A budget in credits from `500` (credits) or `$12.50` (US dollars: 1 credit = 1 cent)."""
    raw = text.strip()
    dollars = raw.startswith("$")
    raw = raw.removeprefix("$").strip()
    # Commas only as thousands separators: "$12,50" must not become $1,250.
    if "," in raw and not _THOUSANDS.fullmatch(raw):
        raw = "invalid"
    try:
        value = float(raw.replace(",", ""))
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"{text!r} is not a budget: give credits (500) or dollars ($12.50)")
    return round(value * 100, 4) if dollars else value


def one_line(error: BaseException) -> str:
    """An exception as one line of text: what `error:` lines and the manifest show."""
    if isinstance(error, ParameterError):
        return describe_parameter_error(error)
    return " ".join(str(error).split()) or type(error).__name__


@dataclass(frozen=True)
class JobResult:
    """How one job ended: a line of the manifest."""

    job: Job
    status: Status
    task_id: str | None = None
    path: Path | None = None
    seed: int | None = None
    cost: float | None = None
    """Credits: what BFL reported at submit, else (FLUX.1 reports none) the catalog price."""
    error: str | None = None
    previous: bool = False
    """The job had ended in an earlier run of the batch."""

    @classmethod
    def from_record(cls, job: Job, record: JobRecord) -> JobResult:
        """The result of `job` from the record the batch yielded for it."""
        task: Task | None = record.task
        cost = record.cost if record.cost is not None or task is None else job.estimate
        task_id = None if task is None else task.id
        if record.ok:
            return cls(job, "ok", task_id, record.path, record.seed, cost, None, record.previous)
        status: Status
        if record.state in ("failed", "uncertain", "skipped", "expired"):
            status = record.state
        else:  # queued, submitted or ready: the batch stopped before it ended
            status = "pending"
        error = record.error or f"not finished ({record.state}); run the batch again to resume"
        if record.exception is not None:
            error = one_line(record.exception)
        return cls(job, status, task_id, cost=cost, error=error, previous=record.previous)

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
    """Jobs that ended without an image (failed, uncertain, skipped, expired)."""
    pending: int = 0
    """Jobs a stopped batch left unfinished: the next run takes them up, none has failed."""
    failed_unsent: int = 0
    """Failed jobs that never became a task (refused by the API, or not sent at all)."""
    credits: float = 0.0
    """Credits spent on the images saved."""
    estimated: float = 0.0
    """The catalog's price of the whole batch."""
    spent: float = 0.0
    """Credits BFL charged for the batch's tasks, in every run (images or not)."""
    statuses: dict[str, int] = field(default_factory=dict)
    """How many jobs ended in each status."""
    earlier: int = 0
    """Images saved by earlier runs of the batch (a resumed batch lists them first)."""
    started: float = field(default_factory=time.monotonic)
    stopped: float | None = None
    """When the last job ended: the clock stops there."""
    results: list[JobResult] = field(default_factory=list)

    @property
    def finished(self) -> int:
        """Jobs that ended, well or not (not the pending ones of a stopped batch)."""
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
        """Images saved per minute by this run, so far."""
        elapsed = self.elapsed
        return (self.ok - self.earlier) * 60.0 / elapsed if elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds until every job has ended, at the pace so far (None before any ended)."""
        if not self.finished:
            return None
        return (self.total - self.finished) * self.elapsed / self.finished

    @property
    def failures(self) -> list[JobResult]:
        """The jobs that ended without an image, in the order of the job file."""
        ended = (r for r in self.results if not r.ok and r.status != "pending")
        return sorted(ended, key=lambda r: r.job.line)

    def on_submitted(self, task: Task) -> None:
        """Count a task BFL accepted (the client's `on_submitted` callback)."""
        self.accepted += 1

    def record(self, result: JobResult) -> None:
        """Count a job that ended."""
        self.results.append(result)
        self.statuses[result.status] = self.statuses.get(result.status, 0) + 1
        if result.ok:
            self.ok += 1
            self.earlier += result.previous
            self.credits += result.cost or 0.0
        elif result.status == "pending":
            self.pending += 1
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
    max_cost: float | None = None,
    resubmit_uncertain: bool = False,
    grace: float = 30.0,
    on_signal: Callable[[int, Batch], None] | None = None,
) -> Batch:
    """Run every job into `output_dir`, writing results.jsonl as the jobs end.

    SIGINT or SIGTERM stops new submits at once and keeps watching what is in flight for
    `grace` seconds (a second signal ends that, a third abandons submits still waiting for
    their answer); the journal keeps the rest for the next run.
    """
    stats.started = time.monotonic()
    requests = [job.request() for job in jobs]
    batch = client.batch(
        requests,
        output_dir,
        max_cost=max_cost,
        resubmit_uncertain=resubmit_uncertain,
        overwrite=overwrite,
    )
    # Listening before anything is sent: a signal is never the default KeyboardInterrupt.
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with (
            batch,
            await anyio.open_file(output_dir / MANIFEST, "w", encoding="utf-8") as manifest,
            anyio.create_task_group() as tg,
        ):
            stats.estimated = batch.estimated
            stats.total = len(batch.records)  # with paid jobs no longer in the file
            tg.start_soon(_stop_on_signals, batch, signals, grace, on_signal)
            async with contextlib.aclosing(batch.__aiter__()) as records:
                async for record in records:
                    job = jobs[record.index] if record.listed else _unlisted(record)
                    result = JobResult.from_record(job, record)
                    stats.record(result)
                    stats.spent = batch.spent
                    await manifest.write(result.manifest_line() + "\n")
                    await manifest.flush()
                    if result.status != "pending":  # the summary counts those
                        display.job_finished(result)
            stats.spent = batch.spent
            tg.cancel_scope.cancel()
    return batch


def _unlisted(record: JobRecord) -> Job:
    """A job no longer in the file whose task an earlier run paid for (line 0)."""
    return Job(line=0, model=record.model, params={}, name=record.name, estimate=record.estimate)


async def _stop_on_signals(
    batch: Batch,
    signals: AsyncIterator[int],
    grace: float,
    on_signal: Callable[[int, Batch], None] | None,
) -> None:
    received = 0
    async for signum in signals:
        received += 1
        batch.stop(grace=grace if received == 1 else 0, abandon=received > 2)
        if on_signal is not None:
            on_signal(signum, batch)
