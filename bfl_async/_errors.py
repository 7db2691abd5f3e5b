"""Every error bfl_async raises: one hierarchy under `BFLError`.

Each class maps to one situation a caller can act on, and every message says what
happened and what to do next. No error carries the API key or an `httpx.Request`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._models import Result, Task

__all__ = [
    "APIConnectionError",
    "APIError",
    "AuthenticationError",
    "BFLError",
    "BatchInUseError",
    "BudgetExceededError",
    "DownloadError",
    "DownloadRefusedError",
    "GenerationError",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "LimiterUnavailableError",
    "MissingAPIKeyError",
    "ModerationError",
    "NotFoundError",
    "OutputExistsError",
    "ParameterError",
    "Problem",
    "RateLimitError",
    "ResultExpiredError",
    "ServerError",
    "SubmissionUncertainError",
    "TaskError",
    "TaskNotFoundError",
    "UnknownModelError",
    "WaitTimeoutError",
    "WebhookPayloadError",
    "WebhookVerificationError",
]


class BFLError(Exception):
    """Base class of every error raised by bfl_async."""

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from its attributes, not by calling `__init__` with `args` (most take
        # keyword-only ones): an error can cross processes (a process pool, a job queue).
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type[BFLError], args: tuple[Any, ...], state: dict[str, Any]) -> BFLError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class MissingAPIKeyError(BFLError):
    """No API key was given and `BFL_API_KEY` is not set."""


class LimiterUnavailableError(BFLError):
    """The shared in-flight limiter (Redis) cannot be reached: no new submit is made.

    Raised when the client starts and Redis does not answer, and by every submit waiting
    for a slot once it stops answering mid-run; tasks already accepted keep being watched
    and downloaded. `url` is the limiter's address, password redacted.
    """

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


# --- local validation: raised before anything is sent ----------------------------------


@dataclass(frozen=True)
class Problem:
    """One invalid request parameter: which field, what is wrong, what is allowed."""

    field: str
    message: str
    allowed: str | None = None

    def __str__(self) -> str:
        text = f"{self.field}: {self.message}"
        return f"{text} (allowed: {self.allowed})" if self.allowed else text


class ParameterError(BFLError, ValueError):
    """Request parameters failed local validation; nothing was sent and nothing was paid.

    ```python
    try:
        await client.generate("flux-2-pro", prompt="a fox", width=1000)
    except ParameterError as e:
        print(e.fields)  # ["width"]: the message gives the allowed values
    ```
    """

    def __init__(self, model: str, problems: Sequence[Problem]) -> None:
        self.model = model
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid parameters for {model!r} (nothing was sent):\n{lines}")

    @property
    def fields(self) -> list[str]:
        """The names of the offending fields, in order."""
        return [p.field for p in self.problems]


class UnknownModelError(ParameterError):
    """The model name is not in the catalog; `submit_raw` reaches models newer than it."""

    def __init__(self, model: str, known: Sequence[str]) -> None:
        self.known = list(known)
        problem = Problem(
            "model",
            f"unknown model {model!r}; use client.submit_raw() for models newer than the catalog",
            ", ".join(self.known),
        )
        super().__init__(model, [problem])


class OutputExistsError(BFLError, FileExistsError):
    """The output file already exists; pass `overwrite=True` to replace it."""

    def __init__(self, path: str, *, kept: str | None = None) -> None:
        self.path = path
        self.kept = kept
        message = f"{path} already exists; pass overwrite=True or choose another name"
        if kept:
            message += f". The downloaded image was kept at {kept}"
        super().__init__(message)


class BudgetExceededError(BFLError):
    """A batch job was not submitted: its price would take the batch past `max_cost`.

    Nothing was sent and nothing was paid; rerun the batch with a larger budget to run it.
    """

    def __init__(self, message: str, *, estimate: float, spent: float, max_cost: float) -> None:
        self.estimate = estimate
        self.spent = spent
        self.max_cost = max_cost
        super().__init__(message)


class BatchInUseError(BFLError):
    """This batch's journal is not this run's to use: nothing was sent.

    Another run holds it (two runs of one batch at once would each pay for the jobs not yet
    sent), or its tasks belong to another API: a local fake's, where this run uses BFL's,
    or the other way round (its placeholder images would pass for paid ones).
    """

    def __init__(self, journal: str, *, api: str | None = None) -> None:
        self.journal = journal
        self.api = api
        """For a journal of another API, that API's base URL."""
        if api is None:
            message = (
                f"another run is using the batch journal {journal}: wait for it to end, or "
                "give this run another output directory (two runs of one batch at once "
                "would pay for the same jobs twice)"
            )
        else:
            message = (
                f"the batch journal {journal} belongs to a run against {api}, another API "
                "than this one (a local fake and BFL's): give this run another output "
                "directory"
            )
        super().__init__(message)


