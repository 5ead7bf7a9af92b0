"""The request body of POST /v1/streams. Task options are validated by each task's own model."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SourceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: str = Field(min_length=1, max_length=100)
    options: dict[str, Any] = Field(default_factory=dict)


class PacingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slow_interval_ms: int | None = Field(None, ge=0, le=60_000)
    b_interval_ms: int | None = Field(None, ge=0, le=60_000)


class CreateStream(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    a: SourceSpec | None = None
    b: SourceSpec | None = None
    pacing: PacingSpec | None = None
