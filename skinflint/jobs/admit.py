"""Budgets for a passed-through batch: its lines are admitted as the guard stage admits a
request, all at once, when the batch is created. Each budget a line meets reserves what the line
may cost at most; the lines' reservations are summed per budget counter and reserved in one
atomic call, so a batch is taken whole or refused whole (429 ``budget_exceeded``). Once
admitted, each line counts as one request spent; its cost counts when its result arrives
(:mod:`skinflint.jobs.settle`), as for a deferred request."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from skinflint.errors import BudgetExceededError
from skinflint.interfaces import Amounts, Claim, Job
from skinflint.pipeline.budgets import BudgetBook
from skinflint.pipeline.context import RequestContext

__all__ = ["admit_lines", "job_context"]

Key = tuple[str, str, float]


def job_context(job: Job, *, parsed: bool = False) -> RequestContext:
    """A request context carrying ``job``'s attribution (and, ``parsed``, its body), as the
    budgets read it."""
    ctx = RequestContext(job.request_id, job.created, 0.0, "chat", job.body if parsed else b"",
                         {}, tenant=job.tenant, feature=job.feature, user=job.user,
                         requested_model=job.requested_model)
    if parsed:
        ctx.body = orjson.loads(job.body)
    return ctx


def _add(a: Amounts, b: Amounts) -> Amounts:
    return Amounts(a.usd + b.usd, a.requests + b.requests, a.tokens + b.tokens)


def _claims(book: BudgetBook, jobs: Sequence[Job], now: float) -> list[Claim]:
    """Every line's claims, summed per counter."""
    merged: dict[Key, Claim] = {}
    for job in jobs:
        ctx = job_context(job, parsed=True)
        applying = book.applying(ctx)
        if not applying:
            continue
        for _, claim in book.claims(applying, book.estimate(ctx), now):
            key = (claim.budget, claim.subject, claim.window_start)
            have = merged.get(key)
            merged[key] = claim if have is None else have._replace(
                amount=_add(have.amount, claim.amount))
    return list(merged.values())


async def admit_lines(book: BudgetBook | None, jobs: Sequence[Job]) -> None:
    """Admit a batch's lines (see the module docstring); raises BudgetExceededError when a
    hard budget would pass its limit, having reserved nothing."""
    if book is None or not book.budgets:
        return
    now = book.clock()
    claims = _claims(book, jobs, now)
    if not claims:
        return
    admission = await book.counters.reserve(claims, now)
    if admission.blocked is not None:
        claim = claims[admission.blocked]
        whose = f" for {claim.subject!r}" if claim.subject else ""
        wait = max(claim.window_end - now, 1.0)
        raise BudgetExceededError(
            f"budget {claim.budget!r} cannot take this batch's {len(jobs)} lines{whose};"
            f" it resets in {wait:.0f} s", budget=claim.budget, retry_after=wait)
    for claim in claims:  # each line counts as a request now; its cost when it is answered
        book.counters.settle([claim], Amounts(requests=claim.amount.requests))
