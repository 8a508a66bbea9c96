"""Stage 5, semantic cache: answer a question from a similar earlier one, safely.

What is compared is the last user message, and only against entries with the same partition:
the same scope (tenant, user or shared), model or route, output-affecting parameters and
preceding context (system prompt, tools, earlier turns), so one conversation never matches
another. A message longer than ``max_question_chars`` (the embedder reads 256 word pieces)
is compared by its last paragraph, and the text before it joins the partition, so it must match
exactly: "<document>\n\nQuestion: ..." matches the same document with a reworded question.
Similarity above the threshold is necessary, not sufficient: a word-level verifier rejects
candidates whose numbers, dates, names, negations or order differ.

Entries point at exact-cache entries: a semantic hit serves the stored answer of the matched
question, which shares that entry's TTL, tags and invalidation, and nothing is stored that the
exact cache would not store.

The cache saves money and must never cost a request: an embedder that fails, takes longer than
``EMBED_TIMEOUT`` seconds, or already has ``MAX_QUEUED`` texts waiting lets the request pass to
the model without a lookup (counted by ``skinflint_semantic_skipped``), and after three such
failures in a row requests skip the embedder for ten seconds, then one probes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from skinflint.cachekey import request_hash
from skinflint.config import SemanticCacheConfig
from skinflint.embed import Embedder
from skinflint.interfaces import SemanticIndex, Vector
from skinflint.messages import last_user_text
from skinflint.metrics import Metrics
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.context import Next, Reply, RequestContext
from skinflint.semantic.verifier import verify
from skinflint.storage.breaker import Breaker

__all__ = ["EMBED_TIMEOUT", "MAX_QUEUED", "SemanticCache", "split_question"]

log = logging.getLogger("skinflint.semantic")

EMBED_TIMEOUT = 2.0  # seconds; the local embedder takes 1-25 ms a text
MAX_QUEUED = 64  # texts waiting for the embedder's one thread before requests skip the lookup


def split_question(text: str, limit: int) -> tuple[str, str] | None:
    """``(context, question)``: the whole text when it is at most ``limit`` characters, else its
    last paragraph (or line) as the question and what precedes it as context that must match
    exactly, as in "<document>\n\nQuestion: ...". None when no last part is short enough."""
    if len(text) <= limit:
        return "", text
    for separator in ("\n\n", "\n"):
        cut = text.rstrip().rfind(separator)
        if cut < 0:
            continue
        question = text[cut:].strip()
        if question and len(question) <= limit:
            return text[:cut], question
    return None


def _context_digest(ctx: RequestContext, context: str) -> str:
    """The request hash with the last user message replaced by the part of it that must match
    exactly: everything but the question."""
    messages = list(ctx.body.get("messages") or [])
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            content = messages[i].get("content")
            if isinstance(content, list):  # images, audio and files stay part of the context
                others = [p for p in content if not isinstance(p, dict) or p.get("type") != "text"]
                messages[i] = {**messages[i], "content": [*others, context]}
            else:
                messages[i] = {**messages[i], "content": context}
            break
    return request_hash("semantic", {**ctx.body, "messages": messages})


class SemanticCache:
    name = "semantic_cache"

    def __init__(
        self,
        config: SemanticCacheConfig,
        exact: ExactCache,
        metrics: Metrics,
        *,
        threshold: float,
        verifier: bool,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self._exact = exact
        self._metrics = metrics
        self._threshold = threshold
        self._verifier = verifier
        # both set by ``open`` once the embedder is in memory; until then requests pass through
        self._embedder: Embedder | None = None
        self._index: SemanticIndex | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinflint-embed")
        self._queued = 0  # texts handed to the pool and not yet embedded or dropped
        self._breaker = Breaker("embedder", (Exception,), limit=3, cooldown=10.0)

    def open(self, embedder: Embedder, index: SemanticIndex) -> None:
        """Start serving (called once loading is done, from the loading thread: the two
        assignments are atomic, and requests treat a missing index as 'not yet')."""
        self._embedder, self._index = embedder, index

    def threshold_for(self, ctx: RequestContext) -> float | None:
        """The similarity a match needs, or None when the cache is off for this request."""
        threshold, enabled = self._threshold, True
        for policy in (
            self.config.routes.get(ctx.requested_model),
            self.config.features.get(ctx.feature),
        ):
            if policy is not None:
                enabled = enabled if policy.enabled is None else policy.enabled
                threshold = threshold if policy.threshold is None else policy.threshold
        return threshold if enabled else None

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        threshold = self.threshold_for(ctx)
        if (
            threshold is None
            or self._index is None
            or not ctx.cache_writable
            or ctx.endpoint != "chat"
        ):
            return await next(ctx)
        split = split_question(last_user_text(ctx.body.get("messages")),
                               self.config.max_question_chars)
        if split is None or not split[1].strip():
            return await next(ctx)
        context, text = split
        partition = self._exact.key_for(ctx, _context_digest(ctx, context))
        vector = await self._vector(text)
        if vector is None:
            return await next(ctx)
        ctx.semantic = (partition, text, vector)
        if ctx.cache_mode != "refresh":
            try:
                reply = await self._lookup(ctx, self._index, partition, vector, threshold)
            except Exception as exc:  # a broken index costs a lookup, not the request
                self._failed("lookup", exc)
                reply = None
            if reply is not None:
                return reply
        return await next(ctx)

    def _failed(self, what: str, exc: Exception) -> None:
        self._metrics.child(self._metrics.semantic_skipped, f"index_{what}_error").inc()
        log.warning("semantic cache: %s failed, request passed on: %r", what, exc)

    async def _vector(self, text: str) -> Vector | None:
        """The text's embedding, or None when the embedder is busy, slow or failing."""
        if self._queued >= MAX_QUEUED or not self._breaker.allows():
            busy = self._queued >= MAX_QUEUED
            self._metrics.child(self._metrics.semantic_skipped,
                                "embedder_busy" if busy else "embedder_down").inc()
            return None
        self._queued += 1
        job = asyncio.get_running_loop().run_in_executor(self._pool, self._embed, text)
        job.add_done_callback(self._dequeued)
        reason = "embedder_error"
        with self._breaker.guard("embedding"):  # logs and counts any embedder failure
            try:
                return await asyncio.wait_for(job, EMBED_TIMEOUT)
            except TimeoutError:
                reason = "embedder_timeout"
                raise
        self._metrics.child(self._metrics.semantic_skipped, reason).inc()
        return None

    def _dequeued(self, job: asyncio.Future[Vector]) -> None:
        self._queued -= 1

    def _embed(self, text: str) -> Vector:
        assert self._embedder is not None
        vector: Vector = self._embedder.embed([text])[0]
        return vector

    async def _lookup(
        self,
        ctx: RequestContext,
        index: SemanticIndex,
        partition: str,
        vector: Vector,
        threshold: float,
    ) -> Reply | None:
        question = ctx.semantic[1] if ctx.semantic else ""
        for key, similarity, text in await index.search(partition, vector, self.config.top_k):
            if similarity < threshold:
                break
            if self._verifier:
                ok, reason = verify(question, text)
                if not ok:
                    self._metrics.child(self._metrics.semantic_rejected, reason.split(":")[0]).inc()
                    continue
            raw = await self._exact.store.get(key, time.time())
            if raw is None:  # expired or invalidated with its exact entry
                await index.remove(key)
                continue
            await index.touch(key)
            ctx.similarity = similarity
            return self._exact.serve(ctx, raw, "hit-semantic")
        return None

    async def save(self, ctx: RequestContext) -> None:
        """Index a question whose answer the exact cache just stored."""
        if ctx.semantic is None or self._index is None:
            return
        partition, text, vector = ctx.semantic
        try:
            await self._index.add(partition, ctx.cache_key, text, vector)
        except Exception as exc:  # the answer is already served; only the index misses it
            self._failed("add", exc)

    async def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._index is not None:
            await self._index.close()
