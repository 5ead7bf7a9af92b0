"""A user-written tandem task: keyword search over a folder of .txt files, streaming its citations.

Register it without installing anything::

    PYTHONPATH=examples/retrieval TANDEM_TASKS='["tandem_retrieval:TASK"]' tandem up

or install this folder (``pip install -e examples/retrieval``): its pyproject declares the
``tandem.tasks`` entry point, which tandem loads at start-up.

The documents live under one root the operator chooses, ``RETRIEVAL_ROOT`` (default: the
``docs`` folder next to this file). A request may pick a ``collection``, a sub-folder of that
root, and nothing else: no path in a request can reach outside the root.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from workers.task import Task, TaskContext, TaskError

ROOT_ENV = "RETRIEVAL_ROOT"
DEFAULT_ROOT = Path(__file__).resolve().parent / "docs"
MAX_FILES = 1000
MAX_FILE_BYTES = 1 << 20
_WORD = re.compile(r"[^\W_]+")
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_STOP = frozenset(
    "a an and are as at be but by can do does for from how in is it its of on or so that the then this to was what when where which who why will with without".split()
)


class RetrievalOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    collection: str = Field(
        "", max_length=200, pattern=r"^([A-Za-z0-9_\-]+(/[A-Za-z0-9_\-]+)*)?$", description="a sub-folder of the configured root"
    )
    query: str | None = Field(None, min_length=1, max_length=2000, description="what to search for; default: the prompt")
    top_k: int = Field(3, ge=1, le=20)
    delay_ms: float = Field(0, ge=0, le=60_000, description="pause before each citation, to act like slower work")


@dataclass(frozen=True)
class Hit:
    name: str
    title: str
    score: int
    snippet: str


def terms(text: str) -> list[str]:
    seen: dict[str, None] = {}
    for w in _WORD.findall(text.lower()):
        if len(w) > 2 and w not in _STOP:
            seen[w] = None
    return list(seen)


def folder_for(collection: str) -> tuple[Path, Path]:
    """(root, folder): the folder a collection names, checked to be inside the root."""
    root = Path(os.environ.get(ROOT_ENV) or DEFAULT_ROOT).resolve()
    folder = (root / collection).resolve()
    if not folder.is_relative_to(root) or not folder.is_dir():
        raise TaskError("bad_collection", f"no collection {collection!r} under the configured documents root")
    return root, folder


def search(root: Path, folder: Path, words: list[str], top_k: int) -> tuple[int, list[Hit]]:
    """Blocking: rank the folder's .txt files by how many query words they contain, then how often."""
    hits: list[Hit] = []
    files = sorted(p for p in folder.glob("*.txt") if p.is_file() and p.resolve().is_relative_to(root))[:MAX_FILES]
    for path in files:
        with path.open("rb") as fh:
            text = fh.read(MAX_FILE_BYTES).decode("utf-8", "replace")
        counts = {w: 0 for w in words}
        for w in _WORD.findall(text.lower()):
            if w in counts:
                counts[w] += 1
        matched = sum(1 for c in counts.values() if c)
        if not matched:
            continue
        title = next((line.strip() for line in text.splitlines() if line.strip()), path.stem)
        hits.append(Hit(path.name, title, matched * 100 + sum(counts.values()), best_sentence(text, set(words))))
    hits.sort(key=lambda h: (-h.score, h.name))
    return len(files), hits[:top_k]


def best_sentence(text: str, words: set[str]) -> str:
    body = text.split("\n", 1)[1] if "\n" in text else text  # skip the title line
    sentences: list[str] = [s.strip() for s in _SENTENCE.findall(body) if s.strip()] or [text.strip()]
    best = max(sentences, key=lambda s: len(words.intersection(_WORD.findall(s.lower()))))
    return best if len(best) <= 200 else best[:197].rstrip() + "..."


async def retrieve(prompt: str, options: RetrievalOptions, ctx: TaskContext) -> AsyncIterator[str]:
    root, folder = folder_for(options.collection)
    words = terms(options.query or prompt)
    if not words:
        raise TaskError("empty_query", "the query has no words to search for")
    count, hits = await asyncio.to_thread(search, root, folder, words, options.top_k)
    yield f"Searched {count} documents for: {', '.join(words)}.\n"
    for i, hit in enumerate(hits, 1):
        if options.delay_ms:
            await asyncio.sleep(options.delay_ms / 1000)
        yield f'[{i}] {hit.title} ({hit.name}): "{hit.snippet}"\n'
    if not hits:
        yield "No document matched.\n"
    ctx.report(citations=[h.name for h in hits])


TASK = Task(name="retrieval", options=RetrievalOptions, run=retrieve, description="keyword search over .txt files, streaming citations")
