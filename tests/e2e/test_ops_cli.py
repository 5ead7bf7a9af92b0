"""The operator commands against a live stack: `tandem ls | show | tail | stats | cancel`, tables and
--json, and their exit codes (0 ok, 1 not found, 2 usage, 3 Redis unavailable)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shared.redis_server import RedisServer, free_port
from tests.client import Run, create, read_events
from tests.harness import ROOT, Stack, stack

pytestmark = pytest.mark.e2e

METRICS_PORT = free_port()


@pytest.fixture(scope="module")
def live1(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[Stack]:
    """One API and one worker (serving its metrics), shared by this module's tests."""
    env = {"TANDEM_WORKER_METRICS_PORT": str(METRICS_PORT), "TANDEM_WORKER_HEARTBEAT_S": "1"}
    with stack(tmp_path_factory.mktemp("ops"), redis_server, apis=1, workers=1, **env) as s:
        yield s


def tandem(env: dict[str, str], *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def as_json(env: dict[str, str], *args: str) -> Any:
    p = tandem(env, *args, "--json")
    assert p.returncode == 0, p.stderr
    return orjson.loads(p.stdout)


def wait_for(check: Callable[[], Any], timeout: float = 8.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def body(a_tokens: int, a_interval: int, b_delay: int, b_text: str, slow: int = 100) -> dict[str, Any]:
    return {
        "prompt": "operators at work",
        "a": {"task": "simulated", "options": {"tokens": a_tokens, "interval_ms": a_interval}},
        "b": {"task": "simulated", "options": {"delay_ms": b_delay, "text": b_text}},
        "pacing": {"slow_interval_ms": slow, "b_interval_ms": 0},
    }


def in_background(base: str, events_url: str) -> tuple[threading.Thread, list[Run]]:
    """Read a stream in a thread; the list gets the Run, or nothing if the connection broke."""
    out: list[Run] = []

    def read() -> None:
        try:
            out.append(read_events(base, events_url))
        except httpx.HTTPError:
            pass  # the API went away under this reader (on purpose, in one test)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, out


def status(base: str, handles: dict[str, Any]) -> dict[str, Any]:
    r = httpx.get(base + handles["status_url"], timeout=5.0)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_ls_show_tail_on_a_running_stream_and_after(live1: Stack) -> None:
    api, env = live1.apis[0], live1.env
    h = create(api.url, body(a_tokens=100, a_interval=60, b_delay=1500, b_text="B found three sources"))
    reader, runs = in_background(api.url, h["events_url"])

    # ls: the stream, running, with its one reader (published by the API within a second or so)
    row = wait_for(
        lambda: next((r for r in as_json(env, "ls") if r["id"] == h["id"] and r["readers"] == 1 and r["a"]["tokens"] > 0), None),
        what="ls to show the reader",
    )
    assert row["status"] == "running" and row["a"]["state"] == "running" and row["a"]["task"] == "simulated"
    table = tandem(env, "ls").stdout.splitlines()
    assert table[0].split() == ["ID", "STATUS", "AGE", "A", "B", "READERS"]
    line = next(ln for ln in table if ln.startswith(h["id"]))
    assert line.split()[1] == "running" and line.split()[-1] == "1"

    # show: who runs A, its lease and job, TTLs, and the reader
    shown = as_json(env, "show", h["id"])
    workers = [w["id"] for w in as_json(env, "stats")["workers"] if w["alive"]]
    assert shown["a"]["state"] == "running" and shown["a"]["worker"] in workers
    assert shown["a"]["job"]["state"] == "in_progress"
    assert shown["a"]["entries"] == shown["a"]["events"] >= 1
    assert shown["readers"] == 1
    ttls = {k["key"].rsplit(":", 1)[-1]: k["ttl_s"] for k in shown["keys"]}
    assert ttls["meta"] is not None and ttls["meta"] > 3000  # unfinished: max_stream_s + retention
    assert h["token"] not in orjson.dumps(shown).decode()
    text = tandem(env, "show", h["id"]).stdout
    assert f"stream   {h['id']}" in text and "readers  1 connected now" in text
    assert any(ln.startswith("worker") and shown["a"]["worker"] in ln for ln in text.splitlines())

    reader.join(30)
    assert runs and runs[0].ended
    doc = status(api.url, h)
    assert doc["status"] == "completed"

    # tail: every entry of both sources, in id order; the deltas make up the status document's text
    entries = [orjson.loads(ln) for ln in tandem(env, "tail", h["id"], "--json").stdout.splitlines()]
    ids = [tuple(int(x) for x in e["id"].split("-")) for e in entries]
    assert ids == sorted(ids)
    for src in ("a", "b"):
        mine = [e for e in entries if e["source"] == src]
        assert "".join(e["fields"].get("text", "") for e in mine if e["fields"]["type"] == "delta") == doc[src]["text"]
        assert mine[-1]["fields"]["type"] == "done" and int(mine[-1]["fields"]["tokens"]) == doc[src]["tokens"]
        assert len(mine) == doc[src]["tokens"] + 1
    human = tandem(env, "tail", h["id"]).stdout.splitlines()
    assert len(human) == len(entries)
    assert human[0].split()[:3] == [entries[0]["id"], entries[0]["source"], "delta"]
    # --from: strictly after an entry id (an SSE event id works too)
    mid = entries[10]
    later = [orjson.loads(ln) for ln in tandem(env, "tail", h["id"], "--from", mid["id"], "--json").stdout.splitlines()]
    assert later == entries[11:]
    assert [orjson.loads(ln) for ln in tandem(env, "tail", h["id"], "--from", f"a-{mid['id']}", "--json").stdout.splitlines()] == later

    # after the reader left: no readers, completed
    wait_for(lambda: next(r for r in as_json(env, "ls") if r["id"] == h["id"])["readers"] == 0, what="readers to drop to 0")
    done = as_json(env, "show", h["id"])
    assert done["status"] == "completed" and done["a"]["job"]["state"] == "complete"
    assert [k["ttl_s"] is not None and 0 < k["ttl_s"] <= 3600 for k in done["keys"][:3]] == [True] * 3  # retention
    assert as_json(env, "ls", "--status", "completed")[0]["id"] == h["id"]
    assert all(r["status"] == "running" for r in as_json(env, "ls", "--status", "running"))


def test_tail_follow_prints_entries_as_they_are_appended(live1: Stack) -> None:
    api, env = live1.apis[0], live1.env
    h = create(api.url, body(a_tokens=20, a_interval=100, b_delay=300, b_text="late news"))
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "cli", "tail", h["id"], "--follow", "--json"]
    with subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True) as p:
        assert p.stdout is not None
        arrivals: list[tuple[float, dict[str, Any]]] = [(time.monotonic() - t0, orjson.loads(ln)) for ln in p.stdout]
        assert p.wait(30) == 0  # --follow ends by itself once both sources ended
    doc = status(api.url, h)
    got = [e for _, e in arrivals]
    for src in ("a", "b"):
        assert "".join(e["fields"].get("text", "") for e in got if e["source"] == src) == doc[src]["text"]
        assert [e["fields"]["type"] for e in got if e["source"] == src][-1] == "done"
    # live, not all at the end: A's 20 tokens take ~2 s, and they arrived spread over that time
    a_times = [t for t, e in arrivals if e["source"] == "a"]
    assert a_times[-1] - a_times[0] > 0.8
    # the same entries as a plain tail afterwards (entries of A and B may share an id: order those by source)
    whole = [orjson.loads(ln) for ln in tandem(env, "tail", h["id"], "--json").stdout.splitlines()]

    def order(e: dict[str, Any]) -> tuple[int, int, str]:
        ms, seq = e["id"].split("-")
        return int(ms), int(seq), e["source"]

    assert sorted(got, key=order) == whole


