"""Stage 3, defer: a request that asks to be answered through a provider's batch API
(``x-skinflint-priority: batch``, or any request of a feature configured ``deferrable``) is
stored as a job and answered at once with ``202`` and the job's id; the batch service
(:mod:`skinflint.jobs`) sends it with others of its model, and ``GET /v1/skinflint/jobs/{id}``
serves its answer.

A deferred request has met the attribute and guard stages only: it is authenticated,
attributed and admitted by its budgets (the guard's reservation becomes one request spent; its
cost counts when its result arrives). Rules, compression and routing do not apply. The exact
cache does: a request whose answer it holds (and may serve, as for any request) is not sent
again at the batch price. Its job is completed at once with the stored answer, the ``202``
carries it, the ledger records a cache hit (status 200, as a job's answer is recorded), and
the batch webhook is told. A deferred request is sent with no output cap (token budgets do not
apply), so these answers are those of uncapped requests. Otherwise the job notes where its
answer is to be stored when it arrives (:meth:`ResponseCache.deferred`), unless a budget sends it
to another model than the one asked for.

What cannot be deferred is decided in :meth:`Defer.deferral`, in one place: a request that asked
explicitly is refused (400) when it streams, is not a chat request, or names a model whose
provider has no batch API (or a route, whose model is chosen per request); a request of a
deferrable feature is then answered in real time instead. ``x-skinflint-priority: realtime``
opts a request of a deferrable feature out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson

from skinflint.config import BatchingConfig
from skinflint.errors import RequestError
from skinflint.interfaces import Job, JobStore
from skinflint.metrics import Metrics
from skinflint.pipeline.cache import ResponseCache
from skinflint.pipeline.context import Next, Reply, RequestContext, Target

__all__ = ["PRIORITY_HEADER", "Defer", "job_json", "new_job_id"]

PRIORITY_HEADER = "x-skinflint-priority"
_PRIORITIES = ("batch", "realtime")

#: The provider target that answers ``name`` through a batch API; None when none does.
BatchTarget = Callable[[str], Target | None]


def new_job_id(request_id: str) -> str:
    """A deferred request's job id: its request id is unique already (a random prefix per
    process, then a counter), and cheaper than random bytes per request."""
    return f"job_{request_id}"


def job_json(job: Job, response: Any = None) -> dict[str, Any]:
    """A job as ``GET /v1/skinflint/jobs/{id}`` (and the ``202``) shows it: ``response`` is the
    ``chat.completion`` once completed; ``error`` says why it failed or was cancelled."""
    out: dict[str, Any] = {
        "id": job.id, "object": "skinflint.job", "status": job.state,
        "model": job.requested_model, "created_at": int(job.created),
        "request_id": job.request_id,
    }
    if job.finished:
        out["finished_at"] = int(job.finished)
    if response is not None:
        out["response"] = response
    if job.error and job.state in ("failed", "cancelled"):
        out["error"] = {"code": job.error, "message": job.message}
    return out


class Defer:
    name = "defer"

    def __init__(self, config: BatchingConfig, store: JobStore | None, target: BatchTarget,
                 *, clock: Callable[[], float] = time.time, metrics: Metrics | None = None,
                 cache: ResponseCache | None = None,
                 answered: Callable[[Job], None] | None = None) -> None:
        """With no ``store`` (library use) nothing is deferred and the stage is skipped.
        ``cache``: where stored answers are looked for; ``answered``: told of each job the
        cache answered (the finished-jobs metric, the webhook)."""
        self._config = config
        self._store = store
        self._target = target
        self._clock = clock
        self._metrics = metrics
        self._cache = cache
        self._answered = answered
        self.enabled = store is not None

    def deferral(self, ctx: RequestContext) -> Target | None:
        """Where ``ctx`` is deferred to; None: answered in real time. Raises RequestError for
        a request that asked to be deferred and cannot be (see the module docstring)."""
        if ctx.packed is not None:  # a batch_map call: its caller waits for the answer
            return None
        asked = ctx.headers.get(PRIORITY_HEADER)
        if asked is not None:
            asked = asked.strip().lower()
            if asked not in _PRIORITIES:
                raise RequestError(f"{PRIORITY_HEADER} must be one of {list(_PRIORITIES)}",
                                   code="invalid_header")
            if asked == "realtime":
                return None
        elif not self._config.deferrable(ctx.feature):
            return None
        explicit = asked == "batch"
        if ctx.endpoint != "chat" or ctx.stream:
            _refuse(explicit, "only non-streaming chat requests can be deferred",
                    "batch_streaming" if ctx.stream else "batch_unsupported")
            return None
        name = ctx.requested_model
        if ctx.budget is not None and ctx.budget.downgrade_to:
            name = ctx.budget.downgrade_to
        target = self._target(name)
        if target is None:
            _refuse(explicit, f"model {name[:64]!r} cannot be deferred: its provider has no"
                    " batch API, or it is a route", "batch_unsupported")
        return target

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        target = self.deferral(ctx)
        if target is None:
            return await next(ctx)
        assert self._store is not None  # else not enabled
        stored, later = (await self._cache.deferred(ctx) if self._cache is not None
                         else (None, None))
        now = self._clock()
        job = Job(
            id=new_job_id(ctx.request_id), tenant=ctx.tenant, feature=ctx.feature, user=ctx.user,
            request_id=ctx.request_id, requested_model=target.name, provider=target.provider,
            provider_model=target.provider_model, body=ctx.raw_body, created=now,
            due=now + self._config.window_seconds)
        if stored is not None:  # answered: nothing to send
            assert stored.body is not None
            raw = stored.raw if stored.raw is not None else orjson.dumps(stored.body)
            job = replace(job, state="completed", response=raw, finished=now)
        elif later is not None and target.name == ctx.requested_model:  # not another's answer
            job = replace(job, cache_key=later[0], cache_ttl=later[1])
        await self._store.enqueue([job])
        if self._metrics is not None:
            self._metrics.child(self._metrics.jobs_accepted, "deferred").inc()
        ctx.deferred = job.id
        if stored is None:
            ctx.status = 202  # accepted; answered (its ledger row's status) when it is
            return Reply(body=job_json(job), status=202)
        if self._answered is not None:
            self._answered(job)
        return Reply(body=job_json(job, stored.body), status=202)


def _refuse(explicit: bool, message: str, code: str) -> None:
    """Refuse a request that asked to be deferred; one of a deferrable feature goes on."""
    if explicit:
        raise RequestError(message, code=code)
