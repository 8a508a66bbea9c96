"""Stage 2, guard: budgets and rate limits.

For the budgets that apply to a request it reserves, at once and atomically, one request and
the most the request may cost (see :mod:`skinflint.pipeline.budgets`). A ``block`` budget it
would pass refuses it (429 ``budget_exceeded``, ``Retry-After`` until the window resets); a
``downgrade`` budget it passes sends it to another model; alert thresholds it crosses are
logged and counted. Once the account stage has priced the request, however it ended, the
reservation is replaced by what it really spent. Calls made for the request beside its own
(a cheap model's rewrite or summary, a shadow call, its judge) add their spend to the same
budgets when they end: they count, but no request is refused for them.
"""

from __future__ import annotations

import logging

from skinflint.config import BudgetConfig
from skinflint.errors import BudgetExceededError
from skinflint.interfaces import Admission, Amounts, Claim
from skinflint.metrics import Metrics
from skinflint.models import LedgerRecord
from skinflint.pipeline.budgets import BudgetBook, alert_marks
from skinflint.pipeline.context import BudgetDecision, Next, Reply, RequestContext

__all__ = ["Guard"]

log = logging.getLogger("skinflint.budgets")

NOTHING = Amounts()


class Guard:
    name = "guard"

    def __init__(self, book: BudgetBook | None, metrics: Metrics) -> None:
        """With no budgets (``book`` None or empty) the stage is skipped."""
        self._book = book
        self._metrics = metrics
        self.enabled = book is not None and bool(book.budgets)

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        book = self._book
        assert book is not None
        applying = book.applying(ctx)
        if not applying:
            return await next(ctx)
        now = book.clock()
        found = book.claims(applying, book.estimate(ctx), now)
        claims = [c for _, c in found]
        admission = await book.counters.reserve(claims, now)
        if admission.blocked is not None:
            budget, claim = found[admission.blocked]
            raise _exceeded(budget, claim, now)
        ctx.budget = self._decide(found, admission)

        def settle(done: RequestContext) -> None:
            book.counters.settle(claims, book.actual(done))

        def side_call(row: LedgerRecord) -> None:  # spend beside the request: none reserved
            book.counters.settle([c._replace(amount=NOTHING) for c in claims],
                                 book.side_call(row))

        ctx.on_accounted = settle
        ctx.on_side_call = side_call
        return await next(ctx)

    def _decide(
        self, found: list[tuple[BudgetConfig, Claim]], admission: Admission
    ) -> BudgetDecision:
        downgrade_to = downgraded_by = ""
        alerts: list[tuple[str, float]] = []
        for i, (budget, claim) in enumerate(found):
            before, after = admission.before[i], admission.after[i]
            marks = alert_marks(budget)
            if marks:
                self._alert(budget, claim, [m for m in marks if before < m <= after], alerts)
            if budget.downgrade_to and not downgrade_to and after > 1 + 1e-9:
                downgrade_to, downgraded_by = budget.downgrade_to, budget.name
        return BudgetDecision(tuple(b.name for b, _ in found), downgrade_to, downgraded_by,
                              tuple(alerts))

    def _alert(self, budget: BudgetConfig, claim: Claim, crossed: list[float],
               alerts: list[tuple[str, float]]) -> None:
        for mark in crossed:
            alerts.append((budget.name, mark))
            self._metrics.child(self._metrics.budget_alerts, budget.name, f"{mark:g}").inc()
            log.warning("budget %s reached %.0f%% of its limit (%s)",
                        budget.name, mark * 100, claim.subject or "global")


def _exceeded(budget: BudgetConfig, claim: Claim, now: float) -> BudgetExceededError:
    whose = f" for {budget.per} {claim.subject!r}" if budget.per != "global" else ""
    wait = max(claim.window_end - now, 1.0)
    return BudgetExceededError(
        f"budget {budget.name!r} is exhausted{whose} for this {budget.window};"
        f" it resets in {wait:.0f} s",
        budget=budget.name,
        retry_after=wait,
    )
