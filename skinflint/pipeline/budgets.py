"""Budgets as the configuration states them: which apply to a request, their calendar
windows (UTC), what a request may cost at most and what it cost, and the figures
``GET /api/budgets``, ``/metrics`` and ``skinflint budgets`` show.

A request's worst case is its prompt tokens plus its output cap (``max_completion_tokens`` or
``max_tokens``, else the model's ``max_output_tokens``, else :data:`DEFAULT_OUTPUT_CAP`) times
``n``, priced as the model asked for;
for a route, as its dearest task (a cascade's tiers all counted). The prompt is bounded by the
size of the body the client sent, in bytes: a byte-level BPE token (OpenAI's, and most open
models') is at least one byte, so the bound holds without running a tokenizer on the request
path. It is generous (about four bytes a token in English), and lasts only until the answer is
accounted and the reservation is replaced by the real cost."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from skinflint.config import BudgetConfig, Settings
from skinflint.interfaces import Amounts, BudgetCounters, Claim, CounterRow, Limits
from skinflint.models import LedgerRecord, Usage
from skinflint.pipeline.context import RequestContext
from skinflint.pricing import PriceCatalog

__all__ = ["DEFAULT_OUTPUT_CAP", "BudgetBook", "alert_marks", "window_bounds"]

#: Output tokens a request that sets no cap is assumed to be able to produce.
DEFAULT_OUTPUT_CAP = 4096

Clock = Callable[[], float]


def window_bounds(window: str, now: float) -> tuple[float, float]:
    """The calendar window (UTC) ``now`` falls in, as unix seconds [start, end)."""
    t = datetime.fromtimestamp(now, UTC)
    if window == "minute":
        start = t.replace(second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 60
    if window == "hour":
        start = t.replace(minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 3600
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "day":
        return start.timestamp(), start.timestamp() + 86400
    start = start.replace(day=1)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(
        month=start.month + 1)
    return start.timestamp(), end.timestamp()


def _limits(budget: BudgetConfig) -> Limits:
    return Limits(budget.limit.usd, budget.limit.requests, budget.limit.tokens)


def _subject(budget: BudgetConfig, ctx: RequestContext) -> str | None:
    """Whose counter of ``budget`` the request counts in; None: the budget does not apply."""
    per = budget.per
    if per == "global":
        return ""
    # A gateway key belongs to one tenant: per key counts as per tenant.
    value = (ctx.tenant if per in ("tenant", "key") else ctx.feature if per == "feature"
             else ctx.user if per == "user" else ctx.requested_model)
    if budget.match is not None and value != budget.match:
        return None
    return value


def _prompt_bound(ctx: RequestContext) -> int:
    """At least the request's prompt tokens: the size of its body in bytes (see the module)."""
    return len(ctx.raw_body) if ctx.raw_body else len(orjson.dumps(ctx.body))


def _asked_output(body: Mapping[str, Any]) -> tuple[int | None, int]:
    """The client's output cap (``max_completion_tokens`` or ``max_tokens``; None when it set
    none) and its number of choices."""
    cap = body.get("max_completion_tokens", body.get("max_tokens"))
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
    if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
        return None, choices
    return cap, choices


def _route_models(settings: Settings) -> dict[str, tuple[tuple[str, ...], ...]]:
    """Per route, the models each task may call (a cascade's every tier)."""
    return {
        name: tuple(
            (t.model,) if t.model else tuple(n for tier in t.cascade for n in tier.names)
            for t in route.tasks.values()
        ) + tuple((m,) for m in route.pins.values())
        for name, route in settings.routes.items()
    }


@dataclass(frozen=True, slots=True)
class _Window:
    start: float
    end: float


