"""A fake OpenAI-compatible server for tests: the real wire format, failures on demand, and a log.

It is a raw asyncio HTTP/1.1 server on a free port, in a thread of its own, so a test process can
point real `tandem worker` processes at it (``TANDEM_OPENAI_BASE_URL=fake.url``) and still read its
log directly. ``POST /v1/chat/completions`` with ``"stream": true`` answers as OpenAI does:
``data: {chunk}`` messages, a role-only first chunk, content deltas, a chunk with ``finish_reason``,
a usage chunk when ``stream_options.include_usage`` is set, then ``data: [DONE]``.

What a request gets is chosen by its model name:

- a model in :data:`MODELS` (``fast``, ``slow``, ``endless``, ``other``) streams that model's text;
- a model named after a behaviour in :data:`BEHAVIOURS` (``401``, ``429``, ``500``, ``cut``,
  ``hang``, ``stall``, ``garbage``, ``nochoices``, ...) always behaves that way;
- :meth:`FakeOpenAI.script` queues behaviours for the next requests of one model
  (e.g. ``script("fast", "500", "500")``: two failures, then the normal stream);
- any other model is a 404, as a real server answers an unknown model.

Every request is recorded (:class:`Record`): body, headers, when it arrived, how many tokens were
sent, and when the client closed the connection before the server was done (``client_closed``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

_WORDS = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class Model:
    text: str
    first_delay_s: float = 0.0  # after the role chunk, before the first token
    interval_s: float = 0.005
    repeat: int = 1  # the text is sent this many times (endless: a lot)

    def tokens(self) -> list[str]:
        return _WORDS.findall(self.text) * self.repeat


MODELS: dict[str, Model] = {
    "fast": Model("Redis streams keep every token in order, so a reader that drops resumes exactly where it left off. ", interval_s=0.01),
    "other": Model("A second model answers in its own words, quickly and briefly. ", interval_s=0.01),
    "slow": Model("Sources: [1] Redis streams intro. [2] arq job docs. [3] SSE spec, section 9.", first_delay_s=0.6, interval_s=0.03),
    "endless": Model("tick ", interval_s=0.05, repeat=100_000),
}

BEHAVIOURS = frozenset(
    {"ok", "400", "401", "403", "404", "429", "500", "503", "cut", "cut_early", "hang", "stall", "garbage", "nochoices", "json", "error_chunk"}
)
CUT_AFTER = 3  # tokens `cut`, `stall` and `error_chunk` send before they fail
_ERRORS = {
    "400": ("invalid_request_error", "This model's maximum context length is 8192 tokens."),
    "401": ("invalid_request_error", "Incorrect API key provided: sk-wrong. You can find your API key at https://example.invalid."),
    "403": ("permission_error", "You are not allowed to sample from this model."),
    "404": ("invalid_request_error", "The model does not exist or you do not have access to it."),
    "429": ("rate_limit_error", "Rate limit reached for requests. Please try again in 0s."),
    "500": ("server_error", "The server had an error while processing your request."),
    "503": ("server_error", "The engine is currently overloaded, please try again later."),
}
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Record:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    model: str
    behaviour: str
    received: float  # time.monotonic() when the request was read
    tokens_sent: int = 0
    finished: float | None = None  # the server completed its answer
    client_closed: float | None = None  # the client hung up first (e.g. a cancelled source)
    _closed_evt: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait_closed(self, timeout: float) -> float | None:
        """Block until the client hung up (returns its time) or `timeout` passes (returns None)."""
        self._closed_evt.wait(timeout)
        return self.client_closed


class FakeOpenAI:
    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.records: list[Record] = []
        self._scripts: dict[str, deque[str]] = defaultdict(deque)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self._stopping: asyncio.Event | None = None

    # -- control, from the test's thread ----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> FakeOpenAI:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._main, args=(ready,), name="fake-openai", daemon=True)
        self._thread.start()
        if not ready.wait(10) or not self.port:
            raise RuntimeError("fake OpenAI server did not start")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, model: str, *behaviours: str) -> None:
        for b in behaviours:
            if b not in BEHAVIOURS:
                raise ValueError(f"unknown behaviour {b!r}")
            self._scripts[model].append(b)

    def requests_for(self, model: str) -> list[Record]:
        return [r for r in self.records if r.model == model]

    @staticmethod
    def expected_text(model: str, max_tokens: int | None = None) -> str:
        tokens = MODELS[model].tokens()
        return "".join(tokens[:max_tokens] if max_tokens is not None else tokens)

    def wait_request(self, model: str, n: int = 1, timeout: float = 10.0) -> Record:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.requests_for(model)
            if len(got) >= n:
                return got[n - 1]
            time.sleep(0.01)
        raise TimeoutError(f"no request #{n} for model {model!r} in {timeout}s")

    # -- the server, in its own thread --------------------------------------------------------------

    def _main(self, ready: threading.Event) -> None:
        asyncio.run(self._serve(ready))

    async def _serve(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)
        ready.set()
        try:
            await self._stopping.wait()
        finally:
            self._server.close()
            for t in list(self._handlers):
                t.cancel()
            if self._handlers:
                await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # the client went away, or the server is stopping
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)}
        raw = await reader.readexactly(int(headers.get("content-length", "0")))
        body: dict[str, Any] = json.loads(raw) if raw else {}
        model = str(body.get("model", ""))
        script = self._scripts.get(model)
        behaviour = script.popleft() if script else (model if model in BEHAVIOURS else "ok")
        rec = Record(path, headers, body, model, behaviour, time.monotonic())
        self.records.append(rec)

        closed = asyncio.Event()

        async def watch() -> None:  # the client hanging up shows as EOF on the read side
            with contextlib.suppress(ConnectionError):
                await reader.read()
            if rec.finished is None:
                rec.client_closed = time.monotonic()
                rec._closed_evt.set()
            closed.set()

        watcher = asyncio.create_task(watch())
        try:
            if method != "POST" or path.rstrip("/") != "/v1/chat/completions":
                await self._error(writer, "404", rec)
            elif behaviour in _ERRORS:
                await self._error(writer, behaviour, rec)
            elif behaviour == "ok" and model not in MODELS:
                await self._error(writer, "404", rec)
            elif behaviour == "json":
                await self._plain(writer, 200, {"id": "chatcmpl-fake", "object": "chat.completion", "choices": []})
                rec.finished = time.monotonic()
            elif behaviour == "hang":
                await closed.wait()  # never answers: not even a status line
            else:
                await self._stream(writer, rec, closed)
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _plain(self, writer: asyncio.StreamWriter, status: int, doc: dict[str, Any], extra: str = "") -> None:
        payload = json.dumps(doc).encode()
        writer.write(
            f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n{extra}Connection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()

    async def _error(self, writer: asyncio.StreamWriter, code: str, rec: Record) -> None:
        kind, message = _ERRORS[code]
        extra = "Retry-After: 0\r\n" if code in ("429", "503") else ""
        await self._plain(writer, int(code), {"error": {"message": message, "type": kind, "param": None, "code": None}}, extra)
        rec.finished = time.monotonic()

    async def _stream(self, writer: asyncio.StreamWriter, rec: Record, closed: asyncio.Event) -> None:
        b = rec.behaviour
        model = MODELS.get(rec.model, MODELS["fast"])
        created = int(time.time())
        base = {"id": f"chatcmpl-fake{len(self.records)}", "object": "chat.completion.chunk", "created": created, "model": rec.model}

        async def send(data: str) -> None:
            msg = f"data: {data}\n\n".encode()
            writer.write(b"%x\r\n%s\r\n" % (len(msg), msg))
            await writer.drain()

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return json.dumps({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]})

        async def pause(seconds: float) -> bool:
            """Sleep; False when the client hung up meanwhile."""
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(closed.wait(), seconds)
            return not closed.is_set()

        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\nCache-Control: no-cache\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        await send(chunk({"role": "assistant", "content": ""}))
        if b == "cut_early":
            writer.transport.abort()
            return
        if b == "garbage":
            await send("this is not json")
        elif b == "nochoices":
            await send(json.dumps(base))
        if b in ("garbage", "nochoices"):
            await pause(5)  # a client that understood the chunk would wait here
            return

        tokens = model.tokens()
        max_tokens = rec.body.get("max_tokens")
        limit = len(tokens) if max_tokens is None else min(len(tokens), int(max_tokens))
        if b in ("cut", "stall", "error_chunk"):
            limit = min(limit, CUT_AFTER)
        if not await pause(model.first_delay_s):
            return
        for i in range(limit):
            if i and not await pause(model.interval_s):
                return
            if closed.is_set():
                return
            await send(chunk({"content": tokens[i]}))
            rec.tokens_sent += 1
        if b == "cut":
            writer.transport.abort()  # no final chunk of the chunked body: the connection just drops
            return
        if b == "stall":
            await closed.wait()
            return
        if b == "error_chunk":
            await send(json.dumps({"error": {"message": "The model produced invalid content.", "type": "server_error", "code": None}}))
            await pause(5)
            return
        await send(chunk({}, "length" if limit < len(tokens) else "stop"))
        options = rec.body.get("stream_options") or {}
        if options.get("include_usage"):
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in rec.body.get("messages", []))
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": limit, "total_tokens": prompt_tokens + limit}
            await send(json.dumps({**base, "choices": [], "usage": usage}))
        await send("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        rec.finished = time.monotonic()


def main() -> None:
    """`python -m tests.fake_openai`: run it in the foreground, e.g. to try `tandem stream` against it."""
    with FakeOpenAI() as fake:
        print(f"fake OpenAI-compatible server at {fake.url} (models: {', '.join(MODELS)}); Ctrl-C stops", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


if __name__ == "__main__":
    main()
