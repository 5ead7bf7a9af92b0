"""shared/pacing.py: the pacing rule, driven by a fake clock (the pacer has none of its own)."""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.cursor import Cursor
from shared.events import Event
from shared.pacing import Item, Pacer, Phase

# -- builders ----------------------------------------------------------------------------------


class Src:
    """Makes one source's events with increasing entry ids."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.n = 0

    def _cursor(self) -> Cursor:
        self.n += 1
        return Cursor(self.name, f"{self.n}-0")  # type: ignore[arg-type]

    def delta(self, text: str = "") -> Event:
        c = self._cursor()
        return Event("delta", self.name, c, {"source": self.name, "text": text or f"{self.name}{self.n}"})

    def done(self) -> Event:
        return Event("done", self.name, self._cursor(), {"source": self.name, "tokens": self.n - 1})

    def error(self, code: str = "task_failed") -> Event:
        return Event("error", self.name, self._cursor(), {"source": self.name, "code": code, "message": "m"})


def label(item: Item) -> str:
    """A short name per item: 'phase:slow', 'a:delta', 'b:done', 'end:completed'."""
    if isinstance(item, Phase):
        return f"phase:{item.phase}"
    if item.kind == "end":
        return f"end:{item.data['status']}"
    return f"{item.source}:{item.kind}"


def labels(items: list[Item]) -> list[str]:
    return [label(i) for i in items]


def events(items: list[Item]) -> list[Event]:
    return [i for i in items if isinstance(i, Event)]


def phases(items: list[Item]) -> list[str]:
    return [i.phase for i in items if isinstance(i, Phase)]


def drain(p: Pacer, now: float, until: float = 1e9) -> list[tuple[float, Item]]:
    """Poll at every deadline the pacer asks for, up to `until` or until it waits for input."""
    out: list[tuple[float, Item]] = []
    for _ in range(100_000):
        items, wake = p.poll(now)
        out += [(now, i) for i in items]
        if p.finished or wake is None or wake > until:
            return out
        assert wake >= now, "a deadline in the past"
        now = wake
    raise AssertionError("the pacer did not settle")


# -- slow phase --------------------------------------------------------------------------------


def test_slow_spacing_first_delta_at_once() -> None:
    a = Src("a")
    p = Pacer(0.25, 0)
    for _ in range(4):
        p.push(a.delta())
    items, wake = p.poll(10.0)
    assert labels(items) == ["phase:slow", "a:delta"]
    assert wake == 10.25
    # Too early: nothing, same deadline.
    assert p.poll(10.1) == ([], 10.25)
    assert p.poll(10.2499) == ([], 10.25)
    items, wake = p.poll(10.25)
    assert labels(items) == ["a:delta"] and wake == 10.5
    # Polled late: the next one is slow_interval after *that* poll, not after the missed deadline.
    items, wake = p.poll(11.0)
    assert labels(items) == ["a:delta"] and wake == 11.25
    items, wake = p.poll(11.25)
    assert labels(items) == ["a:delta"]
    assert wake is None  # nothing left: wait for input
    assert p.pending("a") == 0


def test_slow_spacing_holds_across_idle_gaps() -> None:
    """A delta that arrives right after one was sent still waits for the interval."""
    a = Src("a")
    p = Pacer(1.0, 0)
    p.push(a.delta())
    assert labels(p.poll(0.0)[0]) == ["phase:slow", "a:delta"]
    p.push(a.delta())
    assert p.poll(0.3) == ([], 1.0)
    assert labels(p.poll(1.0)[0]) == ["a:delta"]
    # Long after: goes at once.
    p.push(a.delta())
    items, wake = p.poll(50.0)
    assert labels(items) == ["a:delta"] and wake is None


def test_timed_sequence_while_b_runs() -> None:
    a = Src("a")
    p = Pacer(0.25, 0)
    for _ in range(5):
        p.push(a.delta())
    sent = drain(p, 0.0)
    times = [t for t, i in sent if isinstance(i, Event)]
    assert times == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_done_and_error_go_without_waiting() -> None:
    for terminal in ("done", "error"):
        a = Src("a")
        p = Pacer(1.0, 0)
        p.push(a.delta())
        p.push(a.done() if terminal == "done" else a.error())
        items, wake = p.poll(0.0)
        assert labels(items) == ["phase:slow", "a:delta", f"a:{terminal}"]
        assert wake == 0.0  # A just ended: ask again now (B may need loading)
        assert p.a_finished


# -- flush ---------------------------------------------------------------------------------------


def test_flush_mid_interval() -> None:
    """B completes in the middle of a slow interval: the very next poll, at that same time, sends
    the whole backlog; not when the interval is over."""
    a = Src("a")
    p = Pacer(10.0, 0)
    for _ in range(6):
        p.push(a.delta())
    items, wake = p.poll(0.0)
    assert labels(items) == ["phase:slow", "a:delta"] and wake == 10.0
    assert p.poll(3.0) == ([], 10.0)
    p.b_completed()
    items, wake = p.poll(3.0)
    assert labels(items) == ["phase:flush"] + ["a:delta"] * 5
    assert wake is None
    # The rest of A follows as it arrives, unspaced.
    p.push(a.delta())
    p.push(a.delta())
    items, _ = p.poll(3.0)
    assert labels(items) == ["a:delta", "a:delta"]


def test_flush_when_b_terminal_is_pushed() -> None:
    """Pushing B's terminal event counts as B completing, even before A is done."""
    a, b = Src("a"), Src("b")
    p = Pacer(10.0, 0)
    for _ in range(3):
        p.push(a.delta())
    p.poll(0.0)
    p.push(b.delta())
    assert not p.b_complete
    assert p.poll(1.0) == ([], 10.0)
    p.push(b.done())
    assert p.b_complete
    items, _ = p.poll(1.0)
    assert labels(items) == ["phase:flush", "a:delta", "a:delta"]


