"""Real processes for tests: a private redis-server, `tandem api` and `tandem worker`.

Nothing here touches a Redis on 6379: every Redis is started on a free port in a temp dir, and
every test run uses its own key prefix.
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from shared.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent


def tandem_env(redis_url: str, prefix: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TANDEM_")}
    env |= {"TANDEM_REDIS_URL": redis_url, "TANDEM_KEY_PREFIX": prefix, "TANDEM_QUEUE_NAME": f"{prefix}:queue"}
    env |= extra
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path
    port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: no clean-up at all, as a crash or an OOM kill would leave it."""
        if self.alive():
            self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def term(self, timeout: float = 15.0) -> float:
        """SIGTERM and wait; returns how long the process took to exit."""
        t0 = time.monotonic()
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        return time.monotonic() - t0

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Stack:
    """A Redis plus any number of API and worker processes sharing one key prefix."""

    tmp: Path
    redis: RedisServer
    prefix: str = field(default_factory=lambda: f"t{secrets.token_hex(4)}")
    env_extra: dict[str, str] = field(default_factory=dict)
    apis: list[Proc] = field(default_factory=list)
    workers: list[Proc] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        return tandem_env(self.redis.url, self.prefix, **self.env_extra)

    def _spawn(self, name: str, args: list[str], port: int | None = None, env: dict[str, str] | None = None) -> Proc:
        log = self.tmp / f"{name}.log"
        fh = log.open("ab")
        popen = subprocess.Popen(
            [sys.executable, "-m", "cli", *args], cwd=ROOT, env=env or self.env, stdout=fh, stderr=subprocess.STDOUT
        )
        fh.close()
        return Proc(name, popen, log, port)

    def start_api(self, port: int | None = None, wait: bool = True, **env: str) -> Proc:
        port = port or free_port()
        proc = self._spawn(f"api{len(self.apis)}-{port}", ["api", "--port", str(port)], port, {**self.env, **env})
        self.apis.append(proc)
        if wait:
            wait_ready(proc)
        return proc

    def start_worker(self, **env: str) -> Proc:
        proc = self._spawn(f"worker{len(self.workers)}", ["worker"], env={**self.env, **env})
        self.workers.append(proc)
        return proc

    def stop(self) -> None:
        for p in [*self.apis, *self.workers]:
            if p.alive():
                p.popen.send_signal(signal.SIGKILL)
                p.popen.wait(10)


def redis_connections(r: redis.Redis, role: str, pid: int) -> int:
    """Connections Redis lists under the name tandem gives a process's clients: `tandem-<role>:<host>:<pid>`."""
    clients: list[dict[str, object]] = r.client_list()  # type: ignore[assignment]
    names = (str(c.get("name", "")) for c in clients)
    return sum(1 for n in names if n.startswith(f"tandem-{role}:") and n.endswith(f":{pid}"))


def wait_ready(proc: Proc, timeout: float = 20.0, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.output()[-3000:]}")
        try:
            if httpx.get(proc.url + path, timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} not ready in {timeout}s:\n{proc.output()[-3000:]}")


@contextmanager
def stack(tmp: Path, redis: RedisServer, apis: int = 1, workers: int = 1, **env: str) -> Iterator[Stack]:
    s = Stack(tmp, redis, env_extra=env)
    try:
        for _ in range(workers):
            s.start_worker()
        for _ in range(apis):
            s.start_api()
        yield s
    finally:
        s.stop()
