"""What one process costs, read from /proc: CPU time, RSS, open files, TCP peers; and small statistics."""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Iterable, Sequence

CLK_TCK = os.sysconf("SC_CLK_TCK")
NOFILE = 65536


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (clock-tick resolution: 10 ms), 0.0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return 0.0
    rest = raw[raw.rindex(b")") + 2 :].split()
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def fd_count(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _socket_inodes(pid: int) -> set[int]:
    out: set[int] = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def local_ports_to(pid: int, remote_port: int) -> set[int]:
    """Local ports of `pid`'s TCP connections whose peer is `remote_port` (IPv4 and IPv6)."""
    inodes = _socket_inodes(pid)
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                next(f)
                for line in f:
                    cols = line.split()
                    if int(cols[9]) in inodes and int(cols[2].rsplit(":", 1)[1], 16) == remote_port:
                        ports.add(int(cols[1].rsplit(":", 1)[1], 16))
        except OSError:
            continue
    return ports


def raise_nofile(pid: int | None = None, n: int = NOFILE) -> int:
    """Raise RLIMIT_NOFILE of `pid` (None: this process) to `n`, or as far as allowed; returns the soft limit."""
    if pid is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        for lim in ((max(n, soft), max(n, hard)), (hard, hard)):
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, lim)
                break
            except (ValueError, OSError):
                continue
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    for lim in ((max(n, soft), max(n, hard)), (hard, hard)):
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, lim)
            break
        except (ValueError, OSError):
            continue
    return resource.prlimit(pid, resource.RLIMIT_NOFILE)[0]


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine spent not idle (all processes, the kernel too)."""
    with open("/proc/stat") as f:
        cols = [int(x) for x in f.readline().split()[1:]]
    idle = cols[3] + (cols[4] if len(cols) > 4 else 0)
    steal = cols[7] if len(cols) > 7 else 0
    return (sum(cols[:8]) - idle - steal) / CLK_TCK


def python_speed(steps: int = 2_000_000) -> float:
    """Millions of simple interpreter steps per second on one core, now: the machine's speed,
    which on a shared VM changes between runs (and within one) by more than any change to tandem
    does. Printed with every table, so a run made in a slow phase says so."""
    t = time.perf_counter()
    s = 0
    for i in range(steps):
        s += i
    return round(steps / (time.perf_counter() - t) / 1e6, 1)


class CpuWindow:
    """CPU seconds of several processes between `start()` and `stop()`, and the wall time.

    `others` is what every other process on the machine used meanwhile (the machine's busy time
    minus ours): on a shared machine, the load the figures were measured under.
    """

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = dict(pids)
        self._t0 = 0.0
        self._c0: dict[str, float] = {}
        self._m0 = 0.0
        self.wall = 0.0
        self.cpu: dict[str, float] = {}

    def start(self, now: float) -> None:
        self._t0 = now
        self._c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        self._m0 = machine_busy_seconds()

    def stop(self, now: float) -> None:
        self.wall = max(now - self._t0, 1e-9)
        self.cpu = {k: cpu_seconds(p) - self._c0[k] for k, p in self.pids.items()}
        self.cpu["others"] = max(0.0, machine_busy_seconds() - self._m0 - sum(self.cpu.values()))

    def summary(self) -> dict[str, dict[str, float]]:
        return {k: {"cpu_s": round(v, 3), "pct": round(100 * v / self.wall, 1)} for k, v in self.cpu.items()}


def quantile(xs: Sequence[float], q: float) -> float | None:
    """Linear interpolation between closest ranks, as numpy's default; `xs` must be sorted."""
    if not xs:
        return None
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def pcts(values: Iterable[float], *qs: float, digits: int = 2) -> dict[str, float | None]:
    xs = sorted(values)
    out: dict[str, float | None] = {}
    for q in qs:
        v = quantile(xs, q)
        name = f"p{q * 100:g}".replace(".", "")
        out[name] = None if v is None else round(v, digits)
    return out