def test_limit_splits_a_long_flush() -> None:
    a = Src("a")
    p = Pacer(1.0, 0)
    for _ in range(10):
        p.push(a.delta())
    p.push(a.done())
    p.b_completed()
    got: list[Item] = []
    polls = 0
    while not p.a_finished:
        items, wake = p.poll(5.0, limit=3)
        assert len(events(items)) <= 3
        assert wake == 5.0, "more is due: the caller must be asked to poll again at once"
        got += items
        polls += 1
    assert polls == 4  # 11 events in 3 + 3 + 3 + 2
    assert labels(got) == ["phase:flush"] + ["a:delta"] * 10 + ["a:done"]
    assert [e.cursor.entry for e in events(got)] == [f"{i}-0" for i in range(1, 12)]


def test_limit_splits_b_too() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(0, 0)
    p.push(a.done())
    for _ in range(5):
        p.push(b.delta())
    p.push(b.done())
    p.poll(0.0)
    items, wake = p.poll(0.0, limit=2)
    assert labels(items) == ["phase:b", "b:delta", "b:delta"] and wake == 0.0
    items, wake = p.poll(0.0, limit=2)
    assert labels(items) == ["b:delta", "b:delta"] and wake == 0.0
    items, wake = p.poll(0.0, limit=2)
    assert labels(items) == ["b:delta", "b:done", "end:completed"] and wake is None
    assert p.finished


# -- A ends first, then B ----------------------------------------------------------------------


