"""OpenAI-compatible backends: their configuration, and one streaming Chat Completions call.

A backend is a name an operator configures (``TANDEM_OPENAI_BASE_URL`` is the one named
``default``; ``TANDEM_BACKENDS`` adds more). A request names a backend, never a URL or a key.

The client is httpx (the worker's shared ``AsyncClient``) with a small SSE reader of our own: one
endpoint, our own timeouts, and retries that stop at the first token, so nothing is ever repeated.
Every failure becomes a :class:`~workers.task.TaskError` with one of the stable codes below.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson

from shared.settings import Settings
from workers.task import TaskError

log = logging.getLogger("tandem.upstream")

DEFAULT_BACKEND = "default"
BACKEND_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_KEYLIKE = re.compile(r"\b(?:sk|gsk)[-_][A-Za-z0-9_\-*.]{6,}")
MAX_LINE_BYTES = 1 << 20  # one SSE line; a longer one is a bad response, not a memory problem
MAX_ERROR_BODY = 16_384
DRAIN_S = 0.5  # longest wait for the end of the body after [DONE]

# The stable error codes of upstream failures.
AUTH = "upstream_auth"  # 401, 403, or a key variable that is not set
RATE_LIMITED = "upstream_rate_limited"  # 429
TIMEOUT = "upstream_timeout"  # connect, read or pool timeout
ERROR = "upstream_error"  # 5xx, connection errors, a stream cut before [DONE], an error chunk
BAD_RESPONSE = "upstream_bad_response"  # not SSE, a chunk that is not JSON, no `choices`
REJECTED = "upstream_rejected"  # any other 4xx: unknown model, context too long, bad parameter

RETRYABLE = frozenset({RATE_LIMITED, TIMEOUT, ERROR})


class BackendConfigError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    base_url: str
    api_key: str | None = None  # given directly (the default backend's TANDEM_OPENAI_API_KEY)
    api_key_env: str | None = None  # or the variable to read it from, on the worker
    model: str | None = None  # used when a request names no model
    include_usage: bool = True  # ask for the usage chunk (stream_options.include_usage)

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + "/chat/completions"

    def key(self) -> str | None:
        if self.api_key_env is None:
            return self.api_key
        value = os.environ.get(self.api_key_env)
        if not value:
            raise TaskError(AUTH, f"backend {self.name!r}: the worker has no {self.api_key_env} set for its API key")
        return value


def load_backends(settings: Settings) -> dict[str, Backend]:
    """The configured backends by name. Runs at start-up; a bad TANDEM_BACKENDS fails it there."""
    key = settings.openai_api_key.get_secret_value() if settings.openai_api_key is not None else None
    out = {DEFAULT_BACKEND: Backend(DEFAULT_BACKEND, _check_url(DEFAULT_BACKEND, settings.openai_base_url), key or None, None, settings.openai_model)}
    for name, spec in settings.backends.items():
        out[name] = _backend_from_spec(name, spec)
    return out


def _backend_from_spec(name: str, spec: Mapping[str, Any]) -> Backend:
    if not BACKEND_NAME.match(name):
        raise BackendConfigError(f"TANDEM_BACKENDS: backend name {name!r} must match {BACKEND_NAME.pattern}")
    unknown = set(spec) - {"base_url", "api_key_env", "model", "include_usage"}
    if unknown:
        raise BackendConfigError(f"TANDEM_BACKENDS[{name!r}]: unknown keys {sorted(unknown)}; known: base_url, api_key_env, model, include_usage")
    base_url = spec.get("base_url")
    if not isinstance(base_url, str):
        raise BackendConfigError(f"TANDEM_BACKENDS[{name!r}]: base_url is required, e.g. http://localhost:11434/v1")
    key_env = spec.get("api_key_env")
    if key_env is not None and (not isinstance(key_env, str) or not ENV_NAME.match(key_env)):
        raise BackendConfigError(f"TANDEM_BACKENDS[{name!r}]: api_key_env must name an environment variable")
    model = spec.get("model")
    if model is not None and (not isinstance(model, str) or not model):
        raise BackendConfigError(f"TANDEM_BACKENDS[{name!r}]: model must be a non-empty string")
    usage = spec.get("include_usage", True)
    if not isinstance(usage, bool):
        raise BackendConfigError(f"TANDEM_BACKENDS[{name!r}]: include_usage must be true or false")
    return Backend(name, _check_url(name, base_url), None, key_env, model, usage)


def _check_url(name: str, url: str) -> str:
    parsed = httpx.URL(url)
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise BackendConfigError(f"backend {name!r}: base_url {url!r} must be an http(s) URL such as http://localhost:11434/v1")
    return url


# -- one call ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Policy:
    connect_s: float
    read_s: float
    retries: int
    backoff_s: float
    backoff_max_s: float

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(s.upstream_connect_timeout_s, s.upstream_read_timeout_s, s.upstream_retries, s.upstream_backoff_s, s.upstream_backoff_max_s)

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(connect=self.connect_s, read=self.read_s, write=self.read_s, pool=self.connect_s)

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, self.backoff_max_s)
        base: float = min(self.backoff_s * (2.0**attempt), self.backoff_max_s)
        return base * random.uniform(0.5, 1.0)


@dataclass(slots=True)
class Piece:
    """What one chunk of the stream carried that a task cares about."""

    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None


class _Failure(Exception):
    def __init__(self, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after = code, message, retry_after


@asynccontextmanager
async def _client(http: httpx.AsyncClient | None) -> AsyncIterator[httpx.AsyncClient]:
    if http is not None:
        yield http
        return
    async with httpx.AsyncClient() as own:
        yield own


async def stream_chat(
    http: httpx.AsyncClient | None, backend: Backend, payload: dict[str, Any], policy: Policy
) -> AsyncGenerator[Piece, None]:
    """POST a streaming chat completion and yield its pieces as they arrive.

    Failures before the first text are retried (with backoff) up to ``policy.retries`` times;
    after it, never: the text already went to readers. Closing this generator closes the HTTP
    response, and so the upstream connection, at once.
    """
    headers = {"Accept": "text/event-stream"}
    key = backend.key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    body = orjson.dumps(payload)
    headers["Content-Type"] = "application/json"
    attempt = 0
    async with _client(http) as client:
        while True:
            produced = False
            try:
                async with client.stream("POST", backend.url, content=body, headers=headers, timeout=policy.timeout()) as resp:
                    if resp.status_code != 200:
                        raise await _status_failure(backend, resp)
                    ctype = resp.headers.get("content-type", "")
                    if not ctype.startswith("text/event-stream") and "json" in ctype:
                        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} answered {ctype}, not an event stream")
                    finished = False
                    async with aclosing(_sse_data(resp)) as messages:
                        async for data in messages:
                            if data == "[DONE]":
                                finished = True
                                continue  # what follows is only the end of the body, read briefly
                            piece = _piece(backend, data)
                            if piece.finish_reason is not None:
                                finished = True
                            if piece.text:
                                produced = True
                            yield piece
                    if not finished:
                        raise _Failure(ERROR, f"backend {backend.name!r} ended the stream before it was complete")
                return
            except _Failure as e:
                failure = e
            except httpx.TimeoutException as e:
                failure = _Failure(TIMEOUT, f"backend {backend.name!r}: {_timeout_kind(e)} timed out")
            except httpx.HTTPError as e:
                failure = _Failure(ERROR, f"backend {backend.name!r}: the connection failed or dropped ({type(e).__name__}: {e})")
            if produced or failure.code not in RETRYABLE or attempt >= policy.retries:
                log.warning("upstream failed", extra={"backend": backend.name, "code": failure.code, "attempts": attempt + 1})
                raise TaskError(failure.code, failure.message)
            delay = policy.delay(attempt, failure.retry_after)
            log.info("upstream retry", extra={"backend": backend.name, "code": failure.code, "delay_s": round(delay, 3)})
            attempt += 1
            await asyncio.sleep(delay)


def _timeout_kind(e: httpx.TimeoutException) -> str:
    if isinstance(e, httpx.ConnectTimeout):
        return "connecting"
    if isinstance(e, httpx.PoolTimeout):
        return "waiting for a free connection"
    if isinstance(e, httpx.WriteTimeout):
        return "sending the request"
    return "waiting for the response"


async def _status_failure(backend: Backend, resp: httpx.Response) -> _Failure:
    raw = b""
    async for part in resp.aiter_bytes():
        raw += part
        if len(raw) >= MAX_ERROR_BODY:
            break
    detail = _error_message(raw[:MAX_ERROR_BODY])
    status = resp.status_code
    if status in (401, 403):  # the server's own text may quote the key: not passed on
        return _Failure(AUTH, f"backend {backend.name!r} answered {status}: the API key was refused or lacks access")
    where = f"backend {backend.name!r} answered {status}" + (f": {detail}" if detail else "")
    if status == 429:
        return _Failure(RATE_LIMITED, where, _retry_after(resp.headers.get("retry-after")))
    if 400 <= status < 500:
        return _Failure(REJECTED, where)
    return _Failure(ERROR, where, _retry_after(resp.headers.get("retry-after")) if status == 503 else None)


def _error_message(raw: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, else the start of the body; key-like
    words (``sk-...``) are masked."""
    return _KEYLIKE.sub("[redacted]", _raw_error_message(raw))


