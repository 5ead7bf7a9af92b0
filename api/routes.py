"""HTTP endpoints: create, events (SSE), status, cancel, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Annotated, Any

import orjson
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from arq.jobs import serialize_job
from fastapi import APIRouter, Depends, Header, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from api.errors import ApiError, JSONBody
from api.feed import Feed, start_point
from api.hub import REDIS_DOWN, Hub
from api.metrics import ApiMetrics
from api.response import Liveness, OpenStreams, SSEResponse
from api.schemas import CreateStream
from api.sse import event_stream
from shared.background import settled
from shared.cursor import START, Cursor, CursorError
from shared.events import Event
from shared.keys import SOURCES, WAKE, Source
from shared.pacing import Pacer, Phase
from shared.settings import Settings
from shared.store import Command, Store, is_terminal, now_ms, token_matches
from workers.registry import Registry
from workers.settings import JOB_NAME

log = logging.getLogger("tandem.api")
router = APIRouter()
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")


class State:
    """What the routes need, built once in the app's lifespan."""

    def __init__(self, settings: Settings, redis: ArqRedis, store: Store, hub: Hub, registry: Registry, metrics: ApiMetrics) -> None:
        self.settings, self.redis, self.store, self.hub, self.registry, self.metrics = settings, redis, store, hub, registry, metrics
        self.open_streams = OpenStreams()  # closed all at once when the process shuts down


async def get_state(request: Request) -> State:
    # async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request.
    state: State = request.app.state.tandem
    return state


StateDep = Annotated[State, Depends(get_state)]


def _bearer(authorization: str | None) -> str | None:
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip()
    return None


async def _authorized_meta(state: State, stream_id: str, token: str | None, authorization: str | None) -> dict[str, str]:
    token = token or _bearer(authorization)
    if not token:
        raise ApiError(401, "token_required", "this stream needs its token: ?token=... or Authorization: Bearer ...")
    return _authorized(await state.store.meta(stream_id) if _ID.fullmatch(stream_id) else None, token)


def _authorized(meta: dict[str, str] | None, token: str | None) -> dict[str, str]:
    if meta is None:
        raise ApiError(404, "stream_not_found", "no such stream (unknown id, or expired after retention)")
    if not token or not token_matches(meta, token):
        raise ApiError(403, "token_invalid", "the token does not match this stream")
    return meta


# -- create ------------------------------------------------------------------------------------