def test_a_ends_first_then_waiting_then_b() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(0.5, 0)
    p.push(a.delta())
    p.push(a.delta())
    p.push(a.done())
    sent = drain(p, 0.0)
    assert labels([i for _, i in sent]) == ["phase:slow", "a:delta", "a:delta", "a:done", "phase:waiting"]
    assert [t for t, _ in sent] == [0.0, 0.0, 0.5, 0.5, 0.5]
    assert p.poll(7.0) == ([], None)  # nothing from B yet: wait for input, no busy polling
    p.push(b.delta("B1"))
    items, _ = p.poll(8.0)
    assert labels(items) == ["phase:b", "b:delta"]
    assert p.poll(9.0) == ([], None)
    p.push(b.delta("B2"))
    p.push(b.done())
    items, wake = p.poll(9.5)
    assert labels(items) == ["b:delta", "b:done", "end:completed"]
    assert wake is None and p.finished
    assert p.poll(100.0) == ([], None)  # finished: nothing more, ever


def test_b_is_never_before_a_done() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(1.0, 0)
    for _ in range(3):
        p.push(b.delta())
    p.push(b.done())  # B already finished
    p.push(a.delta())
    items, wake = p.poll(0.0)
    assert labels(items) == ["phase:flush", "a:delta"] and wake is None
    p.push(a.delta())
    p.push(a.done())
    sent = [i for _, i in drain(p, 0.0)]
    assert labels(sent) == ["a:delta", "a:done", "phase:b", "b:delta", "b:delta", "b:delta", "b:done", "end:completed"]


def test_b_spacing() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(0, 0.2)
    p.push(a.done())
    for _ in range(4):
        p.push(b.delta())
    p.push(b.done())
    sent = drain(p, 1.0)
    timeline = [(round(t, 6), label(i)) for t, i in sent]
    assert timeline == [
        (1.0, "phase:flush"),
        (1.0, "a:done"),
        (1.0, "phase:b"),
        (1.0, "b:delta"),
        (1.2, "b:delta"),
        (1.4, "b:delta"),
        (1.6, "b:delta"),
        (1.6, "b:done"),  # terminal events are not spaced
        (1.6, "end:completed"),
    ]


def test_b_spacing_does_not_apply_to_a() -> None:
    a = Src("a")
    p = Pacer(0, 5.0)
    p.b_completed()
    for _ in range(5):
        p.push(a.delta())
    items, _ = p.poll(0.0)
    assert len(events(items)) == 5


# -- errors and end status ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a_end", "b_end", "status"),
    [
        ("done", "done", "completed"),
        ("error:task_failed", "done", "failed"),
        ("done", "error:task_failed", "failed"),
        ("error:worker_lost", "error:too_long", "failed"),
        ("error:cancelled", "error:cancelled", "cancelled"),
        ("done", "error:cancelled", "cancelled"),
        ("error:cancelled", "done", "cancelled"),
        ("error:task_failed", "error:cancelled", "cancelled"),
    ],
)
def test_end_status(a_end: str, b_end: str, status: str) -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(0.1, 0)

    def terminal(src: Src, spec: str) -> Event:
        return src.done() if spec == "done" else src.error(spec.split(":")[1])

    p.push(a.delta())
    p.push(terminal(a, a_end))
    p.push(b.delta())
    p.push(terminal(b, b_end))
    sent = [i for _, i in drain(p, 0.0)]
    assert p.finished
    evs = events(sent)
    assert [e.source for e in evs] == ["a", "a", "b", "b", "stream"]
    assert evs[-1].kind == "end" and evs[-1].data == {"status": status}
    assert evs[1].kind == a_end.split(":")[0] and evs[3].kind == b_end.split(":")[0]


def test_a_error_while_b_runs_is_immediate() -> None:
    a = Src("a")
    p = Pacer(10.0, 0)
    p.push(a.delta())
    p.push(a.delta())
    items, wake = p.poll(0.0)
    assert wake == 10.0
    p.push(a.error())
    # The remaining delta still waits for its slot; the error comes right after it.
    assert p.poll(1.0) == ([], 10.0)
    items, _ = p.poll(10.0)
    assert labels(items) == ["a:delta", "a:error"]


# -- no spacing --------------------------------------------------------------------------------


