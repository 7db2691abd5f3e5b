"""The in-flight limiter: FIFO slots per pool, both pools for kontext-max, adapting to 429s."""

from __future__ import annotations

import anyio
import pytest
import respx

from bfl_async import AsyncBFL, Limiter
from bfl_async._limits import Slot

from .helpers import API, FAST, accepted

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Every test here runs on both backends."""
    return str(request.param)


async def test_slots_are_handed_out_in_fifo_order() -> None:
    limiter = Limiter({"standard": 1})
    first = await limiter.acquire("standard")
    order: list[int] = []
    slots: list[Slot] = []

    async def take(n: int) -> None:
        slot = await limiter.acquire("standard")
        order.append(n)
        slots.append(slot)

    async with anyio.create_task_group() as tg:
        for n in range(4):
            tg.start_soon(take, n)
            await anyio.wait_all_tasks_blocked()
        assert limiter.waiting() == 4
        first.release()
        for _ in range(4):
            await anyio.wait_all_tasks_blocked()
            slots[-1].release()
    assert order == [0, 1, 2, 3]
    assert limiter.in_use() == 0


async def test_front_jumps_the_queue_and_release_is_idempotent() -> None:
    limiter = Limiter({"standard": 1})
    held = await limiter.acquire("standard")
    order: list[str] = []

    async def take(label: str, front: bool) -> None:
        slot = await limiter.acquire("standard", front=front)
        order.append(label)
        slot.release()

    async with anyio.create_task_group() as tg:
        tg.start_soon(take, "queued", False)
        await anyio.wait_all_tasks_blocked()
        tg.start_soon(take, "retry", True)
        await anyio.wait_all_tasks_blocked()
        held.release()
        held.release()
    assert order == ["retry", "queued"]
    assert limiter.in_use() == 0 and held.released


async def test_kontext_max_holds_both_pools_unless_separate() -> None:
    limiter = Limiter()
    slots = [await limiter.acquire("kontext-max") for _ in range(6)]
    assert (limiter.in_use("kontext-max"), limiter.in_use("standard")) == (6, 6)
    with anyio.move_on_after(0.01) as scope:
        await limiter.acquire("kontext-max")
    assert scope.cancelled_caught
    assert limiter.waiting("kontext-max") == 0  # the cancelled waiter left the queue
    for slot in slots:
        slot.release()
    assert limiter.in_use("standard") == 0

    separate = Limiter(separate_pools=True)
    await separate.acquire("kontext-max")
    assert separate.in_use("standard") == 0


async def test_cancelled_in_second_pool_gives_back_the_first() -> None:
    limiter = Limiter({"standard": 1})
    held = await limiter.acquire("standard")
    with anyio.move_on_after(0.01):
        await limiter.acquire("kontext-max")
    assert limiter.in_use("kontext-max") == 0
    held.release()


async def test_a_granted_slot_is_given_back_when_its_waiter_is_cancelled() -> None:
    limiter = Limiter({"standard": 1})
    held = await limiter.acquire("standard")
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire, "standard")
        await anyio.wait_all_tasks_blocked()
        tg.cancel_scope.cancel()  # the waiter is cancelled...
        held.release()  # ...and granted the slot before it runs again
    assert limiter.in_use() == 0


async def test_claim_takes_a_slot_over_the_limit_at_once() -> None:
    limiter = Limiter({"standard": 1})
    held = await limiter.acquire("standard")
    claimed = limiter.claim("standard")
    assert limiter.in_use() == 2
    held.release()
    with anyio.move_on_after(0.01) as scope:
        await limiter.acquire("standard")
    assert scope.cancelled_caught  # the resumed task still counts
    claimed.release()
    assert limiter.in_use() == 0


async def test_429_lowers_the_limit_to_what_the_server_accepted() -> None:
    limiter = Limiter({"standard": 24}, probe_after=3600)
    slots = [await limiter.acquire("standard") for _ in range(24)]
    for slot in slots[:12]:
        slot.accepted()
    slots[12].refused()
    assert limiter.limit() == 12
    # A submit that was already on its way and then accepted proves more room.
    slots[13].accepted()
    assert limiter.limit() == 13
    for slot in slots:
        slot.release()
    assert limiter.in_use() == 0
    assert limiter.limit() == 13  # no probing within probe_after


async def test_limit_grows_back_after_a_quiet_period() -> None:
    limiter = Limiter({"standard": 4}, probe_after=0.0)
    slot = await limiter.acquire("standard")
    slot.refused()
    assert limiter.limit() == 1
    slot.accepted()
    assert limiter.limit() == 2
    slot.release()
    for _ in range(5):
        s = await limiter.acquire("standard")
        s.accepted()
        s.release()
    assert limiter.limit() == 4  # never above the configured limit


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Limiter({"standard": 0})
    with pytest.raises(ValueError, match="unknown pool"):
        Limiter().claim("gpu")


def test_a_given_limiter_is_not_also_sized_by_the_client() -> None:
    limiter = Limiter({"standard": 3})
    assert AsyncBFL(api_key="k", limiter=limiter).limiter is limiter
    for sizing in ({"limits": {"standard": 4}}, {"separate_pools": True}):
        with pytest.raises(ValueError, match="give them to that limiter instead"):
            AsyncBFL(api_key="k", limiter=limiter, **sizing)


async def test_resumed_handles_never_lift_the_limit_above_the_configured_one() -> None:
    limiter = Limiter({"standard": 2}, probe_after=3600)
    first = await limiter.acquire("standard")
    first.refused()  # a 429: the limit is lowered, and does not grow back for a while
    resumed = [limiter.claim("standard") for _ in range(3)]  # BFL counts them anyway
    first.release()
    for slot in resumed:
        slot.release()
    assert limiter.limit() == 2  # not 3: they prove no room beyond what was configured
    held = [await limiter.acquire("standard") for _ in range(2)]
    with anyio.move_on_after(0.01) as scope:
        await limiter.acquire("standard")
    assert scope.cancelled_caught
    for slot in held:
        slot.release()


async def test_a_cancelled_caller_never_gets_a_slot() -> None:
    limiter = Limiter({"standard": 1})
    got: list[Slot] = []
    with anyio.CancelScope() as scope:
        scope.cancel()  # a deadline already past, say: the slot is free, but not for it
        got.append(await limiter.acquire("standard"))
    assert got == [] and limiter.in_use() == 0

    held = await limiter.acquire("standard")
    doomed = anyio.CancelScope()

    async def take() -> None:
        with doomed:
            got.append(await limiter.acquire("standard"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(take)
        await anyio.wait_all_tasks_blocked()
        held.release()  # the waiter is granted the slot...
        doomed.cancel()  # ...and cancelled before it runs again (trio used to hand it over)
    assert got == [] and limiter.in_use() == 0


async def test_a_submit_cancelled_before_it_starts_sends_nothing() -> None:
    with respx.mock(assert_all_called=False) as mock:
        submit = mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
        async with AsyncBFL(**FAST) as client:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await client.submit("flux-2-pro", prompt="a red fox")
            assert not submit.called  # nothing paid for a call cancelled before it began
            assert client.limiter.in_use() == 0


class _NoCheckpoint(Limiter):
    """A custom limiter handing out slots without a checkpoint."""

    async def acquire(self, pool: str, *, front: bool = False) -> Slot:
        return self.claim(pool)


async def test_a_custom_limiters_slot_is_not_used_by_a_cancelled_submit() -> None:
    limiter = _NoCheckpoint()
    with respx.mock(assert_all_called=False) as mock:
        submit = mock.post(f"{API}/v1/flux-2-pro").mock(return_value=accepted())
        async with AsyncBFL(**{**FAST, "limiter": limiter}) as client:
            with anyio.CancelScope() as scope:
                scope.cancel()
                await client.submit("flux-2-pro", prompt="a red fox")
            assert not submit.called and limiter.in_use() == 0
