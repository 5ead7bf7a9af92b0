"""Every read and write of a stream's Redis keys, for both tiers.

Writes that change a source's state run as Lua scripts, so a reader never sees an entry without
the state that goes with it: a terminal entry, the source's new state, the stream's final status
and the retention TTLs become visible together, and each append is announced on the stream's
channel (with its entries, in XRANGE's shape) in the same step.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from arq.constants import abort_jobs_ss, job_key_prefix, retry_key_prefix
from hiredis import pack_command
from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.events import (
    TERMINAL_STATES,
    Entry,
    Event,
    delta_fields,
    error_fields,
    event_from_entry,
    events_from_rows,
    fields_dict,
)
from shared.keys import SOURCES, WAKE, Keys, Source
from shared.mux import Mux, checked
from shared.settings import Settings

# Shared by the scripts below. A source's state goes queued -> running -> done|failed|cancelled;
# the stream's status goes queued -> running -> completed|failed|cancelled.
_LUA_PRELUDE = r"""
local function is_terminal(st) return st == 'done' or st == 'failed' or st == 'cancelled' end

local function announce(channel, src, prev, entries)
  redis.call('PUBLISH', channel, cjson.encode({s = src, p = prev, e = entries}))
end

-- Append the terminal entry `fields` to source `src` unless it is terminal already. The source's
-- lease and its `running` member go with it, and its counts are written to the meta (while it
-- ran, its entries were its deltas: appends do not count them one by one).
local function finish_source(meta, skey, lease, running, member, channel, src, fields)
  local st = redis.call('HGET', meta, src .. '_state')
  if (not st) or is_terminal(st) then return 0 end
  local tokens = redis.call('XLEN', skey)
  local prev = '0-0'
  if tokens > 0 then prev = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', 1)[1][1] end
  local id = redis.call('XADD', skey, '*', unpack(fields))
  local f = {}
  for i = 1, #fields, 2 do f[fields[i]] = fields[i + 1] end
  local state = 'done'
  if f['type'] == 'error' then
    if f['code'] == 'cancelled' then state = 'cancelled' else state = 'failed' end
    redis.call('HSET', meta, src .. '_error', cjson.encode({code = f['code'], message = f['message']}))
  end
  redis.call('HSET', meta, src .. '_state', state, src .. '_last', id, src .. '_tokens', tokens, src .. '_events', tokens + 1)
  if prev == '0-0' then redis.call('PEXPIRE', skey, redis.call('PTTL', meta)) end
  redis.call('DEL', lease)
  redis.call('ZREM', running, member)
  announce(channel, src, prev, {{id, fields}})
  return 1
end

-- KEYS of the scripts that may end a source: meta, a, b, lease:a, lease:b, running.
local function finish_one(src, stream_id, channel, fields)
  local skey, lease = KEYS[2], KEYS[4]
  if src == 'b' then skey, lease = KEYS[3], KEYS[5] end
  return finish_source(KEYS[1], skey, lease, KEYS[6], stream_id .. ':' .. src, channel, src, fields)
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

-- For the scripts with KEYS meta, a, b, lease:a, lease:b, running and ARGV channel, retention_ms,
-- now_ms, stream_id: end source `src` with an error entry, then settle the stream.
local function end_source(src, code, message)
  finish_one(src, ARGV[4], ARGV[1], {'type', 'error', 'code', code, 'message', message})
  settle(KEYS[1], {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[2], ARGV[3], KEYS[6], ARGV[4])
end

-- Same KEYS and ARGV: the lease key and `running` member of source `src`, or nil when the source
-- is not running any more (its member is dropped then).
local function running_lease(src)
  local lease = KEYS[4]
  if src == 'b' then lease = KEYS[5] end
  local member = ARGV[4] .. ':' .. src
  if redis.call('HGET', KEYS[1], src .. '_state') ~= 'running' then
    redis.call('ZREM', KEYS[6], member)
    return nil
  end
  return lease, member
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
  written = written + finish_one(ARGV[5 + i], ARGV[4], ARGV[1], fields)
end
if written > 0 then
  if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
  settle(KEYS[1], {KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]}, ARGV[2], ARGV[3], KEYS[6], ARGV[4])
