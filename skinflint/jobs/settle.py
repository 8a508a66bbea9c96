"""What happens to a provider batch's results: each job's outcome is recorded in the job store
(once: a result already recorded is ignored), then, for each job that call finished, exactly
one ledger row, its spend in the budgets, and the webhook.

* a line answered by the batch: ledger strategy ``batch``, cost at the batch price, baseline
  and saving against the real-time price of the same model;
* a line that expired, or failed at the provider (or a batch the provider refused whole): with
  ``on_failure: realtime``, one real-time call through its provider, ledgered like any
  real-time call (strategy empty, real-time price); with ``fail``, the job fails with the
  provider's message (ledgered at no cost: the provider bills no failed line);
* a line cancelled (the client cancelled its passed-through batch): the job is cancelled.

A deferred request's answer is stored in the exact cache where its job says
(``Job.cache_key``), whether the batch or a real-time retry gave it.

Jobs about to be retried in real time are marked in the store first (:data:`RETRYING`); a job
still marked when its batch is settled again, by a process started after one that stopped
mid-retry, may have been answered and billed: it fails (``realtime_interrupted``), ledgered at
an unknown cost, and is not asked again.

The ledger row's request id is the deferred request's own (or the job's id, for a line of a
passed-through batch); its time is when the result arrived.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from skinflint.cachekey import request_hash
from skinflint.errors import UpstreamError
from skinflint.interfaces import (
    RETRYING,
    Amounts,
    Job,
    JobResult,
    JobStore,
    Ledger,
    Provider,
)
from skinflint.jobs.admit import job_context
from skinflint.metrics import Metrics
from skinflint.models import BatchOutcome, Completion, LedgerRecord, UpstreamRequest, Usage
from skinflint.monitor import Webhook
from skinflint.pipeline.budgets import BudgetBook
from skinflint.pipeline.cache import ResponseCache
from skinflint.pricing import PriceCatalog

__all__ = ["BATCH_STRATEGY", "BatchPrice", "Settler", "line_body"]

log = logging.getLogger("skinflint.batches")

#: The ledger's strategy for a line answered by a provider batch.
BATCH_STRATEGY = "batch"
#: Real-time retries of failed lines running at once, and recorded together.
RETRIES_AT_ONCE = 8
RETRY_CHUNK = 4 * RETRIES_AT_ONCE
#: Results recorded and ledgered at a time (a batch of 50,000 lines must not hold the event
#: loop for long).
CHUNK = 500
_INTERRUPTED = ("the gateway stopped during this line's real-time retry: the provider may have"
                " answered and billed it; it is not asked again")
#: Answers stored in the exact cache at once.
KEEPS_AT_ONCE = 32
#: Webhook deliveries running at once.
WEBHOOKS_AT_ONCE = 16

#: USD for ``usage`` of model ``name`` on ``provider`` at its batch price; None: unknown.
BatchPrice = Callable[[str, str, Usage], float | None]


def line_body(job: Job) -> dict[str, Any]:
    """The request a job sends: the client's body, naming the provider's model."""
    body: dict[str, Any] = orjson.loads(job.body)
    body["model"] = job.provider_model
    return body


@dataclass(frozen=True, slots=True)
class _How:
    strategy: str  # BATCH_STRATEGY, or "" for a real-time retry
    status: int = 200
    error_type: str = ""
    cost_known: bool = True  # False: a call that may have been billed, at a price unknown


class Settler:
    """Records outcomes (see the module docstring)."""

    def __init__(
        self, store: JobStore, *, ledger: Ledger, catalog: PriceCatalog, batch_price: BatchPrice,
        providers: Mapping[str, Provider], timeouts: Mapping[str, float], on_failure: str,
        budgets: BudgetBook | None = None, webhook: Webhook | None = None,
        webhook_url: str | None = None, clock: Callable[[], float],
        metrics: Metrics | None = None, cache: ResponseCache | None = None,
    ) -> None:
        self._store = store
        self._ledger = ledger
        self._catalog = catalog
        self._batch_price = batch_price
        self._providers = providers
        self._timeouts = timeouts
        self._on_failure = on_failure
        self._budgets = budgets
        self._webhook = webhook
        self._webhook_url = webhook_url
        self._clock = clock
        self._metrics = metrics
        self._cache = cache
        self._retrying = asyncio.Semaphore(RETRIES_AT_ONCE)
        self._sending = asyncio.Semaphore(WEBHOOKS_AT_ONCE)
        self._deliveries: set[asyncio.Task[bool]] = set()

    async def settle(self, jobs: Sequence[Job], outcomes: Sequence[BatchOutcome],
                     *, cancelled: bool = False) -> list[Job]:
        """Record ``outcomes`` for the unfinished ``jobs`` (a job with no outcome failed);
        ``cancelled``: the client cancelled the batch, so nothing is retried. The jobs this
        call finished."""
        by_id = {o.custom_id: o for o in outcomes}
        results: list[tuple[JobResult, _How]] = []
        retry: list[tuple[Job, BatchOutcome]] = []
        for job in jobs:
            if job.state in ("completed", "failed", "cancelled"):
                continue
            if job.error == RETRYING:  # left under way by a process that stopped
                results.append((JobResult(job.id, "failed", error="realtime_interrupted",
                                          message=_INTERRUPTED),
                                _How("", 499, "realtime_interrupted", cost_known=False)))
                continue
            o = by_id.get(job.id) or BatchOutcome(job.id, error="failed",
                                                  message="missing from the batch's results")
            if o.completion is not None:
                results.append((JobResult(job.id, "completed", orjson.dumps(o.completion.body)),
                                _How(BATCH_STRATEGY)))
            elif cancelled or o.error == "cancelled":
                results.append((JobResult(job.id, "cancelled", error="cancelled",
                                          message=o.message or "the batch was cancelled"),
                                _How(BATCH_STRATEGY, 499, "cancelled")))
            elif self._on_failure == "realtime":
                retry.append((job, o))
            else:
                results.append((JobResult(job.id, "failed", error=o.error or "failed",
                                          message=o.message),
                                _How(BATCH_STRATEGY, 502, f"batch_{o.error or 'failed'}")))
        finished = await self._record(results, CHUNK)
        # each group of retries is recorded as soon as it is answered: a stop loses few
        for start in range(0, len(retry), RETRY_CHUNK):
            group = retry[start:start + RETRY_CHUNK]
            await self._store.retrying([j.id for j, _ in group])  # never asked twice
            answered = await asyncio.gather(*(self._realtime(j, o) for j, o in group))
            finished += await self._record(answered, CHUNK)
        return finished

    async def _record(self, results: Sequence[tuple[JobResult, _How]], chunk: int) -> list[Job]:
        """Record ``results`` and account for the jobs they finished, ``chunk`` at a time (the
        event loop serves between chunks)."""
        hows = {r.job_id: how for r, how in results}
        finished: list[Job] = []
        for start in range(0, len(results), chunk):
            part = [r for r, _ in results[start:start + chunk]]
            done = await self._store.finish(part, self._clock())
            for job in done:
                self._account(job, hows[job.id])
            finished += done
        await self._keep(finished)  # once all are recorded: a slow cache holds up none
        return finished

    async def _keep(self, jobs: Sequence[Job]) -> None:
        """Store the answers of deferred requests the cache is to keep, a few at a time."""
        if self._cache is None:
            return
        kept = [j for j in jobs if j.cache_key and j.state == "completed" and j.response]
        for start in range(0, len(kept), KEEPS_AT_ONCE):
            await asyncio.gather(*(self._keep_one(j) for j in kept[start:start + KEEPS_AT_ONCE]))

    async def _keep_one(self, job: Job) -> None:
        assert self._cache is not None and job.response is not None
        try:
            await self._cache.keep(job.cache_key, job.cache_ttl, job.response)
        except Exception as exc:  # the answer is recorded; only the cache misses it
            log.warning("batches: storing the answer of %s in the cache failed: %r", job.id, exc)

    async def _realtime(self, job: Job, outcome: BatchOutcome) -> tuple[JobResult, _How]:
        """The line, once, as a real-time call through its provider."""
        provider = self._providers.get(job.provider)
        timeout = self._timeouts.get(job.provider, 600.0)
        why = f"batch line {outcome.error or 'failed'}: {outcome.message}".strip()
        if provider is None:
            return (JobResult(job.id, "failed", error=outcome.error or "failed", message=why),
                    _How("", 502, "batch_failed"))
        async with self._retrying:
            try:
                done: Completion = await provider.complete(
                    UpstreamRequest(job.provider_model, line_body(job), timeout=timeout))
            except UpstreamError as exc:
                message = f"{why}; the real-time retry failed too: {exc.message}"
                return (JobResult(job.id, "failed", error="realtime_failed", message=message),
                        _How("", exc.status, exc.code or exc.error_type))
        return JobResult(job.id, "completed", orjson.dumps(done.body)), _How("")

    def account_cancelled(self, job: Job) -> None:
        """The row of a job cancelled before it was sent (nothing was spent)."""
        self._account(job, _How(BATCH_STRATEGY, 499, "cancelled"))

    def _account(self, job: Job, how: _How) -> None:
        answer = orjson.loads(job.response) if job.response is not None else {}
        usage = Usage.from_openai(answer.get("usage")) or Usage()
        price = self._catalog.cost(job.requested_model, usage)
        if how.strategy == BATCH_STRATEGY and job.state == "completed":
            cost = self._batch_price(job.provider, job.requested_model, usage)
        elif not how.cost_known:
            cost = None
        else:  # a real-time retry costs the real-time price; a line not answered, nothing
            cost = price if job.state == "completed" else 0.0
        baseline = price if job.state == "completed" else 0.0
        saved = None if cost is None or baseline is None else baseline - cost
        now = self._clock()
        self._ledger.record(LedgerRecord(
            request_id=job.request_id, ts=now, request_hash=_hash(job), tenant=job.tenant,
            feature=job.feature, user=job.user, requested_model=job.requested_model,
            model=str(answer.get("model") or job.provider_model), provider=job.provider,
            **usage.columns(), cost_usd=cost, baseline_cost_usd=baseline,
            saved_usd=saved, strategy=how.strategy, status=how.status,
            error_type=how.error_type, route=job.requested_model,
            latency_ms=max(now - job.created, 0.0) * 1000))
        self._spend(job, Amounts(cost or 0.0, 0, usage.input_tokens + usage.output_tokens))
        self.finished(job)

    def _spend(self, job: Job, amount: Amounts) -> None:
        """Count what the job spent in its budgets (it counted as a request when it was
        admitted: the guard's for a deferred request, :mod:`skinflint.jobs.admit` for a line
        of a passed-through batch)."""
        book = self._budgets
        if book is None or not book.budgets:
            return
        ctx = job_context(job)
        claims = [c for _, c in book.claims(book.applying(ctx), Amounts(), book.clock())]
        if claims:
            book.counters.settle(claims, amount)

    def finished(self, job: Job) -> None:
        """A job finished (here, or by the exact cache when it was accepted): the finished-jobs
        metric and the webhook."""
        if self._metrics is not None:
            outcome = "expired" if job.state == "failed" and job.error == "expired" else job.state
            self._metrics.child(self._metrics.jobs_finished, outcome).inc()
        if self._webhook is None or not self._webhook_url or job.group:
            return
        task = asyncio.ensure_future(self._deliver({"id": job.id, "status": job.state}))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, payload: dict[str, Any]) -> bool:
        assert self._webhook is not None and self._webhook_url
        async with self._sending:
            return await self._webhook.deliver(self._webhook_url, payload)

    async def close(self, grace: float) -> None:
        """Give webhooks in flight ``grace`` seconds, then cancel them."""
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=grace)
            for task in self._deliveries:
                task.cancel()
            await asyncio.gather(*self._deliveries, return_exceptions=True)


def _hash(job: Job) -> str:
    try:
        return request_hash("chat", orjson.loads(job.body))
    except orjson.JSONDecodeError:
        return ""
