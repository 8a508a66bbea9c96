"""Two gateway replicas on one PostgreSQL: they share the exact cache, the semantic index
(pgvector) and the ledger. Two replicas on one Redis: they share the exact cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from skinflint.config import settings_from_dict
from skinflint.server.run import BackgroundServer
from skinflint.storage.postgres import PostgresLedger
from tests.conftest import PromptServer, base_config
from tests.fake_upstream import FakeUpstream


def _replicas(fake: FakeUpstream, tmp_path: Path,
              storage: dict[str, str]) -> Iterator[list[BackgroundServer]]:
    servers = []
    for i in range(2):
        config = base_config(fake, tmp_path / f"ledger-{i}.db",
                             cache={"semantic": {"enabled": True, "embedder": "hashing",
                                                 "threshold": 0.75}})
        config["storage"].update(storage)
        settings = settings_from_dict(config, env={})
        servers.append(BackgroundServer(settings, server_class=PromptServer).__enter__())
    yield servers
    for server in servers:
        server.__exit__(None, None, None)


@pytest.fixture
def replicas(fake: FakeUpstream, pg_url: str, tmp_path: Path) -> Iterator[list[BackgroundServer]]:
    yield from _replicas(fake, tmp_path, {"postgres_url": pg_url})


@pytest.fixture
def redis_replicas(fake: FakeUpstream, redis_url: str,
                   tmp_path: Path) -> Iterator[list[BackgroundServer]]:
    yield from _replicas(fake, tmp_path, {"redis_url": redis_url})


def _ask(server: BackgroundServer, text: str, tags: str = "") -> str:
    headers = {"x-skinflint-tags": tags} if tags else {}
    with openai.OpenAI(base_url=server.base_url, api_key="k", max_retries=0) as c:
        raw = c.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", temperature=0, messages=[{"role": "user", "content": text}],
            extra_headers=headers)
        return raw.headers["x-skinflint-cache"]


def test_replicas_share_caches_and_ledger(replicas: list[BackgroundServer], fake: FakeUpstream,
                                          pg_url: str) -> None:
    a, b = replicas
    assert _ask(a, "Show me my recent invoices") == "miss"
    assert _ask(b, "Show me my recent invoices") == "hit-exact"
    assert _ask(b, "show me my recent invoices please") == "hit-semantic"
    assert sum(1 for r in fake.requests if r.path.endswith("/chat/completions")) == 1
    for server in replicas:
        server.__exit__(None, None, None)  # flushes each replica's ledger
    replicas.clear()
    ledger = PostgresLedger(pg_url)
    try:
        rows = list(ledger.query())
    finally:
        ledger.close()
    assert [r.cache_status for r in rows] == ["miss", "hit-exact", "hit-semantic"]


def test_report_reads_the_postgres_ledger(replicas: list[BackgroundServer], pg_url: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from skinflint.cli import main

    _ask(replicas[0], "count me in the shared ledger")
    for server in replicas:
        server.__exit__(None, None, None)
    replicas.clear()
    assert main(["report", "--db", pg_url, "--by", "model", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["requests"] == 1


def test_cache_cli_reads_and_invalidates_postgres(replicas: list[BackgroundServer], pg_url: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from skinflint.cli import main

    with openai.OpenAI(base_url=replicas[0].base_url, api_key="k", max_retries=0) as c:
        for tag in ("user:1", "user:2"):
            for _ in range(2):
                c.chat.completions.create(
                    model="gpt-4o-mini", temperature=0, extra_headers={"x-skinflint-tags": tag},
                    messages=[{"role": "user", "content": f"what do we know about {tag}"}])
        c.chat.completions.create(  # no temperature: not cached, and counted as such
            model="gpt-4o-mini", messages=[{"role": "user", "content": "tell me a story"}])
    for server in replicas:
        server.__exit__(None, None, None)  # flushes the ledger
    replicas.clear()

    def cli(*args: str) -> dict[str, object]:
        assert main(["cache", *args, "--db", pg_url, "--json"]) == 0
        found: dict[str, object] = json.loads(capsys.readouterr().out)
        return found

    stats = cli("stats")
    assert stats["entries"] == 2 and stats["requests"] == 5 and stats["hits"] == 2
    assert stats["semantic_hits"] == 0 and float(stats["saved_usd"]) > 0  # type: ignore[arg-type]
    assert stats["bypassed"] == {"temperature-unset": 1, "client-bypass": 0,
                                 "cache-disabled": 0, "temperature-above-max": 0}
    dropped = cli("invalidate", "--tag", "user:1", "--url", "http://127.0.0.1:9")
    assert dropped["invalidated"] == 1 and dropped["where"] == "postgres"
    assert dropped["running"] is None  # replicas read PostgreSQL directly: none to wait for
    assert cli("stats")["entries"] == 1


def test_replicas_share_the_redis_cache_and_its_invalidation(
    redis_replicas: list[BackgroundServer], fake: FakeUpstream, redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from skinflint.cli import main

    a, b = redis_replicas
    assert _ask(a, "What is on my invoice?", tags="user:7") == "miss"
    assert _ask(b, "What is on my invoice?") == "hit-exact"
    # a replica's semantic index is its own (pgvector shares one), its answers are in Redis
    assert _ask(a, "what is on my invoice please") == "hit-semantic"
    assert _ask(b, "Something else", tags="user:8") == "miss"
    reply = httpx.post(f"{b.root_url}/api/cache/invalidate", json={"tags": ["user:7"]}, timeout=5)
    assert reply.json() == {"invalidated": 1, "tags": ["user:7"]}
    assert _ask(a, "What is on my invoice?") == "miss"  # no replica kept a private copy
    assert sum(1 for r in fake.requests if r.path.endswith("/chat/completions")) == 3

    def cli(*args: str) -> dict[str, object]:
        assert main(["cache", *args, "--db", redis_url, "--json"]) == 0
        found: dict[str, object] = json.loads(capsys.readouterr().out)
        return found

    assert cli("stats")["entries"] == 2
    dropped = cli("invalidate", "--tag", "user:8", "--url", "http://127.0.0.1:9")
    assert dropped["invalidated"] == 1 and dropped["where"] == "redis"
    assert cli("stats")["entries"] == 1
