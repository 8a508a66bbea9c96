"""``skinflint audit``: where a traffic log's money went and what each strategy would save.

:func:`run_audit` reads the log (:mod:`.audit_input`), prices it (:mod:`.audit_figures`), finds
exact and near duplicates (:mod:`.audit_duplicates`), prompt bloat (:mod:`.audit_bloat`) and
over-powered model use (:mod:`.audit_routing`), replays the alert rules over it, and projects
each strategy's saving (:mod:`.audit_projection`). The result is one JSON-ready mapping, which
the CLI prints and :mod:`.audit_html` draws.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from skinflint.analytics import audit_projection as proj
from skinflint.analytics.audit_bloat import Bloat, find_bloat
from skinflint.analytics.audit_duplicates import (
    PREFILTER_NOTE,
    NearSetting,
    cache_lifetime,
    exact_duplicates,
    kept_out_by_temperature,
    near_duplicates,
)
from skinflint.analytics.audit_figures import (
    by_group,
    output_lengths,
    price_calls,
    spend_over_time,
    totals,
)
from skinflint.analytics.audit_input import AuditLog, Call, read_log
from skinflint.analytics.audit_routing import Overpowered, overpowered
from skinflint.config import Settings
from skinflint.embed import Embedder, embedder_for
from skinflint.gateway import price_catalog
from skinflint.pipeline.cache import semantic_defaults, semantic_setting
from skinflint.tokens import TokenCounter

__all__ = ["Progress", "iso", "run_audit"]

#: ``(stage, done, total)``; total is None while unknown.
Progress = Callable[[str, int, int | None], None]

LEDGER_NOTE = ("ledger export lines carry no request bodies: only spend figures and exact"
               " duplicates (by request hash) are computed for them")


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _quiet(stage: str, done: int, total: int | None) -> None:
    pass


def run_audit(
    path: str | Path,
    settings: Settings,
    *,
    since: float | None = None,
    until: float | None = None,
    embedder: Embedder | None = None,
    on_progress: Progress = _quiet,
) -> dict[str, Any]:
    """Audit the log at ``path`` (calls in ``[since, until)``) under ``settings``: its prices,
    cache rules, semantic threshold and verifier, routes and alert rules. ``embedder``
    replaces the semantic cache's configured one."""
    on_progress("reading", 0, None)
    log = read_log(path, since=since, until=until,
                   on_line=lambda n: on_progress("reading", n, None) if n % 1000 == 0 else None)
    calls = _in_time_order(log.calls)
    catalog = price_catalog(settings)
    counter = TokenCounter()
    on_progress("pricing", 0, None)
    price_calls(calls, catalog, counter)
    exact = exact_duplicates(calls, settings.cache)
    threshold, verifier = semantic_setting(settings)
    near = [False] * len(calls)
    if len(log.calls) > log.ledger_lines:
        on_progress("finding near duplicates", 0, None)
        setting = NearSetting(embedder or embedder_for(settings), threshold, verifier,
                              settings.cache.semantic.max_question_chars,
                              settings.cache.exact.scope, cache_lifetime(settings.cache))
        near = near_duplicates(calls, exact, setting,
                               lambda d, t: on_progress("embedding questions", d, t))
    on_progress("prompt bloat and routing", 0, None)
    bloat = find_bloat(calls, counter)
    routed = overpowered(calls, settings, catalog)
    result = _figures(path, log, calls, since, until)
    whole = totals(calls)
    kept_out = kept_out_by_temperature(calls, [e or n for e, n in zip(exact, near, strict=True)],
                                       settings.cache)
    result["exact_duplicates"] = _dup_figures(calls, exact, whole.requests)
    result["near_duplicates"] = {**_dup_figures(calls, near, whole.requests),
                                 "threshold": threshold, "verifier": verifier,
                                 "method": PREFILTER_NOTE}
    result["duplicates_kept_out_by_temperature"] = _dup_figures(calls, kept_out, whole.requests)
    if any(kept_out):
        result["notes"].append(
            f"{sum(kept_out)} of the duplicates set no temperature or one above the cache's"
            " max_temperature: as configured, the cache would not serve them; setting"
            " temperature (e.g. 0) in those requests, or max_temperature or"
            " cache_any_temperature for their feature, lets it")
    result["bloat"] = bloat.figures
    result["overpowered"] = routed.figures(whole.requests, bool(settings.routes))
    result["alerts"], result["alerts_note"] = _alerts(calls, settings)
    factor, _ = proj.monthly_factor(calls)
    strategies = _strategies(calls, exact, near, bloat, routed, catalog, threshold)
    result["strategies"] = [s.as_dict(whole.cost_usd, factor) for s in strategies]
    result["compound"] = _compound(result["strategies"], whole.cost_usd, factor)
    return result


