"""A client on a fake started just for it: the `--fake` switch of `bfl`, for any program."""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from .._client import AsyncBFL
from .._limits import Limiter
from .._polling import Backoff
from ._fake import FakeBFL

__all__ = ["FAKE_TIME_SCALE_ENV", "fake_client"]

FAKE_TIME_SCALE_ENV = "BFL_FAKE_TIME_SCALE"
"""The environment variable that scales `fake_client`'s generation times (tests set it low)."""


def _generation_time(model: str, rng: random.Random) -> float:
    return rng.uniform(0.5, 2.0)  # long enough to see a progress display move


def _time_scale_from_env() -> float:
    raw = os.environ.get(FAKE_TIME_SCALE_ENV, "1")
    try:
        scale = float(raw)
    except ValueError:
        scale = -1.0
    if not 0 <= scale < float("inf"):
        raise ValueError(f"{FAKE_TIME_SCALE_ENV} must be a number >= 0, not {raw!r}")
    return scale


@asynccontextmanager
async def fake_client(
    *, time_scale: float | None = None, **options: Any
) -> AsyncIterator[AsyncBFL]:
    """An open `AsyncBFL` on a `FakeBFL` served on loopback for as long as it is open.

    What `bfl ... --fake` runs on, for a `--fake` switch in your own program: no key, no
    cost, real HTTP. Fake tasks take 0.5 to 2 s, times `time_scale` (by default
    `BFL_FAKE_TIME_SCALE`, else 1), and the client polls them quickly; `options` go to
    `AsyncBFL` (`limits`, `on_submitted`...). The fake is an account of its own: its client
    limits in process, never through `BFL_LIMITER_URL`'s Redis, unless `limiter=` is given.

        async with fake_client() if args.fake else AsyncBFL() as client:
            image = await client.generate("flux-2-pro", prompt="a red fox")
    """
    scale = _time_scale_from_env() if time_scale is None else time_scale
    options.setdefault("poll_schedule", Backoff(initial=0.05, factor=1.5, maximum=0.5))
    if options.get("limiter") is None:
        options["limiter"] = Limiter(
            options.pop("limits", None), separate_pools=options.pop("separate_pools", False)
        )
    async with (
        FakeBFL(generation_time=_generation_time, time_scale=scale) as fake,
        AsyncBFL(fake.api_key, base_url=fake.base_url, **options) as client,
    ):
        yield client
