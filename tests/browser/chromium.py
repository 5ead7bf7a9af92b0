"""Headless Chromium for the browser tests: Debian's /usr/bin/chromium driven by Python playwright.

No `playwright install`: the browser is the system's. A missing browser or playwright is a test
failure with a message saying what to install, never a skip.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

CHROMIUM = os.environ.get("TANDEM_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def chromium_path() -> str:
    path = CHROMIUM if os.path.isabs(CHROMIUM) else shutil.which(CHROMIUM)
    if not path or not os.access(path, os.X_OK):
        raise AssertionError(
            f"Chromium not found at {CHROMIUM!r}: install it (apt-get install chromium) or set TANDEM_CHROMIUM"
        )
    return path


@contextmanager
def browser_page(viewport: tuple[int, int] = (1200, 1100)) -> Iterator[Any]:
    """A fresh page in a headless Chromium that is closed afterwards."""
    path = chromium_path()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise AssertionError("Python playwright is missing: .venv/bin/pip install playwright (no `playwright install`)") from e
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path, headless=True, args=ARGS)
        try:
            # bypass_csp: the page forbids eval, which playwright's wait_for_function and evaluate use
            page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]}, bypass_csp=True)
            yield page
        finally:
            browser.close()
