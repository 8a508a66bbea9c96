"""Identical requests arriving together reach the upstream once, through the real HTTP path."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest

from skinflint.server.run import BackgroundServer
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream

SLOW = "what is skinflint? [[fault:delay=0.6]]"
KEYS = [{"tenant": "acme", "key": "gw-key-acme"}, {"tenant": "globex", "key": "gw-key-globex"}]


def _calls(fake: FakeUpstream) -> int:
    return len(fake.calls())


def _client(gw: BackgroundServer, key: str = "client-key") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=key, max_retries=0, timeout=60)


async def _ask(c: openai.AsyncOpenAI, content: str = SLOW, **kw: Any) -> Any:
    return await c.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": content}], **kw
    )


async def _stream(c: openai.AsyncOpenAI) -> str:
    stream = await c.chat.completions.create(
        model="gpt-4o-mini", temperature=0, stream=True,
        messages=[{"role": "user", "content": SLOW}],
    )
    return "".join([chunk.choices[0].delta.content or "" async for chunk in stream
                    if chunk.choices])


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(2) as p:
        yield p


def _sync_ask(gw: BackgroundServer, content: str = SLOW, **kw: Any) -> Any:
    with openai.OpenAI(base_url=gw.base_url, api_key="client-key", max_retries=0,
                       timeout=60) as c:
        return c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": content}],
            **kw)


def _in_flight(pool: ThreadPoolExecutor, gw: BackgroundServer, fake: FakeUpstream) -> Future[Any]:
    """Start a slow request and return once it has reached the upstream."""
    first = pool.submit(_sync_ask, gw)
    deadline = time.monotonic() + 10
    while _calls(fake) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    return first


async def test_concurrent_identical_requests_reach_the_upstream_once(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    n = 500
    async with _client(make_gateway()) as c:
        replies = await asyncio.gather(*(_ask(c) for _ in range(n)))
    assert _calls(fake) == 1
    assert len({r.parse().choices[0].message.content for r in replies}) == 1
    statuses = sorted(r.headers["x-skinflint-cache"] for r in replies)
    assert statuses == ["hit-exact"] * (n - 1) + ["miss"]
    rows = ledger_rows(tmp_path / "skinflint.db", expect=n)
    hits = [r for r in rows if r["cache_status"] == "hit-exact"]
    assert len(rows) == n and len(hits) == n - 1
    assert all(r["strategy"] == "exact_cache" and r["cost_usd"] == 0 for r in hits)


async def test_concurrent_identical_streams_reach_the_upstream_once(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    n = 30
    async with _client(make_gateway()) as c:
        texts = await asyncio.gather(*(_stream(c) for _ in range(n)))
    assert _calls(fake) == 1
    assert len(set(texts)) == 1 and texts[0]
    rows = ledger_rows(tmp_path / "skinflint.db", expect=n)
    assert sorted(r["cache_status"] for r in rows) == ["hit-exact"] * (n - 1) + ["miss"]


async def test_a_failed_leader_hands_over_to_one_waiter(
    make_gateway: GatewayFactory, fake: FakeUpstream
) -> None:
    """The first call fails: one waiter goes upstream in its place, and the rest are served
    its answer; nobody hangs."""
    fake.fail_next("status=500,delay=0.5")
    n = 20
    async with _client(make_gateway(fake_opts={"max_retries": 0})) as c:
        replies = await asyncio.gather(*(_ask(c) for _ in range(n)), return_exceptions=True)
    failed = [r for r in replies if isinstance(r, openai.InternalServerError)]
    answered = [r for r in replies if not isinstance(r, BaseException)]
    assert len(failed) == 1 and len(answered) == n - 1
    assert _calls(fake) == 2
    assert sorted(r.headers["x-skinflint-cache"] for r in answered) == (
        ["hit-exact"] * (n - 2) + ["miss"])


async def test_a_leader_whose_client_leaves_hands_over(
    make_gateway: GatewayFactory, fake: FakeUpstream
) -> None:
    """The first client gives up while its call is on its way: the gateway abandons that call,
    and a request waiting for it goes upstream at once rather than at the timeout."""
    gw = make_gateway()
    fake.fail_next("delay=3")  # the first call only
    async with _client(gw) as c, openai.AsyncOpenAI(
        base_url=gw.base_url, api_key="k", max_retries=0, timeout=0.5
    ) as impatient:
        leaving = asyncio.ensure_future(_ask(impatient))
        while _calls(fake) < 1:
            await asyncio.sleep(0.01)
        started = time.monotonic()
        reply = await _ask(c)
        assert time.monotonic() - started < 2.5
        with pytest.raises(openai.APITimeoutError):
            await leaving
    assert reply.headers["x-skinflint-cache"] == "miss"
    assert _calls(fake) == 2


async def test_an_answer_that_cannot_be_stored_sends_waiters_upstream_together(
    make_gateway: GatewayFactory, fake: FakeUpstream
) -> None:
    """A cut-off answer (finish_reason "length") is not stored: the waiters all go upstream
    at once rather than one after another."""
    n = 5
    async with _client(make_gateway()) as c:
        started = time.monotonic()
        replies = await asyncio.gather(
            *(_ask(c, SLOW + " [[fault:length]]") for _ in range(n)))
        elapsed = time.monotonic() - started
    assert all(r.headers["x-skinflint-cache"] == "miss" for r in replies)
    assert _calls(fake) == n
    assert elapsed < 0.6 * n  # two rounds of 0.6 s, not five


def test_waiting_is_bounded_by_the_timeout(
    make_gateway: GatewayFactory, fake: FakeUpstream, pool: ThreadPoolExecutor
) -> None:
    gw = make_gateway(cache={"exact": {"coalesce_timeout_seconds": 0.1}})
    first = _in_flight(pool, gw, fake)
    second = _sync_ask(gw)
    assert second.headers["x-skinflint-cache"] == "miss"
    assert _calls(fake) == 2
    assert first.result().headers["x-skinflint-cache"] == "miss"


def test_a_zero_timeout_turns_coalescing_off(
    make_gateway: GatewayFactory, fake: FakeUpstream, pool: ThreadPoolExecutor
) -> None:
    gw = make_gateway(cache={"exact": {"coalesce_timeout_seconds": 0}})
    first = _in_flight(pool, gw, fake)
    assert _sync_ask(gw).headers["x-skinflint-cache"] == "miss"
    first.result()
    assert _calls(fake) == 2


def test_a_request_waits_for_the_identical_one_in_flight(
    make_gateway: GatewayFactory, fake: FakeUpstream, pool: ThreadPoolExecutor
) -> None:
    gw = make_gateway()
    first = _in_flight(pool, gw, fake)
    second = _sync_ask(gw)
    assert second.headers["x-skinflint-cache"] == "hit-exact"
    assert first.result().headers["x-skinflint-cache"] == "miss"
    assert _calls(fake) == 1


@pytest.mark.parametrize("mode", ["bypass", "refresh"])
def test_bypass_and_refresh_never_wait(
    make_gateway: GatewayFactory, fake: FakeUpstream, pool: ThreadPoolExecutor, mode: str
) -> None:
    gw = make_gateway()
    fake.fail_next("delay=1.5")  # the first call only
    first = _in_flight(pool, gw, fake)
    second = _sync_ask(gw, extra_headers={"x-skinflint-cache": mode})
    assert not first.done()  # answered while the first was still on its way
    assert second.headers["x-skinflint-cache"] == ("bypass" if mode == "bypass" else "miss")
    assert _calls(fake) == 2
    first.result()


async def test_different_tenants_never_wait_for_each_other(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path
) -> None:
    gw = make_gateway(keys=KEYS)
    async with _client(gw, "gw-key-acme") as acme, _client(gw, "gw-key-globex") as globex:
        replies = await asyncio.gather(*(_ask(c) for c in (acme, globex) for _ in range(5)))
    assert _calls(fake) == 2
    rows = ledger_rows(tmp_path / "skinflint.db", expect=10)
    misses = sorted(r["tenant"] for r in rows if r["cache_status"] == "miss")
    assert misses == ["acme", "globex"]
    assert len(replies) == 10
