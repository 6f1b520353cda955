"""store.WriteLock: one holder at a time; intake (urgent) waiters go first, FIFO within a lane."""

from __future__ import annotations

import asyncio

import pytest

from smtpgate.store import WriteLock


async def holder(lock: WriteLock, name: str, order: list[str], *, urgent: bool = False) -> None:
    async with lock.hold(urgent=urgent):
        order.append(name)
        await asyncio.sleep(0)


async def held_until(lock: WriteLock, gate: asyncio.Event) -> None:
    """Take the lock at once and keep it until `gate` is set."""
    async with lock.hold():
        await gate.wait()


async def test_urgent_waiters_go_first_and_each_lane_is_fifo() -> None:
    lock = WriteLock()
    order: list[str] = []
    gate = asyncio.Event()
    tasks = [asyncio.create_task(held_until(lock, gate))]
    await asyncio.sleep(0)
    for name, urgent in [("n1", False), ("u1", True), ("n2", False), ("u2", True)]:
        tasks.append(asyncio.create_task(holder(lock, name, order, urgent=urgent)))
        await asyncio.sleep(0)  # queue them in this order
    gate.set()
    await asyncio.gather(*tasks)
    assert order == ["u1", "u2", "n1", "n2"]
    assert not lock.locked()


async def test_one_holder_at_a_time() -> None:
    lock = WriteLock()
    inside = 0
    most = 0

    async def work(i: int) -> None:
        nonlocal inside, most
        async with lock.hold(urgent=i % 3 == 0):
            inside += 1
            most = max(most, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(work(i) for i in range(30)))
    assert most == 1
    assert not lock.locked()


async def test_a_cancelled_waiter_leaves_the_queue_and_the_lock_passes_on() -> None:
    lock = WriteLock()
    order: list[str] = []
    gate = asyncio.Event()
    owner = asyncio.create_task(held_until(lock, gate))
    await asyncio.sleep(0)
    doomed = asyncio.create_task(holder(lock, "doomed", order, urgent=True))
    later = asyncio.create_task(holder(lock, "later", order))
    await asyncio.sleep(0)
    doomed.cancel()
    await asyncio.sleep(0)
    gate.set()
    await owner
    await later
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert order == ["later"]
    assert not lock.locked()


async def test_a_waiter_cancelled_just_after_the_hand_over_passes_the_lock_on() -> None:
    lock = WriteLock()
    order: list[str] = []
    held = lock.hold()
    await held.__aenter__()
    handed = asyncio.create_task(holder(lock, "handed", order))
    after = asyncio.create_task(holder(lock, "after", order))
    await asyncio.sleep(0)  # both wait now, `handed` first
    await held.__aexit__(None, None, None)  # hands the lock to `handed`, which has not resumed
    handed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handed
    await after
    assert order == ["after"]
    assert not lock.locked()


async def test_an_error_inside_releases_the_lock() -> None:
    lock = WriteLock()
    with pytest.raises(RuntimeError):
        async with lock.hold():
            raise RuntimeError("boom")
    assert not lock.locked()
    async with lock.hold(urgent=True):
        assert lock.locked()
