"""`openai`: streaming Chat Completions from any OpenAI-compatible server (OpenAI, vLLM, Ollama, ...).

The request names a configured backend and a model; the URL and key stay in the server's settings.
The task is built per process by :func:`make_task`, so its options model knows the configured
backend names and an unknown one is a 422 when the stream is created, not an error later.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from shared.settings import Settings
from workers.backends import DEFAULT_BACKEND, Backend, Policy, load_backends, stream_chat
from workers.task import Task, TaskContext


class OpenAIOptions(BaseModel):
    """The options every `openai` task accepts; :func:`make_task` adds the backend checks."""

    model_config = ConfigDict(extra="forbid")

    backend: str = Field(DEFAULT_BACKEND, min_length=1, max_length=64, description="a configured backend's name")
    model: str | None = Field(None, min_length=1, max_length=256, description="required unless the backend has a default")
    system: str | None = Field(None, max_length=1_000_000, description="system message sent before the prompt")
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    stop: str | list[str] | None = Field(None, description="one stop sequence or up to 4")
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)

    @model_validator(mode="after")
    def _stop_list(self) -> OpenAIOptions:
        if isinstance(self.stop, list) and not 1 <= len(self.stop) <= 4:
            raise ValueError("stop: give one to four sequences")
        return self


def chat_payload(prompt: str, options: OpenAIOptions, backend: Backend) -> dict[str, Any]:
    messages = []
    if options.system is not None:
        messages.append({"role": "system", "content": options.system})
    messages.append({"role": "user", "content": prompt})
    payload: dict[str, Any] = {"model": options.model or backend.model, "messages": messages, "stream": True}
    if backend.include_usage:
        payload["stream_options"] = {"include_usage": True}
    for name in ("max_tokens", "temperature", "top_p", "stop", "seed"):
        value = getattr(options, name)
        if value is not None:
            payload[name] = value
    return payload


def make_task(settings: Settings, name: str = "openai") -> Task[OpenAIOptions]:
    backends = load_backends(settings)
    known = ", ".join(sorted(backends))

    class Options(OpenAIOptions):
        @model_validator(mode="after")
        def _known_backend(self) -> Options:
            backend = backends.get(self.backend)
            if backend is None:
                raise ValueError(f"no backend named {self.backend!r}; configured backends: {known}")
            if self.model is None and backend.model is None:
                raise ValueError(f"model is required: backend {self.backend!r} has no default model")
            return self

    Options.__name__ = Options.__qualname__ = "OpenAIOptions"

    async def run(prompt: str, options: OpenAIOptions, ctx: TaskContext) -> AsyncIterator[str]:
        backend = backends[options.backend]
        policy = Policy.from_settings(ctx.settings)
        finish_reason: str | None = None
        usage: dict[str, int] | None = None
        pieces = stream_chat(ctx.http, backend, chat_payload(prompt, options, backend), policy)
        try:
            async for piece in pieces:
                if piece.finish_reason is not None:
                    finish_reason = piece.finish_reason
                if piece.usage is not None:
                    usage = piece.usage
                if piece.text:
                    yield piece.text
        finally:
            await pieces.aclose()  # closes the upstream response now
        info: dict[str, Any] = {"model": options.model or backend.model, "backend": backend.name}
        if usage is not None:
            info["usage"] = usage
        if finish_reason is not None:
            info["finish_reason"] = finish_reason
        ctx.report(**info)

    return Task(name=name, options=Options, run=run, description="streaming chat completions from an OpenAI-compatible backend")
