"""Over-powered model use: calls a configured route would have sent to a cheaper model.

Each logged call to a concrete model is classified as the route would classify it (feature
pins, the task header's absence, the route's rules, its trained classifier, its default task);
when the task names one model that costs less for the same tokens, the call is over-powered.
A task answered by a cascade is not counted: which tier answers depends on its quality gates
at run time. Without a ``routes:`` section there is no classifier to ask, and nothing is
counted.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from skinflint.analytics.audit_input import Call
from skinflint.config import RouteConfig, Settings
from skinflint.pipeline.context import RequestContext
from skinflint.pipeline.route import RoutePlan
from skinflint.pricing import PriceCatalog
from skinflint.routing.artifacts import load_classifiers

__all__ = ["Overpowered", "overpowered"]


class Overpowered:
    def __init__(self) -> None:
        self.saving: dict[int, float] = {}  # call index -> USD a cheaper model saves
        self.moves: dict[tuple[str, str], list[float]] = defaultdict(list)
        self.route = ""

    def figures(self, calls: int, configured: bool) -> dict[str, Any]:
        if not configured:
            return {"route": None, "requests": 0, "share": 0.0, "saving_usd": 0.0, "moves": [],
                    "note": "no routes configured: give --config with a routes: section"}
        moves = sorted(self.moves.items(), key=lambda kv: -sum(kv[1]))
        return {
            "route": self.route,
            "requests": len(self.saving),
            "share": len(self.saving) / calls if calls else 0.0,
            "saving_usd": round(sum(self.saving.values()), 9),
            "moves": [{"from": a, "to": b, "requests": len(s), "saving_usd": round(sum(s), 9)}
                      for (a, b), s in moves],
        }


def _covers(config: RouteConfig, model: str) -> bool:
    named = {t.model for t in config.tasks.values()} | {config.baseline}
    return model in named


def _plan_for(plans: dict[str, RoutePlan], model: str) -> RoutePlan:
    """The first route that names ``model`` (as a task's model or its baseline), else the
    first route."""
    for plan in plans.values():
        if _covers(plan.config, model):
            return plan
    return next(iter(plans.values()))


def _target(plan: RoutePlan, call: Call) -> str | None:
    assert call.body is not None
    pinned = plan.config.pins.get(call.feature) if call.feature else None
    if pinned is not None:
        return pinned
    ctx = RequestContext(request_id="", ts=0.0, started=0.0, endpoint="chat", raw_body=b"",
                         headers={}, body=call.body, feature=call.feature)
    task, _ = plan.classify(ctx)
    return plan.config.tasks[task].model


def overpowered(calls: Sequence[Call], settings: Settings, catalog: PriceCatalog) -> Overpowered:
    found = Overpowered()
    if not settings.routes:
        return found
    classifiers = load_classifiers(settings)
    plans = {name: RoutePlan(name, cfg, classifiers.get(name), {})
             for name, cfg in settings.routes.items()}
    for i, call in enumerate(calls):
        if call.body is None or call.cost is None or call.usage is None or not call.is_request:
            continue
        asked = str(call.body.get("model") or call.model)
        if asked in plans:
            continue  # already routed
        plan = _plan_for(plans, asked)
        found.route = found.route or plan.name
        target = _target(plan, call)
        if target is None or target in (asked, call.model):
            continue
        cheaper = catalog.cost(target, call.usage)
        if cheaper is not None and cheaper < call.cost:
            found.saving[i] = call.cost - cheaper
            found.moves[asked, target].append(call.cost - cheaper)
    return found
