"""The learned poll schedule: poll where tasks are likely to finish, nowhere else.

A slot stays taken until the client *sees* its task finish, so late detection slows a whole
batch, while polling often burns the API's request budget. `LearnedSchedule` learns each
model's distribution of completion times from the tasks it watches, and computes the poll
times that minimise the expected detection delay for a given number of polls per task.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

from ._catalog import CATALOG
from ._models import Task

__all__ = ["LearnedSchedule"]

_MIN_DELAY = 0.05
_MAX_DELAY = 10.0
_GRID = 200
_SEARCH_STEPS = 16
_ROUNDS = 3


def _lognormal_cdf(median: float, sigma: float) -> Callable[[float], float]:
    mu = math.log(median)
    scale = sigma * math.sqrt(2.0)

    def cdf(t: float) -> float:
        return 0.0 if t <= 0 else 0.5 * (1.0 + math.erf((math.log(t) - mu) / scale))

    return cdf


class _Policy:
    """Where to poll next from any moment, for one estimate of the completion-time CDF.

    Time is cut into `_GRID` steps up to a horizon. For the cost "expected detection delay
    plus `price` per poll", `after[i]` is the best next poll after a poll at step i that
    still found the task pending (dynamic programming over the grid, from the horizon back).
    """

    def __init__(self, step: float, after: list[int]) -> None:
        self.step = step
        self.after = after

    @classmethod
    def solve(cls, cdf: list[float], step: float, polls_per_task: float) -> _Policy:
        """The policy whose expected number of polls per task is `polls_per_task`."""
        size = len(cdf)
        moment = [0.0] * size  # ∫ t dF up to each grid point
        for k in range(1, size):
            moment[k] = moment[k - 1] + (cdf[k] - cdf[k - 1]) * (k - 0.5) * step
        low, high = 1e-4, 100.0
        best = cls._plan(cdf, moment, step, high)
        for _ in range(_SEARCH_STEPS):
            price = math.sqrt(low * high)
            after = cls._plan(cdf, moment, step, price)
            if cls._expected_polls(cdf, after) > polls_per_task:
                low = price
            else:
                high, best = price, after
        return cls(step, best)

    @staticmethod
    def _plan(cdf: list[float], moment: list[float], step: float, price: float) -> list[int]:
        size = len(cdf)
        last = size - 1
        cost = [0.0] * size
        after = [last] * size
        cost[last] = (1.0 - cdf[last]) * (price + 0.5)
        for i in range(last - 1, -1, -1):
            made = price * (1.0 - cdf[i])  # the next poll happens if the task was pending
            fi, mi = cdf[i], moment[i]
            best, choice = math.inf, last
            for j in range(i + 1, size):
                c = made + j * step * (cdf[j] - fi) - (moment[j] - mi) + cost[j]
                if c < best:
                    best, choice = c, j
            cost[i], after[i] = best, choice
        return after

    @staticmethod
    def _expected_polls(cdf: list[float], after: list[int]) -> float:
        polls, i = 0.0, 0
        while i < len(after) - 1:
            polls += 1.0 - cdf[i]
            i = after[i]
        return polls + 1.0 - cdf[i]

    def next_poll(self, elapsed: float) -> float | None:
        """Seconds after acceptance of the next poll, or None past the horizon."""
        i = int(elapsed / self.step)
        if i >= len(self.after) - 1:
            return None
        return self.after[i] * self.step


class _Model:
    """What is known of one model's completion times."""

    def __init__(self, typical: float, sigma: float, window: int) -> None:
        self.prior = _lognormal_cdf(typical, sigma)
        self.prior_horizon = typical * math.exp(3.3 * sigma)
        self.seen: deque[tuple[float, float]] = deque(maxlen=window)
        self.pending: dict[str, float] = {}
        self.policy: _Policy | None = None
        self.planned_at = -1

    def due(self) -> bool:
        n = len(self.seen)
        if self.policy is None:
            return True
        if n == self.planned_at:
            return False
        # Often while little is known, then every 32 tasks.
        return n < 8 or (n < 64 and n & (n - 1) == 0) or n - self.planned_at >= 32

    def cdf(self, step: float, size: int, prior_weight: float) -> list[float]:
        """The completion-time CDF on the grid (points `k * step`), Kaplan-Meier style.

        A finished task is an event somewhere in the interval where it finished, shared out
        in proportion to the current estimate (Turnbull's self-consistency, a few rounds),
        so a wide interval such as "before the first poll" does not smear mass towards 0.
        Tasks still pending count as at risk up to their last pending poll, so the early
        finishers of a batch do not make the model look faster than it is; the prior counts
        as `prior_weight` tasks.
        """
        prior = [
            prior_weight * (self.prior((k + 1) * step) - self.prior(k * step))
            for k in range(size)
        ]
        spans: list[tuple[int, list[float]]] = []
        for lower, upper in self.seen:
            a, b = lower / step, max(upper, lower + 1e-9) / step
            first = min(int(a), size - 1)
            shares = [
                max(0.0, min(b, k + 1) - max(a, k)) for k in range(first, min(int(b), size - 1) + 1)
            ]
            spans.append((first, shares or [1.0]))
        censored = [0] * (size + 1)
        for last in self.pending.values():
            censored[min(int(last / step), size)] += 1
        cdf = [0.0] * size
        density = [1.0] * size
        for _ in range(_ROUNDS):
            events = list(prior)
            for first, shares in spans:
                weights = [w * density[first + i] for i, w in enumerate(shares)]
                total = sum(weights) or 1.0
                for i, w in enumerate(weights):
                    events[first + i] += w / total
            at_risk = prior_weight + len(self.seen) + len(self.pending)
            survival = 1.0
            for k in range(size):
                cdf[k] = 1.0 - survival
                if at_risk > 1e-9:
                    survival *= max(0.0, 1.0 - events[k] / at_risk)
                at_risk -= events[k] + censored[k]
                density[k] = max(1e-6, (1.0 - survival) - cdf[k])
        return cdf