def _in_time_order(calls: list[Call]) -> list[Call]:
    """By time (then line) when every call has one; else in the file's order."""
    if all(c.ts is not None for c in calls):
        return sorted(calls, key=lambda c: (c.ts or 0.0, c.line))
    return calls


def _figures(path: str | Path, log: AuditLog, calls: Sequence[Call],
             since: float | None, until: float | None) -> dict[str, Any]:
    whole = totals(calls)
    factor, span = proj.monthly_factor(calls)
    times = [c.ts for c in calls if c.ts is not None]
    notes = [LEDGER_NOTE] if log.ledger_lines else []
    if factor is None:
        notes.append("the log's calls do not all have a time spanning more than an instant:"
                     " savings are the log's own, not projected to a month")
    unpriced = sorted({c.model for c in calls if c.cost is None})
    return {
        "file": str(path),
        "lines": {"calls": len(calls), "ledger": log.ledger_lines, "bad": log.bad_count,
                  "outside_time_range": log.filtered_out,
                  "bad_lines": [{"line": b.line, "reason": b.reason} for b in log.bad]},
        "notes": notes,
        "since": iso(since), "until": iso(until),
        "start": iso(min(times)) if times else None, "end": iso(max(times)) if times else None,
        "span_days": span / 86400, "monthly_factor": factor,
        "requests": whole.requests, "cost_usd": round(whole.cost_usd, 9),
        "input_tokens": whole.input_tokens, "output_tokens": whole.output_tokens,
        "unpriced": {"requests": whole.unpriced, "models": unpriced},
        "by_feature": by_group(calls, lambda c: c.feature),
        "by_model": by_group(calls, lambda c: c.model),
        "by_user": by_group(calls, lambda c: c.user),
        "by_tenant": by_group(calls, lambda c: c.tenant),
        "output_length": output_lengths(calls),
        **_series(calls),
    }


def _series(calls: Sequence[Call]) -> dict[str, Any]:
    bucket, rows = spend_over_time(calls)
    return {"bucket": bucket, "series": [
        {"start": iso(start), "requests": n, "cost_usd": round(cost, 9)}
        for start, n, cost in rows]}


def _dup_figures(calls: Sequence[Call], marks: Sequence[bool], requests: int) -> dict[str, Any]:
    count = sum(marks)
    return {"requests": count, "share": count / requests if requests else 0.0,
            "cost_usd": round(proj.saving_of_marked(calls, marks), 9)}


def _alerts(calls: Sequence[Call], settings: Settings) -> tuple[list[dict[str, Any]], str]:
    """The alerts the rules would have fired over the log: the configuration's ``alerts:``
    rules (which are the documented defaults when the section is absent)."""
    try:
        alerts: Any = importlib.import_module("skinflint.alerts")
    except ImportError:
        return [], "the alert engine is not installed with this version"
    rules = tuple(getattr(settings, "alerts", alerts.DEFAULT_RULES))
    points = [(c.ts, {"tenant": c.tenant, "feature": c.feature, "model": c.model,
                      "user": c.user}, c.cost)
              for c in calls if c.ts is not None and c.cost is not None]
    events = alerts.replay(rules, points)
    found = [{"rule": e.rule, "scope": e.per, "name": e.name, "start": iso(e.start),
              "end": iso(e.end), "spend_usd": e.spend_usd, "baseline_usd": e.baseline_usd}
             for e in events]
    if not rules:
        return found, "no alert rules: the configuration's alerts: section is empty"
    source = "the default alert rules" if rules == tuple(alerts.DEFAULT_RULES) else (
        "the configuration's alerts: rules")
    return found, f"replayed {source} over the log's calls with a time and a price"