@router.post("/v1/streams", status_code=201)
async def create_stream(body: CreateStream, state: StateDep, authorization: Annotated[str | None, Header()] = None) -> JSONBody:
    s = state.settings
    if s.api_key is not None:
        given = _bearer(authorization)
        if not given:
            raise ApiError(401, "api_key_required", "this server needs an API key: Authorization: Bearer <key>")
        if not _consteq(given, s.api_key):
            raise ApiError(403, "api_key_invalid", "the API key is not valid")
    if len(body.prompt) > s.max_prompt_chars:
        raise ApiError(422, "invalid_request", f"prompt: longer than {s.max_prompt_chars} characters (TANDEM_MAX_PROMPT_CHARS)")
    tasks: dict[Source, tuple[str, dict[str, Any]]] = {}
    for src in SOURCES:
        spec = getattr(body, src)
        name = spec.task if spec is not None else (s.default_task_a if src == "a" else s.default_task_b)
        task = state.registry.get(name)
        if task is None:
            known = ", ".join(sorted(state.registry))
            raise ApiError(422, "unknown_task", f"{src}.task: no task named {name!r}; known tasks: {known}", {"known": sorted(state.registry)})
        try:
            options = task.options.model_validate(spec.options if spec is not None else {})
        except ValidationError as e:
            details = [{"loc": [src, "options", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]} for e_ in e.errors()]
            first = details[0]
            raise ApiError(422, "invalid_options", f"{'.'.join(map(str, first['loc']))}: {first['msg']}", details) from None
        tasks[src] = (name, options.model_dump(mode="json", exclude_unset=True))
    pacing = {
        "slow_interval_ms": s.default_slow_interval_ms,
        "b_interval_ms": s.default_b_interval_ms,
    }
    if body.pacing is not None:
        pacing |= body.pacing.model_dump(exclude_none=True)

    made: list[str] = []

    def enqueue(stream_id: str) -> list[Command]:
        # arq's enqueue_job, for fresh job ids, inside the create's own MULTI/EXEC: a create is
        # one atomic step, so Redis dying at any point leaves either the whole stream or nothing.
        made.append(stream_id)
        now = now_ms()
        commands: list[Command] = []
        for src in SOURCES:
            job_id = state.store.keys.job_id(stream_id, src)
            job = serialize_job(JOB_NAME, (stream_id, src), {}, None, now, serializer=state.redis.job_serializer)
            commands += [("PSETEX", job_key_prefix + job_id, state.redis.expires_extra_ms, job), ("ZADD", s.queue_name, now, job_id)]
        # The workers start the jobs now rather than at their next poll (up to
        # TANDEM_WORKER_POLL_DELAY_S later): half of a stream's time to first token at low load.
        return [*commands, ("PUBLISH", state.store.keys.jobs, WAKE)]

    try:
        created = await state.store.create(prompt=body.prompt, tasks=tasks, pacing=pacing, also=enqueue)
    except BaseException:
        # The client gets an error, so no stream may exist. The connection may have broken after
        # EXEC ran: take it back if Redis answers (else the stream is whole, just unknown).
        if made:
            try:
                await asyncio.shield(asyncio.wait_for(_undo_create(state, made[0]), 2.0))
            except Exception:
                log.warning("could not check for a half-answered create", extra={"stream": made[0]})
        raise
    state.metrics.streams_created.inc()
    log.info("stream created", extra={"stream": created.id, "a": tasks["a"][0], "b": tasks["b"][0]})
    base = f"/v1/streams/{created.id}"
    return JSONBody(
        {
            "id": created.id,
            "token": created.token,
            "events_url": f"{base}/events?token={created.token}",
            "status_url": f"{base}?token={created.token}",
        },
        status_code=201,
    )


async def _undo_create(state: State, stream_id: str) -> None:
    k = state.store.keys
    async with state.redis.pipeline(transaction=True) as tx:
        for src in SOURCES:
            tx.zrem(state.settings.queue_name, k.job_id(stream_id, src))
            tx.delete(job_key_prefix + k.job_id(stream_id, src))
        tx.delete(*k.stream_keys(stream_id))
        tx.zrem(k.index, stream_id)
        await tx.execute()


def _consteq(a: str, b: str) -> bool:
    import hmac

    return hmac.compare_digest(a.encode(), b.encode())


# -- events ------------------------------------------------------------------------------------


@router.get("/v1/streams/{stream_id}/events", response_model=None)
async def stream_events(
    stream_id: str,
    state: StateDep,
    token: str | None = None,
    last_event_id_q: Annotated[str | None, Query(alias="last_event_id")] = None,
    last_event_id: Annotated[str | None, Header()] = None,
    authorization: Annotated[str | None, Header()] = None,
) -> Response:
    """The SSE stream. Served by api/fastpath.py ahead of FastAPI's routing; declared here for the
    API docs (and served here should the fast path be left out)."""
    return await open_events(state, stream_id, token, last_event_id if last_event_id is not None else last_event_id_q, authorization)


