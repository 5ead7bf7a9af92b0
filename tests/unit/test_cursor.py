"""shared/cursor.py: what a Last-Event-ID may be, how it prints, and how cursors order."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shared.cursor import END, MAX_LEN, START, Cursor, CursorError, entry_key, is_entry_id

U64_MAX = 2**64 - 1

VALID = [
    ("a-0-1", Cursor("a", "0-1")),
    ("a-0-0", START),
    ("b-1700000000000-3", Cursor("b", "1700000000000-3")),
    ("end", END),
    (f"a-{U64_MAX}-{U64_MAX}", Cursor("a", f"{U64_MAX}-{U64_MAX}")),
    ("b-10-0", Cursor("b", "10-0")),
]


@pytest.mark.parametrize(("raw", "expected"), VALID)
def test_valid(raw: str, expected: Cursor) -> None:
    cursor = Cursor.parse(raw)
    assert cursor == expected
    assert str(cursor) == raw


INVALID = [
    "",
    "x-1-1",
    "c-1-1",
    "A-1-1",
    "a",
    "a-",
    "a-1",
    "a-1-",
    "a--1",
    "a-1-1-1",
    "a-01-1",
    "a-1-01",
    "a-00-0",
    "a--1-1",
    "a-1--1",
    "a-+1-1",
    "a-1.0-1",
    "a-0x1-1",
    "a-1-1\x00",
    "a-1\x00-1",
    "a-1-1\r",
    "a-1-1\n",
    "a-1-1\r\n",
    "\na-1-1",
    "a-1-1 ",
    " a-1-1",
    "a- 1-1",
    "a-1-1\t",
    "END",
    "end ",
    "end\n",
    "ends",
    "a-0-1" + "0" * 60,  # 65 characters
    "x" * 65,
    "a-" + "1" * 70 + "-1",
    f"a-{2**64}-0",
    f"a-0-{2**64}",
    f"b-{2**64}-{2**64}",
    "a-" + "9" * 20 + "-0",  # 20 digits but > 2**64
    "a-" + "1" * 21 + "-0",
    "a-\u0661-1",  # ARABIC-INDIC DIGIT ONE
    "a-1-\u0661",
    "a-\uff11-1",  # FULLWIDTH DIGIT ONE
    "a-²-1",  # SUPERSCRIPT TWO: str.isdigit() is True
    "\u0430-1-1",  # CYRILLIC SMALL LETTER A
    "a_1_1",
    "a:1-1",
]


@pytest.mark.parametrize("raw", INVALID)
def test_invalid(raw: str) -> None:
    with pytest.raises(CursorError):
        Cursor.parse(raw)


def test_cursor_error_is_a_value_error_with_a_message() -> None:
    with pytest.raises(ValueError, match="64 characters"):
        Cursor.parse("a" * (MAX_LEN + 1))
    with pytest.raises(ValueError, match="out of range"):
        Cursor.parse(f"a-{2**64}-0")
    with pytest.raises(ValueError, match="a-<ms>-<seq>"):
        Cursor.parse("x-1-1")


def test_max_len_is_64_and_longest_valid_cursor_fits() -> None:
    longest = f"b-{U64_MAX}-{U64_MAX}"
    assert MAX_LEN == 64
    assert len(longest) <= MAX_LEN
    assert str(Cursor.parse(longest)) == longest


@given(source=st.sampled_from(["a", "b"]), ms=st.integers(0, U64_MAX), seq=st.integers(0, U64_MAX))
def test_round_trip(source: str, ms: int, seq: int) -> None:
    raw = f"{source}-{ms}-{seq}"
    cursor = Cursor.parse(raw)
    assert str(cursor) == raw
    assert cursor.key == ({"a": 0, "b": 1}[source], ms, seq)
    assert Cursor.parse(str(cursor)) == cursor


@given(st.text(max_size=80))
def test_parse_accepts_only_what_it_prints(raw: str) -> None:
    """Whatever parses prints back as itself, and is printable ASCII without CR, LF or NUL."""
    try:
        cursor = Cursor.parse(raw)
    except CursorError:
        return
    assert str(cursor) == raw
    assert raw.isascii() and raw.isprintable()
    assert len(raw) <= MAX_LEN


def test_ordering_sources() -> None:
    a = Cursor.parse(f"a-{U64_MAX}-{U64_MAX}")
    b = Cursor.parse("b-0-0")
    assert START < a < b < END
    assert Cursor.parse("b-99999999999999-9") < END
    assert not END < b
    assert END <= END
    assert b > a  # reflected __lt__
    assert b >= a


@pytest.mark.parametrize(
    ("lo", "hi"),
    [
        ("a-9-0", "a-10-0"),  # "10" < "9" as strings
        ("a-1-9", "a-1-10"),
        ("a-2-100", "a-10-0"),
        ("b-999-999", "b-1000-0"),
        ("a-1700000000000-3", "a-1700000000001-0"),
    ],
)
def test_ordering_is_numeric(lo: str, hi: str) -> None:
    assert Cursor.parse(lo) < Cursor.parse(hi)
    assert not Cursor.parse(hi) < Cursor.parse(lo)
    assert Cursor.parse(lo) <= Cursor.parse(hi)


def test_sorting_matches_key() -> None:
    raws = ["end", "b-1-0", "a-10-0", "a-9-5", "a-9-10", "b-0-1", "a-0-0"]
    ordered = sorted(Cursor.parse(r) for r in raws)
    assert [str(c) for c in ordered] == ["a-0-0", "a-9-5", "a-9-10", "a-10-0", "b-0-1", "b-1-0", "end"]


def test_equality_and_hash() -> None:
    assert Cursor.parse("a-1-2") == Cursor("a", "1-2")
    assert Cursor.parse("a-1-2") != Cursor.parse("b-1-2")
    assert len({Cursor.parse("a-1-2"), Cursor("a", "1-2"), END, Cursor.parse("end")}) == 2
    assert Cursor.parse("end") is END


@pytest.mark.parametrize(
    ("value", "ok"),
    [("0-0", True), ("1-0", True), ("1700000000000-12", True), ("01-0", False), ("1", False), ("1-", False),
     ("-1", False), ("a-1-0", False), ("1-0 ", False), ("*", False), ("", False), ("\u0661-1", False)],
)
def test_is_entry_id(value: str, ok: bool) -> None:
    assert is_entry_id(value) is ok


def test_entry_key_is_numeric() -> None:
    assert entry_key("9-0") < entry_key("10-0")
    assert entry_key("1-9") < entry_key("1-10")
    assert entry_key("0-0") == (0, 0)
