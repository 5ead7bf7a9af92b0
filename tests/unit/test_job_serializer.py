"""arq payloads and results are JSON (no pickle), including an aborted job's result."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from workers.settings import deserialize, serialize


def test_job_payload_round_trips() -> None:
    job = {"t": 1, "f": "run_source", "a": ["id", "a"], "k": {}, "et": 1}
    assert deserialize(serialize(job)) == job


def test_aborted_job_result_is_json() -> None:
    """Regression: arq stores an aborted job's CancelledError as its result; orjson alone raised
    TypeError and the worker logged a traceback for every DELETE (found by `make soak`)."""
    result = {"r": asyncio.CancelledError(), "s": False}
    assert orjson.loads(serialize(result)) == {"r": {"exception": "CancelledError", "message": ""}, "s": False}


def test_other_objects_are_still_refused() -> None:
    with pytest.raises(TypeError):
        serialize({"x": object()})
