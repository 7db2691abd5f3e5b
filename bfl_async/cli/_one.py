"""One task through Ctrl-C, for `bfl generate` and `bfl wait`: a paid image is saved within
the grace, or the command says how to fetch it later; never dropped unsaid."""

from __future__ import annotations

import logging
import math
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import anyio

from bfl_async import AsyncBFL, GeneratedImage, Task

__all__ = ["OneTask", "Saved", "handles_told", "watch_one"]


@dataclass(frozen=True)
class Saved:
    """An image saved to disk, and the task that made it."""

    path: Path
    task: Task
    seed: int | None


@dataclass
class OneTask:
    """What a command watching one task knows: the signals it heard, and the task once paid.

    A first signal stops a command that has sent nothing (a submit on its way still gets
    its answer: the library waits for it), and gives a paid task `grace` seconds to end and
    its image to be saved; a second signal stops waiting; a third, while a submit still
    waits for its answer, calls `leave`.
    """

    grace: float
    say: Callable[[str], None]
    """Prints a line for the user (on stderr)."""
    pool: str = "standard"
    task: Task | None = None
    """The task's handle, once BFL accepted it (`accepted` is the `on_submitted` callback)."""
    signals: int = 0
    saved: Saved | None = None
    deadline: float = math.inf
    """When a first signal stops the wait for the image (its grace after the task is paid)."""
    client: AsyncBFL | None = None
    leave: Callable[[], None] | None = None
    """Ends the process at once, abandoning a submit that still waits for its answer (the
    library waits for that answer, shielded, however long it takes: it may be a paid task)."""
    scope: anyio.CancelScope = field(init=False, repr=False)
    """What the next signal cancels (or gives a deadline); made on the event loop."""

    def accepted(self, task: Task) -> None:
        """The task is paid; after a first signal, its grace starts now."""
        self.task = task
        if self.signals == 1:
            self._wait_for_image()

    def heard(self) -> None:
        """Stop as a signal asks."""
        self.signals += 1
        if self.saved is not None:  # too late to stop anything
            return
        if self.signals == 1 and self.task is not None:
            self._wait_for_image()
            return
        self.scope.cancel()
        if not self._posting():
            return
        if self.signals == 1:
            self.say(
                "stopping: a submit may be on its way; waiting for its answer, which says "
                "whether the task is paid"
            )
        elif self.signals == 2:
            self.say(
                "stopping now; still waiting for the submit's answer, which says whether the "
                "task is paid (press Ctrl-C again to abandon it: BFL may then charge for a "
                "task whose image this command cannot fetch)"
            )
        elif self.leave is not None:
            self.leave()

    def _posting(self) -> bool:
        """Whether a submit is on its way: a slot is held, and no task is known yet."""
        client = self.client
        return self.task is None and client is not None and client.limiter.in_use(self.pool) > 0

    def _wait_for_image(self) -> None:
        assert self.task is not None
        self.deadline = anyio.current_time() + self.grace
        self.scope.deadline = self.deadline
        if self.grace > 0:
            self.say(
                f"stopping: task {self.task.id} is paid; waiting up to {self.grace:g} s for "
                "its image (press Ctrl-C again to stop waiting)"
            )


async def watch_one(
    one: OneTask,
    open_client: Callable[[], AbstractAsyncContextManager[AsyncBFL]],
    generate: Callable[[AsyncBFL], Awaitable[GeneratedImage]] | None,
    output_dir: Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
    timeout: float | None = None,
) -> Saved | None:
    """Run `generate`, or wait for `one.task` and download its image; return where it was
    saved, or None if signals stopped the command first (`one.task` says whether it paid).

    SIGINT and SIGTERM are heard from before the client opens: never a KeyboardInterrupt.
    """
    one.scope = anyio.CancelScope()
    failure: Exception | None = None
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with anyio.create_task_group() as tg:
            tg.start_soon(_listen, one, signals)
            try:
                async with open_client() as client:
                    one.client = client
                    one.saved = await _save(
                        client, one, generate, output_dir, name, overwrite, timeout
                    )
            except Exception as exc:  # raised as it is, not in the task group's ExceptionGroup
                failure = exc
            finally:
                tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return one.saved


async def _listen(one: OneTask, signals: AsyncIterator[int]) -> None:
    async for _ in signals:
        one.heard()


async def _save(
    client: AsyncBFL,
    one: OneTask,
    generate: Callable[[AsyncBFL], Awaitable[GeneratedImage]] | None,
    output_dir: Path,
    name: str | None,
    overwrite: bool,
    timeout: float | None,
) -> Saved | None:
    with one.scope:
        if generate is not None:
            image = await generate(client)
            return Saved(image.path, image.task, image.seed)
    # `wait` (or `generate` stopped by a signal, perhaps while its submit was on its way:
    # once paid, its task has what is left of its grace).
    if one.task is None or one.signals > 1 or anyio.current_time() >= one.deadline:
        return None
    one.scope = anyio.CancelScope(deadline=one.deadline)
    with one.scope:
        result = await client.wait(one.task, timeout=timeout)
        path = await client.download(result, output_dir, name=name, overwrite=overwrite)
        return Saved(path, result.task, result.seed)
    return None


@contextmanager
def handles_told(one: OneTask) -> Iterator[None]:
    """Leave out the library's log lines that give `one.task`'s handle to resume it in
    Python: the command says itself how to fetch its image."""

    def keep(record: logging.LogRecord) -> bool:
        if one.task is None:
            return True
        handle = one.task.model_dump_json()
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot be formatted is the handler's to report
            return True
        return handle not in message and repr(handle) not in message

    logger = logging.getLogger("bfl_async")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
