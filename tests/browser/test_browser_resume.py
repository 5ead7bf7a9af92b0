"""A real browser through the real proxy: headless Chromium's own EventSource resumes a stream on
the other replica after the one serving it is SIGKILLed.

nginx runs the repository's deploy/nginx.conf in front of two `tandem api` processes, with one
extra `location` that serves tests/browser/resume_page.html, so the page and the API share one
origin (a plain EventSource, no CORS). The page collects every event by id in JS.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from shared.cursor import Cursor
from shared.redis_server import RedisServer, free_port
from tests.browser.chromium import browser_page
from tests.client import create
from tests.e2e.test_faults_api import body, metric, wait_until
from tests.harness import stack
from tests.nginx import CONF, Nginx, _args, find_nginx, render_conf

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

PAGE = Path(__file__).with_name("resume_page.html")
PAGE_PATH = "/resume-test.html"


@contextmanager
def nginx_with_page(tmp: Path, upstreams: list[str]) -> Iterator[Nginx]:
    """deploy/nginx.conf as tests/nginx.py runs it, plus `location = /resume-test.html` served from
    a directory nginx's unprivileged workers can read."""
    exe = find_nginx()
    d = tmp / "nginx"
    d.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="tandem-nginx-"))
    temp.chmod(0o755)
    pages = temp / "pages"
    pages.mkdir()
    pages.chmod(0o755)
    shutil.copy(PAGE, pages / PAGE_PATH.lstrip("/"))
    (pages / PAGE_PATH.lstrip("/")).chmod(0o644)
    marker = "        location / {"
    text = CONF.read_text()
    assert text.count(marker) == 1, "deploy/nginx.conf: expected one `location / {`"
    src = d / "nginx.src.conf"
    src.write_text(text.replace(marker, f"        location = {PAGE_PATH} {{\n            root {pages};\n        }}\n\n{marker}"))
    port = free_port()
    hostports = [u.removeprefix("http://") for u in upstreams]
    (d / "nginx.conf").write_text(render_conf(hostports, port, temp, src=src))
    check = subprocess.run([*_args(exe, d), "-t"], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    with (d / "access.log").open("ab") as out:
        popen = subprocess.Popen(_args(exe, d), stdout=out, stderr=subprocess.STDOUT, cwd=d)
    nginx = Nginx(d, port, popen, temp)
    try:
        wait_until(lambda: httpx.get(nginx.url + PAGE_PATH, timeout=1).status_code == 200, 10, "nginx serves the page")
        yield nginx
    finally:
        nginx.stop()


def js(page: Any, expr: str) -> Any:
    return page.evaluate(f"() => {expr}")


def test_browser_eventsource_resumes_on_the_other_replica(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=2, workers=2) as s, nginx_with_page(tmp_path, [a.url for a in s.apis]) as nginx:
        h = create(
            nginx.url,
            body({"tokens": 80, "interval_ms": 40}, {"delay_ms": 4000, "text": "Sources: one two three four five six"}, slow=150, b_spacing=100),
        )
        with browser_page() as page:
            page.goto(nginx.url + PAGE_PATH + "?events=" + urllib.parse.quote(h["events_url"], safe=""))
            page.wait_for_function("() => window.result && window.result.ids.length >= 6", timeout=20_000)
            serving = [a for a in s.apis if metric(a.url, "tandem_open_streams") == 1]
            assert len(serving) == 1, [metric(a.url, "tandem_open_streams") for a in s.apis]
            victim = serving[0]
            before = js(page, "window.result.ids.length")
            killed_at = time.time() * 1000
            victim.kill()
            page.wait_for_function("() => window.result.ended && window.result.closedAt !== null", timeout=40_000)
            time.sleep(2.5)  # were it to reconnect again, it would within the retry interval (1 s)
            r = js(page, "window.result")
            state = js(page, "window.es.readyState")
        status = httpx.get(nginx.url + h["status_url"], timeout=10).json()
        reconnect_ms = r["opens"][1] - killed_at
        first_event_ms = r["firstAfter"][1] - killed_at
        keys = [Cursor.parse(i).key for i in r["ids"]]
        log204 = [ln for ln in nginx.access_log().splitlines() if "/events " in ln and '" 204 ' in ln]
        print(f"\nSIGKILLed {victim.name} after {before} events; the browser reopened {reconnect_ms:.0f} ms later "
              f"(first event {first_event_ms:.0f} ms after the kill) on the other replica; "
              f"{len(r['ids'])} events, {len(r['dupes'])} repeated; opens {len(r['opens'])}, "
              f"metas {r['metas']}; after `end`: 204, readyState {state}, "
              f"closed {r['closedAt'] - r['endAt']:.0f} ms after end")
        assert r["dupes"] == [], "the page saw an event twice"
        assert keys == sorted(keys), "ids went backwards"
        assert r["text"]["a"] == status["a"]["text"] and r["text"]["b"] == status["b"]["text"]
        assert r["status"] == "completed" and r["kinds"][-1] == "end"
        assert len(r["opens"]) == 2, "one open, one reopen after the kill: nothing after end"
        assert r["opens"][1] < r["endAt"]
        assert state == 2, "EventSource CLOSED after the 204"
        assert r["errors"][-1]["state"] == 2
        assert log204, "the reconnect after end got 204 through nginx"
        assert reconnect_ms < 10_000
        assert not victim.alive()
