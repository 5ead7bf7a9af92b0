"""The server's task registry: built-ins, the `tandem.tasks` entry points, and TANDEM_TASKS."""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from shared.settings import Settings
from workers.task import Task
from workers.tasks.openai import make_task as make_openai_task
from workers.tasks.simulated import TASK as SIMULATED

ENTRY_POINT_GROUP = "tandem.tasks"
Registry = dict[str, Task[Any]]


class RegistryError(RuntimeError):
    pass


def load_registry(settings: Settings) -> Registry:
    """Runs at start-up only, from server configuration; never from a request."""
    registry: Registry = {}

    def add(task: object, origin: str) -> None:
        if not isinstance(task, Task):
            raise RegistryError(f"{origin} is not a workers.task.Task")
        if task.name in registry:
            raise RegistryError(f"task name {task.name!r} from {origin} is already registered")
        registry[task.name] = task

    add(SIMULATED, "built-in simulated")
    add(make_openai_task(settings), "built-in openai")  # its options know the configured backends
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        add(ep.load(), f"entry point {ep.value}")
    for path in settings.tasks:
        module, _, attr = path.partition(":")
        if not module or not attr:
            raise RegistryError(f"TANDEM_TASKS entry {path!r} must look like 'package.module:task'")
        add(getattr(importlib.import_module(module), attr), path)
    return registry
