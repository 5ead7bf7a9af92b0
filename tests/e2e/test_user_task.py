"""A user-written task (examples/retrieval) registered with TANDEM_TASKS, running as B behind an
`openai` A, through real `tandem api` and `tandem worker` processes."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shared.redis_server import RedisServer
from tests.client import create, read_events
from tests.fake_openai import FakeOpenAI
from tests.harness import ROOT, Stack, stack

pytestmark = pytest.mark.e2e

EXAMPLE = ROOT / "examples" / "retrieval"


@pytest.fixture(scope="module")
def docs_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The configured root: the example's documents, plus a `notes` collection and, outside the
    root, a secret file no request may reach."""
    base = tmp_path_factory.mktemp("retrieval")
    root = base / "root"
    shutil.copytree(EXAMPLE / "docs", root)
    (root / "notes").mkdir()
    (root / "notes" / "keepalive.txt").write_text("Keepalive notes\nA keepalive comment every 15 seconds keeps idle proxies from closing the connection.\n")
    (base / "secret.txt").write_text("Secret\nThe keepalive password is hunter2.\n")
    (root / "notes" / "link.txt").symlink_to(base / "secret.txt")  # a symlink out of the root is skipped
    return root


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, docs_root: Path) -> Iterator[tuple[Stack, FakeOpenAI]]:
    pythonpath = os.pathsep.join(p for p in (str(EXAMPLE), os.environ.get("PYTHONPATH", "")) if p)
    with FakeOpenAI() as fake, stack(
        tmp_path_factory.mktemp("user-task"),
        redis_server,
        TANDEM_TASKS='["tandem_retrieval:TASK"]',  # a JSON list, as pydantic-settings reads list settings
        PYTHONPATH=pythonpath,
        RETRIEVAL_ROOT=str(docs_root),
        TANDEM_OPENAI_BASE_URL=fake.url,
    ) as s:
        yield s, fake


def test_user_task_as_b(live: tuple[Stack, FakeOpenAI]) -> None:
    s, fake = live
    base = s.apis[0].url
    doc = create(base, {
        "prompt": "How does a browser resume an SSE stream after the connection drops?",
        "a": {"task": "openai", "options": {"model": "fast"}},
        "b": {"task": "retrieval", "options": {"top_k": 2, "delay_ms": 100}},
        "pacing": {"slow_interval_ms": 50},
    })
    run = read_events(base, doc["events_url"])
    print("\n" + "\n".join(f"{e.event:6} {json.dumps(e.data)}" for e in run.events if e.event != "delta" or e.data["source"] == "b"))
    assert run.events[-1].event == "end" and run.events[-1].data == {"status": "completed"}
    assert run.text("a") == fake.expected_text("fast")
    b_deltas = [e.data["text"] for e in run.of("delta") if e.data["source"] == "b"]
    assert b_deltas[0] == "Searched 4 documents for: browser, resume, sse, stream, after, connection, drops.\n"
    assert b_deltas[1].startswith('[1] Server-Sent Events (server-sent-events.txt): "When the connection drops, a browser EventSource reconnects')
    assert b_deltas[2].startswith("[2] Redis streams (redis-streams.txt): ")
    assert len(b_deltas) == 3
    [done_b] = [e.data for e in run.of("done") if e.data["source"] == "b"]
    assert done_b["citations"] == ["server-sent-events.txt", "redis-streams.txt"]
    a_events = [i for i, e in enumerate(run.events) if e.event in ("delta", "done") and e.data["source"] == "a"]
    b_events = [i for i, e in enumerate(run.events) if e.event in ("delta", "done") and e.data["source"] == "b"]
    assert max(a_events) < min(b_events)


def test_collections_stay_inside_the_root(live: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = live
    base = s.apis[0].url
    for collection in ("../", "/etc", "notes/../..", "a\\b"):
        r = httpx.post(base + "/v1/streams", json={"prompt": "x", "b": {"task": "retrieval", "options": {"collection": collection}}}, timeout=5)
        assert r.status_code == 422, (collection, r.text)
        assert r.json()["error"]["code"] == "invalid_options"

    doc = create(base, {"prompt": "keepalive password", "a": {"task": "simulated", "options": {"tokens": 2, "interval_ms": 0}},
                        "b": {"task": "retrieval", "options": {"collection": "notes"}}})
    run = read_events(base, doc["events_url"])
    assert run.text("b").startswith("Searched 1 documents for: keepalive, password.\n[1] Keepalive notes (keepalive.txt)")
    assert "hunter2" not in run.text("b")

    doc = create(base, {"prompt": "anything", "b": {"task": "retrieval", "options": {"collection": "missing"}}})
    run = read_events(base, doc["events_url"])
    [err] = run.of("error")
    assert err.data == {"source": "b", "code": "bad_collection", "message": "no collection 'missing' under the configured documents root"}
    assert run.events[-1].data == {"status": "failed"}


def test_unknown_task_lists_the_user_task(live: tuple[Stack, FakeOpenAI]) -> None:
    s, _ = live
    r = httpx.post(s.apis[0].url + "/v1/streams", json={"prompt": "x", "b": {"task": "nope"}}, timeout=5)
    assert r.status_code == 422
    assert {"openai", "retrieval", "simulated"} <= set(r.json()["error"]["details"]["known"])
