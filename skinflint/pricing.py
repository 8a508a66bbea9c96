"""The price catalog: ``genai-prices`` plus per-model overrides from the configuration.

A model's rates are resolved once and kept as floats, because computing a cost is on the hot
path and the catalog's own calculation costs tens of microseconds. An unknown price is not an
error: the cost is recorded as unknown (``None``).

Counts are OpenAI's, as the catalog's: the prompt includes the tokens read from and written
to the provider's prompt cache and the audio tokens; the completion includes the reasoning and
audio tokens. The prompt is priced at the input rate, but its cache reads, cache writes and
audio at their own rates where the catalog lists them (``cache_read_mtok``,
``cache_write_mtok``, ``input_audio_mtok``); the completion at the output rate, but its audio
and reasoning at theirs (``output_audio_mtok``, ``output_reasoning_mtok``). A part with no rate
of its own costs what its whole costs, as in the catalog. A call with none of those parts (most
calls) costs two or three multiplications.

A model the catalog lists without an output price (an embedding model: only its input is
billed) costs its input; its cost is unknown only for a call that produced output tokens, so a
chat model missing a price is never charged a guess.

A call made through a provider's batch API is priced at the batch price (``batch=True``): the
catalog's batch price where it lists one (``price_context={"processing": "batch"}``), else the
real-time price times the provider's configured ``batch_discount``. :attr:`ModelPrice.batch`
says which, and :attr:`ModelPrice.source` says so in words.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any, Literal

from skinflint.models import Usage

__all__ = ["DEFAULT_BATCH_DISCOUNT", "BatchDiscount", "ModelPrice", "Part", "PriceCatalog"]

_PER_TOKEN = 1e-6  # catalog and overrides are in USD per million tokens

#: The batch price as a fraction of the real-time price where neither the catalog nor the
#: configuration says otherwise: OpenAI's and Anthropic's batch APIs both halve prices.
DEFAULT_BATCH_DISCOUNT = 0.5
_BATCH_CONTEXT = {"processing": "batch"}  # the catalog's name for batch processing


@dataclass(frozen=True, slots=True)
class BatchDiscount:
    """A batch price as a fraction of the real-time price, and the setting it comes from (told
    in a discounted price's ``source``)."""

    rate: float = DEFAULT_BATCH_DISCOUNT
    setting: str = "the default batch_discount"


Tiers = tuple[tuple[int, float], ...]

#: The parts of a prompt or completion the catalog may price at a rate of their own: the
#: :class:`Usage` count, its price key, and whether it is part of the completion.
_PARTS = (
    ("cache_write_tokens", "cache_write_mtok", False),
    ("input_audio_tokens", "input_audio_mtok", False),
    ("output_audio_tokens", "output_audio_mtok", True),
    ("reasoning_tokens", "output_reasoning_mtok", True),
)


@dataclass(frozen=True, slots=True)
class Part:
    """A part of the prompt (or completion) priced at its own rate, USD per million."""

    usage: str  # the Usage count
    rate: float
    tiers: Tiers = ()
    output: bool = False  # part of the completion, else of the prompt


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens, with optional tiers keyed by input tokens (``start`` -> rate),
    and the parts of a call priced at rates of their own (``parts``). ``batch`` is how a batch
    price was found: ``catalog`` (listed there), ``discount`` (the real-time price times a
    configured ``batch_discount``); ``None`` for a real-time price."""

    model: str
    input: float
    output: float | None  # None: no output price listed (outputs not billed)
    cached_input: float
    source: str
    input_tiers: Tiers = ()
    output_tiers: Tiers = ()
    cached_tiers: Tiers = ()
    parts: tuple[Part, ...] = ()
    batch: Literal["catalog", "discount"] | None = None

    def cost(self, usage: Usage) -> float | None:
        """USD for ``usage``, or ``None`` when it has output tokens and no output price."""
        n = usage.input_tokens
        uncached = max(n - usage.cached_tokens, 0)
        spent = uncached * _tiered(self.input, self.input_tiers, n)
        spent += usage.cached_tokens * _tiered(self.cached_input, self.cached_tiers, n)
        if usage.output_tokens:
            if self.output is None:
                return None
            spent += usage.output_tokens * _tiered(self.output, self.output_tiers, n)
        for part in self.parts:  # tokens moved from their whole's rate to their own
            k = getattr(usage, part.usage)
            if k:
                spent += k * (_tiered(part.rate, part.tiers, n) - self._whole_rate(part, n))
        return _PER_TOKEN * spent

    def _whole_rate(self, part: Part, input_tokens: int) -> float:
        if not part.output:
            return _tiered(self.input, self.input_tiers, input_tokens)
        if self.output is None:  # reported output tokens without an output price
            return part.rate
        return _tiered(self.output, self.output_tiers, input_tokens)


def _tiered(base: float, tiers: Tiers, input_tokens: int) -> float:
    """The rate for a call of ``input_tokens``: a tier applies above its start, as in the
    catalog."""
    rate = base
    for start, price in tiers:
        if input_tokens > start:
            rate = price
    return rate


def _parts(price: Any) -> tuple[Part, ...]:
    """The parts ``price`` (the catalog's) lists rates of their own for."""
    found = []
    for usage, key, output in _PARTS:
        rate, tiers = _rate(getattr(price, key, None))
        if rate is not None:
            found.append(Part(usage, rate, tiers, output))
    return tuple(found)


def _rate(value: Any) -> tuple[float | None, Tiers]:
    """A catalog price field (None, Decimal or TieredPrices) as a base rate and tiers."""
    if value is None:
        return None, ()
    base = getattr(value, "base", None)
    if base is None:
        return float(value), ()
    tiers = tuple((int(t.start), float(t.price)) for t in getattr(value, "tiers", ()))
    return float(base), tiers


#: Where a name the catalog cannot attribute to a provider is looked up: the API the gateway
#: speaks (whose catalog entry falls back to Anthropic, DeepSeek, xAI and Moonshot). The
#: catalog matches OpenAI by ``gpt-``/``o1``-style names only, so ``text-embedding-3-small``
#: is found here and nowhere else.
_FALLBACK_PROVIDER = "openai"


def _catalog_entry(model: str, batch: bool) -> Any | None:
    """The catalog's price calculation for ``model`` (at its batch price if ``batch``), or
    ``None`` if it does not list it."""
    from genai_prices import Usage as CatalogUsage
    from genai_prices import calc_price

    for provider_id in (None, _FALLBACK_PROVIDER):  # the provider its name implies, then ours
        try:
            return calc_price(
                CatalogUsage(input_tokens=1, output_tokens=1),
                model_ref=model,
                provider_id=provider_id,
                price_context=_BATCH_CONTEXT if batch else None,
            )
        except LookupError:
            continue
    return None


def _lists_batch_price(found: Any) -> bool:
    """Whether the catalog's calculation ``found`` used a batch price: one of the model's price
    variants is for batch processing and in force, and the model was found under its own
    provider (the catalog ignores variants of a model found through another)."""
    if not any(found.model is m for m in found.provider.models):
        return False
    now = datetime.now(tz=UTC)
    return any(
        all(_BATCH_CONTEXT.get(k) == v for k, v in variant.when.items())
        and (variant.constraint is None or variant.constraint.active(now))
        for variant in found.model.price_variants or ()
    )


def _from_catalog(model: str, batch: bool = False) -> ModelPrice | None:
    """The catalog's price of ``model``; with ``batch``, its batch price, or ``None`` when the
    catalog lists none."""
    found = _catalog_entry(model, batch)
    if found is None or (batch and not _lists_batch_price(found)):
        return None
    mp = found.model_price
    inp, inp_t = _rate(mp.input_mtok)
    out, out_t = _rate(mp.output_mtok)
    cached, cached_t = _rate(mp.cache_read_mtok)
    if inp is None:
        return None
    return ModelPrice(
        model=model,
        input=inp,
        output=out,
        cached_input=inp if cached is None else cached,
        source=f"genai-prices ({found.provider.id}/{found.model.id}"
        + (", batch price)" if batch else ")"),
        input_tiers=inp_t,
        output_tiers=out_t,
        cached_tiers=cached_t if cached is not None else inp_t,
        parts=_parts(mp),
        batch="catalog" if batch else None,
    )


def _discounted(price: ModelPrice, by: BatchDiscount) -> ModelPrice:
    """``price`` with every rate times ``by.rate``: a batch price the catalog does not list."""
    discount = by.rate

    def scaled(tiers: Tiers) -> Tiers:
        return tuple((start, rate * discount) for start, rate in tiers)

    return replace(
        price,
        input=price.input * discount,
        output=None if price.output is None else price.output * discount,
        cached_input=price.cached_input * discount,
        input_tiers=scaled(price.input_tiers),
        output_tiers=scaled(price.output_tiers),
        cached_tiers=scaled(price.cached_tiers),
        parts=tuple(replace(p, rate=p.rate * discount, tiers=scaled(p.tiers))
                    for p in price.parts),
        source=f"{price.source} x {discount:g} ({by.setting})",
        batch="discount",
    )


def _trim_catalog_memos(limit: int) -> None:
    """genai-prices memoises every name it is asked about, without bound. Past our own memo's
    cap the names come from clients, so its memos are emptied whenever one outgrows ``limit``
    (rarely: each refill takes ``limit`` new names)."""
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    for name in ("_lookup_cache", "_provider_cache", "_provider_misses"):
        memo = getattr(snapshot, name, None)  # private: absent in another release, that is all
        if isinstance(memo, dict | set) and len(memo) > limit:
            memo.clear()


class PriceCatalog:
    """Looks prices up by the name a model was asked for or answered under; results are
    memoised (up to ``MEMO_LIMIT`` names: the rest come from clients and are looked up anew).

    ``overrides`` map a model name to ``(input, output | None, cached_input | None)`` USD per
    million; a ``None`` output means outputs are not billed, as for a catalog entry. An
    override has no rates for parts of a call: cache writes and audio prompt tokens cost its
    input rate, reasoning and audio completion tokens its output rate.
    ``aliases`` map a configured alias to the model it stands for, priced as that model
    unless the alias has an override of its own.
    ``batch_discounts`` map a model name (an alias or the model it stands for) to the
    ``batch_discount`` of the provider serving it, ``provider_batch_discounts`` a provider's
    name to its own; a call priced without either takes ``default_batch_discount``. A discount
    applies only where the catalog lists no batch price; an override has none.
    """

    MEMO_LIMIT = 4096

    def __init__(
        self,
        overrides: dict[str, tuple[float, float | None, float | None]] | None = None,
        aliases: Mapping[str, str] | None = None,
        *,
        batch_discounts: Mapping[str, BatchDiscount] | None = None,
        provider_batch_discounts: Mapping[str, BatchDiscount] | None = None,
        default_batch_discount: BatchDiscount = BatchDiscount(),
    ) -> None:
        self.overrides = dict(overrides or {})
        self.aliases = {a: m for a, m in (aliases or {}).items() if a not in self.overrides}
        self.batch_discounts = dict(batch_discounts or {})
        self.provider_batch_discounts = dict(provider_batch_discounts or {})
        self.default_batch_discount = default_batch_discount
        self._memo: dict[str, ModelPrice | None] = {}
        self._batch_memo: dict[tuple[str, str | None], ModelPrice | None] = {}
        self._lock = threading.Lock()

    def warm(self, models: list[str] | None = None) -> None:
        """Import the catalog and resolve ``models`` (call from a thread at start-up)."""
        for model in models or ["gpt-4o-mini"]:
            self.price(model)

    def listed(self) -> frozenset[str]:
        """The model names priced by the configuration and those the catalog lists by id
        (not every name its patterns would match). Imports the catalog: call from a thread."""
        from genai_prices.data import providers

        return frozenset([*self.overrides, *(m.id for p in providers for m in p.models)])

    def price(self, model: str, *, batch: bool = False,
              provider: str | None = None) -> ModelPrice | None:
        """The real-time price of ``model``, or with ``batch`` its batch price (see
        :attr:`ModelPrice.batch`) for a call through ``provider`` when given (its
        ``batch_discount`` then applies, else the one configured for the model); ``None`` when
        unknown."""
        if not batch:
            return self._memoised(self._memo, model, lambda: self._realtime(model))
        return self._memoised(self._batch_memo, (model, provider),
                              lambda: self._batch_price(model, provider))

    def _memoised(self, memo: dict[Any, ModelPrice | None], key: Any,
                  resolve: Callable[[], ModelPrice | None]) -> ModelPrice | None:
        try:
            return memo[key]
        except KeyError:
            pass
        with self._lock:
            found = resolve()
            if len(memo) < self.MEMO_LIMIT:
                memo[key] = found
            else:
                _trim_catalog_memos(self.MEMO_LIMIT)
        return found

    def _realtime(self, model: str) -> ModelPrice | None:
        return self._resolve(self.aliases.get(model, model))

    def _resolve(self, model: str, batch: bool = False) -> ModelPrice | None:
        override = self.overrides.get(model)
        if override is not None:
            if batch:
                return None  # the configuration gives no batch price: the discount applies
            inp, out, cached = override
            return ModelPrice(model, inp, out, inp if cached is None else cached, "config")
        found = _from_catalog(model, batch)
        if found is None and "/" in model:
            found = _from_catalog(model.rsplit("/", 1)[1], batch)
        return found

    def _batch_price(self, model: str, provider: str | None) -> ModelPrice | None:
        """The catalog's batch price of ``model``, else its real-time price at the discount of
        ``provider``, else the one configured for the name asked for or its model."""
        listed = self._resolve(self.aliases.get(model, model), batch=True)
        realtime = self._realtime(model)
        if listed is not None or realtime is None:
            return listed
        discount = self.provider_batch_discounts.get(provider or "")
        for name in (model, self.aliases.get(model, model)):
            discount = discount or self.batch_discounts.get(name)
        return _discounted(realtime, discount or self.default_batch_discount)

    def cost(self, model: str, usage: Usage, *, batch: bool = False,
             provider: str | None = None) -> float | None:
        """USD for ``usage`` on ``model`` (at its batch price with ``batch``, through
        ``provider`` when given: see :meth:`price`), or ``None`` when the price is unknown."""
        price = self.price(model, batch=batch, provider=provider)
        return None if price is None else price.cost(usage)
