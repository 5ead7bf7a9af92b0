"""`tandem`: up, api, worker, stream (and the operator commands)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.ops import COMMANDS as OPS_COMMANDS
from cli.ops import add_commands as add_ops_commands
from cli.ops import run as run_ops
from shared.settings import Settings


def _add_stream_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--a-task", default="simulated")
    p.add_argument("--b-task", default="simulated")
    p.add_argument("--a-tokens", type=int, default=40)
    p.add_argument("--a-interval-ms", type=float, default=40)
    p.add_argument("--b-delay-ms", type=float, default=2500)
    p.add_argument("--b-tokens", type=int, default=12)
    p.add_argument("--b-interval-ms", type=float, default=30)
    p.add_argument("--b-text", default=None)
    p.add_argument("--slow-interval-ms", type=int, default=250)
    p.add_argument("--b-spacing-ms", type=int, default=60)
    p.add_argument("--no-color", action="store_true")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="tandem", description="Paced, resumable SSE for two tasks run in tandem.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    up = sub.add_parser("up", help="Redis (embedded when TANDEM_REDIS_URL is unset), workers and the API")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    up.add_argument("--workers", type=int, default=1)
    up.add_argument("--data-dir", default=".tandem", help="where the embedded Redis keeps its files")
    up.add_argument("--demo", action="store_true", help="run one demo stream in the terminal, then stop everything")
    _add_stream_args(up)

    api = sub.add_parser("api", help="one API process (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)

    sub.add_parser("worker", help="one arq worker process running tasks A and B")

    st = sub.add_parser("stream", help="create a stream and print it live")
    st.add_argument("prompt", nargs="?", default=None)
    st.add_argument("--url", default=os.environ.get("TANDEM_URL", "http://127.0.0.1:8000"))
    st.add_argument("--once", action="store_true", help="exit after one stream (no prompt for another)")
    _add_stream_args(st)
    add_ops_commands(sub)  # ls, show, tail, stats, cancel
    return ap


def cmd_api(settings: Settings, host: str, port: int) -> int:
    import uvicorn

    from api.app import close_streams, create_app

    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: object) -> None:
            # Open SSE responses never finish on their own: end them now, so the graceful
            # shutdown takes moments and every client resumes elsewhere.
            close_streams(app)
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="api.loop:new_event_loop",  # uvloop, accepting every waiting connection per turn
        http="httptools",
        access_log=False,  # URLs carry stream tokens: never log them
        log_level="warning",
        timeout_graceful_shutdown=max(1, int(settings.sse_shutdown_grace_s) + 2),
        # Longer than any proxy's idle upstream keepalive (deploy/nginx.conf: 60s), so the proxy always
        # closes an idle connection first; else a POST can meet a connection closing under it (502).
        timeout_keep_alive=75,
    )
    Server(config).run()
    return 0


def cmd_worker(settings: Settings) -> int:
    import uvloop

    from shared.logs import setup_logging
    from workers.settings import make_worker

    setup_logging(settings)
    lower_priority(settings.worker_nice)
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.set_event_loop(asyncio.new_event_loop())
    make_worker(settings).run()
    return 0


def lower_priority(nice: int) -> None:
    """Run at niceness `nice` (TANDEM_WORKER_NICE), or at the one inherited if that is already
    higher: an unprivileged process may always lower its own priority, never raise it."""
    if nice > os.getpriority(os.PRIO_PROCESS, 0):
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        logging.getLogger("tandem.worker").info("running at niceness %d (TANDEM_WORKER_NICE)", nice)


def _wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise SystemExit("tandem up: a process exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"tandem up: the API was not ready within {timeout}s")


def cmd_up(settings: Settings, args: argparse.Namespace) -> int:
    from shared.redis_server import RedisServer, free_port

    port = args.port or free_port()
    env = dict(os.environ)
    redis = None
    if settings.redis_url is None:
        redis = RedisServer(Path(args.data_dir) / "redis").start()
        env["TANDEM_REDIS_URL"] = redis.url
        print(f"tandem up: embedded Redis ({redis.origin}) at {redis.url}, data in {redis.data_dir}", flush=True)
    me = [sys.executable, "-m", "cli"]
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(args.workers):
            procs.append(subprocess.Popen([*me, "worker"], env=env))
        procs.append(subprocess.Popen([*me, "api", "--host", args.host, "--port", str(port)], env=env))
        base = f"http://{args.host}:{port}"
        _wait_ready(base, procs)
        print(f"tandem up: API at {base}, {args.workers} worker(s). Ctrl-C stops everything.", flush=True)
        if args.demo:
            from cli.stream import run_stream

            args.prompt, args.once = "Explain Redis streams", True
            if args.b_text is None:
                args.b_text = "Sources: [1] Redis streams introduction [2] the SSE specification, section 9.2"
            return asyncio.run(run_stream(args, base, settings.api_key))
        while all(p.poll() is None for p in procs):
            time.sleep(0.5)
        print("tandem up: a process exited; stopping", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        if redis is not None:
            redis.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    settings = Settings()
    if args.cmd == "api":
        return cmd_api(settings, args.host, args.port)
    if args.cmd == "worker":
        return cmd_worker(settings)
    if args.cmd == "up":
        return cmd_up(settings, args)
    if args.cmd in OPS_COMMANDS:
        return run_ops(args, settings)
    if args.cmd == "stream":
        from cli.stream import run_stream

        return asyncio.run(run_stream(args, args.url, settings.api_key))
    raise SystemExit(f"unknown command {args.cmd}")
