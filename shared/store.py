"""Every read and write of a stream's Redis keys, for both tiers.

Writes that change a source's state run as Lua scripts, so a reader never sees an entry without
the state that goes with it: a terminal entry, the source's new state, the stream's final status
and the retention TTLs become visible together, and each append is announced on the stream's
channel (with its entries, in XRANGE's shape) in the same step.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from shared.events import TERMINAL_STATES, Entry, delta_fields, error_fields, fields_dict
from shared.keys import SOURCES, Keys, Source
from shared.settings import Settings

# Shared by the scripts below. A source's state goes queued -> running -> done|failed|cancelled;
# the stream's status goes queued -> running -> completed|failed|cancelled.
_LUA_PRELUDE = r"""
local function is_terminal(st) return st == 'done' or st == 'failed' or st == 'cancelled' end

local function announce(channel, src, prev, entries)
  redis.call('PUBLISH', channel, cjson.encode({s = src, p = prev, e = entries}))
end

-- Append the terminal entry `fields` to source `src` unless it is terminal already.
local function finish_source(meta, skey, channel, src, fields)
  local st = redis.call('HGET', meta, src .. '_state')
  if (not st) or is_terminal(st) then return 0 end
  local prev = redis.call('HGET', meta, src .. '_last') or '0-0'
  local id = redis.call('XADD', skey, '*', unpack(fields))
  local f = {}
  for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
  local state = 'done'
  if f['type'] == 'error' then
    if f['code'] == 'cancelled' then state = 'cancelled' else state = 'failed' end
    redis.call('HSET', meta, src .. '_error', cjson.encode({code = f['code'], message = f['message']}))
  end
  redis.call('HSET', meta, src .. '_state', state, src .. '_last', id)
  redis.call('HINCRBY', meta, src .. '_events', 1)
  if prev == '0-0' then redis.call('PEXPIRE', skey, redis.call('PTTL', meta)) end
  announce(channel, src, prev, {{id, fields}})
  return 1
end

-- Once both sources are terminal: final status, and every key of the stream expires together.
local function settle(meta, keys_to_expire, retention_ms, now_ms, running, stream_id)
  local a = redis.call('HGET', meta, 'a_state')
  local b = redis.call('HGET', meta, 'b_state')
  if not (is_terminal(a) and is_terminal(b)) then return end
  local status = 'completed'
  if a == 'cancelled' or b == 'cancelled' then status = 'cancelled'
  elseif a == 'failed' or b == 'failed' then status = 'failed' end
  redis.call('HSET', meta, 'status', status, 'finished_ms', now_ms)
  for _, k in ipairs(keys_to_expire) do redis.call('PEXPIRE', k, retention_ms) end
  redis.call('ZREM', running, stream_id .. ':a', stream_id .. ':b')
end
"""

# KEYS: meta, a, b, lease:a, lease:b, running
# ARGV: channel, retention_ms, now_ms, stream_id, n_sources, sources..., fields...
_FINISH = (
    _LUA_PRELUDE
    + r"""
local n = tonumber(ARGV[5])
local fields = {}
for i = 6 + n, #ARGV do fields[#fields + 1] = ARGV[i] end
local written = 0
for i = 1, n do
  local src = ARGV[5 + i]
  local skey = KEYS[2]
  if src == 'b' then skey = KEYS[3] end
  written = written + finish_source(KEYS[1], skey, ARGV[1], src, fields)
