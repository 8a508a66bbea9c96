"""The gateway: every service one process needs, opened from validated settings and passed
around as one explicit bundle. This module only wires: each policy lives in the module that
owns it (the cache's in :mod:`skinflint.pipeline.cache`, prices in :mod:`skinflint.pricing`,
routing in :mod:`skinflint.routing`, providers in :mod:`skinflint.providers`)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp

from skinflint.config import Settings, ShadowPolicy
from skinflint.embed import embedder_for
from skinflint.errors import UnknownModelError
from skinflint.interfaces import BatchAPI, InvalidationFeed, JobStore, Ledger, Provider, Vector
from skinflint.jobs import BatchService, Settler
from skinflint.jobs.settle import BatchPrice
from skinflint.metrics import Metrics
from skinflint.models import Usage
from skinflint.monitor import AlertMonitor, Webhook
from skinflint.pipeline import Pipeline, Reply, RequestContext, build_stages
from skinflint.pipeline.account import Account
from skinflint.pipeline.attribute import Attribute
from skinflint.pipeline.breakers import ProviderBreaker
from skinflint.pipeline.budget_tokens import BudgetTokens
from skinflint.pipeline.budgets import BudgetBook
from skinflint.pipeline.cache import ResponseCache, semantic_setting
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.cache_semantic import SemanticCache
from skinflint.pipeline.call import CallProvider, RetryPolicy
from skinflint.pipeline.compress import Compress
from skinflint.pipeline.condense import Condenser
from skinflint.pipeline.context import Target
from skinflint.pipeline.defer import Defer
from skinflint.pipeline.embedding import GuardedEmbedder
from skinflint.pipeline.guard import Guard
from skinflint.pipeline.route import Route
from skinflint.pipeline.rules import Rules
from skinflint.pipeline.shadow import ALERT_RULE as SHADOW_ALERT_RULE
from skinflint.pipeline.shadow import ShadowGuard
from skinflint.pipeline.upstream import ProviderUpstream
from skinflint.pricing import BatchDiscount, PriceCatalog
from skinflint.providers import open_provider
from skinflint.providers.http import new_session
from skinflint.providers.replay import REPLAY_PRICES, ReplayProvider
from skinflint.routing.artifacts import load_classifiers, load_scorer
from skinflint.storage.alert_store import AlertStore
from skinflint.storage.opener import NotStoredError, Storage, open_storage
from skinflint.tokens import TokenCounter

__all__ = ["Gateway", "price_catalog"]

log = logging.getLogger("skinflint")


def price_catalog(settings: Settings) -> PriceCatalog:
    """Prices as the configuration sets them: its overrides, the recorded prices of a replay
    provider, then the catalog; an alias is priced as the model it stands for."""
    overrides: dict[str, tuple[float, float | None, float | None]] = {}
    if any(p.kind == "replay" for p in settings.providers.values()):
        overrides.update({m: (i, o, None) for m, (i, o) in REPLAY_PRICES.items()})
    for alias, model in settings.models.items():
        if model.price is not None:
            overrides[alias] = (model.price.input, model.price.output, model.price.cached_input)
    aliases = {alias: m.model for alias, m in settings.models.items() if m.model}
    discounts, default = _batch_discounts(settings)
    by_provider = {name: _discount_of(settings, name) for name in settings.providers}
    return PriceCatalog(overrides, aliases, batch_discounts=discounts,
                        provider_batch_discounts=by_provider, default_batch_discount=default)


def _discount_of(settings: Settings, provider: str) -> BatchDiscount:
    return BatchDiscount(settings.providers[provider].batch_discount,
                         f"providers.{provider}.batch_discount")


def _batch_discounts(settings: Settings) -> tuple[dict[str, BatchDiscount], BatchDiscount]:
    """Each model's ``batch_discount``: its provider's, under its alias and its provider's name
    for it; a name not configured takes the default provider's."""
    discounts: dict[str, BatchDiscount] = {}
    for alias, model in settings.models.items():
        if model.provider in settings.providers:
            discounts[alias] = _discount_of(settings, model.provider)
            discounts.setdefault(model.model or alias, discounts[alias])
    default = settings.default_provider
    if default in settings.providers:
        return discounts, _discount_of(settings, default)
    return discounts, BatchDiscount()


