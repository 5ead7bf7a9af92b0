"""Container health checks for the tandem image (docker-compose.yml runs them).

    python /app/deploy/healthcheck.py api [--url http://127.0.0.1:8000/readyz]
    python /app/deploy/healthcheck.py worker [--max-idle 30]

`api`: the replica answers its readiness endpoint with 200 (it is up and Redis answers it).

`worker`: Redis at TANDEM_REDIS_URL answers from this container, and a Redis connection from this
container's address other than the check's own ran a command within --max-idle seconds. An arq
worker polls its queue at least every TANDEM_WORKER_POLL_DELAY_S (0.02 s) and jobs write as they run, so a
worker whose event loop is stuck, or that lost its connection, turns unhealthy. arq's own
`<queue>:health-check` key is not used: it is shared by every worker of the queue, refreshed once an
hour, and deleted by whichever worker stops first. Where CLIENT LIST is not allowed (some managed
Redis services), the check falls back to PING alone.

Exit status 0 healthy, 1 unhealthy; one line on stdout says why (Docker keeps it in `docker inspect`).
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from typing import cast

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def check_api(url: str, timeout: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200, f"{url}: {r.status}"
    except urllib.error.HTTPError as e:
        return False, f"{url}: {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"{url}: {e}"


def _ip(addr: str) -> str:
    return addr.rsplit(":", 1)[0]


def check_worker(redis_url: str, max_idle: float, timeout: float) -> tuple[bool, str]:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except redis.RedisError as e:
        return False, f"Redis does not answer: {e}"
    try:
        try:
            me = int(cast(int, client.client_id()))
            clients = cast(list[dict[str, str]], client.client_list())
        except redis.ResponseError as e:
            return True, f"Redis answers; CLIENT LIST refused ({e}), so only PING was checked"
        mine = next((c for c in clients if int(c["id"]) == me), None)
        if mine is None:
            return False, "this check's own connection is missing from CLIENT LIST"
        ip = _ip(mine["addr"])
        idle = [int(c["idle"]) for c in clients if int(c["id"]) != me and _ip(c["addr"]) == ip and "S" not in c.get("flags", "")]
        if not idle:
            return False, f"no Redis connection from {ip} besides this check: the worker is not connected"
        if min(idle) > max_idle:
            return False, f"the connections from {ip} have been idle for {min(idle)}s (> {max_idle}s): the worker is stuck"
        return True, f"{len(idle)} connection(s) from {ip}, most recent command {min(idle)}s ago"
    finally:
        client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="healthcheck", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    api = sub.add_parser("api")
    api.add_argument("--url", default="http://127.0.0.1:8000/readyz")
    api.add_argument("--timeout", type=float, default=3.0)
    worker = sub.add_parser("worker")
    worker.add_argument("--redis-url", default=os.environ.get("TANDEM_REDIS_URL") or DEFAULT_REDIS_URL)
    worker.add_argument("--max-idle", type=float, default=30.0)
    worker.add_argument("--timeout", type=float, default=3.0)
    args = ap.parse_args(argv)
    if args.what == "api":
        ok, why = check_api(args.url, args.timeout)
    else:
        ok, why = check_worker(args.redis_url, args.max_idle, args.timeout)
    print(("healthy: " if ok else "unhealthy: ") + why, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