end
if written > 0 then
  if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
  settle(KEYS[1], {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[2], ARGV[3], KEYS[6], ARGV[4])
end
return written
"""
)

# KEYS: meta, events(src), a, b, lease:a, lease:b, running
# ARGV: channel, retention_ms, now_ms, stream_id, src, max_events, texts...
# Returns the number of texts appended, or -1 when the source is not running (stop producing).
_APPEND = (
    _LUA_PRELUDE
    + r"""
local meta, skey, src = KEYS[1], KEYS[2], ARGV[5]
if redis.call('HGET', meta, src .. '_state') ~= 'running' then return -1 end
local events = tonumber(redis.call('HGET', meta, src .. '_events') or '0')
local room = tonumber(ARGV[6]) - 1 - events
local n = #ARGV - 6
local take = n
if take > room then take = room end
local prev = redis.call('HGET', meta, src .. '_last') or '0-0'
if take > 0 then
  local out = {}
  local last = prev
  for i = 1, take do
    local text = ARGV[6 + i]
    last = redis.call('XADD', skey, '*', 'type', 'delta', 'text', text)
    out[i] = {last, {'type', 'delta', 'text', text}}
  end
  if prev == '0-0' then redis.call('PEXPIRE', skey, redis.call('PTTL', meta)) end
  redis.call('HSET', meta, src .. '_last', last)
  redis.call('HINCRBY', meta, src .. '_events', take)
  redis.call('HINCRBY', meta, src .. '_tokens', take)
  announce(ARGV[1], src, prev, out)
else
  take = 0
end
if take < n then
  local limit = 'source reached the limit of ' .. ARGV[6] .. ' events (TANDEM_MAX_SOURCE_EVENTS)'
  finish_source(meta, skey, ARGV[1], src, {'type', 'error', 'code', 'too_long', 'message', limit})
  settle(meta, {meta, KEYS[3], KEYS[4], KEYS[5], KEYS[6]}, ARGV[2], ARGV[3], KEYS[7], ARGV[4])
  return -1
end
return take
"""
)

# KEYS: meta, running ; ARGV: src, worker, lease_deadline_ms, stream_id
# Returns the source's state before the call ('queued' means this caller now runs it).
_START = r"""
local st = redis.call('HGET', KEYS[1], ARGV[1] .. '_state')
if st == 'queued' then
  redis.call('HSET', KEYS[1], ARGV[1] .. '_state', 'running', ARGV[1] .. '_worker', ARGV[2],
             ARGV[1] .. '_started_ms', ARGV[5])
  if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4] .. ':' .. ARGV[1])
