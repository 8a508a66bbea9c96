"""Stage 6, compress: shrink the prompt before it is routed and sent, as the request's feature
(else route, else default) ``compression`` setting says.

The strategies run in this order, each only when configured and allowed for the feature (the
shadow guard may have switched one off): ``system_prompt`` (whitespace and repeated
paragraphs), ``few_shot`` (keep the k worked examples most similar to the question),
``context`` (cut the last user message to a token budget, most relevant chunks first) and
``history`` (drop the oldest turns past a token budget). The functions live in
:mod:`skinflint.compression`; this stage picks them and records what they removed.

With a cheap model configured, the system prompt step also uses a prompt's one-time rewrite
(``system_prompt.rewrite_with``, made in the background: the request that first sends a
prompt goes on without it), and context and history trimming put a summary of what they
left out in its place (``summarize_with``, made on the request's path; plain trimming when
it fails). The calls are the :class:`~skinflint.pipeline.condense.Condenser`'s.

The cache stages have already looked the request up by the body the client sent, and its
answer is stored under that same key: compression never changes what a request is cached as.

The tokens each strategy removed (the ledger's ``tokens_saved``, exact) are counted on a worker
thread while the request goes on; the ledger row, written after the answer, asks for the figure
and counts it itself if that thread has not got to it yet. Texts are counted by paragraphs
(:meth:`TokenCounter.count_text_by_parts`), so examples and documents sent again cost nothing
to count.

Few-shot similarity uses the semantic cache's local embedder once it has loaded, and a
word-bag cosine until then (or when the semantic cache is off, or the embedder is busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from skinflint import compression as cx
from skinflint import omission
from skinflint.config import (
    CompressionPolicy,
    ContextPolicy,
    HistoryPolicy,
    Scoped,
    SystemPromptPolicy,
)
from skinflint.interfaces import Vector
from skinflint.metrics import Metrics
from skinflint.pipeline.condense import Condenser, Job
from skinflint.pipeline.context import Compression, Next, Reply, RequestContext
from skinflint.pipeline.embedding import GuardedEmbedder
from skinflint.tokens import TokenCounter

__all__ = ["Compress"]

log = logging.getLogger("skinflint")

Messages = list[dict[str, Any]]
Allowed = Callable[[str, str], bool]

# Counts of what compression removed, off the event loop (tiktoken releases the GIL).
_COUNTING = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinflint-count")
_WHOLE_CHARS = 4096  # a text this short is counted whole when asked whether it fits


class Compress:
    name = "compress"

    def __init__(
        self,
        policies: Scoped[CompressionPolicy],
        tokens: TokenCounter,
        metrics: Metrics,
        *,
        embedder: Callable[[], GuardedEmbedder | None] | None = None,
        allowed: Allowed | None = None,
        condenser: Condenser | None = None,
    ) -> None:
        """``embedder`` gives the local embedder once it is loaded (else None); ``allowed``
        says whether a strategy may run for a feature (None: all may); ``condenser`` asks
        the cheap models for rewrites and summaries (None: none are made)."""
        self._policies = policies
        self._tokens = tokens
        self._metrics = metrics
        self._embedder = embedder or (lambda: None)
        self._allowed = allowed
        self.enabled = policies.configured
        self._condenser = condenser
        if condenser is None and any(
                key.endswith(("rewrite_with", "summarize_with"))
                for p in _policies(policies) for key, _ in p.models()):
            log.warning("compression: no model to rewrite or summarise with; "
                        "system prompts are normalised and trimmed text dropped only")

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        messages = ctx.body.get("messages")
        # a batch_map packed call is left whole: its items are a JSON array any cut would break
        if (ctx.endpoint == "chat" and isinstance(messages, list) and messages
                and ctx.packed is None):
            policy = self._policies.find(ctx.feature, ctx.requested_model)
            if policy is not None:
                await self._compress(ctx, policy, messages)
        reply = await next(ctx)
        if ctx.compression is not None:  # counted during the call: its metrics are set now
            _ = ctx.compression.tokens_removed
        return reply

    def _may(self, feature: str, strategy: str) -> bool:
        return self._allowed is None or self._allowed(feature, strategy)

    async def _compress(self, ctx: RequestContext, policy: CompressionPolicy,
                        original: Messages) -> None:
        model, feature = ctx.requested_model, ctx.feature
        if not self._tokens.ready(model):  # the tokenizer loads once, off the event loop
            await asyncio.to_thread(self._tokens.prepare, model)
        counter = _Counts(self._tokens, model)
        done: list[tuple[str, Messages]] = []
        messages = original
        system = policy.system_prompt
        if (system.normalize or system.rewrite_with) and self._may(feature, "system_prompt"):
            shorter = cx.normalize_system(messages) if system.normalize else messages
            if system.rewrite_with and self._condenser is not None:
                shorter = self._rewrite(ctx, shorter, system, counter)
            messages = self._step(done, "system_prompt", messages, shorter)
        if policy.few_shot is not None and self._may(feature, "few_shot"):
            pruned = await self._prune(messages, policy.few_shot.keep)
            messages = self._step(done, "few_shot", messages, pruned)
        if policy.context is not None and self._may(feature, "context"):
            before = messages

            def trim_context(limit: int) -> Messages:
                return cx.trim_context(before, limit, counter.text, counter.within)

            cut = trim_context(policy.context.max_tokens)
            if policy.context.summarize_with and cut is not messages:
                cut = await self._summarize(ctx, policy.context, "context", messages, cut,
                                            trim_context, counter)
            messages = self._step(done, "context", messages, cut)
        if policy.history is not None and self._may(feature, "history"):
            before = messages

            def trim_history(limit: int) -> Messages:
                return cx.trim_history(before, limit, counter.messages)

            cut = trim_history(policy.history.max_tokens)
            if policy.history.summarize_with and cut is not messages:
                cut = await self._summarize(ctx, policy.history, "history", messages, cut,
                                            trim_history, counter)
            messages = self._step(done, "history", messages, cut)
        if done:
            self._record(ctx, done, messages, counter)

    def _rewrite(self, ctx: RequestContext, messages: Messages, policy: SystemPromptPolicy,
                 counter: _Counts) -> Messages:
        """The system prompts replaced by their cheap-model rewrites, where there is one yet
        (a long prompt without one gets it made in the background)."""
        condenser, model = self._condenser, policy.rewrite_with
        assert condenser is not None and model is not None
        return cx.replace_system(messages, lambda text: condenser.rewritten(
            ctx, text, model, policy.min_tokens, counter.text))

    async def _summarize(self, ctx: RequestContext, policy: ContextPolicy | HistoryPolicy,
                         kind: str, before: Messages, cut: Messages,
                         trim: Callable[[int], Messages], counter: _Counts) -> Messages:
        """``before`` trimmed to leave room for a summary of what it leaves out, with that
        summary in its place; or ``cut`` (``before`` trimmed to ``max_tokens``) as it is, when
        there is no summary to be had or it does not fit."""
        if self._condenser is None or policy.summarize_with is None:
            return cut
        tighter = trim(policy.max_tokens - policy.summary_max_tokens)
        if kind == "context":
            omitted = omission.context_omitted(before, tighter)
        else:
            omitted = omission.history_omitted(before, tighter)
        if omitted is None:
            return cut
        job = Job(f"summary.{kind}", policy.summarize_with, omitted.text,
                  policy.summary_max_tokens)
        summary = await self._condenser.summary(ctx, job, counter.text, policy.summary_timeout)
        if summary is None:
            return cut
        if kind == "context":
            summarized = omission.with_context_summary(tighter, omitted, summary)
            size = counter.within(summarized[omitted.index]["content"], policy.max_tokens)
        else:
            summarized = omission.with_history_summary(tighter, omitted, summary)
            size = counter.messages(summarized)
        if size > policy.max_tokens:  # the summary's framing did not fit beside it
            log.info("compression: the %s summary of %s did not fit in %d tokens; trimmed "
                     "without it", kind, ctx.request_id, policy.max_tokens)
            return cut
        return summarized

    @staticmethod
    def _step(done: list[tuple[str, Messages]], strategy: str, before: Messages,
              after: Messages) -> Messages:
        if after is not before:
            done.append((strategy, before))
        return after

    async def _prune(self, messages: Messages, keep: int) -> Messages:
        # the last user message's blocks first: pruning pairs moves the messages after them
        for examples in reversed(cx.find_examples(messages)):
            if len(examples.texts) > keep:
                scores = await self._similarities(examples)
                messages = cx.keep_examples(messages, examples, scores, keep)
        return messages

    async def _similarities(self, examples: cx.Examples) -> list[float]:
        """Each example's similarity to the question: embedding cosine when the embedder gives
        every vector, else word-bag cosine."""
        question, texts = examples.question, examples.texts
        embedder = self._embedder()
        if embedder is not None:
            vectors = await asyncio.gather(*(embedder.vector(t) for t in (question, *texts)))
            q, *rest = vectors
            if q is not None and all(v is not None for v in rest):
                return [_cosine(q, v) for v in rest if v is not None]
        return cx.lexical_similarities(question, texts, examples.bags)

    def _record(self, ctx: RequestContext, done: list[tuple[str, Messages]],
                final: Messages, counter: _Counts) -> None:
        after = [before for _, before in done[1:]] + [final]
        steps = [(strategy, before, result)
                 for (strategy, before), result in zip(done, after, strict=True)]
        removed = _Removed(lambda: self._saved(steps, counter))
        ctx.compression = Compression(tuple(s for s, _ in done), removed, ctx.body)
        ctx.body = {**ctx.body, "messages": final}

    def _saved(self, steps: list[tuple[str, Messages, Messages]], counter: _Counts) -> int:
        """The prompt tokens the steps removed, each strategy's added to its metric."""
        removed = 0
        for strategy, before, result in steps:
            saved = counter.changed(before, result)
            removed += saved
            if saved > 0:
                self._metrics.child(self._metrics.compression_saved, strategy).inc(saved)
        return removed