def test_slow_interval_zero_means_no_spacing() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(0, 0)
    for _ in range(50):
        p.push(a.delta())
    items, wake = p.poll(0.0)
    assert labels(items) == ["phase:slow"] + ["a:delta"] * 50
    assert wake is None
    p.push(a.done())
    p.push(b.delta())
    p.push(b.done())
    sent = drain(p, 0.0)
    assert {t for t, _ in sent} == {0.0}
    # B's `done` was pushed before A's: B completed, so A's done goes in a flush phase.
    assert labels([i for _, i in sent]) == ["phase:flush", "a:done", "phase:b", "b:delta", "b:done", "end:completed"]


# -- phases ------------------------------------------------------------------------------------


def test_phases_slow_flush_b() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(1.0, 0)
    p.push(a.delta())
    p.push(a.delta())
    got = p.poll(0.0)[0]
    p.push(b.delta())
    p.push(b.done())
    got += p.poll(0.5)[0]
    p.push(a.delta())
    p.push(a.done())
    got += [i for _, i in drain(p, 0.5)]
    assert phases(got) == ["slow", "flush", "b"]
    assert labels(got) == [
        "phase:slow", "a:delta", "phase:flush", "a:delta", "a:delta", "a:done",
        "phase:b", "b:delta", "b:done", "end:completed",
    ]


def test_phases_slow_waiting_b() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(1.0, 0)
    p.push(a.delta())
    p.push(a.done())
    got = [i for _, i in drain(p, 0.0)]
    p.push(b.delta())
    got += p.poll(1.0)[0]
    p.push(b.done())
    got += p.poll(2.0)[0]
    assert phases(got) == ["slow", "waiting", "b"]
    assert labels(got)[-1] == "end:completed"


def test_phases_flush_waiting_b() -> None:
    """B completes (noticed, not read yet) while A runs; A ends; B's events arrive later."""
    a, b = Src("a"), Src("b")
    p = Pacer(1.0, 0)
    p.push(a.delta())
    got = p.poll(0.0)[0]
    p.b_completed()
    p.push(a.delta())
    p.push(a.done())
    got += [i for _, i in drain(p, 0.1)]
    p.push(b.done())
    got += p.poll(0.2)[0]
    assert phases(got) == ["slow", "flush", "waiting", "b"]


def test_each_phase_emitted_once_however_often_polled() -> None:
    a, b = Src("a"), Src("b")
    p = Pacer(1.0, 0)
    got: list[Item] = []
    for t in range(5):
        got += p.poll(float(t))[0]
    p.push(a.done())
    for t in range(5, 10):
        got += p.poll(float(t))[0]
    p.push(b.delta())
    for t in range(10, 15):
        got += p.poll(float(t))[0]
    assert phases(got) == ["slow", "waiting", "b"]


# -- resumed connections -----------------------------------------------------------------------


def test_resume_past_a() -> None:
    """A connection that starts past A (cursor in B) gets no A events and no slow phase."""
    b = Src("b")
    b.n = 7  # resumed from b-7-0
    p = Pacer(5.0, 0, a_state="done", b_complete=True)
    assert p.a_finished
    assert p.poll(0.0) == ([Phase("waiting")], None)
    p.push(b.delta())
    p.push(b.done())
    items, _ = p.poll(0.0)
    assert labels(items) == ["phase:b", "b:delta", "b:done", "end:completed"]
    assert events(items)[0].cursor == Cursor("b", "8-0")


@pytest.mark.parametrize(("a_state", "status"), [("done", "completed"), ("failed", "failed"), ("cancelled", "cancelled")])
def test_resume_past_a_keeps_a_state_for_end(a_state: str, status: str) -> None:
    b = Src("b")
    p = Pacer(1.0, 0, a_state=a_state)
    p.push(b.done())
    items, _ = p.poll(0.0)
    assert labels(items) == ["phase:b", "b:done", f"end:{status}"]


