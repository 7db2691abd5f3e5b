"""The learned poll schedule and the shared poll-rate budget."""

from __future__ import annotations

import itertools
import math
import random
import statistics
import time
from pathlib import Path

import anyio
import pytest

from bfl_async import AsyncBFL, LearnedSchedule, Result, Task
from bfl_async._limits import PollBudget
from bfl_async._polling import _finish
from bfl_async._schedule import _lognormal_cdf, _Policy
from bfl_async.testing import FakeBFL

pytestmark = pytest.mark.anyio


def task(n: int, model: str = "flux-2-pro") -> Task:
    return Task(
        id=f"t{n}", polling_url=f"https://api.eu2.bfl.ai/v1/get_result?id=t{n}", model=model
    )


def teach(schedule: LearnedSchedule, model: str, median: float, sigma: float, n: int) -> None:
    """Feed `n` tasks seen ready on a 0.5 s polling grid from the first poll at 0.5 s."""
    rng = random.Random(7)
    for i in range(n):
        finish = median * math.exp(sigma * rng.gauss(0, 1))
        upper = math.ceil(finish / 0.5) * 0.5
        t = task(i, model)
        schedule.next_delay(t, 0, 0.0, None)
        if upper > 0.5:
            schedule.next_delay(t, 1, upper - 0.5, None)
        schedule.done(t, max(0.0, upper - 0.5), upper)


def first_polls(schedule: LearnedSchedule, model: str, count: int = 6) -> list[float]:
    """The poll times (seconds after acceptance) a task that stays pending would get."""
    t, elapsed, times = task(10_000, model), 0.0, []
    for attempt in range(count):
        elapsed += schedule.next_delay(t, attempt, elapsed, None)
        times.append(elapsed)
    schedule.done(t, elapsed, None)
    return times


def test_the_prior_comes_from_the_catalog() -> None:
    schedule = LearnedSchedule()
    klein, pro, unknown = (
        first_polls(schedule, m)[0] for m in ("flux-2-klein-4b", "flux-2-pro", "flux-9")
    )
    assert klein < pro < unknown
    assert 1.0 < pro < 5.0


def test_it_learns_where_tasks_finish() -> None:
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.3, n=64)
    times = first_polls(schedule, "flux-2-pro")
    # The first poll lands in the lower part of the learned distribution, not the prior's.
    assert 1.0 < times[0] < 2.0
    assert times[2] < 3.0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(0.05 <= g <= 1.5 for g in gaps)


def test_a_lognormal_policy_scales_with_the_median() -> None:
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.3, n=64)
    teach(schedule, "flux-2-max", median=8.0, sigma=0.3, n=64)
    fast, slow = first_polls(schedule, "flux-2-pro")[0], first_polls(schedule, "flux-2-max")[0]
    assert slow / fast == pytest.approx(4.0, rel=0.25)


def test_the_policy_spends_the_poll_budget() -> None:
    cdf_at = _lognormal_cdf(1.0, 0.4)
    step = 3.0 / 300
    cdf = [cdf_at(k * step) for k in range(300)]
    for budget in (2.5, 3.5, 6.0):
        policy = _Policy.solve(cdf, step, budget)
        assert budget - 0.3 <= policy._expected_polls(cdf, policy.after) <= budget
    cheap, rich = _Policy.solve(cdf, step, 2.5), _Policy.solve(cdf, step, 6.0)
    assert (rich.next_poll(0.0) or 0.0) < (cheap.next_poll(0.0) or 0.0)


def brute_force_plan(
    cdf: list[float], moment: list[float], step: float, price: float
) -> list[float]:
    """Every state's optimal cost by trying every next poll: the O(grid**2) reference."""
    last = len(cdf) - 1
    cost = [0.0] * len(cdf)
    cost[last] = (1.0 - cdf[last]) * (price + 0.5)
    for i in range(last - 1, -1, -1):
        cost[i] = min(
            price * (1.0 - cdf[i])
            + j * step * (cdf[j] - cdf[i])
            - (moment[j] - moment[i])
            + cost[j]
            for j in range(i + 1, len(cdf))
        )
    return cost


