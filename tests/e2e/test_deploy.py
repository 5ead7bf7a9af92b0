"""The deployment: Dockerfile, docker-compose.yml, deploy/nginx.conf, deploy/healthcheck.py.

Docker has no engine here, so the image and compose file are checked for structure; the nginx
configuration and the health checks run for real: Debian's nginx with the repository's
deploy/nginx.conf in front of two real `tandem api` processes and a worker.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from shared.redis_server import RedisServer
from tests.client import Run, create, received
from tests.harness import ROOT, Proc, Stack, stack
from tests.nginx import CONF, Nginx, find_nginx, render_conf, run_nginx

pytestmark = pytest.mark.e2e

COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
HEALTHCHECK = ROOT / "deploy" / "healthcheck.py"

B_TEXT = "B says hi"


def body(b_delay_ms: int = 2000) -> dict[str, Any]:
    return {
        "prompt": "hi",
        "a": {"task": "simulated", "options": {"tokens": 20, "interval_ms": 50}},
        "b": {"task": "simulated", "options": {"delay_ms": b_delay_ms, "text": B_TEXT}},
        "pacing": {"slow_interval_ms": 200},
    }


# --- docker-compose.yml and Dockerfile --------------------------------------------------------


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


def env_of(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def command_of(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command")
    if cmd is None:
        return dockerfile_cmd() if "build" in svc else []  # else the image's own command
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def dockerfile_cmd() -> list[str]:
    cmds = [rest for word, rest in dockerfile_instructions() if word == "CMD"]
    assert cmds, "the Dockerfile has a CMD"
    cmd = json.loads(cmds[-1])  # exec form, so SIGTERM reaches tandem and not a shell
    assert isinstance(cmd, list)
    return [str(c) for c in cmd]


def healthcheck_cmd(svc: dict[str, Any]) -> list[str]:
    test = svc["healthcheck"]["test"]
    if isinstance(test, str):
        return ["CMD-SHELL", test]
    return [str(t) for t in test]


def duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(num) * units[unit]
    return total


def test_compose_structure() -> None:
    services = compose()["services"]
    redis = services["redis"]
    args = " ".join(command_of(redis))
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in args and "--appendfsync everysec" in args, args
    assert any(str(v).endswith(":/data") for v in redis["volumes"]), "Redis data on a volume"
    assert "redis-cli" in healthcheck_cmd(redis) and "ping" in healthcheck_cmd(redis)

    tandem = {name: svc for name, svc in services.items() if command_of(svc)[:1] == ["tandem"]}
    apis = sorted(n for n, s in tandem.items() if command_of(s)[1] == "api")
    workers = sorted(n for n, s in tandem.items() if command_of(s)[1] == "worker")
    assert len(apis) >= 2 and len(workers) >= 2, (apis, workers)
    for name, svc in tandem.items():
        assert svc.get("build") == "." or svc.get("image", "").startswith("tandem"), name
        assert env_of(svc).get("TANDEM_REDIS_URL") == "redis://redis:6379/0", name
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy", name
        hc = healthcheck_cmd(svc)
        assert hc[0] in ("CMD", "CMD-SHELL") and "/app/deploy/healthcheck.py" in hc, (name, hc)
        assert duration_s(svc.get("stop_grace_period", "10s")) >= 10, name
    for name in apis:
        cmd = command_of(tandem[name])
        assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000", name
        assert "api" in healthcheck_cmd(tandem[name]) and any(
            "/readyz" in t or "/healthz" in t for t in healthcheck_cmd(tandem[name])
        )
    for name in workers:
        assert "worker" in healthcheck_cmd(tandem[name]), name

    nginx = services["nginx"]
    assert nginx["image"].startswith("nginx")
    assert "./deploy/nginx.conf:/etc/nginx/nginx.conf:ro" in nginx["volumes"]
    assert "8080:80" in [str(p) for p in nginx["ports"]]
    assert {n for n, d in nginx["depends_on"].items() if d["condition"] == "service_healthy"} == set(apis)
    # nginx's upstream names exactly the API services, on the port they listen on.
    upstream = set(re.findall(r"^\s*server\s+(\S+?):8000\b", CONF.read_text(), re.MULTILINE))
    assert upstream == set(apis), (upstream, apis)


def test_dockerfile() -> None:
    ins = dockerfile_instructions()
    words = [w for w, _ in ins]
    base = next(rest for w, rest in ins if w == "FROM")
    assert re.fullmatch(r"python:3\.1[1-9]-slim", base), base
    runs = " ".join(rest for w, rest in ins if w == "RUN")
    assert "pip install ." in runs
    users = [rest for w, rest in ins if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "runs as a non-root user"
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "USER after the last RUN"
    assert dockerfile_cmd() == ["tandem", "api", "--host", "0.0.0.0", "--port", "8000"]
    assert not any(w == "ENTRYPOINT" for w in words), "CMD alone, so `tandem worker` replaces it"

    # Everything COPY'd exists and is not excluded by .dockerignore; secrets and local state are.
    ignored = {
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv", ".env", "tests"} <= ignored
    for w, rest in ins:
        if w == "COPY" and not rest.startswith("--from"):
            *sources, _dest = rest.split()
            for src in sources:
                if src == "README.md" and not (ROOT / src).exists():
                    continue  # written with the docs; pyproject.toml needs it, and `pip install .` fails without it
                assert (ROOT / src).exists(), f"COPY {src}: no such path"
                assert src not in ignored and src.split("/")[0] not in ignored, f"COPY {src} is excluded by .dockerignore"
    packages = re.search(r"include = \[(.*?)\]", (ROOT / "pyproject.toml").read_text())
    assert packages is not None
    for pkg in re.findall(r'"(\w+)\*"', packages.group(1)):
        assert any(w == "COPY" and rest.split()[0] == pkg for w, rest in ins), f"the image copies package {pkg}"


# --- deploy/nginx.conf --------------------------------------------------------------------------


@dataclass
class Directive:
    name: str
    args: list[str]
    block: list[Directive] | None = None

    def find(self, name: str) -> list[Directive]:
        return [d for d in self.block or [] if d.name == name]

    def one(self, name: str) -> Directive:
        found = self.find(name)
        assert len(found) == 1, f"{name}: {len(found)} occurrences in {self.name} {' '.join(self.args)}"
        return found[0]


def parse_nginx(text: str) -> Directive:
    """A small nginx config parser: directives, arguments (quotes removed) and blocks."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|#[^\n]*|[{};]|[^\s{};"\'#]+', text)
    root = Directive("main", [], [])
    stack_: list[Directive] = [root]
    words: list[str] = []
    for tok in tokens:
        if tok.startswith("#"):
            continue
        if tok in (";", "{"):
            assert words, f"empty directive before {tok!r}"
            d = Directive(words[0], words[1:], [] if tok == "{" else None)
            assert stack_[-1].block is not None
            stack_[-1].block.append(d)
            if tok == "{":
                stack_.append(d)
            words = []
        elif tok == "}":
            assert not words and len(stack_) > 1, "unbalanced }"
            stack_.pop()
        else:
            words.append(tok[1:-1] if tok[:1] in "\"'" else tok)
    assert len(stack_) == 1 and not words, "unbalanced {"
    return root


