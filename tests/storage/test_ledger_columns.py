"""A ledger made before the usage columns existed gains them in place, in SQLite and
PostgreSQL: its rows stay, and read as counting none of the new parts."""

from __future__ import annotations

import sqlite3
from dataclasses import fields
from pathlib import Path

from skinflint.models import LedgerRecord
from skinflint.storage.ledger import SQLiteLedger
from tests import pg

NEW = ("cache_write_tokens", "reasoning_tokens", "input_audio_tokens", "output_audio_tokens")
#: The ledger's columns before cache writes, reasoning and audio were recorded.
OLD = [f.name for f in fields(LedgerRecord) if f.name not in NEW]
PG_TYPES = {"str": "TEXT", "float": "DOUBLE PRECISION", "int": "BIGINT",
            "float | None": "DOUBLE PRECISION"}

NEW_ROW = LedgerRecord("new", 2.0, model="claude-3-5-sonnet-latest", input_tokens=30,
                       output_tokens=5, cached_tokens=3, cache_write_tokens=7,
                       reasoning_tokens=2, input_audio_tokens=4, output_audio_tokens=1,
                       cost_usd=0.5)


def old_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute(f"CREATE TABLE ledger ({', '.join(OLD)})")
    conn.execute("INSERT INTO ledger (request_id, ts, model, input_tokens, output_tokens,"
                 " cached_tokens, cost_usd) VALUES ('old', 1.0, 'gpt-4o-mini', 10, 2, 4, 0.25)")
    conn.commit()
    conn.close()


def test_an_old_sqlite_ledger_gains_the_usage_columns(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    old_sqlite(db)
    ledger = SQLiteLedger(str(db), flush_interval=60)
    try:
        ledger.record(NEW_ROW)
        old, new = list(ledger.query())
    finally:
        ledger.close()
    assert new == NEW_ROW
    assert (old.request_id, old.input_tokens, old.cached_tokens) == ("old", 10, 4)
    assert [getattr(old, name) for name in NEW] == [0, 0, 0, 0]
    conn = sqlite3.connect(db)
    try:
        columns = [row[1] for row in conn.execute("PRAGMA table_info(ledger)")]
    finally:
        conn.close()
    assert set(NEW) <= set(columns) and len(columns) == len(fields(LedgerRecord))


def test_an_old_postgres_ledger_gains_the_usage_columns(pg_url: str) -> None:
    psycopg = pg.import_or_skip("psycopg")
    from skinflint.storage.pg_ledger import PostgresLedger

    columns = ", ".join(f'"{f.name}" {PG_TYPES[str(f.type)]}' for f in fields(LedgerRecord)
                        if f.name not in NEW)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(f"CREATE TABLE skinflint_ledger ({columns})")
        conn.execute("INSERT INTO skinflint_ledger (request_id, ts, input_tokens, cached_tokens)"
                     " VALUES ('old', 1.0, 10, 4)")
    ledger = PostgresLedger(pg_url, flush_interval=60)
    try:
        ledger.record(NEW_ROW)
        old, new = list(ledger.query())
    finally:
        ledger.close()
    assert new.cache_write_tokens == 7 and new.reasoning_tokens == 2
    assert (new.input_audio_tokens, new.output_audio_tokens) == (4, 1)
    assert (old.input_tokens, old.cached_tokens) == (10, 4)
    assert [getattr(old, name) for name in NEW] == [0, 0, 0, 0]