end
return written
"""
)

# The appends of one worker write, for any number of sources, in one call.
# KEYS: the worker's `appended` count, then per append: lease, events, meta (of its source)
# ARGV: worker, the count as the worker knows it ('' for a one-off write), the count's TTL (ms),
#       then per append: channel, src, prev, expected, n, text_1 .. text_n
# `prev` is the source's last entry id and `expected` its number of deltas, before this append,
# as the worker knows them (it is the source's only writer: it holds its lease).
# Returns one result per append, then the worker's new count: the source's last entry id once
# the texts are appended (or were, by an earlier attempt of this write); -1 when the source is not
# running any more (stop producing); -2 when Redis lost writes of the source (it restarted
# without them: the source cannot go on without a gap); -3 when the source runs but its lease
# is not the worker's (it stalled for longer than the lease). The caller ends the source in the
# last two cases (Store.append_many). A Redis error for one append (a key of the wrong type) is
# that append's result; the others still run.
# This runs once per token at 20 tokens/s a source, so an append does no more than it must: its
# XADDs and one PUBLISH, and one MGET of the leases for the whole write. Nothing is read per
# append to make retries safe: the worker's count is, once per write. When it is as the worker
# knows it, no write of the worker was lost or applied twice, and every append goes ahead;
# otherwise (a retry of a write whose reply was lost, a Redis that lost writes, an expired count)
# each append is checked against its stream (XLEN, the last id). The source's counts in the meta
# are written when it ends (finish_source). One call per write, not one per source: the script
# call itself (its setup, its arguments as Lua tables, its reply) cost Redis as much as an
# append's commands. The announcement's JSON is put together here, not by cjson (encoding a table
# took longer than the XADD). A write spans many streams' keys, so it needs one Redis, not a
# Cluster (README, "Redis layout").
_APPEND = r"""
local worker, written = ARGV[1], ARGV[2]
local appends = (#KEYS - 1) / 3
-- The leases' owners, by MGETs of at most 1,000 keys: Lua unpacks at most 8,000 values at once,
-- and one write may carry every running source of a worker.
local owners = {}
for from = 1, appends, 1000 do
  local leases = {}
  for i = from, math.min(from + 999, appends) do leases[#leases + 1] = KEYS[3 * i - 1] end
  local got = redis.call('MGET', unpack(leases))
  for j = 1, #got do owners[from + j - 1] = got[j] end
end
local checked = written == '' or (redis.call('GET', KEYS[1]) or '0') ~= written
local count = tonumber(written) or 0
local results = {}
local at = 4
for i = 1, appends do
  local channel, src, prev, expected, n = ARGV[at], ARGV[at + 1], ARGV[at + 2], tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4])
  local first = at + 5
  at = first + n
  local skey = KEYS[3 * i]
  local result
  if owners[i] ~= worker then
    if redis.call('HGET', KEYS[3 * i + 1], src .. '_state') == 'running' then result = -3 else result = -1 end
  elseif checked then
    local have = redis.call('XLEN', skey)
    local last = '0-0'
    if have > 0 then last = redis.call('XREVRANGE', skey, '+', '-', 'COUNT', 1)[1][1] end
    if have == expected + n then
      result = last  -- appended by an earlier attempt of this write
      count = count + n
    elseif have ~= expected or last ~= prev then
      result = -2
    end
  end
  if result == nil then
    result = redis.pcall('XADD', skey, '*', 'type', 'delta', 'text', ARGV[first])
    if type(result) == 'string' then
      local entries = {'["' .. result .. '",["type","delta","text",' .. cjson.encode(ARGV[first]) .. ']]'}
      for j = 2, n do
        local text = ARGV[first + j - 1]
        result = redis.call('XADD', skey, '*', 'type', 'delta', 'text', text)
        entries[j] = '["' .. result .. '",["type","delta","text",' .. cjson.encode(text) .. ']]'
      end
      if prev == '0-0' then redis.call('PEXPIRE', skey, redis.call('PTTL', KEYS[3 * i + 1])) end
      -- The shape `announce` publishes (see the prelude).
      redis.call('PUBLISH', channel, '{"s":"' .. src .. '","p":"' .. prev .. '","e":[' .. table.concat(entries, ',') .. ']}')
      count = count + n
    end
  end
  results[i] = result
end
if written ~= '' then redis.call('SET', KEYS[1], count, 'PX', ARGV[3]) end
results[appends + 1] = count
return results
"""

# KEYS: meta, running, lease(src), arq queue, arq job key, arq retry key
# ARGV: src, worker, lease_deadline_ms, stream_id, now_ms, lease_ttl_ms, job_id
# Returns {the source's state before the call, the stream's meta hash (flat) when the claim is
# this caller's}: 'queued' means this caller now runs it, and gets the task's name and options in
# the same round trip. The claim takes the source's lease; a repeated claim by the same worker (a
# retry whose reply was lost) answers 'queued' again.
# The claim also takes the job out of arq's queue. arq leaves a running job in its queue until it
# finishes, and every worker re-examines every queued id on every poll (three round trips each),
# so with thousands of sources running, job starts queued up behind seconds of re-checks. From
# here on the source's lease covers a worker that dies (workers/lease.py), which is what arq's
# re-run would have been for; before the claim, a job whose worker died is still in arq's queue
# and runs again. The job's records live on only as long as the stream (arq keeps them a day).
_START = r"""
local st = redis.call('HGET', KEYS[1], ARGV[1] .. '_state')
if st == 'running' and redis.call('HGET', KEYS[1], ARGV[1] .. '_worker') == ARGV[2]
   and redis.call('GET', KEYS[3]) == ARGV[2] then
  return {'queued', redis.call('HGETALL', KEYS[1])}