def test_stats_shows_queue_workers_apis_streams_and_memory(live1: Stack) -> None:
    api, env = live1.apis[0], live1.env
    # Counts as of a heartbeat at which nothing ran: sources of an earlier test may still be ending.
    idle = wait_for(
        lambda: (x := as_json(env, "stats"))["workers"][0]["running"] == 0 and x["sources_running"]["count"] == 0 and x,
        what="the worker idle at a heartbeat",
    )
    time.sleep(1.2)  # one more heartbeat (1 s here), so the count includes whatever just ended
    done_before = as_json(env, "stats")["workers"][0]["sources_done"]
    assert done_before >= idle["workers"][0]["sources_done"]
    h = create(api.url, body(a_tokens=3, a_interval=10, b_delay=0, b_text="quick"))
    assert read_events(api.url, h["events_url"]).ended
    # a worker's counts are as of its last heartbeat (every TANDEM_WORKER_HEARTBEAT_S, 1 s here)
    st = wait_for(
        lambda: (x := as_json(env, "stats"))["workers"][0]["sources_done"] == done_before + 2 and x,
        what="a heartbeat counting the stream's two sources",
    )
    assert st["queue"]["name"] == env["TANDEM_QUEUE_NAME"] and st["queue"]["in_progress"] == 0
    assert st["workers_alive"] == 1
    (w,) = st["workers"]
    assert w["alive"] and w["last_heartbeat_age_s"] < 3 and w["metrics"].endswith(f":{METRICS_PORT}")
    assert w["running"] == 0
    assert [a["alive"] for a in st["apis"]] == [True]
    assert st["streams"]["indexed"] >= 1 and st["streams"]["by_status"]["completed"] >= 1
    assert sum(st["streams"]["by_status"].values()) == st["streams"]["indexed"]
    assert st["memory"]["exact"] and st["memory"]["estimated_bytes"] > st["memory"]["sampled_stream_bytes"] > 0
    assert st["sources_running"]["count"] == 0
    text = tandem(env, "stats").stdout
    assert "workers   1 alive" in text and f"queue     {env['TANDEM_QUEUE_NAME']}" in text
    assert w["id"] in text and "memory    " in text


