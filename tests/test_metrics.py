"""Metrics keep bounded label sets: a model name the gateway does not know is counted as
``other``, however many such names clients send."""

from __future__ import annotations

import time

import httpx
import openai

from skinflint.config import settings_from_dict
from skinflint.metrics import OTHER, Metrics
from tests.conftest import GatewayFactory


def _value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_unknown_model_names_share_one_series_and_one_memo_entry() -> None:
    metrics = Metrics(known_models=["gpt-4o-mini"])
    for i in range(5000):
        metrics.child(metrics.requests, "chat", f"made-up-{i}", "miss", "200").inc()
        metrics.child(metrics.tokens, f"made-up-{i}", "input").inc(3)
    metrics.child(metrics.requests, "chat", "gpt-4o-mini", "miss", "200").inc()
    requests = dict(endpoint="chat", cache="miss", status="200")
    assert _value(metrics, "skinflint_requests_total", model=OTHER, **requests) == 5000
    assert _value(metrics, "skinflint_requests_total", model="gpt-4o-mini", **requests) == 1
    assert _value(metrics, "skinflint_tokens_total", model=OTHER, kind="input") == 15000
    assert b"made-up" not in metrics.render()
    assert len(metrics._children) == 3  # the memo holds folded label sets only


def test_every_model_label_is_folded_and_no_other_label_is() -> None:
    metrics = Metrics(known_models=[])
    m = metrics
    for metric, labels in (
        (m.cost, ("x",)), (m.unknown_price, ("x",)), (m.counted_usage, ("x",)),
        (m.cascade_escalations, ("x", "format")),
    ):
        metrics.child(metric, *labels).inc()
    metrics.child(m.upstream_errors, "x", "timeout").inc()  # a configured provider's name
    metrics.child(m.requests, "chat", "", "miss", "404").inc()  # no model reached
    assert _value(m, "skinflint_cost_usd_total", model=OTHER) == 1
    assert _value(m, "skinflint_unknown_price_total", model=OTHER) == 1
    assert _value(m, "skinflint_counted_usage_total", model=OTHER) == 1
    assert _value(m, "skinflint_cascade_escalations_total", model=OTHER, reason="format") == 1
    assert _value(m, "skinflint_upstream_errors_total", provider="x", type="timeout") == 1
    assert _value(m, "skinflint_requests_total", endpoint="chat", model="", cache="miss",
                  status="404") == 1


def test_names_learnt_later_are_kept_from_then_on() -> None:
    metrics = Metrics(known_models=["fast"])
    metrics.child(metrics.cost, "gpt-4.1-mini").inc()
    metrics.know(["gpt-4.1-mini"])  # the price catalog has loaded
    metrics.child(metrics.cost, "gpt-4.1-mini").inc()
    assert _value(metrics, "skinflint_cost_usd_total", model=OTHER) == 1
    assert _value(metrics, "skinflint_cost_usd_total", model="gpt-4.1-mini") == 1


def test_without_known_names_every_name_is_kept() -> None:
    metrics = Metrics()
    metrics.child(metrics.cost, "my-model").inc()
    metrics.know(["ignored"])
    assert _value(metrics, "skinflint_cost_usd_total", model="my-model") == 1


def test_configured_names_are_every_model_the_configuration_mentions() -> None:
    settings = settings_from_dict({
        "providers": {"p": {"base_url": "http://127.0.0.1:9"}},
        "default_provider": "p",
        "baseline_model": "gpt-4o",
        "models": {"fast": {"provider": "p", "model": "vendor-fast-v2",
                            "fallbacks": ["slow"]},
                   "slow": {"provider": "p"}},
        "routes": {"auto": {
            "baseline": "premium-x", "pins": {"legal": "pinned-y"}, "default_task": "general",
            "tasks": {"code": {"model": "coder-z"},
                      "general": {"cascade": [{"model": "tier-1"},
                                              {"models": ["vote-a", "vote-b"]}]}}}},
    }, env={})
    assert settings.model_names() == {
        "fast", "vendor-fast-v2", "slow", "auto", "gpt-4o", "premium-x", "pinned-y",
        "coder-z", "tier-1", "vote-a", "vote-b"}


def _wait_ready(root_url: str) -> None:
    deadline = time.monotonic() + 30
    while not httpx.get(root_url + "/health").json()["ready"]:
        assert time.monotonic() < deadline, "the gateway did not finish loading"
        time.sleep(0.05)


def test_the_gateway_counts_names_clients_invent_as_other(make_gateway: GatewayFactory) -> None:
    gw = make_gateway()
    _wait_ready(gw.root_url)
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as client:
        for model in [f"invented-{i}" for i in range(40)] + ["gpt-4o-mini", "gpt-4.1-mini"]:
            client.chat.completions.create(
                model=model, temperature=0, messages=[{"role": "user", "content": model}])
    text = httpx.get(gw.root_url + "/metrics").text
    series = [line for line in text.splitlines() if line.startswith("skinflint_requests_total")]
    assert sorted(series) == [
        'skinflint_requests_total{cache="miss",endpoint="chat",model="gpt-4.1-mini",'
        'status="200"} 1.0',  # not configured, but listed by the price catalog
        'skinflint_requests_total{cache="miss",endpoint="chat",model="gpt-4o-mini",'
        'status="200"} 1.0',
        'skinflint_requests_total{cache="miss",endpoint="chat",model="other",status="200"} 40.0',
    ]
    assert "invented" not in text