end
if st == 'queued' then
  redis.call('HSET', KEYS[1], ARGV[1] .. '_state', 'running', ARGV[1] .. '_worker', ARGV[2],
             ARGV[1] .. '_started_ms', ARGV[5])
  if redis.call('HGET', KEYS[1], 'status') == 'queued' then redis.call('HSET', KEYS[1], 'status', 'running') end
  redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[6])
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[4] .. ':' .. ARGV[1])
  redis.call('ZREM', KEYS[4], ARGV[7])
  local ttl = redis.call('PTTL', KEYS[1])
  if ttl > 0 then
    redis.call('PEXPIRE', KEYS[5], ttl)
    redis.call('PEXPIRE', KEYS[6], ttl)
  end
  return {'queued', redis.call('HGETALL', KEYS[1])}
end
return {st or false}
"""

# KEYS: meta, a, b, lease:a, lease:b, running
# ARGV: channel, retention_ms, now_ms, stream_id, src, worker, lease_ttl_ms
# 1: renewed. 0: the source is not running any more (ended by someone else: stop). -1: the lease
# was gone (this worker stalled or Redis was away longer than the lease): the source is ended
# here with `worker_lost`, exactly as the sweeper would have ended it.
_RENEW = (
    _LUA_PRELUDE
    + r"""
local src = ARGV[5]
local lease, member = running_lease(src)
if not lease then return 0 end
if redis.call('GET', lease) == ARGV[6] then
  redis.call('PEXPIRE', lease, ARGV[7])
  redis.call('ZADD', KEYS[6], tonumber(ARGV[3]) + tonumber(ARGV[7]), member)
  return 1
end
end_source(src, 'worker_lost',
  'the worker running this source lost its lease (stalled, or cut off from Redis, for longer than TANDEM_LEASE_S)')
return -1
"""
)

# KEYS: meta, a, b, lease:a, lease:b, running ; ARGV: channel, retention_ms, now_ms, stream_id, src
# The sweeper's check of one `running` member whose lease deadline has passed. 1: the source's
# worker is gone (no lease), and the source ended with `worker_lost`. 0: nothing to do (the
# member is dropped when the source is not running, re-scored when its lease is still alive).
_REAP = (
    _LUA_PRELUDE
    + r"""
local src = ARGV[5]
local lease, member = running_lease(src)
if not lease then return 0 end
local pttl = redis.call('PTTL', lease)
if pttl > 0 then
  redis.call('ZADD', KEYS[6], tonumber(ARGV[3]) + pttl, member)
  return 0
