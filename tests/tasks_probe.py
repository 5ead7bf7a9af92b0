"""A test-only task, registered with TANDEM_TASKS='["tests.tasks_probe:TASK"]': emits tokens like
`simulated` and records in a file (JSON lines, wall-clock times) when it started and how its
generator was stopped, so a test measures a cancel where it lands: at the task."""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
from pydantic import BaseModel, ConfigDict, Field

from workers.task import Task, TaskContext


class ProbeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    record: str = Field(description="file to append this run's events to")
    tokens: int = Field(1000, ge=0)
    interval_ms: float = Field(50, ge=0)
    delay_ms: float = Field(0, ge=0)


class Running:
    """Held by each run's frame and nothing else: a test sees, without the garbage collector,
    whether a run's frames are freed when it ends (`RUNNING` loses it) or kept by a cycle."""


RUNNING: weakref.WeakSet[Running] = weakref.WeakSet()


def _record(path: str, event: str, **extra: object) -> None:
    with Path(path).open("ab") as f:
        f.write(orjson.dumps({"event": event, "t": time.time(), **extra}) + b"\n")


def records(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


async def probe(prompt: str, options: ProbeOptions, ctx: TaskContext) -> AsyncIterator[str]:
    _record(options.record, "started", source=ctx.source)
    running = Running()
    RUNNING.add(running)
    sent = 0
    try:
        await asyncio.sleep(options.delay_ms / 1000)
        for i in range(options.tokens):
            yield f"t{i} "
            sent += 1
            await asyncio.sleep(options.interval_ms / 1000)
    except asyncio.CancelledError:
        _record(options.record, "CancelledError", sent=sent)
        raise
    except GeneratorExit:
        _record(options.record, "GeneratorExit", sent=sent)
        raise
    _record(options.record, "finished", sent=sent)


TASK = Task(name="probe", options=ProbeOptions, run=probe, description="test only: records how it was stopped")
