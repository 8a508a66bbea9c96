"""The price catalog: what is charged, and what stays unknown rather than guessed."""

from __future__ import annotations

import genai_prices
import pytest

from skinflint.config import settings_from_dict
from skinflint.errors import ConfigError
from skinflint.gateway import price_catalog
from skinflint.models import Usage
from skinflint.pricing import BatchDiscount, ModelPrice, Part, PriceCatalog


@pytest.fixture(scope="module")
def catalog() -> PriceCatalog:
    return PriceCatalog({"house-embedder": (0.5, None, None), "house-chat": (1.0, 2.0, None)})


def test_an_embedding_model_costs_its_input(catalog: PriceCatalog) -> None:
    price = catalog.price("text-embedding-3-small")
    assert price is not None and price.output is None
    assert price.source == "genai-prices (openai/text-embedding-3-small)"
    assert catalog.cost("text-embedding-3-small", Usage(input_tokens=1000)) == pytest.approx(
        1000 * 0.02 / 1e6
    )


def test_a_model_named_for_its_provider_without_an_output_price(catalog: PriceCatalog) -> None:
    price = catalog.price("voyage-3")  # the catalog attributes it to Voyage by its name
    assert price is not None and price.output is None and price.input > 0
    assert catalog.cost("voyage-3", Usage(input_tokens=10)) == pytest.approx(10 * price.input / 1e6)


def test_output_without_a_price_is_unknown_not_free(catalog: PriceCatalog) -> None:
    assert catalog.cost("text-embedding-3-small", Usage(input_tokens=5, output_tokens=3)) is None
    assert catalog.cost("house-embedder", Usage(input_tokens=5, output_tokens=1)) is None
    assert catalog.cost("house-embedder", Usage(input_tokens=2_000_000)) == pytest.approx(1.0)


def test_models_the_catalog_does_not_list_stay_unknown(catalog: PriceCatalog) -> None:
    for name in ("house-model-7b", "qwen3-8b", "llama-3-70b"):
        assert catalog.price(name) is None
        assert catalog.cost(name, Usage(input_tokens=5, output_tokens=5)) is None


def test_chat_prices_are_unchanged(catalog: PriceCatalog) -> None:
    price = catalog.price("gpt-4o")
    assert price is not None and (price.input, price.output) == (2.5, 10.0)
    usage = Usage(input_tokens=1000, output_tokens=100)
    assert catalog.cost("gpt-4o", usage) == pytest.approx((1000 * 2.5 + 100 * 10.0) / 1e6)
    assert catalog.cost("house-chat", usage) == pytest.approx((1000 * 1.0 + 100 * 2.0) / 1e6)


def test_a_configured_price_may_leave_output_out() -> None:
    settings = settings_from_dict(
        {
            "providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}},
            "models": {"emb": {"provider": "p", "model": "e5", "price": {"input": 0.1}}},
        },
        env={},
    )
    catalog = price_catalog(settings)
    assert catalog.cost("emb", Usage(input_tokens=10)) == pytest.approx(1e-6)
    assert catalog.cost("emb", Usage(input_tokens=10, output_tokens=1)) is None


def test_names_clients_invent_do_not_grow_the_memo_past_its_cap() -> None:
    catalog = PriceCatalog()
    catalog.MEMO_LIMIT = 64  # the cap, made small so that the test stays quick
    catalog.price("gpt-4o-mini")
    for i in range(1000):
        assert catalog.price(f"client-model-{i}") is None
    assert len(catalog._memo) == 64
    assert catalog.price("gpt-4o-mini") is not None  # memoised first, still answered


def test_names_past_the_cap_do_not_grow_the_catalog_librarys_memos() -> None:
    """genai-prices keeps every name it was asked about; past the cap, nothing may."""
    import gc
    import tracemalloc

    catalog = PriceCatalog()
    catalog.MEMO_LIMIT = 64
    for i in range(200):  # fill the memo and let the library's memos refill once
        catalog.price(f"warm-{i}")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(3000):
            catalog.price(f"client-model-{i}")
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 100_000  # 800 kB (270 bytes a name) without the trimming
    assert catalog.price("gpt-4o-mini") is not None


def catalog_price(model: str, provider_id: str | None = None, **counts: int) -> float:
    """genai-prices' own answer, in the catalog's usage names."""
    found = genai_prices.calc_price(genai_prices.Usage(**counts), model_ref=model,
                                    provider_id=provider_id)
    return float(found.total_price)


def test_openai_usage_details_are_read_as_the_catalog_reads_them() -> None:
    usage = Usage.from_openai({
        "prompt_tokens": 100, "completion_tokens": 40, "total_tokens": 140,
        "prompt_tokens_details": {"cached_tokens": 30, "cache_write_tokens": 20,
                                  "audio_tokens": 10},
        "completion_tokens_details": {"reasoning_tokens": 25, "audio_tokens": 5},
    })
    assert usage == Usage(input_tokens=100, output_tokens=40, cached_tokens=30,
                          cache_write_tokens=20, input_audio_tokens=10, reasoning_tokens=25,
                          output_audio_tokens=5)
    assert Usage.from_openai({"prompt_tokens": 3, "completion_tokens": 1,
                              "prompt_tokens_details": None}) == Usage(3, 1)
    assert Usage.from_openai({"prompt_tokens": 3, "completion_tokens": 1,  # not an object
                              "completion_tokens_details": [5]}) == Usage(3, 1)