async def open_events(state: State, stream_id: str, token: str | None, raw: str | None, authorization: str | None) -> Response:
    """Everything GET .../events does: check, then the SSE response. `raw`: the Last-Event-ID
    (header, else the `last_event_id` query parameter)."""
    s, store = state.settings, state.store
    token = token or _bearer(authorization)
    # Each Redis round trip of a connect is a loop turn or two of a busy process, so what does not
    # depend on an earlier answer goes out together (shared/mux.py writes them as one).
    given = raw is not None and raw != ""
    parsed: Cursor | CursorError | None = None
    if given:
        try:
            parsed = Cursor.parse(raw)  # type: ignore[arg-type]
        except CursorError as e:
            parsed = e.with_traceback(None)  # kept, its traceback not: it holds this frame, which holds it
    if state.hub.listeners >= s.max_streams_per_process:
        raise ApiError(429, "too_many_streams", "this API process serves its maximum of open streams; retry", headers={"Retry-After": "1"})
    hub = state.hub
    channel = store.keys.channel(stream_id)
    plausible = _ID.fullmatch(stream_id) is not None and bool(token)
    resume = isinstance(parsed, Cursor) and parsed.source != "end" and plausible
    # The stream's channel is subscribed while the request is checked (the subscription must be
    # confirmed before the first catch-up read, and that confirmation is a round trip of its own);
    # a request that fails its checks releases it. The meta read, a resume's check of its entry
    # (read before the token is checked, looked at after it) and the SUBSCRIBE all go out now.
    hold = plausible and not isinstance(parsed, CursorError) and not (isinstance(parsed, Cursor) and parsed.source == "end")
    if not plausible:
        await _authorized_meta(state, stream_id, token, None)  # raises 401 or 404, without Redis
    held_soon = hub.hold(channel) if hold else None
    meta_soon = store.meta_soon(stream_id)
    found_soon = store.has_entry_soon(stream_id, parsed.source, parsed.entry) if resume else None  # type: ignore[union-attr,arg-type]
    # A's entries after the cursor are read now too, ahead of the checks (used only once they
    # pass): the first events go out with the response's head, a round trip sooner. The feed's
    # first fill then reads after them (an entry appended before the subscription took effect
    # was announced to no one) and B's state, while those events are on their way.
    early_from: str | None = None
    if hold and not given:
        early_from = START.entry
    elif resume and isinstance(parsed, Cursor) and parsed.source == "a":
        early_from = parsed.entry
    early_soon = store.read_events_soon(stream_id, "a", early_from, s.read_batch) if early_from is not None else None
    not_held, got, found, early = await settled(held_soon, meta_soon, found_soon, early_soon)
    held = held_soon is not None and not_held is None
    try:
        if isinstance(got, BaseException):
            raise got
        meta = _authorized(got, token)
        cursor = START
        if given:
            if isinstance(parsed, CursorError):
                raise ApiError(400, "bad_last_event_id", str(parsed)) from None
            assert parsed is not None
            cursor = parsed
            _check_cursor(meta, cursor, found)
            state.metrics.resumes.inc()
            if cursor.source == "end":
                return Response(status_code=204)
        if isinstance(not_held, BaseException):
            raise not_held  # Redis is down: the subscription failed

        pacing = orjson.loads(meta.get("pacing", "{}"))
        cursor, a_state, b_state = start_point(cursor, meta)  # a resume at a terminal entry is past it
        pacer = Pacer(pacing.get("slow_interval_ms", 0) / 1000, pacing.get("b_interval_ms", 0) / 1000, a_state=a_state, b_state=b_state)
        if is_terminal(meta.get("b_state")):
            pacer.b_completed()  # (a terminal state is final; a later completion is the feed's to notice)
        feed = Feed(store, stream_id, cursor, pacer, s.read_batch, s.slow_buffer)
        if isinstance(early, list) and cursor.source == "a" and cursor.entry == early_from:
            feed.prefill(early)  # (not when start_point moved the cursor past A)
        await hub.subscribe(channel, feed)  # held: confirmed already, no round trip
    finally:
        if held:
            hub.release(channel)

    meta_doc = {
        "id": stream_id,
        "status": meta.get("status"),
        "a": {"task": meta.get("a_task"), "state": meta.get("a_state")},
        "b": {"task": meta.get("b_task"), "state": meta.get("b_state")},
        "pacing": pacing,
    }
    metrics = state.metrics
    metrics.open_streams.inc()
    loop = asyncio.get_running_loop()
    opened = loop.time()
    first = [True]
    log.info("reader connected", extra={"stream": stream_id, "resume_from": str(cursor) if cursor != START else None})

    def on_close() -> None:
        state.open_streams.discard(live)
        state.hub.unsubscribe(channel, feed)
        metrics.open_streams.dec()
        log.info("reader disconnected", extra={"stream": stream_id, "seconds": round(loop.time() - opened, 3)})

    sent = metrics.events_sent.counts

    def on_events(items: list[Event | Phase], now: float) -> None:
        for item in items:
            if isinstance(item, Event):
                sent[item.source, item.kind] += 1
            elif item.phase == "flush" and feed.b_completed_at is not None:
                metrics.flush_reaction.observe(max(0.0, time.perf_counter() - feed.b_completed_at))
        if first[0] and any(isinstance(item, Event) and item.kind == "delta" for item in items):
            first[0] = False
            metrics.first_delta.observe(now - opened)

    a_delta = ("a", "delta")

    def on_a_delta(now: float) -> None:  # `on_events([that delta], now)`, for the fast lane's every token
        sent[a_delta] += 1
        if first[0]:
            first[0] = False
            metrics.first_delta.observe(now - opened)

    live = Liveness(feed.waker)
    state.open_streams.add(live)
    body = event_stream(
        feed, meta_doc, s.sse_retry_ms, on_close, on_events,  # type: ignore[arg-type]
        live=live, ping_s=s.sse_ping_s, hub_connected=state.hub.connected.is_set, on_a_delta=on_a_delta,
    )
    return SSEResponse(body, live, send_timeout_s=s.sse_send_timeout_s, headers=SSE_HEADERS)


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _check_cursor(meta: dict[str, str], cursor: Cursor, found: bool | BaseException | None) -> None:
    """A resume id must be one this stream issued: never someone else's position, never past the
    end. `found`: whether the stream has that entry (read along with the meta)."""
    if cursor.source == "end":
        if meta.get("status") not in ("completed", "failed", "cancelled"):
            raise ApiError(400, "bad_last_event_id", "Last-Event-ID is past the end of this stream")
        return
    if cursor.source == "b" and not is_terminal(meta.get("a_state")):
        raise ApiError(400, "bad_last_event_id", "Last-Event-ID is past the end of this stream")
    if isinstance(found, BaseException):
        raise found
    if not found:
        raise ApiError(400, "bad_last_event_id", "Last-Event-ID is not an event of this stream")


