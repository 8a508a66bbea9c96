"""The compress stage's tokens saved: exact, counted on the counting thread while the call is
under way, and counted by whoever asks first when that thread has not got to it."""

from __future__ import annotations

import asyncio
import random
import threading
from typing import Any

from skinflint.config import CompressionPolicy, Scoped
from skinflint.metrics import Metrics
from skinflint.pipeline import compress
from skinflint.pipeline.compress import Compress
from skinflint.pipeline.context import Reply, RequestContext
from skinflint.tokens import TokenCounter
from tests.pipeline.parts import answer, context
from tests.test_compression import _conversation

JSON = dict[str, Any]
TOKENS = TokenCounter()
EVERYTHING = {"system_prompt": {"normalize": True}, "few_shot": {"keep": 2},
              "context": {"max_tokens": 300}, "history": {"max_tokens": 1500}}


def _stage(policy: JSON, metrics: Metrics | None = None) -> Compress:
    scoped = Scoped[CompressionPolicy].model_validate({"features": {"quiz": policy}})
    return Compress(scoped, TOKENS, metrics or Metrics())


def _saved(original: list[JSON], sent: list[JSON]) -> int:
    return TOKENS.count_messages("gpt-4o", original) - TOKENS.count_messages("gpt-4o", sent)


async def test_tokens_saved_are_exact_on_random_long_conversations() -> None:
    rng = random.Random(5)
    metrics = Metrics()
    stage = _stage(EVERYTHING, metrics)
    seen: list[int] = []

    async def upstream(ctx: RequestContext) -> Reply:
        await asyncio.sleep(0.05)  # the provider's time: the count is done in it
        assert ctx.compression is not None
        seen.append(ctx.compression.tokens_removed)
        return Reply(body=answer())

    for turns in (2, 6, 12, 25):
        original = _conversation(rng, turns)
        ctx = context({"model": "gpt-4o", "messages": original}, feature="quiz")
        await stage(ctx, upstream)
        assert ctx.compression is not None
        assert seen[-1] == ctx.compression.tokens_removed
        assert seen[-1] == _saved(original, ctx.body["messages"]) > 0
    total = sum(seen)
    by_strategy = sum(
        metrics.registry.get_sample_value("skinflint_compression_tokens_saved_total",
                                          {"strategy": s}) or 0.0
        for s in ("system_prompt", "few_shot", "context", "history"))
    assert by_strategy == total


async def test_the_count_runs_on_the_counting_thread_during_the_call() -> None:
    """The upstream waits for the count without asking for it: only the counting thread can
    have done it (the stage asks only once the upstream has answered)."""
    original = _conversation(random.Random(9), 10)
    ctx = context({"model": "gpt-4o", "messages": original}, feature="quiz")
    done_during_the_call: list[bool] = []

    async def upstream(ctx: RequestContext) -> Reply:
        assert ctx.compression is not None and isinstance(ctx.compression.removed,
                                                          compress._Removed)
        done = await asyncio.to_thread(ctx.compression.removed.done.wait, 5)
        done_during_the_call.append(done)
        return Reply(body=answer())

    await _stage(EVERYTHING)(ctx, upstream)
    assert done_during_the_call == [True]
    assert ctx.compression is not None
    assert ctx.compression.tokens_removed == _saved(original, ctx.body["messages"])


async def test_when_the_counting_thread_is_busy_the_caller_counts_exactly() -> None:
    release = threading.Event()
    compress._COUNTING.submit(release.wait, 10)  # the thread is held up
    try:
        original = _conversation(random.Random(13), 8)
        ctx = context({"model": "gpt-4o", "messages": original}, feature="quiz")
        await _stage(EVERYTHING)(ctx, lambda ctx: _answered())
        assert ctx.compression is not None
        assert ctx.compression.tokens_removed == _saved(original, ctx.body["messages"]) > 0
    finally:
        release.set()


async def _answered() -> Reply:
    return Reply(body=answer())


def test_a_paragraph_that_certainly_does_not_fit_is_not_counted() -> None:
    counts = compress._Counts(TOKENS, "gpt-4o")
    paragraph = " ".join(f"word{i}" for i in range(300))
    exact = TOKENS.count_text("gpt-4o", paragraph)
    assert counts.within(paragraph, 100) > 100
    assert paragraph not in counts._known  # answered from its words, not counted
    assert counts.within(paragraph, exact) == exact == counts.text(paragraph)
    assert counts.within(paragraph, exact - 1) > exact - 1
