"""Configuration, read once per process from ``TANDEM_*`` variables (and ``.env``) and passed in."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TANDEM_", env_file=".env", extra="ignore")

    # Redis. Unset means: `tandem up` starts an embedded server; `api`/`worker` use DEFAULT_REDIS_URL.
    redis_url: str | None = None
    key_prefix: str = Field("tandem", pattern=r"^[A-Za-z0-9_.\-]{1,32}$")
    redis_pool_size: int = Field(6, ge=2, le=64)  # pooled connections per API process (plus the hub's and the multiplexed one)
    redis_socket_timeout_s: float = Field(15.0, gt=0)

    # SSE
    sse_ping_s: float = Field(15.0, gt=0)
    sse_retry_ms: int = Field(1000, ge=0)
    sse_send_timeout_s: float = Field(30.0, gt=0)
    sse_shutdown_grace_s: float = Field(3.0, ge=0)
    read_batch: int = Field(512, ge=1, le=10_000)  # entries per catch-up XRANGE and per-source buffer cap
    slow_buffer: int = Field(32, ge=1, le=10_000)  # A's entries a connection holds while B runs (the rest waits in Redis)

    # Requests and limits
    max_body_bytes: int = Field(1_048_576, ge=1024)
    max_prompt_chars: int = Field(100_000, ge=1)
    max_streams_per_process: int = Field(20_000, ge=1)  # open SSE connections; beyond: 429
    api_key: str | None = None  # when set, POST /v1/streams needs `Authorization: Bearer <api_key>`

    # Lifetimes
    retention_s: int = Field(3600, ge=1)
    max_stream_s: int = Field(3600, ge=1)  # longest a source may run; also arq's job timeout
    max_source_events: int = Field(100_000, ge=2)
    lease_s: float = Field(10.0, gt=0)

    # Defaults for a create request that leaves them out
    default_task_a: str = "simulated"
    default_task_b: str = "simulated"
    default_slow_interval_ms: int = Field(250, ge=0, le=60_000)
    default_b_interval_ms: int = Field(0, ge=0, le=60_000)

    # Workers
    worker_max_jobs: int = Field(100, ge=1)
    worker_poll_delay_s: float = Field(0.02, gt=0)  # arq polls its queue (and the abort set) this often: job start latency
    # Most jobs a worker holds claimed but not started yet: a burst of new streams is shared between
    # the workers, each taking what it can start, instead of going to whichever polled first.
    worker_prefetch: int = Field(1000, ge=1)
    # Pooled Redis connections per worker process (plus its append pipe's own). Commands wait for a
    # free one; without a bound a worker starting a burst of jobs opens one per command in flight.
    worker_redis_pool_size: int = Field(64, ge=2, le=1024)
    worker_drain_s: float = Field(default=8.0, ge=0)  # on SIGTERM, running sources get this long to finish; then worker_lost
    orphan_s: float = Field(default=0.0, ge=0)  # cancel a running stream no SSE reader has had open for this long (0 = off)
    append_max_batch: int = Field(256, ge=1, le=10_000)  # most deltas in one XADD round trip
    append_window_ms: float = Field(2.0, ge=0, le=1000)  # a worker writes its appends at most once per window
    # Niceness a worker gives itself at start. On a host it shares with a saturated API, 10 lets the
    # API have a core first (token latency), at the cost of slower job starts in a burst (README).
    worker_nice: int = Field(0, ge=0, le=19)
    queue_name: str = "tandem:queue"
    # Extra tasks by import path: "pkg.module:TASK,other.module:TASK" (or a JSON list).
    tasks: Annotated[list[str], NoDecode] = []

    # -- OpenAI-compatible backends of the built-in `openai` task (workers/backends.py, docs/tasks.md) --
    # The backend named "default" is TANDEM_OPENAI_BASE_URL + TANDEM_OPENAI_API_KEY (+ TANDEM_OPENAI_MODEL).
    # TANDEM_BACKENDS adds named ones, as JSON; keys are read from the named variable on the worker:
    #   {"fast": {"base_url": "http://vllm:8000/v1", "api_key_env": "FAST_KEY", "model": "optional default"}}
    # API and workers must see the same backend names (the API rejects an unknown one with a 422).
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str | None = None  # default model of the "default" backend
    backends: dict[str, dict[str, str | bool | None]] = {}
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_read_timeout_s: float = Field(default=120.0, gt=0)  # longest wait for the response or between two chunks
    upstream_retries: int = Field(default=2, ge=0, le=10)  # extra attempts, only while no token was produced
    upstream_backoff_s: float = Field(default=0.5, ge=0)  # delay before the first retry; doubles on each one
    upstream_backoff_max_s: float = Field(default=8.0, ge=0)  # cap on one delay, Retry-After included

    # Worker observability: each worker serves its own /metrics (0 = off); if the port is taken (several
    # workers on one host), the next free one of port+1..port+15 is used and shown by `tandem stats`.
    worker_metrics_port: int = Field(default=0, ge=0, le=65535)
    worker_metrics_host: str = "0.0.0.0"
    worker_heartbeat_s: float = Field(default=5.0, gt=0)  # how often a worker records itself for `tandem stats`

    # Logs
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_json: bool = False

    @field_validator("tasks", mode="before")
    @classmethod
    def _task_list(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            if v.startswith("["):
                return json.loads(v)
            return [p.strip() for p in v.split(",") if p.strip()]
        return v

    @field_validator("redis_url")
    @classmethod
    def _blank_is_unset(cls, v: str | None) -> str | None:
        return v or None

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or DEFAULT_REDIS_URL
