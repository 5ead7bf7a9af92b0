"""workers/tasks/simulated.py: exact text, derived tokens, failures, and the time schedule."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from shared.settings import Settings
from workers.task import TaskContext, TaskError
from workers.tasks.simulated import TASK, SimulatedOptions, derived_tokens, split_tokens


def opts(**options: Any) -> SimulatedOptions:
    return SimulatedOptions.model_validate(options)


def ctx() -> TaskContext:
    return TaskContext(stream_id="s", source="a", settings=Settings(_env_file=None))  # type: ignore[call-arg]


async def run(prompt: str = "p", **options: Any) -> list[str]:
    opts = TASK.options.model_validate(options)
    return [t async for t in TASK.run(prompt, opts, ctx())]


async def run_timed(**options: Any) -> tuple[list[float], float]:
    """Each token's time after the start, and the total."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    times = []
    async for _ in TASK.run("p", TASK.options.model_validate(options), ctx()):
        times.append(loop.time() - start)
    return times, loop.time() - start


# -- tokens ------------------------------------------------------------------------------------


@given(st.text())
def test_split_tokens_concatenation_is_exact(text: str) -> None:
    tokens = split_tokens(text)
    assert "".join(tokens) == text
    assert all(tokens)  # no empty token
    # Word-sized: each token is a run of whitespace, or one word with the whitespace after it.
    for t in tokens:
        word = t.rstrip()
        assert not any(c.isspace() for c in word)


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Zs", "Zl", "Zp", "Cc")), min_size=1), min_size=1, max_size=20))
def test_split_tokens_one_per_word(words: list[str]) -> None:
    text = " ".join(words)
    tokens = split_tokens(text)
    assert len(tokens) == len(words)
    assert [t.strip() for t in tokens] == words


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("", []),
        ("one", ["one"]),
        ("Hello, world!", ["Hello, ", "world!"]),
        ("a  b\n\nc ", ["a  ", "b\n\n", "c "]),
        ("  leading", ["  ", "leading"]),
        ("\r\n", ["\r\n"]),
        ("東京 は\u3000いい 👍", ["東京 ", "は\u3000", "いい ", "👍"]),
    ],
)
def test_split_tokens_table(text: str, tokens: list[str]) -> None:
    assert split_tokens(text) == tokens


@pytest.mark.parametrize("n", [0, 1, 5, 30, 200])
def test_derived_tokens_count(n: int) -> None:
    tokens = derived_tokens("Explain Redis streams", n)
    assert len(tokens) == n
    assert all(t.endswith(" ") and t.strip() for t in tokens)
    if n >= 3:
        assert tokens[:3] == ["Explain ", "Redis ", "streams "]


def test_derived_tokens_empty_prompt() -> None:
    assert derived_tokens("", 2) == ["tandem ", "tandem "]
    assert derived_tokens("   ", 1) == ["tandem "]


def test_derived_tokens_deterministic() -> None:
    assert derived_tokens("x y", 50) == derived_tokens("x y", 50)


async def test_default_is_30_derived_tokens() -> None:
    out = await run("a prompt", interval_ms=0)
    assert len(out) == 30
    assert out == derived_tokens("a prompt", 30)


async def test_text_option_emits_exact_text() -> None:
    text = "Sources:\n- one\r\n- two  😀 \"quoted\" \\ "
    out = await run(text=text, interval_ms=0, tokens=3)  # `tokens` is ignored when `text` is given
    assert "".join(out) == text
    assert out == split_tokens(text)


async def test_empty_text_emits_nothing() -> None:
    assert await run(text="", interval_ms=0) == []
    assert await run(tokens=0, interval_ms=0) == []


# -- failures ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("fail_after", "emitted"), [(0, 0), (1, 1), (3, 3), (5, 5)])
async def test_fail_after(fail_after: int, emitted: int) -> None:
    got: list[str] = []
    with pytest.raises(TaskError) as info:
        async for t in TASK.run("p", opts(tokens=5, interval_ms=0, fail_after=fail_after), ctx()):
            got.append(t)
    assert len(got) == emitted
    assert info.value.code == "task_failed"
    assert f"after {emitted} tokens" in info.value.message


async def test_fail_after_beyond_the_end_does_not_fail() -> None:
    assert len(await run(tokens=4, interval_ms=0, fail_after=5)) == 4


async def test_fail_after_with_text() -> None:
    got: list[str] = []
    with pytest.raises(TaskError):
        async for t in TASK.run("p", opts(text="a b c d", interval_ms=0, fail_after=2), ctx()):
            got.append(t)
    assert got == ["a ", "b "]


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"nope": 1},
        {"tokens": -1},
        {"tokens": 1_000_001},
        {"interval_ms": -1},
        {"interval_ms": 60_001},
        {"delay_ms": -5},
        {"fail_after": -1},
        {"text": 5},
        {"tokens": "many"},
    ],
)
def test_bad_options(options: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        SimulatedOptions.model_validate(options)


def test_options_defaults() -> None:
    o = opts()
    assert (o.text, o.tokens, o.interval_ms, o.delay_ms, o.fail_after) == (None, 30, 50, 0, None)
    assert TASK.name == "simulated" and TASK.options is SimulatedOptions


# -- timing (generous margins: 2 shared cores) ---------------------------------------------------


async def test_schedule_interval() -> None:
    times, total = await run_timed(tokens=6, interval_ms=40)
    assert len(times) == 6
    for i, t in enumerate(times):
        assert t >= i * 0.040 - 0.002, f"token {i} at {t:.3f}s, early"
    assert times[0] < 0.030  # the first token needs no wait
    assert total < 5 * 0.040 + 0.3


async def test_schedule_delay_then_interval() -> None:
    times, total = await run_timed(tokens=3, interval_ms=30, delay_ms=120)
    assert times[0] >= 0.118
    assert times[-1] >= 0.120 + 2 * 0.030 - 0.002
    assert total < 0.120 + 2 * 0.030 + 0.3


async def test_schedule_is_absolute() -> None:
    """A slow consumer does not push later tokens further out: N tokens take about N intervals."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    times = []
    async for _ in TASK.run("p", opts(tokens=5, interval_ms=50), ctx()):
        times.append(loop.time() - start)
        if len(times) == 1:
            await asyncio.sleep(0.160)  # the consumer stalls past three intervals
    # Tokens 1..3 were due during the stall: they come at once; token 4 is back on the schedule.
    assert times[1] >= 0.160 and times[3] - times[1] < 0.030
    assert 0.198 <= times[4] < 0.198 + 0.3


async def test_zero_interval_is_fast() -> None:
    times, total = await run_timed(tokens=2000, interval_ms=0)
    assert len(times) == 2000
    assert total < 2.0
