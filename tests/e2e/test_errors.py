"""Every row of the contract's error table, on real processes, each with the JSON error shape."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.redis_server import RedisServer, free_port
from tests.client import create, read_events
from tests.harness import Stack, stack

pytestmark = pytest.mark.e2e

GOOD = {"prompt": "hi", "a": {"task": "simulated", "options": {"tokens": 3, "interval_ms": 0}}, "b": {"task": "simulated", "options": {"tokens": 1}}}


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    err: dict[str, Any] = r.json()["error"]
    assert isinstance(err["code"], str) and isinstance(err["message"], str) and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Any:
    with stack(tmp_path_factory.mktemp("errors"), redis_server, apis=1, workers=1, TANDEM_MAX_BODY_BYTES="2048") as s:
        yield s


def test_400_malformed_last_event_id(one: Stack) -> None:
    base = one.apis[0].url
    h = create(base, GOOD)
    for bad in ["garbage", "a-1", "c-1-1", "a-01-1", "x" * 65]:
        assert_error(httpx.get(base + h["events_url"], headers={"Last-Event-ID": bad}), 400, "bad_last_event_id")
        assert_error(httpx.get(base + h["events_url"] + f"&last_event_id={bad}"), 400, "bad_last_event_id")


def test_401_missing_token(one: Stack) -> None:
    base = one.apis[0].url
    h = create(base, GOOD)
    for method, path in [("GET", f"/v1/streams/{h['id']}/events"), ("GET", f"/v1/streams/{h['id']}"), ("DELETE", f"/v1/streams/{h['id']}")]:
        assert_error(httpx.request(method, base + path), 401, "token_required")


def test_403_wrong_token(one: Stack) -> None:
    base = one.apis[0].url
    h = create(base, GOOD)
    other = create(base, GOOD)
    assert_error(httpx.get(base + f"/v1/streams/{h['id']}?token={other['token']}"), 403, "token_invalid")
    assert_error(httpx.get(base + f"/v1/streams/{h['id']}/events", headers={"Authorization": "Bearer nope"}), 403)
    assert_error(httpx.delete(base + f"/v1/streams/{h['id']}?token=nope"), 403)
    # The right token as a bearer header works too.
    assert httpx.get(base + f"/v1/streams/{h['id']}", headers={"Authorization": f"Bearer {h['token']}"}).status_code == 200


def test_404_unknown_stream(one: Stack) -> None:
    base = one.apis[0].url
    for sid in ["doesnotexist", "a" * 22, "%7Bbad%7D"]:
        assert_error(httpx.get(base + f"/v1/streams/{sid}?token=x"), 404, "stream_not_found")
        assert_error(httpx.get(base + f"/v1/streams/{sid}/events?token=x"), 404, "stream_not_found")
    assert_error(httpx.get(base + "/nowhere"), 404)


def test_413_body_too_large(one: Stack) -> None:
    base = one.apis[0].url
    big = {"prompt": "x" * 5000}
    assert_error(httpx.post(base + "/v1/streams", json=big), 413, "body_too_large")

    def chunks() -> Any:  # no Content-Length: the limit holds while reading
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    assert_error(httpx.post(base + "/v1/streams", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert httpx.get(base + "/healthz").status_code == 200


@pytest.mark.parametrize(
    ("payload", "code", "needle"),
    [
        ({}, "invalid_request", "prompt"),
        ({"prompt": ""}, "invalid_request", "prompt"),
        ({"prompt": 3}, "invalid_request", "prompt"),
        ({"prompt": "x", "a": {"task": "nope"}}, "unknown_task", "simulated"),
        ({"prompt": "x", "a": {"task": "simulated", "options": {"tokens": -1}}}, "invalid_options", "a.options.tokens"),
        ({"prompt": "x", "b": {"task": "simulated", "options": {"bogus": 1}}}, "invalid_options", "b.options.bogus"),
        ({"prompt": "x", "pacing": {"slow_interval_ms": 60001}}, "invalid_request", "slow_interval_ms"),
        ({"prompt": "x", "pacing": {"b_interval_ms": -1}}, "invalid_request", "b_interval_ms"),
        ({"prompt": "x", "a": {"task": "workers.job:run_source"}}, "unknown_task", "known tasks"),
    ],
)
def test_422_validation(one: Stack, payload: dict[str, Any], code: str, needle: str) -> None:
    err = assert_error(httpx.post(one.apis[0].url + "/v1/streams", json=payload), 422, code)
    assert needle in err["message"]


def test_422_not_json(one: Stack) -> None:
    r = httpx.post(one.apis[0].url + "/v1/streams", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(r, 422, "invalid_request")


def test_429_over_open_stream_limit(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_MAX_STREAMS_PER_PROCESS="2") as s:
        base = s.apis[0].url
        slow = {"prompt": "x", "a": {"task": "simulated", "options": {"tokens": 5, "delay_ms": 10_000}}}
        handles = [create(base, slow) for _ in range(3)]
        with httpx.Client(timeout=10) as c, c.stream("GET", base + handles[0]["events_url"]) as r0, c.stream(
            "GET", base + handles[1]["events_url"]
        ) as r1:
            assert r0.status_code == r1.status_code == 200
            r = c.get(base + handles[2]["events_url"])
            assert_error(r, 429, "too_many_streams")
            assert r.headers["Retry-After"] == "1"
        # Once those close (the server notices within moments), the same request is served.
        deadline = time.monotonic() + 5
        while True:
            with httpx.Client(timeout=10) as c, c.stream("GET", base + handles[2]["events_url"]) as r2:
                if r2.status_code == 200:
                    break
                assert r2.status_code == 429 and time.monotonic() < deadline
            time.sleep(0.05)


def test_401_403_api_key(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1, TANDEM_API_KEY="sekrit") as s:
        base = s.apis[0].url
        assert_error(httpx.post(base + "/v1/streams", json=GOOD), 401, "api_key_required")
        assert_error(httpx.post(base + "/v1/streams", json=GOOD, headers={"Authorization": "Bearer wrong"}), 403, "api_key_invalid")
        h = create(base, GOOD, headers={"Authorization": "Bearer sekrit"})
        assert read_events(base, h["events_url"]).ended


def test_503_redis_unavailable(tmp_path: Path) -> None:
    """An API whose Redis is not there answers 503 with the JSON shape and keeps running."""
    dead = RedisServer(tmp_path / "none", port=free_port())  # never started
    s = Stack(tmp_path, dead)
    try:
        api = s.start_api(wait=False)
        from tests.harness import wait_ready

        wait_ready(api, path="/healthz")
        assert_error(httpx.get(api.url + "/readyz"), 503, "redis_unavailable")
        assert_error(httpx.post(api.url + "/v1/streams", json=GOOD, timeout=15), 503, "redis_unavailable")
        assert_error(httpx.get(api.url + "/v1/streams/abc?token=x", timeout=15), 503, "redis_unavailable")
        assert api.alive()
        # Redis comes up on that port: the same process recovers by itself.
        dead.start()
        from tests.harness import wait_ready as wr

        wr(api, timeout=20)
        assert httpx.post(api.url + "/v1/streams", json=GOOD, timeout=10).status_code == 201
    finally:
        s.stop()
        dead.stop()
