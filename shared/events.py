"""The event model and both of its encodings: Redis stream fields and SSE bytes.

A worker appends entries to ``<prefix>:{id}:a`` / ``:b`` with plain string fields (``type`` plus
the fields of that type); the same entries travel on the stream's pub/sub channel as JSON, in the
shape XRANGE returns them. The API turns an entry into an :class:`Event` and the event into the
exact bytes of one SSE message. Nothing else in the project builds either format.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Literal

import orjson

from shared.cursor import END, Cursor
from shared.keys import Source

Kind = Literal["delta", "done", "error", "end"]
TERMINAL_STATES = frozenset({"done", "failed", "cancelled"})
Fields = dict[str, str]
Entry = tuple[str, Fields]  # (redis entry id, fields)


# -- Redis fields ------------------------------------------------------------------------------


def delta_fields(text: str) -> list[str]:
    return ["type", "delta", "text", text]


def done_fields(tokens: int, extra: dict[str, Any] | None = None) -> list[str]:
    """`extra` (usage, finish_reason, ...) is stored as one JSON field so the entry stays flat."""
    out = ["type", "done", "tokens", str(tokens)]
    if extra:
        out += ["extra", orjson.dumps(extra).decode()]
    return out


def error_fields(code: str, message: str) -> list[str]:
    return ["type", "error", "code", code, "message", message]


def fields_dict(flat: Sequence[str]) -> Fields:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat), 2)}


def state_after(fields: Fields) -> str:
    """The source state a terminal entry leaves behind (mirrors the Lua in shared/store.py)."""
    if fields.get("type") == "done":
        return "done"
    return "cancelled" if fields.get("code") == "cancelled" else "failed"


def final_status(a_state: str, b_state: str) -> str:
    """A stream's status once both sources are terminal (mirrors the Lua in shared/store.py)."""
    if "cancelled" in (a_state, b_state):
        return "cancelled"
    if "failed" in (a_state, b_state):
        return "failed"
    return "completed"


# -- pub/sub payload ---------------------------------------------------------------------------


Row = list[Any]  # [entry id, [field, value, ...]]: a JSON array, as announced


class Announcement:
    """One append as announced on a stream's channel: the entries, and the id before them."""

    __slots__ = ("events", "prev", "rows", "source")

    def __init__(self, source: Source, prev: str, rows: list[Row], events: list[Event]) -> None:
        self.source: Source = source
        self.prev = prev
        self.rows = rows
        # The entries as events, built once and shared by every reader of the stream (and so is
        # each event's encoded form).
        self.events = events

    @property
    def entries(self) -> list[Entry]:
        return [(eid, fields_dict(flat)) for eid, flat in self.rows]


def parse_announcement(payload: bytes | str) -> Announcement:
    """Decode what the Lua scripts publish: {"s": source, "p": prev id, "e": [[id, [f, v, ...]], ...]}.
    A delta goes straight from its row to its event, without a fields dict: at 1,000 paced streams
    this runs 20,000 times a second."""
    try:
        doc = orjson.loads(payload)
        source, prev, rows = doc["s"], doc["p"], doc["e"]
        if source not in ("a", "b"):
            raise ValueError(f"bad source in announcement: {source!r}")
        events: list[Event] = []
        for eid, flat in rows:
            if type(eid) is str and type(flat) is list and len(flat) == 4 and flat[0] == "type" and flat[1] == "delta" and flat[2] == "text":
                events.append(delta_event(source, eid, flat[3]))
            elif not isinstance(eid, str) or not isinstance(flat, list) or len(flat) % 2:
                raise ValueError(f"malformed entry in announcement: {eid!r}")
            else:
                events.append(event_from_entry(source, eid, fields_dict(flat)))
    except (KeyError, TypeError, IndexError) as e:  # always ValueError: the hub skips those
        raise ValueError(f"malformed announcement: {e!r}") from None
    return Announcement(source, prev, rows, events)


# -- SSE ---------------------------------------------------------------------------------------


class Event:
    """One SSE event of a stream. It keeps its position as the entry id string, not as a Cursor:
    an event is made for every token, and a connection whose A waits for B holds a few hundred;
    one object each, not two, is half what the garbage collector has to walk (its young
    collections paused the API for 3 to 5 ms at 1,000 paced streams)."""

    __slots__ = ("_wire", "data", "entry", "kind", "source")

    def __init__(self, kind: Kind, source: str, cursor: Cursor, data: dict[str, Any], wire: bytes | None = None) -> None:
        self.kind = kind
        self.source = source  # "a", "b", or "stream"
        self.entry = cursor.entry  # the Redis entry id within `source` (unused for "end")
        self.data = data
        self._wire = wire

    @property
    def cursor(self) -> Cursor:
        return END if self.kind == "end" else Cursor(self.source, self.entry)  # type: ignore[arg-type]

    @property
    def terminal(self) -> bool:
        return self.kind in ("done", "error")

    def sse(self) -> bytes:
        """The SSE message, encoded once however many connections send it."""
        wire = self._wire
        if wire is None:
            wire = self._wire = sse_message(self.kind, self.data, str(self.cursor))
        return wire

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return (self.kind, self.source, self.entry, self.data) == (other.kind, other.source, other.entry, other.data)

    __hash__ = None  # type: ignore[assignment]  # (as a dataclass's: events are compared, not hashed)

    def __repr__(self) -> str:
        return f"Event(kind={self.kind!r}, source={self.source!r}, cursor={self.cursor!r}, data={self.data!r})"


def delta_event(source: Source, entry_id: str, text: str) -> Event:
    """A delta, nearly every event, with its wire form built here (the bytes `Event.sse` would
    make, without its generic encoder): live announcements and catch-up reads both come this way."""
    data = {"source": source, "text": text}
    wire = b"".join((_DELTA_HEAD[source], entry_id.encode(), b"\ndata: ", orjson.dumps(data), b"\n\n"))
    event = Event.__new__(Event)
    event.kind, event.source, event.entry, event.data, event._wire = "delta", source, entry_id, data, wire
    return event


_DELTA_HEAD = {src: b"event: delta\nid: " + src.encode() + b"-" for src in ("a", "b")}


def event_from_entry(source: Source, entry_id: str, fields: Fields) -> Event:
    kind = fields.get("type")
    if kind == "delta":
        return delta_event(source, entry_id, fields.get("text", ""))
    cursor = Cursor(source, entry_id)
    if kind == "done":
        data: dict[str, Any] = {"source": source, "tokens": int(fields.get("tokens", "0"))}
        if "extra" in fields:
            for k, v in orjson.loads(fields["extra"]).items():
                data.setdefault(k, v)  # extra adds keys; it never replaces `source` or `tokens`
        return Event("done", source, cursor, data)
    if kind == "error":
        return Event(
            "error",
            source,
            cursor,
            {"source": source, "code": fields.get("code", "error"), "message": fields.get("message", "")},
        )
    raise ValueError(f"unknown entry type {kind!r} in {source} entry {entry_id}")


_DELTA = (b"type", b"delta", b"text")


def events_from_rows(source: Source, rows: Sequence[tuple[bytes, Sequence[bytes]]]) -> list[Event]:
    """Events from XRANGE rows as Redis sent them (entry id, flat fields; bytes): what a catch-up
    read, a flush or a resume turns into SSE. A delta, nearly every entry, is built straight from
    the bytes, without the fields dict of `event_from_entry`: a 10,000-token flush is 10,000 of
    these."""
    out: list[Event] = []
    for eid, flat in rows:
        if len(flat) == 4 and (flat[0], flat[1], flat[2]) == _DELTA:
            out.append(delta_event(source, eid.decode(), flat[3].decode()))
        else:
            out.append(event_from_entry(source, eid.decode(), {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}))
    return out


def end_event(status: str) -> Event:
    return Event("end", "stream", END, {"status": status})


def sse_message(event: str | None, data: Any, event_id: str | None = None) -> bytes:
    """One SSE message. JSON never contains a raw CR or LF, so `data` is always one line."""
    out = b""
    if event is not None:
        out += b"event: " + event.encode() + b"\n"
    if event_id is not None:
        out += b"id: " + event_id.encode() + b"\n"
    return out + b"data: " + orjson.dumps(data) + b"\n\n"


def sse_retry(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms


def sse_comment(text: str = "ping") -> bytes:
    return b": " + text.encode() + b"\n\n"


def encode_all(items: Iterable[Event]) -> bytes:
    return b"".join(e.sse() for e in items)
