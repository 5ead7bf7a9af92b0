"""`make bench-smoke` end to end: every figure of bench/out/results.json is there and numeric.

No timing assertion: the figures depend on the machine; this only checks the harness works.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.report import missing, problems, required_fields

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_bench_smoke_writes_every_field(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["meta"]["mode"] == "smoke"
    fields = required_fields(doc)
    # The smoke mode measures every part: throughput at two levels, latency, backlog, open streams.
    assert any(f.startswith("throughput.") for f in fields)
    assert any(f.startswith("latency.tandem.resume") for f in fields)
    assert any(f.startswith("open_streams.") for f in fields)
    assert "backlog.tandem.backlog_ms" in fields
    assert missing(doc) == []
    assert problems(doc) == []  # every stream complete with every event; paced ones in order, exactly once
    assert {t["name"] for t in doc["targets"]} >= {"token latency p99", "flush reaction p99", "resume latency p99"}
    assert "events/s" in proc.stdout  # the table
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "bench.png").stat().st_size > 0


def test_a_run_that_lost_events_is_a_problem_not_a_figure() -> None:
    """A throughput run whose streams ended without all their events (a failed source ends its
    stream too) is reported as wrong, whatever its events/s."""
    ok = {"streams": 5000, "streams_complete": 5000, "events": 505_000, "events_expected": 505_000, "errors": []}
    lost = {**ok, "events": 81_104, "errors": ["a source failed (an error event)"]}
    assert problems({"throughput": {"5000": {"tandem": ok, "baseline": ok}}}) == []
    (problem,) = problems({"throughput": {"100": {"tandem": ok, "baseline": ok}, "5000": {"tandem": lost, "baseline": ok}}})
    assert problem.startswith("tandem @5000 streams: 81104 of 505000 events delivered")
