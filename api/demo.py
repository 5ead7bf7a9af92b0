"""The demo page at `/`: plain HTML and JavaScript, no build step, served by every API process.

The page creates a stream with POST /v1/streams and follows the returned `events_url` with the
browser's EventSource: the same public API any client uses, nothing private.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from api.errors import ApiError

STATIC = Path(__file__).resolve().parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
# The page is small and fixed: read once, served from memory; only these names exist.
_FILES: dict[str, tuple[bytes, str]] = {
    p.name: (p.read_bytes(), _TYPES[p.suffix]) for p in sorted(STATIC.glob("*")) if p.suffix in _TYPES
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    # Everything the page loads comes from this origin; the EventSource and fetches too.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",  # URLs carry stream tokens
}

router = APIRouter(include_in_schema=False)


def _serve(name: str) -> Response:
    found = _FILES.get(name)
    if found is None:
        raise ApiError(404, "not_found", f"no static file {name!r}")
    body, media_type = found
    return Response(body, media_type=media_type, headers=_HEADERS)


@router.get("/")
async def demo_page() -> Response:
    return _serve("index.html")


@router.get("/static/{name}")
async def static_file(name: str) -> Response:
    return _serve(name)
