"""How tandem's long-running processes set Python's garbage collector (PERFORMANCE.md, point 3).

An API process holds thousands of open streams and a worker thousands of running sources; the
collector's full passes walk all of them, and at CPython's default thresholds they come often
enough to set the tail latency (a worker with 1,000 paced sources paused up to 150 ms). Objects
made at start-up are frozen (never scanned again), and the middle generation is collected only
after 200 young collections, so full ones come rarely.

Young collections come every 5,000 allocations: each walks what is alive of the objects made
since the last one, and a busy API keeps many of them for a while (a connection whose A waits for
B holds its tokens, thousands a second at 1,000 paced streams). At 20,000 each such collection
paused the API for 4-5 ms, every second or so: a token that arrived meanwhile waited that long.
At 5,000 they take about 1 ms, four times as often, for the same total. (CPython counts
allocations net of frees, and an API process sending events frees older ones as fast as it makes
new ones: at 1,000 paced streams its young collections still came every ~0.4 s, with pauses of
2-9 ms at worst. Collecting on a timer instead, or the middle generation more often, measured
worse: README, Performance.)

Full collections are that rare, so nothing that runs per connection or per job may leave a
reference cycle behind: it would hold its objects (a connection's transport and buffers, a job's
frames) until the next one, which in practice never came (README, "The night of 2026-12-07";
tests/integration/test_response.py runs a response with the collector off).
"""

from __future__ import annotations

import gc

THRESHOLDS = (5_000, 200, 100)


def tune_gc() -> None:
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
