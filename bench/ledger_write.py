"""What the SQLite ledger's writer spends per row, with and without the spend rollups.

Writes the same synthetic rows in batches of ``--batch`` (a busy gateway's 0.2 s flush) into a
fresh file twice: once with the ledger's own insert (rows and rollups), once with the rows
alone, and prints microseconds per row of each.

    python bench/ledger_write.py [--rows 100000] [--batch 200]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from spend_api import synthetic_rows  # beside this script

from skinflint.models import LedgerRecord
from skinflint.storage import ledger as sqlite_ledger
from skinflint.storage.ledger import SQLiteLedger


def _rows_only(ledger: SQLiteLedger) -> Callable[[list[LedgerRecord]], None]:
    conn = ledger._conn  # the writer's connection

    def insert(batch: list[LedgerRecord]) -> None:
        conn.executemany(sqlite_ledger._INSERT, [sqlite_ledger._AS_ROW(r) for r in batch])

    return insert


def per_row_us(rows: list[LedgerRecord], batch: int, rollups: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        ledger = SQLiteLedger(str(Path(tmp) / "l.db"), flush_interval=3600)
        insert = ledger._insert if rollups else _rows_only(ledger)
        start = time.perf_counter()
        for i in range(0, len(rows), batch):
            with ledger._transaction():  # BEGIN IMMEDIATE ... COMMIT
                insert(rows[i:i + batch])
        elapsed = time.perf_counter() - start
        ledger.close()
    return elapsed / len(rows) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--batch", type=int, default=200)
    args = p.parse_args()
    rows = list(synthetic_rows(args.rows, days=1, seed=3))
    before = min(per_row_us(rows, args.batch, rollups=False) for _ in range(2))
    after = min(per_row_us(rows, args.batch, rollups=True) for _ in range(2))
    print(f"{args.rows:,} rows in batches of {args.batch}")
    print(f"rows only:        {before:6.1f} us/row")
    print(f"rows and rollups: {after:6.1f} us/row  (+{after - before:.1f} us, "
          f"x{after / before:.2f})")


if __name__ == "__main__":
    main()