# -- status and cancel -------------------------------------------------------------------------


@router.get("/v1/streams/{stream_id}")
async def stream_status(
    stream_id: str, state: StateDep, token: str | None = None, authorization: Annotated[str | None, Header()] = None
) -> JSONBody:
    meta = await _authorized_meta(state, stream_id, token, authorization)
    return JSONBody(await state.store.status(stream_id, meta))


@router.delete("/v1/streams/{stream_id}")
async def cancel_stream(
    stream_id: str, state: StateDep, token: str | None = None, authorization: Annotated[str | None, Header()] = None
) -> JSONBody:
    meta = await _authorized_meta(state, stream_id, token, authorization)
    store = state.store
    # Terminal `cancelled` entries first (readers see them at once), then arq stops the jobs.
    await store.cancel(stream_id)
    await store.abort_jobs(stream_id)
    log.info("stream cancelled", extra={"stream": stream_id})
    meta = await store.meta(stream_id) or meta
    return JSONBody(await store.status(stream_id, meta))


# -- operations --------------------------------------------------------------------------------


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONBody:
    try:
        await asyncio.wait_for(state.store.ping(), timeout=1.0)
    except (TimeoutError, *REDIS_DOWN):
        return JSONBody({"error": {"code": "redis_unavailable", "message": "Redis is not answering"}}, status_code=503)
    if not state.hub.connected.is_set():
        return JSONBody({"error": {"code": "redis_unavailable", "message": "the live reader is reconnecting"}}, status_code=503)
    return JSONBody({"status": "ready"})


@router.get("/metrics")
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
