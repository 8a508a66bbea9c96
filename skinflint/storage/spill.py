"""Ledger records a shared ledger could not write before shutdown, kept on local disk.

A PostgreSQL ledger that is down when the gateway stops would otherwise lose what it held. It
:meth:`~LedgerSpill.save`\\ s those records to a JSON-lines file, and the next ledger started
with the same path :meth:`~LedgerSpill.load`\\ s them and writes them first. Loading claims the
file by renaming it (``<path>.<pid>.claimed``), so two processes never load the same records;
the claim is deleted once its records are written (:meth:`~LedgerSpill.written`), and a claim
left by a process that died is loaded again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from pathlib import Path

import orjson

from skinflint.models import LedgerRecord

__all__ = ["LedgerSpill"]

log = logging.getLogger("skinflint.storage")

_FIELDS = {f.name for f in dataclasses.fields(LedgerRecord)}
_claimed: set[Path] = set()  # claims this process holds, not yet written


class LedgerSpill:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._claims: list[Path] = []

    def save(self, records: list[LedgerRecord]) -> None:
        """Append ``records`` to the file and sync it to disk."""
        if not records:
            return
        lines = b"".join(orjson.dumps(dataclasses.asdict(r)) + b"\n" for r in records)
        with self.path.open("ab") as f:
            f.write(lines)
            f.flush()
            os.fsync(f.fileno())
        log.warning("ledger: %d records the server could not take are saved in %s; the next "
                    "start writes them", len(records), self.path)

    def load(self) -> list[LedgerRecord]:
        """Claim the saved records (and those of claims whose process is gone) and return
        them, oldest first; they stay on disk until :meth:`written`."""
        claim = self.path.with_name(f"{self.path.name}.{os.getpid()}.claimed")
        with contextlib.suppress(FileNotFoundError):
            self.path.rename(claim)
        orphans = (p for p in self.path.parent.glob(f"{self.path.name}.*.claimed")
                   if p not in _claimed and not _alive(p))
        records: list[LedgerRecord] = []
        for path in sorted(orphans, key=lambda p: p.stat().st_mtime):
            for line in path.read_bytes().splitlines():
                if line.strip():
                    row = orjson.loads(line)
                    records.append(LedgerRecord(**{k: v for k, v in row.items() if k in _FIELDS}))
            self._claims.append(path)
            _claimed.add(path)
        if records:
            log.warning("ledger: %d records saved at an earlier shutdown are written first",
                        len(records))
        return records

    def written(self) -> None:
        """The loaded records are in the ledger: delete their claims."""
        for path in self._claims:
            path.unlink(missing_ok=True)
            _claimed.discard(path)
        self._claims.clear()


def _alive(claim: Path) -> bool:
    """Whether the process that made ``claim`` (``<name>.<pid>.claimed``) still runs."""
    try:
        pid = int(claim.name.rsplit(".", 2)[-2])
    except ValueError:
        return False
    if pid == os.getpid():
        return False  # left by an earlier process that had this pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
