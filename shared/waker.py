"""A wake-up flag a task can await, with an optional deadline (a timer only when there is one), no
task per wait: an SSE connection waits on one for its next event, the worker's append pipe for the
end of its write window."""

from __future__ import annotations

import asyncio


class Waker:
    __slots__ = ("_flag", "_fut")

    def __init__(self) -> None:
        self._flag = False
        self._fut: asyncio.Future[None] | None = None

    def set(self) -> None:
        self._flag = True
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    def clear(self) -> None:
        self._flag = False

    async def wait(self, deadline: float | None) -> None:
        """Return when set, or at loop time `deadline` (None: no deadline)."""
        if self._flag:
            return
        loop = asyncio.get_running_loop()
        fut = self._fut = loop.create_future()
        timer = loop.call_at(deadline, _wake, fut) if deadline is not None else None
        try:
            await fut
        finally:
            self._fut = None
            if timer is not None:
                timer.cancel()


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
