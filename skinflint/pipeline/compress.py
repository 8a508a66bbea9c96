"""Stage 6, compress: shrink the prompt before it is routed and sent, as the request's feature
(else route, else default) ``compression`` setting says.

The strategies run in this order, each only when configured and allowed for the feature (the
shadow guard may have switched one off): ``system_prompt`` (whitespace and repeated
paragraphs), ``few_shot`` (keep the k worked examples most similar to the question),
``context`` (cut the last user message to a token budget, most relevant chunks first) and
``history`` (drop the oldest turns past a token budget). The functions live in
:mod:`skinflint.compression`; this stage picks them and records what they removed.

The cache stages have already looked the request up by the body the client sent, and its
answer is stored under that same key: compression never changes what a request is cached as.

Few-shot similarity uses the semantic cache's local embedder once it has loaded, and a
word-bag cosine until then (or when the semantic cache is off, or the embedder is busy).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from skinflint import compression as cx
from skinflint.config import CompressionPolicy, Scoped
from skinflint.interfaces import Vector
from skinflint.metrics import Metrics
from skinflint.pipeline.context import Compression, Next, Reply, RequestContext
from skinflint.pipeline.embedding import GuardedEmbedder
from skinflint.tokens import TokenCounter

__all__ = ["Compress"]

log = logging.getLogger("skinflint")

Messages = list[dict[str, Any]]
Allowed = Callable[[str, str], bool]


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
    ) -> None:
        """``embedder`` gives the local embedder once it is loaded (else None); ``allowed``
        says whether a strategy may run for a feature (None: all may)."""
        self._policies = policies
        self._tokens = tokens
        self._metrics = metrics
        self._embedder = embedder or (lambda: None)
        self._allowed = allowed
        self.enabled = policies.configured
        if any(p.system_prompt.rewrite_with for p in _policies(policies)):
            log.warning("compression: system_prompt.rewrite_with is not applied yet; "
                        "system prompts are normalised only")

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        messages = ctx.body.get("messages")
        # a batch_map packed call is left whole: its items are a JSON array any cut would break
        if (ctx.endpoint == "chat" and isinstance(messages, list) and messages
                and ctx.packed is None):
            policy = self._policies.find(ctx.feature, ctx.requested_model)
            if policy is not None:
                await self._compress(ctx, policy, messages)
        return await next(ctx)

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
        if policy.system_prompt.normalize and self._may(feature, "system_prompt"):
            messages = self._step(done, "system_prompt", messages, cx.normalize_system(messages))
        if policy.few_shot is not None and self._may(feature, "few_shot"):
            pruned = await self._prune(messages, policy.few_shot.keep)
            messages = self._step(done, "few_shot", messages, pruned)
        if policy.context is not None and self._may(feature, "context"):
            cut = cx.trim_context(messages, policy.context.max_tokens, counter.text)
            messages = self._step(done, "context", messages, cut)
        if policy.history is not None and self._may(feature, "history"):
            cut = cx.trim_history(messages, policy.history.max_tokens, counter.messages)
            messages = self._step(done, "history", messages, cut)
        if done:
            self._record(ctx, done, messages, counter)

    @staticmethod
    def _step(done: list[tuple[str, Messages]], strategy: str, before: Messages,
              after: Messages) -> Messages:
        if after is not before:
            done.append((strategy, before))
        return after

    async def _prune(self, messages: Messages, keep: int) -> Messages:
        for examples in cx.find_examples(messages):
            if len(examples.texts) > keep:
                scores = await self._similarities(examples.question, examples.texts)
                messages = cx.keep_examples(messages, examples, scores, keep)
        return messages

    async def _similarities(self, question: str, texts: Sequence[str]) -> list[float]:
        """Each text's similarity to ``question``: embedding cosine when the embedder gives
        every vector, else word-bag cosine."""
        embedder = self._embedder()
        if embedder is not None:
            vectors = await asyncio.gather(*(embedder.vector(t) for t in (question, *texts)))
            q, *rest = vectors
            if q is not None and all(v is not None for v in rest):
                return [_cosine(q, v) for v in rest if v is not None]
        return cx.lexical_similarities(question, texts)

    def _record(self, ctx: RequestContext, done: list[tuple[str, Messages]],
                final: Messages, counter: _Counts) -> None:
        after = [before for _, before in done[1:]] + [final]
        removed = 0
        for (strategy, before), result in zip(done, after, strict=True):
            saved = counter.changed(before, result)
            removed += saved
            if saved > 0:
                self._metrics.child(self._metrics.compression_saved, strategy).inc(saved)
        ctx.compression = Compression(tuple(s for s, _ in done), removed, ctx.body)
        ctx.body = {**ctx.body, "messages": final}


class _Counts:
    """One request's token counts, each text counted once however often it is asked for."""

    def __init__(self, tokens: TokenCounter, model: str) -> None:
        self._tokens = tokens
        self._model = model
        self._known: dict[str, int] = {}

    def text(self, text: str) -> int:
        found = self._known.get(text)
        if found is None:
            found = self._known[text] = self._tokens.count_text(self._model, text)
        return found

    def message(self, message: dict[str, Any]) -> int:
        """``count_messages([message])`` without the reply priming: its framing and other
        fields, plus its text content (a message's count is their sum)."""
        content = message.get("content")
        if not isinstance(content, str):
            return self._tokens.count_messages(self._model, [message]) - self._priming
        framing = self._tokens.count_messages(self._model, [{**message, "content": ""}])
        return framing - self._priming + self.text(content)

    @property
    def _priming(self) -> int:
        return self._tokens.count_messages(self._model, [])

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
