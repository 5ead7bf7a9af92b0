"""TANDEM_WORKER_NICE: a worker lowers its own CPU priority at start, never raises it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.redis_server import RedisServer
from tests.client import create, read_events
from tests.harness import ROOT, stack

pytestmark = pytest.mark.e2e


def niceness(pid: int) -> int:
    return os.getpriority(os.PRIO_PROCESS, pid)


def test_worker_runs_at_its_niceness_and_serves(tmp_path: Path, redis_server: RedisServer) -> None:
    expected = max(7, niceness(0))  # (if this test already runs above 7, the worker keeps that)
    with stack(tmp_path, redis_server, apis=1, workers=0) as s:
        worker = s.start_worker(TANDEM_WORKER_NICE="7")
        base = s.apis[0].url
        fast = {"task": "simulated", "options": {"tokens": 5, "interval_ms": 0}}
        h = create(base, {"prompt": "hi", "a": fast, "b": fast})
        run = read_events(base, h["events_url"])
        assert run.events[-1].event == "end" and run.text("a") and run.text("b")
        assert niceness(worker.popen.pid) == expected
        if expected == 7:
            assert "running at niceness 7" in worker.output()


@pytest.mark.parametrize(("inherited", "setting", "after"), [(0, 0, 0), (3, 7, 7), (12, 7, 12)])
def test_lower_priority_never_raises_it(inherited: int, setting: int, after: int) -> None:
    code = f"import os; os.nice({inherited}); from cli.main import lower_priority; lower_priority({setting}); print(os.nice(0))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert int(out) == max(after, niceness(0) + inherited)
