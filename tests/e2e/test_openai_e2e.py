"""The `openai` task end to end: real `tandem api` and `tandem worker` processes against the fake
OpenAI-compatible server. A and B on two fake models; every failure code as an `error` event
followed by B and `end`; an unknown backend refused at create time; cancel closing the upstream
connection within a second, measured at the fake server."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from shared.redis_server import RedisServer
from tests.client import Run, create, read_events
from tests.fake_openai import CUT_AFTER, FakeOpenAI
from tests.harness import Stack, stack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer, fake: FakeOpenAI) -> Iterator[Stack]:
    env = {
        "TANDEM_OPENAI_BASE_URL": fake.url,
        "TANDEM_OPENAI_API_KEY": "sk-e2e",
        "TANDEM_BACKENDS": json.dumps({"second": {"base_url": fake.url, "api_key_env": "SECOND_KEY", "model": "slow"}}),
        "SECOND_KEY": "sk-second",
        "TANDEM_UPSTREAM_READ_TIMEOUT_S": "1.5",  # the slow model is silent for 0.6 s
        "TANDEM_UPSTREAM_BACKOFF_S": "0.05",
    }
    with stack(tmp_path_factory.mktemp("openai-e2e"), redis_server, apis=1, workers=1, **env) as s:
        yield s


def transcript(run: Run) -> str:
    return "\n".join(f"{e.event:6} {e.id or '-':>22}  {json.dumps(e.data)}" for e in run.events)


def check_shape(run: Run) -> None:
    """The contract: every A event before every B event, one terminal event each, `end` last."""
    assert run.ended and run.events[-1].event == "end"
    sources = [e.data["source"] for e in run.events if e.event in ("delta", "done", "error")]
    assert sources == sorted(sources), "a B event came before an A event"
    for src in ("a", "b"):
        assert len([e for e in run.events if e.event in ("done", "error") and e.data["source"] == src]) == 1


def test_a_and_b_on_two_fake_models(live: Stack, fake: FakeOpenAI) -> None:
    base = live.apis[0].url
    doc = create(base, {
        "prompt": "How does tandem resume a stream?",
        "a": {"task": "openai", "options": {"model": "fast", "system": "Answer in one sentence."}},
        "b": {"task": "openai", "options": {"backend": "second"}},  # its default model: slow
        "pacing": {"slow_interval_ms": 250},
    })
    run = read_events(base, doc["events_url"])
    print("\n" + transcript(run))
    check_shape(run)
    assert run.events[-1].data == {"status": "completed"}
    assert run.text("a") == fake.expected_text("fast")
    assert run.text("b") == fake.expected_text("slow")
    done = {e.data["source"]: e.data for e in run.of("done")}
    assert done["a"]["finish_reason"] == "stop" and done["a"]["model"] == "fast" and done["a"]["backend"] == "default"
    assert done["a"]["usage"]["completion_tokens"] == done["a"]["tokens"] == len(fake.expected_text("fast").split())
    assert done["b"]["model"] == "slow" and done["b"]["backend"] == "second" and done["b"]["usage"]["prompt_tokens"] == 6
    phases = [e.data["phase"] for e in run.of("phase")]
    assert phases == ["slow", "flush", "b"]  # A paced while B ran, flushed the moment B was done
    a_rec = [r for r in fake.requests_for("fast") if r.body["messages"][-1]["content"] == "How does tandem resume a stream?"][-1]
    assert a_rec.headers["authorization"] == "Bearer sk-e2e"
    assert a_rec.body["messages"][0] == {"role": "system", "content": "Answer in one sentence."}
    assert fake.requests_for("slow")[-1].headers["authorization"] == "Bearer sk-second"
    status = httpx.get(base + doc["status_url"], timeout=5).json()
    assert status["status"] == "completed" and status["a"]["text"] == run.text("a")


@pytest.mark.parametrize(
    ("model", "code", "partial"),
    [
        ("401", "upstream_auth", 0),
        ("429", "upstream_rate_limited", 0),
        ("hang", "upstream_timeout", 0),
        ("500", "upstream_error", 0),
        ("cut", "upstream_error", CUT_AFTER),
        ("garbage", "upstream_bad_response", 0),
        ("no-such-model", "upstream_rejected", 0),
    ],
)
def test_failure_is_an_error_event_then_b_and_end(live: Stack, fake: FakeOpenAI, model: str, code: str, partial: int) -> None:
    base = live.apis[0].url
    doc = create(base, {
        "prompt": f"fail with {model}",
        "a": {"task": "openai", "options": {"model": model}},
        "b": {"task": "simulated", "options": {"text": "B still arrives."}},
        "pacing": {"slow_interval_ms": 0},
    })
    run = read_events(base, doc["events_url"])
    check_shape(run)
    [err] = run.of("error")
    assert err.data["source"] == "a" and err.data["code"] == code, err.data
    assert "sk-e2e" not in err.data["message"]
    assert len([e for e in run.of("delta") if e.data["source"] == "a"]) == partial
    assert run.text("b") == "B still arrives."
    kinds = [e.event for e in run.events if e.event != "phase"]
    assert kinds[kinds.index("error") + 1 :] == ["delta"] * 3 + ["done", "end"]
    assert run.events[-1].data == {"status": "failed"}


def test_unknown_backend_or_url_option_is_a_422(live: Stack) -> None:
    base = live.apis[0].url
    for options, words in [
        ({"backend": "nope", "model": "fast"}, "no backend named 'nope'; configured backends: default, second"),
        ({"model": "fast", "base_url": "http://elsewhere/v1"}, "base_url"),
        ({}, "model is required"),
    ]:
        r = httpx.post(base + "/v1/streams", json={"prompt": "x", "a": {"task": "openai", "options": options}}, timeout=5)
        assert r.status_code == 422, r.text
        err: dict[str, Any] = r.json()["error"]
        assert err["code"] == "invalid_options" and words in json.dumps(err), err


def test_cancel_closes_the_upstream_connection_within_a_second(live: Stack, fake: FakeOpenAI) -> None:
    base = live.apis[0].url
    prompt = f"cancel me {time.time()}"
    doc = create(base, {
        "prompt": prompt,
        "a": {"task": "openai", "options": {"model": "endless"}},
        "b": {"task": "simulated", "options": {"delay_ms": 60_000, "text": "never"}},
    })
    deadline = time.monotonic() + 15
    rec = None
    while time.monotonic() < deadline:
        rec = next((r for r in fake.requests_for("endless") if r.body["messages"][-1]["content"] == prompt), None)
        if rec is not None and rec.tokens_sent >= 5:
            break
        time.sleep(0.02)
    assert rec is not None and rec.tokens_sent >= 5, "the endless stream never got going"
    t0 = time.monotonic()
    r = httpx.delete(base + doc["status_url"], timeout=5)
    assert r.status_code < 300, r.text
    closed = rec.wait_closed(5.0)
    assert closed is not None, "the upstream connection was not closed"
    print(f"\nupstream connection closed {1000 * (closed - t0):.0f} ms after DELETE (sent {rec.tokens_sent} tokens)")
    assert closed - t0 < 1.0
    run = read_events(base, doc["events_url"])
    check_shape(run)
    assert run.events[-1].data == {"status": "cancelled"}
