"""The SQLite ledger keeps every record the database refuses for a while: locked by another
process past its busy timeout, or on a full disk. Records are held (in memory, then in the spill
file), written once the database takes writes again, in order, and never dropped."""

from __future__ import annotations

import contextlib
import errno
import logging
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from skinflint.models import LedgerRecord
from skinflint.storage.ledger import SQLiteLedger
from skinflint.storage.spill import SPILL_NAME, LedgerSpill
from tests.conftest import GatewayFactory, ledger_rows
from tests.fake_upstream import FakeUpstream


def fast_ledger(db: Path, *, max_held: int = 100_000) -> SQLiteLedger:
    """A ledger that gives up on a lock after 0.1 s and retries within 0.2 s, its spill file
    beside the database."""
    return SQLiteLedger(str(db), spill=db.parent / SPILL_NAME, max_held=max_held,
                        flush_interval=0.02, busy_timeout=0.1, retry=(0.05, 0.2))


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """Another process holds the database's write lock, as a ``sqlite3`` session in a write
    transaction does, until the block ends."""
    code = ("import sqlite3, sys; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
            "c.execute('BEGIN IMMEDIATE'); print('locked', flush=True); sys.stdin.read(); "
            "c.execute('COMMIT')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdin is not None and proc.stdout is not None
    try:
        assert proc.stdout.readline() == "locked\n"
        yield
    finally:
        proc.stdin.close()
        proc.wait(timeout=10)
        proc.stdout.close()


def record_ids(db: Path) -> list[str]:
    """The request ids in the ledger, in the order they were written."""
    conn = sqlite3.connect(db)
    try:
        return [r[0] for r in conn.execute("SELECT request_id FROM ledger ORDER BY rowid")]
    finally:
        conn.close()


def wait_for_ids(db: Path, n: int, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(ids := record_ids(db)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return ids


def records(n: int, start: int = 0) -> list[LedgerRecord]:
    return [LedgerRecord(f"req-{i:05d}", 1_700_000_000.0 + i, model="gpt-4o-mini",
                         cost_usd=0.001, feature="x" * 100) for i in range(start, start + n)]


def spill_files(directory: Path) -> list[Path]:
    return sorted(directory.glob(f"{SPILL_NAME}*"))


def test_a_lock_held_past_the_busy_timeout_loses_no_record(tmp_path: Path) -> None:
    db = tmp_path / "skinflint.db"
    ledger = fast_ledger(db)
    try:
        with locked(db):
            for r in records(300):
                ledger.record(r)
            time.sleep(0.6)  # several writes fail, each after the busy timeout
            assert record_ids(db) == []
            assert ledger.held == 300
        assert wait_for_ids(db, 300, timeout=5) == [r.request_id for r in records(300)]
        assert ledger.held == 0
    finally:
        ledger.close()
    assert record_ids(db) == [r.request_id for r in records(300)]  # nothing written twice


def test_past_max_held_records_wait_in_the_spill_file_then_are_written_first(
    tmp_path: Path,
) -> None:
    db, spill = tmp_path / "skinflint.db", tmp_path / SPILL_NAME
    ledger = fast_ledger(db, max_held=50)
    try:
        with locked(db):
            for r in records(120):
                ledger.record(r)
            deadline = time.monotonic() + 5
            while ledger.held and time.monotonic() < deadline:
                time.sleep(0.02)
            assert ledger.held == 0  # past 50 held, all 120 went to disk
            assert len(spill.read_bytes().splitlines()) == 120
            for r in records(30, start=120):
                ledger.record(r)
            time.sleep(0.3)
            assert ledger.held == 30  # under the bound: kept in memory
        ids = wait_for_ids(db, 150, timeout=5)
        assert ids == [r.request_id for r in records(150)]  # the spilled ones first, in order
        assert spill_files(tmp_path) == []
    finally:
        ledger.close()


def test_close_while_locked_saves_what_is_held_and_the_next_start_writes_it(
    tmp_path: Path,
) -> None:
    db, spill = tmp_path / "skinflint.db", tmp_path / SPILL_NAME
    ledger = fast_ledger(db)
    with locked(db):
        for r in records(40):
            ledger.record(r)
        started = time.monotonic()
        ledger.close()
        assert time.monotonic() - started < 2  # bounded, though the lock is still held
        assert len(spill.read_bytes().splitlines()) == 40
    # A long flush interval: the records are written by the constructor, not by the thread.
    ledger = SQLiteLedger(str(db), spill=spill, flush_interval=60)
    try:
        assert record_ids(db) == [r.request_id for r in records(40)]
        assert spill_files(tmp_path) == []
    finally:
        ledger.close()
    assert record_ids(db) == [r.request_id for r in records(40)]


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path`` (needs root; skips where mounting is not allowed)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, check=False)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def fill(disk: Path) -> Path:
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_holds_records_until_space_returns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """The spill file is on the same full disk: past ``max_held``, records stay in memory and
    the failure to save them is logged with their count."""
    with small_disk(tmp_path / "disk", "1m") as disk:
        db = disk / "skinflint.db"
        ledger = fast_ledger(db, max_held=100)
        try:
            filler = fill(disk)
            with caplog.at_level(logging.WARNING, logger="skinflint.storage"):
                for r in records(400):
                    ledger.record(r)
                time.sleep(0.6)
            assert record_ids(db) == []
            assert ledger.held == 400
            assert "400 records stay in memory" in caplog.text
            assert sum(p.stat().st_size for p in spill_files(disk)) == 0  # no partial save
            filler.unlink()
            assert wait_for_ids(db, 400, timeout=5) == [r.request_id for r in records(400)]
        finally:
            ledger.close()
        assert len(record_ids(db)) == 400


def test_through_the_gateway_a_16s_lock_loses_no_paid_call(
    make_gateway: GatewayFactory, fake: FakeUpstream, tmp_path: Path,
) -> None:
    """SLOW (~17 s), on purpose: the realistic case, with the default settings. A backup or a
    ``sqlite3`` session holds the ledger's lock for 16 s, three times the 5 s busy timeout,
    while clients keep calling; every upstream call must have its row once the lock goes."""
    gateway = make_gateway()
    db = tmp_path / "skinflint.db"
    with openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0, timeout=10) as c:
        c.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "0"}])
        assert len(ledger_rows(db, expect=1)) == 1
        with locked(db):
            held_until = time.monotonic() + 16
            sent = 0
            while time.monotonic() < held_until:
                c.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": f"q {sent}"}])
                sent += 1
                time.sleep(0.1)
            assert len(ledger_rows(db)) == 1
        released = time.monotonic()
        rows = ledger_rows(db, expect=len(fake.requests), wait=10)
        drained = time.monotonic() - released
    assert len(fake.requests) == sent + 1
    assert len(rows) == len(fake.requests)
    assert drained < 6  # the writer is waiting on the lock, or retries within 5 s


