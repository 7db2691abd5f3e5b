"""Batches of many jobs that survive crashes: a journal, resume, a budget and a manifest.

`client.batch(jobs, output_dir)` records every job in a SQLite journal next to the images
(`_journal.py`) before each step, so running the same batch again resumes it: finished jobs
are skipped, paid tasks are watched and downloaded (never submitted again), and a job whose
submit may or may not have reached BFL is reported `uncertain` and left alone unless asked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import ipaddress
import json
import logging
import math
import os
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar

import anyio
import anyio.to_thread
import httpx
from anyio.streams.memory import MemoryObjectSendStream

from ._catalog import SECRET_PARAMS, ModelSpec, price
from ._download import parts_of, saved_as, url_expiry
from ._errors import (
    APIConnectionError,
    APIError,
    BatchInUseError,
    BFLError,
    BudgetExceededError,
    GenerationError,
    ModerationError,
    OutputExistsError,
    ResultExpiredError,
    SubmissionUncertainError,
    TaskNotFoundError,
)
from ._journal import JOURNAL_NAME, JobRow, JobState, Journal
from ._models import Result, Task
from ._requests import build_job

if TYPE_CHECKING:
    from ._client import AsyncBFL, _Watch

__all__ = ["MANIFEST_NAME", "Batch", "JobRecord", "JobState", "job_key"]

logger = logging.getLogger("bfl_async")

MANIFEST_NAME = "manifest.json"
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# Task errors that end a job for good: the task is paid and nothing more will come of it.
_FINAL_TASK_ERRORS = (ModerationError, GenerationError, TaskNotFoundError)


def job_key(model: str, params: Mapping[str, Any], name: str | None = None) -> str:
    """A job's stable identity: `name:<name>`, else a hash of its model and parameters.

    Secrets (`webhook_secret`) are left out, so rotating one does not make a new job.
    """
    if name is not None:
        return f"name:{name}"
    public = {k: v for k, v in params.items() if k not in SECRET_PARAMS}
    text = json.dumps([model, public], sort_keys=True, default=_key_text, ensure_ascii=False)
    return "hash:" + hashlib.sha256(text.encode()).hexdigest()[:20]


def _key_text(value: Any) -> str:
    """A value JSON cannot hold (an image), as its job's key counts it: by its content or
    path, never by an address (`str()` of a memoryview or of a bare `os.PathLike` is
    `<... at 0x...>`, new in every run: the rerun would pay for the job again)."""
    if isinstance(value, memoryview):
        value = value.tobytes()  # as the same bytes would be
    elif isinstance(value, os.PathLike):
        value = os.fspath(value)  # a Path's text: keys made before are unchanged
    return str(value)


@dataclass(frozen=True)
class JobRecord:
    """Where one job of a batch stands: its state and, once known, its task, image or error."""

    index: int
    """The job's position in the jobs given to `client.batch`."""
    key: str
    name: str | None
    model: str
    state: JobState
    """`downloaded` (done), `failed`, `uncertain`, `skipped` (budget), `expired`; or, when
    the batch stopped early, `queued` (never sent), `submitted` or `ready` (paid, resumable)."""
    estimate: float
    """The catalog's price in credits (1 credit = 1 US cent)."""
    task: Task | None = None
    cost: float | None = None
    """Credits BFL charged (its submit answer; the estimate when it reports none)."""
    path: Path | None = None
    seed: int | None = None
    error: str | None = None
    """`ErrorType: message` when the job failed, or a resumable step went wrong."""
    exception: BaseException | None = field(default=None, compare=False, repr=False)
    """The typed error raised in this run, if any."""
    previous: bool = False
    """True when the job had already ended in an earlier run of the batch."""
    listed: bool = True
    """False for a job no longer in the list whose task an earlier run paid for: it is
    still watched and saved (its `index` then follows the listed jobs')."""
    at_risk: float = 0.0
    """Estimated credits of this job's `uncertain` submits, which may or may not have been
    charged: also of earlier ones, when it was resubmitted since (see `resubmit_uncertain`)."""

    @property
    def ok(self) -> bool:
        """True when the image is saved."""
        return self.state == "downloaded"

    @property
    def error_type(self) -> str | None:
        """The name of the error class, e.g. `ModerationError`."""
        return None if self.error is None else self.error.partition(":")[0]

    def manifest_entry(self) -> dict[str, Any]:
        """The job as the manifest lists it."""
        return {
            "index": self.index,
            "key": self.key,
            "name": self.name,
            "model": self.model,
            "state": self.state,
            "task_id": None if self.task is None else self.task.id,
            "estimate": self.estimate,
            "cost": self.cost,
            "path": None if self.path is None else str(self.path),
            "seed": self.seed,
            "listed": self.listed,
            "at_risk": self.at_risk,
            "error_type": self.error_type,
            "error": self.error,
        }


