"""The arq job: run one source of one stream and write what it produces.

However the job stops, the source gets exactly one terminal entry:

- the task ends or fails: `done`, or `error` with the task's code (`timeout` past TANDEM_MAX_STREAM_S);
- DELETE (or an orphan cancel) wrote `cancelled` and arq aborts the job: nothing more is written;
- the worker shuts down (SIGTERM) and the source is still running after TANDEM_WORKER_DRAIN_S:
  `error` code `worker_lost`, "worker shut down";
- the worker dies: its lease expires and a sweeper writes `worker_lost` (workers/lease.py);
- Redis goes away: every write is retried until it answers (a short outage loses nothing); an
  outage longer than the lease ends the source with `worker_lost` when Redis is back.

A job leaves arq's queue when its source starts (shared/store.py), so arq does not run it again
after a crash or a shutdown. A job that runs again anyway finds the source terminal and writes
nothing, or running, and ends it with `worker_lost`: a task is not repeatable, so a source is
never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial
from typing import Any, cast

from shared.events import done_fields, error_fields
from shared.keys import Source
from shared.store import Store
from workers.appender import BACKLOGGED, Appender
from workers.lease import Lease, redis_retry
from workers.metrics import source_run
from workers.registry import Registry
from workers.task import Task, TaskContext, TaskError

log = logging.getLogger("tandem.worker")

SHUTDOWN_WRITE_S = 3.0  # longest a stopping worker waits to write `worker_lost` (the sweeper writes it otherwise)


async def run_source(ctx: dict[str, Any], stream_id: str, source: str) -> str:
    try:
        return await _run_source(ctx, stream_id, source)
    except asyncio.CancelledError as e:
        # arq keeps the exception that ended a job in its own frame (`result = e`), which the
        # exception's traceback holds in turn: a reference cycle that would keep this job's frames,
        # its appender, lease and task (~55 objects) until a full GC collection. The worker cuts
        # it once arq is done with the job (TandemWorker.run_job).
        ended = ctx.get("job_cancelled")
        if ended is not None:
            ended(ctx.get("job_id"), e)
        raise


async def _run_source(ctx: dict[str, Any], stream_id: str, source: str) -> str:
    if source not in ("a", "b"):
        raise ValueError(f"bad source {source!r}")
    src = cast(Source, source)
    store: Store = ctx["store"]
    registry: Registry = ctx["registry"]
    worker_id: str = ctx["worker_id"]

    before, meta = await redis_retry(partial(store.start_source, stream_id, src, worker_id), "start", stream_id)
    started = ctx.get("job_started")
    if started is not None:
        started(ctx.get("job_id"))  # the worker may claim another job (TANDEM_WORKER_PREFETCH)
    if before is None:
        return "gone"  # expired or deleted before it ran
    if before == "running":
        # An earlier attempt of this job started and did not finish: its worker died. What it
        # wrote was already sent to readers and a task is not repeatable, so the source ends here.
        await redis_retry(partial(store.finish, stream_id, [src], error_fields("worker_lost", "the worker running this source was lost")), "finish", stream_id)
        return "worker_lost"
    if before != "queued":
        return before  # already terminal: cancelled (or lost) before this attempt

    lease = Lease(store, stream_id, src, worker_id, renew=ctx["pipe"].renew)
    lease.start()
    try:
        return await _run(ctx, store, registry, stream_id, src, lease, meta)
    finally:
        await lease.stop()


async def _run(ctx: dict[str, Any], store: Store, registry: Registry, stream_id: str, src: Source, lease: Lease, meta: dict[str, str]) -> str:
    name = meta[f"{src}_task"]
    task = registry.get(name)
    if task is None:
        await _finish(store, stream_id, src, lease, error_fields("unknown_task", f"this worker has no task named {name!r}"))
        return "failed"
    tctx = TaskContext(stream_id=stream_id, source=src, settings=store.settings, http=ctx.get("http"))
    appender = ctx["pipe"].appender(stream_id, src, store.settings.append_max_batch)
    run = source_run(ctx, src, name, appender)  # metrics: tokens as appended, duration, outcome
    log.info("source started", extra={"stream": stream_id, "source": src, "task": name})
    try:
        fields = await _produce(task, meta, src, tctx, appender)
        outcome = fields[3] if fields[1] == "error" else "done"
        if not await _finish(store, stream_id, src, lease, fields):
            outcome = "stopped"  # ended meanwhile by someone else (cancelled, too_long, lost)
    except asyncio.CancelledError:
        await lease.stop()
        if lease.lost is not None:
            # The lease found the source ended (or ended it, `worker_lost`): nothing to write.
            me = asyncio.current_task()
            if me is not None:
                me.uncancel()
            outcome = lease.lost
        else:
            # Aborted (DELETE already wrote `cancelled`: this writes nothing) or the worker is
            # shutting down after its drain time.
            stopping: asyncio.Event | None = ctx.get("stopping")
            fields = (
                error_fields("worker_lost", "worker shut down")
                if stopping is not None and stopping.is_set()
                else error_fields("cancelled", "the job was cancelled")
            )
            with contextlib.suppress(Exception):
                await asyncio.wait_for(store.finish(stream_id, [src], fields), SHUTDOWN_WRITE_S)
            run.end(fields[3])  # metrics outcome: cancelled, or worker_lost on shutdown
            log.info("source cancelled", extra={"stream": stream_id, "source": src, "code": fields[3], "tokens": appender.appended})
            raise
    run.end(outcome)
    log.info("source finished", extra={"stream": stream_id, "source": src, "outcome": outcome, "tokens": appender.appended})
    return outcome


async def _produce(task: Task[Any], meta: dict[str, str], src: Source, tctx: TaskContext, appender: Appender) -> list[str]:
    """Run the task into the appender; the terminal entry's fields."""
    limit = tctx.settings.max_stream_s
    deadline = asyncio.timeout(limit)
    try:
        options = task.options.model_validate_json(meta[f"{src}_options"])
        gen = task.run(meta.get("prompt", ""), options, tctx)
        try:
            async with deadline:
                async for chunk in gen:
                    if chunk:
                        added = appender.add(chunk)
                        if not added:
                            break
                        if added == BACKLOGGED:
                            await appender.wait_written()  # the task is faster than Redis
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        await appender.close()
        return done_fields(appender.appended, tctx.result)
    except TaskError as e:
        await appender.close()
        return error_fields(e.code, e.message)
    except TimeoutError as e:
        await appender.close()
        if deadline.expired():
            return error_fields("timeout", f"the source ran longer than TANDEM_MAX_STREAM_S ({limit} s)")
        return _task_failed(tctx, e)
    except Exception as e:  # a bug in a task must not leave readers waiting
        await appender.close()
        return _task_failed(tctx, e)


def _task_failed(tctx: TaskContext, e: Exception) -> list[str]:
    log.error("task failed", exc_info=e, extra={"stream": tctx.stream_id, "source": tctx.source})
    return error_fields("task_failed", f"{type(e).__name__}: {e}")


async def _finish(store: Store, stream_id: str, src: Source, lease: Lease, fields: list[str]) -> int:
    """Stop renewing, then write the terminal entry (retried through a Redis outage)."""
    await lease.stop()
    return await redis_retry(partial(store.finish, stream_id, [src], fields), "finish", stream_id)
