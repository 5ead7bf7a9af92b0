"""A small SSE test client: reads a stream, records (time, event, id, data), can drop and resume."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson


@dataclass
class Received:
    event: str
    id: str | None
    data: dict[str, Any]
    t: float  # time.monotonic() at receipt


@dataclass
class Run:
    status: int
    events: list[Received] = field(default_factory=list)
    last_id: str | None = None
    ended: bool = False

    def of(self, kind: str) -> list[Received]:
        return [e for e in self.events if e.event == kind]

    def text(self, source: str) -> str:
        return "".join(e.data["text"] for e in self.events if e.event == "delta" and e.data["source"] == source)


def parse_sse(buf: bytes) -> tuple[list[tuple[str | None, str | None, str]], bytes]:
    """Complete messages in `buf` as (event, id, data), and the incomplete rest."""
    out = []
    while b"\n\n" in buf:
        raw, buf = buf.split(b"\n\n", 1)
        event = eid = None
        data: list[str] = []
        for line in raw.decode().split("\n"):
            if line.startswith(":") or not line:
                continue
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "event":
                event = value
            elif name == "id":
                eid = value
            elif name == "data":
                data.append(value)
        if data or event:
            out.append((event, eid, "\n".join(data)))
    return out, buf


def read_events(
    base: str,
    events_url: str,
    last_id: str | None = None,
    *,
    stop_after: int | None = None,
    header: bool = True,
    timeout: float = 60.0,
) -> Run:
    """Read until `end`, or drop the connection after `stop_after` id-carrying events."""
    url = base + events_url
    headers = {}
    if last_id is not None:
        if header:
            headers["Last-Event-ID"] = last_id
        else:
            url += f"&last_event_id={last_id}"
    run = Run(status=0, last_id=last_id)
    with httpx.Client(timeout=httpx.Timeout(10.0, read=timeout)) as client, client.stream("GET", url, headers=headers) as r:
        run.status = r.status_code
        if r.status_code != 200:
            r.read()
            return run
        counted = 0
        for ev in received(r):
            run.events.append(ev)
            if ev.id is not None:
                run.last_id = ev.id
                counted += 1
            if ev.event == "end":
                run.ended = True
                return run
            if stop_after is not None and ev.id is not None and counted >= stop_after:
                return run
    return run


def received(r: httpx.Response) -> Iterator[Received]:
    """The messages of a streamed SSE response as they arrive (comments left out), each stamped
    with the monotonic time of the chunk it came in."""
    buf = b""
    for chunk in r.iter_raw():
        buf += chunk
        msgs, buf = parse_sse(buf)
        now = time.monotonic()
        for event, eid, data in msgs:
            if event is not None:
                yield Received(event, eid, orjson.loads(data) if data else {}, now)


def create(base: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
    r = httpx.post(base + "/v1/streams", json=body, timeout=10.0, **kw)
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc
