"""shared/events.py: Redis fields <-> Event <-> SSE bytes, byte for byte; pub/sub payloads."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.cursor import END, Cursor
from shared.events import (
    Event,
    delta_fields,
    done_fields,
    encode_all,
    end_event,
    error_fields,
    event_from_entry,
    events_from_rows,
    fields_dict,
    final_status,
    parse_announcement,
    sse_comment,
    sse_message,
    sse_retry,
    state_after,
)
from shared.pacing import Phase


def delta(source: str, entry: str, text: str) -> Event:
    return Event("delta", source, Cursor(source, entry), {"source": source, "text": text})  # type: ignore[arg-type]


# -- Event.sse(): exact bytes --------------------------------------------------------------------

SSE_TABLE: list[tuple[str, Event, bytes]] = [
    ("plain", delta("a", "1-0", "Hello"), b'event: delta\nid: a-1-0\ndata: {"source":"a","text":"Hello"}\n\n'),
    ("empty", delta("a", "1-1", ""), b'event: delta\nid: a-1-1\ndata: {"source":"a","text":""}\n\n'),
    ("lf", delta("a", "2-0", "x\ny"), b'event: delta\nid: a-2-0\ndata: {"source":"a","text":"x\\ny"}\n\n'),
    ("cr", delta("a", "2-1", "x\ry"), b'event: delta\nid: a-2-1\ndata: {"source":"a","text":"x\\ry"}\n\n'),
    ("crlf", delta("b", "3-0", "\r\n"), b'event: delta\nid: b-3-0\ndata: {"source":"b","text":"\\r\\n"}\n\n'),
    ("only lf", delta("b", "3-1", "\n\n"), b'event: delta\nid: b-3-1\ndata: {"source":"b","text":"\\n\\n"}\n\n'),
    ("quotes", delta("a", "4-0", 'say "hi"'), b'event: delta\nid: a-4-0\ndata: {"source":"a","text":"say \\"hi\\""}\n\n'),
    ("backslash", delta("a", "5-0", "C:\\dir\\n"), b'event: delta\nid: a-5-0\ndata: {"source":"a","text":"C:\\\\dir\\\\n"}\n\n'),
    ("non-ascii", delta("a", "6-0", "café ñ 東京"), 'event: delta\nid: a-6-0\ndata: {"source":"a","text":"café ñ 東京"}\n\n'.encode()),
    ("emoji", delta("b", "7-0", "ok 👍🏽"), 'event: delta\nid: b-7-0\ndata: {"source":"b","text":"ok 👍🏽"}\n\n'.encode()),
    ("nul and controls", delta("a", "8-0", "\x00\t\x1b"), b'event: delta\nid: a-8-0\ndata: {"source":"a","text":"\\u0000\\t\\u001b"}\n\n'),
    ("colon and data:", delta("a", "9-0", "data: x\n\nevent: end"),
     b'event: delta\nid: a-9-0\ndata: {"source":"a","text":"data: x\\n\\nevent: end"}\n\n'),
    ("done", Event("done", "a", Cursor("a", "10-0"), {"source": "a", "tokens": 3}),
     b'event: done\nid: a-10-0\ndata: {"source":"a","tokens":3}\n\n'),
    ("error", Event("error", "b", Cursor("b", "11-0"), {"source": "b", "code": "task_failed", "message": 'bad "x"\n'}),
     b'event: error\nid: b-11-0\ndata: {"source":"b","code":"task_failed","message":"bad \\"x\\"\\n"}\n\n'),
    ("end completed", end_event("completed"), b'event: end\nid: end\ndata: {"status":"completed"}\n\n'),
    ("end failed", end_event("failed"), b'event: end\nid: end\ndata: {"status":"failed"}\n\n'),
    ("end cancelled", end_event("cancelled"), b'event: end\nid: end\ndata: {"status":"cancelled"}\n\n'),
]


@pytest.mark.parametrize(("event", "expected"), [(e, b) for _, e, b in SSE_TABLE], ids=[n for n, _, _ in SSE_TABLE])
def test_event_sse_bytes(event: Event, expected: bytes) -> None:
    assert event.sse() == expected


def parse_one(message: bytes) -> dict[str, str]:
    """Parse one SSE message the way the spec does: lines end at CR, LF or CRLF only."""
    assert message.endswith(b"\n\n")
    body = message[:-2].decode()
    lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    out: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        assert name not in out, f"field {name!r} twice: the payload was split"
        out[name] = value[1:] if value.startswith(" ") else value
    return out


@pytest.mark.parametrize(("event", "expected"), [(e, b) for _, e, b in SSE_TABLE], ids=[n for n, _, _ in SSE_TABLE])
def test_sse_payload_is_one_line_and_decodes_back(event: Event, expected: bytes) -> None:
    fields = parse_one(event.sse())
    assert fields["event"] == event.kind
    assert fields["id"] == str(event.cursor)
    assert orjson.loads(fields["data"]) == event.data


@given(st.text())
def test_any_text_is_one_data_line(text: str) -> None:
    raw = delta("a", "1-0", text).sse()
    assert raw.endswith(b"\n\n")
    head, sep, data = raw[:-2].partition(b"\ndata: ")
    assert (head, sep) == (b"event: delta\nid: a-1-0", b"\ndata: ")
    assert b"\n" not in data and b"\r" not in data and b"\x00" not in data
    assert orjson.loads(data) == {"source": "a", "text": text}


def test_line_separators_other_than_cr_lf_pass_verbatim() -> None:
    """U+2028/U+2029/U+0085 are not SSE line ends; they stay in the one data line, as UTF-8."""
    text = "a\u2028b\u2029c\x85d\x0be\x0cf"
    raw = delta("a", "1-0", text).sse()
    data = raw.split(b"data: ", 1)[1][:-2]
    assert b"\n" not in data and b"\r" not in data
    assert orjson.loads(data)["text"] == text


def test_encode_all_concatenates() -> None:
    events = [e for _, e, _ in SSE_TABLE[:3]]
    assert encode_all(events) == b"".join(e.sse() for e in events)
    assert encode_all([]) == b""


# -- the other messages ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("meta", {"id": "x", "status": "running"}, None), b'event: meta\ndata: {"id":"x","status":"running"}\n\n'),
        ((None, {"k": 1}, None), b'data: {"k":1}\n\n'),
        ((None, {"k": 1}, "a-1-0"), b'id: a-1-0\ndata: {"k":1}\n\n'),
        (("x", [1, "two", None], "end"), b'event: x\nid: end\ndata: [1,"two",null]\n\n'),
        (("s", "line\nbreak", None), b'event: s\ndata: "line\\nbreak"\n\n'),
        (("n", None, None), b"event: n\ndata: null\n\n"),
    ],
)
def test_sse_message(args: tuple[str | None, Any, str | None], expected: bytes) -> None:
    assert sse_message(*args) == expected


@pytest.mark.parametrize(("ms", "expected"), [(0, b"retry: 0\n\n"), (1000, b"retry: 1000\n\n"), (123456, b"retry: 123456\n\n")])
def test_sse_retry(ms: int, expected: bytes) -> None:
    assert sse_retry(ms) == expected


def test_sse_comment() -> None:
    assert sse_comment() == b": ping\n\n"
    assert sse_comment("keepalive") == b": keepalive\n\n"
    assert sse_comment("") == b": \n\n"


@pytest.mark.parametrize("phase", ["slow", "flush", "waiting", "b"])
def test_phase_sse(phase: str) -> None:
    assert Phase(phase).sse() == b'event: phase\ndata: {"phase":"' + phase.encode() + b'"}\n\n'  # type: ignore[arg-type]


# -- Redis fields -> Event ---------------------------------------------------------------------


def test_field_builders() -> None:
    assert delta_fields("hi\n") == ["type", "delta", "text", "hi\n"]
    assert done_fields(3) == ["type", "done", "tokens", "3"]
    assert done_fields(0, {}) == ["type", "done", "tokens", "0"]
    assert done_fields(2, {"finish_reason": "stop", "usage": {"in": 1}}) == [
        "type", "done", "tokens", "2", "extra", '{"finish_reason":"stop","usage":{"in":1}}'
    ]
    assert error_fields("too_long", "m") == ["type", "error", "code", "too_long", "message", "m"]
    assert fields_dict(["a", "1", "b", "2"]) == {"a": "1", "b": "2"}
    assert fields_dict([]) == {}


FROM_ENTRY: list[tuple[str, str, dict[str, str], Event]] = [
    ("a", "1-0", fields_dict(delta_fields("hé\r\n")), delta("a", "1-0", "hé\r\n")),
    ("b", "5-2", fields_dict(delta_fields("")), delta("b", "5-2", "")),
    ("a", "2-0", fields_dict(done_fields(7)), Event("done", "a", Cursor("a", "2-0"), {"source": "a", "tokens": 7})),
    (
        "b",
        "3-0",
        fields_dict(done_fields(2, {"finish_reason": "stop", "usage": {"prompt": 3, "completion": 2}})),
        Event("done", "b", Cursor("b", "3-0"),
              {"source": "b", "tokens": 2, "finish_reason": "stop", "usage": {"prompt": 3, "completion": 2}}),
    ),
    (
        "a",
        "4-0",
        fields_dict(error_fields("cancelled", "cancelled by request")),
        Event("error", "a", Cursor("a", "4-0"), {"source": "a", "code": "cancelled", "message": "cancelled by request"}),
    ),
    (
        "b",
        "4-1",
        fields_dict(error_fields("worker_lost", "lost")),
        Event("error", "b", Cursor("b", "4-1"), {"source": "b", "code": "worker_lost", "message": "lost"}),
    ),
]


@pytest.mark.parametrize(("source", "entry_id", "fields", "expected"), FROM_ENTRY)
def test_event_from_entry(source: str, entry_id: str, fields: dict[str, str], expected: Event) -> None:
    event = event_from_entry(source, entry_id, fields)  # type: ignore[arg-type]
    assert event == expected
    assert event.terminal is (expected.kind in ("done", "error"))


def test_done_with_extra_encodes_in_order() -> None:
    event = event_from_entry("a", "9-0", fields_dict(done_fields(4, {"finish_reason": "length"})))
    assert event.sse() == b'event: done\nid: a-9-0\ndata: {"source":"a","tokens":4,"finish_reason":"length"}\n\n'


def test_done_extra_cannot_override_source_or_tokens() -> None:
    """Bug: a task's ctx.report(source=..., tokens=...) replaced the event's own `source` and
    `tokens`, so a client routed B's `done` as A's. Fix: `extra` only adds keys."""
    event = event_from_entry("b", "9-0", fields_dict(done_fields(4, {"source": "a", "tokens": 99, "model": "m"})))
    assert event.data == {"source": "b", "tokens": 4, "model": "m"}


def test_event_from_entry_unknown_type() -> None:
    with pytest.raises(ValueError, match="unknown entry type"):
        event_from_entry("a", "1-0", {"type": "bogus"})
    with pytest.raises(ValueError):
        event_from_entry("a", "1-0", {})


def test_end_event() -> None:
    e = end_event("failed")
    assert (e.kind, e.source, e.cursor, e.data, e.terminal) == ("end", "stream", END, {"status": "failed"}, False)


# -- terminal states ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "state"),
    [
        (fields_dict(done_fields(1)), "done"),
        (fields_dict(done_fields(1, {"x": 1})), "done"),
        (fields_dict(error_fields("cancelled", "m")), "cancelled"),
        (fields_dict(error_fields("task_failed", "m")), "failed"),
        (fields_dict(error_fields("too_long", "m")), "failed"),
        (fields_dict(error_fields("worker_lost", "m")), "failed"),
        (fields_dict(error_fields("Cancelled", "m")), "failed"),
    ],
)
def test_state_after(fields: dict[str, str], state: str) -> None:
    assert state_after(fields) == state


@pytest.mark.parametrize(
    ("a", "b", "status"),
    [
        ("done", "done", "completed"),
        ("done", "failed", "failed"),
        ("failed", "done", "failed"),
        ("failed", "failed", "failed"),
        ("done", "cancelled", "cancelled"),
        ("cancelled", "done", "cancelled"),
        ("failed", "cancelled", "cancelled"),
        ("cancelled", "failed", "cancelled"),
        ("cancelled", "cancelled", "cancelled"),
    ],
)
def test_final_status(a: str, b: str, status: str) -> None:
    assert final_status(a, b) == status


# -- pub/sub announcements ---------------------------------------------------------------------


def test_parse_announcement_good() -> None:
    payload = orjson.dumps({"s": "a", "p": "0-0", "e": [["1-0", ["type", "delta", "text", "x\ny"]], ["1-1", ["type", "done", "tokens", "1"]]]})
    ann = parse_announcement(payload)
    assert (ann.source, ann.prev) == ("a", "0-0")
    assert ann.entries == [("1-0", {"type": "delta", "text": "x\ny"}), ("1-1", {"type": "done", "tokens": "1"})]
    assert [e.sse() for e in ann.events] == [event_from_entry("a", eid, f).sse() for eid, f in ann.entries]
    again = parse_announcement(payload.decode())
    assert (again.source, again.prev, again.entries) == (ann.source, ann.prev, ann.entries)


def test_parse_announcement_as_lua_cjson_writes_it() -> None:
    """cjson escapes '/' and writes the keys in any order."""
    payload = b'{"e":[["17-0",["type","delta","text","a\\/b \\u00e9"]]],"p":"16-3","s":"b"}'
    ann = parse_announcement(payload)
    assert (ann.source, ann.prev, ann.entries) == ("b", "16-3", [("17-0", {"type": "delta", "text": "a/b é"})])
    assert [e.data for e in ann.events] == [{"source": "b", "text": "a/b é"}]


def test_parse_announcement_without_entries() -> None:
    ann = parse_announcement(b'{"s":"b","p":"1-0","e":[]}')
    assert (ann.source, ann.prev, ann.entries, ann.events) == ("b", "1-0", [], [])


MALFORMED = [
    b"",
    b"not json",
    b"[]",
    b"null",
    b'"string"',
    b"5",
    b"{}",
    b'{"s":"a","p":"0-0"}',
    b'{"s":"a","e":[]}',
    b'{"p":"0-0","e":[]}',
    b'{"s":"c","p":"0-0","e":[]}',
    b'{"s":null,"p":"0-0","e":[]}',
    b'{"s":"a","p":"0-0","e":5}',
    b'{"s":"a","p":"0-0","e":[5]}',
    b'{"s":"a","p":"0-0","e":[["1-0"]]}',
    b'{"s":"a","p":"0-0","e":[["1-0",["type"]]]}',  # odd number of field items
    b'{"s":"a","p":"0-0","e":[["1-0",["type","delta","text"]]]}',
    b'{"s":"a","p":"0-0","e":[["1-0",5]]}',
    b'{"s":"a","p":"0-0","e":[["1-0",["a","b"],"extra"]]}',
    b"\xff\xfe",
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_parse_announcement_malformed_raises_value_error(payload: bytes) -> None:
    """The hub ignores a payload that raises ValueError; anything else would drop its connection."""
    with pytest.raises(ValueError):
        parse_announcement(payload)


def _rows(entries: list[tuple[str, list[str]]]) -> list[tuple[bytes, list[bytes]]]:
    return [(eid.encode(), [f.encode() for f in flat]) for eid, flat in entries]


@given(st.text(), st.sampled_from(["a", "b"]))
def test_events_from_rows_match_event_from_entry_byte_for_byte(text: str, source: str) -> None:
    entries = [
        ("5-0", delta_fields(text)),
        ("5-1", delta_fields("")),
        ("6-0", done_fields(2, {"finish_reason": "stop"})),
        ("7-0", error_fields("worker_lost", f"lost {text}")),
        ("8-0", ["text", text, "type", "delta"]),  # not in the usual order: the general path
    ]
    got = events_from_rows(source, _rows(entries))  # type: ignore[arg-type]
    want = [event_from_entry(source, eid, fields_dict(flat)) for eid, flat in entries]  # type: ignore[arg-type]
    assert got == want
    assert [e.sse() for e in got] == [sse_message(e.kind, e.data, str(e.cursor)) for e in want]
    # and the live path's: an announcement of the same entries, as the Lua scripts publish it
    announced = parse_announcement(orjson.dumps({"s": source, "p": "4-0", "e": entries})).events
    assert announced == want
    assert [e.sse() for e in announced] == [sse_message(e.kind, e.data, str(e.cursor)) for e in want]


def test_events_from_rows_refuses_an_unknown_entry_type() -> None:
    with pytest.raises(ValueError, match="unknown entry type"):
        events_from_rows("a", _rows([("1-0", ["type", "mystery"])]))
