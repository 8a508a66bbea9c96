"""The ledger's spill file: records saved at shutdown are loaded once, by one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from skinflint.models import LedgerRecord
from skinflint.storage.spill import LedgerSpill


def _records(n: int, start: float) -> list[LedgerRecord]:
    return [LedgerRecord(f"r{start + i}", start + i, model="m", cost_usd=None if i else 0.5,
                         similarity=0.97 if i == 1 else None) for i in range(n)]


def test_saved_records_load_once_and_go_when_written(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    LedgerSpill(path).save(_records(2, 1.0))
    LedgerSpill(path).save(_records(1, 5.0))  # a later shutdown appends
    spill = LedgerSpill(path)
    assert spill.load() == _records(2, 1.0) + _records(1, 5.0)
    assert not path.exists()  # claimed
    assert LedgerSpill(path).load() == []  # this process's claim is not loaded twice
    spill.written()
    assert list(tmp_path.iterdir()) == []


def test_a_dead_process_claim_is_loaded_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = tmp_path / f"spill.jsonl.{int(done.stdout)}.claimed"
    live = tmp_path / f"spill.jsonl.{os.getppid()}.claimed"  # the test runner's parent
    LedgerSpill(dead).save(_records(1, 1.0))
    LedgerSpill(live).save(_records(1, 2.0))
    spill = LedgerSpill(path)
    assert spill.load() == _records(1, 1.0)
    spill.written()
    assert sorted(tmp_path.iterdir()) == [live]


def test_fields_the_running_version_lacks_are_ignored(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    path.write_bytes(b'{"request_id": "a", "ts": 1.0, "added_later": 3}\n\n')
    assert LedgerSpill(path).load() == [LedgerRecord("a", 1.0)]