def cost_of(
    cdf: list[float], moment: list[float], step: float, price: float, after: list[int]
) -> list[float]:
    """Every state's cost when following `after`."""
    last = len(cdf) - 1
    cost = [0.0] * len(cdf)
    cost[last] = (1.0 - cdf[last]) * (price + 0.5)
    for i in range(last - 1, -1, -1):
        j = after[i]
        cost[i] = (
            price * (1.0 - cdf[i])
            + j * step * (cdf[j] - cdf[i])
            - (moment[j] - moment[i])
            + cost[j]
        )
    return cost


def test_the_fast_plan_is_as_good_as_trying_every_poll_time() -> None:
    rng = random.Random(3)
    for _ in range(60):
        sigma, size = rng.uniform(0.05, 1.5), rng.choice([3, 20, 120])
        step = 1.25 * math.exp(sigma * 2.5758) / size
        cdf_at = _lognormal_cdf(1.0, sigma)
        cdf = [cdf_at(k * step) for k in range(size)]
        moment = [0.0] * size
        for k in range(1, size):
            moment[k] = moment[k - 1] + (cdf[k] - cdf[k - 1]) * (k - 0.5) * step
        price = math.exp(rng.uniform(-7.0, 2.0))
        after = _Policy._plan(cdf, moment, step, price)
        assert all(i < j for i, j in enumerate(after[:-1]))
        best = brute_force_plan(cdf, moment, step, price)
        assert cost_of(cdf, moment, step, price, after) == pytest.approx(best, abs=1e-9)


def finish(schedule: LearnedSchedule, n: int, fewer: int) -> None:
    """Task `n` found ready 4 s after acceptance (pending at 3.5 s), with `fewer` polls than
    the schedule planned for a task finishing then (at least one)."""
    model = schedule._models["flux-2-pro"]
    assert model.policy is not None
    planned = model.policy.polls_until(3.75 / model.scale)
    t = task(n)
    for attempt in range(max(1, planned - fewer)):
        schedule.next_delay(t, attempt, 3.5 if attempt else 0.0, None)
    schedule.done(t, 3.5, 4.0)


def test_planned_polls_rise_when_a_busy_budget_saves_some() -> None:
    schedule = LearnedSchedule(polls_per_task=3.0)
    teach(schedule, "flux-2-pro", median=4.0, sigma=0.4, n=16)
    model = schedule._models["flux-2-pro"]
    for n in range(100, 164):  # as many polls as planned: the plan stays
        finish(schedule, n, fewer=0)
    assert schedule._budget(model) == pytest.approx(3.0)
    for n in range(200, 264):  # a busy budget saved one each: plan more
        finish(schedule, n, fewer=1)
    assert 3.0 < schedule._budget(model) <= 4.5
    for n in range(300, 364):  # however many it saves, at most 1.5 times the setting
        finish(schedule, n, fewer=10)
    assert schedule._budget(model) == pytest.approx(4.5)


def test_a_policy_counts_its_polls_up_to_a_finish() -> None:
    cdf_at = _lognormal_cdf(1.0, 0.4)
    step = 3.0 / 300
    policy = _Policy.solve([cdf_at(k * step) for k in range(300)], step, 3.5)
    first, second = policy.times[1], policy.times[2]
    assert policy.polls_until(first / 2) == 1
    assert policy.polls_until(first) == 1
    assert policy.polls_until((first + second) / 2) == 2
    assert policy.next_poll(first) == second
    assert policy.next_poll(policy.times[-1]) is None


def test_progress_extrapolates_the_finish() -> None:
    schedule = LearnedSchedule()
    t = task(1, "flux-pro-1.1")
    schedule.next_delay(t, 0, 0.0, None)
    # Half done after 2 s: done in about 2 s more, and no later.
    assert schedule.next_delay(t, 1, 2.0, 0.5) <= 2.0
    assert schedule.next_delay(t, 2, 3.9, 0.99) == pytest.approx(0.05)


def test_still_pending_at_full_progress_polls_again_soon() -> None:
    """Progress is rounded (the fake's to 0.001) and may reach 1.0 before the task is Ready."""
    schedule = LearnedSchedule()
    t = task(1, "flux-pro-1.1")
    schedule.next_delay(t, 0, 0.0, None)
    assert schedule.next_delay(t, 1, 4.0, 1.0) == pytest.approx(0.05)
    # Still pending: its image may be being stored. Backing off as it stays overdue (no
    # later than the plan), not every 0.05 s.
    expected = []
    for attempt, elapsed in enumerate((4.05, 4.1, 4.2, 4.4, 4.8), start=2):
        plan = schedule.next_delay(t, attempt, elapsed, None)
        expected.append(max(0.05, min(plan, elapsed - 4.0)))
        assert schedule.next_delay(t, attempt, elapsed, 1.0) == pytest.approx(expected[-1])
    assert max(expected) > 0.15


