"""The compress stage's cheap-model work, a shared service: the one-time rewrite of a long
system prompt, and summaries of what trimming left out.

A rewrite (:meth:`Condenser.rewritten`) never waits: a system prompt not seen before goes on
as it is while one background task per prompt (at most ``max_in_flight`` at once; a prompt
seen while they all run waits for the next request that sends it) first looks for a rewrite
another replica stored, else asks the model once. The rewrite is kept only when it is not
empty and has fewer tokens than the prompt; a rejected or failed rewrite is remembered for
``retry_after`` seconds, so a broken model is not asked again for every request.

A summary (:meth:`Condenser.summary`) belongs to its request, so it is made on the request's
path, within its timeout; on any failure the caller trims without one. Requests that need
the same summary at the same time share one call: each waits for it within its own timeout,
and the call is cancelled only when the last of them has stopped waiting.

Both are kept by the content hash of (kind, model, text): in this process (the newest
``memory`` of them) and in the response-cache store (tag :data:`TAG`, for ``ttl`` seconds),
so every replica sharing the store shares them. Each call to the model is one ledger row of
strategy :data:`~skinflint.models.COMPRESS_CALL`: its cost counts, it is not a client request.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skinflint.errors import SkinflintError
from skinflint.interfaces import CacheEntry, CacheStore, Ledger
from skinflint.metrics import Metrics
from skinflint.models import COMPRESS_CALL, Usage
from skinflint.pipeline.context import RequestContext
from skinflint.pipeline.shadow_score import answer_text
from skinflint.pipeline.upstream import ServiceUpstream, record_side_call, side_call_row
from skinflint.pricing import PriceCatalog

__all__ = ["TAG", "Condenser", "Job"]

log = logging.getLogger("skinflint.compress")

JSON = dict[str, Any]
Count = Callable[[str], int]
TAG = "skinflint:compress"  # invalidating this tag drops every stored rewrite and summary
_REWRITE = (
    "Rewrite the system prompt the user sends so that it is as short as possible while it "
    "keeps every instruction, constraint, rule, format, name and number it contains. Add "
    "nothing, answer nothing, explain nothing. Reply with the rewritten prompt only."
)
_SUMMARY = (
    "Summarise the text the user sends in at most {words} words. Keep facts, names, numbers "
    "and decisions. Reply with the summary only."
)


@dataclass(frozen=True, slots=True)
class Job:
    """One thing to ask the model: ``kind`` (``rewrite``, ``summary.context``, ...), the
    model or alias, the text, and the most tokens the answer may have."""

    kind: str
    model: str
    text: str
    max_tokens: int

    @property
    def key(self) -> str:
        return self.key_of(self.kind, self.model, self.text)

    @staticmethod
    def key_of(kind: str, model: str, text: str) -> str:
        """Where the result of a job is kept: by its kind, model and text's content hash."""
        digest = hashlib.sha256(f"{kind}\0{model}\0{text}".encode()).hexdigest()
        return f"compress:{kind}:{digest}"

    def body(self) -> JSON:
        system = _REWRITE if self.kind == "rewrite" else _SUMMARY.format(
            words=max(1, self.max_tokens * 3 // 4))
        return {"messages": [{"role": "system", "content": system},
                             {"role": "user", "content": self.text}],
                "temperature": 0, "max_tokens": self.max_tokens}


@dataclass(slots=True)
class _Shared:
    """A summary being made, and how many requests wait for it."""

    task: asyncio.Task[str | None]
    waiters: int = 0


class Condenser:
    """See the module docstring. ``store`` is the response-cache store (None: this process
    only)."""

    def __init__(self, upstream: ServiceUpstream, *, ledger: Ledger, catalog: PriceCatalog,
                 metrics: Metrics, store: CacheStore | None = None, memory: int = 1024,
                 ttl: float = 30 * 86400, retry_after: float = 600.0, max_in_flight: int = 2,
                 clock: Callable[[], float] = time.time) -> None:
        self._upstream = upstream
        self._ledger = ledger
        self._catalog = catalog
        self._metrics = metrics
        self._store = store
        self._memory = memory
        self._ttl = ttl
        self._retry_after = retry_after
        self._max_in_flight = max_in_flight
        self._clock = clock
        self._known: OrderedDict[str, str] = OrderedDict()
        self._failed: OrderedDict[str, float] = OrderedDict()  # key -> when to try again
        self._pending: dict[str, asyncio.Task[None]] = {}
        self._summaries: dict[str, _Shared] = {}  # summaries being made, by key
        self._sizes: OrderedDict[str, int] = OrderedDict()  # a prompt's tokens, by key

    def rewritten(self, ctx: RequestContext, text: str, model: str, min_tokens: int,
                  count: Count) -> str | None:
        """The rewrite of the system prompt ``text`` if there is one yet; else None, and the
        rewrite is started in the background if ``text`` has ``min_tokens`` tokens or more.
        Never waits."""
        if len(text) < min_tokens:  # a token holds at least one character
            return None
        key = Job.key_of("rewrite", model, text)
        found = self._recall(key)
        if found is not None or key in self._pending or self._failing(key):
            return found
        size = self._sizes.get(key)
        if size is None:  # counted once per prompt, however often it is sent
            size = self._sizes[key] = count(text)
            while len(self._sizes) > self._memory:
                self._sizes.popitem(last=False)
        if size < min_tokens:
            return None
        job = Job("rewrite", model, text, size)
        if len(self._pending) < self._max_in_flight:
            task = asyncio.ensure_future(self._rewrite(ctx, job, count))
            self._pending[key] = task
            task.add_done_callback(lambda _: self._pending.pop(key, None))
        return None

    async def summary(self, ctx: RequestContext, job: Job, count: Count,
                      timeout: float) -> str | None:
        """A summary of ``job.text`` (from memory, the store, or the model within
        ``timeout`` seconds), or None when there is none to be had: never raises."""
        key = job.key
        found = self._recall(key)
        if found is not None or self._failing(key):
            return found
        shared = self._summaries.get(key)
        if shared is None:
            task = asyncio.ensure_future(self._summarize(ctx, job, count))
            shared = self._summaries[key] = _Shared(task)
            task.add_done_callback(lambda _: self._summaries.pop(key, None))
        shared.waiters += 1
        try:
            async with asyncio.timeout(timeout):
                return await asyncio.shield(shared.task)
        except TimeoutError:
            log.warning("compress: the %s of %s by %s took over %gs; trimmed without it",
                        job.kind, ctx.request_id, job.model, timeout)
            return None
        except asyncio.CancelledError:
            waiter = asyncio.current_task()
            if shared.task.cancelled() and (waiter is None or not waiter.cancelling()):
                return None  # the call was cancelled (shutting down), not this request
            raise
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.task.done():
                shared.task.cancel()  # nobody waits for it any more
                self._fail(key)
                await asyncio.wait([shared.task])  # its call is ledgered before this returns

    async def _summarize(self, ctx: RequestContext, job: Job, count: Count) -> str | None:
        try:
            made = await self._make(ctx, job, count, f".{job.kind}")
            if made is not None:
                return made
        except SkinflintError as exc:
            log.warning("compress: the %s of %s by %s failed (%s); trimmed without it",
                        job.kind, ctx.request_id, job.model, exc)
        except Exception:  # a summary is a saving, never a reason to fail the request
            log.exception("compress: the %s of %s by %s failed; trimmed without it",
                          job.kind, ctx.request_id, job.model)
        self._fail(job.key)
        return None

    async def drain(self, timeout: float | None = None) -> None:
        """Wait (at most ``timeout`` seconds) for the rewrites under way, then cancel the
        rest."""
        tasks = [*self._pending.values(), *(s.task for s in self._summaries.values())]
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=timeout)
        for task in late:
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)

    async def _rewrite(self, ctx: RequestContext, job: Job, count: Count) -> None:
        try:
            if await self._make(ctx, job, count, ".rewrite") is None:
                self._fail(job.key)
        except SkinflintError as exc:  # the prompt stays as it is: logged, not retried
            log.warning("compress: rewriting a system prompt by %s failed: %s", job.model, exc)
            self._fail(job.key)
        except Exception:  # a bug or an answer of a shape nobody expected
            log.exception("compress: rewriting a system prompt by %s failed", job.model)
            self._fail(job.key)

    async def _make(self, ctx: RequestContext, job: Job, count: Count,
                    suffix: str) -> str | None:
        """The stored result of ``job``, else the model's, kept if it is shorter."""
        key = job.key
        stored = await self._stored(key)
        if stored is not None:
            return self._remember(key, stored)
        made = (await self._call(ctx, job, ctx.request_id + suffix)).strip()
        if not made or count(made) >= count(job.text):
            log.warning("compress: the %s by %s was empty or not shorter than its text; "
                        "not used", job.kind, job.model)
            self._count(job, "rejected")
            return None
        self._count(job, "used")
        await self._keep(key, made)
        return self._remember(key, made)

    async def _stored(self, key: str) -> str | None:
        """What another replica (or this one before a restart) stored; None on any error."""
        if self._store is None:
            return None
        try:
            raw = await self._store.get(key, self._clock())
        except Exception as exc:  # the store is a saving: asking the model is the fallback
            log.warning("compress: reading %s from the cache store failed: %s", key, exc)
            return None
        return None if raw is None else raw.decode()

    async def _keep(self, key: str, text: str) -> None:
        if self._store is None:
            return
        entry = CacheEntry(key, text.encode(), self._clock() + self._ttl, (TAG,))
        try:
            await self._store.set(entry)
        except Exception as exc:  # kept in this process all the same
            log.warning("compress: storing %s in the cache store failed: %s", key, exc)

    async def _call(self, ctx: RequestContext, job: Job, request_id: str) -> str:
        """The model's answer to ``job``; the call is a ledger row whatever happens."""
        target = self._upstream.resolve(job.model)
        started = time.perf_counter()
        usage: Usage | None = None
        outcome = (499, "cancelled")  # timed out or shut down: it may have cost
        try:
            completion = await self._upstream.complete(target, job.body())
            usage = Usage.from_openai(completion.body.get("usage"))
            outcome = (200, "")
            choices = completion.body.get("choices") or [{}]
            if choices[0].get("finish_reason") == "length":
                log.warning("compress: the %s by %s was cut at its token limit",
                            job.kind, job.model)
                return ""  # rejected as empty
            return answer_text(completion.body)
        except SkinflintError as exc:
            outcome = (exc.status, exc.code or exc.error_type)
            self._count(job, "failed")
            raise
        except asyncio.CancelledError:
            self._count(job, "failed")
            raise
        finally:
            ms = (time.perf_counter() - started) * 1000
            record_side_call(self._ledger, ctx, side_call_row(
                ctx, target, request_id, COMPRESS_CALL, usage, outcome, ms, self._catalog))

    def _recall(self, key: str) -> str | None:
        found = self._known.get(key)
        if found is not None:
            self._known.move_to_end(key)
        return found

    def _remember(self, key: str, text: str) -> str:
        self._known[key] = text
        self._known.move_to_end(key)
        while len(self._known) > self._memory:
            self._known.popitem(last=False)
        self._failed.pop(key, None)
        return text

    def _failing(self, key: str) -> bool:
        until = self._failed.get(key)
        if until is None:
            return False
        if until > self._clock():
            return True
        del self._failed[key]
        return False

    def _count(self, job: Job, outcome: str) -> None:
        self._metrics.child(self._metrics.compress_calls, job.kind, outcome).inc()

    def _fail(self, key: str) -> None:
        self._failed[key] = self._clock() + self._retry_after
        while len(self._failed) > self._memory:
            self._failed.popitem(last=False)
