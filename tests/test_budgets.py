"""Budgets end to end: the real gateway in front of the fake upstream, the official SDK or
raw HTTP as the client."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory
from tests.fake_upstream import FakeUpstream
from tests.storage.test_ledger_durability import locked

MSG = [{"role": "user", "content": "hello there"}]


def _budget(**fields: Any) -> dict[str, Any]:
    return {"name": "b", "window": "day", "limit": {"requests": 10}, **fields}


def _client(gw: BackgroundServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0, timeout=10)


def _rows(gw: BackgroundServer, headers: dict[str, str] | None = None) -> list[dict[str, Any]]:
    r = httpx.get(f"{gw.root_url}/api/budgets", headers=headers or {})
    assert r.status_code == 200, r.text
    data: list[dict[str, Any]] = r.json()["data"]
    return data


def _row(gw: BackgroundServer, name: str = "b") -> dict[str, Any]:
    (found,) = [r for r in _rows(gw) if r["name"] == name]
    return found


async def _burst(url: str, n: int) -> list[int]:
    body = {"model": "gpt-4o-mini", "messages": MSG}
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=30, limits=limits) as http:
        replies = await asyncio.gather(
            *(http.post(f"{url}/chat/completions", json=body) for _ in range(n)))
    return [r.status_code for r in replies]


def test_200_concurrent_requests_against_10_admit_exactly_10(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(budgets=[_budget(name="ten", per="global")])
    statuses = asyncio.run(_burst(gw.base_url, 200))
    assert statuses.count(200) == 10
    assert statuses.count(429) == 190
    row = _row(gw, "ten")
    assert row["spent"]["requests"] == 10 and row["reserved"]["requests"] == 0
    assert row["remaining"] == {"requests": 0}


def test_a_blocked_request_is_a_429_in_the_openai_shape_with_retry_after(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(budgets=[_budget(name="search-daily", per="feature", match="search",
                                       limit={"requests": 1})])
    search = {"x-skinflint-feature": "search"}
    with _client(gw) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG, extra_headers=search)
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                           extra_headers=search)
        # another feature is not counted by this budget
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG,
                                       extra_headers={"x-skinflint-feature": "chat"})
    response = caught.value.response
    error = response.json()["error"]
    assert response.status_code == 429
    assert error["type"] == "budget_exceeded" and "search-daily" in error["message"]
    now = time.gmtime()
    to_midnight = 86400 - (now.tm_hour * 3600 + now.tm_min * 60 + now.tm_sec)
    assert abs(int(response.headers["retry-after"]) - to_midnight) <= 5
    assert response.headers["x-skinflint-request-id"]


def test_usd_is_reserved_while_in_flight_then_settled_to_the_real_cost(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(budgets=[_budget(limit={"usd": 1.0})])
    slow = [{"role": "user", "content": "slow [[fault:delay=1.5]]"}]
    done: list[Any] = []
    with _client(gw) as client:
        call = threading.Thread(target=lambda: done.append(
            client.chat.completions.with_raw_response.create(
                model="gpt-4o", messages=slow, max_tokens=1000)))
        call.start()
        deadline = time.monotonic() + 5
        during = _row(gw)
        while during["reserved"]["requests"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            during = _row(gw)
        call.join()
    # gpt-4o: $2.50 in, $10 out per million; 1000 output tokens alone reserve $0.01
    assert during["reserved"]["usd"] >= 0.01 and during["reserved"]["requests"] == 1
    cost = float(done[0].headers["x-skinflint-cost-usd"])
    after = _row(gw)
    assert after["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}
    assert after["spent"]["usd"] == pytest.approx(cost) and cost > 0
    assert after["spent"]["requests"] == 1 and after["spent"]["tokens"] > 0


def test_worst_case_reservation_blocks_what_could_pass_the_limit(
    make_gateway: GatewayFactory,
) -> None:
    # 2000 output tokens of gpt-4o may cost $0.02: more than the $0.01 left
    gw = make_gateway(budgets=[_budget(limit={"usd": 0.01})])
    with _client(gw) as client:
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=2000)
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=100)
    assert _row(gw)["spent"]["requests"] == 1


def test_a_failed_request_releases_its_reservation(
    make_gateway: GatewayFactory, fake: FakeUpstream,
) -> None:
    gw = make_gateway(budgets=[_budget(limit={"usd": 1.0, "tokens": 100_000})])
    fake.fail_next("status", times=3, status=500)
    with _client(gw) as client, pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model="gpt-4o", messages=MSG, max_tokens=500)
    row = _row(gw)
    assert row["reserved"] == {"usd": 0, "requests": 0, "tokens": 0}
    assert row["spent"] == {"usd": 0, "requests": 1, "tokens": 0}


def test_a_stream_settles_when_it_ends(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(budgets=[_budget(limit={"usd": 1.0})])
    with _client(gw) as client:
        chunks = list(client.chat.completions.create(model="gpt-4o", messages=MSG, stream=True))
    assert chunks
    row = _row(gw)
    assert row["reserved"]["usd"] == 0 and row["spent"]["usd"] > 0


def test_a_cache_hit_costs_nothing_and_counts_as_a_request(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(budgets=[_budget(limit={"usd": 1.0, "requests": 5})])
    with _client(gw) as client:
        first = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MSG, temperature=0)
        second = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MSG, temperature=0)
    assert second.headers["x-skinflint-cache"] == "hit-exact"
    row = _row(gw)
    assert row["spent"]["usd"] == pytest.approx(float(first.headers["x-skinflint-cost-usd"]))
    assert row["spent"]["requests"] == 2


def test_downgrade_sends_the_request_to_the_named_model_and_says_so(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(budgets=[_budget(name="bulk-daily", per="feature", match="bulk",
                                       limit={"requests": 1}, action="downgrade",
                                       downgrade_to="cheap")])
    bulk = {"x-skinflint-feature": "bulk"}
    with _client(gw) as client:
        first = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MSG, extra_headers=bulk)
        second = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MSG, extra_headers=bulk)
    assert first.headers["x-skinflint-model"] == "gpt-4o"
    assert first.headers["x-skinflint-route"] == "gpt-4o"
    assert second.headers["x-skinflint-model"] == "qwen3-8b"
    assert second.headers["x-skinflint-route"] == "cheap;downgrade=bulk-daily"
    assert second.parse().model == "qwen3-8b"


def test_alert_only_alerts(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(budgets=[_budget(name="watch", limit={"requests": 2}, action="alert",
                                       alert_at=[0.5, 1.0])])
    with _client(gw) as client:
        for _ in range(3):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    metrics = httpx.get(f"{gw.root_url}/metrics").text
    assert 'skinflint_budget_alerts_total{at="0.5",budget="watch"} 1.0' in metrics
    assert 'skinflint_budget_alerts_total{at="1",budget="watch"} 1.0' in metrics
    assert 'skinflint_budget_amount{budget="watch",kind="spent",unit="requests"} 3.0' in metrics
    assert 'skinflint_budget_used_ratio{budget="watch"} 1.5' in metrics
    assert _row(gw, "watch")["spent"]["requests"] == 3


def test_per_user_budgets_count_each_user_apart_and_need_the_admin_key(
    make_gateway: GatewayFactory,
) -> None:
    gw = make_gateway(budgets=[_budget(name="per-user", per="user", window="hour",
                                       limit={"requests": 1})],
                      admin_key="admin-secret")
    with _client(gw) as client:
        for user in ("ann", "bob"):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, user=user)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MSG, user="ann")
    assert httpx.get(f"{gw.root_url}/api/budgets").status_code == 401
    rows = _rows(gw, {"authorization": "Bearer admin-secret"})
    assert sorted((r["subject"], r["spent"]["requests"]) for r in rows) == [("ann", 1),
                                                                           ("bob", 1)]
    assert all(r["window"] == "hour" and r["window_end"].endswith(":00:00Z") for r in rows)


def test_budgets_command_without_budgets(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    from skinflint.cli import main

    monkeypatch.delenv("SKINFLINT_CONFIG", raising=False)
    assert main(["budgets", "--json"]) == 0
    assert capsys.readouterr().out.strip() == "[]"
    assert main(["budgets"]) == 0
    assert "no budgets configured" in capsys.readouterr().out


def test_budgets_that_cannot_be_checked_refuse_with_503_and_count_what_was_spent(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
) -> None:
    """Another process holds the SQLite file's write lock past the busy timeout (5 s): the
    request is refused with an OpenAI-shaped 503 before any upstream call, and what an earlier
    request spent is counted once the lock goes."""
    gw = make_gateway(budgets=[_budget(per="global")])
    with _client(gw) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
        with locked(tmp_path / "skinflint.db"):
            with pytest.raises(openai.InternalServerError) as refused:
                client.chat.completions.create(model="gpt-4o-mini", messages=MSG)
    assert refused.value.status_code == 503
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "budget_store_unavailable"  # type: ignore[index]
    assert len(fake.requests) == 1
    row = _row(gw)
    assert row["spent"]["requests"] == 1 and row["reserved"]["requests"] == 0
