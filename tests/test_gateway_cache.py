"""The exact cache through the real HTTP path."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.cachekey import NOT_OUTPUT_AFFECTING, request_hash
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream


def _ask(c: openai.OpenAI, content: str = "what is skinflint?", **kw: Any) -> Any:
    kw.setdefault("temperature", 0)
    kw.setdefault("model", "gpt-4o-mini")
    return c.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": content}], **kw
    )


def _calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path.endswith(("/chat/completions", "/messages")))


def test_hit_after_miss_with_headers(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    first, second = _ask(client), _ask(client)
    assert first.headers["x-skinflint-cache"] == "miss"
    assert second.headers["x-skinflint-cache"] == "hit-exact"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    assert float(second.headers["x-skinflint-cost-usd"]) == 0
    assert float(second.headers["x-skinflint-saved-usd"]) == pytest.approx(
        float(first.headers["x-skinflint-cost-usd"])
    )
    assert second.headers["x-skinflint-model"] == "gpt-4o-mini"
    assert first.headers["x-skinflint-request-id"] != second.headers["x-skinflint-request-id"]
    assert _calls(fake) == 1
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert [r["cache_status"] for r in rows] == ["miss", "hit-exact"]
    assert rows[1]["cost_usd"] == 0 and rows[1]["saved_usd"] == pytest.approx(rows[0]["cost_usd"])
    assert rows[0]["request_hash"] == rows[1]["request_hash"]


def test_whitespace_is_normalised_by_default(client: openai.OpenAI, fake: FakeUpstream) -> None:
    _ask(client, "what  is\nskinflint? ")
    assert _ask(client, "what is skinflint?").headers["x-skinflint-cache"] == "hit-exact"
    assert _ask(client, "What is skinflint").headers["x-skinflint-cache"] == "miss"


def test_loose_normalisation_is_per_feature(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(cache={"exact": {"features": {"faq": {"normalization": "loose"}}}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        faq = {"extra_headers": {"x-skinflint-feature": "faq"}}
        _ask(c, "What is skinflint?", **faq)
        assert _ask(c, "what is skinflint", **faq).headers["x-skinflint-cache"] == "hit-exact"
        _ask(c, "What is the answer?")
        assert _ask(c, "what is the answer").headers["x-skinflint-cache"] == "miss"


def test_bypass_and_refresh(client: openai.OpenAI, fake: FakeUpstream) -> None:
    _ask(client)
    bypass = _ask(client, extra_headers={"x-skinflint-cache": "bypass"})
    assert bypass.headers["x-skinflint-cache"] == "bypass"
    refresh = _ask(client, extra_headers={"x-skinflint-cache": "refresh"})
    assert refresh.headers["x-skinflint-cache"] == "miss"
    assert _calls(fake) == 3
    assert _ask(client).headers["x-skinflint-cache"] == "hit-exact"


def test_bypass_is_reported_with_the_exact_cache_off(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(cache={"exact": {"enabled": False}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        assert _ask(c).headers["x-skinflint-cache"] == "miss"
        bypass = _ask(c, extra_headers={"x-skinflint-cache": "bypass"})
        assert bypass.headers["x-skinflint-cache"] == "bypass"


def test_bypass_does_not_write(client: openai.OpenAI) -> None:
    _ask(client, "fresh question", extra_headers={"x-skinflint-cache": "bypass"})
    assert _ask(client, "fresh question").headers["x-skinflint-cache"] == "miss"


def test_every_output_affecting_parameter_changes_the_key(
    client: openai.OpenAI, fake: FakeUpstream
) -> None:
    _ask(client)
    variants: list[dict[str, Any]] = [
        {"temperature": 0.2},
        {"top_p": 0.5},
        {"seed": 3},
        {"max_tokens": 40},
        {"stop": ["x"]},
        {"n": 2},
        {"model": "gpt-4o"},
        {"response_format": {"type": "json_object"}},
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    ]
    for v in variants:
        assert _ask(client, **v).headers["x-skinflint-cache"] == "miss", v
    assert _ask(client, user="someone").headers["x-skinflint-cache"] == "hit-exact"


def test_cache_key_fields_are_pinned() -> None:
    assert (
        frozenset(
            {
                "stream",
                "stream_options",
                "user",
                "metadata",
                "store",
                "service_tier",
                "prompt_cache_key",
                "safety_identifier",
                "prompt_cache_retention",
            }
        )
        == NOT_OUTPUT_AFFECTING
    )
    base = {"model": "m", "messages": [{"role": "user", "content": "q"}]}
    assert request_hash("chat", {**base, "brand_new_param": 1}) != request_hash("chat", base)
    assert request_hash("chat", {**base, "stream": True}) == request_hash("chat", base)


def test_high_temperature_is_not_cached_unless_feature_opts_in(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(cache={"exact": {"features": {"poems": {"cache_any_temperature": True}}}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, temperature=0.9)
        assert _ask(c, temperature=0.9).headers["x-skinflint-cache"] == "bypass"
        _ask(c, "no temperature given", temperature=openai.NOT_GIVEN)
        assert (
            _ask(c, "no temperature given", temperature=openai.NOT_GIVEN).headers[
                "x-skinflint-cache"
            ]
            == "bypass"
        )
        poems = {"extra_headers": {"x-skinflint-feature": "poems"}, "temperature": 1.2}
        _ask(c, "a poem", **poems)
        assert _ask(c, "a poem", **poems).headers["x-skinflint-cache"] == "hit-exact"


def test_truncated_answers_are_not_cached(client: openai.OpenAI) -> None:
    _ask(client, "one two three four five six seven eight", max_tokens=2)
    again = _ask(client, "one two three four five six seven eight", max_tokens=2)
    assert again.parse().choices[0].finish_reason == "length"
    assert again.headers["x-skinflint-cache"] == "miss"


def test_stream_hit_is_a_proper_sse_stream(client: openai.OpenAI, fake: FakeUpstream) -> None:
    msg = [{"role": "user", "content": "stream and cache"}]
    first = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model="gpt-4o-mini", messages=msg, temperature=0, stream=True
        )
        if c.choices
    )
    raw = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=msg,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    assert raw.headers["x-skinflint-cache"] == "hit-exact"
    assert raw.headers["content-type"].startswith("text/event-stream")
    chunks = list(raw.parse())
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == first
    assert chunks[-1].usage is not None
    # a non-streaming request is served from the streamed answer too
    assert _ask(client, "stream and cache").headers["x-skinflint-cache"] == "hit-exact"
    assert _calls(fake) == 1


def test_stream_hit_headers_carry_cost_and_saving(
    make_gateway: GatewayFactory, tmp_path: Path
) -> None:
    """A streamed hit costs nothing and its saving is known before the first chunk, so its
    headers carry both; they agree with its ledger row."""
    gw = make_gateway(baseline_model="gpt-4o")
    msg = [{"role": "user", "content": "stream, cache and price"}]
    heads = []
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        for _ in range(2):
            raw = c.chat.completions.with_raw_response.create(
                model="gpt-4o-mini", messages=msg, temperature=0, stream=True
            )
            assert list(raw.parse())  # read to its end: the answer is stored
            heads.append(raw.headers)
    assert heads[0]["x-skinflint-cache"] == "miss" and "x-skinflint-cost-usd" not in heads[0]
    assert heads[1]["x-skinflint-cache"] == "hit-exact"
    miss, hit = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert float(heads[1]["x-skinflint-cost-usd"]) == 0 == hit["cost_usd"]
    saved = float(heads[1]["x-skinflint-saved-usd"])
    assert saved == pytest.approx(hit["saved_usd"], abs=1e-8)
    assert saved == pytest.approx(miss["baseline_cost_usd"], abs=1e-8) and saved > miss["cost_usd"]


KEYS = [{"tenant": "acme", "key": "gw-key-acme"}, {"tenant": "globex", "key": "gw-key-globex"}]


def test_cache_never_crosses_tenants(make_gateway: GatewayFactory, tmp_path: Path) -> None:
    gw = make_gateway(keys=KEYS)
    with (
        openai.OpenAI(base_url=gw.base_url, api_key="gw-key-acme", max_retries=0) as acme,
        openai.OpenAI(base_url=gw.base_url, api_key="gw-key-globex", max_retries=0) as globex,
    ):
        _ask(acme)
        assert _ask(globex).headers["x-skinflint-cache"] == "miss"
        assert _ask(acme).headers["x-skinflint-cache"] == "hit-exact"
    rows = ledger_rows(tmp_path / "skinflint.db", expect=3)
    assert [r["tenant"] for r in rows] == ["acme", "globex", "acme"]
    db_text = (tmp_path / "skinflint.db").read_bytes()
    assert b"gw-key-acme" not in db_text


def test_gateway_keys_are_required_when_configured(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(keys=KEYS)
    with openai.OpenAI(base_url=gw.base_url, api_key="wrong", max_retries=0) as c:
        with pytest.raises(openai.AuthenticationError):
            _ask(c)


def test_shared_and_user_scopes(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(keys=KEYS, cache={"exact": {"scope": "shared"}})
    with (
        openai.OpenAI(base_url=gw.base_url, api_key="gw-key-acme", max_retries=0) as acme,
        openai.OpenAI(base_url=gw.base_url, api_key="gw-key-globex", max_retries=0) as globex,
    ):
        _ask(acme)
        assert _ask(globex).headers["x-skinflint-cache"] == "hit-exact"


def test_user_scope(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(cache={"exact": {"scope": "user"}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, extra_headers={"x-skinflint-user": "u1"})
        assert (
            _ask(c, extra_headers={"x-skinflint-user": "u2"}).headers["x-skinflint-cache"] == "miss"
        )
        assert (
            _ask(c, extra_headers={"x-skinflint-user": "u1"}).headers["x-skinflint-cache"]
            == "hit-exact"
        )


def test_invalidate_by_tag_over_http(client: openai.OpenAI, gateway: Any) -> None:
    _ask(client, "invoices?", extra_headers={"x-skinflint-tags": "user:42,invoices:v7"})
    _ask(client, "profile?", extra_headers={"x-skinflint-tags": "user:43"})
    resp = httpx.post(gateway.root_url + "/api/cache/invalidate", json={"tags": ["invoices:v7"]})
    assert resp.json()["invalidated"] == 1
    assert _ask(client, "invoices?").headers["x-skinflint-cache"] == "miss"
    assert _ask(client, "profile?").headers["x-skinflint-cache"] == "hit-exact"
    bad = httpx.post(gateway.root_url + "/api/cache/invalidate", json={"tags": "nope"})
    assert bad.status_code == 400


def test_an_answer_in_flight_during_an_invalidation_is_not_stored(
    client: openai.OpenAI, gateway: Any, fake: FakeUpstream
) -> None:
    """A request that looked the cache up before its tag was invalidated may carry an answer
    built on the data the tag stood for: it is answered, not stored. A request in flight with
    other tags is stored as usual."""
    def ask(account: int) -> Any:
        return _ask(client, f"balance of {account}? [[fault:delay=1]]",
                    extra_headers={"x-skinflint-tags": f"account:{account}"})

    with ThreadPoolExecutor(2) as pool:
        slow = [pool.submit(ask, 7), pool.submit(ask, 8)]
        deadline = time.monotonic() + 5
        while _calls(fake) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # until both requests have reached the upstream
        resp = httpx.post(gateway.root_url + "/api/cache/invalidate", json={"tags": ["account:7"]})
        assert resp.status_code == 200
        assert [f.result(timeout=10).headers["x-skinflint-cache"] for f in slow] == ["miss"] * 2
    assert ask(7).headers["x-skinflint-cache"] == "miss"  # not stored the first time
    assert ask(7).headers["x-skinflint-cache"] == "hit-exact"
    assert ask(8).headers["x-skinflint-cache"] == "hit-exact"  # another tag: stored


def test_user_scope_keeps_tenants_apart_whatever_the_names(make_gateway: GatewayFactory) -> None:
    """Tenant "acme" with user "eu:bob" is not tenant "acme:eu" with user "bob"."""
    gw = make_gateway(
        cache={"exact": {"scope": "user"}},
        keys=[{"key": "k-acme", "tenant": "acme"}, {"key": "k-acme-eu", "tenant": "acme:eu"}],
    )
    with (
        openai.OpenAI(base_url=gw.base_url, api_key="k-acme", max_retries=0) as acme,
        openai.OpenAI(base_url=gw.base_url, api_key="k-acme-eu", max_retries=0) as acme_eu,
    ):
        _ask(acme, extra_headers={"x-skinflint-user": "eu:bob"})
        assert _ask(acme_eu, extra_headers={"x-skinflint-user": "bob"}).headers[
            "x-skinflint-cache"] == "miss"


def test_a_feature_with_its_own_ttl_is_never_served_another_features_answer(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(cache={"exact": {"features": {"news": {"ttl_seconds": 300}}}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, "headlines?", extra_headers={"x-skinflint-feature": "faq"})  # default TTL
        news = {"extra_headers": {"x-skinflint-feature": "news"}}
        assert _ask(c, "headlines?", **news).headers["x-skinflint-cache"] == "miss"
        assert _ask(c, "headlines?", **news).headers["x-skinflint-cache"] == "hit-exact"
        other = {"extra_headers": {"x-skinflint-feature": "blog"}}  # no policy: shares faq's
        assert _ask(c, "headlines?", **other).headers["x-skinflint-cache"] == "hit-exact"


def test_cache_survives_restart(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway()
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, "remember me")
    gw.__exit__(None, None, None)
    gw2 = make_gateway()
    with openai.OpenAI(base_url=gw2.base_url, api_key="k", max_retries=0) as c:
        assert _ask(c, "remember me").headers["x-skinflint-cache"] == "hit-exact"
    assert _calls(fake) == 1


def test_an_answer_another_model_gave_is_not_stored_for_the_one_asked(
        client: openai.OpenAI, fake: FakeUpstream, make_gateway: GatewayFactory) -> None:
    fake.fail_next("status=500", times=3)  # the first target and its two retries
    fell_back = _ask(client, model="primary")
    assert fell_back.headers["x-skinflint-model"] == "claude-3-5-haiku-latest"
    again = _ask(client, model="primary")  # the model asked is back: its own answer, stored
    assert again.headers["x-skinflint-cache"] == "miss"
    assert again.headers["x-skinflint-model"] == "gpt-4o-mini"
    assert _ask(client, model="primary").headers["x-skinflint-cache"] == "hit-exact"
    budget = {"name": "daily", "limit": {"requests": 1}, "action": "downgrade",
              "downgrade_to": "cheap"}
    with openai.OpenAI(base_url=make_gateway(budgets=[budget]).base_url, api_key="k",
                       max_retries=0, timeout=10) as other:
        _ask(other, "within the budget")
        downgraded = [_ask(other, "past it") for _ in range(2)]
    assert [d.headers["x-skinflint-model"] for d in downgraded] == ["qwen3-8b"] * 2
    assert [d.headers["x-skinflint-cache"] for d in downgraded] == ["miss", "miss"]
