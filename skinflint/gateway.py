"""The gateway: every service one process needs, opened from validated settings and passed
around as one explicit bundle."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import aiohttp

from skinflint.config import ProviderConfig, Settings
from skinflint.embed import Embedder, canonical_name, load_embedder
from skinflint.errors import ConfigError
from skinflint.interfaces import InvalidationFeed, Ledger, Provider
from skinflint.metrics import Metrics
from skinflint.pipeline import Pipeline, RequestContext, build_stages
from skinflint.pipeline.account import Account
from skinflint.pipeline.attribute import Attribute
from skinflint.pipeline.cache_exact import ExactCache
from skinflint.pipeline.cache_semantic import SemanticCache
from skinflint.pipeline.call import CallProvider, RetryPolicy
from skinflint.pipeline.route import Route
from skinflint.pricing import PriceCatalog
from skinflint.providers.anthropic import AnthropicProvider
from skinflint.providers.http import new_session
from skinflint.providers.openai_compat import OpenAICompatProvider
from skinflint.providers.replay import REPLAY_PRICES, ReplayProvider
from skinflint.routing.classifier import TaskClassifier
from skinflint.routing.scorer import CorrectnessScorer
from skinflint.storage.opener import Storage, open_storage
from skinflint.tokens import TokenCounter

__all__ = ["Gateway", "price_overrides", "semantic_defaults", "semantic_setting"]

log = logging.getLogger("skinflint")


def _provider(name: str, cfg: ProviderConfig, session: aiohttp.ClientSession) -> Provider:
    if cfg.kind == "anthropic":
        return AnthropicProvider(name, base_url=cfg.base_url, api_key=cfg.api_key, session=session)
    if cfg.kind == "replay":
        data = Path(cfg.data_path) if cfg.data_path else None
        return ReplayProvider(name, latency_scale=cfg.latency_scale, data_path=data)
    return OpenAICompatProvider(
        name,
        base_url=cfg.base_url,
        api_key=cfg.api_key,
        session=session,
        headers=dict(cfg.headers),
        connect_timeout=cfg.connect_timeout,
    )


def price_overrides(settings: Settings) -> dict[str, tuple[float, float | None, float | None]]:
    overrides: dict[str, tuple[float, float | None, float | None]] = {}
    if any(p.kind == "replay" for p in settings.providers.values()):
        overrides.update({m: (i, o, None) for m, (i, o) in REPLAY_PRICES.items()})
    for alias, model in settings.models.items():
        if model.price is not None:
            overrides[alias] = (model.price.input, model.price.output, model.price.cached_input)
    return overrides


def _artifact(path: str, shipped: str) -> bytes:
    """A trained model: ``default`` is the one shipped in the package."""
    if path == "default":
        return (resources.files("skinflint") / "data" / shipped).read_bytes()
    return Path(path).read_bytes()


def _classifiers(settings: Settings) -> dict[str, TaskClassifier | None]:
    return {
        name: TaskClassifier.from_bytes(_artifact(r.classifier, "classifier.npz"))
        if r.classifier
        else None
        for name, r in settings.routes.items()
    }


def _scorer(settings: Settings) -> CorrectnessScorer | None:
    paths = {r.scorer for r in settings.routes.values() if r.scorer}
    if len(paths) > 1:
        raise ConfigError("routes: all routes must share one scorer")
    return CorrectnessScorer.from_bytes(_artifact(paths.pop(), "scorer.npz")) if paths else None


def _baseline_for(settings: Settings) -> Callable[[str], str]:
    routes = {n: r.baseline for n, r in settings.routes.items() if r.baseline}

    def baseline(requested: str) -> str:
        return routes.get(requested) or settings.baseline_model or requested

    return baseline


def _embedder(settings: Settings) -> Embedder:
    cfg = settings.cache.semantic
    if cfg.embedder != "openai-compatible":
        return load_embedder(cfg.embedder)
    from skinflint.embed.openai_compat import OpenAIEmbedder

    assert cfg.embedder_provider is not None  # checked when the settings were validated
    provider = settings.providers[cfg.embedder_provider]
    return OpenAIEmbedder(
        provider.base_url,
        cfg.embedder_model,
        cfg.embedder_dim,
        api_key=provider.api_key or None,
        timeout=provider.connect_timeout,
    )


def _report_warm_failure(done: asyncio.Future[None]) -> None:
    if not done.cancelled() and done.exception() is not None:
        log.error("background loading failed; the semantic cache stays off: %s", done.exception())


def semantic_defaults() -> dict[str, Any]:
    """The calibrated default: embedder, threshold and verifier setting, with the precision and
    recall they reached on labelled pairs (see ``skinflint cache calibrate``)."""
    text = (resources.files("skinflint") / "data" / "semantic_default.json").read_text()
    found: dict[str, Any] = json.loads(text)
    return found


def semantic_setting(settings: Settings, feature: str = "", route: str = "") -> tuple[float, bool]:
    """The similarity threshold (a route's, then a feature's own, as the semantic cache stage
    applies them) and the verifier setting: the configuration's, else the calibrated default."""
    cfg = settings.cache.semantic
    defaults = semantic_defaults()
    policies = (*cfg.features.values(), *cfg.routes.values())
    enabled = cfg.enabled or any(policy.enabled for policy in policies)
    calibrated_for = canonical_name(defaults["embedder"])
    if enabled and cfg.threshold is None and canonical_name(cfg.embedder) != calibrated_for:
        # a threshold is a property of one vector space: another embedder's would be a guess
        raise ConfigError(
            f"cache.semantic.threshold: the calibrated default is for the {defaults['embedder']!r}"
            f" embedder; choose one for {cfg.embedder!r} with `skinflint cache calibrate PAIRS`"
        )
    threshold = cfg.threshold if cfg.threshold is not None else float(defaults["threshold"])
    for policy in (cfg.routes.get(route), cfg.features.get(feature)):
        if policy is not None and policy.threshold is not None:
            threshold = policy.threshold
    verifier = cfg.verifier if cfg.verifier is not None else bool(defaults["verifier"])
    return threshold, verifier


