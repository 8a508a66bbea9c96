"""Small parts the stage tests share: a request context, a chat answer, a ``next`` stage that
records what it was handed and answers as scripted, and a provider that does the same."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import orjson

from skinflint.models import Completion, StreamChunk, UpstreamRequest
from skinflint.pipeline.context import Reply, RequestContext

JSON = dict[str, Any]


def answer(text: str = "42", *, model: str = "m", usage: tuple[int, int] | None = (10, 2),
           finish: str = "stop") -> JSON:
    """A complete ``chat.completion``; ``usage`` is (prompt, completion) tokens, or None."""
    body: JSON = {"id": "c-1", "object": "chat.completion", "model": model,
                  "choices": [{"index": 0, "finish_reason": finish,
                               "message": {"role": "assistant", "content": text}}]}
    if usage is not None:
        body["usage"] = {"prompt_tokens": usage[0], "completion_tokens": usage[1],
                         "total_tokens": sum(usage)}
    return body


def chat(text: str = "hi", *, model: str = "m", **fields: Any) -> JSON:
    """A chat request body asking ``text``."""
    return {"model": model, "messages": [{"role": "user", "content": text}], **fields}


def context(body: JSON | None = None, *, endpoint: str = "chat",
            headers: dict[str, str] | None = None, **fields: Any) -> RequestContext:
    """A request as the attribute stage leaves it (``fields`` set the rest): its body parsed,
    its requested model taken from the body, its hash a fixed string unless given."""
    body = chat() if body is None else body
    fields.setdefault("requested_model", body.get("model", ""))
    fields.setdefault("request_hash", f"h-{fields['requested_model']}")
    raw = orjson.dumps(body)
    return RequestContext("r", 1_000.0, time.perf_counter(), endpoint, raw, headers or {},
                          body=body, **fields)


Outcome = Reply | BaseException | Callable[[RequestContext], Reply]


class Recorder:
    """A ``next`` stage: keeps each context it is handed, then returns the scripted reply
    (built from the context when ``outcome`` is a function) or raises the scripted error."""

    def __init__(self, outcome: Outcome | None = None) -> None:
        self.outcome: Outcome = Reply(body=answer()) if outcome is None else outcome
        self.seen: list[RequestContext] = []

    @property
    def called(self) -> bool:
        return bool(self.seen)

    async def __call__(self, ctx: RequestContext) -> Reply:
        self.seen.append(ctx)
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        if isinstance(self.outcome, Reply):
            return self.outcome
        return self.outcome(ctx)


Script = list[Any]  # per call: a body, a list of chunks (a stream), or an error to raise


class Scripted:
    """A provider answering each call with the next scripted outcome, keeping the requests."""

    def __init__(self, name: str, *outcomes: Any) -> None:
        self.name = name
        self.outcomes: Script = list(outcomes)
        self.requests: list[UpstreamRequest] = []
        self.pulled = 0  # stream chunks taken so far

    def _next(self, request: UpstreamRequest) -> Any:
        self.requests.append(request)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def complete(self, request: UpstreamRequest) -> Completion:
        body = self._next(request)
        return Completion(body, raw=orjson.dumps(body))

    async def embed(self, request: UpstreamRequest) -> Completion:
        return Completion(self._next(request))

    def stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        return self._stream(request)

    async def _stream(self, request: UpstreamRequest) -> AsyncIterator[StreamChunk]:
        for data in self._next(request):
            self.pulled += 1
            yield StreamChunk(data)

    async def list_models(self, timeout: float) -> list[dict[str, Any]]:
        return []

    async def close(self) -> None:
        return None


class Embedder:
    """The same words, case and punctuation aside, give the same unit vector; counts its calls
    and fails while ``failing`` is set."""

    name, dim = "test", 4

    def __init__(self) -> None:
        self.calls = 0
        self.failing = False

    def embed(self, texts: list[str]) -> Any:
        self.calls += 1
        if self.failing:
            raise RuntimeError("embedder down")
        rows = []
        for text in texts:
            words = re.findall(r"[a-z]+", text.lower())
            v = np.asarray([1.0, len(words), sum(map(len, words)) % 7, 1.0], dtype=np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.asarray(rows, dtype=np.float32)