def test_a_call_without_parts_of_their_own_is_priced_from_the_plain_rates(
    catalog: PriceCatalog,
) -> None:
    price = catalog.price("gpt-4o-mini")
    assert price is not None and price.parts == ()  # the fast path: no part priced apart
    usage = Usage(input_tokens=1000, output_tokens=200, cached_tokens=400, reasoning_tokens=50)
    assert catalog.cost("gpt-4o-mini", usage) == pytest.approx(catalog_price(
        "gpt-4o-mini", input_tokens=1000, output_tokens=200, cache_read_tokens=400,
        output_reasoning_tokens=50), rel=1e-12)


@pytest.mark.parametrize("input_tokens", [199_999, 200_000, 200_001, 400_000])
def test_cache_writes_at_the_catalogs_tiered_rate(catalog: PriceCatalog, input_tokens: int) -> None:
    """claude-sonnet-4-5 doubles its rates above 200k input tokens, cache writes included."""
    price = catalog.price("claude-sonnet-4-5")
    assert price is not None and [p.usage for p in price.parts] == ["cache_write_tokens"]
    usage = Usage(input_tokens=input_tokens, output_tokens=300, cached_tokens=50_000,
                  cache_write_tokens=70_000)
    assert catalog.cost("claude-sonnet-4-5", usage) == pytest.approx(catalog_price(
        "claude-sonnet-4-5", input_tokens=input_tokens, output_tokens=300,
        cache_read_tokens=50_000, cache_write_tokens=70_000), rel=1e-12)


def test_audio_at_the_catalogs_audio_rates(catalog: PriceCatalog) -> None:
    usage = Usage(input_tokens=900, output_tokens=500, input_audio_tokens=600,
                  output_audio_tokens=450)
    assert catalog.cost("gpt-audio", usage) == pytest.approx(catalog_price(
        "gpt-audio", input_tokens=900, output_tokens=500, input_audio_tokens=600,
        output_audio_tokens=450), rel=1e-12)


def test_reasoning_at_a_rate_of_its_own() -> None:
    """Perplexity's deep research bills reasoning tokens apart from its answer."""
    listed = genai_prices.calc_price(genai_prices.Usage(input_tokens=1, output_tokens=1),
                                     model_ref="sonar-deep-research", provider_id="perplexity")
    rates = listed.model_price
    price = ModelPrice("sonar-deep-research", float(rates.input_mtok), float(rates.output_mtok),
                       float(rates.input_mtok), "catalog",
                       parts=(Part("reasoning_tokens", float(rates.output_reasoning_mtok),
                                   output=True),))
    usage = Usage(input_tokens=2000, output_tokens=900, reasoning_tokens=700)
    assert price.cost(usage) == pytest.approx(catalog_price(
        "sonar-deep-research", "perplexity", input_tokens=2000, output_tokens=900,
        output_reasoning_tokens=700), rel=1e-12)


def test_a_configured_price_bills_each_part_at_the_rate_of_its_whole(
    catalog: PriceCatalog,
) -> None:
    """An override has input, output and cached rates only: cache writes and input audio cost
    the input rate, reasoning and output audio the output rate."""
    usage = Usage(input_tokens=1000, output_tokens=100, cached_tokens=200, cache_write_tokens=300,
                  input_audio_tokens=100, reasoning_tokens=40, output_audio_tokens=10)
    # house-chat: 1 USD per million in (no cached rate: cached reads cost that too), 2 out
    assert catalog.cost("house-chat", usage) == pytest.approx((1000 * 1.0 + 100 * 2.0) / 1e6)


def test_parts_larger_than_their_whole_are_still_priced(catalog: PriceCatalog) -> None:
    """A provider's inconsistent counts are priced, not refused: the row is still written."""
    cost = catalog.cost("claude-3-5-sonnet-latest",
                        Usage(input_tokens=10, output_tokens=1, cache_write_tokens=50))
    assert cost is not None and cost > 0


# ---- batch prices

BATCH = {"processing": "batch"}


def _catalog_batch_cost(model: str, usage: Usage, provider_id: str | None = None,
                        context: dict[str, str] | None = BATCH) -> float:
    """What genai-prices charges for ``usage`` on ``model`` (at its batch price by default)."""
    counts = genai_prices.Usage(input_tokens=usage.input_tokens,
                                cache_read_tokens=usage.cached_tokens,
                                cache_write_tokens=usage.cache_write_tokens,
                                output_tokens=usage.output_tokens)
    return float(genai_prices.calc_price(counts, model_ref=model, provider_id=provider_id,
                                         price_context=context).total_price)