def watch_with_progress(
    schedule: LearnedSchedule, n: int, model: str, duration: float, foretold: float | None
) -> tuple[float, float]:
    """One task of `duration` s: its first poll, one pending answer at a quarter of the
    way whose progress foretells `foretold` s (None: no progress), and its end, reported
    exactly. Returns the delays of its first and second polls."""
    t = task(n, model)
    first = schedule.next_delay(t, 0, 0.0, None)
    at = duration / 4
    progress = None if foretold is None else at / foretold
    second = schedule.next_delay(t, 1, at, progress)
    schedule.done(t, duration, duration)
    return first, second


def planned_first(schedule: LearnedSchedule, model: str) -> float:
    """The first poll of the plan alone, for what `schedule` knows of `model`."""
    state = schedule._model(model)
    return schedule._policy(state).times[1] * state.scale


DURATIONS = [4.0, 3.2, 5.1, 4.4, 3.6, 4.9, 2.9, 4.2, 3.9, 4.6]


def test_progress_that_foretells_ends_is_trusted() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    on_trial = []
    for n, duration in enumerate(DURATIONS[:8]):
        planned = planned_first(schedule, model)
        first, second = watch_with_progress(schedule, n, model, duration, duration)
        assert first < planned - 0.5  # an early look, to read progress
        on_trial.append(second / (0.75 * duration))
    # On trial, no later than the foretold end, and earlier where the plan polls earlier.
    assert max(on_trial) <= 1.0 and min(on_trial) < 0.8
    assert schedule._models[model].progress_trusted
    first, second = watch_with_progress(schedule, 8, model, 4.0, 4.0)
    assert second == pytest.approx(3.0)  # trusted: at the foretold end, 3 s after the look


def test_progress_that_misleads_is_not_trusted_nor_looked_at_early() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:8]):
        watch_with_progress(schedule, n, model, duration, 0.7 * duration)  # 30 % early
    state = schedule._models[model]
    assert not state.progress_trusted and not state.look_early
    planned = planned_first(schedule, model)
    first, _ = watch_with_progress(schedule, 8, model, 4.0, 4.0)
    assert first == pytest.approx(planned)


def test_early_looks_stop_when_no_progress_comes() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:8]):
        planned = planned_first(schedule, model)
        first, _ = watch_with_progress(schedule, n, model, duration, None)
        assert first < planned - 0.5
    planned = planned_first(schedule, model)
    first, _ = watch_with_progress(schedule, 8, model, 4.0, None)
    assert first == pytest.approx(planned)


def test_an_early_look_that_finds_progress_starts_the_count_again() -> None:
    schedule, model = LearnedSchedule(), "flux-pro-1.1"
    for n, duration in enumerate(DURATIONS[:7]):
        watch_with_progress(schedule, n, model, duration, None)  # queued: no progress yet
    watch_with_progress(schedule, 7, model, 4.0, 4.0)
    for n, duration in enumerate(DURATIONS[:7], start=8):
        watch_with_progress(schedule, n, model, duration, None)
    assert schedule._models[model].look_early


def test_flux2_models_never_look_early() -> None:
    schedule = LearnedSchedule()
    for n, duration in enumerate(DURATIONS[:3]):
        planned = planned_first(schedule, "flux-2-pro")
        first, _ = watch_with_progress(schedule, n, "flux-2-pro", duration, None)
        assert first == pytest.approx(planned)


def test_past_the_horizon_it_keeps_the_last_spacing_then_backs_off_to_a_cap() -> None:
    schedule = LearnedSchedule()
    teach(schedule, "flux-2-pro", median=2.0, sigma=0.2, n=32)
    model = schedule._models["flux-2-pro"]
    t = task(1)
    schedule.next_delay(t, 0, 0.0, None)
    policy = model.policy
    assert policy is not None
    horizon = policy.times[-1] * model.scale
    gap = (policy.times[-1] - policy.times[-2]) * model.scale
    assert 0.05 < gap < 1.0
    # Just past the horizon (a long task, the one a batch waits for): the plan's spacing,
    # not a quarter of the task's age.
    assert schedule.next_delay(t, 5, horizon + 0.1, None) == pytest.approx(gap)
    # A task that outlives the horizon by far spreads its polls out, up to the cap.
    assert schedule.next_delay(t, 6, horizon + 20.0, None) == pytest.approx(5.0)
    assert schedule.next_delay(t, 7, horizon + 200.0, None) == pytest.approx(10.0)