def _semantic_cache(settings: Settings, exact: ExactCache, metrics: Metrics) -> SemanticCache:
    threshold, verifier = semantic_setting(settings)
    return SemanticCache(
        settings.cache.semantic, exact, metrics, threshold=threshold, verifier=verifier
    )


@dataclass
class Gateway:
    settings: Settings
    pipeline: Pipeline
    storage: Storage
    exact_cache: ExactCache
    semantic_cache: SemanticCache
    metrics: Metrics
    catalog: PriceCatalog
    tokens: TokenCounter
    providers: dict[str, Provider]
    session: aiohttp.ClientSession
    warmed: asyncio.Future[None] | None = field(default=None)
    following: asyncio.Future[None] | None = field(default=None)  # others' invalidations
    # unique per process start, then a counter: cheaper than 16 random bytes per request
    _id_prefix: str = field(default_factory=lambda: os.urandom(6).hex())
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    @classmethod
    async def open(cls, settings: Settings, *, ledger: Ledger | None = None) -> Gateway:
        """Open storage and providers; heavy loading (price catalog, tokenizer, recorded data)
        continues in a thread so start-up does not wait for it."""
        catalog, tokens = PriceCatalog(price_overrides(settings)), TokenCounter()
        metrics = Metrics(settings.model_names() | catalog.overrides.keys())
        storage = open_storage(settings, ledger=ledger)
        ledger, store = await storage.ledger(), await storage.cache()
        ex = settings.cache.exact
        exact = ExactCache(ex, store, frozenset(settings.routes))
        semantic = _semantic_cache(settings, exact, metrics)
        session = new_session()  # after what may fail on a bad configuration: nothing to close
        providers = {n: _provider(n, c, session) for n, c in settings.providers.items()}
        policies = {
            n: RetryPolicy(c.max_retries, c.backoff_base, c.backoff_max, c.timeout)
            for n, c in settings.providers.items()
        }

        def price_name(name: str) -> str:
            model = settings.models.get(name)
            if name in catalog.overrides or model is None:
                return name
            return model.model or name

        stages = build_stages(
            attribute=Attribute({k.key_sha256: k.tenant for k in settings.keys}),
            exact_cache=exact,
            semantic_cache=semantic,
            route=Route(
                settings,
                classifiers=_classifiers(settings),
                scorer=_scorer(settings),
                metrics=metrics,
            ),
            call_provider=CallProvider(providers, policies, metrics),
            account=Account(
                catalog=catalog,
                tokens=tokens,
                ledger=ledger,
                metrics=metrics,
                cache=exact,
                semantic=semantic,
                price_name=price_name,
                baseline_for=_baseline_for(settings),
            ),
        )
        gw = cls(
            settings,
            Pipeline(stages),
            storage,
            exact,
            semantic,
            metrics,
            catalog,
            tokens,
            providers,
            session,
        )
        gw.warmed = asyncio.ensure_future(gw._warm())
        gw.warmed.add_done_callback(_report_warm_failure)
        if isinstance(store, InvalidationFeed):
            gw.following = asyncio.ensure_future(exact.follow(store))
        return gw

    async def _warm(self) -> None:
        """Load what start-up need not wait for; requests arriving meanwhile are served, with
        the semantic cache passing them through until its embedder is in memory."""
        await asyncio.to_thread(self._load)
        if self.semantic_cache.enabled:
            embedder = await asyncio.to_thread(_embedder, self.settings)
            index = await self.storage.semantic_index(embedder.name, embedder.dim)
            self.semantic_cache.open(embedder, index)

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

    async def close(self) -> None:
        """Flush the ledger and the caches, then close connections."""
        if self.warmed is not None:
            await asyncio.gather(self.warmed, return_exceptions=True)
        if self.following is not None:
            self.following.cancel()
            await asyncio.gather(self.following, return_exceptions=True)
        for provider in self.providers.values():
            await provider.close()
        await self.session.close()
        await self.semantic_cache.close()
        await self.storage.close()
