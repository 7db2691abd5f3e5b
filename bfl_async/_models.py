"""The values the client hands back: task handles, results and generated images."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["GeneratedImage", "Outcome", "Result", "Task", "Timings"]


class Task(BaseModel):
    """A handle on an accepted (paid) task: small, immutable and serialisable.

    Store it the moment `on_submitted` hands it over; `Task.model_validate_json(text)` rebuilds
    it in another process and `client.wait(task)` picks the task up again.

    ```python
    text = task.model_dump_json()  # in a database, a queue, a file
    result = await client.wait(Task.model_validate_json(text))  # later, anywhere
    ```
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    polling_url: str
    model: str
    cost: float | None = None
    input_mp: float | None = None
    output_mp: float | None = None
    submitted_at: float | None = None
    """Wall-clock time (`time.time()`) when BFL accepted the task."""


class Result(BaseModel):
    """A task that reached `Ready`: where its image is and how it was made."""

    model_config = ConfigDict(frozen=True)

    task: Task
    sample: str
    """The signed delivery URL of the image; it expires about 10 minutes after the task ends."""
    seed: int | None = None
    prompt: str | None = None
    start_time: float | None = None
    end_time: float | None = None
    duration: float | None = None
    ready_at: float
    """Wall-clock time at which the client saw the task `Ready`."""
    polls: int = 0
    """How many poll requests it took to see the task terminal."""
    raw: dict[str, Any] = {}
    """The `result` object of the poll answer, as the API sent it."""


class Timings(BaseModel):
    """Seconds spent in each step of `generate`."""

    model_config = ConfigDict(frozen=True)

    queued: float
    """Waiting for an in-flight slot."""
    submit: float
    """The submit request, until BFL accepted the task."""
    generation: float
    """From acceptance until the client saw the task terminal."""
    download: float
    total: float


class GeneratedImage(BaseModel):
    """An image generated and saved to disk by `generate`."""

    model_config = ConfigDict(frozen=True)

    path: Path
    """Where the image was saved: `<output_dir>/<name or task id>.<jpg|png|webp>`."""
    task: Task
    """The task's handle."""
    seed: int | None
    """The seed BFL used: pass it back as `seed=` to make the image again."""
    timings: Timings
    result: Result
    """The finished task as the poll answer described it."""

    @property
    def task_id(self) -> str:
        """The BFL task id."""
        return self.task.id

    @property
    def model(self) -> str:
        """The model (path under `/v1/`) that generated the image."""
        return self.task.model

    @property
    def cost(self) -> float | None:
        """Credits charged, as the submit answer reported them (None for FLUX.1 models)."""
        return self.task.cost


@dataclass(frozen=True)
class Outcome:
    """One job of `generate_many`: its image, or the error that ended it."""

    index: int
    """The job's position in the requests given to `generate_many`."""
    request: Mapping[str, Any] = field(repr=False)
    """The request as given: it may hold a `webhook_secret` and whole images, so never in
    the repr."""
    image: GeneratedImage | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        """True when the image was generated and saved."""
        return self.image is not None
