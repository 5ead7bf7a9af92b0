"""The `openai` task against the fake OpenAI-compatible server: text, usage, every failure code,
retries only before the first token, backends, and closing the upstream connection on cancel."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import Any, cast

import httpx
import pytest
from pydantic import ValidationError

from shared.redis_server import free_port
from shared.settings import Settings
from tests.fake_openai import CUT_AFTER, MODELS, FakeOpenAI
from workers.backends import BackendConfigError, Policy, _error_message, load_backends
from workers.registry import load_registry
from workers.task import Task, TaskContext, TaskError
from workers.tasks.openai import make_task


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


def make_settings(fake: FakeOpenAI, **kw: Any) -> Settings:
    base: dict[str, Any] = {
        "openai_base_url": fake.url,
        "openai_api_key": "sk-test",
        "upstream_backoff_s": 0.01,
        "upstream_read_timeout_s": 0.5,
        "upstream_connect_timeout_s": 0.5,
    }
    return Settings(_env_file=None, **(base | kw))  # type: ignore[call-arg]


@pytest.fixture
def cfg(fake: FakeOpenAI) -> Settings:
    return make_settings(fake)


async def collect(task: Task[Any], options: dict[str, Any], settings: Settings, http: httpx.AsyncClient | None = None, prompt: str = "hello there") -> tuple[list[str], TaskContext, TaskError | None]:
    ctx = TaskContext("s1", "a", settings, http=http)
    chunks: list[str] = []
    try:
        async for chunk in task.run(prompt, task.options.model_validate(options), ctx):
            chunks.append(chunk)
    except TaskError as e:
        return chunks, ctx, e
    return chunks, ctx, None


async def test_streams_text_with_usage_and_finish_reason(fake: FakeOpenAI, cfg: Settings) -> None:
    task = make_task(cfg)
    before = len(fake.requests_for("fast"))
    chunks, ctx, err = await collect(task, {"model": "fast"}, cfg, prompt="Explain Redis streams")
    assert err is None
    assert chunks == MODELS["fast"].tokens()  # one delta per upstream token, the role-only chunk skipped
    n = len(chunks)
    assert ctx.result == {
        "model": "fast",
        "backend": "default",
        "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
        "finish_reason": "stop",
    }
    [rec] = fake.requests_for("fast")[before:]
    assert rec.path == "/v1/chat/completions"
    assert rec.headers["authorization"] == "Bearer sk-test"
    assert rec.body == {
        "model": "fast",
        "messages": [{"role": "user", "content": "Explain Redis streams"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def test_options_reach_the_request(fake: FakeOpenAI, cfg: Settings) -> None:
    task = make_task(cfg)
    opts = {"model": "fast", "system": "Be brief.", "max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "seed": 7}
    chunks, ctx, err = await collect(task, opts, cfg)
    assert err is None
    assert "".join(chunks) == fake.expected_text("fast", max_tokens=5)
    assert ctx.result["finish_reason"] == "length"
    assert ctx.result["usage"]["completion_tokens"] == 5
    body = fake.requests_for("fast")[-1].body
    assert body["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}]
    assert {k: body[k] for k in ("max_tokens", "temperature", "top_p", "stop", "seed")} == {
        "max_tokens": 5, "temperature": 0.2, "top_p": 0.9, "stop": ["\n\n"], "seed": 7,
    }


async def test_deltas_stream_as_they_are_produced(fake: FakeOpenAI, cfg: Settings) -> None:
    task = make_task(cfg)
    ctx = TaskContext("s1", "a", cfg)
    times = []
    async for _ in task.run("hi", task.options.model_validate({"model": "fast"}), ctx):
        times.append(time.monotonic())
    # 18 tokens 10 ms apart upstream: received spread out, not in one lump at the end
    assert times[-1] - times[0] >= 0.6 * MODELS["fast"].interval_s * (len(times) - 1)


@pytest.mark.parametrize(
    ("model", "code", "attempts"),
    [
        ("401", "upstream_auth", 1),
        ("403", "upstream_auth", 1),
        ("429", "upstream_rate_limited", 3),
        ("500", "upstream_error", 3),
        ("503", "upstream_error", 3),
        ("cut_early", "upstream_error", 3),  # dropped before any text: safe to retry
        ("hang", "upstream_timeout", 3),
        ("garbage", "upstream_bad_response", 1),
        ("nochoices", "upstream_bad_response", 1),
        ("json", "upstream_bad_response", 1),
        ("400", "upstream_rejected", 1),
        ("no-such-model", "upstream_rejected", 1),  # the fake answers 404 as OpenAI does
    ],
)
async def test_failure_codes(fake: FakeOpenAI, cfg: Settings, model: str, code: str, attempts: int) -> None:
    task = make_task(cfg)
    before = len(fake.requests_for(model))
    chunks, ctx, err = await collect(task, {"model": model}, cfg)
    assert err is not None, chunks
    assert err.code == code, err.message
    assert "backend 'default'" in err.message and fake.url not in err.message
    assert "sk-test" not in err.message and "sk-wrong" not in err.message  # the fake's 401 text quotes a key
    assert chunks == [] and ctx.result == {}
    assert len(fake.requests_for(model)) - before == attempts  # upstream_retries=2: retryable codes are tried 3 times


@pytest.mark.parametrize(("model", "code"), [("cut", "upstream_error"), ("stall", "upstream_timeout"), ("error_chunk", "upstream_error")])
async def test_no_retry_after_the_first_token(fake: FakeOpenAI, cfg: Settings, model: str, code: str) -> None:
    task = make_task(cfg)
    before = len(fake.requests_for(model))
    chunks, _, err = await collect(task, {"model": model}, cfg)
    assert err is not None and err.code == code, err
    assert chunks == MODELS["fast"].tokens()[:CUT_AFTER]  # what was produced stays; nothing is repeated
    assert len(fake.requests_for(model)) - before == 1


async def test_retry_before_the_first_token_then_success(fake: FakeOpenAI, cfg: Settings) -> None:
    fake.script("other", "500", "429")
    task = make_task(cfg)
    before = len(fake.requests_for("other"))
    chunks, ctx, err = await collect(task, {"model": "other"}, cfg)
    assert err is None
    assert "".join(chunks) == fake.expected_text("other")  # exactly once
    assert [r.behaviour for r in fake.requests_for("other")[before:]] == ["500", "429", "ok"]
    assert ctx.result["finish_reason"] == "stop"


async def test_retries_are_bounded_by_settings(fake: FakeOpenAI) -> None:
    settings = make_settings(fake, upstream_retries=0)
    task = make_task(settings)
    before = len(fake.requests_for("500"))
    _, _, err = await collect(task, {"model": "500"}, settings)
    assert err is not None and err.code == "upstream_error"
    assert len(fake.requests_for("500")) - before == 1


async def test_connection_refused_is_upstream_error(fake: FakeOpenAI) -> None:
    settings = make_settings(fake, openai_base_url=f"http://127.0.0.1:{free_port()}/v1")
    _, _, err = await collect(make_task(settings), {"model": "fast"}, settings)
    assert err is not None and err.code == "upstream_error"
    assert "connection failed" in err.message


async def test_connect_timeout_is_upstream_timeout_and_retried(fake: FakeOpenAI, cfg: Settings) -> None:
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        raise httpx.ConnectTimeout("timed out", request=request)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        _, _, err = await collect(make_task(cfg), {"model": "fast"}, cfg, http=http)
    assert err is not None and err.code == "upstream_timeout"
    assert "connecting" in err.message
    assert len(calls) == 3


async def test_sse_reader_handles_fragments_crlf_comments_and_utf8(cfg: Settings) -> None:
    def chunk(content: str) -> str:
        return json.dumps({"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}, ensure_ascii=False)

    wire = (
        ": keepalive\r\n\r\n"
        f"data: {chunk('')}\r\n\r\n"
        f"event: message\r\nid: 1\r\ndata: {chunk('héllo ')}\r\n\r\n"
        f"data: {chunk('wörld 🚀')}\n\n"
        'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        'data: {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}}\n\n'
        "data: [DONE]\n\n"
    ).encode()

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(wire), 7):  # splits lines, and multi-byte characters, across reads
            yield wire[i : i + 7]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=pieces())

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        chunks, ctx, err = await collect(make_task(cfg), {"model": "fast"}, cfg, http=http)
    assert err is None
    assert chunks == ["héllo ", "wörld 🚀"]
    assert ctx.result["usage"] == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert ctx.result["finish_reason"] == "stop"


def test_upstream_error_text_is_passed_on_with_keys_masked() -> None:
    body = b'{"error": {"message": "Invalid key sk-proj-abc123XYZ for a key-value store", "type": "invalid_request_error"}}'
    assert _error_message(body) == "Invalid key [redacted] for a key-value store"
    assert _error_message(b"<html>Bad Gateway</html>") == "<html>Bad Gateway</html>"


def test_policy_backoff_grows_and_is_capped() -> None:
    p = Policy(connect_s=1, read_s=1, retries=5, backoff_s=0.5, backoff_max_s=3)
    assert 0.25 <= p.delay(0, None) <= 0.5
    assert 1.0 <= p.delay(2, None) <= 2.0
    assert 1.5 <= p.delay(6, None) <= 3.0
    assert p.delay(0, 1.25) == 1.25  # Retry-After is honoured ...
    assert p.delay(0, 60) == 3  # ... up to the cap


# -- backends and options ------------------------------------------------------------------------


def test_options_know_the_configured_backends(fake: FakeOpenAI) -> None:
    settings = make_settings(fake, backends={"local": {"base_url": fake.url, "model": "other"}})
    opts = make_task(settings).options
    assert opts.model_validate({"backend": "local"}).model_dump(exclude_unset=True) == {"backend": "local"}
    with pytest.raises(ValidationError, match=r"no backend named 'nope'; configured backends: default, local"):
        opts.model_validate({"backend": "nope", "model": "x"})
    with pytest.raises(ValidationError, match=r"model is required: backend 'default' has no default model"):
        opts.model_validate({})
    for bad in ({"model": "fast", "base_url": "http://evil"}, {"model": "fast", "api_key": "k"}, {"model": "fast", "temperature": 3},
                {"model": "fast", "stop": []}, {"model": "fast", "max_tokens": 0}):
        with pytest.raises(ValidationError):
            opts.model_validate(bad)


def test_registry_has_the_openai_task(fake: FakeOpenAI) -> None:
    registry = load_registry(make_settings(fake))
    assert {"simulated", "openai"} <= set(registry)


def test_backends_from_the_environment(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_OPENAI_BASE_URL", "http://localhost:11434/v1")
    monkeypatch.setenv("TANDEM_OPENAI_MODEL", "llama3.2")
    monkeypatch.setenv("TANDEM_BACKENDS", '{"openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY", "model": "gpt-4o-mini"}}')
    backends = load_backends(Settings(_env_file=None))  # type: ignore[call-arg]
    assert backends["default"].url == "http://localhost:11434/v1/chat/completions"
    assert backends["default"].model == "llama3.2" and backends["default"].api_key is None
    assert backends["openai"].api_key_env == "OPENAI_API_KEY" and backends["openai"].model == "gpt-4o-mini"


@pytest.mark.parametrize(
    "spec",
    [{"base_url": "localhost:11434"}, {"model": "x"}, {"base_url": "http://h/v1", "key": "sk"}, {"base_url": "http://h/v1", "api_key_env": "no spaces"}],
)
def test_bad_backend_config_fails_at_start_up(fake: FakeOpenAI, spec: dict[str, Any]) -> None:
    with pytest.raises(BackendConfigError):
        load_backends(make_settings(fake, backends={"b": spec}))


async def test_named_backend_uses_its_default_model_and_key_variable(fake: FakeOpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = make_settings(fake, backends={"local": {"base_url": fake.url, "api_key_env": "FAKE_LOCAL_KEY", "model": "other"}})
    task = make_task(settings)
    before = len(fake.records)
    _, _, err = await collect(task, {"backend": "local"}, settings)
    assert err is not None and err.code == "upstream_auth" and "FAKE_LOCAL_KEY" in err.message
    assert len(fake.records) == before  # no request without its key

    monkeypatch.setenv("FAKE_LOCAL_KEY", "sk-local")
    chunks, ctx, err = await collect(task, {"backend": "local"}, settings)
    assert err is None and "".join(chunks) == fake.expected_text("other")
    rec = fake.records[-1]
    assert rec.body["model"] == "other" and rec.headers["authorization"] == "Bearer sk-local"
    assert ctx.result["backend"] == "local"


async def test_backend_without_usage_support(fake: FakeOpenAI) -> None:
    settings = make_settings(fake, backends={"old": {"base_url": fake.url, "include_usage": False}})
    chunks, ctx, err = await collect(make_task(settings), {"backend": "old", "model": "fast"}, settings)
    assert err is None and chunks
    assert "stream_options" not in fake.records[-1].body
    assert "usage" not in ctx.result and ctx.result["finish_reason"] == "stop"


# -- cancel ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shared_client", [False, True])
async def test_closing_the_generator_closes_the_upstream_connection(fake: FakeOpenAI, cfg: Settings, shared_client: bool) -> None:
    task = make_task(cfg)
    async with httpx.AsyncClient() as shared:
        ctx = TaskContext("s1", "a", cfg, http=shared if shared_client else None)
        gen = cast(AsyncGenerator[str, None], task.run("go", task.options.model_validate({"model": "endless"}), ctx))
        for _ in range(3):
            await gen.__anext__()
        rec = fake.requests_for("endless")[-1]
        t0 = time.monotonic()
        await gen.aclose()
        closed = await asyncio.to_thread(rec.wait_closed, 1.0)
    assert closed is not None, "the fake server never saw the connection close"
    print(f"upstream closed {1000 * (closed - t0):.1f} ms after aclose()")
    assert closed - t0 < 1.0
    assert rec.finished is None


async def test_cancelling_the_consumer_closes_the_upstream_connection(fake: FakeOpenAI, cfg: Settings) -> None:
    task = make_task(cfg)
    got: list[str] = []
    three = asyncio.Event()

    async def consume() -> None:  # as the arq job does: iterate, and aclose in a finally
        gen = cast(AsyncGenerator[str, None], task.run("go", task.options.model_validate({"model": "endless"}), TaskContext("s1", "a", cfg)))
        try:
            async for chunk in gen:
                got.append(chunk)
                if len(got) == 3:
                    three.set()
        finally:
            await gen.aclose()

    before = len(fake.requests_for("endless"))
    job = asyncio.create_task(consume())
    await asyncio.wait_for(three.wait(), 10)
    rec = fake.requests_for("endless")[before]
    t0 = time.monotonic()
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    closed = await asyncio.to_thread(rec.wait_closed, 1.0)
    assert closed is not None and closed - t0 < 1.0
    print(f"upstream closed {1000 * (closed - t0):.1f} ms after cancel")


# -- after [DONE] ----------------------------------------------------------------------------------


def sse(*datas: str) -> bytes:
    return b"".join(b"data: " + d.encode() + b"\n\n" for d in datas)


ONE_TOKEN = sse(
    json.dumps({"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]}),
    json.dumps({"choices": [{"index": 0, "finish_reason": "stop"}]}),  # no delta: accepted on a last chunk
    "[DONE]",
)


async def test_a_body_that_does_not_end_after_done_does_not_hold_the_task(cfg: Settings) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield ONE_TOKEN
        await asyncio.sleep(30)  # a server that keeps the body open after [DONE]
        yield b"data: ignored\n\n"

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=body())

    t0 = time.monotonic()
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
        chunks, ctx, err = await collect(make_task(cfg), {"model": "fast"}, cfg, http=http)
    assert err is None and chunks == ["hi"] and ctx.result["finish_reason"] == "stop"
    assert time.monotonic() - t0 < 2.0


async def test_keep_alive_connection_is_reused_after_done(fake: FakeOpenAI) -> None:
    """A server that keeps connections open (as OpenAI does): two streams, one TCP connection."""
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(ONE_TOKEN), ONE_TOKEN))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = make_settings(fake, openai_base_url=f"http://127.0.0.1:{port}/v1")
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(2):
                chunks, _, err = await collect(make_task(settings), {"model": "m"}, settings, http=http)
                assert err is None and chunks == ["hi"]
    finally:
        server.close()
        await server.wait_closed()
    assert connections == 1