def cancelled_on_worker() -> float:
    text = httpx.get(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5.0).text
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "tandem_source_outcomes_total" and s.labels["outcome"] == "cancelled"
    )


def test_cancel_stops_a_running_stream_like_delete(live1: Stack) -> None:
    api, env = live1.apis[0], live1.env
    before = cancelled_on_worker()
    h = create(api.url, body(a_tokens=200, a_interval=50, b_delay=60_000, b_text="never"))
    reader, runs = in_background(api.url, h["events_url"])
    wait_for(lambda: status(api.url, h)["a"]["tokens"] >= 3, what="A to produce")
    p = tandem(env, "cancel", h["id"])
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"cancelled {h['id']}: status cancelled")
    reader.join(15)
    assert runs and runs[0].ended
    assert runs[0].of("end")[-1].data == {"status": "cancelled"}
    doc = status(api.url, h)
    assert doc["status"] == "cancelled" and doc["a"]["state"] == "cancelled" and doc["b"]["state"] == "cancelled"
    # arq aborted both jobs on the worker (its metrics count them), and A stopped producing
    wait_for(lambda: cancelled_on_worker() == before + 2, what="the worker to abort both jobs")
    tokens = doc["a"]["tokens"]
    time.sleep(0.5)
    assert status(api.url, h)["a"]["tokens"] == tokens
    again = as_json(env, "cancel", h["id"])
    assert again == {"id": h["id"], "cancelled": False, "status_before": "cancelled", "status": "cancelled", "a": "cancelled", "b": "cancelled"}
    assert "already cancelled" in tandem(env, "cancel", h["id"]).stdout


def test_exit_codes(live1: Stack) -> None:
    env = live1.env
    # ids are URL-safe base64 and may start with '-': still an id, not an unknown option
    for args in (["show", "nosuchstream"], ["tail", "nosuchstream"], ["cancel", "nosuchstream"], ["show", "-nosuchstream_x-y", "--json"]):
        p = tandem(env, *args)
        assert p.returncode == 1, (args, p.stderr)
        assert f"no stream {args[1]}" in p.stderr
    for args in (["show", "not an id!"], ["ls", "--limit", "0"], ["tail", "abc", "--from", "yesterday"], ["frobnicate"], ["show"]):
        assert tandem(env, *args).returncode == 2, args
    down = {**env, "TANDEM_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    for args in (["ls"], ["show", "abc"], ["tail", "abc"], ["stats", "--json"], ["cancel", "abc"]):
        p = tandem(down, *args)
        assert p.returncode == 3, (args, p.stderr)
        assert "Redis unavailable" in p.stderr


def test_readers_are_counted_across_api_processes(live1: Stack) -> None:
    """Two API processes, one reader on each: ls sums them; an API that stops takes its count away."""
    api0 = live1.apis[0]
    api1 = live1.start_api()
    env = live1.env
    try:
        h = create(api0.url, body(a_tokens=400, a_interval=50, b_delay=500, b_text="b"))
        t0, _ = in_background(api0.url, h["events_url"])
        t1, _ = in_background(api1.url, h["events_url"])
        wait_for(lambda: next(r for r in as_json(env, "ls") if r["id"] == h["id"])["readers"] == 2, what="2 readers")
        apis = as_json(env, "stats")["apis"]
        assert sorted(a["readers"] for a in apis) == [1, 1] and all(a["alive"] for a in apis)
        api1.term()  # a clean stop unregisters the process and its readers at once
        t1.join(5)
        assert as_json(env, "show", h["id"])["readers"] == 1
        assert [a["readers"] for a in as_json(env, "stats")["apis"]] == [1]
        assert httpx.delete(api0.url + h["status_url"], timeout=5.0).status_code == 200
        t0.join(10)
        assert not t0.is_alive()
    finally:
        api1.kill()
        live1.apis.remove(api1)
