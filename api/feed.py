"""One SSE connection's view of a stream: feeds the pacer from announcements and catch-up reads.

Per source the feed remembers `after`, the last entry handed to the pacer. An announcement whose
`prev` is `after` is appended directly (one that starts before `after` adds the entries after
it: a catch-up read and an announcement may overlap); anything else (a resume, a gap, a
reconnect, a full buffer) marks the source `behind`, and the next `fill` reads from Redis after
`after`, in batches. Announcements that arrive while such a read is in flight are kept and
applied after it: at 20 tokens/s a new one arrives during almost every read of a busy process,
and reading again for each would keep the source behind for as long as the stream runs. So the feed never holds more than about one batch per source, however long the stream,
and never loses or repeats an entry: entries go to the pacer strictly in id order.
While B runs and A is slowed, it holds even less of A (`slow_buffer`), refilled as the slow pace
takes it. B's entries are not read at all while A is still going; only B's completion is noted.

A connection starts behind. Its request may have read A's first entries already (`prefill`: read
with the request's checks, before the subscription was confirmed); the first fill still reads
after them, for anything appended before the subscription took effect, and B's state with them:
B may have completed in that moment too, announced to no one.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from shared.background import settled
from shared.cursor import Cursor, entry_key
from shared.events import Announcement, Event
from shared.keys import SOURCES
from shared.pacing import Pacer
from shared.store import Store, is_terminal
from shared.waker import Waker

STASH_MAX = 64  # announcements kept per source during one catch-up read


class SourceState:
    """Where one connection is in one source. (An object with slots, not six dicts keyed by
    source: at 10,000 open connections each byte here is 10 KB.)"""

    __slots__ = ("after", "behind", "closed", "dirty", "reading", "stash")

    def __init__(self, after: str = "0-0", closed: bool = False) -> None:
        self.after = after  # everything up to this entry went to the pacer (or to the client)
        self.closed = closed  # its terminal entry has been taken
        self.behind = True  # history may exist: read first
        self.dirty = False  # something may have been missed during a read
        self.reading = False  # a catch-up read is in flight
        self.stash: list[Announcement] | None = None  # announced during that read


class Feed:
    __slots__ = ("_a", "_b", "_batch", "_check_b", "_slow", "_store", "_stream_id", "b_completed_at", "notify", "pacer", "resyncs", "send", "waker")

    def __init__(self, store: Store, stream_id: str, cursor: Cursor, pacer: Pacer, batch: int, slow_buffer: int | None = None) -> None:
        """`cursor`: read strictly after it (see `start_point`). `batch`: the most entries one
        read asks for, and the most the pacer holds of a source; `slow_buffer` (at most `batch`):
        the most it holds of A while B runs and A is slowed (TANDEM_SLOW_BUFFER)."""
        self._store = store
        self._stream_id = stream_id
        self._batch = batch
        # While B runs, the pacer lets one of A's deltas go per slow interval, and A's backlog
        # waits in Redis rather than here: held here, it would cost each connection up to a
        # batch of events (a hundred KB) for as long as B runs, and those events, alive for
        # seconds, are most of what the garbage collector's young passes walk at that stage.
        # The flush sends what is held at once and reads the rest (as a resume would).
        self._slow = batch if pacer.slow_interval <= 0 or slow_buffer is None else max(1, min(slow_buffer, batch))
        self.pacer = pacer
        self.waker = Waker()
        # Called once an announcement has been taken in: wakes the reader, unless the reader put
        # something quicker in its place (api/sse.py sends straight from the hub's callback).
        self.notify: Callable[[], None] = self.waker.set
        # Set by the reader while it may send from the hub's callback: sends A's next event if the
        # pacer lets it through as it arrives (`Pacer.passes`), or answers False (queue it as usual).
        self.send: Callable[[Event], bool] | None = None
        if cursor.source == "b":
            self._a, self._b = SourceState(closed=True), SourceState(cursor.entry)
        else:
            self._a, self._b = SourceState(cursor.entry if cursor.source == "a" else "0-0"), SourceState()
        self.b_completed_at: float | None = None  # perf_counter() when B's completion was noticed (metrics)
        self.resyncs = 0  # times the hub asked for a catch-up (after it reconnected to Redis)
        self._check_b = True  # B's state is read with the first fill after subscribing

    def _st(self, source: str) -> SourceState:
        return self._a if source == "a" else self._b

    def _wanted(self, source: str) -> bool:
        if self._st(source).closed:
            return False
        return source == "a" or self.pacer.a_finished

    # -- from the hub --------------------------------------------------------------------------

    def on_announcement(self, ann: Announcement) -> None:
        src = ann.source
        st = self._a if src == "a" else self._b
        if st.closed:
            return
        events = ann.events
        if src == "a":
            wanted = True
        else:
            if not self.pacer.b_complete and events and events[-1].terminal:
                self.pacer.b_completed()
                self.b_completed_at = time.perf_counter()  # not loop.time(): uvloop's has 1 ms resolution
            wanted = self.pacer.a_finished
        if st.reading:
            if st.stash is None:
                st.stash = []
            if len(st.stash) < STASH_MAX:
                st.stash.append(ann)
            else:
                st.dirty = True  # too many to keep: read again after this read
        elif st.behind or not wanted:
            st.behind = True
        elif src == "a" and self.send is not None and len(events) == 1 and ann.prev == st.after and self.send(events[0]):
            st.after = events[0].entry  # sent as it came: nothing queued, nothing to wake
            return
        else:
            self._chain(st, ann)
        self.notify()

    def _chain(self, st: SourceState, ann: Announcement) -> bool:
        """Take what `ann` adds after `after`. False, and the source is behind, when it leaves a gap
        or the pacer is full (those entries are read from Redis later)."""
        after = st.after
        events = ann.events
        if ann.prev != after:
            # Only an announcement that contains `after` itself continues from it (its entries are
            # contiguous); one that lies wholly at or before `after` adds nothing.
            ids = [e.entry for e in events]
            if after in ids:
                events = events[ids.index(after) + 1 :]
            elif entry_key(ann.prev) < entry_key(after) and all(entry_key(i) <= entry_key(after) for i in ids):
                return True
            else:
                st.behind = True  # a gap: announcements were missed (or this one is not ours)
                return False
        if self.pacer.pending(ann.source) + len(events) > self._cap(ann.source):
            st.behind = True  # the pacer is full: read these later, from Redis
            return False
        self._take(st, events)
        return True

    def on_resync(self) -> None:
        self.resyncs += 1
        for st in (self._a, self._b):
            st.behind = st.dirty = True
        self.waker.set()

    # -- from the SSE loop ---------------------------------------------------------------------

    def prefill(self, events: list[Event]) -> None:
        """A's entries after the connection's cursor, read before the subscription was confirmed:
        to the pacer at once (as many as it holds now). A stays behind: the first fill reads
        what follows them."""
        self._take(self._a, events[: self._cap("a")])

    def _cap(self, source: str) -> int:
        """The most events of `source` the pacer holds now."""
        return self._slow if source == "a" and not self.pacer.b_complete else self._batch

    def needs_fill(self) -> bool:
        # (Asked twice per live event: written out rather than with `_wanted` and `_cap`.)
        if self._check_b:
            return True
        a, b, pacer = self._a, self._b, self.pacer
        if a.behind and not a.closed and pacer.pending("a") < ((self._batch if pacer.b_complete else self._slow) + 1) // 2:
            return True
        return b.behind and not b.closed and pacer.a_finished and pacer.pending("b") < (self._batch + 1) // 2

    def must_read_first(self) -> bool:
        """Whether the pacer must not be polled before the next fill: its next decision needs B's
        state or events (whether B has completed, what follows A). What it holds of A may go out
        while A is behind: what follows is read after it, in order. (So a flush that leaves A
        behind, its backlog in Redis, sends what is held at once, then reads the rest.)"""
        if self._check_b:
            return True
        b = self._b
        return b.behind and not b.closed and self.pacer.a_finished

    async def fill(self) -> None:
        """Catch up from Redis where behind, for the sources the pacer wants now (the first time,
        B's state too)."""
        if not self._check_b or self.pacer.b_complete:
            self._check_b = False
            return await self._fill()
        b_soon = self._store.source_state_soon(self._stream_id, "b")  # goes out with the first read
        filled, b_now = await settled(self._fill(), b_soon)
        for answer in (filled, b_now):
            if isinstance(answer, BaseException):
                raise answer
        self._check_b = False
        if is_terminal(b_now):
            self.pacer.b_completed()

    async def _fill(self) -> None:
        for src in SOURCES:
            st = self._st(src)
            while st.behind and self._wanted(src) and self.pacer.pending(src) < (self._cap(src) + 1) // 2:
                st.dirty = False
                room = self._cap(src) - self.pacer.pending(src)  # the pacer never holds more than that
                st.reading = True
                try:
                    events = await self._store.read_events(self._stream_id, src, st.after, room)
                finally:
                    st.reading = False
                    stash, st.stash = st.stash or (), None
                self._take(st, events)
                if len(events) < room and not st.dirty and all(self._chain(st, ann) for ann in stash):
                    # Read to the end, and what was announced meanwhile follows on: live from here on.
                    st.behind = False

    def _take(self, st: SourceState, events: list[Event]) -> None:
        push = self.pacer.push
        for event in events:
            if st.closed:
                return
            push(event)
            st.after = event.entry
            if event.kind != "delta" and event.terminal:
                st.closed = True


def start_point(cursor: Cursor, meta: dict[str, str]) -> tuple[Cursor, str | None, str | None]:
    """Where a connection starts: (cursor, A's terminal state if it starts past A, B's if past B),
    for the Pacer. A resume at a source's terminal entry starts past that source: at A's, B is
    next; at B's, only `end` is left (else the reader would wait for a terminal it already has)."""
    if cursor.source == "a" and cursor.entry == meta.get("a_last") and is_terminal(meta.get("a_state")):
        cursor = Cursor("b", "0-0")
    if cursor.source != "b":
        return cursor, None, None
    past_b = cursor.entry != "0-0" and cursor.entry == meta.get("b_last") and is_terminal(meta.get("b_state"))
    return cursor, meta.get("a_state"), meta.get("b_state") if past_b else None
