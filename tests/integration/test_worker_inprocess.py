"""A real TandemWorker in the test process, on a real redis-server (workers/settings.py,
workers/job.py, workers/wakeup.py): what a worker frees when a job is cancelled, and how soon it
starts a job that was announced on the jobs channel."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from arq.connections import ArqRedis, create_pool
from redis.asyncio import Redis

import workers.settings as worker_settings
from api.app import create_app
from shared.keys import SOURCES, WAKE, Keys
from shared.settings import Settings
from shared.store import Store
from tests.tasks_probe import RUNNING, records
from workers.settings import JOB_NAME, TandemWorker, deserialize, redis_settings, serialize, worker_options
from workers.wakeup import Wakeup


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running_worker(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[tuple[TandemWorker, ArqRedis]]:
    """The worker as `tandem worker` runs it (start-up hooks included), and an arq pool to enqueue
    with. Its GC tuning (freeze, thresholds) is process-wide: not in the test process."""
    monkeypatch.setattr(worker_settings, "tune_gc", lambda: None)
    s = settings.model_copy(update={"tasks": ["tests.tasks_probe:TASK"]})
    pool = await create_pool(redis_settings(s), default_queue_name=s.queue_name, job_serializer=serialize, job_deserializer=deserialize)
    worker = TandemWorker(**{**worker_options(s), "handle_signals": False})
    main = asyncio.create_task(worker.main())
    try:
        await _until(lambda: "wakeup" in worker.ctx, "the worker's start-up")
        wakeup: Wakeup = worker.ctx["wakeup"]
        await asyncio.wait_for(wakeup.subscribed.wait(), 10.0)
        yield worker, pool
    finally:
        main.cancel()
        await asyncio.gather(main, return_exceptions=True)
        await worker.close()
        await pool.aclose()


def probe(record: Path, **options: Any) -> tuple[str, dict[str, Any]]:
    return "probe", {"record": str(record), **options}


def started(record: Path) -> int:
    return sum(r["event"] == "started" for r in records(record))


async def test_a_cancelled_job_leaves_no_reference_cycle(settings: Settings, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """arq keeps the exception that ended a job in its own frame (`result = e`) and the
    exception's traceback holds that frame: a reference cycle through every frame of the job,
    which a worker with rare full collections (shared/gcpolicy.py) kept for minutes, ~55 objects
    per cancelled job. The worker cuts it once arq is done with the job."""
    record = tmp_path / "probe.jsonl"
    # A token, then a long wait: arq's abort finds each task waiting. (A task that appends first
    # finds its source ended and stops by itself, with no CancelledError and no cycle.)
    task = probe(record, tokens=100, interval_ms=60_000)
    gc_was_on = gc.isenabled()
    async with running_worker(settings, monkeypatch) as (worker, pool):
        try:
            streams = [await store.create(prompt="p", tasks={"a": task, "b": task}, pacing={}) for _ in range(3)]
            for c in streams:
                for src in SOURCES:
                    await pool.enqueue_job(JOB_NAME, c.id, src, _job_id=store.keys.job_id(c.id, src))
            await _until(lambda: started(record) == 6, "six sources started")
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


async def test_a_published_job_starts_without_waiting_for_the_next_poll(settings: Settings, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a poll every 60 s, a job starts only when the jobs channel wakes the worker: the API's
    create publishes in its MULTI/EXEC, and the subscription comes back after its connection is
    killed (meanwhile the worker would poll on its timer)."""
    record = tmp_path / "probe.jsonl"
    s = settings.model_copy(update={"worker_poll_delay_s": 60.0})
    app = create_app(s.model_copy(update={"tasks": ["tests.tasks_probe:TASK"]}))
    async with running_worker(s, monkeypatch) as (worker, _), app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tandem.test") as c:

            async def create(**options: Any) -> dict[str, Any]:
                task = {"task": "probe", "options": {"record": str(record), "tokens": 1, **options}}
                r = await c.post("/v1/streams", json={"prompt": "p", "a": task, "b": task})
                assert r.status_code == 201, r.text
                doc: dict[str, Any] = r.json()
                return doc

            await asyncio.sleep(0.2)  # past the worker's first poll: the next is a minute away
            sid = (await create())["id"]
            await _until(lambda: started(record) == 2, "both sources started", timeout_s=20.0)
            await _until(lambda: all(t.done() for t in worker.tasks.values()), "the jobs to end")
            assert (await store.meta(sid) or {}).get("status") == "completed"

            # DELETE publishes too: arq aborts the running jobs at once, not at the next poll.
            doc = await create(tokens=100, interval_ms=60_000)
            await _until(lambda: started(record) == 4, "the sources started", timeout_s=20.0)
            r = await c.delete(f"/v1/streams/{doc['id']}", params={"token": doc["token"]})
            assert r.status_code == 200, r.text
            await _until(lambda: sum(x["event"] == "CancelledError" for x in records(record)) == 2, "both jobs aborted", timeout_s=20.0)

            # The subscription's connection dies: the worker subscribes again, and polls once
            # then (what was enqueued meanwhile starts too).
            wakeup: Wakeup = worker.ctx["wakeup"]
            admin = Redis.from_url(s.effective_redis_url)
            try:
                killed = await admin.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
                assert killed >= 1
                await _until(lambda: not wakeup.subscribed.is_set(), "the loss to be noticed")
                await asyncio.wait_for(wakeup.subscribed.wait(), 10.0)
                await create()
                await _until(lambda: started(record) == 6, "the next stream's sources started", timeout_s=20.0)
            finally:
                await admin.aclose()


async def test_a_silent_subscription_is_made_again(settings: Settings, redis: Redis) -> None:
    """workers/wakeup.py: a subscription that hears nothing, not even the answer to its PING, for
    twice `heard_s` is replaced (a connection can die without an error: a partition, a paused or
    frozen Redis); each subscription made wakes the worker once, for what was enqueued meanwhile."""
    woken = 0

    def wake() -> None:
        nonlocal woken
        woken += 1

    channel = Keys(settings.key_prefix).jobs
    wakeup = Wakeup(settings, channel, wake, heard_s=0.2)
    wakeup.start()
    try:
        await asyncio.wait_for(wakeup.subscribed.wait(), 10.0)
        assert (wakeup.subscriptions, woken) == (1, 1)
        assert await redis.publish(channel, WAKE) == 1
        await _until(lambda: woken == 2, "a wake per message")
        # Redis answers no one for 1.5 s: the PING goes unanswered, and after 0.4 s of silence
        # the subscription is made again on a new connection (once Redis answers).
        await redis.execute_command("CLIENT", "PAUSE", 1500, "ALL")
        await _until(lambda: wakeup.subscriptions == 2, "a new subscription")
        assert woken == 3
        await _until(lambda: wakeup.subscribed.is_set(), "the subscription")
        assert await redis.publish(channel, WAKE) == 1  # one subscriber: the old connection is gone
        await _until(lambda: woken == 4, "a wake per message")
    finally:
        await wakeup.stop()
