"""Usage counted offline when the provider reports none; admin endpoints behind the admin key."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai

from skinflint.tokens import TokenCounter
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream


def test_missing_usage_is_counted(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    messages = [{"role": "user", "content": "count these tokens for me"}]
    fake.fail_next("no_usage")
    done = client.chat.completions.create(model="gpt-4o", messages=messages, temperature=0)
    assert done.usage is None
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    counter = TokenCounter()
    assert row["input_tokens"] == counter.count_messages("gpt-4o", messages)
    assert row["output_tokens"] == counter.count_text(
        "gpt-4o", done.choices[0].message.content or ""
    )
    assert row["cost_usd"] > 0


def test_missing_usage_in_stream_is_counted(
    client: openai.OpenAI, fake: FakeUpstream, tmp_path: Path
) -> None:
    fake.fail_next("no_usage")
    chunks = list(
        client.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "no usage here"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.usage is None for c in chunks)
    row = ledger_rows(tmp_path / "skinflint.db", expect=1)[-1]
    assert row["input_tokens"] > 0 and row["output_tokens"] > 0


def test_admin_key_guards_admin_endpoints(make_gateway: GatewayFactory) -> None:
    gw = make_gateway(admin_key="admin-secret")
    assert httpx.get(gw.root_url + "/metrics").status_code == 401
    assert (
        httpx.post(gw.root_url + "/api/cache/invalidate", json={"tags": ["a"]}).status_code == 401
    )
    auth = {"authorization": "Bearer admin-secret"}
    assert httpx.get(gw.root_url + "/metrics", headers=auth).status_code == 200
    ok = httpx.post(gw.root_url + "/api/cache/invalidate", json={"tags": ["a"]}, headers=auth)
    assert ok.json() == {"invalidated": 0, "tags": ["a"]}
    assert httpx.get(gw.root_url + "/health").status_code == 200