end
return st or false
"""


@dataclass(frozen=True, slots=True)
class Created:
    id: str
    token: str


def new_id() -> str:
    return secrets.token_urlsafe(16)  # 128 random bits


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(meta: dict[str, str], token: str) -> bool:
    return hmac.compare_digest(meta.get("token_sha256", ""), token_digest(token))


def now_ms() -> int:
    return int(time.time() * 1000)


class Store:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self.settings = settings
        self.keys = Keys(settings.key_prefix)
        self._finish = redis.register_script(_FINISH)
        self._append = redis.register_script(_APPEND)
        self._start = redis.register_script(_START)

    # -- create --------------------------------------------------------------------------------

    async def create(
        self,
        *,
        prompt: str,
        tasks: dict[Source, tuple[str, dict[str, Any]]],
        pacing: dict[str, int],
    ) -> Created:
        stream_id, token = new_id(), secrets.token_urlsafe(32)
        k, now = self.keys, now_ms()
        meta: dict[str, str | int] = {
            "id": stream_id,
            "token_sha256": token_digest(token),
            "status": "queued",
            "created_ms": now,
            "prompt": prompt,
            "pacing": orjson.dumps(pacing).decode(),
        }
        for src in SOURCES:
            name, options = tasks[src]
            meta |= {
                f"{src}_task": name,
                f"{src}_options": orjson.dumps(options).decode(),
                f"{src}_state": "queued",
                f"{src}_tokens": 0,
                f"{src}_events": 0,
                f"{src}_last": "0-0",
            }
        # Unfinished streams expire too, after the longest a source may run plus retention.
        ttl_ms = (self.settings.max_stream_s + self.settings.retention_s) * 1000
        async with self.redis.pipeline(transaction=True) as tx:
            tx.hset(k.meta(stream_id), mapping=meta)
            tx.pexpire(k.meta(stream_id), ttl_ms)
            tx.zadd(k.index, {stream_id: now})
            tx.zremrangebyscore(k.index, "-inf", now - ttl_ms)
            await tx.execute()
        return Created(stream_id, token)

    async def delete(self, stream_id: str) -> None:
        """Undo a create whose jobs could not be enqueued."""
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(*self.keys.stream_keys(stream_id))
            tx.zrem(self.keys.index, stream_id)
            await tx.execute()

    # -- reads ---------------------------------------------------------------------------------

    async def meta(self, stream_id: str) -> dict[str, str] | None:
        raw = await self.redis.hgetall(self.keys.meta(stream_id))  # type: ignore[misc]
        if not raw:
            return None
        return {_s(k): _s(v) for k, v in raw.items()}

    async def read(self, stream_id: str, source: Source, after: str, count: int) -> list[Entry]:
        """Entries strictly after entry id `after` (exclusive range), oldest first."""
        rows = await self.redis.xrange(self.keys.events(stream_id, source), min=f"({after}" if after != "0-0" else "-", count=count)
        return [(_s(eid), {_s(f): _s(v) for f, v in fields.items()}) for eid, fields in rows]

    async def text(self, stream_id: str, source: Source) -> str:
        """A source's text so far, read in batches (the status document needs all of it)."""
        parts: list[str] = []
        after = "0-0"
        while True:
            rows = await self.read(stream_id, source, after, 1000)
            parts.extend(f.get("text", "") for _, f in rows if f.get("type") == "delta")
            if len(rows) < 1000:
                return "".join(parts)
            after = rows[-1][0]

    async def status(self, stream_id: str, meta: dict[str, str]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": stream_id,
            "status": meta.get("status", "queued"),
            "created_at": _iso(int(meta.get("created_ms", "0"))),
        }
        for src in SOURCES:
            err = meta.get(f"{src}_error")
            doc[src] = {
                "task": meta.get(f"{src}_task"),
                "state": meta.get(f"{src}_state"),
                "tokens": int(meta.get(f"{src}_tokens", "0")),
                "text": await self.text(stream_id, src),
                "error": orjson.loads(err) if err else None,
            }
        doc["pacing"] = orjson.loads(meta.get("pacing", "{}"))
        return doc

    # -- writes (workers) ----------------------------------------------------------------------

    async def start(self, stream_id: str, source: Source, worker: str) -> str | None:
        """Claim a queued source. Returns its state before the call; 'queued' means it is ours."""
        k = self.keys
        deadline = now_ms() + int(self.settings.lease_s * 1000)
        st = await self._start(
            keys=[k.meta(stream_id), k.running],
            args=[source, worker, deadline, stream_id, now_ms()],
        )
        return _s(st) if st else None

    async def append(self, stream_id: str, source: Source, texts: Sequence[str]) -> int:
        """Append deltas in one round trip. -1: the source is not running any more, stop."""
        k = self.keys
        return cast(
            int,
            await self._append(
                keys=[k.meta(stream_id), k.events(stream_id, source), *self._expiring(stream_id), k.running],
                args=[k.channel(stream_id), self.settings.retention_s * 1000, now_ms(), stream_id, source,
                      self.settings.max_source_events, *texts],
            ),
        )

    async def finish(self, stream_id: str, sources: Sequence[Source], fields: Sequence[str]) -> int:
        """Append a terminal entry to each of `sources` that is not terminal yet; settle the stream."""
        k = self.keys
        return cast(
            int,
            await self._finish(
                keys=[k.meta(stream_id), *self._expiring(stream_id), k.running],
                args=[k.channel(stream_id), self.settings.retention_s * 1000, now_ms(), stream_id,
                      len(sources), *sources, *fields],
            ),
        )

    async def cancel(self, stream_id: str) -> int:
        return await self.finish(stream_id, SOURCES, error_fields("cancelled", "cancelled by request"))

    def _expiring(self, stream_id: str) -> list[str]:
        k = self.keys
        return [k.events(stream_id, "a"), k.events(stream_id, "b"), k.lease(stream_id, "a"), k.lease(stream_id, "b")]


def is_terminal(state: str | None) -> bool:
    return state in TERMINAL_STATES


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


__all__ = ["Created", "Store", "delta_fields", "fields_dict", "is_terminal", "token_matches"]
