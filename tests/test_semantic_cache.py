"""The semantic cache through the real HTTP path (hashing embedder: fast and deterministic;
one test uses the shipped local model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.config import settings_from_dict
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

SEMANTIC = {"exact": {}, "semantic": {"enabled": True, "embedder": "hashing", "threshold": 0.75}}
KEYS = [{"tenant": "acme", "key": "gw-key-acme"}, {"tenant": "globex", "key": "gw-key-globex"}]


def _ask(c: openai.OpenAI, text: str, *, system: str | None = None, **kw: Any) -> Any:
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}]
    kw.setdefault("temperature", 0)
    return c.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages,
                                                      **kw)


def _calls(fake: FakeUpstream) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))


@pytest.fixture
def semantic(make_gateway: GatewayFactory) -> Any:
    gw = make_gateway(cache=SEMANTIC)
    return gw, openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)


def test_paraphrase_is_a_semantic_hit(semantic: Any, fake: FakeUpstream, tmp_path: Path) -> None:
    _, c = semantic
    first = _ask(c, "Show me my recent invoices")
    again = _ask(c, "show me my recent invoices please")
    assert first.headers["x-skinflint-cache"] == "miss"
    assert again.headers["x-skinflint-cache"] == "hit-semantic"
    assert again.parse().choices[0].message.content == "echo: Show me my recent invoices"
    assert float(again.headers["x-skinflint-cost-usd"]) == 0
    assert float(again.headers["x-skinflint-saved-usd"]) > 0
    assert _calls(fake) == 1
    rows = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert rows[1]["cache_status"] == "hit-semantic" and rows[1]["strategy"] == "semantic_cache"
    assert 0.75 <= rows[1]["similarity"] <= 1.0
    from skinflint.analytics.cachestats import stats
    from skinflint.config import Settings

    figures = stats(Settings(), str(tmp_path / "skinflint.db"))
    assert figures["semantic_hits"] == 1 and figures["hits"] == 1 and figures["requests"] == 2
    assert figures["saved_usd"] > 0


def test_one_feature_turns_the_semantic_cache_on_while_it_is_off_for_the_rest(
    make_gateway: GatewayFactory, fake: FakeUpstream
) -> None:
    config = {"exact": {}, "semantic": {"enabled": False, "embedder": "hashing",
                                        "threshold": 0.75,
                                        "features": {"support": {"enabled": True}}}}
    gw = make_gateway(cache=config)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        support = {"extra_headers": {"x-skinflint-feature": "support"}}
        assert _ask(c, "Show me my recent invoices", **support).headers[
            "x-skinflint-cache"] == "miss"
        assert _ask(c, "show me my recent invoices please", **support).headers[
            "x-skinflint-cache"] == "hit-semantic"
        _ask(c, "Show me my recent orders")
        assert _ask(c, "show me my recent orders please").headers["x-skinflint-cache"] == "miss"
    assert _calls(fake) == 3


def test_streamed_semantic_hit_headers_carry_cost_and_saving(
    semantic: Any, tmp_path: Path
) -> None:
    _, c = semantic
    _ask(c, "Show me my recent invoices")
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, stream=True,
        messages=[{"role": "user", "content": "show me my recent invoices please"}])
    assert "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices) \
        == "echo: Show me my recent invoices"
    assert raw.headers["x-skinflint-cache"] == "hit-semantic"
    miss, hit = ledger_rows(tmp_path / "skinflint.db", expect=2)
    assert float(raw.headers["x-skinflint-cost-usd"]) == 0 == hit["cost_usd"]
    saved = float(raw.headers["x-skinflint-saved-usd"])
    assert saved == pytest.approx(hit["saved_usd"], abs=1e-8)
    assert saved == pytest.approx(miss["cost_usd"], abs=1e-8) and saved > 0


def test_long_message_matches_by_its_last_paragraph(semantic: Any, fake: FakeUpstream) -> None:
    _, c = semantic
    doc = "Invoice ledger export. " + " ".join(f"line {i}: amount {i * 7} EUR." for i in range(90))
    other = doc.replace("amount 14 EUR", "amount 15 EUR")
    assert len(doc) > 1000
    assert _ask(c, f"{doc}\n\nShow me my recent invoices").headers["x-skinflint-cache"] == "miss"
    reworded = _ask(c, f"{doc}\n\nshow me my recent invoices please")
    assert reworded.headers["x-skinflint-cache"] == "hit-semantic"
    # the document is compared exactly: one changed figure is another request
    changed = _ask(c, f"{other}\n\nshow me my recent invoices please")
    assert changed.headers["x-skinflint-cache"] == "miss"
    # without a paragraph to compare by, a long message is left to the exact cache
    assert _ask(c, f"{doc} show me my recent invoices please").headers[
        "x-skinflint-cache"] == "miss"
    assert _calls(fake) == 3


def test_never_across_attachments(semantic: Any, fake: FakeUpstream) -> None:
    _, c = semantic

    def ask(image: str, text: str) -> str:
        content = [{"type": "text", "text": text},
                   {"type": "image_url", "image_url": {"url": f"https://example.com/{image}"}}]
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": content}])
        return str(raw.headers["x-skinflint-cache"])

    assert ask("cat.png", "What is in this picture?") == "miss"
    assert ask("invoice.png", "What is in this picture?") == "miss"
    assert ask("invoice.png", "what is in this picture please") == "hit-semantic"
    assert _calls(fake) == 2


def test_different_question_misses(semantic: Any, fake: FakeUpstream) -> None:
    _, c = semantic
    _ask(c, "Show me my recent invoices")
    assert _ask(c, "What is the weather in Paris").headers["x-skinflint-cache"] == "miss"


def test_verifier_rejects_reversed_and_changed_numbers(make_gateway: GatewayFactory,
                                                      fake: FakeUpstream) -> None:
    cache = {"semantic": {"enabled": True, "embedder": "hashing", "threshold": 0.3,
                          "verifier": True}}
    gw = make_gateway(cache=cache)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, "How do I convert a string to an int in Python")
        assert _ask(c, "How do I convert an int to a string in Python").headers[
            "x-skinflint-cache"] == "miss"
        _ask(c, "Flights from Paris to London on Monday")
        assert _ask(c, "Flights from London to Paris on Monday").headers[
            "x-skinflint-cache"] == "miss"
        _ask(c, "What is 15% of 200")
        assert _ask(c, "What is 15% of 300").headers["x-skinflint-cache"] == "miss"
        _ask(c, "Is it safe to eat raw eggs")
        assert _ask(c, "Is it not safe to eat raw eggs").headers["x-skinflint-cache"] == "miss"
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert "skinflint_semantic_rejected_total" in metrics


def test_never_across_tenants(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(cache=SEMANTIC, keys=KEYS)
    with openai.OpenAI(base_url=gw.base_url, api_key="gw-key-acme", max_retries=0) as acme, \
            openai.OpenAI(base_url=gw.base_url, api_key="gw-key-globex", max_retries=0) as globex:
        _ask(acme, "Show me my recent invoices")
        assert _ask(globex, "show me my recent invoices please").headers[
            "x-skinflint-cache"] == "miss"
        assert _ask(acme, "show me my recent invoices please").headers[
            "x-skinflint-cache"] == "hit-semantic"


def test_never_across_contexts(semantic: Any, fake: FakeUpstream) -> None:
    _, c = semantic
    _ask(c, "Show me my recent invoices", system="You are the billing assistant.")
    assert _ask(c, "show me my recent invoices please", system="You are a pirate.").headers[
        "x-skinflint-cache"] == "miss"
    assert _ask(c, "show me my recent invoices please").headers["x-skinflint-cache"] == "miss"
    earlier = [{"role": "user", "content": "I am customer 42"},
               {"role": "assistant", "content": "Hello customer 42"},
               {"role": "user", "content": "Show me my recent invoices"}]
    other = [{"role": "user", "content": "I am customer 43"},
             {"role": "assistant", "content": "Hello customer 43"},
             {"role": "user", "content": "show me my recent invoices please"}]
    c.chat.completions.create(model="gpt-4o-mini", temperature=0, messages=earlier)
    raw = c.chat.completions.with_raw_response.create(model="gpt-4o-mini", temperature=0,
                                                      messages=other)
    assert raw.headers["x-skinflint-cache"] == "miss"
    assert _ask(c, "show me my recent invoices please", temperature=0.2).headers[
        "x-skinflint-cache"] == "miss"  # other parameters, other partition


def test_invalidated_by_tag(semantic: Any, fake: FakeUpstream) -> None:
    gw, c = semantic
    _ask(c, "Show me my recent invoices", extra_headers={"x-skinflint-tags": "invoices:v7"})
    httpx.post(gw.root_url + "/api/cache/invalidate", json={"tags": ["invoices:v7"]})
    assert _ask(c, "show me my recent invoices please").headers["x-skinflint-cache"] == "miss"


def test_not_stored_when_exact_cache_would_not(semantic: Any, fake: FakeUpstream) -> None:
    _, c = semantic
    _ask(c, "Show me my recent invoices", temperature=0.9)
    assert _ask(c, "show me my recent invoices please").headers["x-skinflint-cache"] == "miss"
    _ask(c, "Show me my open tickets", extra_headers={"x-skinflint-cache": "bypass"})
    assert _ask(c, "show me my open tickets please").headers["x-skinflint-cache"] == "miss"


def test_streamed_semantic_hit(semantic: Any, fake: FakeUpstream) -> None:
    _, c = semantic
    _ask(c, "Show me my recent invoices")
    raw = c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, stream=True,
        messages=[{"role": "user", "content": "show me my recent invoices please"}])
    assert raw.headers["x-skinflint-cache"] == "hit-semantic"
    text = "".join(ch.choices[0].delta.content or "" for ch in raw.parse() if ch.choices)
    assert text == "echo: Show me my recent invoices"


def test_survives_restart(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(cache=SEMANTIC)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, "Show me my recent invoices")
    gw.__exit__(None, None, None)
    gw2 = make_gateway(cache=SEMANTIC)
    with openai.OpenAI(base_url=gw2.base_url, api_key="k", max_retries=0) as c:
        assert _ask(c, "show me my recent invoices please").headers[
            "x-skinflint-cache"] == "hit-semantic"
    assert _calls(fake) == 1


def test_off_by_default_and_on_by_environment() -> None:
    base = {"providers": {"p": {"base_url": "http://127.0.0.1:1/v1"}}}
    assert not settings_from_dict(base, env={}).cache.semantic.enabled
    assert settings_from_dict(base, env={"SKINFLINT_SEMANTIC_CACHE": "1"}).cache.semantic.enabled


def test_local_embedder_end_to_end(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    gw = make_gateway(cache={"semantic": {"enabled": True, "threshold": 0.95}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        _ask(c, "How can I reset my account password?")
        hit = _ask(c, "How do I reset the password of my account?")
        assert hit.headers["x-skinflint-cache"] == "hit-semantic", "paraphrase should hit"
        assert _ask(c, "How do I delete my account?").headers["x-skinflint-cache"] == "miss"


PAIRS = Path(__file__).resolve().parents[2] / "shared" / "data" / "semantic_cache" / "qqp_pairs_dev.jsonl"


@pytest.mark.skipif(not PAIRS.exists(), reason=f"labelled pairs not found at {PAIRS}")
def test_calibrate_writes_config_and_eval_reads_it(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from skinflint.cli import main

    pairs = tmp_path / "pairs.jsonl"
    with PAIRS.open() as fh:
        pairs.write_text("".join(fh.readlines()[:300]))
    config = tmp_path / "skinflint.yaml"
    assert main(["cache", "calibrate", str(pairs), "--precision", "0.8", "--config", str(config),
                 "--json"]) == 0
    chosen = json.loads(capsys.readouterr().out)
    assert chosen["written_to"] == str(config) and chosen["pairs"] == 300
    written = settings_from_dict(__import__("yaml").safe_load(config.read_text()), env={})
    assert written.cache.semantic.threshold == pytest.approx(chosen["threshold"], abs=1e-4)
    assert main(["cache", "eval", str(pairs), "--config", str(config), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) >= {"pairs", "precision", "recall", "threshold"}
    assert report["threshold"] == pytest.approx(chosen["threshold"], abs=1e-4)
    if chosen["met"]:
        assert report["precision"] >= 0.8  # the same pairs it was calibrated on
    assert main(["cache", "calibrate", str(pairs), "--precision", "0.6", "--route", "auto",
                 "--config", str(config), "--json"]) == 0
    per_route = json.loads(capsys.readouterr().out)["threshold"]
    written = settings_from_dict(__import__("yaml").safe_load(config.read_text()), env={})
    assert written.cache.semantic.routes["auto"].threshold == pytest.approx(per_route, abs=1e-4)
    assert written.cache.semantic.threshold == pytest.approx(chosen["threshold"], abs=1e-4)
    assert main(["cache", "eval", str(pairs), "--route", "auto", "--config", str(config),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == pytest.approx(per_route, abs=1e-4)


def test_openai_compatible_embedder(make_gateway: GatewayFactory, fake: FakeUpstream) -> None:
    """The embedder may be a configured provider's /embeddings endpoint (the fake returns
    8-dimensional vectors)."""
    gw = make_gateway(cache={"semantic": {
        "enabled": True, "embedder": "openai-compatible", "embedder_provider": "fake",
        "embedder_model": "text-embedding-3-small", "embedder_dim": 8, "threshold": 0.99}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        assert _ask(c, "Show me my recent invoices").headers["x-skinflint-cache"] == "miss"
        assert _ask(c, "Anything else?").headers["x-skinflint-cache"] == "miss"
    embedded = [r.body for r in fake.requests if r.path.endswith("/embeddings")]
    assert embedded and all(b and b["model"] == "text-embedding-3-small" for b in embedded)
    assert [b["input"] for b in embedded if b] == [["Show me my recent invoices"],
                                                   ["Anything else?"]]
    assert fake.requests[0].headers["authorization"] == "Bearer sk-upstream-secret-123"


def test_openai_compatible_embedder_needs_a_provider() -> None:
    from skinflint.errors import ConfigError

    with pytest.raises(ConfigError, match="embedder_provider"):
        settings_from_dict({"providers": {"p": {"base_url": "http://x/v1"}},
                            "cache": {"semantic": {"embedder": "openai-compatible"}}}, env={})


def _embedder_gateway(make_gateway: GatewayFactory, dim: int) -> Any:
    return make_gateway(cache={"semantic": {
        "enabled": True, "embedder": "openai-compatible", "embedder_provider": "fake",
        "embedder_model": "text-embedding-3-small", "embedder_dim": dim, "threshold": 0.99}})


def test_an_embedder_that_fails_lets_the_request_through(make_gateway: GatewayFactory,
                                                         fake: FakeUpstream) -> None:
    """Vectors of the wrong size (the fake's are 8-dimensional): each request goes to the model
    without a lookup, and after three failures in a row the embedder is not even asked."""
    gw = _embedder_gateway(make_gateway, dim=16)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        replies = [_ask(c, f"Show me my recent invoices, page {n}") for n in range(4)]
    assert all(r.http_response.status_code == 200 for r in replies)
    assert {r.headers["x-skinflint-cache"] for r in replies} == {"miss"}
    assert _calls(fake) == 4
    assert sum(1 for r in fake.requests if r.path.endswith("/embeddings")) == 3
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert 'skinflint_semantic_skipped_total{reason="embedder_error"} 3.0' in metrics
    assert 'skinflint_semantic_skipped_total{reason="embedder_down"} 1.0' in metrics


def test_a_slow_embedder_lets_the_request_through(make_gateway: GatewayFactory,
                                                  fake: FakeUpstream,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from skinflint.pipeline import embedding

    monkeypatch.setattr(embedding, "EMBED_TIMEOUT", 0.2)
    gw = _embedder_gateway(make_gateway, dim=8)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        reply = _ask(c, "Show me my invoices [[fault:delay=0.6]]")  # embeddings wait too
    assert reply.headers["x-skinflint-cache"] == "miss" and _calls(fake) == 1
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert 'skinflint_semantic_skipped_total{reason="embedder_timeout"} 1.0' in metrics