@pytest.mark.parametrize(
    ("a_state", "b_state", "status"),
    [("done", "done", "completed"), ("done", "failed", "failed"), ("failed", "done", "failed"), ("done", "cancelled", "cancelled")],
)
def test_resume_past_b_sends_only_end(a_state: str, b_state: str, status: str) -> None:
    """Started past B's terminal event (resumed at it): `end` at once, nothing else."""
    p = Pacer(1.0, 1.0, a_state=a_state, b_state=b_state)
    assert p.b_complete and p.a_finished
    items, wake = p.poll(0.0)
    assert labels(items) == [f"end:{status}"]
    assert wake is None and p.finished
    assert p.poll(1.0) == ([], None)


def test_resume_with_b_complete_has_no_slow_phase() -> None:
    a = Src("a")
    p = Pacer(5.0, 0, b_complete=True)
    for _ in range(4):
        p.push(a.delta())
    items, wake = p.poll(0.0)
    assert labels(items) == ["phase:flush"] + ["a:delta"] * 4
    assert wake is None


# -- properties: random interleavings of inputs and times ----------------------------------------


@dataclass
class Script:
    """A random history: A's and B's events arrive in some interleaving, B's completion may be
    noticed early, time moves in random steps, and the caller polls with a random limit."""

    slow: float
    b_gap: float
    steps: list[tuple[str, float, int]] = field(default_factory=list)  # (action, dt, limit)


ACTIONS = ["a", "a", "a", "b", "b", "b_completed", "poll", "poll", "poll", "poll"]


def scripts() -> st.SearchStrategy[Script]:
    return st.builds(
        Script,
        slow=st.sampled_from([0.0, 0.01, 0.25, 1.0]),
        b_gap=st.sampled_from([0.0, 0.05, 0.5]),
        steps=st.lists(
            st.tuples(st.sampled_from(ACTIONS), st.sampled_from([0.0, 0.0, 0.001, 0.1, 0.3, 1.0, 2.5]), st.integers(1, 6)),
            max_size=80,
        ),
    )


@dataclass
class Outcome:
    sent: list[tuple[float, Item, bool]]  # (time, item, b_complete when sent)
    pushed_a: list[Event]
    pushed_b: list[Event]


def run_script(
    script: Script, a_terminal: str, b_terminal: str, a_len: int, b_len: int, rng: random.Random
) -> Outcome:
    a, b = Src("a"), Src("b")
    p = Pacer(script.slow, script.b_gap)
    pushed_a: list[Event] = []
    pushed_b: list[Event] = []
    sent: list[tuple[float, Item, bool]] = []
    now = 0.0

    def nxt(src: Src, pushed: list[Event], n: int, terminal: str) -> None:
        if pushed and pushed[-1].terminal:
            return
        if len(pushed) < n:
            e = src.delta()
        else:
            e = src.done() if terminal == "done" else src.error(terminal)
        p.push(e)
        pushed.append(e)

    def poll(limit: int) -> float | None:
        items, wake = p.poll(now, limit)
        assert len(events(items)) <= limit + 1  # + the `end` that follows B's terminal event
        if wake is not None:
            assert wake >= now
        sent.extend((now, i, p.b_complete) for i in items)
        return wake

    for action, dt, limit in script.steps:
        now += dt
        if action == "a":
            nxt(a, pushed_a, a_len, a_terminal)
        elif action == "b":
            nxt(b, pushed_b, b_len, b_terminal)
        elif action == "b_completed":
            p.b_completed()
        else:
            poll(limit)
        if p.finished:
            break
    # Then everything left arrives, and the caller polls whenever asked to (liveness).
    while not (pushed_a and pushed_a[-1].terminal):
        nxt(a, pushed_a, a_len, a_terminal)
    while not (pushed_b and pushed_b[-1].terminal):
        nxt(b, pushed_b, b_len, b_terminal)
    for _ in range(10_000):
        if p.finished:
            break
        wake = poll(rng.randint(1, 6))
        if p.finished:
            break
        assert wake is not None, "all input is in, yet the pacer waits for more"
        now = max(now, wake)
    assert p.finished
    assert p.poll(now + 100) == ([], None)
    return Outcome(sent, pushed_a, pushed_b)