class BudgetBook:
    """The configured budgets and their counters."""

    def __init__(
        self, settings: Settings, counters: BudgetCounters, *, catalog: PriceCatalog,
        clock: Clock = time.time,
    ) -> None:
        self.budgets = settings.budgets
        self.counters = counters
        self.clock = clock
        self._catalog = catalog
        self._limits = {b.name: _limits(b) for b in self.budgets}
        self._routes = _route_models(settings)
        self._caps = {name: m.max_output_tokens for name, m in settings.models.items()
                      if m.max_output_tokens is not None}
        self._windows: dict[str, _Window] = {}
        self._measures_cost = any(
            b.limit.usd is not None or b.limit.tokens is not None for b in self.budgets)

    def window(self, kind: str, now: float) -> _Window:
        found = self._windows.get(kind)
        if found is None or not found.start <= now < found.end:
            found = self._windows[kind] = _Window(*window_bounds(kind, now))
        return found

    def applying(self, ctx: RequestContext) -> list[tuple[BudgetConfig, str]]:
        """The budgets that count ``ctx``, each with the subject it is counted for."""
        found = []
        for budget in self.budgets:
            subject = _subject(budget, ctx)
            if subject is not None:
                found.append((budget, subject))
        return found

    def claims(
        self, applying: list[tuple[BudgetConfig, str]], amount: Amounts, now: float
    ) -> list[tuple[BudgetConfig, Claim]]:
        """Each of the ``applying`` budgets with its claim of ``amount`` in its window."""
        found = []
        for budget, subject in applying:
            w = self.window(budget.window, now)
            claim = Claim(budget.name, subject, w.start, w.end, self._limits[budget.name],
                          amount, budget.action == "block")
            found.append((budget, claim))
        return found

    def estimate(self, ctx: RequestContext) -> Amounts:
        """The most the request may cost (see the module)."""
        if not self._measures_cost:
            return Amounts(requests=1)
        prompt, asked = _prompt_bound(ctx), _asked_output(ctx.body)
        groups = self._routes.get(ctx.requested_model, ((ctx.requested_model,),))
        usd = max(sum(self._cost(m, prompt, asked) for m in group) for group in groups)
        output = max(self._output(m, asked) for group in groups for m in group)
        return Amounts(usd, 1, prompt + output)

    def _output(self, model: str, asked: tuple[int | None, int]) -> int:
        """The most output tokens a call to ``model`` may produce: the client's cap, else the
        model's configured ``max_output_tokens``, else :data:`DEFAULT_OUTPUT_CAP`; times n."""
        cap, choices = asked
        return (cap if cap is not None else self._caps.get(model, DEFAULT_OUTPUT_CAP)) * choices

    def _cost(self, model: str, prompt: int, asked: tuple[int | None, int]) -> float:
        usage = Usage(input_tokens=prompt, output_tokens=self._output(model, asked))
        return self._catalog.cost(model, usage) or 0.0  # an unknown price reserves nothing

    @staticmethod
    def actual(ctx: RequestContext) -> Amounts:
        """What the request spent, once accounted: an answer the gateway gave by itself (a
        cache hit, a rule) costs nothing."""
        if ctx.served_locally:
            return Amounts(requests=1)
        tokens = sum(u.input_tokens + u.output_tokens
                     for u in [ctx.usage, *(a.usage for a in ctx.attempts)] if u is not None)
        return Amounts(ctx.costs.cost_usd or 0.0, 1, tokens)

    @staticmethod
    def side_call(row: LedgerRecord) -> Amounts:
        """What a call made beside a request spent: its cost and tokens, no request."""
        return Amounts(row.cost_usd or 0.0, 0, row.input_tokens + row.output_tokens)

    async def rows(self) -> list[dict[str, Any]]:
        """Each budget's current window per subject: limits, spent, reserved, remaining. A
        budget that counts one subject (global, or with ``match``) is listed even unused."""
        now = self.clock()
        counted = await self.counters.snapshot(now)
        by_budget: dict[str, list[CounterRow]] = {}
        for row in counted:
            by_budget.setdefault(row.budget, []).append(row)
        out: list[dict[str, Any]] = []
        for budget in self.budgets:
            w = self.window(budget.window, now)
            rows = [r for r in by_budget.get(budget.name, []) if r.window_start == w.start]
            if not rows and (budget.per == "global" or budget.match is not None):
                zero = Amounts()
                rows = [CounterRow(budget.name, budget.match or "", w.start, w.end, zero, zero)]
            out.extend(_describe(budget, self._limits[budget.name], r) for r in rows)
        return out


def _amounts(a: Amounts) -> dict[str, float | int]:
    return {"usd": round(a.usd, 10), "requests": a.requests, "tokens": a.tokens}


def _describe(budget: BudgetConfig, limits: Limits, row: CounterRow) -> dict[str, Any]:
    limit = budget.limit.model_dump(exclude_none=True)
    used = _amounts(row.spent)
    held = _amounts(row.reserved)
    remaining = {k: max(v - used[k] - held[k], 0) for k, v in limit.items()}
    if "usd" in remaining:
        remaining["usd"] = round(remaining["usd"], 10)
    return {
        "name": budget.name, "per": budget.per, "subject": row.subject,
        "window": budget.window, "action": budget.action,
        "window_start": _iso(row.window_start), "window_end": _iso(row.window_end),
        "limit": limit, "spent": used, "reserved": held, "remaining": remaining,
        "used": round(limits.used(Amounts(row.spent.usd + row.reserved.usd,
                                          row.spent.requests + row.reserved.requests,
                                          row.spent.tokens + row.reserved.tokens)), 6),
    }


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def alert_marks(budget: BudgetConfig) -> tuple[float, ...]:
    """The fractions of its limit at which ``budget`` alerts (an ``alert`` budget with none
    given alerts at 1)."""
    return budget.alert_at or ((1.0,) if budget.action == "alert" else ())