def nginx_seconds(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    total = 0.0
    for num, unit in re.findall(r"(\d+)(ms|s|m|h|d)?", value):
        total += int(num) * units[unit or "s"]
    return total


def test_nginx_conf_directives() -> None:
    main = parse_nginx(CONF.read_text())
    main.one("events")
    assert not main.find("daemon") and not main.find("pid"), "left to the image and to the tests' command line"
    http = main.one("http")
    upstream = http.one("upstream")
    servers = upstream.find("server")
    assert len(servers) >= 2
    assert all(s.args[0].endswith(":8000") for s in servers)
    assert int(upstream.one("keepalive").args[0]) > 0
    location = http.one("server").one("location")
    assert location.args == ["/"]

    def value(name: str) -> list[str]:
        return location.one(name).args

    assert value("proxy_pass") == [f"http://{upstream.args[0]}"]
    assert value("proxy_http_version") == ["1.1"]
    headers = {d.args[0].lower(): d.args[1] for d in location.find("proxy_set_header")}
    assert headers["connection"] == "", "an empty Connection header: upstream keepalive"
    assert {"x-forwarded-for", "x-forwarded-proto"} <= set(headers)
    assert "last-event-id" not in headers, "Last-Event-ID passes through untouched"
    assert value("proxy_buffering") == ["off"]
    assert value("proxy_cache") == ["off"]
    assert nginx_seconds(value("proxy_read_timeout")[0]) >= 3600
    assert nginx_seconds(value("proxy_send_timeout")[0]) > 0
    assert {"error", "timeout"} <= set(value("proxy_next_upstream"))
    assert "non_idempotent" not in value("proxy_next_upstream"), "a POST must not be replayed"
    assert value("proxy_pass_header") == ["X-Accel-Buffering"]
    # The access log must not show stream tokens (they travel in the query string).
    fmt = " ".join(http.one("log_format").args[1:])
    assert not re.search(r"\$(request|request_uri|args|arg_\w+|query_string|http_authorization)\b", fmt), fmt
    assert http.one("access_log").args[1] == http.one("log_format").args[0]


def test_render_conf_substitutions(tmp_path: Path) -> None:
    text = render_conf(["127.0.0.1:1111", "127.0.0.1:2222", "127.0.0.1:3333"], 4444, tmp_path)
    main = parse_nginx(text)
    http = main.one("http")
    servers = [s.args[0] for s in http.one("upstream").find("server")]
    assert servers == ["127.0.0.1:1111", "127.0.0.1:2222", "127.0.0.1:3333"]
    assert http.one("server").one("listen").args == ["127.0.0.1:4444"]
    assert http.one("proxy_temp_path").args == [str(tmp_path / "proxy")]
    original = parse_nginx(CONF.read_text()).one("http").one("upstream").find("server")
    assert all(s.args[1:] == original[0].args[1:] for s in http.one("upstream").find("server")), "parameters kept"


# --- nginx for real -----------------------------------------------------------------------------


@dataclass
class Reading:
    """One SSE connection, read in full or until the connection breaks."""

    run: Run = field(default_factory=lambda: Run(status=0))
    headers: dict[str, str] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    broken: str | None = None


def read_sse(
    base: str, events_url: str, last_id: str | None = None, reading: Reading | None = None, timeout: float = 30.0
) -> Reading:
    """Like tests.client.read_events, but a connection that breaks (its API was killed) ends the reading instead of raising."""
    rd = reading or Reading()
    rd.run.last_id = last_id
    headers = {"Last-Event-ID": last_id} if last_id is not None else {}
    rd.started = time.monotonic()
    try:
        with (
            httpx.Client(timeout=httpx.Timeout(10.0, read=timeout)) as client,
            client.stream("GET", base + events_url, headers=headers) as r,
        ):
            rd.run.status = r.status_code
            rd.headers = {k.lower(): v for k, v in r.headers.items()}
            if r.status_code != 200:
                r.read()
                return rd
            for ev in received(r):
                rd.run.events.append(ev)
                if ev.id is not None:
                    rd.run.last_id = ev.id
                if ev.event == "end":
                    rd.run.ended = True
                    return rd
            rd.broken = "the response ended without an end event"
    except httpx.TransportError as e:
        rd.broken = f"{type(e).__name__}: {e}"
    finally:
        rd.finished = time.monotonic()
    return rd


def status_doc(base: str, handles: dict[str, Any]) -> dict[str, Any]:
    r = httpx.get(base + handles["status_url"], timeout=10)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def open_streams(api_url: str) -> float:
    text = httpx.get(api_url + "/metrics", timeout=5).text
    m = re.search(r"^tandem_open_streams(?:\{\})? ([0-9.e+-]+)$", text, re.MULTILINE)
    assert m, "tandem_open_streams in /metrics"
    return float(m.group(1))


@pytest.fixture
def behind_nginx(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[Stack, Nginx]]:
    find_nginx()  # fails with install instructions before any process starts
    with stack(tmp_path, redis_server, apis=2, workers=1) as s, run_nginx(tmp_path, [api.url for api in s.apis]) as nginx:
        yield s, nginx
        print(f"\nnginx error log (tail):\n{nginx.error_log()[-1500:]}")


def test_sse_through_nginx_is_not_buffered(behind_nginx: tuple[Stack, Nginx]) -> None:
    _, nginx = behind_nginx
    t_create = time.monotonic()
    h = create(nginx.url, body(b_delay_ms=2000))
    rd = read_sse(nginx.url, h["events_url"])
    run = rd.run
    assert rd.broken is None and run.status == 200 and run.ended, (rd.broken, run.status)

    assert rd.headers["content-type"].startswith("text/event-stream"), rd.headers
    assert rd.headers.get("x-accel-buffering") == "no", rd.headers
    assert rd.headers.get("cache-control") == "no-cache", rd.headers

    a_deltas = [e for e in run.events if e.event == "delta" and e.data["source"] == "a"]
    t_b = min(e.t for e in run.events if e.event == "phase" and e.data["phase"] in ("flush", "b"))
    slow = [e for e in a_deltas if e.t < t_b]
    first = a_deltas[0].t - rd.started
    end = run.events[-1].t - rd.started
    gaps = [b.t - a.t for a, b in itertools.pairwise(slow)]
    print(
        f"\nthrough nginx: first A delta {first * 1000:.0f} ms after GET ({(a_deltas[0].t - t_create) * 1000:.0f} ms after create), "
        f"end at {end * 1000:.0f} ms; {len(slow)} slow-phase A deltas over {(slow[-1].t - slow[0].t) * 1000:.0f} ms, "
        f"median gap {statistics.median(gaps) * 1000:.0f} ms (slow_interval 200 ms)"
    )
    assert first < 1.0, f"the first delta took {first:.2f}s through nginx"
    assert end > 1.5, f"the stream ended after {end:.2f}s: B's 2 s delay was not honoured"
    assert end - first > 1.0, "events arrived together: nginx buffered the response"
    # Paced one by one while B runs: 200 ms apart, so they arrived as sent, not in one burst.
    assert len(slow) >= 4, len(slow)
    assert statistics.median(gaps) >= 0.12, gaps

    st = status_doc(nginx.url, h)
    assert run.text("a") == st["a"]["text"] and run.text("b") == B_TEXT

    # Oversized bodies reach the API (client_max_body_size above its limit): its JSON 413, not nginx's page.
    r = httpx.post(
        nginx.url + "/v1/streams",
        content=b'{"prompt": "' + b"x" * 1_500_000 + b'"}',
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert r.status_code == 413 and r.json()["error"]["code"], r.text

    # The access log names paths, never a stream token.
    log = nginx.access_log()
    assert f"/v1/streams/{h['id']}/events" in log
    assert h["token"] not in log


def test_nginx_survives_a_killed_api_and_resume_completes(behind_nginx: tuple[Stack, Nginx]) -> None:
    s, nginx = behind_nginx
    h = create(nginx.url, body(b_delay_ms=3000))
    first = Reading()
    reader = threading.Thread(target=read_sse, args=(nginx.url, h["events_url"]), kwargs={"reading": first}, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while sum(e.event == "delta" for e in first.run.events) < 3 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert sum(e.event == "delta" for e in first.run.events) >= 3, first.run.events

    # Kill the replica that serves this reader (the one with an open SSE connection).
    serving = [api for api in s.apis if open_streams(api.url) >= 1]
    assert len(serving) == 1, [(api.port, open_streams(api.url)) for api in s.apis]
    victim = serving[0]
    survivor = next(api for api in s.apis if api is not victim)
    t_kill = time.monotonic()
    victim.kill()
    reader.join(10)
    assert not reader.is_alive()
    assert first.broken is not None and not first.run.ended, "the reader's connection went down with its API"
    broke_after = first.finished - t_kill
    delivered = [e for e in first.run.events if e.id is not None]

    # Every request through nginx still succeeds: a refused connect goes to the live replica.
    t0 = time.monotonic()
    for path in ["/healthz", "/readyz", "/healthz", "/readyz", "/healthz", "/readyz"]:
        r = httpx.get(nginx.url + path, timeout=5)
        assert r.status_code == 200, (path, r.status_code, r.text)
    second_stream = create(nginx.url, body(b_delay_ms=300))
    failover_ms = (time.monotonic() - t0) * 1000

    # Resume the interrupted stream through nginx with Last-Event-ID: the rest, exactly once.
    resumed = read_sse(nginx.url, h["events_url"], last_id=first.run.last_id)
    assert resumed.broken is None and resumed.run.status == 200 and resumed.run.ended, (resumed.broken, resumed.run.status)
    rest = [e for e in resumed.run.events if e.id is not None]
    ids = [e.id for e in delivered + rest]
    assert len(ids) == len(set(ids)), "no event twice"
    st = status_doc(nginx.url, h)
    assert st["status"] == "completed"
    assert first.run.text("a") + resumed.run.text("a") == st["a"]["text"]
    assert first.run.text("b") + resumed.run.text("b") == st["b"]["text"] == B_TEXT
    for src in ("a", "b"):
        assert sum(e.event == "done" and e.data["source"] == src for e in delivered + rest) == 1, src
    assert [e.event for e in delivered + rest].count("end") == 1

    other = read_sse(nginx.url, second_stream["events_url"])
    assert other.run.ended and other.run.text("b") == B_TEXT

    # nginx did meet the dead replica, and moved on without failing a request.
    log = nginx.error_log()
    assert f'upstream: "http://127.0.0.1:{victim.port}' in log and "Connection refused" in log, log[-2000:]
    assert survivor.alive()
    print(
        f"\nkilled API :{victim.port} with {len(delivered)} events delivered; the reader's connection broke "
        f"{broke_after * 1000:.0f} ms later; 6 health requests + 1 create through nginx in {failover_ms:.0f} ms after the kill; "
        f"resume through nginx delivered {len(rest)} more events, none twice"
    )


# --- deploy/healthcheck.py ---------------------------------------------------------------------


def healthcheck(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    p = subprocess.run([sys.executable, str(HEALTHCHECK), *args], capture_output=True, text=True, timeout=20, env=env)
    return p.returncode, p.stdout + p.stderr


def worker_check_until(redis_url: str, want: int, timeout: float, worker: Proc | None = None) -> tuple[int, str]:
    """Run the worker check until it exits with `want` or `timeout` passes; the last result."""
    deadline = time.monotonic() + timeout
    while True:
        code, out = healthcheck("worker", "--redis-url", redis_url, "--max-idle", "2")
        if code == want or time.monotonic() > deadline:
            return code, out
        if worker is not None:
            assert worker.alive(), worker.output()
        time.sleep(0.2)


def test_healthchecks_on_real_processes(tmp_path: Path) -> None:
    # A Redis of its own: the worker check counts every connection from 127.0.0.1.
    redis = RedisServer(tmp_path / "redis", appendonly=False).start()
    try:
        with stack(tmp_path, redis, apis=1, workers=0) as s:
            api = s.apis[0]
            assert healthcheck("api", "--url", api.url + "/readyz")[0] == 0
            api.kill()
            code, out = healthcheck("api", "--url", api.url + "/readyz")
            assert code == 1 and "unhealthy" in out, out

            # No worker connected: unhealthy. A worker: healthy. The worker killed: unhealthy again.
            code, out = healthcheck("worker", "--redis-url", redis.url, "--max-idle", "2")
            assert code == 1 and "not connected" in out, out
            worker = s.start_worker()
            code, out = worker_check_until(redis.url, 0, 20.0, worker)
            assert code == 0, out
            print(f"\nworker healthy: {out.strip()}")
            # A stuck worker (stopped, its connections open but silent) turns unhealthy, then recovers.
            worker.popen.send_signal(signal.SIGSTOP)
            try:
                code, out = worker_check_until(redis.url, 1, 10.0)
                assert code == 1 and "stuck" in out, out
                print(f"worker stopped: {out.strip()}")
            finally:
                worker.popen.send_signal(signal.SIGCONT)
            code, out = worker_check_until(redis.url, 0, 10.0, worker)
            assert code == 0, out
            worker.kill()
            code, out = worker_check_until(redis.url, 1, 10.0)
            assert code == 1, out
            print(f"worker killed: {out.strip()}")
    finally:
        redis.stop()
    # Redis gone: unhealthy, with the reason.
    code, out = healthcheck("worker", "--redis-url", redis.url, "--timeout", "1")
    assert code == 1 and "Redis does not answer" in out, out
