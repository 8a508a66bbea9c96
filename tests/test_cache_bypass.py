"""A request the cache does not serve says why: the response headers, the ledger, the metrics
and `skinflint cache stats` name one of a few fixed reasons."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from skinflint.cli import main
from skinflint.models import CacheBypass, LedgerRecord
from skinflint.storage.ledger import SQLiteLedger
from tests.conftest import GatewayFactory, ledger_rows

_FEATURES = {"greeting": {"max_temperature": 1}, "legal": {"enabled": False}}


def _ask(c: openai.OpenAI, content: str, **kw: Any) -> Any:
    kw.setdefault("model", "gpt-4o-mini")
    return c.chat.completions.with_raw_response.create(
        messages=[{"role": "user", "content": content}], **kw)


def _cache(resp: Any) -> tuple[str, str | None]:
    return resp.headers["x-skinflint-cache"], resp.headers.get("x-skinflint-cache-reason")


@pytest.fixture
def c(make_gateway: GatewayFactory) -> Any:
    gw = make_gateway(cache={"exact": {"features": _FEATURES}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as client:
        yield client


def test_each_reason_is_told_in_the_response(c: openai.OpenAI) -> None:
    assert _cache(_ask(c, "hi")) == ("bypass", "temperature-unset")  # the SDKs' default
    assert _cache(_ask(c, "hi", temperature=0.9)) == ("bypass", "temperature-above-max")
    assert _cache(_ask(c, "hi", temperature=0, extra_headers={"x-skinflint-cache": "bypass"})) \
        == ("bypass", "client-bypass")
    legal = {"extra_headers": {"x-skinflint-feature": "legal"}, "temperature": 0}
    assert _cache(_ask(c, "hi", **legal)) == ("bypass", "cache-disabled")
    assert _cache(_ask(c, "hi", temperature=0)) == ("miss", None)
    assert _cache(_ask(c, "hi", temperature=0)) == ("hit-exact", None)


def test_a_stream_tells_it_too(c: openai.OpenAI) -> None:
    with c.chat.completions.with_streaming_response.create(
        model="gpt-4o-mini", stream=True, messages=[{"role": "user", "content": "stream"}]
    ) as resp:
        assert _cache(resp) == ("bypass", "temperature-unset")
        assert "".join(resp.iter_lines())  # the stream itself is unchanged


def test_a_feature_opts_in_for_requests_without_a_temperature(c: openai.OpenAI) -> None:
    greeting = {"extra_headers": {"x-skinflint-feature": "greeting"}}
    assert _cache(_ask(c, "hello", **greeting)) == ("miss", None)
    assert _cache(_ask(c, "hello", **greeting)) == ("hit-exact", None)
    assert _cache(_ask(c, "hello", temperature=1.5, **greeting)) == (
        "bypass", "temperature-above-max")


def test_reasons_are_counted_in_the_ledger_stats_and_metrics(
    make_gateway: GatewayFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gw = make_gateway(cache={"exact": {"features": _FEATURES}})
    with openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0) as c:
        for i in range(3):
            _ask(c, f"story {i}")
        _ask(c, "poem", temperature=1.2)
        _ask(c, "fact", temperature=0)
        _ask(c, "fact", temperature=0)
    db = tmp_path / "skinflint.db"
    rows = ledger_rows(db, expect=6)
    assert sorted(r["cache_reason"] for r in rows) == [
        "", "", "temperature-above-max", *["temperature-unset"] * 3]
    metrics = httpx.get(gw.root_url + "/metrics").text
    assert 'skinflint_cache_bypassed_total{reason="temperature-unset"} 3.0' in metrics
    assert main(["cache", "stats", "--db", str(db), "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert (stats["requests"], stats["hits"]) == (6, 1)
    assert stats["bypassed"] == {"temperature-unset": 3, "temperature-above-max": 1,
                                 "client-bypass": 0, "cache-disabled": 0}
    assert main(["cache", "stats", "--db", str(db)]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines()]
    after = rows[rows.index(["bypassed"]) + 1:]
    assert ["temperature-unset", "3"] in after and ["temperature-above-max", "1"] in after


def test_a_ledger_written_before_reasons_gains_the_column(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An existing database keeps its rows; they count as "unrecorded"."""
    db = tmp_path / "old.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE ledger (request_id TEXT, ts REAL, endpoint TEXT,"
                 " strategy TEXT, cache_status TEXT, saved_usd REAL)")
    conn.execute("INSERT INTO ledger VALUES ('old', 1.0, 'chat', 'upstream', 'bypass', 0)")
    conn.commit()
    conn.close()
    assert main(["cache", "stats", "--db", str(db), "--json"]) == 0  # reads it as it is
    assert json.loads(capsys.readouterr().out)["bypassed"]["unrecorded"] == 1
    ledger = SQLiteLedger(str(db))
    ledger.record(LedgerRecord("new", 2.0, cache_status="bypass",
                               cache_reason=CacheBypass.TEMPERATURE_UNSET.value))
    ledger.close()
    assert main(["cache", "stats", "--db", str(db), "--json"]) == 0
    bypassed = json.loads(capsys.readouterr().out)["bypassed"]
    assert (bypassed["unrecorded"], bypassed["temperature-unset"]) == (1, 1)
    ledger = SQLiteLedger(str(db))
    try:
        assert [r.cache_reason for r in ledger.query()] == ["", "temperature-unset"]
    finally:
        ledger.close()