def test_the_gateway_writes_a_spilled_ledger_before_it_serves(
    make_gateway: GatewayFactory, tmp_path: Path,
) -> None:
    """What an earlier gateway saved beside the database is in the ledger once the gateway is
    up, before any request (the spill file uses the PostgreSQL ledger's name)."""
    db = tmp_path / "skinflint.db"
    SQLiteLedger(str(db)).close()  # an earlier gateway's file
    LedgerSpill(tmp_path / SPILL_NAME).save(records(25))
    make_gateway()
    assert record_ids(db) == [r.request_id for r in records(25)]
    assert spill_files(tmp_path) == []


def test_with_no_spill_file_the_oldest_records_past_max_held_are_dropped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """Library use with no spill file: memory stays bounded, and the loss is logged."""
    db = tmp_path / "skinflint.db"
    ledger = SQLiteLedger(str(db), max_held=5, flush_interval=0.02, busy_timeout=0.1,
                          retry=(0.05, 0.2))
    try:
        with locked(db), caplog.at_level(logging.ERROR, logger="skinflint.storage"):
            for r in records(10):
                ledger.record(r)
            time.sleep(0.4)
            assert ledger.held == 5
            assert "dropped the 5 oldest held records" in caplog.text
        assert wait_for_ids(db, 5) == [r.request_id for r in records(10)[5:]]
    finally:
        ledger.close()
