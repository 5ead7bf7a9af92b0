"""Turns a run's results into the table, the targets of issue 4, the PNG and the field check."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any

THROUGHPUT_FIELDS = (
    "events_per_s", "events_per_s_overall", "events", "duration_s", "server_cpu_us_per_event", "stack_cpu_us_per_event",
    "client_cpu_us_per_event", "server_cpu_pct", "first_delta_p50_ms", "first_delta_p99_ms",
)  # fmt: skip
LATENCY_FIELDS = (
    "token_p50_ms", "token_p99_ms", "due_p50_ms", "due_p99_ms", "ttfd_p50_ms", "ttfd_p99_ms", "server_cpu_pct", "server_cpu_us_per_event",
    "stack_cpu_us_per_event",
)  # fmt: skip
TANDEM_LATENCY_FIELDS = (
    "flush_p50_ms", "flush_p99_ms", "resume_p50_ms", "resume_p99_ms", "flush_steady_p99_ms", "resume_steady_p99_ms",
    "flushes_while_away",
)  # fmt: skip
REDIS_POOL = 6  # TANDEM_REDIS_POOL_SIZE's default; the hub and the multiplexed connection add one each


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(doc, dict) or part not in doc:
            return None
        doc = doc[part]
    return doc


def required_fields(doc: dict[str, Any]) -> list[str]:
    """Every figure a run must produce, as dotted paths into results.json."""
    p = doc.get("params", {})
    parts = set(p.get("parts", ("throughput", "latency", "backlog", "open")))
    paths = ["meta.duration_s", "meta.cpus"]
    for n in p.get("throughput_streams", []):
        paths.append(f"throughput.{n}.ratio")
        paths.append(f"throughput.{n}.tandem.api_redis_conns_max")
        paths.append(f"throughput.{n}.tandem.worker_redis_conns_max")
        for t in ("tandem", "baseline"):
            paths += [f"throughput.{n}.{t}.{f}" for f in THROUGHPUT_FIELDS]
            procs = ("api", "worker0", "worker1", "redis", "client0") if t == "tandem" else ("baseline", "client0")
            paths += [f"throughput.{n}.{t}.cpu.{proc}.pct" for proc in procs]
    if "latency" in parts:
        for t in ("tandem", "baseline"):
            paths += [f"latency.{t}.{f}" for f in LATENCY_FIELDS]
        paths += [f"latency.tandem.{f}" for f in TANDEM_LATENCY_FIELDS]
    if "backlog" in parts:
        paths += ["backlog.tandem.backlog_ms", "backlog.tandem.flush_first_ms", "backlog.baseline.burst_ms"]
    for n in p.get("open_streams", []):
        paths += [f"open_streams.{n}.{t}.rss_per_stream_kib" for t in ("tandem", "baseline")]
        paths += [f"open_streams.{n}.tandem.redis_conns", f"open_streams.{n}.tandem.redis_conns_idle"]
    return paths


def missing(doc: dict[str, Any]) -> list[str]:
    """Required fields that are absent or not a finite number."""
    return [path for path in required_fields(doc) if not _num(_get(doc, path))]


# -- issue 4's targets ------------------------------------------------------------------------


def targets(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []

    def add(name: str, target: str, value: Any, met: bool | None, where: str) -> None:
        out.append({"name": name, "target": target, "value": value, "met": met, "where": where})

    tp = doc.get("throughput", {})
    for n in ("100", "1000"):
        r = _get(tp, f"{n}.ratio")
        add(f"events/s vs baseline @{n}", "ratio >= 1.0", r, None if r is None else r >= 1.0,
            f"{n} streams" if n in tp else "not measured in this mode")  # fmt: skip
    lat = doc.get("latency", {}).get("tandem", {})
    where = f"{lat.get('streams')} streams x {lat.get('tokens_per_s')} tokens/s"
    # "At 1,000 concurrent streams": flushes and resumes once every stream is open. Those during
    # the creation ramp are in the table beside them.
    for key, name, limit in (
        (
            ("token_p99_ms", "token latency p99", 5.0),
            ("flush_steady_p99_ms", "flush reaction p99", 5.0),
            ("resume_steady_p99_ms", "resume latency p99", 20.0),
        )
        if lat
        else ()
    ):
        v = lat.get(key)
        add(name, f"<= {limit:g} ms", v, None if v is None else v <= limit, where + (", all open" if "steady" in key else ""))
    opens = doc.get("open_streams", {})
    if opens:
        n = max(opens, key=int)
        v = _get(opens, f"{n}.tandem.rss_per_stream_kib")
        add("API RSS per open stream", "<= 30 KiB", v, None if v is None else v <= 30.0, f"{n} open streams")
    conns = [c for row in opens.values() for c in (_get(row, "tandem.redis_conns_idle"), _get(row, "tandem.redis_conns"))]
    conns += [_get(row, "tandem.api_redis_conns_max") for row in tp.values()]
    conns = [c for c in conns if _num(c)]
    if conns:
        add("API Redis connections", f"bounded (<= pool {REDIS_POOL} + hub 1 + mux 1), flat in streams", max(conns),
            max(conns) <= REDIS_POOL + 2, "all runs")  # fmt: skip
    bl = doc.get("backlog", {}).get("tandem", {})
    v = bl.get("backlog_ms")
    if bl:
        add("backlog flush to the client", "< 100 ms", v, None if v is None else v < 100.0, f"{bl.get('tokens')} tokens")
    return out


# -- the table --------------------------------------------------------------------------------


def _f(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int) or (isinstance(v, float) and abs(v) >= 1000):
        return f"{v:,.0f}"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def table(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    lines = [
        f"tandem vs baseline: {meta['mode']} run, {meta.get('cpus')} cpus, {meta.get('duration_s')} s, load average "
        f"{meta.get('loadavg_start')} -> {meta.get('loadavg_end')} (ratio = tandem / baseline; ms; ids have 1 ms resolution)",
        f"machine speed, million Python loop steps/s on one core (it varies between runs): {meta.get('python_speed_start')} -> "
        f"{meta.get('python_speed_end')}",
        f"tandem's workers at niceness {meta.get('tandem_env', {}).get('TANDEM_WORKER_NICE', 0)} (TANDEM_WORKER_NICE; `--env TANDEM_WORKER_NICE=10` gives the API a core first)",
        f"{'metric':<46}{'tandem':>12}{'baseline':>12}{'ratio':>8}  target",
    ]

    def row(name: str, t: Any, b: Any, target: str = "", digits: int = 1) -> None:
        r = ratio(t, b) if _num(t) and _num(b) else None
        lines.append(f"{name:<46}{_f(t, digits):>12}{_f(b, digits):>12}{_f(r, 2):>8}  {target}")

    tp = doc.get("throughput", {})
    for n, r in tp.items():
        row(f"events/s @{n} streams (unpaced)", r["tandem"].get("events_per_s"), r["baseline"].get("events_per_s"),
            ">= baseline" if n in ("100", "1000") else "")  # fmt: skip
    for n, r in tp.items():
        # Steady-state events/s above leaves out the start: here the whole run, from the release of
        # the producers to the last stream's end (a burst of job starts shows here).
        row(f"  overall, release -> last end @{n}", r["tandem"].get("events_per_s_overall"), r["baseline"].get("events_per_s_overall"))
    for n, r in tp.items():
        t, b = r["tandem"], r["baseline"]
        row(f"  server CPU us/event @{n}", t.get("server_cpu_us_per_event"), b.get("server_cpu_us_per_event"), digits=2)
        row(f"  all server procs CPU us/event @{n}", t.get("stack_cpu_us_per_event"), b.get("stack_cpu_us_per_event"), digits=2)
        row(f"  client CPU us/event @{n}", t.get("client_cpu_us_per_event"), b.get("client_cpu_us_per_event"), digits=2)
        row(f"  first delta after start p99 @{n}", t.get("first_delta_p99_ms"), b.get("first_delta_p99_ms"))
        row(f"  peak streams active at once @{n}", t.get("peak_active_streams"), b.get("peak_active_streams"))
    lat = doc.get("latency", {})
    t, b = lat.get("tandem", {}), lat.get("baseline", {})
    at = f"@{t.get('streams')}x{_f(t.get('tokens_per_s'), 0)}/s"
    if t:
        _latency_rows(row, t, b, at)
    bl = doc.get("backlog", {})
    if bl:
        tb, bb = bl.get("tandem", {}), bl.get("baseline", {})
        row(
            f"{_f(tb.get('tokens'))}-token backlog: B done->last A (base: burst)",
            tb.get("backlog_ms"),
            bb.get("burst_ms"),
            "< 100 ms",
        )
        row("  B done -> first flushed A delta", tb.get("flush_first_ms"), None, digits=2)
    for n, r in doc.get("open_streams", {}).items():
        row(f"API RSS KiB per open stream @{n}", r["tandem"].get("rss_per_stream_kib"), r["baseline"].get("rss_per_stream_kib"),
            "<= 30 KB" if n == max(doc["open_streams"], key=int) else "")  # fmt: skip
    for n, r in doc.get("open_streams", {}).items():
        t = r["tandem"]
        lines.append(
            f"{'API Redis conns: idle -> ' + n + ' open':<46}{_f(t.get('redis_conns_idle')) + ' -> ' + _f(t.get('redis_conns')):>12}"
        )
    peak = [r["tandem"].get("api_redis_conns_max") for r in tp.values()]
    lines.append(f"{'API Redis conns, max during unpaced runs':<46}{_f(max((p for p in peak if _num(p)), default=None)):>12}")
    for n, r in tp.items():
        row(f"worker Redis conns, max of one worker @{n}", r["tandem"].get("worker_redis_conns_max"), None)
    lines.append("CPU, % of one core, per process, over each run's window ('others': the rest of the machine):")
    idle = doc.get("idle_cpu")
    if idle:
        lines.append("  idle    " + ", ".join(f"{k} {v['pct']:.0f}" for k, v in idle.items()))
    for n, r in tp.items():
        parts = [f"{k} {v['pct']:.0f}" for k, v in r["tandem"].get("cpu", {}).items()]
        parts_b = [f"{k} {v['pct']:.0f}" for k, v in r["baseline"].get("cpu", {}).items()]
        lines.append(f"  @{n:<6} tandem: {', '.join(parts)} | baseline: {', '.join(parts_b)}")
    for name, r in doc.get("latency", {}).items():
        parts = [f"{k} {v['pct']:.0f}" for k, v in r.get("cpu", {}).items()]
        lines.append(f"  paced   {name}: {', '.join(parts)}")
    prof = doc.get("profile")
    if prof and "error" in prof:
        lines.append(f"API profile: {prof['error']}")
    if prof and "top_self" in prof:
        lines.append(f"API profile (py-spy, {prof['streams']} unpaced streams, {_f(prof.get('events_per_s'))} events/s while "
                     f"sampled, busy {prof['active_fraction'] * 100:.0f}% of samples), top by own time:")  # fmt: skip
        for e in prof["top_self"][:10]:
            lines.append(f"  {e['pct']:5.1f}%  {e['function']}")
    lines.append("targets of issue 4 (tandem):")
    for tg in doc.get("targets", []):
        met = {True: "MET", False: "NOT MET", None: "n/a"}[tg["met"]]
        lines.append(f"  {tg['name']:<36} {tg['target']:<44} {_f(tg['value'], 2):>8}  {met:<8} ({tg['where']})")
    return "\n".join(lines)


def _latency_rows(row: Any, t: dict[str, Any], b: dict[str, Any], at: str) -> None:
    row(f"token latency p50 {at}", t.get("token_p50_ms"), b.get("token_p50_ms"), digits=2)
    row(f"token latency p99 {at}", t.get("token_p99_ms"), b.get("token_p99_ms"), "<= 5 ms", digits=2)
    row(f"  from its due time p50 / p99 {at}", t.get("due_p50_ms"), b.get("due_p50_ms"), digits=2)
    row("", t.get("due_p99_ms"), b.get("due_p99_ms"), digits=2)
    row(f"time to first delta p50 (create->) {at}", t.get("ttfd_p50_ms"), b.get("ttfd_p50_ms"))
    row(f"time to first delta p99 (create->) {at}", t.get("ttfd_p99_ms"), b.get("ttfd_p99_ms"))
    row(f"flush reaction p50 / p99, all open {at}", t.get("flush_steady_p50_ms"), None, digits=2)
    row("", t.get("flush_steady_p99_ms"), None, "<= 5 ms", digits=2)
    row("  p50 / p99 incl. the creation ramp", t.get("flush_p50_ms"), None, digits=2)
    row("", t.get("flush_p99_ms"), None, digits=2)
    row("  left out: B done while its client was away", t.get("flushes_while_away"), None, digits=0)
    row("  token latency p50 / p99 over the same span", t.get("token_flush_span_p50_ms"), None, digits=2)
    row("", t.get("token_flush_span_p99_ms"), None, digits=2)
    row(f"resume p50 / p99, all open {at}", t.get("resume_steady_p50_ms"), None, digits=2)
    row("", t.get("resume_steady_p99_ms"), None, "<= 20 ms", digits=2)
    row("  p50 / p99 incl. the creation ramp", t.get("resume_p50_ms"), None, digits=2)
    row("", t.get("resume_p99_ms"), None, digits=2)
    row(f"  creation ramp: {_f(t.get('streams'))} streams created in (s)", t.get("ramp_s"), None, digits=2)
    row(f"  server CPU % of a core {at}", t.get("server_cpu_pct"), b.get("server_cpu_pct"))
    row(f"  server CPU us/event {at}", t.get("server_cpu_us_per_event"), b.get("server_cpu_us_per_event"))
    row(f"  all server procs CPU us/event {at}", t.get("stack_cpu_us_per_event"), b.get("stack_cpu_us_per_event"))
    row(f"  streams complete, in order {at}", t.get("streams_ok"), b.get("streams_ok"), f"= {_f(t.get('streams'))}")


def problems(doc: dict[str, Any]) -> list[str]:
    """What a run got wrong rather than slow: streams that did not complete, with every token (and
    for paced streams, in order and exactly once)."""
    out: list[str] = []
    for n, run in sorted((doc.get("throughput") or {}).items(), key=lambda kv: int(kv[0])):
        for name in ("tandem", "baseline"):
            r = run.get(name) or {}
            if r and (r.get("events") != r.get("events_expected") or r.get("streams_complete") != r.get("streams") or r.get("errors")):
                out.append(f"{name} @{n} streams: {r.get('events')} of {r.get('events_expected')} events delivered, "
                           f"{r.get('streams_complete')} of {r.get('streams')} streams ended, errors {r.get('errors')}")  # fmt: skip
    for name, r in (doc.get("latency") or {}).items():
        if r.get("streams_ok") != r.get("streams") or r.get("order_errors"):
            out.append(f"{name}: {r.get('streams_ok')} of {r.get('streams')} paced streams complete, "
                       f"{r.get('order_errors')} out-of-order events, errors {r.get('errors')}")  # fmt: skip
    return out


# -- the picture ------------------------------------------------------------------------------


def plot(doc: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    tp = doc.get("throughput", {})
    ns = sorted(tp, key=int)
    for name, style in (("tandem", "o-"), ("baseline", "s--")):
        ys = [tp[n][name].get("events_per_s") for n in ns]
        ax1.plot([int(n) for n in ns], [y if y is not None else float("nan") for y in ys], style, label=name)
    ax1.set_xscale("log")
    ax1.set_ylim(bottom=0)
    ax1.set_xlabel("concurrent streams (unpaced)")
    ax1.set_ylabel("delivered events/s")
    ax1.set_title("throughput")
    ax1.grid(True, alpha=0.3)
    ax1.legend()
    lat = doc.get("latency", {})
    for name in ("tandem", "baseline"):
        cdf = lat.get(name, {}).get("token_cdf_ms") or []
        if cdf:
            ax2.plot([max(x, 0.01) for x in cdf], [i / (len(cdf) - 1) for i in range(len(cdf))], label=name)
    t = lat.get("tandem", {})
    ax2.set_xscale("log")
    ax2.set_xlabel("token latency, write -> client receipt (ms)")
    ax2.set_ylabel("fraction of tokens")
    ax2.set_title(f"token latency CDF, {t.get('streams')} streams x {t.get('tokens_per_s')} tokens/s")
    ax2.grid(True, alpha=0.3)
    if ax2.get_lines():
        ax2.legend()
    fig.suptitle(f"tandem vs in-process baseline ({doc['meta']['mode']} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# -- py-spy -----------------------------------------------------------------------------------


def parse_pyspy(path: Path, expected_samples: float, top: int = 10) -> dict[str, Any]:
    """Top functions of the event loop's thread, by own and inclusive time, from `py-spy record --format raw -F`."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [f for f in stack.split(";") if "(" in f and not f.startswith(("process ", "thread "))]
        # The event loop's thread only: anyio's worker threads wait in Condition.wait, which a
        # blocking py-spy does not always see as idle.
        if not any(f.startswith("Runner.run (asyncio/runners.py") for f in frames):
            continue
        total += n
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n

    def entries(c: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "samples": k, "pct": round(100 * k / total, 1)} for f, k in c.most_common(top)]

    # Inclusive: leave out the start-up chain every sample shares (runpy ... asyncio Runner.run).
    incl = Counter({f: k for f, k in incl.items() if k < 0.85 * total})
    return {
        "samples": total,
        "active_fraction": round(min(1.0, total / expected_samples), 3) if expected_samples else None,
        "note": "own time of 'Runner.run (asyncio/runners.py)' is the event loop in C: uvloop, epoll and socket syscalls",
        "top_self": entries(own) if total else [],
        "top_inclusive": entries(incl) if total else [],
    }
