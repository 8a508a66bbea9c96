"""Stage 7, route: resolve the requested name to concrete targets (the model and its ordered
fallbacks). Task classification and cascades plug in here."""

from __future__ import annotations

from skinflint.config import Settings
from skinflint.errors import UnknownModelError
from skinflint.pipeline.context import Next, Reply, RequestContext, Target

__all__ = ["Route"]


class Route:
    name = "route"
    enabled = True

    def __init__(self, settings: Settings) -> None:
        self._models = settings.models
        self._default_provider = settings.default_provider
        self._memo: dict[str, tuple[Target, ...]] = {}

    def _target(self, name: str) -> Target:
        model = self._models.get(name)
        if model is not None:
            return Target(name, model.provider, model.model or name)
        if self._default_provider is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise UnknownModelError(f"model {name!r} is not configured (known: {known})")
        return Target(name, self._default_provider, name)

    def resolve(self, name: str) -> tuple[Target, ...]:
        """The target for ``name`` followed by its fallbacks, in order."""
        try:
            return self._memo[name]
        except KeyError:
            pass
        model = self._models.get(name)
        chain = (name, *(model.fallbacks if model else ()))
        targets = tuple(self._target(n) for n in chain)
        self._memo[name] = targets
        return targets

    async def __call__(self, ctx: RequestContext, next: Next) -> Reply:
        ctx.targets = self.resolve(ctx.requested_model)
        ctx.route = ctx.targets[0].name
        return await next(ctx)
