"""In-prompt batching, the runner: packs items into calls, sends them through an injected
``complete`` (the gateway's pipeline in the server, an HTTP client in the library), checks the
answers and retries the items answered badly, first in a smaller batch, then alone.

Every item ends with a result of its own, in input order: ``ok`` (answered by the first call
that carried it, or by the cache), ``retried`` (answered on a retry) or ``error`` (with what
went wrong the last time). An optional :class:`ItemCache` answers items already answered with
the same model, instruction, input and schema, which are then not sent at all.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import orjson

from skinflint.packing import (
    Item,
    PackSpec,
    item_digest,
    item_json,
    packed_body,
    parse_answer,
    plan_batches,
    retry_caps,
    solo_messages,
    validator_for,
)
from skinflint.tokens import TokenCounter

__all__ = [
    "BatchResult",
    "CachedItem",
    "CallAnswer",
    "CallFailed",
    "Complete",
    "ItemCache",
    "ItemResult",
    "PackedCall",
    "run_batch_map",
    "weigh",
]

log = logging.getLogger("skinflint.batch_map")

JSON = dict[str, Any]
Status = Literal["ok", "retried", "error"]

#: Packed calls in flight at once, by default.
CONCURRENCY = 4
#: Above this many items, their tokens are counted in a worker thread.
_COUNT_INLINE = 64


@dataclass(frozen=True, slots=True)
class PackedCall:
    """One packed chat call: its request body, the items it carries, their input tokens (each
    item's share of the call's cost follows them), the prompt tokens each would take asked
    alone, and which try it is (0: the first)."""

    body: JSON
    items: tuple[Item, ...]
    weights: tuple[int, ...]
    solo_tokens: tuple[int, ...] = ()
    attempt: int = 0


@dataclass(frozen=True, slots=True)
class CallAnswer:
    """A packed call's chat completion and what it cost (None: not known); ``storable`` False
    when another model than the one asked gave it (a fallback, a budget's downgrade): its items'
    answers are then not stored in the item cache."""

    completion: JSON
    cost_usd: float | None
    storable: bool = True


class CallFailed(Exception):
    """A packed call got no answer; ``retryable`` False: another try would fail the same way
    (a budget exhausted, a request refused), so its items fail at once."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


Complete = Callable[[PackedCall], Awaitable[CallAnswer]]


class ItemCache(Protocol):
    """Answers of single items by digest (see :func:`skinflint.packing.item_digest`)."""

    async def get(self, digests: Sequence[str]) -> list[bytes | None]: ...

    async def put(self, entries: Sequence[tuple[str, bytes]]) -> None: ...


@dataclass(frozen=True, slots=True)
class ItemResult:
    id: str
    output: Any
    status: Status
    error: str = ""

    def to_json(self) -> JSON:
        found: JSON = {"id": self.id, "output": self.output, "status": self.status}
        if self.error:
            found["error"] = self.error
        return found


@dataclass(frozen=True, slots=True)
class CachedItem:
    """An item answered from the cache: its position, and the tokens asking it alone would
    have taken (its prompt alone, its answer)."""

    position: int
    prompt_tokens: int
    output_tokens: int


@dataclass(slots=True)
class BatchResult:
    """The answer: one result per item in input order, the calls made, their summed usage and
    cost (None when a call's cost is not known), and the items the cache answered."""

    results: list[ItemResult]
    calls: int = 0
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(
        ("prompt_tokens", "completion_tokens", "total_tokens"), 0))
    cost_usd: float | None = 0.0
    cached: list[CachedItem] = field(default_factory=list)

    def to_json(self) -> JSON:
        return {"results": [r.to_json() for r in self.results], "calls": self.calls,
                "usage": self.usage, "cost_usd": self.cost_usd}

    @property
    def outputs(self) -> list[Any]:
        """The outputs in input order (None for an item that failed)."""
        return [r.output for r in self.results]


def weigh(items: Sequence[Item], spec: PackSpec, tokens: TokenCounter) -> list[tuple[int, int]]:
    """Each item's input tokens as the packed prompt shows it, and its prompt's tokens asked
    alone (blocking: loads the tokenizer the first time)."""
    return [(tokens.count_text(spec.model, item_json(item)) + 1, _alone(spec, item, tokens))
            for item in items]


def _alone(spec: PackSpec, item: Item, tokens: TokenCounter) -> int:
    """The prompt tokens of ``item`` asked alone."""
    return tokens.count_messages(spec.model, solo_messages(spec, item))


@dataclass(slots=True)
class _Failure:
    item: Item
    message: str
    retryable: bool


