"""The learned poll schedule: poll where tasks are likely to finish, nowhere else.

A slot stays taken until the client *sees* its task finish, so late detection slows a whole
batch, while polling often burns the API's request budget. `LearnedSchedule` learns each
model's distribution of completion times from the tasks it watches, and computes the poll
times that minimise the expected detection delay for a given number of polls per task.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import deque
from collections.abc import Callable

from ._catalog import CATALOG
from ._models import Task

__all__ = ["LearnedSchedule"]

_MIN_DELAY = 0.05
_MAX_DELAY = 10.0
_GRID = 400
_SEARCH_STEPS = 10
_SIGMA_STEP = 0.05
_NEWTON_STEPS = 12
_HALVINGS = 20  # of a Newton step that overshot
_LEARNING = 8  # tasks seen before the plan stops exploring
_EXPLORE = 2.0  # extra polls per task while learning
_Z995 = 2.5758  # the standard normal's 99.5 % quantile
_Z01 = -2.3263  # ... and its 1 % quantile
_TRUST_AFTER = 8  # tasks whose progress foretold their end, before it is trusted
_TRUST_ERROR = 0.05  # how far off (relative) 9 of 10 of those foretold ends may be
_BATCH = 4  # tasks watched at once that make a batch
_LAST_GAP = 0.15  # seconds between polls of the last task left of a batch


def _lognormal_cdf(median: float, sigma: float) -> Callable[[float], float]:
    mu = math.log(median)
    scale = sigma * math.sqrt(2.0)

    def cdf(t: float) -> float:
        return 0.0 if t <= 0 else 0.5 * (1.0 + math.erf((math.log(t) - mu) / scale))

    return cdf


class _Policy:
    """When to poll, for one estimate of the completion-time CDF.

    Time is cut into `_GRID` steps up to a horizon. For the cost "expected detection delay
    plus `price` per poll", `after[i]` is the best next poll after a poll at step i that
    still found the task pending (dynamic programming over the grid, from the horizon back);
    `times` follows it from acceptance. A task polls at those times, whether or not the poll
    budget moved its last poll: the plan stays where completions are likely.
    """

    def __init__(self, step: float, after: list[int]) -> None:
        self.step = step
        self.after = after
        # The polls of a task that stays pending (after acceptance at 0).
        self.times = [0.0]
        i = 0
        while i < len(after) - 1:
            i = after[i]
            self.times.append(i * step)

    @classmethod
    def solve(cls, cdf: list[float], step: float, polls_per_task: float) -> _Policy:
        """The policy whose expected number of polls per task is `polls_per_task`."""
        size = len(cdf)
        moment = [0.0] * size  # ∫ t dF up to each grid point
        for k in range(1, size):
            moment[k] = moment[k - 1] + (cdf[k] - cdf[k - 1]) * (k - 0.5) * step
        low, high = 1e-3, 10.0
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
        # The cost of polling at j after i, given cdf[i] = x, is a line in x:
        #   price * (1 - x) + moment[i] + (b[j] - j * step * x),
        #   b[j] = j * step * cdf[j] - moment[j] + cost[j],
        # so the best j is found on the lower envelope of those lines (the convex hull
        # trick). Lines come in with rising slope (-j * step, j falling) and queries with
        # falling x, so one pass with a deque does it: O(grid), not O(grid**2).
        size = len(cdf)
        last = size - 1
        cost = [0.0] * size
        after = [last] * size
        cost[last] = (1.0 - cdf[last]) * (price + 0.5)
        slopes = [-j * step for j in range(size)]
        heights = [0.0] * size
        heights[last] = last * step * cdf[last] - moment[last] + cost[last]
        hull: deque[int] = deque([last])
        for i in range(last - 1, -1, -1):
            x = cdf[i]
            while len(hull) > 1 and (
                slopes[hull[1]] * x + heights[hull[1]] <= slopes[hull[0]] * x + heights[hull[0]]
            ):
                hull.popleft()
            j = hull[0]
            cost[i] = price * (1.0 - x) + moment[i] + slopes[j] * x + heights[j]
            after[i] = j
            heights[i] = i * step * x - moment[i] + cost[i]
            while len(hull) > 1 and _crossing(slopes, heights, hull[-1], i) >= _crossing(
                slopes, heights, hull[-2], hull[-1]
            ):
                hull.pop()
            hull.append(i)
        return after

    @staticmethod
    def _expected_polls(cdf: list[float], after: list[int]) -> float:
        polls, i = 0.0, 0
        while i < len(after) - 1:
            polls += 1.0 - cdf[i]
            i = after[i]
        return polls + 1.0 - cdf[i]

    def polls_until(self, finish: float) -> int:
        """How many polls the policy makes of a task that finishes at `finish`."""
        return bisect.bisect_left(self.times, finish, lo=1)

    def next_poll(self, elapsed: float) -> float | None:
        """The first poll after `elapsed`, or None past the horizon."""
        k = bisect.bisect_right(self.times, elapsed + 1e-9)
        return self.times[k] if k < len(self.times) else None


def _crossing(slopes: list[float], heights: list[float], a: int, b: int) -> float:
    """Where lines a and b of the hull cross."""
    return (heights[b] - heights[a]) / (slopes[a] - slopes[b])


def _phi(z: float) -> float:
    return 0.5 * (1.0 + math.erf(z / math.sqrt(2.0)))


class _Model:
    """What is known of one model's completion times: a lognormal fitted to them.

    Generation times are positive and right-skewed; a lognormal fits them with two numbers,
    which a few dozen tasks pin down well, where a free-form estimate from interval data
    stays ragged. The fit is a maximum a posteriori estimate: the prior (around the
    catalog's typical time) counts as `prior_weight` tasks.
    """

    def __init__(self, typical: float, sigma: float, window: int, reports: bool) -> None:
        self.reports_progress = reports  # what the catalog says (FLUX.1 does)
        self.silent = 0  # early looks in a row answered without progress
        self.prior_mu = math.log(typical)
        self.prior_sigma = sigma
        self.mu = self.prior_mu
        self.sigma = sigma
        self.seen: deque[tuple[float, float]] = deque(maxlen=window)
        self.pending: dict[str, float] = {}
        self.watching: set[str] = set()  # the tasks being watched
        # The end each watched task's first progress report foretold, and for the last
        # tasks seen ready, how far off that was (relative).
        self.foretold: dict[str, float] = {}
        self.misses: deque[float] = deque(maxlen=32)
        # Whether progress has foretold ends closely enough to poll when it says and not
        # where the plan would (kept up to date by `missed`: urgency asks it at every turn).
        self.progress_trusted = False
        self.batched: set[str] = set()  # of those, the ones accepted in a batch
        self.full: dict[str, float] = {}  # when each was first found pending at progress 1.0
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

    def _log_likelihood(self, mu: float, log_sigma: float, prior_weight: float) -> float:
        sigma = math.exp(log_sigma)

        def z(t: float) -> float:
            return (math.log(t) - mu) / sigma if t > 0 else -math.inf

        total = 0.0
        for lower, upper in self.seen:
            if upper > lower:
                total += math.log(max(1e-300, _phi(z(upper)) - _phi(z(lower))))
            elif upper > 0:  # the API said when it ended: the density there
                total += -(z(upper) ** 2) / 2 - log_sigma - math.log(upper)
        for last in self.pending.values():
            total += math.log(max(1e-300, 1.0 - _phi(z(last))))
        # The prior, as `prior_weight` tasks' worth of belief in each parameter.
        total -= prior_weight * ((mu - self.prior_mu) / self.prior_sigma) ** 2 / 2
        total -= prior_weight * ((log_sigma - math.log(self.prior_sigma)) / 0.5) ** 2 / 2
        return total

    def fit(self, prior_weight: float) -> None:
        """Move (mu, sigma) to the most likely values, by Newton steps on the log-likelihood."""
        x = [self.mu, math.log(self.sigma)]
        h = 1e-4
        f = self._log_likelihood(x[0], x[1], prior_weight)
        for _ in range(_NEWTON_STEPS):
            grad, hess = [0.0, 0.0], [[0.0, 0.0], [0.0, 0.0]]
            for a in range(2):
                up, down = list(x), list(x)
                up[a] += h
                down[a] -= h
                fu = self._log_likelihood(up[0], up[1], prior_weight)
                fd = self._log_likelihood(down[0], down[1], prior_weight)
                grad[a] = (fu - fd) / (2 * h)
                hess[a][a] = (fu - 2 * f + fd) / (h * h)
            both = [x[0] + h, x[1] + h]
            hess[0][1] = hess[1][0] = (
                self._log_likelihood(both[0], both[1], prior_weight)
                - f
                - grad[0] * h
                - grad[1] * h
                - 0.5 * (hess[0][0] + hess[1][1]) * h * h
            ) / (h * h)
            det = hess[0][0] * hess[1][1] - hess[0][1] * hess[1][0]
            if hess[0][0] >= 0 or det <= 0:  # not concave here: a small gradient step
                move = [0.05 * grad[0], 0.05 * grad[1]]
            else:
                move = [
                    -(hess[1][1] * grad[0] - hess[0][1] * grad[1]) / det,
                    -(-hess[1][0] * grad[0] + hess[0][0] * grad[1]) / det,
                ]
            move = [max(-0.5, min(0.5, m)) for m in move]
            # A step that lowers the likelihood overshot the top (where the data are narrow,
            # Newton's steps can swing between two points forever): it is halved until not.
            for _ in range(_HALVINGS):
                step = [x[0] + move[0], max(math.log(0.05), min(math.log(3.0), x[1] + move[1]))]
                after = self._log_likelihood(step[0], step[1], prior_weight)
                if after >= f - 0.1:
                    break
                move = [0.5 * move[0], 0.5 * move[1]]
            else:
                break  # no step up from here
            x, f = step, after
            if abs(move[0]) + abs(move[1]) < 1e-4:
                break
        self.mu, self.sigma = x[0], math.exp(x[1])

    def waited(self, pending_at: float, elapsed: float) -> float:
        """How long a task found pending at `pending_at` has, on average, been ended and
        unseen by `elapsed`: E[(elapsed - T)+ | T > pending_at] for the fitted lognormal T."""
        if elapsed <= pending_at:
            return 0.0
        mu, sigma = self.mu, self.sigma
        mean = math.exp(mu + sigma * sigma / 2)

        def integral(t: float) -> float:  # ∫ F from 0 to t = t F(t) - E[T; T <= t]
            if t <= 0:
                return 0.0
            z = (math.log(t) - mu) / sigma
            return t * _phi(z) - mean * _phi(z - sigma)

        before = _phi((math.log(pending_at) - mu) / sigma) if pending_at > 0 else 0.0
        ended = integral(elapsed) - integral(pending_at) - before * (elapsed - pending_at)
        return max(0.0, ended) / max(1e-12, 1.0 - before)

    def missed(self, miss: float) -> None:
        """A task ended `miss` (relative) away from where its first progress foretold:
        progress is trusted while 9 in 10 of the last ones, at least 8, are within 5 %."""
        self.misses.append(miss)
        if len(self.misses) >= _TRUST_AFTER:
            ordered = sorted(self.misses)
            self.progress_trusted = ordered[int(0.9 * (len(ordered) - 1))] <= _TRUST_ERROR

    @property
    def look_early(self) -> bool:
        """Whether a task's first poll should come early, to read its progress: while
        progress the catalog promises is still on trial, and once it is trusted."""
        if self.silent >= _TRUST_AFTER:  # progress does not come that early: stop looking
            return False
        return self.progress_trusted or (self.reports_progress and len(self.misses) < _TRUST_AFTER)

    @property
    def scale(self) -> float:
        """The fitted median: policies are computed in units of it."""
        return math.exp(self.mu)


class LearnedSchedule:
    """Polls where completion is likely, learned per model from the tasks the client watches.

    Each model starts from a prior around the catalog's typical time and learns from the
    last `window` tasks: each one finished between the last poll that found it pending and
    the poll that found it ready, or when the API says it did (FLUX.1 reports its end).
    The poll times minimise the expected delay between a task finishing and the client
    seeing it, for `polls_per_task` polls per task on average (raise it for earlier
    detection). The client's `poll_rate` budget still caps the total: when more polls are
    due than it lets out, the ones whose tasks have likely waited longest go first, and
    the ones held back find more tasks ended, so fewer are made than planned.
    When the API reports progress (FLUX.1 models), the finish is extrapolated from it: no
    later than planned at first, and once progress has foretold the end of enough tasks
    within 5 %, at the foretold end alone, with a first look early in the task to read it.
    The last task left of a batch is polled every 0.15 s: all who wait on the batch wait
    on it, and the budget has nothing else to do.

    ```python
    AsyncBFL(poll_rate=40, poll_schedule=LearnedSchedule(polls_per_task=7))  # earlier, dearer
    ```
    """

    def __init__(
        self,
        polls_per_task: float = 3.9,
        *,
        window: int = 256,
        prior_weight: float = 2.0,
        prior_sigma: float = 0.6,
    ) -> None:
        # Checked here, not at the first poll, where the error would fail a paid task's watch.
        if not 1 <= polls_per_task < math.inf:
            raise ValueError(
                f"polls_per_task must be a finite number at least 1, not {polls_per_task!r}"
            )
        try:
            whole = operator.index(window)  # what the window's deque takes
        except TypeError:
            whole = 0
        if whole < 1:
            raise ValueError(f"window must be a whole number of tasks, at least 1, not {window!r}")
        if not 0 <= prior_weight < math.inf:
            raise ValueError(
                f"prior_weight must be a finite number at least 0, not {prior_weight!r}"
            )
        if not 0 < prior_sigma < math.inf:
            raise ValueError(f"prior_sigma must be a finite number above 0, not {prior_sigma!r}")
        self.polls_per_task = polls_per_task
        self._window = window
        self._prior_weight = prior_weight
        self._prior_sigma = prior_sigma
        self._models: dict[str, _Model] = {}
        self._solutions: dict[tuple[float, float], _Policy] = {}

    def __repr__(self) -> str:
        return f"LearnedSchedule(polls_per_task={self.polls_per_task})"

    def _model(self, name: str) -> _Model:
        model = self._models.get(name)
        if model is None:
            spec = CATALOG.get(name)
            typical = spec.typical_seconds if spec is not None else 6.0
            reports = spec is not None and spec.family == "flux1"
            model = self._models[name] = _Model(typical, self._prior_sigma, self._window, reports)
        return model

    def _policy(self, model: _Model) -> _Policy:
        if model.policy is None or model.due():
            model.fit(self._prior_weight)
            # Spreads a few hundredths apart share a policy: each costs a DP to compute.
            sigma = round(model.sigma / _SIGMA_STEP) * _SIGMA_STEP
            # Two more polls per task while little is known: the first tasks are planned from
            # the prior alone and would otherwise be seen late; their polls also teach the
            # model where tasks finish.
            learning = len(model.seen) < _LEARNING
            budget = self.polls_per_task + (_EXPLORE if learning else 0.0)
            model.policy = self._solved(round(sigma, 3), budget)
            model.planned_at = len(model.seen)
        return model.policy

    def _solved(self, sigma: float, budget: float) -> _Policy:
        """The policy for a lognormal of median 1 and this `sigma`: a lognormal's policy
        scales with its median, so one policy serves every model of that spread."""
        key = (sigma, budget)
        policy = self._solutions.get(key)
        if policy is None:
            fitted = _lognormal_cdf(1.0, sigma)
            # The grid covers nearly every task; beyond it, a plain backoff.
            step = 1.25 * math.exp(sigma * _Z995) / _GRID
            cdf = [fitted(k * step) for k in range(_GRID)]
            policy = self._solutions[key] = _Policy.solve(cdf, step, budget)
        return policy

    def next_delay(self, task: Task, attempt: int, elapsed: float, progress: float | None) -> float:
        """Seconds until the next poll of `task`, last found pending `elapsed` s after its
        acceptance (just accepted for attempt 0)."""
        model = self._model(task.model)
        model.watching.add(task.id)
        watched = sum(len(m.watching) for m in self._models.values())
        if attempt:
            model.pending[task.id] = elapsed
        elif watched >= _BATCH:
            model.batched.add(task.id)
        policy = self._policy(model)
        planned = policy.next_poll(elapsed / model.scale)
        if planned is not None:
            delay = planned * model.scale - elapsed
        else:
            # Past the plan's horizon (a fit from few tasks can set it short): the plan's last
            # spacing, spreading out only as the task outlives the horizon. The longest tasks
            # end a batch: polling them a quarter of their age apart cost whole seconds.
            horizon = policy.times[-1] * model.scale
            gap = (policy.times[-1] - policy.times[-2]) * model.scale
            delay = max(gap, 0.25 * (elapsed - horizon))
        if attempt == 1 and model.look_early:  # the answer to an early look
            model.silent = 0 if progress else model.silent + 1
        if progress is not None and progress > 0.0:
            end = elapsed / progress
            if 0.0 < end < math.inf:  # read at acceptance, or next to nothing: no end foretold
                model.foretold.setdefault(task.id, end)
            foretold = model.foretold.get(task.id, end)
            if progress < 1.0:
                left = end - elapsed
            else:
                # Pending at 1.0: ending now (progress is rounded) or its image being stored:
                # soon, then backing off for as long as it stays so (past its foretold end,
                # or past when it got to 1.0 if that came first).
                left = elapsed - min(foretold, model.full.setdefault(task.id, elapsed))
            delay = left if model.progress_trusted else min(delay, left)
        elif attempt == 0 and model.look_early:
            # The first poll early, where almost no task has ended: its progress says when
            # the task will.
            delay = min(delay, model.scale * math.exp(_Z01 * model.sigma) - elapsed)
        if watched == 1 and task.id in model.batched:
            # The last task left of a batch holds up all who wait on the batch, and the poll
            # budget has nothing else to do.
            delay = min(delay, _LAST_GAP)
        return min(_MAX_DELAY, max(_MIN_DELAY, delay))

    def urgency(self, task: Task, pending_at: float, elapsed: float) -> float:
        """How long `task` has, on average, been ended and unseen: the delay that holding
        its poll back adds to, if it has ended (found pending `pending_at` s after its
        acceptance, now `elapsed`). Where its progress is trusted, the time past its end."""
        model = self._model(task.model)
        foretold = model.foretold.get(task.id)
        if foretold is not None and model.progress_trusted:
            return max(0.0, elapsed - foretold)
        return model.waited(pending_at, elapsed)

    def done(self, task: Task, lower: float, upper: float | None) -> None:
        """`task` was found ready between `lower` and `upper` s after acceptance (exactly
        then if they are equal; with `upper` None, its watch ended otherwise: moderated,
        failed, cancelled)."""
        model = self._model(task.model)
        model.pending.pop(task.id, None)
        model.batched.discard(task.id)
        model.watching.discard(task.id)
        model.full.pop(task.id, None)
        foretold = model.foretold.pop(task.id, None)
        # Nothing is learned from an end at no finite time: one would wreck the fit.
        if upper is not None and math.isfinite(lower) and math.isfinite(upper):
            if foretold is not None:
                model.missed(max(0.0, lower - foretold, foretold - upper) / foretold)
            model.seen.append((max(0.0, lower), max(lower, upper)))
