"""The pacing rule, as a pure state machine: no I/O, no clock of its own.

Inputs: the next event of A or B (``push``), "B has completed" (``b_completed``; known as soon as
B's terminal entry is written, even while B's events are not wanted yet), and the time passed to
``poll``. Output: what to send now and when to ask again.

1. While B runs, at most one A delta per ``slow_interval``; A's done/error goes without waiting.
2. Once B has completed, A's backlog goes at once, and the rest of A as it arrives.
3. After A's terminal event, B's events, deltas spaced by ``b_interval``; then ``end``.

The caller waits on "new input" with the returned deadline as timeout, so B's completion in the
middle of a slow interval wakes it and the flush goes out then, not when the interval is over.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shared.events import Event, end_event, final_status, sse_message, state_after

PhaseName = Literal["slow", "flush", "waiting", "b"]


@dataclass(frozen=True, slots=True)
class Phase:
    phase: PhaseName

    def sse(self) -> bytes:
        return sse_message("phase", {"phase": self.phase})


Item = Event | Phase


class Fifo:
    """Events waiting to go, oldest first: a list and a read position. (A deque allocates 760
    bytes up front; every open connection holds two queues, mostly empty.)"""

    __slots__ = ("_head", "_items")

    def __init__(self) -> None:
        self._items: list[Event] = []
        self._head = 0

    def __len__(self) -> int:
        return len(self._items) - self._head

    def append(self, event: Event) -> None:
        self._items.append(event)

    def peek(self) -> Event:
        return self._items[self._head]

    def popleft(self) -> Event:
        items, head = self._items, self._head
        event = items[head]
        head += 1
        if head == len(items):
            items.clear()
            head = 0
        elif head >= 64 and head * 2 >= len(items):
            del items[:head]  # drop what went out, in amortized O(1) per event
            head = 0
        self._head = head
        return event
_PHASES = {p: Phase(p) for p in ("slow", "flush", "waiting", "b")}


class Pacer:
    __slots__ = (
        "_a",
        "_a_state",
        "_b",
        "_b_state",
        "_next_a",
        "_next_b",
        "_phase",
        "a_finished",
        "b_complete",
        "b_interval",
        "finished",
        "slow_interval",
    )

    def __init__(
        self,
        slow_interval_s: float,
        b_interval_s: float,
        *,
        a_state: str | None = None,
        b_complete: bool = False,
        b_state: str | None = None,
    ) -> None:
        """`a_state`: A's terminal state when this connection starts past A (resume into B);
        `b_state`: B's, when it starts past B's terminal event too (only `end` is left)."""
        self.slow_interval = slow_interval_s
        self.b_interval = b_interval_s
        self._a = Fifo()
        self._b = Fifo()
        # Plain attributes, not properties: the feed asks for them on every event.
        self.b_complete = b_complete or b_state is not None  # B's terminal entry is written (not necessarily sent)
        self._a_state = a_state  # set once A's terminal event has been emitted
        self.a_finished = a_state is not None
        self._b_state = b_state
        self._next_a = float("-inf")
        self._next_b = float("-inf")
        self._phase: PhaseName | None = None
        self.finished = False

    # -- inputs --------------------------------------------------------------------------------

    def push(self, event: Event) -> None:
        (self._a if event.source == "a" else self._b).append(event)
        if event.source == "b" and event.terminal:
            self.b_complete = True

    def b_completed(self) -> None:
        self.b_complete = True

    def passes(self, event: Event) -> bool:
        """Whether `event`, A's next, goes out as it arrives: a delta while A flushes with nothing
        queued before it. `push` then `poll` would give it back at once, alone, and leave the
        pacer as it is now, so the connection sends it without queueing it (nearly every live
        token is one)."""
        a = self._a
        return self._phase == "flush" and a._head == len(a._items) and event.kind == "delta" and self._a_state is None

    # -- state the feeder needs ----------------------------------------------------------------

    def pending(self, source: str) -> int:
        return len(self._a if source == "a" else self._b)

    @property
    def phase(self) -> PhaseName | None:
        return self._phase

    # -- output --------------------------------------------------------------------------------

    def poll(self, now: float, limit: int = 1 << 30) -> tuple[list[Item], float | None]:
        """Items due at `now` (at most `limit` events), and when to poll again (None: on input)."""
        out: list[Item] = []
        n = 0
        while not self.finished and n < limit:
            if self._a_state is None:
                # A's events: this runs for nearly every event a connection sends, so the queue
                # is read in place and a delta costs no method call (but the pop of a queue that
                # holds more than it).
                phase: PhaseName = "flush" if self.b_complete else "slow"
                if self._phase != phase:
                    self._phase = phase
                    out.append(_PHASES[phase])
                a = self._a
                items = a._items
                paced = not self.b_complete and self.slow_interval > 0
                while n < limit:
                    i = a._head
                    if i == len(items):
                        return out, None
                    head = items[i]
                    delta = head.kind == "delta"
                    if paced and delta:
                        if now < self._next_a:
                            return out, self._next_a
                        self._next_a = now + self.slow_interval
                    if i + 1 == len(items):
                        items.clear()  # the queue is empty now: what popleft would do, without the call
                        a._head = 0
                    else:
                        a.popleft()
                    out.append(head)
                    n += 1
                    if not delta and head.terminal:
                        self._a_state = state_after_event(head)
                        self.a_finished = True
                        # B's events may not be loaded yet: let the caller read them before
                        # deciding between "waiting" and "b".
                        return out, now
            elif self._b_state is not None:
                out.append(end_event(final_status(self._a_state, self._b_state)))
                self.finished = True
            else:
                if not self._b:
                    self._enter("waiting" if self._phase != "b" else "b", out)
                    return out, None
                self._enter("b", out)
                head = self._b.peek()
                if head.kind == "delta" and self.b_interval > 0:
                    if now < self._next_b:
                        return out, self._next_b
                    self._next_b = now + self.b_interval
                self._b.popleft()
                out.append(head)
                n += 1
                if head.terminal:
                    self._b_state = state_after_event(head)
                    out.append(end_event(final_status(self._a_state, self._b_state)))
                    self.finished = True
        return out, (None if self.finished else now)

    def _enter(self, phase: PhaseName, out: list[Item]) -> None:
        if self._phase != phase:
            self._phase = phase
            out.append(_PHASES[phase])


def state_after_event(event: Event) -> str:
    if event.kind == "done":
        return "done"
    return state_after({"type": "error", "code": str(event.data.get("code", ""))})
