"""Stage 7, route: resolve the requested name to what answers it.

A concrete model or alias resolves to its target and ordered fallbacks. A route name (e.g.
``auto``) first picks a task, in this order: a feature pinned to a model, the
``x-skinflint-task`` header, the route's deterministic rules, its trained classifier, its
default task; the task then names one model or a cheap-first cascade.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from skinflint.config import RouteConfig, RuleConfig, Settings
from skinflint.errors import UnknownModelError
from skinflint.messages import last_user_text
from skinflint.metrics import Metrics
from skinflint.pipeline.cascade import Cascade, Scorer
from skinflint.pipeline.context import Next, Reply, RequestContext, RouteDecision, Target
from skinflint.routing.classifier import TaskClassifier

__all__ = ["Route", "RoutePlan"]

_MEMO_LIMIT = 4096  # resolved names remembered beyond the configured ones
_NAMES_LISTED = 20  # valid names an unknown-model error lists before "and N more"


def _rule_matches(
    rule: RuleConfig, pattern: re.Pattern[str] | None, text: str, feature: str
) -> bool:
    if rule.feature is not None and rule.feature != feature:
        return False
    if rule.min_chars is not None and len(text) < rule.min_chars:
        return False
    if rule.max_chars is not None and len(text) > rule.max_chars:
        return False
    if rule.keywords:
        lowered = text.lower()
        if not any(k.lower() in lowered for k in rule.keywords):
            return False
    return pattern is None or pattern.search(text) is not None


class RoutePlan:
    """One configured route: how it classifies, and what answers each task."""

    def __init__(
        self,
        name: str,
        config: RouteConfig,
        classifier: TaskClassifier | None,
        cascades: Mapping[str, Cascade],
    ) -> None:
        self.name = name
        self.config = config
        self.classifier = classifier
        self.cascades = cascades
        self._rules = [(r, re.compile(r.regex) if r.regex else None) for r in config.rules]

    def classify(self, ctx: RequestContext) -> tuple[str, str]:
        """(task, how it was chosen)."""
        tasks = self.config.tasks
        if ctx.task and ctx.task in tasks:
            return ctx.task, "header"
        text = last_user_text(ctx.body.get("messages"))
        for rule, pattern in self._rules:
            if _rule_matches(rule, pattern, text, ctx.feature):
                return rule.task, "rule"
        if self.classifier is not None:
            label, confidence = self.classifier.classify(text)
            task = self.config.task_map.get(label, label)
            if task in tasks and confidence >= self.config.min_confidence:
                return task, "classifier"
        return self.config.default_task, "default"


class Route:
    name = "route"
    enabled = True

    def __init__(
        self,
        settings: Settings,
        *,
        classifiers: Mapping[str, TaskClassifier | None],
        scorer: Scorer | None,
        metrics: Metrics,
    ) -> None:
        self._models = settings.models
        self._default_provider = settings.default_provider
        self._memo: dict[str, tuple[Target, ...]] = {}
        self._metrics = metrics
        self.plans = {
            name: RoutePlan(
                name,
                cfg,
                classifiers.get(name),
                {
                    task: Cascade(tc.cascade, self.resolve, scorer)
                    for task, tc in cfg.tasks.items()
                    if tc.cascade
                },
            )
            for name, cfg in settings.routes.items()
        }

    def _target(self, name: str) -> Target:
        model = self._models.get(name)
        if model is not None:
            return Target(name, model.provider, model.model or name)
        if self._default_provider is None:
            raise UnknownModelError(
                f"model {name[:64]!r} is not configured (known: {self._known_names()})"
            )
        return Target(name, self._default_provider, name)

    def _known_names(self) -> str:
        names = sorted([*self._models, *self.plans])
        listed = ", ".join(names[:_NAMES_LISTED]) or "none"
        more = len(names) - _NAMES_LISTED
        return f"{listed} and {more} more" if more > 0 else listed

    def resolve(self, name: str) -> tuple[Target, ...]:
        """The target for ``name`` followed by its fallbacks, in order."""
        try:
            return self._memo[name]
        except KeyError:
            pass
        model = self._models.get(name)
        chain = (name, *(model.fallbacks if model else ()))
        targets = tuple(self._target(n) for n in chain)
        if model is not None or len(self._memo) < _MEMO_LIMIT:  # names come from clients
            self._memo[name] = targets
        return targets

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        name, downgrade = ctx.requested_model, ""
        if ctx.budget is not None and ctx.budget.downgrade_to:  # a budget chose the model
            name, downgrade = ctx.budget.downgrade_to, ctx.budget.downgraded_by
        plan = self.plans.get(name)
        if plan is None:
            ctx.targets = self.resolve(name)
            ctx.route = RouteDecision(ctx.targets[0].name, downgrade=downgrade)
            return await next(ctx)
        pinned = plan.config.pins.get(ctx.feature) if ctx.feature else None
        if pinned is not None:
            ctx.targets = self.resolve(pinned)
            ctx.route = RouteDecision(plan.name, pin=ctx.feature, downgrade=downgrade)
            return await next(ctx)
        task, how = plan.classify(ctx)
        self._metrics.child(self._metrics.route_decisions, plan.name, task, how).inc()
        decision = RouteDecision(plan.name, task=task, downgrade=downgrade)
        cascade = plan.cascades.get(task)
        if cascade is not None:
            return await cascade.run(ctx, next, decision)
        model = plan.config.tasks[task].model
        assert model is not None
        ctx.targets = self.resolve(model)
        ctx.route = decision
        return await next(ctx)
