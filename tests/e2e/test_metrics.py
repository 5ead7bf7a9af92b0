"""Metrics and logs after real streams: the values one stream must have produced, on the API and
summed over two workers that share one configured metrics port; JSON logs without tokens."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.redis_server import RedisServer, free_port
from tests.client import create, read_events
from tests.harness import ROOT, Stack, stack
from workers.tasks.simulated import split_tokens

pytestmark = pytest.mark.e2e

A_TOKENS, A_INTERVAL_MS = 20, 30
B_DELAY_MS, B_TEXT = 900, "Sources: one, two and three."
B_TOKENS = len(split_tokens(B_TEXT))
RESUME_AFTER = 5  # the second connection resumes after this many A deltas


@pytest.fixture(scope="module")
def obs(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """One API and two workers given the same metrics port (the second moves to a free next one),
    all logging JSON."""
    port = free_port()
    with stack(
        tmp_path_factory.mktemp("metrics"), redis_server, apis=1, workers=2, TANDEM_WORKER_METRICS_PORT=str(port), TANDEM_LOG_JSON="1"
    ) as s:
        yield s


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(url, timeout=5.0).text
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(scrapes: list[dict[tuple[str, tuple[tuple[str, str], ...]], float]], name: str, **labels: str) -> float:
    return sum(value(s, name, **labels) for s in scrapes)


def worker_addresses(s: Stack) -> list[str]:
    """From the workers' heartbeats, as `tandem stats --json` shows them."""
    deadline = time.monotonic() + 15
    while True:
        p = subprocess.run([sys.executable, "-m", "cli", "stats", "--json"], cwd=ROOT, env=s.env, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr
        found = [w["metrics"] for w in orjson.loads(p.stdout)["workers"] if w["alive"] and w["metrics"]]
        if len(found) == 2 or time.monotonic() > deadline:
            return sorted(found)
        time.sleep(0.3)


def run_one_stream(api: str) -> tuple[dict[str, Any], dict[str, Any]]:
    h = create(
        api,
        {
            "prompt": "count me",
            "a": {"task": "simulated", "options": {"tokens": A_TOKENS, "interval_ms": A_INTERVAL_MS}},
            "b": {"task": "simulated", "options": {"delay_ms": B_DELAY_MS, "text": B_TEXT}},
            "pacing": {"slow_interval_ms": 150, "b_interval_ms": 0},
        },
    )
    first = read_events(api, h["events_url"])
    assert first.ended and first.of("end")[0].data == {"status": "completed"}
    return h, {"first": first}


def test_metrics_count_what_one_stream_produced(obs: Stack) -> None:
    api = obs.apis[0].url
    addresses = worker_addresses(obs)
    ports = sorted(int(a.rsplit(":", 1)[1]) for a in addresses)
    configured = int(obs.env_extra["TANDEM_WORKER_METRICS_PORT"])
    assert len(ports) == 2 and ports[0] == configured and configured < ports[1] < configured + 16  # one each

    h, runs = run_one_stream(api)
    first = runs["first"]
    a_deltas = [e for e in first.of("delta") if e.data["source"] == "a"]
    assert len(a_deltas) == A_TOKENS and first.text("b") == B_TEXT
    # one resumed connection, after the 5th A delta: it gets the rest of A, and all of B, once
    resumed = read_events(api, h["events_url"], a_deltas[RESUME_AFTER - 1].id)
    assert resumed.ended and len([e for e in resumed.of("delta") if e.data["source"] == "a"]) == A_TOKENS - RESUME_AFTER
    # one request with a wrong token
    assert httpx.get(api + f"/v1/streams/{h['id']}?token=wrong", timeout=5.0).status_code == 403

    m = scrape(api + "/metrics")
    assert value(m, "tandem_streams_created_total") == 1
    sent = {(src, kind): value(m, "tandem_events_sent_total", source=src, kind=kind) for src in ("a", "b") for kind in ("delta", "done")}
    assert sent == {
        ("a", "delta"): A_TOKENS + (A_TOKENS - RESUME_AFTER),
        ("a", "done"): 2,
        ("b", "delta"): 2 * B_TOKENS,
        ("b", "done"): 2,
    }
    assert value(m, "tandem_events_sent_total", source="stream", kind="end") == 2
    assert value(m, "tandem_events_sent_total", source="a", kind="error") == 0
    assert value(m, "tandem_resumes_total") == 1
    assert value(m, "tandem_rejected_total", code="token_invalid") == 1
    assert value(m, "tandem_redis_errors_total") == 0
    # both connections sent a first delta; only the first saw B complete mid-stream and flushed
    assert value(m, "tandem_time_to_first_delta_seconds_count") == 2
    assert value(m, "tandem_flush_reaction_seconds_count") == 1
    assert 0 < value(m, "tandem_flush_reaction_seconds_sum") < 0.2  # measured (sub-ms on an idle machine)
    deadline = time.monotonic() + 5
    while value(m, "tandem_open_streams") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
        m = scrape(api + "/metrics")
    assert value(m, "tandem_open_streams") == 0

    # workers: each serves its own registry; summed, they saw exactly this stream's two sources
    w = [scrape(f"http://127.0.0.1:{p}/metrics") for p in ports]
    assert total(w, "tandem_tokens_produced_total", source="a", task="simulated") == A_TOKENS
    assert total(w, "tandem_tokens_produced_total", source="b", task="simulated") == B_TOKENS
    for src in ("a", "b"):
        assert total(w, "tandem_source_outcomes_total", source=src, task="simulated", outcome="done") == 1
        assert total(w, "tandem_source_duration_seconds_count", source=src, task="simulated") == 1
        assert total(w, "tandem_sources_running", source=src) == 0
    a_took = total(w, "tandem_source_duration_seconds_sum", source="a", task="simulated")
    b_took = total(w, "tandem_source_duration_seconds_sum", source="b", task="simulated")
    assert (A_TOKENS - 1) * A_INTERVAL_MS / 1000 <= a_took < 10
    assert B_DELAY_MS / 1000 <= b_took < 10


def test_tokens_produced_grows_while_a_source_runs(obs: Stack) -> None:
    """Counted as appended, not when the source ends: a scrape mid-source already sees tokens."""
    api = obs.apis[0].url
    ports = [int(a.rsplit(":", 1)[1]) for a in worker_addresses(obs)]

    def produced() -> float:
        return total([scrape(f"http://127.0.0.1:{p}/metrics") for p in ports], "tandem_tokens_produced_total", source="a", task="simulated")

    def running() -> float:
        return total([scrape(f"http://127.0.0.1:{p}/metrics") for p in ports], "tandem_sources_running", source="a")

    before = produced()
    h = create(api, {"prompt": "long", "a": {"task": "simulated", "options": {"tokens": 60, "interval_ms": 50}}})
    time.sleep(1.2)
    mid = produced() - before
    assert 5 <= mid < 60 and running() == 1
    assert httpx.delete(api + h["status_url"], timeout=5.0).status_code == 200
    deadline = time.monotonic() + 5
    while running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running() == 0


def test_json_logs_name_the_stream_and_never_the_token(obs: Stack) -> None:
    api = obs.apis[0].url
    h, _ = run_one_stream(api)
    token = h["token"]
    # the token travels every way a client sends it: query string, bearer header, resume, cancel
    assert httpx.get(api + f"/v1/streams/{h['id']}", headers={"Authorization": f"Bearer {token}"}, timeout=5.0).status_code == 200
    assert read_events(api, h["events_url"], "end").status == 204
    assert httpx.delete(api + h["status_url"], timeout=5.0).status_code == 200
    assert httpx.get(api + f"/v1/streams/{h['id']}/events?token={token}x", timeout=5.0).status_code == 403
    time.sleep(0.5)

    procs = [*obs.apis, *obs.workers]
    output = "".join(p.output() for p in procs)
    assert token not in output
    assert token[:16] not in output  # not even a piece of it

    ours: list[dict[str, Any]] = []
    for p in procs:
        for line in p.output().splitlines():
            if line.startswith("{"):
                doc = orjson.loads(line)  # every JSON line parses
                assert {"ts", "level", "logger", "msg"} <= doc.keys()
                ours.append(doc)
    about = [d for d in ours if d.get("stream") == h["id"]]
    msgs = [d["msg"] for d in about]
    assert msgs.count("stream created") == 1
    assert msgs.count("source started") == 2 and msgs.count("source finished") == 2
    assert "stream cancelled" in msgs
    # one SSE connection (the resume with the end id is a 204 and opens none)
    assert msgs.count("reader connected") == 1 and msgs.count("reader disconnected") == 1
    finished = {d["source"]: d for d in about if d["msg"] == "source finished"}
    assert finished["a"]["tokens"] == A_TOKENS and finished["a"]["outcome"] == "done"
    assert all(d["logger"].startswith("tandem") for d in ours)
    # and no tandem line of these processes is in the text format
    text_line = re.compile(r"\d\d:\d\d:\d\d \w+ +tandem\.")
    assert not [ln for p in procs for ln in p.output().splitlines() if text_line.match(ln)]