def _strategies(calls: Sequence[Call], exact: Sequence[bool], near: Sequence[bool],
                bloat: Bloat, routed: Overpowered, catalog: Any,
                threshold: float) -> list[proj.Strategy]:
    precision = proj.precision_at(semantic_defaults(), threshold)
    return [
        proj.Strategy(proj.saving_by_marked("exact_cache", calls, exact), (
            "every exact duplicate (same request, default normalisation, same scope) is served"
            " from the cache, so its whole cost and all its prompt and answer tokens are"
            " saved; assumes its entry has not expired and the cache may serve it (temperature"
            " within cache.exact.max_temperature, or cache_any_temperature for its feature)")),
        proj.Strategy(proj.saving_by_marked("semantic_cache", calls, near, precision), (
            f"near duplicates (similarity >= {threshold} with the semantic cache's embedder,"
            f" verifier passed) are served from the cache; only {precision:.1%} of them, the"
            " calibrated precision at this threshold on held-out labelled question pairs, are"
            " counted as saved (their cost and tokens): the others would get a wrong answer")),
        proj.Strategy(proj.saving_by_compression(calls, bloat.trimmable, catalog), (
            "system prompts lose their repeated lines and runs of whitespace (what"
            " deduplication removes without changing what they say): those prompt tokens are"
            " saved, at each call's input rate; no rewording or dropping of instructions is"
            " assumed")),
        proj.Strategy(proj.saving_by_routing(routed.saving), (
            "calls the configured route's classifier assigns to a task with a cheaper single"
            " model are sent there, with the same token counts (no token saved, only the price"
            " difference); quality is the route's"
            " assumption, not measured here; cascades are not counted"
            if routed.route or routed.saving else
            "not estimated: no routes configured (give --config with a routes: section)")),
        proj.Strategy(proj.saving_by_budgets(calls, catalog), (
            "max_tokens is capped at each feature's p95 answer length: the output tokens of"
            " the longest 5% beyond the cap are saved at the output rate, and those answers"
            " are cut short (their quality cost is not assessed)")),
        proj.Strategy(proj.saving_by_batching(calls, bloat.system_tokens, catalog), (
            "in-prompt batching: calls of one feature, model and system prompt within the"
            " same minute are packed into one prompt that carries their instructions once"
            " (the others' system prompt tokens are saved, at the input rate), assuming no"
            " one waits for those answers (background work); the batch API's discount is"
            " counted apart, under batch_api")),
        proj.Strategy(proj.saving_by_batch_api(calls, catalog), (
            "provider batch API: calls no one waits on are sent through the provider's batch"
            " API, the same tokens at its batch price (the price catalog's, else the"
            " provider's batch_discount, by default half) instead of the real-time one. A log"
            " cannot say what may wait: counted are calls with no end user, not streamed,"
            f" in a burst of >= {proj.BURST_CALLS} calls of one tenant, feature and model"
            " within a minute (background jobs), whose answers then arrive within the"
            " provider's window (up to 24 hours) instead of at once")),
    ]


def _compound(strategies: list[dict[str, Any]], total: float,
              factor: float | None) -> dict[str, Any]:
    share = min(proj.compound([s["saving_share"] for s in strategies]), 1.0)
    scale = factor if factor is not None else 1.0
    return {
        "saving_usd": round(total * share * scale, 6),
        "log_saving_usd": round(total * share, 9),
        "saving_share": share,
        "assumptions": "the strategies in pipeline order (exact cache, semantic cache,"
                       " compression, routing, token budgets, in-prompt batching, then the"
                       " batch API's price on what is still sent), each taking its share"
                       " of what the ones before left, as if independent; never more than the"
                       " spend",
    }