@pytest.mark.parametrize("model", ["claude-haiku-4-5", "claude-sonnet-4-5", "gpt-4o-mini"])
def test_a_batch_price_the_catalog_lists_is_the_catalogs(model: str) -> None:
    catalog = PriceCatalog(default_batch_discount=BatchDiscount(0.9))  # the catalog's wins
    usage = Usage(input_tokens=12_000, cached_tokens=3_000, cache_write_tokens=2_000,
                  output_tokens=900)
    price = catalog.price(model, batch=True)
    assert price is not None and price.batch == "catalog"
    assert price.source.endswith(", batch price)")
    batch = catalog.cost(model, usage, batch=True)
    assert batch == pytest.approx(_catalog_batch_cost(model, usage), rel=1e-9)
    realtime = catalog.cost(model, usage)
    assert realtime == pytest.approx(_catalog_batch_cost(model, usage, context=None), rel=1e-9)
    assert batch is not None and realtime is not None and batch < realtime
    assert catalog.price(model) is not None and catalog.price(model).batch is None  # type: ignore[union-attr]


def _settings(discount: float | None, **model: object) -> dict[str, object]:
    provider: dict[str, object] = {"base_url": "http://127.0.0.1:1/v1"}
    if discount is not None:
        provider["batch_discount"] = discount
    return {"providers": {"ds": provider},
            "models": {"chat": {"provider": "ds", "model": "deepseek-chat", **model}}}


def test_without_a_catalog_batch_price_the_providers_discount_applies() -> None:
    catalog = price_catalog(settings_from_dict(_settings(0.4), env={}))
    usage = Usage(input_tokens=5_000, cached_tokens=1_000, output_tokens=700)
    standard = _catalog_batch_cost("deepseek-chat", usage, context=None)
    assert _catalog_batch_cost("deepseek-chat", usage) == pytest.approx(standard)  # no variant
    for name in ("chat", "deepseek-chat"):  # the alias and the provider's name for it
        price = catalog.price(name, batch=True)
        assert price is not None and price.batch == "discount"
        assert price.source == ("genai-prices (deepseek/deepseek-chat)"
                                " x 0.4 (providers.ds.batch_discount)")
        assert catalog.cost(name, usage, batch=True) == pytest.approx(0.4 * standard, rel=1e-9)
        assert catalog.cost(name, usage) == pytest.approx(standard, rel=1e-9)


def test_the_discount_of_the_provider_a_call_went_through_wins() -> None:
    raw = _settings(0.4)
    raw["providers"]["other"] = {"base_url": "http://127.0.0.1:1/v1",  # type: ignore[index]
                                 "batch_discount": 0.8}
    catalog = price_catalog(settings_from_dict(raw, env={}))
    usage = Usage(input_tokens=4_000, output_tokens=400)
    standard = _catalog_batch_cost("deepseek-chat", usage, context=None)
    price = catalog.price("deepseek-chat", batch=True, provider="other")
    assert price is not None and price.source.endswith("x 0.8 (providers.other.batch_discount)")
    assert catalog.cost("chat", usage, batch=True, provider="other") == pytest.approx(
        0.8 * standard, rel=1e-9)
    assert catalog.cost("chat", usage, batch=True) == pytest.approx(0.4 * standard, rel=1e-9)
    assert catalog.cost("chat", usage, batch=True, provider="unknown") == pytest.approx(
        0.4 * standard, rel=1e-9)  # an unknown provider: the model's own
    listed = catalog.price("claude-haiku-4-5", batch=True, provider="other")
    assert listed is not None and listed.batch == "catalog"  # the catalog's price still wins


def test_a_configured_price_is_discounted_at_the_default_half() -> None:
    catalog = price_catalog(settings_from_dict(
        _settings(None, price={"input": 2.0, "output": 6.0}), env={}))
    price = catalog.price("chat", batch=True)
    assert price is not None and (price.input, price.output, price.cached_input) == (1.0, 3.0, 1.0)
    assert (price.batch, price.source) == (
        "discount", "config x 0.5 (providers.ds.batch_discount)")
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    assert catalog.cost("chat", usage, batch=True) == pytest.approx(4.0)


def test_a_discount_scales_every_rate_of_a_call() -> None:
    catalog = PriceCatalog(default_batch_discount=BatchDiscount(0.25, "a test's discount"))
    realtime = catalog.price("gpt-audio")  # the catalog lists no batch price for it
    price = catalog.price("gpt-audio", batch=True)
    assert realtime is not None and price is not None and price.batch == "discount"
    assert price.source.endswith(" x 0.25 (a test's discount)")
    usage = Usage(input_tokens=2_000, output_tokens=800, input_audio_tokens=500,
                  output_audio_tokens=300)
    assert price.cost(usage) == pytest.approx(0.25 * (realtime.cost(usage) or 0), rel=1e-9)


@pytest.mark.parametrize("bad", [0, -0.5, 1.5])
def test_a_batch_discount_outside_0_to_1_is_refused_naming_its_key(bad: float) -> None:
    with pytest.raises(ConfigError, match=r"providers\.ds\.batch_discount"):
        settings_from_dict(_settings(bad), env={})
    assert settings_from_dict(_settings(1), env={}).providers["ds"].batch_discount == 1
    assert settings_from_dict(_settings(None), env={}).providers["ds"].batch_discount == 0.5