# --- answers from the API ---------------------------------------------------------------


class APIError(BFLError):
    """The API answered with an HTTP error status. For a poll, `task` is the handle of the
    task polled: accepted, and paid, it may still finish, and `wait(e.task)` polls it again."""

    def __init__(
        self, message: str, *, status_code: int, body: Any = None, task: Task | None = None
    ) -> None:
        self.status_code = status_code
        self.body = body
        self.task = task
        super().__init__(message)

    @property
    def detail(self) -> Any:
        """The `detail` field of the answer's JSON body, if it had one."""
        if isinstance(self.body, Mapping):
            return self.body.get("detail")
        return None


class AuthenticationError(APIError):
    """401/403: the API key is missing, wrong or revoked. Do not retry with the same key."""


class InsufficientCreditsError(APIError):
    """402: the account is out of credits. Top up at dashboard.bfl.ai, then retry."""


class NotFoundError(APIError):
    """404: the path does not exist (for a submit: the model path is unknown to the API)."""


class InvalidRequestError(APIError):
    """400/422: the API refused the request's contents; `errors` holds its detail list."""

    @property
    def errors(self) -> list[Any]:
        """The server's validation details (FastAPI's list for a 422, else one string)."""
        detail = self.detail
        if isinstance(detail, list):
            return detail
        return [] if detail is None else [detail]


class RateLimitError(APIError):
    """429: too many tasks in flight on this account, retries exhausted."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 429,
        body: Any = None,
        retry_after: float | None = None,
        task: Task | None = None,
    ) -> None:
        self.retry_after = retry_after
        super().__init__(message, status_code=status_code, body=body, task=task)


class ServerError(APIError):
    """5xx: trouble on BFL's side."""


class APIConnectionError(BFLError):
    """The API could not be reached; the request was certainly not sent, so nothing was paid."""


class SubmissionUncertainError(BFLError):
    """A submit may or may not have created a (paid) task; it was deliberately not retried.

    BFL has no idempotency key, so nobody can tell from here. `model` and `params` let the
    caller resubmit once they have checked, for example in the dashboard: the parameters as
    given, in full, but without secrets (pass your own `webhook_secret` again; the client's
    own webhook is added again by the client).

    ```python
    except SubmissionUncertainError as e:
        review_later(e.model, e.params, e.reason)  # never resubmit blindly
    ```
    """

    def __init__(self, reason: str, *, model: str, params: Mapping[str, Any]) -> None:
        self.reason = reason
        self.model = model
        self.params = dict(params)
        super().__init__(
            f"submit to {model!r} may or may not have created a paid task ({reason}); "
            "it was not retried, to avoid paying twice. Check your BFL dashboard, then "
            "resubmit with .model and .params if no task was created"
        )


# --- task outcomes ------------------------------------------------------------------------


class TaskError(BFLError):
    """A task ended without a usable image; `task` is its handle."""

    def __init__(self, message: str, *, task: Task) -> None:
        self.task = task
        super().__init__(message)


class ModerationError(TaskError):
    """The request (`kind="request"`) or the generated image (`kind="content"`) was moderated."""

    def __init__(self, *, task: Task, kind: str, reasons: Sequence[str]) -> None:
        self.kind = kind
        self.reasons = list(reasons)
        why = f": {', '.join(self.reasons)}" if self.reasons else ""
        what = "the prompt or input images" if kind == "request" else "the generated image"
        super().__init__(
            f"task {task.id} was moderated ({what}){why}; change the request and try again",
            task=task,
        )


class GenerationError(TaskError):
    """BFL reported `Error` for the task: generation failed on its side. Retrying may work."""


class TaskNotFoundError(TaskError):
    """BFL does not know the task (wrong or expired id, or polled on the wrong host)."""


class WaitTimeoutError(TaskError, TimeoutError):
    """`wait` reached its deadline; the task may still finish: call `wait(e.task)` again."""


class ResultExpiredError(TaskError):
    """The signed result URL has expired (about 10 minutes after the task finished)."""


class DownloadError(TaskError):
    """The image could not be downloaded intact: download `result` again while its URL is
    valid (nothing is charged for that); `generate` leaves it here for that."""

    def __init__(self, message: str, *, task: Task, result: Result) -> None:
        self.result = result
        super().__init__(message, task=task)


class DownloadRefusedError(DownloadError):
    """The delivery host sent something that is not an image we keep: larger than the cap,
    or not a PNG, JPEG or WebP by its first bytes. Not retried; the handle is kept, so the
    result can be fetched again (with a larger `max_download_bytes`, say) while it is valid."""


# --- webhooks -----------------------------------------------------------------------------


class WebhookVerificationError(BFLError):
    """A webhook delivery has no valid signature or secret: reject it (HTTP 401)."""


class WebhookPayloadError(BFLError):
    """A verified webhook delivery has a body that is not a task event: answer 400."""
