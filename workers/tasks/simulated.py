"""`simulated`: deterministic tokens on a schedule, no network. The demo, tests and bench use it."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator

from pydantic import BaseModel, ConfigDict, Field

from workers.task import Task, TaskContext, TaskError

_WORDS = re.compile(r"\s+|\S+\s*")
_FILLER = "tandem paces the fast answer while the slow work runs and then lets it flow".split()


class SimulatedOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=1_000_000, description="exact text to emit")
    tokens: int = Field(30, ge=0, le=1_000_000, description="number of tokens when text is absent")
    interval_ms: float = Field(50, ge=0, le=60_000)
    delay_ms: float = Field(0, ge=0, le=3_600_000)
    fail_after: int | None = Field(None, ge=0, description="raise after emitting this many tokens")


def split_tokens(text: str) -> list[str]:
    """Word-sized pieces whose concatenation is exactly `text`."""
    return _WORDS.findall(text)


def derived_tokens(prompt: str, n: int) -> list[str]:
    words = prompt.split() or ["tandem"]
    pool = words + _FILLER
    return [pool[i % len(pool)] + " " for i in range(n)]


async def simulated(prompt: str, options: SimulatedOptions, ctx: TaskContext) -> AsyncIterator[str]:
    tokens = split_tokens(options.text) if options.text is not None else derived_tokens(prompt, options.tokens)
    loop = asyncio.get_running_loop()
    # An absolute schedule, so N tokens take N intervals however long each append took.
    start = loop.time() + options.delay_ms / 1000
    interval, fail_after = options.interval_ms / 1000, options.fail_after
    for i, token in enumerate(tokens):
        if fail_after is not None and i >= fail_after:
            raise TaskError("task_failed", f"simulated failure after {i} tokens")
        delay = start + i * interval - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        yield token
    if options.fail_after == len(tokens):
        raise TaskError("task_failed", f"simulated failure after {len(tokens)} tokens")


TASK = Task(name="simulated", options=SimulatedOptions, run=simulated, description="deterministic tokens, no network")
