"""Queue workers: claim → run, `concurrency` at a time; a failure goes to the caller's
`on_error` (which retries with `backoff`, or sets the item aside). Knows nothing about mail:
the caller supplies the claim, run and error coroutines."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


def backoff(attempt: int, *, base: float = 2.0, cap: float = 300.0) -> float:
    """Exponential backoff with full jitter: attempt 1 → up to `base` seconds, doubling, capped."""
    ceiling = min(cap, base * 2 ** max(0, attempt - 1))
    return random.uniform(ceiling / 2, ceiling)


def scheduled_delay(schedule: Sequence[int], attempt: int) -> int:
    """spec 4 SMTPGATE_RETRY_SCHEDULE: delay after `attempt` failures; the last value repeats."""
    return schedule[min(max(attempt, 1), len(schedule)) - 1]


class WorkerPool(Generic[T]):
    """`concurrency` runners fed by one claimer; wakes on `wake` or every `poll` seconds."""

    def __init__(
        self,
        name: str,
        *,
        claim: Callable[[int], Awaitable[list[T]]],
        run: Callable[[T], Awaitable[None]],
        on_error: Callable[[T, BaseException], Awaitable[None]],
        concurrency: int,
        wake: asyncio.Event,
        poll: float = 1.0,
    ) -> None:
        self.name = name
        self._claim = claim
        self._run = run
        self._on_error = on_error
        self._concurrency = concurrency
        self._wake = wake
        self._poll = poll
        self._queue: asyncio.Queue[T] = asyncio.Queue(maxsize=concurrency)
        self._tasks: list[asyncio.Task[None]] = []
        self._stopping = False

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._claimer(), name=f"{self.name}-claimer"))
        for i in range(self._concurrency):
            self._tasks.append(asyncio.create_task(self._runner(), name=f"{self.name}-{i}"))

    async def _claimer(self) -> None:
        while not self._stopping:
            # Clear before claiming: a wake-up that arrives during the claim is not lost.
            self._wake.clear()
            free = self._concurrency - self._queue.qsize()
            items: list[T] = []
            if free > 0:
                try:
                    items = await self._claim(free)
                except Exception as exc:  # store locked or full: try again shortly
                    log.warning("%s: claim failed: %s", self.name, exc)
                    await asyncio.sleep(min(self._poll, 1.0))
                    continue
            claimed = len(items)
            while items:  # handed over one by one: this task keeps none of them
                await self._queue.put(items.pop(0))
            if claimed and claimed >= free:
                continue  # more may be waiting
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll):
                    await self._wake.wait()

    async def _runner(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                await self._run(item)
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                try:
                    await self._on_error(item, exc)  # logs the failure, naming the item
                except Exception:
                    log.exception("%s: a failure could not be handled", self.name)
            finally:
                self._queue.task_done()
                self._wake.set()  # a slot is free: let the claimer look for more
            # Not kept while waiting for the next: an idle runner held on to its last item, so
            # 32 runners kept up to 32 processed messages (25 MB each, at worst) alive, and
            # the claimer its last batch.
            del item

    async def stop(self, grace: float = 5.0) -> None:
        """Stop claiming, let claimed items finish for `grace` seconds, then cancel the rest."""
        self._stopping = True
        self._wake.set()
        claimer, runners = self._tasks[:1], self._tasks[1:]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*claimer, return_exceptions=True)
                await self._queue.join()
        for task in claimer:
            task.cancel()
        for task in runners:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
