"""How tandem's long-running processes set Python's garbage collector (PERFORMANCE.md, point 3).

An API process holds thousands of open streams and a worker thousands of running sources; the
collector's full passes walk all of them, and at CPython's default thresholds they come often
enough to set the tail latency (a worker with 1,000 paced sources paused up to 150 ms). Objects
made at start-up are frozen (never scanned again), and young collections wait for more
allocations, so full ones come rarely.
"""

from __future__ import annotations

import gc

THRESHOLDS = (20_000, 50, 100)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