def _raw_error_message(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw.decode("utf-8", "replace").strip()[:300]
    if isinstance(doc, dict):
        err = doc.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            return str(err["message"])[:300]
        if isinstance(err, str):
            return err[:300]
    return raw.decode("utf-8", "replace").strip()[:300]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _piece(backend: Backend, data: str) -> Piece:
    try:
        doc = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent a chunk that is not JSON: {data[:100]!r}") from None
    if not isinstance(doc, dict):
        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent a chunk that is not a JSON object")
    if "error" in doc:
        detail = _error_message(orjson.dumps(doc))
        raise _Failure(ERROR, f"backend {backend.name!r} reported an error mid-stream: {detail}")
    piece = Piece(usage=_usage(doc.get("usage")))
    choices = doc.get("choices")
    if not isinstance(choices, list):
        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent a chunk without choices")
    if not choices:
        if piece.usage is None:
            raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent a chunk with no choices and no usage")
        return piece
    choice = choices[0]
    if not isinstance(choice, dict):
        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent a choice that is not an object")
    reason = choice.get("finish_reason")
    piece.finish_reason = reason if isinstance(reason, str) and reason else None
    delta = choice.get("delta")
    if delta is None and piece.finish_reason is not None:
        return piece  # a last chunk with only its finish_reason: some servers leave the delta out
    if not isinstance(delta, dict):
        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent a choice without a delta")
    content = delta.get("content")
    if content is not None and not isinstance(content, str):
        raise _Failure(BAD_RESPONSE, f"backend {backend.name!r} sent non-text content")
    piece.text = content or ""
    return piece


def _usage(raw: Any) -> dict[str, int] | None:
    if not isinstance(raw, dict):
        return None
    out = {k: raw[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if isinstance(raw.get(k), int)}
    return out or None


async def _sse_data(resp: httpx.Response) -> AsyncGenerator[str, None]:
    """The `data` of each SSE message (multi-line data joined by LF); other fields are ignored.

    After `[DONE]` the rest of the body (normally just its end) is read for at most DRAIN_S, so a
    keep-alive connection goes back to the pool instead of being closed; then the stream ends.
    """
    chunks = resp.aiter_bytes()
    buf = b""
    data: list[str] = []
    async for part in chunks:
        buf += part
        while (nl := buf.find(b"\n")) >= 0:
            line, buf = buf[:nl].rstrip(b"\r").decode("utf-8", "replace"), buf[nl + 1 :]
            if line:
                _add_data(line, data)
                continue
            if not data:
                continue
            message, data = "\n".join(data), []
            yield message
            if message == "[DONE]":
                with contextlib.suppress(TimeoutError, httpx.HTTPError):
                    async with asyncio.timeout(DRAIN_S):
                        async for _ in chunks:
                            pass
                return
        if len(buf) > MAX_LINE_BYTES:
            raise _Failure(BAD_RESPONSE, "a line of the event stream is longer than 1 MiB")
    if buf:
        _add_data(buf.rstrip(b"\r").decode("utf-8", "replace"), data)
    if data:
        yield "\n".join(data)


def _add_data(line: str, data: list[str]) -> None:
    """One non-empty SSE line: keep a `data` field's value; comments (keepalives) and other fields go."""
    field, _, value = line.partition(":")
    if field == "data":
        data.append(value[1:] if value.startswith(" ") else value)