def test_pending_tasks_count_and_are_forgotten_when_done() -> None:
    schedule = LearnedSchedule()
    t = task(1)
    schedule.next_delay(t, 0, 0.0, None)
    schedule.next_delay(t, 1, 3.0, None)
    model = schedule._models["flux-2-pro"]
    assert model.pending == {"t1": 3.0}
    schedule.done(t, 3.0, None)  # moderated, failed or cancelled: nothing learned
    assert model.pending == {} and len(model.seen) == 0


def test_reported_finishes_are_learned_as_moments() -> None:
    """FLUX.1 reports when a task ended: the fit takes each as a moment, not an interval."""
    rng = random.Random(3)
    finishes = [2.0 * math.exp(0.3 * rng.gauss(0, 1)) for _ in range(64)]
    schedule = LearnedSchedule()
    for i, finish in enumerate(finishes):
        t = task(i, "flux-pro-1.1")
        schedule.next_delay(t, 0, 0.0, None)
        schedule.done(t, finish, finish)
    model = schedule._models["flux-pro-1.1"]
    model.fit(2.0)
    logs = [math.log(f) for f in finishes]
    # The sample's own lognormal, give or take the prior's pull (two tasks' worth).
    assert model.scale == pytest.approx(math.exp(statistics.mean(logs)), rel=0.02)
    assert model.sigma == pytest.approx(statistics.pstdev(logs), abs=0.02)


async def test_a_reported_end_narrows_the_bracket_to_the_moment() -> None:
    accepted_at = anyio.current_time() - 3.0  # accepted 3 s ago; its answer came just now
    now = time.time()

    def result(
        end_time: float | None = None,
        start_time: float | None = None,
        duration: float | None = None,
    ) -> Result:
        return Result(
            task=task(1),
            sample="https://x/1.png",
            ready_at=now,
            end_time=end_time,
            start_time=start_time,
            duration=duration,
        )

    # Ended 0.4 s before the answer: 2.6 s after acceptance, between polls at 2.0 and 3.0.
    finish, same = _finish(result(end_time=now - 0.4), 2.0, 3.0, accepted_at)
    assert finish == same == pytest.approx(2.6, abs=0.01)
    finish, same = _finish(result(start_time=now - 2.9, duration=2.5), 2.0, 3.0, accepted_at)
    assert finish == same == pytest.approx(2.6, abs=0.01)
    # A clock a little off: moved inside the bracket. Far off: the bracket is kept.
    assert _finish(result(end_time=now - 1.2), 2.0, 3.0, accepted_at) == (2.0, 2.0)
    assert _finish(result(end_time=now + 3600.0), 2.0, 3.0, accepted_at) == (2.0, 3.0)
    # FLUX.2 reports no end: the bracket.
    assert _finish(result(start_time=now - 2.9), 2.0, 3.0, accepted_at) == (2.0, 3.0)


async def test_the_client_learns_flux1_finishes_exactly() -> None:
    schedule = LearnedSchedule()
    fake = FakeBFL(generation_time=0.3)
    async with AsyncBFL(
        api_key=fake.api_key, http_client=fake.client(), poll_schedule=schedule
    ) as client:
        for model in ("flux-pro-1.1", "flux-2-pro"):
            await client.wait(await client.submit(model, prompt="a fox"))
    ((lower, upper),) = schedule._models["flux-pro-1.1"].seen
    assert lower == upper == pytest.approx(0.3, abs=0.1)
    ((lower, upper),) = schedule._models["flux-2-pro"].seen
    assert lower < 0.3 < upper


def test_bad_budget_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        LearnedSchedule(polls_per_task=0.5)
    assert "3.5" in repr(LearnedSchedule())


