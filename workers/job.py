"""The arq job: run one source of one stream and write what it produces."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

from shared.events import done_fields, error_fields
from shared.keys import Source
from shared.store import Store
from workers.appender import Appender
from workers.registry import Registry
from workers.task import TaskContext, TaskError

log = logging.getLogger("tandem.worker")


async def run_source(ctx: dict[str, Any], stream_id: str, source: str) -> str:
    if source not in ("a", "b"):
        raise ValueError(f"bad source {source!r}")
    src = cast(Source, source)
    store: Store = ctx["store"]
    registry: Registry = ctx["registry"]
    worker_id: str = ctx["worker_id"]

    before = await store.start(stream_id, src, worker_id)
    if before is None:
        return "gone"  # expired or deleted before it ran
    if before == "running":
        # An earlier attempt of this job started and did not finish: its worker died. What it
        # wrote was already sent to readers and a task is not repeatable, so the source ends here.
        await store.finish(stream_id, [src], error_fields("worker_lost", "the worker running this source was lost"))
        return "worker_lost"
    if before != "queued":
        return before  # already terminal: cancelled before it started

    meta = await store.meta(stream_id)
    if meta is None:
        return "gone"
    name = meta[f"{src}_task"]
    task = registry.get(name)
    if task is None:
        await store.finish(stream_id, [src], error_fields("unknown_task", f"this worker has no task named {name!r}"))
        return "failed"
    tctx = TaskContext(stream_id=stream_id, source=src, settings=store.settings, http=ctx.get("http"))
    appender = Appender(store, stream_id, src, store.settings.append_max_batch)
    log.info("source started", extra={"stream": stream_id, "source": src, "task": name})
    try:
        options = task.options.model_validate_json(meta[f"{src}_options"])
        gen = task.run(meta.get("prompt", ""), options, tctx)
        try:
            async for chunk in gen:
                if chunk and not await appender.add(chunk):
                    break
        finally:
            await gen.aclose()  # type: ignore[attr-defined]
        await appender.close()
        await store.finish(stream_id, [src], done_fields(appender.appended, tctx.result))
        outcome = "done"
    except TaskError as e:
        await appender.close()
        await store.finish(stream_id, [src], error_fields(e.code, e.message))
        outcome = e.code
    except asyncio.CancelledError:
        # Aborted (DELETE already wrote `cancelled`) or the worker is shutting down.
        raise
    except Exception as e:  # a bug in a task must not leave readers waiting
        log.exception("task failed", extra={"stream": stream_id, "source": src, "task": name})
        await appender.close()
        await store.finish(stream_id, [src], error_fields("task_failed", f"{type(e).__name__}: {e}"))
        outcome = "task_failed"
    log.info("source finished", extra={"stream": stream_id, "source": src, "outcome": outcome, "tokens": appender.appended})
    return outcome
