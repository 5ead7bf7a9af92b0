"""Operator commands: `tandem ls | show ID | tail ID | stats | cancel ID`.

They read Redis directly (TANDEM_REDIS_URL, TANDEM_KEY_PREFIX, TANDEM_QUEUE_NAME), never with
KEYS: streams come from the index ZSET, workers and API processes from their heartbeat ZSETs.
Tables for people, `--json` for scripts. Exit codes: 0 ok, 1 not found, 2 usage, 3 Redis unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson
from arq.constants import in_progress_key_prefix, job_key_prefix, result_key_prefix
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.cursor import entry_key, is_entry_id
from shared.events import TERMINAL_STATES
from shared.keys import SOURCES, Keys, Source
from shared.settings import Settings
from shared.store import Store, now_ms

COMMANDS = ("ls", "show", "tail", "stats", "cancel")
OK, NOT_FOUND, USAGE, REDIS_DOWN = 0, 1, 2, 3
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
STATUS_SCAN_LIMIT = 10_000  # streams whose status `stats` reads
MEMORY_SAMPLE = 100  # streams whose keys `stats` measures with MEMORY USAGE
FOLLOW_BLOCK_MS = 5000


class Usage(Exception):
    """A command line that cannot be run as given: exit 2."""


class NotFound(Exception):
    """No such stream: exit 1."""


# -- argument parsing --------------------------------------------------------------------------


class _IdParser(argparse.ArgumentParser):
    """Stream ids may start with '-' (they are URL-safe base64): `tandem show -DPU0eYDS3slqsU0nM-W1A`
    must not be taken for an unknown option. Anything id-shaped that is not one of our options is
    an argument."""

    def _parse_optional(self, arg_string: str) -> Any:
        if len(arg_string) >= 16 and arg_string not in self._option_string_actions and _ID.fullmatch(arg_string):
            return None
        return super()._parse_optional(arg_string)


def add_commands(sub: Any) -> None:
    """Register the operator subcommands on cli/main.py's subparsers."""

    def add(name: str, help_: str) -> argparse.ArgumentParser:
        default_class, sub._parser_class = sub._parser_class, _IdParser
        try:
            p: argparse.ArgumentParser = sub.add_parser(name, help=help_, description=help_)
        finally:
            sub._parser_class = default_class
        p.add_argument("--json", action="store_true", help="machine-readable output")
        return p

    ls = add("ls", "list streams, newest first: status, age, each source's state and length, readers now")
    ls.add_argument("--limit", type=_positive, default=20, help="at most this many streams (default 20)")
    ls.add_argument("--status", choices=["queued", "running", "completed", "failed", "cancelled"], help="only streams in this status")
    show = add("show", "one stream: states, lengths, last ids, TTLs, errors, workers and jobs")
    show.add_argument("id")
    tail = add("tail", "a stream's raw Redis entries, both sources, in the order they were appended")
    tail.add_argument("id")
    tail.add_argument("--follow", "-f", action="store_true", help="keep printing new entries until both sources end")
    tail.add_argument("--from", dest="from_id", metavar="ID", help="only entries after this entry id (or SSE event id a-<ms>-<seq>)")
    add("stats", "queue depth, jobs in progress, workers and API processes, streams by status, memory")
    cancel = add("cancel", "cancel a stream's sources, as DELETE /v1/streams/{id} does")
    cancel.add_argument("id")


