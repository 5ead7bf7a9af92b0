"""`tandem stream`: create a stream and print it live, paced, as a person would watch it."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

import httpx
import orjson
from httpx_sse import aconnect_sse


@dataclass
class Transcript:
    events: list[tuple[float, str, dict[str, Any]]] = field(default_factory=list)  # (t, event, data)
    text: dict[str, str] = field(default_factory=lambda: {"a": "", "b": ""})
    status: str | None = None
    reconnects: int = 0


class Printer:
    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color
        self.t0 = time.monotonic()

    def _c(self, code: str, s: str) -> str:
        return f"\x1b[{code}m{s}\x1b[0m" if self.color else s

    def phase(self, phase: str) -> None:
        label = {"slow": "A, slowly while B runs", "flush": "B done: A flushes", "waiting": "A done, waiting for B", "b": "B"}
        self.out.write(self._c("2", f"\n[{time.monotonic() - self.t0:6.2f}s {phase}: {label.get(phase, phase)}]\n"))
        self.out.flush()

    def delta(self, source: str, text: str) -> None:
        self.out.write(text if source == "a" else self._c("36", text))
        self.out.flush()

    def line(self, s: str) -> None:
        self.out.write(self._c("2", s) + "\n")
        self.out.flush()


def build_request(prompt: str, args: Any) -> dict[str, Any]:
    a_opts: dict[str, Any] = {"tokens": args.a_tokens, "interval_ms": args.a_interval_ms}
    b_opts: dict[str, Any] = {"delay_ms": args.b_delay_ms, "tokens": args.b_tokens, "interval_ms": args.b_interval_ms}
    if args.b_text is not None:
        b_opts["text"] = args.b_text
    return {
        "prompt": prompt,
        "a": {"task": args.a_task, "options": a_opts if args.a_task == "simulated" else {}},
        "b": {"task": args.b_task, "options": b_opts if args.b_task == "simulated" else {}},
        "pacing": {"slow_interval_ms": args.slow_interval_ms, "b_interval_ms": args.b_spacing_ms},
    }


async def follow(client: httpx.AsyncClient, events_url: str, printer: Printer | None, max_reconnects: int = 20) -> Transcript:
    """Read one stream to its `end`, resuming with Last-Event-ID if the connection drops."""
    tr = Transcript()
    last_id: str | None = None
    t0 = time.monotonic()
    while True:
        headers = {"Last-Event-ID": last_id} if last_id else {}
        try:
            async with aconnect_sse(client, "GET", events_url, headers=headers, timeout=httpx.Timeout(10.0, read=None)) as es:
                if es.response.status_code == 204:
                    return tr
                if es.response.status_code != 200:
                    body = await es.response.aread()
                    raise SystemExit(f"tandem: {es.response.status_code} {body.decode(errors='replace')}")
                async for sse in es.aiter_sse():
                    data = orjson.loads(sse.data) if sse.data else {}
                    tr.events.append((time.monotonic() - t0, sse.event, data))
                    if sse.id:
                        last_id = sse.id
                    if sse.event == "phase" and printer:
                        printer.phase(data["phase"])
                    elif sse.event == "delta":
                        tr.text[data["source"]] += data["text"]
                        if printer:
                            printer.delta(data["source"], data["text"])
                    elif sse.event == "error" and printer:
                        printer.line(f"\n[{data['source']} error {data['code']}: {data['message']}]")
                    elif sse.event == "end":
                        tr.status = data["status"]
                        return tr
        except (httpx.TransportError, httpx.StreamError) as e:
            tr.reconnects += 1
            if tr.reconnects > max_reconnects:
                raise SystemExit(f"tandem: lost the stream: {e}") from None
            if printer:
                printer.line(f"\n[connection dropped ({type(e).__name__}); resuming after {last_id}]")
            await asyncio.sleep(min(0.2 * tr.reconnects, 2.0))


FLUSH_BURST_S = 0.05  # A deltas this soon after the flush phase count as "flushed at once"


def _rate(n: int, t0: float, t1: float) -> str:
    return f", {n / (t1 - t0):.1f}/s" if n > 1 and t1 > t0 else ""


def summarize(tr: Transcript) -> list[str]:
    """What a person watching wants to know: when the answer started, how A was paced while B
    ran, how much the flush released at once, and how B followed."""
    deltas = {src: [t for t, ev, d in tr.events if ev == "delta" and d.get("source") == src] for src in ("a", "b")}
    phases = {d.get("phase"): t for t, ev, d in reversed(tr.events) if ev == "phase"}  # first time of each
    end = next((t for t, ev, _ in tr.events if ev == "end"), None)
    first = min((ts[0] for ts in deltas.values() if ts), default=None)
    out = [f"status: {tr.status}" + (f" after {end:.2f} s" if end is not None else "")]
    if first is not None:
        out.append(f"time to first delta: {first * 1000:.0f} ms")
    a, b = deltas["a"], deltas["b"]
    flush = phases.get("flush")
    if flush is not None:
        slow = [t for t in a if t < flush]
        after = [t for t in a if t >= flush]
        burst = sum(1 for t in after if t - flush <= FLUSH_BURST_S)
        out.append(f"A slow while B ran: {len(slow)} deltas{_rate(len(slow), slow[0] if slow else 0.0, flush)}")
        out.append(f"B done at {flush:.2f} s: A flushed {burst} deltas at once, {len(after)} in all after it")
    else:
        out.append(f"A: {len(a)} deltas{_rate(len(a), a[0] if a else 0.0, a[-1] if a else 0.0)} (B was still running when A ended)")
    waiting = phases.get("waiting")
    if waiting is not None and b:
        out.append(f"waited {b[0] - waiting:.2f} s for B after A was done")
    if b:
        out.append(f"B: {len(b)} deltas from {b[0]:.2f} s{_rate(len(b), b[0], b[-1])}")
    else:
        out.append("B: no deltas")
    if tr.reconnects:
        out.append(f"resumed {tr.reconnects} time(s) with Last-Event-ID")
    return out


async def run_stream(args: Any, base_url: str, api_key: str | None) -> int:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    color = sys.stdout.isatty() and not args.no_color
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10.0) as client:
        prompt = args.prompt
        while True:
            if not prompt:
                if args.once or not sys.stdin.isatty():
                    return 0
                try:
                    prompt = (await asyncio.to_thread(input, "prompt> ")).strip()
                except EOFError:
                    return 0
                if not prompt:
                    continue
            r = await client.post("/v1/streams", json=build_request(prompt, args))
            if r.status_code != 201:
                print(f"tandem: {r.status_code} {r.text}", file=sys.stderr)
                return 1
            handles = r.json()
            printer = Printer(sys.stdout, color)
            printer.line(f"stream {handles['id']}")
            tr = await follow(client, handles["events_url"], printer)
            print()
            for line in summarize(tr):
                printer.line(line)
            if args.once or args.prompt:
                return 0 if tr.status == "completed" else 2
            prompt = None
