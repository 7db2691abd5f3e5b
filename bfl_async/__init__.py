"""bfl_async: the async client for Black Forest Labs' FLUX API.

```python
async with AsyncBFL() as client:  # key from BFL_API_KEY
    image = await client.generate("flux-2-pro", prompt="a red fox", output_dir="out/")
```

Everything public is listed in `__all__`; `bfl_async.testing` (a fake API for tests),
`bfl_async.webhooks` and `bfl_async.fastapi` (extra `fastapi`) are the submodules.
"""

from ._batch import Batch, JobRecord, JobState
from ._catalog import CATALOG as MODELS
from ._catalog import ModelSpec
from ._client import AsyncBFL, OnSubmitted
from ._errors import (
    APIConnectionError,
    APIError,
    AuthenticationError,
    BatchInUseError,
    BFLError,
    BudgetExceededError,
    DownloadError,
    DownloadRefusedError,
    GenerationError,
    InsufficientCreditsError,
    InvalidRequestError,
    LimiterUnavailableError,
    MissingAPIKeyError,
    ModerationError,
    NotFoundError,
    OutputExistsError,
    ParameterError,
    Problem,
    RateLimitError,
    ResultExpiredError,
    ServerError,
    SubmissionUncertainError,
    TaskError,
    TaskNotFoundError,
    UnknownModelError,
    WaitTimeoutError,
    WebhookPayloadError,
    WebhookVerificationError,
)
from ._limits import InFlightLimiter, InFlightSlot, Limiter
from ._models import GeneratedImage, Outcome, Result, Task, Timings
from ._polling import Backoff, PollSchedule
from ._requests import estimate_cost
from ._schedule import LearnedSchedule
from .webhooks import WebhookEvent, sign_webhook, verify_webhook

__version__ = "0.1.0"
"""The version of bfl_async; the package metadata reads it from here."""

__all__ = [
    "MODELS",
    "APIConnectionError",
    "APIError",
    "AsyncBFL",
    "AuthenticationError",
    "BFLError",
    "Backoff",
    "Batch",
    "BatchInUseError",
    "BudgetExceededError",
    "DownloadError",
    "DownloadRefusedError",
    "GeneratedImage",
    "GenerationError",
    "InFlightLimiter",
    "InFlightSlot",
    "InsufficientCreditsError",
    "InvalidRequestError",
    "JobRecord",
    "JobState",
    "LearnedSchedule",
    "Limiter",
    "LimiterUnavailableError",
    "MissingAPIKeyError",
    "ModelSpec",
    "ModerationError",
    "NotFoundError",
    "OnSubmitted",
    "Outcome",
    "OutputExistsError",
    "ParameterError",
    "PollSchedule",
    "Problem",
    "RateLimitError",
    "Result",
    "ResultExpiredError",
    "ServerError",
    "SubmissionUncertainError",
    "Task",
    "TaskError",
    "TaskNotFoundError",
    "Timings",
    "UnknownModelError",
    "WaitTimeoutError",
    "WebhookEvent",
    "WebhookPayloadError",
    "WebhookVerificationError",
    "__version__",
    "estimate_cost",
    "sign_webhook",
    "verify_webhook",
]
