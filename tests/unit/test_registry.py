"""workers/registry.py: built-ins, entry points and TANDEM_TASKS; names are unique."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from shared.settings import Settings
from workers import registry as registry_module
from workers.registry import RegistryError, load_registry
from workers.task import Task, TaskContext
from workers.tasks.simulated import TASK as SIMULATED


class EchoOptions(BaseModel):
    times: int = 1


async def echo(prompt: str, options: EchoOptions, ctx: TaskContext) -> AsyncIterator[str]:
    for _ in range(options.times):
        yield prompt


EXTRA = Task(name="echo", options=EchoOptions, run=echo, description="test task")
DUPLICATE = Task(name="simulated", options=EchoOptions, run=echo)
NOT_A_TASK = object()


def make_settings(**kw: Any) -> Settings:
    return Settings(_env_file=None, **kw)  # type: ignore[call-arg]


def test_builtin_simulated() -> None:
    reg = load_registry(make_settings())
    assert reg["simulated"] is SIMULATED
    assert all(name == task.name for name, task in reg.items())
    assert "echo" not in reg


def test_tandem_tasks_adds_by_import_path() -> None:
    reg = load_registry(make_settings(tasks=["tests.unit.test_registry:EXTRA"]))
    assert reg["echo"] is EXTRA
    assert reg["simulated"] is SIMULATED


def test_tandem_tasks_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_TASKS", '["tests.unit.test_registry:EXTRA"]')
    assert load_registry(make_settings())["echo"] is EXTRA


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("tests.unit.test_registry", "must look like"),
        (":EXTRA", "must look like"),
        ("tests.unit.test_registry:", "must look like"),
        ("tests.unit.test_registry:NOT_A_TASK", "is not a workers.task.Task"),
        ("tests.unit.test_registry:DUPLICATE", "already registered"),
    ],
)
def test_tandem_tasks_errors(path: str, message: str) -> None:
    with pytest.raises(RegistryError, match=message):
        load_registry(make_settings(tasks=[path]))


def test_same_task_twice_is_an_error() -> None:
    path = "tests.unit.test_registry:EXTRA"
    with pytest.raises(RegistryError, match=r"'echo'.*already registered"):
        load_registry(make_settings(tasks=[path, path]))


def test_missing_module_or_attribute_fails_at_start_up() -> None:
    with pytest.raises(ModuleNotFoundError):
        load_registry(make_settings(tasks=["tests.unit.no_such_module:X"]))
    with pytest.raises(AttributeError):
        load_registry(make_settings(tasks=["tests.unit.test_registry:NO_SUCH_NAME"]))


class FakeEntryPoint:
    def __init__(self, value: str, obj: object) -> None:
        self.value = value
        self._obj = obj

    def load(self) -> object:
        return self._obj


def test_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
        seen.append(group)
        return [FakeEntryPoint("pkg.mod:EXTRA", EXTRA)]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    reg = load_registry(make_settings())
    assert seen == ["tandem.tasks"]
    assert reg["echo"] is EXTRA


def test_entry_point_that_is_not_a_task(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "entry_points", lambda *, group: [FakeEntryPoint("pkg.mod:x", NOT_A_TASK)])
    with pytest.raises(RegistryError, match=r"entry point pkg\.mod:x is not a workers\.task\.Task"):
        load_registry(make_settings())


async def test_registered_task_runs() -> None:
    reg = load_registry(make_settings(tasks=["tests.unit.test_registry:EXTRA"]))
    task = reg["echo"]
    ctx = TaskContext(stream_id="s", source="a", settings=make_settings())
    out = [chunk async for chunk in task.run("hi", task.options.model_validate({"times": 3}), ctx)]
    assert out == ["hi", "hi", "hi"]
