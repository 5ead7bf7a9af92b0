"""The demo page in headless Chromium: a real stream, paced, flushed, dropped and resumed.

Needs Debian's /usr/bin/chromium and Python playwright (no `playwright install`): without them the
test fails and says what to install. Leaves a screenshot in tests/artifacts/demo.png.
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from statistics import median
from typing import Any

import httpx
import pytest

from shared.redis_server import RedisServer
from tests.browser.chromium import browser_page
from tests.harness import ROOT, stack
from workers.tasks.simulated import split_tokens

pytestmark = pytest.mark.browser

SCREENSHOT = ROOT / "tests" / "artifacts" / "demo.png"
A_TOKENS, A_INTERVAL_MS = 30, 40
B_DELAY_MS = 2500
B_TEXT = "Sources: the Redis streams guide; XADD, XRANGE and XREAD reference pages."
SLOW_MS = 200

STATE_JS = """() => {
  const s = window.tandemDemo.state;
  return {
    handles: s.handles, count: s.count, text: s.text, duplicates: s.duplicates, resumes: s.resumes,
    connections: s.connections, status: s.status, flushAt: s.flushAt, deltas: s.deltas, marks: s.marks,
    statusDoc: s.statusDoc, pixels: window.tandemDemo.timelinePixels(),
  };
}"""


def test_demo_page_streams_paces_flushes_and_resumes(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1) as s, browser_page() as page:
        api = s.apis[0].url
        problems: list[str] = []
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)

        resp = page.goto(api + "/")
        assert resp is not None and resp.status == 200
        assert "default-src 'self'" in resp.headers["content-security-policy"]
        assert httpx.get(api + "/static/demo.js", timeout=5).status_code == 200
        assert httpx.get(api + "/static/secrets.txt", timeout=5).status_code == 404

        page.fill("#prompt", "Explain Redis streams")
        page.fill("#a-tokens", str(A_TOKENS))
        page.fill("#a-interval", str(A_INTERVAL_MS))
        page.fill("#b-delay", str(B_DELAY_MS))
        page.fill("#b-text-option", B_TEXT)
        page.fill("#slow", str(SLOW_MS))
        page.fill("#b-spacing", "40")
        page.click("#start")

        # drop the connection in the slow phase, after a few A deltas; the page resumes by itself
        page.wait_for_function("window.tandemDemo.state.count.a >= 3", timeout=15_000)
        page.click("#drop")
        page.wait_for_function("window.tandemDemo.state.connections === 2", timeout=5_000)
        page.wait_for_function("window.tandemDemo.state.statusDoc !== null", timeout=30_000)
        st: dict[str, Any] = page.evaluate(STATE_JS)

        # what the page shows is exactly the stream's text, each delta once, despite the drop
        doc = httpx.get(api + st["handles"]["status_url"], timeout=5).json()
        assert doc["status"] == "completed" and st["status"] == "completed"
        assert doc["b"]["text"] == B_TEXT
        assert page.eval_on_selector("#a-text", "e => e.textContent") == doc["a"]["text"]
        assert page.eval_on_selector("#b-text", "e => e.textContent") == doc["b"]["text"]
        assert st["count"] == {"a": A_TOKENS, "b": len(split_tokens(B_TEXT))} == {"a": doc["a"]["tokens"], "b": doc["b"]["tokens"]}
        assert st["duplicates"] == 0 and st["resumes"] == 1
        assert [m["kind"] for m in st["marks"]] == ["drop", "resume", "flush"]

        # the pacing is visible: slow A deltas at least one slow interval apart, then the flush
        slow = [d["t"] for d in st["deltas"] if d["source"] == "a" and d["phase"] == "slow"]
        flushed = [d["t"] for d in st["deltas"] if d["source"] == "a" and d["phase"] == "flush"]
        assert len(slow) >= 3 and len(flushed) >= 1 and len(slow) + len(flushed) == A_TOKENS
        # (median gap: arrival times in a browser on a busy machine jitter by tens of milliseconds)
        assert median(b - a for a, b in pairwise(slow)) >= SLOW_MS / 1000 * 0.8
        assert max(flushed) - min(flushed) < SLOW_MS / 1000 * len(flushed) / 4  # the backlog goes at once
        assert max(slow) < st["flushAt"] <= min(flushed)
        assert st["flushAt"] >= B_DELAY_MS / 1000 * 0.9
        b_times = [d["t"] for d in st["deltas"] if d["source"] == "b"]
        assert min(b_times) >= max(flushed)  # B only after A

        # the marks: one flush mark in A's text where the slow part ends, B's completion, the resume
        mark = page.locator("#a-text .flush-mark")
        assert mark.count() == 1 and mark.is_visible()
        before_mark = page.eval_on_selector(
            "#a-text .flush-mark", "m => { let t = ''; for (let n = m.previousSibling; n; n = n.previousSibling) t = n.textContent + t; return t; }"
        )
        assert before_mark == "".join(split_tokens(doc["a"]["text"])[: len(slow)])
        assert page.locator("#b-text .b-done-mark").is_visible()
        assert page.locator(".resume-mark").count() == 1

        # the timeline was drawn: squares for slow A, flushed A and B, and the flush line
        px = st["pixels"]
        assert px["slow"] >= 16 * len(slow) * 0.5 and px["flush"] > 0 and px["b"] >= 16 and px["mark"] > 0, px
        assert page.inner_text("#flush-at").endswith(" s") and page.inner_text("#resumes") == "1"
        assert page.inner_text("#duplicates") == "0"
        assert not problems, problems

        page.wait_for_timeout(600)  # let the last deltas' highlight fade
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SCREENSHOT), full_page=True)
        assert SCREENSHOT.stat().st_size > 10_000
        print(f"\ndemo page screenshot: {SCREENSHOT}")
