"""The one JSON error shape, `{"error": {"code", "message"}}`, for every failure the API returns."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from api.hub import REDIS_DOWN


class JSONBody(Response):
    """JSON rendered by orjson (FastAPI deprecated its own ORJSONResponse)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.details, self.headers = status, code, message, details, headers


def error_response(status: int, code: str, message: str, details: Any = None, headers: dict[str, str] | None = None) -> JSONBody:
    body: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    return JSONBody({"error": body}, status_code=status, headers=headers)


_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}


def _count(request: Request, code: str) -> None:
    count(getattr(request.app.state, "tandem", None), code)


def count(state: Any, code: str) -> None:
    """Metrics: tandem_rejected_total{code}; tandem_redis_errors_total for a 503 from Redis."""
    if state is not None:
        state.metrics.rejected.labels(code).inc()
        if code == "redis_unavailable":
            state.metrics.redis_errors.inc()


def redis_down_response() -> JSONBody:
    return error_response(503, "redis_unavailable", "Redis is not answering; retry shortly", headers={"Retry-After": "1"})


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONBody:
        _count(request, exc.code)
        return error_response(exc.status, exc.code, exc.message, exc.details, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONBody:
        _count(request, "invalid_request")
        details = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()
        ]
        first = details[0] if details else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"] if p != "body") or "body"
        return error_response(422, "invalid_request", f"{where}: {first['msg']}", details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONBody:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    for exc_type in REDIS_DOWN:

        @app.exception_handler(exc_type)
        async def _redis_down(request: Request, exc: Exception) -> JSONBody:
            _count(request, "redis_unavailable")
            return redis_down_response()