def _describe(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class _Stopped(Exception):
    """The batch is stopping: this submit must not go out."""


@dataclass(eq=False)
class _Job:
    """A runnable job and its state in this run."""

    index: int
    key: str
    name: str | None
    spec: ModelSpec | None
    """None for a paid job no longer listed: it is followed, never submitted."""
    body: dict[str, Any] = field(repr=False)
    """The request as sent: it may hold a `webhook_secret`, so never in a repr."""
    params: dict[str, Any] = field(repr=False)
    estimate: float
    record: JobRecord
    attempts: int = 0
    reserved: bool = False
    sample: str | None = field(default=None, repr=False)
    """The signed result URL an earlier run saw, for a job found `ready`."""
    was_ready: bool = False
    """An earlier run began downloading it: a file of its name there is its own image."""
    scope: anyio.CancelScope | None = field(default=None, repr=False)
    uncertain: str | None = None
    """For a job resubmitted although an earlier submit is uncertain: that submit's error.
    The job stays `uncertain` unless this run's submit got an answer or may have been sent."""
    posting: bool = False
    """A POST of it has started in this run: from then on it may be paid."""
    post_scope: anyio.CancelScope | None = field(default=None, repr=False)
    """The shielded scope of its POST on its way, for `stop(abandon=True)` to cancel."""
    risk: float = 0.0
    """The journal's `risk`: estimated credits of its submits that may have been charged."""


class Batch:
    """A resumable batch of jobs; create it with `client.batch(...)`.

    ```
    async with client.batch(jobs, "out/", max_cost=500) as batch:
        async for record in batch:
            print(record.key, record.state)
    print(batch.spent, "credits")
    ```
    Iterating runs the batch and yields each job as it ends (jobs already finished in an
    earlier run come first). `stop()` stops new submits; leaving the block writes
    `manifest.json` next to the images. A step that cannot be journaled (a full disk) stops
    the batch, and the loop raises its error once every job is reported.
    """

    journal_name: ClassVar[str] = JOURNAL_NAME
    """The journal's file name in the output directory."""
    manifest_name: ClassVar[str] = MANIFEST_NAME

    def __init__(
        self,
        client: AsyncBFL,
        jobs: Iterable[Mapping[str, Any]],
        output_dir: str | os.PathLike[str],
        *,
        max_cost: float | None = None,
        resubmit_uncertain: bool = False,
        overwrite: bool = False,
        timeout: float | None = None,
        journal: str | os.PathLike[str] | None = None,
    ) -> None:
        if max_cost is not None and not max_cost >= 0:
            raise ValueError(f"max_cost must be a number of credits >= 0, not {max_cost!r}")
        if timeout is not None and not timeout > 0:  # each job would be paid, then given up
            raise ValueError(
                f"timeout must be a number of seconds > 0 (or None: the client's "
                f"wait_timeout), not {timeout!r}"
            )
        self._client = client
        self._requests = [dict(job) for job in jobs]
        self.output_dir = Path(output_dir)
        self.journal_path = Path(journal) if journal is not None else self.output_dir / JOURNAL_NAME
        self.manifest_path = self.output_dir / MANIFEST_NAME
        self.max_cost = max_cost
        self._resubmit_uncertain = resubmit_uncertain
        self._overwrite = overwrite
        self._timeout = timeout
        self._journal: Journal | None = None
        self._records: list[JobRecord] = []
        self._finished_early: list[JobRecord] = []
        self._to_download: list[_Job] = []
        self._to_attach: list[_Job] = []
        self._to_submit: list[_Job] = []
        self._follow_scopes: set[anyio.CancelScope] = set()
        self._stopping = False
        self._abandoning = False
        self._deadline = math.inf
        self._started = False
        self._finished: anyio.Event | None = None
        self._spent = 0.0
        self._at_risk = 0.0
        self._reserved = 0.0

    def __repr__(self) -> str:
        return f"<Batch {len(self._requests)} jobs -> {str(self.output_dir)!r}>"

    # --- what a caller reads ----------------------------------------------------------

    @property
    def records(self) -> list[JobRecord]:
        """Every job's latest record, in the order the jobs were given."""
        return list(self._records)

    @property
    def estimated(self) -> float:
        """The catalog's price of every valid job, in credits."""
        return round(sum(r.estimate for r in self._records), 4)

    @property
    def spent(self) -> float:
        """Credits BFL charged for this batch's tasks, over every run."""
        return round(self._spent, 4)

    @property
    def at_risk(self) -> float:
        """Estimated credits of `uncertain` jobs: they may or may not have been charged."""
        return round(self._at_risk, 4)

    @property
    def stopping(self) -> bool:
        """True once `stop()` was called."""
        return self._stopping

    def counts(self) -> dict[str, int]:
        """How many jobs are in each state."""
        counts: dict[str, int] = {}
        for record in self._records:
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts

    # --- lifecycle --------------------------------------------------------------------

    async def __aenter__(self) -> Batch:
        if self._journal is not None:  # planned again, each job would be counted twice
            raise RuntimeError("a batch runs once; create a new one to run it again")
        self._journal = await Journal.open(self.journal_path)
        try:
            here = str(self._client.base_url)
            recorded = await self._journal.api(here)
            if _is_local(recorded) != _is_local(here):
                raise BatchInUseError(str(self.journal_path), api=recorded)
            await self._plan()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await self._journal.aclose()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with anyio.CancelScope(shield=True):
            if self._finished is not None and not self._finished.is_set():
                # Left while jobs still run (an error in the loop's body): end them first,
                # so every step they are taking is journaled before the journal closes.
                self.stop(grace=0)
                await self._finished.wait()
            assert self._journal is not None
            try:
                await self.write_manifest()
            finally:  # a manifest that cannot be written must not keep the next run out
                await self._journal.aclose()

    def stop(self, grace: float | None = None, *, abandon: bool = False) -> None:
        """Send no more submits, at once; jobs already paid for keep being watched.

        With `grace`, watching stops after that many seconds (0: now); what is still in
        flight then stays `submitted` in the journal, and the next run picks it up. A submit
        already on its way is waited for (its answer says whether it was paid) unless
        `abandon`: its job then ends `uncertain`.
        """
        self._stopping = True
        self._abandoning = self._abandoning or abandon
        for job in self._to_submit:
            if job.scope is not None and job.record.task is None:
                job.scope.cancel()
            if job.post_scope is not None and self._abandoning:
                job.post_scope.cancel()
        if grace is not None:
            self._deadline = min(self._deadline, anyio.current_time() + max(0.0, grace))
            for scope in self._follow_scopes:
                scope.deadline = min(scope.deadline, self._deadline)

    # --- planning: what each job needs, from the journal ------------------------------

    async def _plan(self) -> None:
        assert self._journal is not None
        known = await self._journal.load()
        jobs: list[_Job] = []
        names: dict[str, str] = {}
        seen: dict[str, int] = {}
        for index, request in enumerate(self._requests):
            params = dict(request)
            model = params.pop("model", None)
            name = params.pop("name", None)
            try:
                spec, body = build_job(model, name, params, names)
            except BFLError as exc:
                record = JobRecord(
                    index, "", name if isinstance(name, str) else None, str(model), "failed",
                    0.0, error=_describe(exc), exception=exc,
                )  # fmt: skip
                self._records.append(record)
                self._finished_early.append(record)
                continue
            key = job_key(spec.name, params, name)
            seen[key] = seen.get(key, 0) + 1
            if seen[key] > 1:  # the same request twice: two images, two keys
                key = f"{key}#{seen[key]}"
            estimate = price(spec, body)
            record = JobRecord(index, key, name, spec.name, "queued", estimate)
            jobs.append(_Job(index, key, name, spec, body, params, estimate, record))
            self._records.append(record)
        await self._journal.add(
            JobRow(j.key, j.index, j.name, j.record.model, j.estimate, "queued")
            for j in jobs
            if j.key not in known
        )
        for job in jobs:
            row = known.get(job.key)
            if row is None:
                self._to_submit.append(job)
            else:
                await self._resume(job, row)
        # Jobs since removed from (or edited in) the list: paid tasks are still followed and
        # saved, so editing the list never loses an image already paid for; possibly paid
        # ones stay `uncertain` in the manifest; every paid task counts in `spent`.
        listed = {job.key for job in jobs}
        for row in sorted(known.values(), key=lambda row: row.position):
            if row.key in listed:
                continue
            paid = bool(row.task)
            if not (
                (row.state in ("submitted", "ready") and paid)
                or row.state in ("submitting", "uncertain")
            ):
                if paid:
                    self._spent += _cost(row.cost, row.estimate)
                self._at_risk += row.risk
                continue
            index = len(self._records)
            record = JobRecord(
                index, row.key, row.name, row.model, row.state, row.estimate, listed=False
            )
            self._records.append(record)
            await self._resume(
                _Job(index, row.key, row.name, None, {}, {}, row.estimate, record), row
            )

    async def _resume(self, job: _Job, row: JobRow) -> None:
        """Decide what a job the journal knows needs now."""
        task = Task.model_validate_json(row.task) if row.task else None
        if task is not None:
            self._spent += _cost(row.cost, job.estimate)
        record = replace(
            job.record,
            state=row.state,
            task=task,
            cost=row.cost,
            path=Path(row.path) if row.path else None,
            seed=int(row.seed) if row.seed else None,
            error=row.error,
            previous=True,
            at_risk=row.risk,
        )
        job.attempts = row.attempts
        job.sample = row.sample
        job.record = record
        job.risk = row.risk
        self._records[job.index] = record
        state = row.state
        if state == "submitting":  # a submit left on its way: one more at risk, at its price
            job.risk += row.estimate
        self._at_risk += job.risk
        if state in ("submitting", "uncertain"):
            error = row.error or (
                "SubmissionUncertainError: the batch stopped while this job's submit was on "
                "its way; BFL may or may not have created (and charged for) a task. Check "
                "your dashboard, then rerun with resubmit_uncertain=True to submit it again"
            )
            # Journaled before any resubmit, so that its risk adds to this one's.
            await self._set(job, "uncertain", previous=True, error=error, risk=job.risk)
            if self._resubmit_uncertain and job.spec is not None:
                logger.warning("resubmitting job %s, whose earlier submit is uncertain", job.key)
                job.uncertain = error
                self._to_submit.append(job)
                return
            self._finished_early.append(job.record)
        elif state == "submitted" and task is not None:
            self._to_attach.append(job)
        elif state == "ready" and task is not None:
            job.was_ready = True
            self._to_download.append(job)
        elif (state == "failed" and task is None) or state in ("queued", "skipped"):
            self._to_submit.append(job)  # nothing was paid: try again
        else:  # downloaded, expired, failed with a paid task
            self._finished_early.append(record)

    # --- running ----------------------------------------------------------------------

    def __aiter__(self) -> AsyncGenerator[JobRecord, None]:
        return self._run()

    async def _run(self) -> AsyncGenerator[JobRecord, None]:
        if self._journal is None:
            raise RuntimeError("use the batch as `async with client.batch(...) as batch:`")
        if self._started:
            raise RuntimeError("a batch runs once; create a new one to run it again")
        self._started = True
        tg = self._client._task_group()
        send, receive = anyio.create_memory_object_stream[JobRecord](max_buffer_size=math.inf)
        for record in self._finished_early:
            send.send_nowait(record)
        finished = self._finished = anyio.Event()
        failures: list[Exception] = []

        async def guarded(job: _Job, step: Callable[..., Awaitable[None]], *args: Any) -> None:
            # A step that could not be taken or journaled (a journal that cannot be written):
            # the job is reported as the journal has it, the batch stops, and the loop raises
            # the error, rather than it tearing down the client's tasks and every other job.
            try:
                await step(job, *args, send)
            except Exception as exc:
                if failures:
                    logger.error("job %s also failed", job.key, exc_info=exc)
                failures.append(exc)
                self.stop(grace=0)
                with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                    send.send_nowait(job.record)

        async def run_all() -> None:
            try:
                async with send, anyio.create_task_group() as jobs_tg:
                    # Ready results first (their URLs expire), then paid tasks take their
                    # slots (claimed now, ahead of any new submit), then new submits.
                    for job in self._to_download:
                        jobs_tg.start_soon(guarded, job, self._download_ready)
                    for job in self._to_attach:
                        assert job.record.task is not None
                        watch = self._client._attach(job.record.task)
                        jobs_tg.start_soon(guarded, job, self._follow, watch)
                    for job in self._to_submit:
                        job.scope = anyio.CancelScope()
                        jobs_tg.start_soon(guarded, job, self._submit)
            except Exception as exc:  # the client closed under it
                failures.append(exc)
            finally:
                finished.set()

        tg.start_soon(run_all)
        try:
            async with receive:
                async for record in receive:
                    yield record
        finally:
            if not finished.is_set():  # the caller stopped iterating early
                self.stop(grace=0)
            with anyio.CancelScope(shield=True):
                await finished.wait()
        if failures:
            raise failures[0]

    async def _set(self, job: _Job, state: JobState, **values: Any) -> None:
        """Journal the job's new state, then reflect it in its record."""
        assert self._journal is not None
        exception = values.pop("exception", None)
        previous = values.pop("previous", False)
        journal = {k: v for k, v in values.items() if k not in ("path", "seed")}
        if "path" in values:
            journal["path"] = str(values["path"])
        if values.get("seed") is not None:
            journal["seed"] = str(values["seed"])
        await self._journal.update(job.key, state=state, **journal)
        self._reflect(job, state, exception, previous, values)

    def _reflect(
        self,
        job: _Job,
        state: JobState,
        exception: BaseException | None,
        previous: bool,
        values: Mapping[str, Any],
    ) -> None:
        record_values = {k: v for k, v in values.items() if k in ("cost", "path", "seed", "error")}
        job.record = replace(
            job.record,
            state=state,
            exception=exception,
            previous=previous,
            at_risk=round(job.risk, 4),
            **record_values,
        )
        self._records[job.index] = job.record

    async def _end(
        self,
        job: _Job,
        send: MemoryObjectSendStream[JobRecord],
        state: JobState,
        *,
        safe: bool = False,
        **values: Any,
    ) -> None:
        """Journal the job's end and report it. With `safe`, a journal that cannot be written
        is logged and the end reported anyway (the row's last state then stands)."""
        with anyio.CancelScope(shield=True):
            try:
                await self._set(job, state, **values)
            except Exception:
                if not safe:
                    raise
                logger.exception("could not journal job %s as %s", job.key, state)
                exception = values.pop("exception", None)
                self._reflect(job, state, exception, values.pop("previous", False), values)
        with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
            send.send_nowait(job.record)

    async def _submit(self, job: _Job, send: MemoryObjectSendStream[JobRecord]) -> None:
        assert job.scope is not None and job.spec is not None
        watch: _Watch | None = None
        failure: tuple[JobState, BaseException] | None = None
        with job.scope:
            try:
                if self._stopping:
                    raise _Stopped
                self._check_output(job)
                watch, _, _ = await self._client._submit(
                    job.spec.name,
                    job.spec.pool,
                    job.body,
                    job.params,
                    None,
                    before_send=functools.partial(self._before_send, job),
                    on_accepted=functools.partial(self._accepted, job),
                    shield=functools.partial(self._post_scope, job),
                    on_retry=functools.partial(self._not_paid, job),
                )
            except _Stopped:
                pass
            except SubmissionUncertainError as exc:
                failure = ("uncertain", exc)
            except BudgetExceededError as exc:
                failure = ("skipped", exc)
            except (APIError, APIConnectionError) as exc:
                # BFL refused it, or it never left: certainly nothing was created.
                failure = ("failed", exc)
            except Exception as exc:
                # Before its POST started nothing was sent (OutputExistsError, a closed
                # client...); after, it may have created a task (or BFL accepted it and
                # journaling failed).
                failure = ("uncertain" if job.posting else "failed", exc)
        job.post_scope = None
        self._unreserve(job)
        if watch is not None:
            await self._follow(job, watch, send)
            return
        state: JobState
        error: BaseException | None
        state, error = failure if failure is not None else ("queued", None)
        text = None if error is None else _describe(error)
        if state == "uncertain":  # this submit may have been charged
            job.risk += job.estimate
            self._at_risk += job.estimate
        elif job.uncertain is not None and not isinstance(error, APIError):
            # Asked to resubmit a job whose earlier submit is uncertain, but nothing went out
            # this time (stopped, over budget, the file exists, not sent): still uncertain
            # (the earlier submit's risk is already counted).
            state, text = "uncertain", job.uncertain
        await self._end(
            job, send, state, error=text, exception=error, risk=job.risk, safe=state == "uncertain"
        )

    def _check_output(self, job: _Job) -> None:
        if job.name is None or self._overwrite:
            return
        if existing := saved_as(self.output_dir, job.name):
            raise OutputExistsError(str(existing[0]))

    async def _before_send(self, job: _Job) -> None:
        """Right before each POST of `job`: the budget, then the journal's `submitting`."""
        if self._stopping:
            raise _Stopped
        if not job.reserved:
            committed = self._spent + self._at_risk + self._reserved
            if self.max_cost is not None and committed + job.estimate > self.max_cost + 1e-9:
                raise BudgetExceededError(
                    f"job {job.key} ({job.estimate:g} credits) was not submitted: with "
                    f"{committed:g} credits spent or in flight it would pass the budget of "
                    f"{self.max_cost:g} credits. Nothing was paid; rerun with a larger budget",
                    estimate=job.estimate,
                    spent=committed,
                    max_cost=self.max_cost,
                )
            self._reserved += job.estimate
            job.reserved = True
        job.attempts += 1
        assert self._journal is not None
        await self._journal.update(
            job.key, state="submitting", attempts=job.attempts, estimate=job.estimate
        )
        if self._stopping:  # stopped while that was written (no checkpoint comes before the
            raise _Stopped  # POST to cancel it): nothing goes out, the job stays `queued`

    async def _not_paid(self, job: _Job) -> None:
        """`job`'s last attempt was refused or never sent: journaled as before it, so a
        process killed while it waits to try again leaves the job unpaid, not uncertain."""
        job.posting = False
        assert self._journal is not None
        state = "uncertain" if job.uncertain is not None else "queued"
        await self._journal.update(job.key, state=state)

    def _post_scope(self, job: _Job) -> anyio.CancelScope:
        """The scope of `job`'s POST, made right before it goes: from now on it may be paid."""
        job.posting = True
        job.post_scope = anyio.CancelScope(shield=True)
        if self._abandoning:
            job.post_scope.cancel()
        return job.post_scope

    def _unreserve(self, job: _Job) -> None:
        if job.reserved:
            self._reserved -= job.estimate
            job.reserved = False

    async def _accepted(self, job: _Job, task: Task) -> None:
        """BFL accepted the submit: journal the paid handle before anything else."""
        self._unreserve(job)
        cost = _cost(task.cost, job.estimate)
        self._spent += cost  # at once: other jobs' budget checks must see it
        job.record = replace(job.record, task=task)  # named in the manifest whatever happens
        try:
            await self._set(job, "submitted", task=task.model_dump_json(), cost=cost, error=None)
        except BaseException:
            # Not journaled: the row still says `submitting`, and the job ends `uncertain`
            # (its estimate at risk) rather than counted twice. Reserved again until then, so
            # that no budget check in between misses it.
            self._spent -= cost
            self._reserved += job.estimate
            job.reserved = True
            raise

    @contextlib.contextmanager
    def _followed(self, job: _Job, send: MemoryObjectSendStream[JobRecord]) -> Iterator[None]:
        """Work on a paid job, ended by the batch's deadline or `stop`; a job cut short
        is reported as it stands (its journal row is already right)."""
        scope = anyio.CancelScope(deadline=self._deadline)
        self._follow_scopes.add(scope)
        try:
            with scope:
                yield
        finally:
            self._follow_scopes.discard(scope)
        if scope.cancelled_caught:
            with contextlib.suppress(anyio.BrokenResourceError, anyio.ClosedResourceError):
                send.send_nowait(job.record)

    async def _follow(
        self, job: _Job, watch: _Watch, send: MemoryObjectSendStream[JobRecord]
    ) -> None:
        """Watch a paid task to its end and download its image."""
        task = watch.task
        watch.journaled = True  # a client closed on it logs no handle: the next run has it
        with self._followed(job, send):
            try:
                if self._timeout is None:
                    result = await self._client.wait(task)
                else:
                    result = await self._client.wait(task, timeout=self._timeout)
            except _FINAL_TASK_ERRORS as exc:
                await self._end_unfetched(job, send, "failed", exc)
                return
            except Exception as exc:
                # Still paid and perhaps still running (timeout, key revoked...): kept
                # `submitted`, so the next run watches it again; one an earlier run found
                # Ready stays `ready`, since that run may have saved its image already.
                state: JobState = "ready" if job.was_ready else "submitted"
                await self._end(job, send, state, error=_describe(exc), exception=exc)
                return
            with anyio.CancelScope(shield=True):
                await self._set(job, "ready", sample=result.sample, seed=result.seed)
            await self._download(job, result, send)

    async def _download_ready(self, job: _Job, send: MemoryObjectSendStream[JobRecord]) -> None:
        """A task found Ready in an earlier run: download it from its saved URL if still
        valid, else ask BFL again for a fresh one."""
        task = job.record.task
        assert task is not None
        if not job.sample or not _still_valid(job.sample):
            await self._follow(job, self._client._attach(task), send)
            return
        result = Result(task=task, sample=job.sample, ready_at=time.time())
        with self._followed(job, send):
            await self._download(job, result, send)

    async def _download(
        self, job: _Job, result: Result, send: MemoryObjectSendStream[JobRecord]
    ) -> None:
        try:
            # Durable: the image is on disk before the journal says `downloaded`.
            path = await self._client._downloader.to_directory(
                result, self.output_dir, self._file_name(job, result.task),
                overwrite=self._overwrite or job.was_ready, durable=True,
            )  # fmt: skip
        except ResultExpiredError as exc:
            await self._end_unfetched(job, send, "expired", exc)
        except OutputExistsError as exc:
            # Another file took the name while the task ran; the paid image is kept beside it
            # (the error says where). Ended for good: a later run would take that file for
            # one it had saved itself, and overwrite it.
            await self._end(job, send, "failed", error=_describe(exc), exception=exc)
        except Exception as exc:
            # Paid and Ready: kept `ready` whatever went wrong (a refused body, a full disk,
            # a URL that does not parse), so the next run tries the download again.
            await self._end(job, send, "ready", error=_describe(exc), exception=exc)
        else:
            self._drop_parts(job, result.task)
            await self._end(job, send, "downloaded", path=path, error=None)

    async def _end_unfetched(
        self, job: _Job, send: MemoryObjectSendStream[JobRecord], state: JobState, exc: BFLError
    ) -> None:
        """End a job whose image BFL no longer serves (its URL expired, its task is gone):
        `downloaded` all the same when an earlier run moved it into place and was stopped
        before journaling that (a power cut), since only a complete image is moved there."""
        saved = self._saved_image(job) if job.was_ready else None
        if saved is not None:
            logger.info("job %s: its image was saved by an earlier run: %s", job.key, saved)
            assert job.record.task is not None
            self._drop_parts(job, job.record.task)
            await self._end(job, send, "downloaded", path=saved, error=None)
        else:
            await self._end(job, send, state, error=_describe(exc), exception=exc)

    def _saved_image(self, job: _Job) -> Path | None:
        """The image an earlier run saved for `job`'s task, if it is there: its file,
        written after the task was submitted (give or take a coarse file system's clock)."""
        task = job.record.task
        if task is None:
            return None
        name = self._file_name(job, task)
        since = (task.submitted_at or 0.0) - 2.0
        for path in saved_as(self.output_dir, name):
            with contextlib.suppress(OSError):
                if path.is_file() and path.stat().st_mtime >= since:
                    return path
        return None

    def _drop_parts(self, job: _Job, task: Task) -> None:
        """Once a job found `ready` has its image, delete the part files an earlier run's
        download of it left when it was killed (`<name>.<8 hex digits>.part`, up to an
        image's size each): nothing else would ever remove them."""
        if not job.was_ready:
            return
        for path in parts_of(self.output_dir, self._file_name(job, task)):
            with contextlib.suppress(OSError):
                path.unlink()

    @staticmethod
    def _file_name(job: _Job, task: Task) -> str:
        """The job's name, else the task id when it is a safe file name (it comes from the
        server), else a name derived from it."""
        if job.name is not None:
            return job.name
        if _SAFE_ID.fullmatch(task.id):
            return task.id
        return "task-" + hashlib.sha256(task.id.encode()).hexdigest()[:20]

    # --- the manifest -----------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        """Every job and its outcome, with the batch's totals: what manifest.json holds."""
        return {
            "output_dir": str(self.output_dir),
            "journal": str(self.journal_path),
            "summary": {
                "jobs": len(self._records),
                "states": self.counts(),
                "estimated_credits": self.estimated,
                "spent_credits": self.spent,
                "uncertain_credits": self.at_risk,
                "max_cost": self.max_cost,
            },
            "jobs": [record.manifest_entry() for record in self._records],
        }

    async def write_manifest(self) -> Path:
        """Write manifest.json next to the images, atomically; return its path."""
        text = json.dumps(self.manifest(), indent=2, ensure_ascii=False) + "\n"
        await anyio.to_thread.run_sync(_write_atomic, self.manifest_path, text)
        return self.manifest_path


def _is_local(base_url: str) -> bool:
    """An API on this machine (a fake, most likely), whose tasks and images are not BFL's."""
    host = httpx.URL(base_url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _still_valid(sample: str) -> bool:
    """Whether a result URL saved by an earlier run may still serve its image: it parses,
    and it has not expired. Otherwise BFL is asked for the task's URL again."""
    try:
        expiry = url_expiry(sample)
    except (httpx.InvalidURL, ValueError):
        return False
    return expiry is None or expiry > time.time()


def _cost(value: float | None, estimate: float) -> float:
    """Credits a task counts for: its reported cost when that is a finite number >= 0, else
    the catalog's estimate (a garbled cost must never switch the budget off)."""
    if value is None or not math.isfinite(value) or value < 0:
        return estimate
    return value


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
    os.replace(temporary, path)