def check(out: Outcome, slow: float, b_gap: float) -> None:
    sent_events = [(t, i, bc) for t, i, bc in out.sent if isinstance(i, Event)]
    evs = [i for _, i, _ in sent_events]
    # Exactly what was pushed, A's then B's (each in push order), then one `end`.
    assert evs[:-1] == out.pushed_a + out.pushed_b
    assert evs[-1].kind == "end"
    assert sum(1 for e in evs if e.kind == "end") == 1
    for src in ("a", "b"):
        assert sum(1 for e in evs if e.source == src and e.terminal) == 1
    a_end, b_end = out.pushed_a[-1], out.pushed_b[-1]
    status = "cancelled" if "cancelled" in (a_end.data.get("code"), b_end.data.get("code")) else (
        "failed" if "error" in (a_end.kind, b_end.kind) else "completed")
    assert evs[-1].data == {"status": status}
    # No two A deltas closer than `slow` while B had not completed.
    last_a: float | None = None
    for t, e, b_complete in sent_events:
        if e.source == "a" and e.kind == "delta":
            if not b_complete and last_a is not None and slow > 0:
                assert t - last_a >= slow - 1e-9, f"A deltas {t - last_a:.3f}s apart, slow interval {slow}"
            last_a = t
    # B deltas spaced by b_gap.
    b_times = [t for t, e, _ in sent_events if e.source == "b" and e.kind == "delta"]
    for t0, t1 in itertools.pairwise(b_times):
        assert t1 - t0 >= b_gap - 1e-9
    # Time only goes forward.
    times = [t for t, _, _ in out.sent]
    assert times == sorted(times)
    # Phases: each at most once, in the order slow < flush < waiting < b, and `b` before B's events.
    names = [i.phase for _, i, _ in out.sent if isinstance(i, Phase)]
    order = ["slow", "flush", "waiting", "b"]
    assert names == sorted(set(names), key=order.index)
    assert names[-1] == "b"
    # `slow` only while B runs; `flush` only once it completed.
    for _, i, b_complete in out.sent:
        if isinstance(i, Phase) and i.phase == "slow":
            assert not b_complete
        if isinstance(i, Phase) and i.phase == "flush":
            assert b_complete
    # Every A event goes in `slow` or `flush` as B's completion says; every B event in `b`.
    phase = None
    for _, i, b_complete in out.sent:
        if isinstance(i, Phase):
            phase = i.phase
        elif i.source == "a":
            assert phase == ("flush" if b_complete else "slow")
        elif i.source == "b":
            assert phase == "b"


TERMINALS = st.sampled_from(["done", "done", "task_failed", "cancelled"])


@settings(max_examples=300, deadline=None)
@given(script=scripts(), a_terminal=TERMINALS, b_terminal=TERMINALS, a_len=st.integers(0, 12), b_len=st.integers(0, 6),
       seed=st.integers(0, 2**32))
def test_property_random_interleavings(script: Script, a_terminal: str, b_terminal: str, a_len: int, b_len: int, seed: int) -> None:
    out = run_script(script, a_terminal, b_terminal, a_len, b_len, random.Random(seed))
    check(out, script.slow, script.b_gap)


