"""The in-flight limiter: FIFO slots per pool, both pools for kontext-max, adapting to 429s."""

from __future__ import annotations

import anyio
import pytest

from bfl_async import AsyncBFL, Limiter
from bfl_async._limits import Slot

pytestmark = pytest.mark.anyio


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


@pytest.mark.parametrize("anyio_backend", ["asyncio", "trio"])
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
