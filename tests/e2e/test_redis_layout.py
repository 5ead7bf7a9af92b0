"""What an operator sees with redis-cli: plain strings and JSON, every stream key hash-tagged."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from shared.keys import Keys
from shared.redis_server import RedisServer
from tests.client import create, read_events
from tests.harness import stack

pytestmark = pytest.mark.e2e


def cli(server: RedisServer, *args: str) -> str:
    out = subprocess.run(["redis-cli", "-p", str(server.port), "--no-raw", *args], capture_output=True, check=True)
    return out.stdout.decode("utf-8")  # strict: everything tandem writes is UTF-8


def test_redis_cli_shows_plain_strings_and_json(tmp_path: Path, redis_server: RedisServer) -> None:
    with stack(tmp_path, redis_server, apis=1, workers=1) as s:
        base = s.apis[0].url
        h = create(base, {"prompt": "layout", "a": {"task": "simulated", "options": {"text": "héllo \"wörld\"\n🙂", "interval_ms": 0}},
                          "b": {"task": "simulated", "options": {"tokens": 2, "interval_ms": 0}}})
        assert read_events(base, h["events_url"]).ended
        keys = Keys(s.prefix)
        sid = h["id"]
        listed = cli(redis_server, "--scan", "--pattern", f"{s.prefix}:*").split()
        mine = [k.strip('"') for k in listed if sid in k]
        assert sorted(mine) == sorted(keys.stream_keys(sid)), mine
        assert all(f"{{{sid}}}" in k for k in mine), "every key of a stream carries its hash tag"
        assert cli(redis_server, "TYPE", keys.meta(sid)).strip() == "hash"
        assert cli(redis_server, "TYPE", keys.events(sid, "a")).strip() == "stream"

        raw = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--raw", "HGETALL", keys.meta(sid)], capture_output=True, check=True)
        lines = raw.stdout.decode("utf-8").split("\n")
        meta = dict(zip(lines[0::2], lines[1::2], strict=False))
        assert meta["status"] == "completed" and meta["a_state"] == "done"
        for field in ("pacing", "a_options", "b_options"):
            json.loads(meta[field])
        assert "token" not in meta and len(meta["token_sha256"]) == 64, "only the token's hash is stored"
        xr = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--raw", "XRANGE", keys.events(sid, "a"), "-", "+"], capture_output=True, check=True)
        text = xr.stdout.decode("utf-8")
        assert "delta" in text and "wörld" in text and "🙂" in text
        ttl = int(cli(redis_server, "TTL", keys.meta(sid)).split()[-1])
        assert 0 < ttl <= 3600
        # arq's own records are JSON too (no pickle anywhere).
        for k in cli(redis_server, "--scan", "--pattern", f"arq:*{sid}*").split():
            k = k.strip('"')
            if cli(redis_server, "TYPE", k).strip() == "string":
                blob = subprocess.run(["redis-cli", "-p", str(redis_server.port), "--raw", "GET", k], capture_output=True, check=True).stdout
                json.loads(blob)
