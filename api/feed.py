"""One SSE connection's view of a stream: feeds the pacer from announcements and catch-up reads.

Per source the feed remembers `after`, the last entry handed to the pacer. An announcement whose
`prev` is `after` is appended directly (one that starts before `after` adds the entries after
it: a catch-up read and an announcement may overlap); anything else (a resume, a gap, a
reconnect, a full buffer) marks the source `behind`, and the next `fill` reads from Redis after
`after`, in batches. Announcements that arrive while such a read is in flight are kept and
applied after it: at 20 tokens/s a new one arrives during almost every read of a busy process,
and reading again for each would keep the source behind for as long as the stream runs. So the feed never holds more than about one batch per source, however long the stream,
and never loses or repeats an entry: entries go to the pacer strictly in id order.
B's entries are not read at all while A is still going; only B's completion is noted.
"""

from __future__ import annotations

import time

from api.waker import Waker
from shared.cursor import Cursor, entry_key
from shared.events import Announcement, Event, event_from_entry
from shared.keys import SOURCES, Source
from shared.pacing import Pacer
from shared.store import Store, is_terminal

STASH_MAX = 64  # announcements kept per source during one catch-up read


class Feed:
    __slots__ = (
        "_after", "_batch", "_behind", "_closed", "_dirty", "_reading", "_stash", "_store", "_stream_id", "b_completed_at",
        "pacer", "resyncs", "waker",
    )  # fmt: skip

    def __init__(self, store: Store, stream_id: str, cursor: Cursor, pacer: Pacer, batch: int) -> None:
        """`cursor`: read strictly after it (see `start_point`)."""
        self._store = store
        self._stream_id = stream_id
        self._batch = batch
        self.pacer = pacer
        self.waker = Waker()
        # Position per source: everything up to `after` has gone to the pacer (or to the client).
        self._after: dict[str, str] = {"a": "0-0", "b": "0-0"}
        self._closed: dict[str, bool] = {"a": False, "b": False}  # terminal entry already taken
        if cursor.source == "a":
            self._after["a"] = cursor.entry
        elif cursor.source == "b":
            self._closed["a"] = True
            self._after["b"] = cursor.entry
        self._behind: dict[str, bool] = {"a": True, "b": True}  # history may exist: read first
        self._dirty: dict[str, bool] = {"a": False, "b": False}  # something may have been missed during a read
        self._reading: dict[str, bool] = {"a": False, "b": False}  # a catch-up read is in flight
        self._stash: dict[str, list[Announcement]] = {"a": [], "b": []}  # announced during that read
        self.b_completed_at: float | None = None  # perf_counter() when B's completion was noticed (metrics)
        self.resyncs = 0  # times the hub asked for a catch-up (after it reconnected to Redis)

    def _wanted(self, source: str) -> bool:
        if self._closed[source]:
            return False
        return source == "a" or self.pacer.a_finished

    # -- from the hub --------------------------------------------------------------------------

    def on_announcement(self, ann: Announcement) -> None:
        src = ann.source
        if self._closed[src]:
            return
        events = ann.events
        if src == "b" and not self.pacer.b_complete and events and events[-1].terminal:
            self.pacer.b_completed()
            self.b_completed_at = time.perf_counter()  # not loop.time(): uvloop's has 1 ms resolution
            self.waker.set()
        if self._reading[src]:
            stash = self._stash[src]
            if len(stash) < STASH_MAX:
                stash.append(ann)
            else:
                self._dirty[src] = True  # too many to keep: read again after this read
        elif self._behind[src] or not self._wanted(src):
            self._behind[src] = True
        else:
            self._chain(src, ann)
        self.waker.set()

    def _chain(self, src: Source, ann: Announcement) -> bool:
        """Take what `ann` adds after `after`. False, and the source is behind, when it leaves a gap
        or the pacer is full (those entries are read from Redis later)."""
        after = self._after[src]
        events = ann.events
        if ann.prev != after:
            # Only an announcement that contains `after` itself continues from it (its entries are
            # contiguous); one that lies wholly at or before `after` adds nothing.
            ids = [e.cursor.entry for e in events]
            if after in ids:
                events = events[ids.index(after) + 1 :]
            elif entry_key(ann.prev) < entry_key(after) and all(entry_key(i) <= entry_key(after) for i in ids):
                return True
            else:
                self._behind[src] = True  # a gap: announcements were missed (or this one is not ours)
                return False
        if self.pacer.pending(src) + len(events) > self._batch:
            self._behind[src] = True  # the pacer is full: read these later, from Redis
            return False
        self._take(src, events)
        return True

    def on_resync(self) -> None:
        self.resyncs += 1
        for src in SOURCES:
            self._behind[src] = True
            self._dirty[src] = True
        self.waker.set()

    # -- from the SSE loop ---------------------------------------------------------------------

    def needs_fill(self) -> bool:
        return any(
            self._behind[s] and self._wanted(s) and self.pacer.pending(s) < (self._batch + 1) // 2 for s in SOURCES
        )

    async def fill(self) -> None:
        """Catch up from Redis where behind, for the sources the pacer wants now."""
        for src in SOURCES:
            while self._behind[src] and self._wanted(src) and self.pacer.pending(src) < (self._batch + 1) // 2:
                self._dirty[src] = False
                room = self._batch - self.pacer.pending(src)  # the pacer never holds more than a batch
                self._reading[src] = True
                try:
                    rows = await self._store.read(self._stream_id, src, self._after[src], room)
                finally:
                    self._reading[src] = False
                    stash, self._stash[src] = self._stash[src], []
                self._take(src, [event_from_entry(src, eid, f) for eid, f in rows])
                if len(rows) < room and not self._dirty[src] and all(self._chain(src, ann) for ann in stash):
                    # Read to the end, and what was announced meanwhile follows on: live from here on.
                    self._behind[src] = False

    def _take(self, src: Source, events: list[Event]) -> None:
        for event in events:
            if self._closed[src]:
                return
            self.pacer.push(event)
            self._after[src] = event.cursor.entry
            if event.terminal:
                self._closed[src] = True


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