class _Removed:
    """The tokens removed, counted on the counting thread; asked for before that thread got to
    it, counted by the caller (once either way: nothing is lost if the thread never runs)."""

    def __init__(self, count: Callable[[], int]) -> None:
        self._count = count
        self._lock = threading.Lock()
        self._value: int | None = None
        self.done = threading.Event()
        with contextlib.suppress(RuntimeError):  # shutting down: counted when asked for
            _COUNTING.submit(self._run)

    def _run(self) -> None:
        with self._lock:
            if self._value is None:
                try:
                    self._value = self._count()
                except Exception:  # counts never raise; if one did, the ledger row must stay
                    log.exception("compression: counting the tokens removed failed")
                    self._value = 0
                self.done.set()

    def result(self) -> int:
        self._run()
        assert self._value is not None
        return self._value


class _Counts:
    """One request's token counts, each text counted once however often it is asked for."""

    def __init__(self, tokens: TokenCounter, model: str) -> None:
        self._tokens = tokens
        self._model = model
        self._known: dict[str, int] = {}
        self._messages: dict[int, tuple[dict[str, Any], int]] = {}  # the dict, kept: its id
        self._primed: int | None = None

    def text(self, text: str) -> int:
        found = self._known.get(text)
        if found is None:
            found = self._known[text] = self._tokens.count_text_by_parts(self._model, text)
        return found

    def within(self, text: str, limit: int) -> int:
        """``text``'s count when at most ``limit``, else a number above it (not remembered). A
        paragraph or so is counted whole, by parts: a document sent again costs nothing; one
        that certainly does not fit (:meth:`TokenCounter.past`) is not counted at all."""
        found = self._known.get(text)
        if found is None and (past := self._tokens.past(text, limit)) is not None:
            return past  # a paragraph that certainly does not fit is not counted
        if found is None and len(text) <= _WHOLE_CHARS:
            return self.text(text)
        if found is None:
            found = self._tokens.count_text_within(self._model, text, limit)
            if found <= limit:
                self._known[text] = found
        return found

    def message(self, message: dict[str, Any]) -> int:
        """``count_messages([message])`` without the reply priming: its framing and other
        fields, plus its text content (a message's count is their sum). A message is counted
        once: the strategies return new dicts for what they change, never edit one."""
        found = self._messages.get(id(message))
        if found is None:
            found = self._messages[id(message)] = (message, self._message(message))
        return found[1]

    def _message(self, message: dict[str, Any]) -> int:
        content = message.get("content")
        if not isinstance(content, str):
            return self._tokens.count_messages(self._model, [message]) - self._priming
        framing = self._tokens.count_messages(self._model, [{**message, "content": ""}])
        return framing - self._priming + self.text(content)

    @property
    def _priming(self) -> int:
        if self._primed is None:
            self._primed = self._tokens.count_messages(self._model, [])
        return self._primed

    def messages(self, messages: Messages) -> int:
        """``count_messages(messages)``."""
        return self._priming + sum(self.message(m) for m in messages)

    def changed(self, before: Messages, after: Messages) -> int:
        """Prompt tokens of ``before`` minus those of ``after``, counting only the messages
        that differ (a chat prompt's count is a sum over its messages)."""
        kept = {id(m) for m in after} & {id(m) for m in before}
        return (sum(self.message(m) for m in before if id(m) not in kept)
                - sum(self.message(m) for m in after if id(m) not in kept))


def _policies(scoped: Scoped[CompressionPolicy]) -> list[CompressionPolicy]:
    found = [*scoped.features.values(), *scoped.routes.values()]
    return found if scoped.default is None else [scoped.default, *found]


def _cosine(a: Vector, b: Vector) -> float:
    norms = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b)) / norms if norms else 0.0
