"""shared/keys.py: every key of one stream shares one hash tag (one Redis Cluster slot)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from shared.keys import SOURCES, Keys


def all_stream_keys(k: Keys, sid: str) -> list[str]:
    return [
        k.meta(sid),
        k.events(sid, "a"),
        k.events(sid, "b"),
        k.lease(sid, "a"),
        k.lease(sid, "b"),
        k.channel(sid),
        k.job_id(sid, "a"),
        k.job_id(sid, "b"),
    ]


def test_key_shapes() -> None:
    k = Keys("tandem")
    sid = "Xy_-9"
    assert k.meta(sid) == "tandem:{Xy_-9}:meta"
    assert k.events(sid, "a") == "tandem:{Xy_-9}:a"
    assert k.events(sid, "b") == "tandem:{Xy_-9}:b"
    assert k.lease(sid, "b") == "tandem:{Xy_-9}:lease:b"
    assert k.channel(sid) == "tandem:{Xy_-9}:live"
    assert k.job_id(sid, "a") == "tandem:{Xy_-9}:job:a"
    assert k.stream_keys(sid) == ["tandem:{Xy_-9}:meta", "tandem:{Xy_-9}:a", "tandem:{Xy_-9}:b"]
    assert k.index == "tandem:streams"
    assert k.running == "tandem:running"
    assert SOURCES == ("a", "b")


def test_default_prefix() -> None:
    assert Keys().meta("x") == "tandem:{x}:meta"


@pytest.mark.parametrize("prefix", ["tandem", "t1", "my.app-2_x"])
@pytest.mark.parametrize("sid", ["abc", "Zx9-_Q", "a" * 22])
def test_one_slot_per_stream(prefix: str, sid: str) -> None:
    k = Keys(prefix)
    keys = all_stream_keys(k, sid)
    assert len(set(keys)) == len(keys)
    assert all(key.startswith(prefix + ":{" + sid + "}:") for key in keys)
    assert {key_slot(key.encode()) for key in keys} == {key_slot(sid.encode())}


def test_keys_are_unique_per_stream_and_prefix() -> None:
    k1, k2 = Keys("p1"), Keys("p2")
    assert not set(all_stream_keys(k1, "s")) & set(all_stream_keys(k1, "t"))
    assert not set(all_stream_keys(k1, "s")) & set(all_stream_keys(k2, "s"))
    assert k1.index != k2.index and k1.running != k2.running


@pytest.mark.parametrize(
    ("key", "sid"),
    [
        ("tandem:{abc}:meta", "abc"),
        ("tandem:{abc}:a", "abc"),
        ("tandem:{a-b_c}:lease:b", "a-b_c"),
        ("tandem:streams", None),
        ("tandem:running", None),
        ("other:{abc}:meta", None),
        ("tandemx:{abc}:meta", None),
        ("tandem:{abc", None),
        ("", None),
    ],
)
def test_stream_id_from_key(key: str, sid: str | None) -> None:
    assert Keys("tandem").stream_id_from_key(key) == sid


def test_stream_id_round_trip() -> None:
    k = Keys("pre.fix")
    for key in all_stream_keys(k, "S1d"):
        assert k.stream_id_from_key(key) == "S1d"


def test_keys_is_a_frozen_value() -> None:
    assert Keys("x") == Keys("x")
    assert hash(Keys("x")) == hash(Keys("x"))
    with pytest.raises(AttributeError):
        Keys("x").prefix = "y"  # type: ignore[misc]