class _Run:
    def __init__(self, spec: PackSpec, complete: Complete, concurrency: int) -> None:
        self.spec = spec
        self.complete = complete
        self.weights: dict[str, int] = {}
        self.solo: dict[str, int] = {}
        self.validator = validator_for(spec.response_schema)
        self.answered: dict[int, ItemResult] = {}
        self.unstorable: set[int] = set()  # items another model than the one asked answered
        self.result = BatchResult([])
        self.largest = 1  # the largest batch sent
        self._gate = asyncio.Semaphore(concurrency)

    async def weigh(self, items: Sequence[Item], tokens: TokenCounter) -> None:
        if len(items) > _COUNT_INLINE or not tokens.ready(self.spec.model):
            counts = await asyncio.to_thread(weigh, items, self.spec, tokens)
        else:
            counts = weigh(items, self.spec, tokens)
        for item, (packed, solo) in zip(items, counts, strict=True):
            self.weights[item.id], self.solo[item.id] = packed, solo

    async def round(self, items: Sequence[Item], attempt: int,
                    cap: int | None = None) -> list[_Failure]:
        """Send ``items`` in batches; the failures, in input order."""
        batches = plan_batches(items, [self.weights[i.id] for i in items], self.spec, cap)
        self.largest = max(self.largest, *map(len, batches))
        # every call runs to its end (each is paid and ledgered) before one's error is raised
        found = await asyncio.gather(*(self._call(b, attempt) for b in batches),
                                     return_exceptions=True)
        for outcome in found:
            if isinstance(outcome, BaseException):
                raise outcome
        return sorted((f for fs in found if isinstance(fs, list) for f in fs),
                      key=lambda f: f.item.position)

    async def _call(self, batch: list[Item], attempt: int) -> list[_Failure]:
        call = PackedCall(packed_body(self.spec, batch), tuple(batch),
                          tuple(self.weights[i.id] for i in batch),
                          tuple(self.solo[i.id] for i in batch), attempt)
        async with self._gate:
            self.result.calls += 1
            try:
                answer = await self.complete(call)
            except CallFailed as exc:
                return [_Failure(item, exc.message, exc.retryable) for item in batch]
        self._count(answer)
        parsed = parse_answer(answer.completion, batch, self.validator)
        if parsed.unknown:
            log.info("batch_map: the answer named ids not asked: %d", len(parsed.unknown))
        status: Status = "retried" if attempt else "ok"
        for item in batch:
            if item.id in parsed.outputs:
                self.answered[item.position] = ItemResult(item.id, parsed.outputs[item.id],
                                                          status)
                if not answer.storable:
                    self.unstorable.add(item.position)
        return [_Failure(item, parsed.problems[item.id], True)
                for item in batch if item.id in parsed.problems]

    def _count(self, answer: CallAnswer) -> None:
        usage = answer.completion.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            value = usage.get(key)
            self.result.usage[key] += value if isinstance(value, int) else 0
        if answer.cost_usd is None or self.result.cost_usd is None:
            self.result.cost_usd = None
        else:
            self.result.cost_usd += answer.cost_usd


async def _cached(items: list[Item], spec: PackSpec, cache: ItemCache, run: _Run,
                  tokens: TokenCounter) -> tuple[list[Item], list[str]]:
    """Answer the items the cache holds (each counted in ``run.result.cached``); the others,
    and the digests of all items."""
    digests = [item_digest(spec, item) for item in items]
    found = await cache.get(digests)
    pending: list[Item] = []
    hits: list[tuple[Item, Any]] = []
    for item, raw in zip(items, found, strict=True):
        if raw is None:
            pending.append(item)
        else:
            output = orjson.loads(raw)["output"]
            run.answered[item.position] = ItemResult(item.id, output, "ok")
            hits.append((item, output))
    if hits:
        run.result.cached = await asyncio.to_thread(_sizes, hits, spec, tokens)
    return pending, digests


def _sizes(hits: Sequence[tuple[Item, Any]], spec: PackSpec,
           tokens: TokenCounter) -> list[CachedItem]:
    """The tokens of each item asked alone: its prompt, and its answer written as JSON."""
    return [CachedItem(item.position, _alone(spec, item, tokens),
                       tokens.count_text(spec.model, orjson.dumps(output).decode()))
            for item, output in hits]


async def run_batch_map(items: Sequence[Item], spec: PackSpec, complete: Complete, *,
                        tokens: TokenCounter, cache: ItemCache | None = None,
                        concurrency: int = CONCURRENCY) -> BatchResult:
    """Answer every item (see the module docstring). Exceptions other than
    :class:`CallFailed` raised by ``complete`` (a refused key, say) stop the run."""
    run = _Run(spec, complete, concurrency)
    pending, digests = list(items), list[str]()
    if cache is not None:
        pending, digests = await _cached(list(items), spec, cache, run, tokens)
    await run.weigh(pending, tokens)
    failures = await run.round(pending, 0) if pending else []
    for attempt, cap in enumerate(retry_caps(run.largest), start=1):
        retry = [f.item for f in failures if f.retryable]
        if not retry:
            break
        failures = [f for f in failures if not f.retryable] + await run.round(retry, attempt, cap)
    for f in failures:
        run.answered[f.item.position] = ItemResult(f.item.id, None, "error", f.message)
    if cache is not None:
        fresh = {item.position for item in pending} - run.unstorable
        await cache.put([(digests[i], orjson.dumps({"output": r.output}))
                         for i, r in _answered_now(items, run, fresh)])
    run.result.results = [run.answered[item.position] for item in items]
    return run.result


def _answered_now(items: Sequence[Item], run: _Run,
                  fresh: set[int]) -> list[tuple[int, ItemResult]]:
    """The items answered by this run's calls (not by the cache), by index."""
    return [(n, run.answered[item.position]) for n, item in enumerate(items)
            if item.position in fresh and run.answered[item.position].status != "error"]
