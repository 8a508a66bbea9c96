"""The semantic cache's embedder, guarded so that it never costs a request.

An embedder that fails, takes longer than ``EMBED_TIMEOUT`` seconds, or already has
``MAX_QUEUED`` texts waiting gives no vector, and the request goes to the model without a
lookup (counted by ``skinflint_semantic_skipped``); after three such failures in a row requests
skip the embedder for ten seconds, then one probes it.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from skinflint.embed import Embedder
from skinflint.interfaces import Vector
from skinflint.metrics import Metrics
from skinflint.storage.breaker import Breaker

__all__ = ["EMBED_TIMEOUT", "MAX_QUEUED", "GuardedEmbedder"]

EMBED_TIMEOUT = 2.0  # seconds; the local embedder takes 1-25 ms a text
MAX_QUEUED = 64  # texts waiting for the embedder's one thread before requests skip the lookup


class GuardedEmbedder:
    def __init__(self, embedder: Embedder, metrics: Metrics) -> None:
        self.embedder = embedder
        self._metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="skinflint-embed")
        self._queued = 0  # texts handed to the pool and not yet embedded or dropped
        self._breaker = Breaker("embedder", (Exception,), limit=3, cooldown=10.0)

    async def vector(self, text: str) -> Vector | None:
        """The text's embedding, or None when the embedder is busy, slow or failing."""
        if self._queued >= MAX_QUEUED or not self._breaker.allows():
            busy = self._queued >= MAX_QUEUED
            self._skipped("embedder_busy" if busy else "embedder_down")
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
        self._skipped(reason)
        return None

    def _skipped(self, reason: str) -> None:
        self._metrics.child(self._metrics.semantic_skipped, reason).inc()

    def _dequeued(self, job: asyncio.Future[Vector]) -> None:
        self._queued -= 1

    def _embed(self, text: str) -> Vector:
        vector: Vector = self.embedder.embed([text])[0]
        return vector

    def close(self) -> None:
        self._pool.shutdown(wait=True)