def _breakers(settings: Settings, metrics: Metrics) -> dict[str, ProviderBreaker]:
    """A circuit breaker for each provider that keeps one (``breaker.failures`` > 0)."""
    return {
        name: ProviderBreaker(name, failures=c.breaker.failures, cooldown=c.breaker.cooldown,
                              metrics=metrics)
        for name, c in settings.providers.items() if c.breaker.failures > 0
    }


def shadow_policies(settings: Settings) -> Callable[[str, str], ShadowPolicy | None] | None:
    """A request's shadow policy, by feature and route; None when no scope sets one."""
    scoped = settings.compression
    scopes = [scoped.default, *scoped.features.values(), *scoped.routes.values()]
    if all(p is None or p.shadow is None for p in scopes):
        return None

    def find(feature: str, route: str) -> ShadowPolicy | None:
        policy = scoped.find(feature, route)
        return policy.shadow if policy is not None else None

    return find


def _condenses(settings: Settings) -> bool:
    """Whether a compression setting names a model to rewrite or summarise with."""
    scoped = settings.compression
    scopes = [scoped.default, *scoped.features.values(), *scoped.routes.values()]
    return any(key.endswith(("rewrite_with", "summarize_with"))
               for p in scopes if p is not None for key, _ in p.models())


async def _shadow_alerts(storage: Storage) -> AlertStore | None:
    """Where the shadow guard keeps its switches: the alert table beside the ledger."""
    try:
        return await storage.alert_store()
    except NotStoredError:
        log.info("the shadow guard's switches last until restart: the ledger is in memory")
        return None


async def _shadow_guard(policies: Callable[[str, str], ShadowPolicy | None],
                        alerts: AlertStore | None, upstream: ProviderUpstream, ledger: Ledger,
                        catalog: PriceCatalog, metrics: Metrics,
                        cache: ResponseCache) -> ShadowGuard:
    """The shadow-evaluation guard, with the samples and switches logged before this start,
    following those other processes log."""

    async def vector(text: str) -> Vector | None:
        embedder = cache.embedder  # the semantic cache's, once loaded
        return None if embedder is None else await embedder.vector(text)

    guard = ShadowGuard(policies, upstream, ledger=ledger, catalog=catalog, metrics=metrics,
                        alerts=alerts, vector=vector)
    await guard.restore()
    guard.start()
    return guard


def batch_price(catalog: PriceCatalog) -> BatchPrice:
    """What a line answered by a provider batch costs: the catalog's batch price, else the
    real-time price at the provider's ``batch_discount`` (see :mod:`skinflint.pricing`)."""

    def price(provider: str, name: str, usage: Usage) -> float | None:
        return catalog.cost(name, usage, batch=True, provider=provider)

    return price


def batch_target(settings: Settings, route: Route,
                 providers: dict[str, Provider]) -> Callable[[str], Target | None]:
    """The target that answers a model name through a batch API: a model or alias (not a
    route) whose provider has one; None otherwise."""

    batching = frozenset(n for n, p in providers.items() if isinstance(p, BatchAPI))

    def target(name: str) -> Target | None:
        if name in settings.routes:
            return None
        try:
            found = route.resolve(name)[0]
        except UnknownModelError:
            return None
        return found if found.provider in batching else None

    return target


def _batch_service(settings: Settings, store: JobStore, providers: dict[str, Provider],
                   timeouts: dict[str, float], ledger: Ledger, catalog: PriceCatalog,
                   budgets: BudgetBook | None, session: aiohttp.ClientSession,
                   metrics: Metrics, cache: ResponseCache) -> BatchService:
    config = settings.batching
    settler = Settler(store, ledger=ledger, catalog=catalog, batch_price=batch_price(catalog),
                      providers=providers, timeouts=timeouts, on_failure=config.on_failure,
                      budgets=budgets, webhook=Webhook(session), webhook_url=config.webhook,
                      clock=time.time, metrics=metrics, cache=cache)
    return BatchService(store, providers, config, settler, timeouts=timeouts, metrics=metrics)


