"""The resume position: what goes out as an SSE ``id:`` and comes back as ``Last-Event-ID``.

A cursor names one entry of one source's Redis stream (``a-1700000000000-0``), or the stream's
end (``end``). Sources are ordered a < b < end, so a cursor orders every event of a stream, and
resuming from it is exact: everything strictly after it, nothing at or before it.
"""

from __future__ import annotations

import re
from typing import Literal

CursorSource = Literal["a", "b", "end"]

MAX_LEN = 64
_ENTRY = re.compile(r"(0|[1-9][0-9]{0,19})-(0|[1-9][0-9]{0,19})")
_CURSOR = re.compile(r"(a|b)-((?:0|[1-9][0-9]{0,19})-(?:0|[1-9][0-9]{0,19}))")
_RANK = {"a": 0, "b": 1, "end": 2}


class CursorError(ValueError):
    """A Last-Event-ID that is not one this server could have sent."""


class Cursor:
    """Immutable by convention. A plain class with slots, not a frozen dataclass: one is made for
    every event that goes out, and a frozen dataclass's __init__ costs several times as much."""

    __slots__ = ("entry", "source")

    def __init__(self, source: CursorSource, entry: str = "0-0") -> None:
        self.source: CursorSource = source
        self.entry = entry  # Redis stream entry id within `source`; unused for "end"

    @classmethod
    def parse(cls, raw: str) -> Cursor:
        if len(raw) > MAX_LEN:
            raise CursorError("Last-Event-ID is longer than 64 characters")
        if raw == "end":
            return END
        m = _CURSOR.fullmatch(raw)
        if m is None:
            raise CursorError("Last-Event-ID is not an event id of this server ('a-<ms>-<seq>', 'b-<ms>-<seq>' or 'end')")
        ms, _, seq = m.group(2).partition("-")
        if int(ms) >= 2**64 or int(seq) >= 2**64:
            raise CursorError("Last-Event-ID is out of range")
        return cls(m.group(1), m.group(2))  # type: ignore[arg-type]

    def __str__(self) -> str:
        return "end" if self.source == "end" else f"{self.source}-{self.entry}"

    def __repr__(self) -> str:
        return f"Cursor(source={self.source!r}, entry={self.entry!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cursor):
            return NotImplemented
        return self.source == other.source and self.entry == other.entry

    def __hash__(self) -> int:
        return hash((self.source, self.entry))

    @property
    def key(self) -> tuple[int, int, int]:
        ms, _, seq = self.entry.partition("-")
        return (_RANK[self.source], int(ms), int(seq))

    def __lt__(self, other: Cursor) -> bool:
        return self.key < other.key

    def __le__(self, other: Cursor) -> bool:
        return self.key <= other.key


START = Cursor("a", "0-0")
END = Cursor("end", "0-0")


def entry_key(entry_id: str) -> tuple[int, int]:
    """Order of two Redis stream entry ids of one stream."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms), int(seq))


def is_entry_id(value: str) -> bool:
    return _ENTRY.fullmatch(value) is not None
