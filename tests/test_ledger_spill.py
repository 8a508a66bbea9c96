"""The ledger's spill file: records saved at shutdown are loaded once, by one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from skinflint.models import LedgerRecord
from skinflint.storage import spill as spill_module
from skinflint.storage.spill import LedgerSpill


def _records(n: int, start: float) -> list[LedgerRecord]:
    return [LedgerRecord(f"r{start + i}", start + i, model="m", cost_usd=None if i else 0.5,
                         similarity=0.97 if i == 1 else None) for i in range(n)]


def _claim(tmp_path: Path, host: str, pid: int) -> Path:
    return tmp_path / f"spill.jsonl.{host}.{pid}.0000.claimed"


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_saved_records_load_once_and_go_when_written(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    LedgerSpill(path).save(_records(2, 1.0))
    LedgerSpill(path).save(_records(1, 5.0))  # a later shutdown appends
    spill = LedgerSpill(path)
    assert spill.load() == _records(2, 1.0) + _records(1, 5.0)
    assert not path.exists()  # claimed
    assert LedgerSpill(path).load() == []  # a claim this process holds is not loaded twice
    spill.written()
    assert list(tmp_path.iterdir()) == []


def test_records_loaded_then_saved_again_are_not_duplicated(tmp_path: Path) -> None:
    """The server is still down at the next shutdown: the loaded records are saved with the
    new ones, and their old claim goes, so the start after that loads each record once."""
    path = tmp_path / "spill.jsonl"
    LedgerSpill(path).save(_records(2, 1.0))
    spill = LedgerSpill(path)
    held = spill.load() + _records(1, 9.0)
    spill.save(held)
    assert LedgerSpill(path).load() == _records(2, 1.0) + _records(1, 9.0)


def test_only_claims_of_gone_processes_of_this_host_are_taken(tmp_path: Path) -> None:
    host = spill_module._HOST
    dead, live = _claim(tmp_path, host, _dead_pid()), _claim(tmp_path, host, os.getppid())
    elsewhere = _claim(tmp_path, "another-host", _dead_pid())
    for i, claim in enumerate((dead, live, elsewhere)):
        LedgerSpill(claim).save(_records(1, float(i)))  # written as a spill file is
    spill = LedgerSpill(tmp_path / "spill.jsonl")
    assert spill.load() == _records(1, 0.0)
    spill.written()
    assert sorted(tmp_path.iterdir()) == sorted([live, elsewhere])


def test_unreadable_lines_are_skipped(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    path.write_bytes(b'{"request_id": "a", "ts": 1.0, "added_later": 3}\n\n'
                     b'{"request_id": "b", "ts"\n[1, 2]\n')  # cut short; not an object
    assert LedgerSpill(path).load() == [LedgerRecord("a", 1.0)]


def test_workers_starting_together_load_each_record_once(tmp_path: Path) -> None:
    path = tmp_path / "spill.jsonl"
    LedgerSpill(path).save(_records(50, 1.0))
    dead = _claim(tmp_path, spill_module._HOST, _dead_pid())
    dead.write_bytes(b'{"request_id": "orphan", "ts": 0.5}\n')
    # Each worker writes what it loaded (here: drops its claim) before it exits; a worker that
    # died without writing would leave its claim to be loaded again, as it should.
    code = ("import sys; from skinflint.storage.spill import LedgerSpill; "
            "s = LedgerSpill(sys.argv[1]); print(len(s.load())); s.written()")
    workers = [subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE,
                                text=True) for _ in range(4)]
    loaded = [int(w.communicate(timeout=60)[0]) for w in workers]
    assert sum(loaded) == 51