def _report_warm_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("background loading failed; the semantic cache stays off: %s", done.exception())


async def _attributed(ctx: RequestContext) -> Reply:
    return Reply(body={})


@dataclass
class Gateway:
    settings: Settings
    pipeline: Pipeline
    storage: Storage
    cache: ResponseCache
    metrics: Metrics
    catalog: PriceCatalog
    tokens: TokenCounter
    providers: dict[str, Provider]
    session: aiohttp.ClientSession
    budgets: BudgetBook | None = field(default=None)  # None: no budgets configured
    warmed: asyncio.Future[None] | None = field(default=None)
    following: asyncio.Future[None] | None = field(default=None)  # others' invalidations
    alerts: AlertMonitor | None = field(default=None)  # None: no rules, or no shared ledger
    shadow: ShadowGuard | None = field(default=None)  # None: no feature is shadowed
    condenser: Condenser | None = field(default=None)  # None: no rewrites or summaries
    batches: BatchService | None = field(default=None)  # deferred requests, batches
    # the target that answers a model name through a batch API (None: none does)
    batch_target: Callable[[str], Target | None] = field(default=lambda name: None)
    account: Account | None = field(default=None)  # the pipeline's account stage
    # unique per process start, then a counter: cheaper than 16 random bytes per request
    _id_prefix: str = field(default_factory=lambda: os.urandom(6).hex())
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    async def open(cls, settings: Settings, *, ledger: Ledger | None = None) -> Gateway:
        """Open storage and providers; heavy loading (price catalog, tokenizer, recorded data)
        continues in a thread so start-up does not wait for it."""
        tokens, catalog = TokenCounter(), price_catalog(settings)
        metrics = Metrics(settings.model_names() | catalog.overrides.keys(),
                          known_features=settings.feature_names())
        watch_alerts = bool(settings.alerts) and ledger is None  # a ledger of the caller's own
        storage = open_storage(settings, ledger=ledger)
        ledger = await storage.ledger()
        threshold, verifier = semantic_setting(settings)
        cache = ResponseCache(settings.cache, await storage.cache(), metrics,
                              routes=frozenset(settings.routes), threshold=threshold,
                              verifier=verifier, token_budgets=settings.token_budgets)
        route = Route(settings, classifiers=load_classifiers(settings),
                      scorer=load_scorer(settings), metrics=metrics)
        shadowed = shadow_policies(settings)
        shadow_alerts = await _shadow_alerts(storage) if shadowed is not None else None
        session = new_session()  # after what may fail on a bad configuration: nothing to close
        providers = {n: open_provider(n, c, session) for n, c in settings.providers.items()}
        policies = {
            n: RetryPolicy(c.max_retries, c.backoff_base, c.backoff_max, c.timeout)
            for n, c in settings.providers.items()
        }
        upstream = ProviderUpstream(providers, {n: p.timeout for n, p in policies.items()},
                                    route.resolve)
        shadow = None
        if shadowed is not None:
            shadow = await _shadow_guard(shadowed, shadow_alerts, upstream, ledger, catalog,
                                         metrics, cache)
        condenser = None
        if _condenses(settings):
            condenser = Condenser(upstream, ledger=ledger, catalog=catalog, metrics=metrics,
                                  store=cache.backend)
        account = Account(
            catalog=catalog, tokens=tokens, ledger=ledger, metrics=metrics, cache=cache,
            baseline_model=settings.baseline_model,
            route_baselines={n: r.baseline for n, r in settings.routes.items() if r.baseline},
            shadow=shadow,
        )
        budgets = None
        if settings.budgets:
            budgets = BudgetBook(settings, await storage.budget_counters(), catalog=catalog)
        jobs = await storage.job_store()
        timeouts = {n: p.timeout for n, p in policies.items()}
        batchable = batch_target(settings, route, providers)
        batches = _batch_service(settings, jobs, providers, timeouts, ledger, catalog, budgets,
                                 session, metrics, cache)
        stages = build_stages(
            attribute=Attribute({k.key_sha256: k.tenant for k in settings.keys}),
            guard=Guard(budgets, metrics),
            defer=Defer(settings.batching, jobs, batchable, metrics=metrics, cache=cache,
                        answered=batches.settler.finished),
            rules=Rules(settings.rules, tokens, metrics),
            exact_cache=ExactCache(cache),
            semantic_cache=SemanticCache(cache),
            compress=Compress(settings.compression, tokens, metrics,
                              embedder=lambda: cache.embedder,
                              allowed=shadow.enabled if shadow is not None else None,
                              condenser=condenser),
            route=route,
            budget_tokens=BudgetTokens(settings.token_budgets),
            call_provider=CallProvider(providers, policies, metrics, _breakers(settings, metrics)),
            account=account,
        )
        gw = cls(settings, Pipeline(stages), storage, cache, metrics, catalog, tokens,
                 providers, session, budgets, shadow=shadow, condenser=condenser,
                 batches=batches, batch_target=batchable, account=account)
        batches.start()
        gw.warmed = asyncio.ensure_future(gw._warm())
        gw.warmed.add_done_callback(_report_warm_failure)
        if isinstance(cache.backend, InvalidationFeed):
            gw.following = asyncio.ensure_future(cache.follow(cache.backend))
        if watch_alerts:
            try:
                gw.alerts = await gw._watch_alerts()
            except BaseException:
                await gw.close()
                raise
        return gw

    async def _watch_alerts(self) -> AlertMonitor | None:
        """Start judging the alert rules over the ledger, if it is shared (not ``:memory:``)."""
        try:
            store = await self.storage.alert_store()
        except NotStoredError:
            log.info("cost alerts are off: the ledger is in memory")
            return None
        monitor = AlertMonitor(self.settings.alerts, store, self.metrics, Webhook(self.session),
                               others=(SHADOW_ALERT_RULE,))
        monitor.start()
        return monitor

    async def _warm(self) -> None:
        """Load what start-up need not wait for; requests arriving meanwhile are served, with
        the semantic cache passing them through until its embedder is in memory."""
        await asyncio.to_thread(self._load)
        if self.cache.semantic_enabled:
            embedder = await asyncio.to_thread(embedder_for, self.settings)
            index = await self.storage.semantic_index(embedder.name, embedder.dim)
            self.cache.open_semantic(GuardedEmbedder(embedder, self.metrics), index)

    def _load(self) -> None:
        self.catalog.warm(list(self.settings.models) or None)
        self.metrics.know(self.catalog.listed())
        for provider in self.providers.values():
            if isinstance(provider, ReplayProvider):
                provider.load()

    def context(self, endpoint: str, raw_body: bytes, headers: dict[str, str]) -> RequestContext:
        return RequestContext(
            request_id=f"{self._id_prefix}{next(self._ids):010x}",
            ts=time.time(),
            started=time.perf_counter(),
            endpoint=endpoint,
            raw_body=raw_body,
            headers=headers,
        )

    async def attributed(self, raw_body: bytes, headers: dict[str, str]) -> RequestContext:
        """A chat request's context as the attribute stage leaves it (tenant, feature, user,
        tags, cache mode), the rest of the pipeline not run; raises what that stage raises (a
        missing gateway key, a malformed body). batch_map looks its items up with it."""
        ctx = self.context("chat", raw_body, headers)
        attribute = self.pipeline.stages[0]
        assert attribute.name == "attribute"
        await attribute(ctx, _attributed)
        return ctx

    async def close(self) -> None:
        """Flush the ledger and the caches, then close connections."""
        if self.warmed is not None:
            await asyncio.gather(self.warmed, return_exceptions=True)
        if self.following is not None:
            self.following.cancel()
            await asyncio.gather(self.following, return_exceptions=True)
        if self.alerts is not None:
            await self.alerts.close()
        if self.shadow is not None:
            await self.shadow.close()
        if self.condenser is not None:  # a rewrite under way is a paid call: let it finish
            await self.condenser.drain(timeout=5.0)
        if self.batches is not None:
            await self.batches.close()
        for provider in self.providers.values():
            await provider.close()
        await self.session.close()
        await self.cache.close()
        await self.storage.close()