def _positive(raw: str) -> int:
    try:
        n = int(raw)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {raw!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return n


def run(args: argparse.Namespace, settings: Settings) -> int:
    """Run one operator command; returns its exit code."""
    out = sys.stdout
    try:
        return asyncio.run(_run(args, settings, out))
    except Usage as e:
        print(f"tandem {args.cmd}: {e}", file=sys.stderr)
        return USAGE
    except NotFound as e:
        print(f"tandem {args.cmd}: {e}", file=sys.stderr)
        return NOT_FOUND
    except (RedisConnectionError, RedisTimeoutError, OSError) as e:
        print(f"tandem {args.cmd}: Redis unavailable at {redact(settings.effective_redis_url)}: {e}", file=sys.stderr)
        return REDIS_DOWN
    except KeyboardInterrupt:
        return 130


async def _run(args: argparse.Namespace, settings: Settings, out: Any) -> int:
    stream_id: str | None = getattr(args, "id", None)
    if stream_id is not None and not _ID.fullmatch(stream_id):
        raise Usage(f"{stream_id!r} is not a stream id (letters, digits, '-' and '_', at most 64)")
    redis = Redis.from_url(settings.effective_redis_url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=10.0)
    try:
        ops = Ops(redis, settings)
        if args.cmd == "ls":
            rows = await ops.ls(args.limit, args.status)
            emit(out, args.json, rows, format_ls)
        elif args.cmd == "show":
            assert stream_id is not None
            emit(out, args.json, await ops.show(stream_id), format_show)
        elif args.cmd == "tail":
            assert stream_id is not None
            await ops.tail(stream_id, args.from_id, args.follow, args.json, out)
        elif args.cmd == "stats":
            emit(out, args.json, await ops.stats(), format_stats)
        elif args.cmd == "cancel":
            assert stream_id is not None
            emit(out, args.json, await ops.cancel(stream_id), format_cancel)
        else:
            raise Usage(f"unknown command {args.cmd}")
        return OK
    finally:
        await redis.aclose()


def emit(out: Any, as_json: bool, doc: Any, fmt: Any) -> None:
    if as_json:
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(fmt(doc))
    out.flush()


# -- reading Redis -----------------------------------------------------------------------------

_LS_FIELDS = ["status", "created_ms", "finished_ms", "a_task", "a_state", "a_tokens", "a_events", "b_task", "b_state", "b_tokens", "b_events"]


def _counts(state: str | None, tokens: str | None, events: str | None, entries: int) -> dict[str, int]:
    """A source's deltas and entries: from the meta once it has ended, from its stream while it
    runs (appends do not count them one by one: shared/store.py)."""
    if state in TERMINAL_STATES:
        return {"tokens": int(tokens or 0), "events": int(events or 0)}
    return {"tokens": entries, "events": entries}


class Ops:
    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis, self.settings = redis, settings
        self.keys = Keys(settings.key_prefix)

    async def live_apis(self) -> list[str]:
        return [str(a) for a in await self.redis.zrangebyscore(self.keys.apis, now_ms(), "+inf")]

    async def readers(self, stream_ids: Sequence[str]) -> dict[str, int]:
        """SSE connections open now per stream, summed over the live API processes."""
        counts = dict.fromkeys(stream_ids, 0)
        apis = await self.live_apis()
        if not apis or not stream_ids:
            return counts
        async with self.redis.pipeline(transaction=False) as p:
            for api in apis:
                p.hmget(self.keys.readers(api), list(stream_ids))
            rows = await p.execute()
        for row in rows:
            for sid, n in zip(stream_ids, row, strict=True):
                counts[sid] += int(n or 0)
        return counts

    # ls ---------------------------------------------------------------------------------------

    async def ls(self, limit: int, status: str | None) -> list[dict[str, Any]]:
        now = now_ms()
        rows: list[dict[str, Any]] = []
        start, batch = 0, max(limit, 100) if status else limit
        while len(rows) < limit and start < STATUS_SCAN_LIMIT:
            ids = [str(i) for i in await self.redis.zrevrange(self.keys.index, start, start + batch - 1)]
            if not ids:
                break
            start += len(ids)
            async with self.redis.pipeline(transaction=False) as p:
                for sid in ids:
                    p.hmget(self.keys.meta(sid), _LS_FIELDS)
                    p.xlen(self.keys.events(sid, "a"))
                    p.xlen(self.keys.events(sid, "b"))
                res = await p.execute()
            for sid, values, xlen_a, xlen_b in zip(ids, res[::3], res[1::3], res[2::3], strict=True):
                m = dict(zip(_LS_FIELDS, values, strict=True))
                entries = {"a": xlen_a, "b": xlen_b}
                if m["status"] is None or (status and m["status"] != status):
                    continue  # expired (the index is trimmed lazily), or filtered out
                created = int(m["created_ms"] or 0)
                rows.append(
                    {
                        "id": sid,
                        "status": m["status"],
                        "created_ms": created,
                        "age_s": round((now - created) / 1000, 1),
                        "finished_ms": int(m["finished_ms"]) if m["finished_ms"] else None,
                        **{
                            src: {
                                "task": m[f"{src}_task"],
                                "state": m[f"{src}_state"],
                                **_counts(m[f"{src}_state"], m[f"{src}_tokens"], m[f"{src}_events"], entries[src]),
                            }
                            for src in SOURCES
                        },
                    }
                )
                if len(rows) >= limit:
                    break
        counts = await self.readers([r["id"] for r in rows])
        for r in rows:
            r["readers"] = counts[r["id"]]
        return rows

    # show -------------------------------------------------------------------------------------

    async def meta(self, stream_id: str) -> dict[str, str]:
        raw: dict[str, str] = await self.redis.hgetall(self.keys.meta(stream_id))  # type: ignore[misc]
        if not raw:
            raise NotFound(f"no stream {stream_id} (unknown id, or expired after retention)")
        return raw

    async def show(self, stream_id: str) -> dict[str, Any]:
        k = self.keys
        meta = await self.meta(stream_id)
        key_names = [k.meta(stream_id), k.events(stream_id, "a"), k.events(stream_id, "b"), k.lease(stream_id, "a"), k.lease(stream_id, "b")]
        jobs = {src: k.job_id(stream_id, src) for src in SOURCES}
        async with self.redis.pipeline(transaction=False) as p:
            for key in key_names:
                p.type(key)
                p.pttl(key)
            for src in SOURCES:
                p.xlen(k.events(stream_id, src))
                p.get(k.lease(stream_id, src))
                p.zscore(self.settings.queue_name, jobs[src])
                p.exists(in_progress_key_prefix + jobs[src])
                p.exists(result_key_prefix + jobs[src])
                p.exists(job_key_prefix + jobs[src])
                p.zscore(k.running, f"{stream_id}:{src}")
                p.xrevrange(k.events(stream_id, src), count=1)
            res = await p.execute()
        keys_doc = [
            {"key": key, "type": res[2 * i], "ttl_s": _ttl(res[2 * i + 1])} for i, key in enumerate(key_names)
        ]
        now = now_ms()
        doc: dict[str, Any] = {
            "id": stream_id,
            "status": meta.get("status"),
            "created_ms": int(meta.get("created_ms", "0")),
            "age_s": round((now - int(meta.get("created_ms", "0"))) / 1000, 1),
            "finished_ms": int(meta["finished_ms"]) if meta.get("finished_ms") else None,
            "prompt": meta.get("prompt", ""),
            "pacing": orjson.loads(meta.get("pacing", "{}")),
            "readers": (await self.readers([stream_id]))[stream_id],
        }
        tail = res[2 * len(key_names) :]
        for i, src in enumerate(SOURCES):
            xlen, lease, queued, in_progress, result, job, running, last = tail[8 * i : 8 * i + 8]
            err = meta.get(f"{src}_error")
            started = meta.get(f"{src}_started_ms")
            if in_progress:
                job_state = "in_progress"
            elif queued is not None:
                job_state = "deferred" if queued > now else "queued"
            elif result:
                job_state = "complete"
            else:
                job_state = "none"
            doc[src] = {
                "task": meta.get(f"{src}_task"),
                "state": meta.get(f"{src}_state"),
                **_counts(meta.get(f"{src}_state"), meta.get(f"{src}_tokens"), meta.get(f"{src}_events"), xlen),
                "entries": xlen,
                "last_id": last[0][0] if last else "0-0",
                "options": orjson.loads(meta.get(f"{src}_options", "{}")),
                "started_ms": int(started) if started else None,
                "worker": meta.get(f"{src}_worker"),
                "lease": lease,
                "lease_deadline_ms": int(running) if running is not None else None,
                "job": {"id": jobs[src], "state": job_state, "payload_kept": bool(job)},
                "error": orjson.loads(err) if err else None,
            }
        doc["keys"] = keys_doc
        return doc

    # tail -------------------------------------------------------------------------------------

    async def tail(self, stream_id: str, from_id: str | None, follow: bool, as_json: bool, out: Any) -> None:
        after = parse_from(from_id)
        await self.meta(stream_id)
        k = self.keys
        last = {src: after for src in SOURCES}
        ended = dict.fromkeys(SOURCES, False)
        async for src, eid, fields in self._history(stream_id, after):
            write_entry(out, as_json, src, eid, fields)
            last[src] = eid
            ended[src] = ended[src] or fields.get("type") in ("done", "error")
        if not follow:
            return
        while not all(ended.values()):
            resp = await self.redis.xread({k.events(stream_id, s): last[s] for s in SOURCES}, block=FOLLOW_BLOCK_MS, count=1000)
            if not resp:
                if not await self.redis.exists(k.meta(stream_id)):
                    raise NotFound(f"stream {stream_id} expired while following it")
                continue
            got: list[tuple[Source, str, dict[str, str]]] = []
            for key, entries in resp:
                which: Source = "a" if key == k.events(stream_id, "a") else "b"
                got.extend((which, eid, fields) for eid, fields in entries)
            for which, eid, fields in sorted(got, key=lambda e: (entry_key(e[1]), e[0])):
                write_entry(out, as_json, which, eid, fields)
                last[which] = eid
                ended[which] = ended[which] or fields.get("type") in ("done", "error")

    async def _history(self, stream_id: str, after: str) -> AsyncIterator[tuple[Source, str, dict[str, str]]]:
        """Both sources' entries after `after`, merged in id order, read in batches."""
        bufs: dict[Source, list[tuple[str, dict[str, str]]]] = {"a": [], "b": []}
        pos = {src: after for src in SOURCES}
        done = dict.fromkeys(SOURCES, False)

        async def refill(src: Source) -> None:
            start = f"({pos[src]}" if pos[src] != "0-0" else "-"
            rows = await self.redis.xrange(self.keys.events(stream_id, src), min=start, count=500)
            bufs[src] = list(rows)
            if rows:
                pos[src] = rows[-1][0]
            done[src] = len(rows) < 500

        for src in SOURCES:
            await refill(src)
        while True:
            for src in SOURCES:
                if not bufs[src] and not done[src]:
                    await refill(src)
            heads = [src for src in SOURCES if bufs[src]]
            if not heads:
                return
            src = min(heads, key=lambda s: (entry_key(bufs[s][0][0]), s))  # A first on equal ids
            eid, fields = bufs[src].pop(0)
            yield src, eid, fields

    # stats ------------------------------------------------------------------------------------

    async def stats(self) -> dict[str, Any]:
        k, s, r = self.keys, self.settings, self.redis
        now = now_ms()
        async with r.pipeline(transaction=False) as p:
            p.zcard(s.queue_name)
            p.zcount(s.queue_name, "-inf", now)
            p.zrange(s.queue_name, 0, 999)
            p.zrange(k.running, 0, 999, withscores=True)
            p.zcard(k.index)
            p.zrange(k.workers, 0, -1, withscores=True)
            p.zrange(k.apis, 0, -1, withscores=True)
            p.get(s.queue_name + ":health-check")
            p.info("memory")
            p.info("server")
            queued, ready, head, leases, indexed, workers, apis, health, mem, server = await p.execute()
        # Jobs in progress: claimed by an arq worker (in-progress key), their source not started yet
        # (a started source's job leaves the queue, shared/store.py).
        # Sources running: the running ZSET keeps a source until its whole stream settles, so each
        # member's state is checked.
        async with r.pipeline(transaction=False) as p:
            for member, _ in leases:
                sid, _, src = member.rpartition(":")
                p.hget(k.meta(sid), f"{src}_state")
            for jid in head:
                p.exists(in_progress_key_prefix + jid)
            for wid, _ in workers:
                p.get(k.worker(wid))
            for aid, _ in apis:
                p.hvals(k.readers(aid))
            res = await p.execute()
        states, res = res[: len(leases)], res[len(leases) :]
        running = sum(1 for st in states if st == "running")
        overdue = sum(1 for st, (_, deadline) in zip(states, leases, strict=True) if st == "running" and deadline < now)
        in_progress = sum(res[: len(head)])
        infos = res[len(head) : len(head) + len(workers)]
        reader_vals = res[len(head) + len(workers) :]

        worker_rows = []
        for (wid, score), info in zip(workers, infos, strict=True):
            doc = orjson.loads(info) if info else {}
            worker_rows.append(
                {
                    "id": wid,
                    "alive": info is not None,
                    "last_heartbeat_ms": int(score),
                    "last_heartbeat_age_s": round((now - score) / 1000, 1),
                    "running": doc.get("running"),
                    "sources_done": doc.get("sources_done"),
                    "metrics": doc.get("metrics"),
                    "started_ms": doc.get("started_ms"),
                }
            )
        api_rows = [
            {"id": aid, "alive": score > now, "readers": sum(int(v) for v in vals), "streams_read": len(vals)}
            for (aid, score), vals in zip(apis, reader_vals, strict=True)
        ]
        by_status, scanned = await self._statuses()
        memory = await self._memory(indexed)
        return {
            "redis": {
                "url": redact(s.effective_redis_url),
                "version": server.get("redis_version"),
                "used_memory": mem.get("used_memory"),
                "used_memory_human": mem.get("used_memory_human"),
            },
            "queue": {
                "name": s.queue_name,
                "jobs": queued,
                "in_progress": in_progress,
                "waiting": max(0, ready - in_progress),
                "deferred": queued - ready,
                "in_progress_exact": queued <= len(head),
            },
            "sources_running": {"count": running, "past_lease_deadline": overdue},
            "workers": worker_rows,
            "workers_alive": sum(1 for w in worker_rows if w["alive"]),
            "apis": api_rows,
            "readers": sum(a["readers"] for a in api_rows if a["alive"]),
            "streams": {"indexed": indexed, "scanned": scanned, "by_status": by_status},
            "memory": memory,
            "arq_health_check": health,
        }

    async def _statuses(self) -> tuple[dict[str, int], int]:
        counts: Counter[str] = Counter()
        scanned = 0
        for start in range(0, STATUS_SCAN_LIMIT, 1000):
            ids = await self.redis.zrevrange(self.keys.index, start, start + 999)
            if not ids:
                break
            async with self.redis.pipeline(transaction=False) as p:
                for sid in ids:
                    p.hget(self.keys.meta(sid), "status")
                statuses = await p.execute()
            counts.update(st or "expired" for st in statuses)
            scanned += len(ids)
            if len(ids) < 1000:
                break
        return dict(sorted(counts.items())), scanned

    async def _memory(self, indexed: int) -> dict[str, Any]:
        """MEMORY USAGE of the newest MEMORY_SAMPLE streams' keys (and their arq jobs), scaled to
        every indexed stream; plus tandem's shared keys, measured exactly."""
        k, s = self.keys, self.settings
        ids = [str(i) for i in await self.redis.zrevrange(k.index, 0, MEMORY_SAMPLE - 1)]
        apis = [str(a) for a in await self.redis.zrange(k.apis, 0, -1)]
        workers = [str(w) for w in await self.redis.zrange(k.workers, 0, -1)]
        shared = [k.index, k.running, k.apis, k.workers, s.queue_name, *(k.readers(a) for a in apis), *(k.worker(w) for w in workers)]
        per_stream: list[str] = []
        for sid in ids:
            per_stream += [k.meta(sid), k.events(sid, "a"), k.events(sid, "b")]
            for src in SOURCES:
                jid = k.job_id(sid, src)
                per_stream += [job_key_prefix + jid, result_key_prefix + jid]
        async with self.redis.pipeline(transaction=False) as p:
            for key in [*shared, *per_stream]:
                p.memory_usage(key)
            sizes = [int(n or 0) for n in await p.execute()]
        shared_bytes, sampled = sum(sizes[: len(shared)]), sum(sizes[len(shared) :])
        estimate = shared_bytes + (round(sampled * indexed / len(ids)) if ids else 0)
        return {
            "sampled_streams": len(ids),
            "sampled_stream_bytes": sampled,
            "shared_key_bytes": shared_bytes,
            "estimated_bytes": estimate,
            "exact": len(ids) >= indexed,
        }

    # cancel -----------------------------------------------------------------------------------

    async def cancel(self, stream_id: str) -> dict[str, Any]:
        meta = await self.meta(stream_id)
        store = Store(self.redis, self.settings)
        before = meta.get("status")
        written = 0
        if before not in ("completed", "failed", "cancelled"):
            # The same two writes as DELETE /v1/streams/{id}: terminal entries first, then arq aborts.
            written = await store.cancel(stream_id)
            await store.abort_jobs(stream_id)
        after = await self.meta(stream_id)
        return {
            "id": stream_id,
            "cancelled": written > 0,
            "status_before": before,
            "status": after.get("status"),
            "a": after.get("a_state"),
            "b": after.get("b_state"),
        }


# -- helpers -----------------------------------------------------------------------------------


def parse_from(raw: str | None) -> str:
    if raw is None:
        return "0-0"
    entry = raw[2:] if raw[:2] in ("a-", "b-") else raw
    if not is_entry_id(entry):
        raise Usage(f"--from {raw!r}: expected a Redis entry id like 1700000000000-0, or an event id like a-1700000000000-0")
    return entry


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _ttl(pttl: int) -> float | None:
    """PTTL -> seconds; None for no TTL (-1) or no key (-2)."""
    return round(pttl / 1000, 1) if pttl >= 0 else None


def write_entry(out: Any, as_json: bool, src: str, eid: str, fields: dict[str, str]) -> None:
    if as_json:
        out.write(orjson.dumps({"source": src, "id": eid, "fields": fields}).decode() + "\n")
    else:
        kind = fields.get("type", "?")
        rest = " ".join(f"{f}={orjson.dumps(v).decode()}" for f, v in fields.items() if f != "type")
        out.write(f"{eid:<17} {src}  {kind:<5}  {rest}\n")
    out.flush()


def age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def iso(ms: int | None) -> str:
    if not ms:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ms / 1000)) + "Z"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    cells = [[str(c) for c in header], *[[("-" if c is None else str(c)) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() + "\n" for r in cells)


def _src(doc: dict[str, Any]) -> str:
    return f"{doc['state']} {doc['tokens']} tok"


def format_ls(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no streams\n"
    return table(
        ["ID", "STATUS", "AGE", "A", "B", "READERS"],
        [[r["id"], r["status"], age(r["age_s"]), _src(r["a"]), _src(r["b"]), r["readers"]] for r in rows],
    )


def format_show(d: dict[str, Any]) -> str:
    a, b = d["a"], d["b"]
    prompt = d["prompt"] if len(d["prompt"]) <= 72 else d["prompt"][:69] + "..."
    pacing = " ".join(f"{k}={v}" for k, v in d["pacing"].items())
    head = (
        f"stream   {d['id']}\n"
        f"status   {d['status']}\n"
        f"created  {iso(d['created_ms'])} ({age(d['age_s'])} ago)"
        + (f", finished {iso(d['finished_ms'])}" if d["finished_ms"] else "")
        + "\n"
        f"prompt   {prompt!r}\n"
        f"pacing   {pacing}\n"
        f"readers  {d['readers']} connected now\n\n"
    )

    def err(x: dict[str, Any]) -> str:
        e = x["error"]
        return f"{e['code']}: {e['message']}" if e else "-"

    def lease(x: dict[str, Any]) -> str:
        if x["lease_deadline_ms"] is None or x["state"] != "running":
            return "-"
        return f"deadline in {(x['lease_deadline_ms'] - now_ms()) / 1000:.1f}s"

    rows = [
        ["task", a["task"], b["task"]],
        ["state", a["state"], b["state"]],
        ["tokens", a["tokens"], b["tokens"]],
        ["entries", a["entries"], b["entries"]],
        ["last id", a["last_id"], b["last_id"]],
        ["started", iso(a["started_ms"]), iso(b["started_ms"])],
        ["worker", a["worker"], b["worker"]],
        ["lease", lease(a), lease(b)],
        ["job", a["job"]["state"], b["job"]["state"]],
        ["error", err(a), err(b)],
    ]
    keys = table(["KEY", "TYPE", "TTL"], [[x["key"], x["type"], age(x["ttl_s"]) if x["ttl_s"] is not None else "-"] for x in d["keys"]])
    return head + table(["", "A", "B"], rows) + "\n" + keys


def format_stats(d: dict[str, Any]) -> str:
    q, m, st = d["queue"], d["memory"], d["streams"]
    by = ", ".join(f"{k} {v}" for k, v in st["by_status"].items()) or "none"
    lines = [
        f"redis     {d['redis']['url']} (version {d['redis']['version']}, used_memory {d['redis']['used_memory_human']})",
        f"queue     {q['name']}: {q['jobs']} jobs: {q['in_progress']} in progress, {q['waiting']} waiting, {q['deferred']} deferred",
        f"sources   {d['sources_running']['count']} running, {d['sources_running']['past_lease_deadline']} past their lease deadline",
        f"streams   {st['indexed']} indexed: {by}" + ("" if st["scanned"] >= st["indexed"] else f" (newest {st['scanned']} read)"),
        f"memory    {_bytes(m['estimated_bytes'])} in tandem's keys"
        + (" (measured)" if m["exact"] else f" (estimated from the newest {m['sampled_streams']} streams)"),
        f"readers   {d['readers']} SSE connections open now",
        f"workers   {d['workers_alive']} alive",
    ]
    out = "\n".join(lines) + "\n"
    if d["workers"]:
        out += table(
            ["  WORKER", "HEARTBEAT", "RUNNING", "DONE", "METRICS"],
            [
                ["  " + w["id"], f"{w['last_heartbeat_age_s']:.1f}s ago" + ("" if w["alive"] else " (lost)"), w["running"], w["sources_done"], w["metrics"]]
                for w in d["workers"]
            ],
        )
    out += f"apis      {sum(1 for a in d['apis'] if a['alive'])} alive\n"
    if d["apis"]:
        out += table(
            ["  API", "READERS", "STREAMS"],
            [["  " + a["id"] + ("" if a["alive"] else " (gone)"), a["readers"], a["streams_read"]] for a in d["apis"]],
        )
    if d["arq_health_check"]:
        out += f"arq       last health check: {d['arq_health_check']}\n"
    return out


def format_cancel(d: dict[str, Any]) -> str:
    if d["cancelled"]:
        return f"cancelled {d['id']}: status {d['status']} (a {d['a']}, b {d['b']})\n"
    return f"{d['id']} was already {d['status_before']}: nothing to cancel\n"


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"

