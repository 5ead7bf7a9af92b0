"""What a task is. Built-in and user-written tasks implement exactly this.

A task is an async generator ``run(prompt, options, ctx)`` that yields text chunks, plus a pydantic
model for its options. Tasks are registered by name on the server (built-ins, the ``tandem.tasks``
entry point group, ``TANDEM_TASKS``); a request only ever names one, never code to import.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from shared.keys import Source
from shared.settings import Settings

OptionsT = TypeVar("OptionsT", bound=BaseModel)


class TaskError(Exception):
    """A failure the task can name. `code` becomes the `error` event's code, as it is."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class TaskContext:
    stream_id: str
    source: Source
    settings: Settings
    http: httpx.AsyncClient | None = None  # the worker's shared client, for tasks that call out
    result: dict[str, Any] = field(default_factory=dict)

    def report(self, **info: Any) -> None:
        """Extra fields for this source's `done` event (e.g. usage, finish_reason)."""
        self.result.update(info)


@dataclass(frozen=True)
class Task(Generic[OptionsT]):
    name: str
    options: type[OptionsT]
    run: Callable[[str, OptionsT, TaskContext], AsyncIterator[str]]
    description: str = ""
