"""The price catalog: what is charged, and what stays unknown rather than guessed."""

from __future__ import annotations

import pytest

from skinflint.config import settings_from_dict
from skinflint.gateway import price_catalog
from skinflint.models import Usage
from skinflint.pricing import PriceCatalog


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
