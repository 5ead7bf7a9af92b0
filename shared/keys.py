"""The one place that names Redis keys and channels.

Every key of one stream carries the hash tag ``{<id>}`` so all of them live on one Redis Cluster
slot, and the Lua scripts that touch several of them at once stay legal there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["a", "b"]
SOURCES: tuple[Source, Source] = ("a", "b")
WAKE = "poll"  # the message published on `Keys.jobs` (its content is not read: any message wakes)


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "tandem"

    def _tag(self, stream_id: str) -> str:
        return f"{self.prefix}:{{{stream_id}}}"

    def meta(self, stream_id: str) -> str:
        """HASH: the stream's state (see README, "Redis layout")."""
        return f"{self._tag(stream_id)}:meta"

    def events(self, stream_id: str, source: Source) -> str:
        """STREAM: one source's entries, in order."""
        return f"{self._tag(stream_id)}:{source}"

    def lease(self, stream_id: str, source: Source) -> str:
        """STRING with a TTL: the worker currently running a source."""
        return f"{self._tag(stream_id)}:lease:{source}"

    def channel(self, stream_id: str) -> str:
        """Pub/sub channel: each append is announced here with its entries."""
        return f"{self._tag(stream_id)}:live"

    def job_id(self, stream_id: str, source: Source) -> str:
        """arq job id: derived, so enqueueing the same source twice is a no-op."""
        return f"{self._tag(stream_id)}:job:{source}"

    def stream_keys(self, stream_id: str) -> list[str]:
        """Every data key of one stream (what retention expires)."""
        return [self.meta(stream_id), self.events(stream_id, "a"), self.events(stream_id, "b")]

    @property
    def index(self) -> str:
        """ZSET: stream ids scored by creation time (ms), trimmed past retention."""
        return f"{self.prefix}:streams"

    @property
    def hub(self) -> str:
        """Pub/sub channel every API hub subscribes to, so its pub/sub connection always exists."""
        return f"{self.prefix}:hub"

    @property
    def jobs(self) -> str:
        """Pub/sub channel: a job was enqueued or an abort requested; every worker polls arq's
        queue at once instead of at its next poll (workers/wakeup.py)."""
        return f"{self.prefix}:jobs"

    @property
    def running(self) -> str:
        """ZSET: "<id>:<source>" members of running sources, scored by lease deadline (ms)."""
        return f"{self.prefix}:running"

    # -- operations: who is alive, who reads what (tandem ls / stats) -------------------------

    @property
    def apis(self) -> str:
        """ZSET: API process ids scored by heartbeat deadline (ms); past it, the process is gone."""
        return f"{self.prefix}:apis"

    def readers(self, api_id: str) -> str:
        """HASH with a TTL: stream id -> SSE connections open now on one API process."""
        return f"{self.prefix}:readers:{api_id}"

    @property
    def workers(self) -> str:
        """ZSET: worker ids scored by their last heartbeat (ms)."""
        return f"{self.prefix}:workers"

    def worker(self, worker_id: str) -> str:
        """STRING (JSON) with a TTL: one worker's heartbeat details."""
        return f"{self.prefix}:worker:{worker_id}"

    def appended(self, worker_id: str) -> str:
        """STRING (integer) with a TTL: how many deltas one worker has appended, across all its
        sources (its appends check it: see shared/store.py, the append script)."""
        return f"{self.prefix}:appended:{worker_id}"

    def stream_id_from_key(self, key: str) -> str | None:
        head = f"{self.prefix}:{{"
        if not key.startswith(head):
            return None
        end = key.find("}", len(head))
        return key[len(head) : end] if end > 0 else None
