"""Where a command sends its requests: the real API, or a FakeBFL embedded in the process."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from bfl_async import AsyncBFL, Limiter, OnSubmitted
from bfl_async.testing import fake_client

__all__ = [
    "CLIError",
    "Connection",
    "Region",
    "fake_generation_time",
    "open_client",
    "with_client",
]

Region = Literal["global", "eu", "us"]
T = TypeVar("T")

NO_KEY = (
    "BFL_API_KEY is not set. Set it (or pass --api-key) to run against BFL's API, which "
    "bills your account; or add --fake to run against a local fake API without a key."
)


class CLIError(Exception):
    """A problem the command reports as one `error:` line before exiting with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        self.exit_code = exit_code
        super().__init__(message)


@dataclass(frozen=True)
class Connection:
    """The common options: which API, which key, how many tasks in flight."""

    api_key: str | None = field(repr=False)
    base_url: str | None = None
    region: Region = "global"
    concurrency: int | None = None
    fake: bool = False
    close_grace: float = 30.0
    """Seconds the client waits for tasks in flight when it closes."""
    limiter: str | None = field(default=None, repr=False)
    """A Redis URL sharing the in-flight limits with other processes (it may hold a password)."""
    holds_slots: bool = True
    """False for a command that submits nothing (`credits`): it needs no shared limiter, and
    a Redis that is down (`BFL_LIMITER_URL`) must not stop it."""

    def check(self) -> None:
        """Refuse to go on without a key, rather than ever faking a paid run silently."""
        if not self.fake and not self.api_key:
            raise CLIError(NO_KEY)

    @property
    def limits(self) -> dict[str, int] | None:
        """The in-flight limits `--concurrency` asks for (None: the library's defaults)."""
        n = self.concurrency
        return None if n is None else {"standard": n, "kontext-max": min(6, n)}


def fake_generation_time(model: str, rng: random.Random) -> float:
    """Seconds a task of `bfl fake-server` takes: 0.5 to 2 s, as with `--fake`."""
    return rng.uniform(0.5, 2.0)


@asynccontextmanager
async def open_client(
    connection: Connection, *, on_submitted: OnSubmitted | None = None
) -> AsyncIterator[AsyncBFL]:
    """An open AsyncBFL for `connection`; with `fake`, against a FakeBFL in this event loop."""
    connection.check()
    if not connection.fake:
        try:
            client = AsyncBFL(
                connection.api_key,
                region=connection.region,
                base_url=connection.base_url,
                limits=connection.limits,
                limiter=connection.limiter if connection.holds_slots else Limiter(),
                on_submitted=on_submitted,
                close_grace=connection.close_grace,
            )
        except ValueError as exc:  # a key with a space, a limiter URL that is not redis://
            raise CLIError(str(exc)) from None
        async with client:
            yield client
        return
    async with AsyncExitStack() as stack:
        try:
            client = await stack.enter_async_context(
                fake_client(  # an account of its own: never the shared limiter's slots
                    limits=connection.limits,
                    on_submitted=on_submitted,
                    close_grace=connection.close_grace,
                )
            )
        except ValueError as exc:  # a bad BFL_FAKE_TIME_SCALE
            raise CLIError(str(exc)) from None
        yield client


async def with_client(
    connection: Connection,
    action: Callable[[AsyncBFL], Awaitable[T]],
    *,
    on_submitted: OnSubmitted | None = None,
) -> T:
    """Run `action(client)` and return its value, or raise its exception as it was."""
    async with open_client(connection, on_submitted=on_submitted) as client:
        return await action(client)