class LearnedSchedule:
    """Polls where completion is likely, learned per model from the tasks the client watches.

    Each model starts from a prior around the catalog's typical time and learns from the
    last `window` tasks: each one finished between the last poll that found it pending and
    the poll that found it ready. The poll times minimise the expected delay between a task
    finishing and the client seeing it, for `polls_per_task` polls per task on average
    (raise it for earlier detection; the client's `poll_rate` budget still caps the total).
    When the API reports progress (FLUX.1 models), the finish is extrapolated from it.
    """

    def __init__(
        self,
        polls_per_task: float = 3.5,
        *,
        window: int = 256,
        prior_weight: float = 2.0,
        prior_sigma: float = 0.6,
    ) -> None:
        if polls_per_task < 1:
            raise ValueError("polls_per_task must be at least 1")
        self.polls_per_task = polls_per_task
        self._window = window
        self._prior_weight = prior_weight
        self._prior_sigma = prior_sigma
        self._models: dict[str, _Model] = {}

    def __repr__(self) -> str:
        return f"LearnedSchedule(polls_per_task={self.polls_per_task})"

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            spec = CATALOG.get(name)
            typical = spec.typical_seconds if spec is not None else 6.0
            model = self._models[name] = _Model(typical, self._prior_sigma, self._window)
        return model

    def _policy(self, model: _Model) -> _Policy:
        if model.policy is None or model.due():
            # A coarse pass finds where the distribution ends; the fine grid covers that.
            coarse = model.cdf(model.prior_horizon / 50, 51, self._prior_weight)
            end = next((k for k, f in enumerate(coarse) if f >= 0.999), 50)
            step = max(0.01, 1.25 * (end + 1) * model.prior_horizon / 50 / _GRID)
            cdf = model.cdf(step, _GRID, self._prior_weight)
            model.policy = _Policy.solve(cdf, step, self.polls_per_task)
            model.planned_at = len(model.seen)
        return model.policy

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        """Seconds until the next poll of `task`, last found pending `elapsed` s after its
        acceptance (just accepted for attempt 0)."""
        model = self._model(task.model)
        if attempt:
            model.pending[task.id] = elapsed
        policy = self._policy(model)
        planned = policy.next_poll(elapsed)
        delay = (
            planned - elapsed
            if planned is not None
            else max(0.5, 0.25 * elapsed)  # past everything seen: back off
        )
        if progress is not None and 0.0 < progress < 1.0 and elapsed > 0:
            delay = min(delay, elapsed * (1.0 - progress) / progress)
        return min(_MAX_DELAY, max(_MIN_DELAY, delay))

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        """`task` was found ready between `lower` and `upper` s after acceptance (or, with
        `upper` None, its watch ended otherwise: moderated, failed, cancelled)."""
        model = self._model(task.model)
        model.pending.pop(task.id, None)
        if upper is not None:
            model.seen.append((max(0.0, lower), max(lower, upper)))
