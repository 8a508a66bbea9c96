"""Stage 5, semantic cache: answer a question from a similar earlier one, safely.

What is compared is the last user message, and only against entries with the same partition:
the same scope (tenant, user or shared), model or route, output-affecting parameters and
preceding context (system prompt, tools, earlier turns), so one conversation never matches
another. Similarity above the threshold is necessary, not sufficient: a word-level verifier
rejects candidates whose numbers, dates, names, negations or order differ.

Entries point at exact-cache entries: a semantic hit serves the stored answer of the matched
question, which shares that entry's TTL, tags and invalidation, and nothing is stored that the
exact cache would not store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt

from skinflint.cachekey import request_hash
from skinflint.config import SemanticCacheConfig
from skinflint.embed import Embedder
from skinflint.metrics import Metrics
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.context import Next, Reply, RequestContext
from skinflint.routing.text import last_user_text
from skinflint.semantic.index import NumpyIndex
from skinflint.semantic.verifier import verify
from skinflint.storage.semantic import SemanticRow, SemanticStore

__all__ = ["SemanticCache"]

log = logging.getLogger("skinflint.semantic")
Vector = npt.NDArray[np.float32]


def _context_digest(ctx: RequestContext) -> str:
    """The request hash with the last user message blanked: everything but the question."""
    messages = list(ctx.body.get("messages") or [])
    for i in range(len(messages) - 1, -1, -1):
        if isinstance(messages[i], dict) and messages[i].get("role") == "user":
            messages[i] = {**messages[i], "content": ""}
            break
    return request_hash("semantic", {**ctx.body, "messages": messages})


class SemanticCache:
    name = "semantic_cache"

    def __init__(
        self,
        config: SemanticCacheConfig,
        exact: ExactCache,
        store: SemanticStore,
        metrics: Metrics,
        *,
        threshold: float,
        verifier: bool,
    ) -> None:
        self.config = config
        self.enabled = config.enabled
        self._exact = exact
        self._store = store
        self._metrics = metrics
        self._threshold = threshold
        self._verifier = verifier
        self._embedder: Embedder | None = None  # set by ``load`` once the model is in memory
        self._index: NumpyIndex | None = None
        self._texts: OrderedDict[str, str] = OrderedDict()  # key -> question, in LRU order
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinflint-embed")

    def load(self, embedder: Embedder) -> None:
        """Rebuild the index from the store (blocking: call from a worker thread)."""
        index = NumpyIndex(embedder.dim)
        for row in self._store.rows():
            index.add(row.partition, row.key, row.vector)
            self._texts[row.key] = row.text
        self._index, self._embedder = index, embedder

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
        text = last_user_text(ctx.body.get("messages"))
        if not text.strip():
            return await next(ctx)
        partition = self._exact.key_for(ctx, _context_digest(ctx))
        vector = await asyncio.get_running_loop().run_in_executor(self._pool, self._embed, text)
        ctx.semantic = (partition, text, vector)
        if ctx.cache_mode != "refresh":
            reply = await self._lookup(ctx, partition, text, vector, threshold)
            if reply is not None:
                return reply
        return await next(ctx)

    def _embed(self, text: str) -> Vector:
        assert self._embedder is not None
        vector: Vector = self._embedder.embed([text])[0]
        return vector

    async def _lookup(
        self, ctx: RequestContext, partition: str, text: str, vector: Vector, threshold: float
    ) -> Reply | None:
        assert self._index is not None
        for key, similarity in self._index.search(partition, vector, self.config.top_k):
            if similarity < threshold:
                break
            if self._verifier:
                ok, reason = verify(text, self._texts.get(key, ""))
                if not ok:
                    self._metrics.child(self._metrics.semantic_rejected, reason.split(":")[0]).inc()
                    continue
            raw = await self._exact.store.get(key, time.time())
            if raw is None:  # expired or invalidated with its exact entry
                self._forget(key)
                continue
            self._texts.move_to_end(key)
            ctx.similarity = similarity
            return self._exact.serve(ctx, raw, "hit-semantic")
        return None

    def save(self, ctx: RequestContext) -> None:
        """Index a question whose answer the exact cache just stored."""
        if ctx.semantic is None or self._index is None:
            return
        partition, text, vector = ctx.semantic
        key = ctx.cache_key
        self._index.add(partition, key, vector)
        self._texts[key] = text
        self._store.add(SemanticRow(key, partition, text, vector))
        while len(self._texts) > self.config.max_entries:
            self._forget(next(iter(self._texts)))

    def _forget(self, key: str) -> None:
        if self._index is not None:
            self._index.remove(key)
        self._texts.pop(key, None)
        self._store.remove(key)

    def stats(self) -> dict[str, int]:
        return {"entries": len(self._texts)}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._store.close()