@settings(max_examples=200, deadline=None)
@given(script=scripts(), a_len=st.integers(0, 12))
def test_property_flush_is_immediate(script: Script, a_len: int) -> None:
    """Whenever B has completed, one poll (no limit) leaves no A delta pending."""
    a = Src("a")
    p = Pacer(script.slow, script.b_gap)
    now = 0.0
    for action, dt, _ in script.steps:
        now += dt
        if action == "a" and a.n < a_len:
            p.push(a.delta())
        elif action == "b_completed":
            p.b_completed()
        elif action == "poll":
            p.poll(now)
        if p.b_complete:
            items, wake = p.poll(now)
            assert p.pending("a") == 0
            assert wake is None
            assert all(isinstance(i, Phase) or (i.source == "a" and i.kind == "delta") for i in items)


def test_table_interleavings_seeded() -> None:
    """The same properties over a fixed table of seeded histories (fast, reproducible)."""
    for seed in range(200):
        rng = random.Random(seed)
        slow = rng.choice([0.0, 0.2, 1.0])
        b_gap = rng.choice([0.0, 0.1])
        steps = [(rng.choice(ACTIONS), rng.choice([0.0, 0.05, 0.3, 1.5]), rng.randint(1, 4)) for _ in range(rng.randint(0, 60))]
        script = Script(slow, b_gap, steps)
        out = run_script(script, rng.choice(["done", "task_failed", "cancelled"]), rng.choice(["done", "task_failed"]),
                         rng.randint(0, 10), rng.randint(0, 5), rng)
        check(out, slow, b_gap)


def test_fifo_keeps_order_through_compaction() -> None:
    import random
    from collections import deque

    from shared.pacing import Fifo

    rng = random.Random(4)
    fifo, model, src = Fifo(), deque[Event](), Src("a")
    for _ in range(20_000):
        if rng.random() < 0.55 or not model:
            e = src.delta()
            fifo.append(e)
            model.append(e)
        else:
            assert fifo.peek() is model[0]
            assert fifo.popleft() is model.popleft()
        assert len(fifo) == len(model)
    while model:
        assert fifo.popleft() is model.popleft()
    assert len(fifo) == 0 and not fifo


# -- the fast lane -----------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(script=st.lists(st.sampled_from(["a", "b_done", "poll", "b", "a_done"]), max_size=60), slow=st.sampled_from([0.0, 0.25]))
def test_passes_is_what_push_then_poll_would_do(script: list[str], slow: float) -> None:
    """Two pacers take the same inputs; one sends A's next event as it arrives whenever `passes`
    says so (the connection's fast lane), the other always pushes and polls. They send the same
    items and end in the same state."""
    a, b = Src("a"), Src("b")
    fast, slow_lane = Pacer(slow, 0.0), Pacer(slow, 0.0)
    sent_fast: list[str] = []
    sent_slow: list[str] = []
    now = 0.0
    a_ended = False
    for step in script:
        now += 0.1
        if step == "a" and not a_ended:
            e = a.delta()
            if fast.passes(e):
                items, wake = slow_lane.poll(now)  # the other has nothing due before it either
                assert items == [] and wake is None
                slow_lane.push(e)
                items, wake = slow_lane.poll(now)
                assert labels(items) == ["a:delta"] and wake is None  # alone, at once
                sent_fast.append(label(e))
                sent_slow += labels(items)
                continue
            fast.push(e)
            slow_lane.push(e)
        elif step == "a_done" and not a_ended:
            a_ended = True
            e = a.done()
            assert not fast.passes(e)  # a terminal event always goes through the queue
            fast.push(e)
            slow_lane.push(e)
        elif step == "b_done":
            fast.b_completed()
            slow_lane.b_completed()
        elif step == "b" and a_ended:
            e = b.delta()
            fast.push(e)
            slow_lane.push(e)
        sent_fast += labels(fast.poll(now)[0])
        sent_slow += labels(slow_lane.poll(now)[0])
    assert sent_fast == sent_slow
    assert (fast.phase, fast.finished, fast.pending("a"), fast.pending("b")) == (
        slow_lane.phase, slow_lane.finished, slow_lane.pending("a"), slow_lane.pending("b"),
    )  # fmt: skip
