"""workers/job.py and workers/settings.py: a job cancelled by DELETE frees what it held when it
ends, without the garbage collector (real redis-server, a real TandemWorker in this process).

arq keeps the exception that ended a job in its own frame (`result = e`) and the exception's
traceback holds that frame: a reference cycle through every frame of the job, which a worker
with rare full collections (shared/gcpolicy.py) kept for minutes, ~55 objects per cancelled job."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path

import pytest
from arq.connections import create_pool

import workers.settings as worker_settings
from shared.keys import SOURCES
from shared.settings import Settings
from shared.store import Store
from tests.tasks_probe import RUNNING, records
from workers.settings import JOB_NAME, TandemWorker, deserialize, redis_settings, serialize, worker_options


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_a_cancelled_job_leaves_no_reference_cycle(settings: Settings, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's GC tuning (freeze, thresholds) is process-wide: not in the test process.
    monkeypatch.setattr(worker_settings, "tune_gc", lambda: None)
    s = settings.model_copy(update={"tasks": ["tests.tasks_probe:TASK"]})
    record = tmp_path / "probe.jsonl"
    # A token, then a long wait: arq's abort finds each task waiting. (A task that appends first
    # finds its source ended and stops by itself, with no CancelledError and no cycle.)
    probe = ("probe", {"record": str(record), "tokens": 100, "interval_ms": 60_000})
    pool = await create_pool(redis_settings(s), default_queue_name=s.queue_name, job_serializer=serialize, job_deserializer=deserialize)
    worker = TandemWorker(**{**worker_options(s), "handle_signals": False})
    main = asyncio.create_task(worker.main())
    gc_was_on = gc.isenabled()
    try:
        streams = [await store.create(prompt="p", tasks={"a": probe, "b": probe}, pacing={}) for _ in range(3)]
        for c in streams:
            for src in SOURCES:
                await pool.enqueue_job(JOB_NAME, c.id, src, _job_id=store.keys.job_id(c.id, src))
        await _until(lambda: sum(r["event"] == "started" for r in records(record)) == 6, "six sources started")
        assert len(RUNNING) == 6
        gc.disable()  # what is freed from here on is freed by reference counting alone
        gc.collect()
        for c in streams:
            await store.cancel(c.id)  # as DELETE: terminal entries, then arq aborts the jobs
            await store.abort_jobs(c.id)
        await _until(lambda: sum(r["event"] == "CancelledError" for r in records(record)) == 6, "six tasks cancelled")
        await _until(lambda: not worker.tasks and not worker.cancelled, "the jobs to end")
        for c in streams:
            assert await store.source_state(c.id, "a") == "cancelled"
        # Each run's frame went with its job (before the fix: all six, kept by the cycle).
        assert len(RUNNING) == 0
    finally:
        if gc_was_on:
            gc.enable()
        main.cancel()
        await asyncio.gather(main, return_exceptions=True)
        await worker.close()
        await pool.aclose()