async def test_the_client_reports_every_watch_to_its_schedule(tmp_path: Path) -> None:
    schedule = LearnedSchedule()
    fake = FakeBFL(generation_time=0.2)
    async with (
        AsyncBFL(api_key=fake.api_key, http_client=fake.client(), poll_schedule=schedule) as client,
        anyio.create_task_group() as tg,
    ):
        for n in range(3):
            tg.start_soon(
                lambda n=n: client.generate("flux-2-klein-4b", prompt=str(n), output_dir=tmp_path)
            )
    model = schedule._models["flux-2-klein-4b"]
    assert len(model.seen) == 3 and model.pending == {}
    assert all(0.0 <= lower < upper for lower, upper in model.seen)


async def test_the_next_poll_counts_from_when_the_last_one_left_not_from_its_answer() -> None:
    """A slow answer must not push the plan back: polls 0.3 s apart stay 0.3 s apart."""

    class Every:
        def next_delay(
            self, task: Task, attempt: int, elapsed: float, progress: float | None
        ) -> float:
            return 0.3

        def done(self, task: Task, lower: float, upper: float | None) -> None:
            pass

    fake = FakeBFL(generation_time=1.0, slow_seconds=0.25)
    async with AsyncBFL(
        api_key=fake.api_key, http_client=fake.client(), poll_schedule=Every()
    ) as c:
        task = await c.submit("flux-2-klein-4b", prompt="a fox")
        fake.fail_next("poll", "slow")  # the first poll's answer comes 0.25 s late
        await c.wait(task)
    first, second = fake.poll_times[:2]
    assert second - first < 0.45  # 0.3 s after the first poll left; 0.55 s after its answer


# --- the poll-rate budget ----------------------------------------------------------------


def window_counts(moments: list[float], window: float = 1.0) -> int:
    ordered = sorted(moments)
    return max(sum(1 for m in ordered if start <= m < start + window) for start in ordered)


async def test_budget_keeps_every_window_within_the_rate() -> None:
    budget = PollBudget(20.0)
    now = anyio.current_time()
    moments = [budget.reserve(now + 2.0) for _ in range(50)]
    assert window_counts(moments) <= 20
    assert all(m >= now for m in moments)
    # Paced, never in bursts: a server's window cannot catch two polls together.
    ordered = sorted(moments)
    assert min(b - a for a, b in itertools.pairwise(ordered)) >= 1.02 / 20 - 1e-9
    # The nearest free moments are taken, before as well as after the one asked for.
    assert min(moments) < now + 2.0 < max(moments)
    assert max(abs(m - (now + 2.0)) for m in moments) < 1.6


async def test_budget_fills_the_gaps_between_bookings() -> None:
    budget = PollBudget(10.0)  # 0.102 s apart
    now = anyio.current_time()
    assert budget.reserve(now + 1.0) == now + 1.0
    assert budget.reserve(now + 1.3) == now + 1.3
    # Room for one more between them, at least 0.102 s from both.
    assert budget.reserve(now + 1.05) == pytest.approx(now + 1.102)
    # None left in between: the nearest free moment, later or earlier.
    assert budget.reserve(now + 1.25) == pytest.approx(now + 1.402)
    assert budget.reserve(now + 1.1) == pytest.approx(now + 0.898)


async def test_budget_send_is_immediate_when_free() -> None:
    budget = PollBudget(5.0)
    with anyio.fail_after(0.5):
        await budget.send()
    with pytest.raises(ValueError, match="at least 1"):
        PollBudget(0.5)
    assert "5.0" in repr(budget)


async def test_budget_send_holds_polls_that_would_leave_together() -> None:
    budget = PollBudget(5.0)  # 0.204 s apart
    with anyio.fail_after(0.5):
        await budget.send()
    with anyio.move_on_after(0.1) as late:
        await budget.send()
    assert late.cancelled_caught


async def test_budget_send_spaces_polls_that_a_stalled_loop_wakes_together() -> None:
    budget = PollBudget(20.0)  # 0.051 s apart
    left: list[float] = []

    async def poll() -> None:
        await budget.send()
        left.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(poll)
        await anyio.sleep(0.01)  # the first has left; the others sleep until their turn
        time.sleep(0.2)  # noqa: ASYNC251 - the loop stalls past both turns: they wake together
    gaps = [b - a for a, b in itertools.pairwise(left)]
    assert len(gaps) == 2 and min(gaps) >= 0.05
