"""worker.WorkerPool: what it keeps once the work is done."""

from __future__ import annotations

import asyncio
import gc
import weakref

from smtpgate.worker import WorkerPool


class Item:
    """Stands in for a claimed message (a Job holds the raw bytes, up to 25 MB)."""


async def test_idle_runners_keep_no_finished_item_alive() -> None:
    backlog = [Item() for _ in range(20)]
    alive = [weakref.ref(i) for i in backlog]
    done = asyncio.Event()
    finished = 0
    wake = asyncio.Event()

    async def claim(n: int) -> list[Item]:
        taken, backlog[:] = backlog[:n], backlog[n:]
        return taken

    async def run(item: Item) -> None:
        nonlocal finished
        await asyncio.sleep(0)
        finished += 1
        if finished == len(alive):
            done.set()

    async def failed(item: Item, exc: BaseException) -> None:
        raise AssertionError(f"{item} failed: {exc}")

    pool = WorkerPool("t", claim=claim, run=run, on_error=failed, concurrency=8, wake=wake, poll=60)
    pool.start()
    try:
        async with asyncio.timeout(10):
            await done.wait()
        for _ in range(5):
            await asyncio.sleep(0)  # the runners go back to waiting for the next item
        gc.collect()
        # The pool is idle but running: nothing it finished may still be referenced.
        assert [r for r in alive if r() is not None] == []
    finally:
        await pool.stop(grace=1)
