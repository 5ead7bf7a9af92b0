"""Stopping the background tasks that components own (hub, readers, heartbeat, sweeper, lease, pipe)."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel `task` and wait until it has ended.

    Only the task's own cancellation is absorbed: `suppress(CancelledError)` around `await task`
    would also swallow a cancellation of the caller, which must go on."""
    if task is None or task is asyncio.current_task():
        return
    if not task.done():
        task.cancel()
        await asyncio.wait([task])
    if not task.cancelled():
        task.exception()  # retrieved: a crashed loop was already logged by its owner