end
end_source(src, 'worker_lost', 'the worker running this source was lost (no lease renewal within TANDEM_LEASE_S)')
return 1
"""
)

# A lease lives this fraction of TANDEM_LEASE_S: with renewals every lease_s/5 and a sweep every
# lease_s/5 (workers/lease.py), a dead worker's source ends at most 0.9 * lease_s after it died.
LEASE_TTL_FRACTION = 0.7
# A worker's count of appended deltas lives this long after its last write: a dead worker's goes
# away, and one that expires under a live worker (idle that long) only makes its next write checked.
APPENDED_TTL_S = 600
APPEND_PARTS_CACHED = 20_000  # sources whose append keys a Store keeps named (a few hundred bytes each)


Command = tuple[str | bytes | int | float, ...]  # one Redis command, as its arguments
AppendCall = tuple[str, Source, Sequence[str], int, str | bytes]  # stream id, source, texts, and before them: its deltas, its last entry id (see append_many)
RenewCall = tuple[str, Source, str]  # stream id, source, worker (see renew)


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
    def __init__(self, redis: Redis, settings: Settings, mux: Mux | None = None) -> None:
        """`mux`: where the reads a reader connects and catches up with go (the API's hot path:
        shared/mux.py); without it, they go through `redis`'s pool like every other command."""
        self.redis = redis
        self.settings = settings
        self.mux = mux
        self.keys = Keys(settings.key_prefix)
        self._finish = redis.register_script(_FINISH)
        self._append = redis.register_script(_APPEND)
        self._start = redis.register_script(_START)
        self._renew = redis.register_script(_RENEW)
        self._reap = redis.register_script(_REAP)
        self.lease_ttl_ms = max(1, int(settings.lease_s * LEASE_TTL_FRACTION * 1000))
        self._append_parts: dict[tuple[str, Source], tuple[tuple[str, str, str], tuple[str, str]]] = {}  # _packed_appends
        self._appended_ttl_ms = APPENDED_TTL_S * 1000

    # -- create --------------------------------------------------------------------------------

    async def create(
        self,
        *,
        prompt: str,
        tasks: dict[Source, tuple[str, dict[str, Any]]],
        pacing: dict[str, int],
        also: Callable[[str], list[Command]] | None = None,
    ) -> Created:
        """`also(stream_id)`: more commands for the same MULTI/EXEC (the API enqueues the arq jobs
        there): a create is all or nothing, even when Redis dies half-way."""
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
        commands: list[Command] = [
            ("HSET", k.meta(stream_id), *(x for kv in meta.items() for x in kv)),
            ("PEXPIRE", k.meta(stream_id), ttl_ms),
            ("ZADD", k.index, now, stream_id),
            ("ZREMRANGEBYSCORE", k.index, "-inf", now - ttl_ms),
            *(also(stream_id) if also is not None else ()),
        ]
        await self.transaction(commands)
        return Created(stream_id, token)

    async def transaction(self, commands: Sequence[Command]) -> None:
        """`commands` in one MULTI/EXEC: all of them or none."""
        if self.mux is not None:
            replies = await self.mux.execute_many([("MULTI",), *commands, ("EXEC",)])
            for r in replies:
                if isinstance(r, ResponseError):
                    raise r
            return
        async with self.redis.pipeline(transaction=True) as tx:
            for c in commands:
                tx.execute_command(*c)
            await tx.execute()

    async def delete(self, stream_id: str) -> None:
        """Undo a create whose jobs could not be enqueued."""
        async with self.redis.pipeline(transaction=True) as tx:
            tx.delete(*self.keys.stream_keys(stream_id))
            tx.zrem(self.keys.index, stream_id)
            await tx.execute()

    # -- reads ---------------------------------------------------------------------------------

    # The `_soon` reads queue their command at once and return what to await for the answer: a
    # connecting reader starts the ones that do not depend on each other in one step, so they go
    # to Redis in one write (shared/mux.py, `submit`), and no task runs per read. (Without the
    # mux, a `_soon` read is its plain read run as a task.)

    async def meta(self, stream_id: str) -> dict[str, str] | None:
        if self.mux is not None:
            return await self.meta_soon(stream_id)
        raw = await self.redis.hgetall(self.keys.meta(stream_id))  # type: ignore[misc]
        return {_s(k): _s(v) for k, v in raw.items()} or None

    def meta_soon(self, stream_id: str) -> Awaitable[dict[str, str] | None]:
        if self.mux is None:
            return asyncio.ensure_future(self.meta(stream_id))
        return _meta_reply(self.mux.submit("HGETALL", self.keys.meta(stream_id)))

    async def source_state(self, stream_id: str, source: Source) -> str | None:
        if self.mux is not None:
            return await self.source_state_soon(stream_id, source)
        return await _optional_str(self.redis.hget(self.keys.meta(stream_id), f"{source}_state"))  # type: ignore[arg-type]

    def source_state_soon(self, stream_id: str, source: Source) -> Awaitable[str | None]:
        if self.mux is None:
            return asyncio.ensure_future(self.source_state(stream_id, source))
        return _optional_str(self.mux.submit("HGET", self.keys.meta(stream_id), f"{source}_state"))

    async def read(self, stream_id: str, source: Source, after: str, count: int) -> list[Entry]:
        """Entries strictly after entry id `after` (exclusive range), oldest first."""
        return await self._xrange(stream_id, source, _after(after), "+", count)

    async def read_events(self, stream_id: str, source: Source, after: str, count: int) -> list[Event]:
        """`read`, as events (`events_from_rows`: the API's catch-up path)."""
        if self.mux is not None:
            return await self.read_events_soon(stream_id, source, after, count)
        return [event_from_entry(source, eid, f) for eid, f in await self.read(stream_id, source, after, count)]

    def read_events_soon(self, stream_id: str, source: Source, after: str, count: int) -> Awaitable[list[Event]]:
        if self.mux is None:
            return asyncio.ensure_future(self.read_events(stream_id, source, after, count))
        return _events_reply(source, self.mux.submit("XRANGE", self.keys.events(stream_id, source), _after(after), "+", "COUNT", count))

    async def has_entry(self, stream_id: str, source: Source, entry_id: str) -> bool:
        if self.mux is not None:
            return await self.has_entry_soon(stream_id, source, entry_id)
        return bool(await self._xrange(stream_id, source, entry_id, entry_id, 1))

    def has_entry_soon(self, stream_id: str, source: Source, entry_id: str) -> Awaitable[bool]:
        if self.mux is None:
            return asyncio.ensure_future(self.has_entry(stream_id, source, entry_id))
        return _nonempty(self.mux.submit("XRANGE", self.keys.events(stream_id, source), entry_id, entry_id, "COUNT", 1))

    async def _xrange(self, stream_id: str, source: Source, lo: str, hi: str, count: int) -> list[Entry]:
        key = self.keys.events(stream_id, source)
        if self.mux is not None:
            rows = await self.mux.execute("XRANGE", key, lo, hi, "COUNT", count)
            return [(_s(eid), {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)}) for eid, flat in rows]
        return [(_s(eid), {_s(f): _s(v) for f, v in fields.items()}) for eid, fields in await self.redis.xrange(key, lo, hi, count)]

    async def ping(self) -> None:
        await (self.mux.execute("PING") if self.mux is not None else self.redis.ping())

    async def text(self, stream_id: str, source: Source) -> str:
        """A source's text so far, read in batches (the status document needs all of it)."""
        return (await self._text(stream_id, source))[0]

    async def _text(self, stream_id: str, source: Source) -> tuple[str, int]:
        """The text and the number of deltas (the meta counts them only once the source ends)."""
        parts: list[str] = []
        after = "0-0"
        while True:
            rows = await self.read(stream_id, source, after, 1000)
            parts.extend(f.get("text", "") for _, f in rows if f.get("type") == "delta")
            if len(rows) < 1000:
                return "".join(parts), len(parts)
            after = rows[-1][0]

    async def status(self, stream_id: str, meta: dict[str, str]) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "id": stream_id,
            "status": meta.get("status", "queued"),
            "created_at": _iso(int(meta.get("created_ms", "0"))),
        }
        for src in SOURCES:
            err = meta.get(f"{src}_error")
            text, tokens = await self._text(stream_id, src)
            doc[src] = {
                "task": meta.get(f"{src}_task"),
                "state": meta.get(f"{src}_state"),
                "tokens": tokens,
                "text": text,
                "error": orjson.loads(err) if err else None,
            }
        doc["pacing"] = orjson.loads(meta.get("pacing", "{}"))
        return doc

    # -- writes (workers) ----------------------------------------------------------------------

    async def start(self, stream_id: str, source: Source, worker: str) -> str | None:
        """Claim a queued source and take its lease. Returns its state before the call; 'queued'
        means it is ours (also when this worker's own claim is retried)."""
        return (await self.start_source(stream_id, source, worker))[0]

    async def start_source(self, stream_id: str, source: Source, worker: str) -> tuple[str | None, dict[str, str]]:
        """`start`, and the stream's meta when the claim is ours (else {}): what a worker needs to
        run the source, read in the claim's own round trip."""
        k, now = self.keys, now_ms()
        job_id = k.job_id(stream_id, source)
        reply = await self._start(
            keys=[k.meta(stream_id), k.running, k.lease(stream_id, source), self.settings.queue_name,
                  job_key_prefix + job_id, retry_key_prefix + job_id],
            args=[source, worker, now + self.lease_ttl_ms, stream_id, now, self.lease_ttl_ms, job_id],
        )
        st = _s(reply[0]) if reply[0] else None
        return st, (_hash(reply[1]) or {}) if len(reply) > 1 else {}

    async def append(self, stream_id: str, source: Source, texts: Sequence[str]) -> int:
        """Append deltas to a running source, as its worker would, in a few round trips: for tests
        and one-off writes (workers append with `append_many`). How many were appended, or -1:
        the source is not running any more."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as p:
            p.get(k.lease(stream_id, source))
            p.xlen(k.events(stream_id, source))
            p.xrevrange(k.events(stream_id, source), count=1)
            owner, have, last = await p.execute()
        worker = _s(owner) if owner is not None else ""
        prev = _s(last[0][0]) if last else "0-0"
        (result,), _ = await self.append_many([(stream_id, source, texts, have, prev)], worker=worker)
        if isinstance(result, ResponseError):
            raise result
        return len(texts) if isinstance(result, bytes) else -1

    async def append_many(
        self,
        calls: Sequence[AppendCall],
        renewals: Sequence[RenewCall] = (),
        *,
        worker: str,
        written: int | None = None,
        conn: AbstractConnection | None = None,
    ) -> tuple[list[bytes | int | ResponseError], int]:
        """Many appends (each to its own source) in one round trip and one script call: a worker's
        append pipe writes every running source's buffered tokens this way (workers/pipe.py). Per
        call, the source's last entry id (bytes) once its texts are appended, -1 when the source is not
        running any more (stop), or the error Redis answered for that call alone; then, per
        renewal, what `renew` returns (lease renewals ride along: a round trip of its own costs a
        worker ~90 us of CPU on a 2-core machine, and a thousand running sources renew 500 times
        a second). Also returns the worker's new count of appended deltas.

        `worker`: the id the sources' leases hold. `written`: the worker's count of appended deltas
        (its `appended` key), as this function last returned it (0 at first); None for a one-off
        write. `conn`: the caller's own connection (`connection`), else a pooled one. A connection
        error raises; the worker retries with the same calls and count: a write that did reach
        Redis is not applied twice, and a renewal is repeatable.

        This is the hottest path of a worker (a thousand paced sources: one append per token), so
        it skips what a redis-py pipeline costs per batch and per command: the EVALSHAs are packed
        by hiredis in C and written together, without the pipeline's SCRIPT EXISTS round trip. A
        NOSCRIPT (Redis restarted and forgot the script) loads it and writes again. A source that
        reached TANDEM_MAX_SOURCE_EVENTS (what fits is appended first), whose entries Redis lost,
        or whose lease this worker lost, is ended here (`too_long`, `worker_lost`) and answers -1.
        """
        room = self.settings.max_source_events - 1  # deltas a source may have: its terminal entry is its last event
        fitting = calls
        if any(expected + len(texts) > room for _, _, texts, expected, _ in calls):  # (rare: the limit is 100,000)
            fitting = [(sid, src, texts[: max(0, room - expected)], expected, prev) for sid, src, texts, expected, prev in calls]
        sending = fitting if fitting is calls else [c for c in fitting if c[2]]
        now = now_ms()
        payload = b"".join([
            *((self._packed_appends(sending, worker, written),) if sending else ()),
            *(pack_command(cast(Any, ("EVALSHA", self._renew.sha, *self._renew_command(*r, now)))) for r in renewals),
        ])  # fmt: skip
        replies: list[Any] = []
        for attempt in (1, 2):
            if not payload:
                break
            replies = await self._pipelined(payload, (1 if sending else 0) + len(renewals), conn)
            if attempt == 1 and any(isinstance(r, NoScriptError) for r in replies):
                await self.redis.script_load(_APPEND)
                await self.redis.script_load(_RENEW)
                continue  # the calls that did run answer the same again (the count; a renewal is repeatable)
            break
        count = written or 0
        results: list[Any] = []
        if sending:
            first = replies.pop(0)
            if isinstance(first, list):
                count = int(first.pop())
                results = first
            else:  # an error for the whole script
                results = [first] * len(sending)
        if fitting is not calls or not all(type(r) is bytes for r in results):
            results = await self._appended(calls, fitting, results, worker)
        return [*results, *(r if isinstance(r, ResponseError) else int(r) for r in replies)], count

    async def _appended(
        self, calls: Sequence[AppendCall], sent: Sequence[AppendCall], answers: list[Any], worker: str
    ) -> list[bytes | int | ResponseError]:
        """`append_many`'s results when not every append simply went in: the sources that stop here
        are ended (see its docstring) and answer -1."""
        answered = iter(answers)
        results: list[bytes | int | ResponseError] = []
        for (stream_id, source, texts, _, _), (_, _, fit, _, _) in zip(calls, sent, strict=True):
            r = next(answered) if fit else b""
            if isinstance(r, ResponseError) or r == -1:
                results.append(r)
            elif r == -2:
                await self.finish(stream_id, [source], error_fields("worker_lost", "Redis lost part of this source (it restarted without its latest writes)"))
                results.append(-1)
            elif r == -3:
                await self.renew(stream_id, source, worker)  # ends it with `worker_lost`, as a renewal would have
                results.append(-1)
            elif len(fit) < len(texts):
                limit = self.settings.max_source_events
                await self.finish(stream_id, [source], error_fields("too_long", f"source reached the limit of {limit} events (TANDEM_MAX_SOURCE_EVENTS)"))
                results.append(-1)
            else:
                results.append(r)
        return results

    def _packed_appends(self, calls: Sequence[AppendCall], worker: str, written: int | None) -> bytes:
        """The append script's EVALSHA for `calls`, packed by hiredis in one call. An append's
        keys, channel and source are named once per source (naming them took longer than packing
        the whole command)."""
        keys: list[str] = [self.keys.appended(worker)]
        argv: list[str | bytes | int] = [worker, "" if written is None else written, self._appended_ttl_ms]
        for stream_id, source, texts, expected, prev in calls:
            named = self._append_parts.get((stream_id, source))
            if named is None:
                if len(self._append_parts) >= APPEND_PARTS_CACHED:
                    self._append_parts.clear()  # running sources name theirs again at their next append
                k = self.keys
                named = self._append_parts[(stream_id, source)] = (
                    (k.lease(stream_id, source), k.events(stream_id, source), k.meta(stream_id)),
                    (k.channel(stream_id), source),
                )
            keys += named[0]
            argv += named[1]
            argv += (prev, expected, len(texts))
            argv += texts
        return cast(bytes, pack_command(cast(Any, ("EVALSHA", self._append.sha, len(keys), *keys, *argv))))

    async def run_script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[str | int]) -> Any:
        """`script(keys=..., args=...)` the way appends go (packed by hiredis, one pooled connection,
        the reply read straight from its parser): for scripts a worker runs many times a second,
        where redis-py's own call costs more than the script. Loads the script on NOSCRIPT; a Redis
        error is raised."""
        payload = pack_command(cast(Any, ("EVALSHA", script.sha, len(keys), *keys, *args)))
        (reply,) = await self._pipelined(payload, 1)
        if isinstance(reply, NoScriptError):
            await self.redis.script_load(script.script)
            (reply,) = await self._pipelined(payload, 1)
        if isinstance(reply, ResponseError):
            raise reply
        return reply

    def connection(self) -> AbstractConnection:
        """A connection of its own, outside the pool, for a caller that writes many times a second
        and one write at a time (a worker's append pipe: `append_many(..., conn=)`); the caller
        disconnects it when done. (A pooled connection is checked for unread data each time it is
        taken: a syscall and several coroutines per write.)"""
        pool = self.redis.connection_pool
        conn: AbstractConnection = pool.connection_class(**pool.connection_kwargs)
        return conn

    async def _pipelined(self, payload: bytes, n: int, conn: AbstractConnection | None = None) -> list[Any]:
        """Write `payload` (`n` packed commands) and read the `n` replies, on `conn` if given (it
        then reconnects by itself after an error), else on a pooled connection."""
        if conn is not None:
            try:
                await conn.send_packed_command(payload, check_health=False)
                return await _read_replies(conn, n)
            except BaseException:
                await conn.disconnect(nowait=True)  # replies may be left unread: never reuse the socket
                raise
        pool = self.redis.connection_pool
        conn = await pool.get_connection()
        try:
            await conn.send_packed_command(payload)
            return await _read_replies(conn, n)
        except BaseException:
            await conn.disconnect(nowait=True)  # replies may be left unread: never reuse it
            raise
        finally:
            await pool.release(conn)

    async def renew(self, stream_id: str, source: Source, worker: str) -> int:
        """Extend this worker's lease on a running source. 1: renewed; 0: the source is not running
        any more; -1: the lease had expired, and the source has just ended with `worker_lost`."""
        n, *rest = self._renew_command(stream_id, source, worker, now_ms())
        return cast(int, await self._renew(keys=rest[:n], args=rest[n:]))

    def _renew_command(self, stream_id: str, source: Source, worker: str, now: int) -> tuple[Any, ...]:
        """The renew script's numkeys, KEYS and ARGV (as `EVALSHA <sha>` takes them, after the sha)."""
        k = self.keys
        keys = [k.meta(stream_id), *self._expiring(stream_id), k.running]
        return (len(keys), *keys, k.channel(stream_id), self.settings.retention_s * 1000, now, stream_id, source,
                worker, self.lease_ttl_ms)  # fmt: skip

    async def reap(self, stream_id: str, source: Source) -> int:
        """End a running source whose lease is gone with `worker_lost`. 1 when it did."""
        k = self.keys
        return cast(
            int,
            await self._reap(
                keys=[k.meta(stream_id), *self._expiring(stream_id), k.running],
                args=[k.channel(stream_id), self.settings.retention_s * 1000, now_ms(), stream_id, source],
            ),
        )

    async def overdue(self, now: int, limit: int) -> list[tuple[str, Source]]:
        """`running` members whose lease deadline has passed, oldest first."""
        rows = await self.redis.zrangebyscore(self.keys.running, "-inf", now, start=0, num=limit)
        return [m for m in (_member(r) for r in rows) if m is not None]

    async def running_streams(self) -> set[str]:
        """Ids of the streams with a source running now."""
        rows = await self.redis.zrange(self.keys.running, 0, -1)
        return {m[0] for m in (_member(r) for r in rows) if m is not None}

    async def streams_with_readers(self, stream_ids: Sequence[str]) -> set[str]:
        """Which of `stream_ids` have an SSE connection open on a live API process (the counts each
        API publishes once a second, api/readers.py)."""
        if not stream_ids:
            return set()
        apis = await self.redis.zrangebyscore(self.keys.apis, now_ms(), "+inf")
        read: set[str] = set()
        for api in apis:
            key = self.keys.readers(_s(api))
            for i in range(0, len(stream_ids), 1000):
                chunk = stream_ids[i : i + 1000]
                counts = await self.redis.hmget(key, list(chunk))  # type: ignore[misc]
                read.update(sid for sid, n in zip(chunk, counts, strict=True) if n is not None and int(n) > 0)
        return read

    async def abort_jobs(self, stream_id: str) -> None:
        """Ask arq to cancel both sources' jobs, as DELETE does, and wake the workers to look now."""
        async with self.redis.pipeline(transaction=False) as p:
            p.zadd(abort_jobs_ss, {self.keys.job_id(stream_id, src): now_ms() for src in SOURCES})
            p.publish(self.keys.jobs, WAKE)
            await p.execute()

    async def trim_index(self, after: float, before_ms: int, limit: int) -> tuple[int, float]:
        """Drop index entries, created in [after, before_ms], whose stream has expired. Returns how
        many were dropped and where the next call starts (-inf once the range is done)."""
        rows = await self.redis.zrangebyscore(self.keys.index, after, before_ms, start=0, num=limit, withscores=True)
        if not rows:
            return 0, float("-inf")
        async with self.redis.pipeline(transaction=False) as p:
            for sid, _ in rows:
                p.exists(self.keys.meta(_s(sid)))
            exists = await p.execute()
        gone = [sid for (sid, _), e in zip(rows, exists, strict=True) if not e]
        if gone:
            await self.redis.zrem(self.keys.index, *gone)
        return len(gone), (float(rows[-1][1]) if len(rows) == limit else float("-inf"))

    async def trim_aborts(self, before_ms: int) -> int:
        """arq drops an `arq:abort` entry only when one of its workers was running that job; drop the
        ones old enough that no job can still need them."""
        return cast(int, await self.redis.zremrangebyscore(abort_jobs_ss, "-inf", before_ms))

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

    async def cancel(self, stream_id: str, message: str = "cancelled by request") -> int:
        return await self.finish(stream_id, SOURCES, error_fields("cancelled", message))

    def _expiring(self, stream_id: str) -> list[str]:
        k = self.keys
        return [k.events(stream_id, "a"), k.events(stream_id, "b"), k.lease(stream_id, "a"), k.lease(stream_id, "b")]


def _after(entry_id: str) -> str:
    """XRANGE's start for "strictly after `entry_id`" ("0-0": from the first entry)."""
    return f"({entry_id}" if entry_id != "0-0" else "-"


async def _read_replies(conn: AbstractConnection, n: int) -> list[Any]:
    """`n` replies, a Redis error among them as that reply's value. With hiredis, straight from
    the connection's own reader under one timeout for all of them: redis-py's `read_response`
    enters a timeout context and three coroutine calls per reply, and a worker reads one reply per
    source per write."""
    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if not isinstance(parser, _AsyncHiredisParser) or reader is None:
        replies: list[Any] = []
        for _ in range(n):
            try:
                replies.append(await conn.read_response())
            except ResponseError as e:  # this call's error; the replies after it still follow
                replies.append(e)
        return replies
    timeout = conn.socket_timeout
    replies = []
    try:
        async with asyncio.timeout(float(timeout) if timeout else None):
            while len(replies) < n:
                reply = reader.gets()
                if reply is NOT_ENOUGH_DATA:
                    await parser.read_from_socket()  # type: ignore[no-untyped-call]
                elif isinstance(reply, RedisConnectionError):
                    raise reply
                else:
                    replies.append(reply)  # errors come as values (the reader's replyError)
    except TimeoutError:
        raise RedisTimeoutError(f"no reply from Redis within {timeout} s") from None
    return replies


def is_terminal(state: str | None) -> bool:
    return state in TERMINAL_STATES


def _member(raw: Any) -> tuple[str, Source] | None:
    """`<id>:<source>`, a member of the `running` ZSET."""
    sid, _, src = _s(raw).rpartition(":")
    return (sid, src) if sid and src in SOURCES else None  # type: ignore[return-value]


async def _meta_reply(reply: Awaitable[Any]) -> dict[str, str] | None:
    return _hash(checked(await reply))


def _hash(flat: list[Any]) -> dict[str, str] | None:
    """An HGETALL reply as a dict; None for a missing key."""
    return {_s(flat[i]): _s(flat[i + 1]) for i in range(0, len(flat), 2)} or None


async def _events_reply(source: Source, reply: Awaitable[Any]) -> list[Event]:
    rows = checked(await reply)
    if rows and not isinstance(rows[0][0], bytes):  # a connection that decodes replies
        return [event_from_entry(source, eid, fields_dict(flat)) for eid, flat in rows]
    return events_from_rows(source, rows)


async def _optional_str(reply: Awaitable[Any]) -> str | None:
    value = checked(await reply)
    return _s(value) if value is not None else None


async def _nonempty(reply: Awaitable[Any]) -> bool:
    return bool(checked(await reply))


def _s(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _iso(ms: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ms / 1000)) + f".{ms % 1000:03d}Z"


__all__ = ["Created", "Store", "delta_fields", "fields_dict", "is_terminal", "token_matches"]
