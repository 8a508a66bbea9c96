"""Ledger records the ledger's database could not take, kept on local disk.

A ledger whose database refuses writes (a PostgreSQL server down, a SQLite file locked by
another process or on a full disk) would otherwise lose what it held when it holds too much, or
when the gateway stops. Its writer (:mod:`skinflint.storage.ledger_writer`)
:meth:`~LedgerSpill.save`\\ s those records to a JSON-lines file, then
:meth:`~LedgerSpill.load`\\ s them and writes them first once the database takes writes again;
the next ledger started with the same path does so when it starts.

Several processes may share the path (``skinflint serve --workers N``), so every file is taken
by an atomic rename before it is read: loading renames the file, and any claim left by a process
of this host that is gone, to a claim of this process (``<path>.<host>.<pid>.<token>.claimed``),
and only the process whose rename succeeded reads it. A claim is deleted once its records are in
the ledger (:meth:`~LedgerSpill.written`) or saved again with the records still held
(:meth:`~LedgerSpill.save`), so no record is written twice. Claims of other hosts are left
alone: whether their process still runs cannot be told from here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import secrets
import socket
from pathlib import Path

import orjson

from skinflint.models import LedgerRecord

__all__ = ["SPILL_NAME", "LedgerSpill"]

SPILL_NAME = "skinflint-ledger-spill.jsonl"  # the file's name, beside the SQLite database

log = logging.getLogger("skinflint.storage")

_NAMES = [f.name for f in dataclasses.fields(LedgerRecord)]  # in the order orjson writes them
_FIELDS = set(_NAMES)
_HOST = socket.gethostname().replace(".", "-")
_held: set[Path] = set()  # claims this process holds, not yet written or saved again


class LedgerSpill:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._claims: list[Path] = []

    def save(self, records: list[LedgerRecord]) -> None:
        """Append ``records`` (every record still held, loaded ones included) to the file,
        sync it to disk, and drop this process's claims, whose records are now in the file.
        Raises OSError when the file cannot be written (then it is left as it was)."""
        if records:
            # orjson writes a dataclass as an object natively, ten times faster than asdict
            lines = b"".join(orjson.dumps(r) + b"\n" for r in records)
            with self.path.open("ab", buffering=0) as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # other workers may save at the same moment
                size = f.seek(0, os.SEEK_END)
                try:
                    view = memoryview(lines)
                    while view:
                        view = view[f.write(view):]
                    os.fsync(f.fileno())
                except OSError:  # a full disk: no partial save, whose lines would be written
                    f.truncate(size)  # twice (the caller still holds them)
                    raise
            log.warning("ledger: %d records the database could not take are saved in %s; they "
                        "are written first when it does, at the latest at the next start",
                        len(records), self.path)
        self.written()

    def load(self) -> list[LedgerRecord]:
        """Claim the saved records (and those of this host's claims whose process is gone) and
        return them, oldest first; their files stay on disk until :meth:`written` or
        :meth:`save`. A line that cannot be read is skipped and logged; loading never fails."""
        sources = [self.path]
        with contextlib.suppress(OSError):
            sources += sorted(p for p in self.path.parent.glob(f"{self.path.name}.*.claimed")
                              if _orphaned(p))
        records: list[LedgerRecord] = []
        for source in sources:
            claim = self.path.with_name(
                f"{self.path.name}.{_HOST}.{os.getpid()}.{secrets.token_hex(4)}.claimed")
            try:
                source.rename(claim)  # atomic: of several processes, one gets the file
                data = claim.read_bytes()
            except OSError:
                continue
            self._claims.append(claim)
            _held.add(claim)
            records += _parse(data, claim)
        if records:
            log.warning("ledger: %d records saved in the spill file are written first",
                        len(records))
        return records

    def written(self) -> None:
        """The loaded records are in the ledger: delete their claims."""
        for path in self._claims:
            path.unlink(missing_ok=True)
            _held.discard(path)
        self._claims.clear()


def _parse(data: bytes, path: Path) -> list[LedgerRecord]:
    records, bad = [], 0
    for line in data.splitlines():
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
            if list(row) == _NAMES:  # written by this version: twice as fast
                records.append(LedgerRecord(*row.values()))
            else:
                records.append(LedgerRecord(**{k: v for k, v in row.items() if k in _FIELDS}))
        except (orjson.JSONDecodeError, TypeError, AttributeError):
            bad += 1  # a line cut short by a crash or a full disk
    if bad:
        log.error("ledger: %d unreadable lines in %s skipped", bad, path)
    return records


def _orphaned(claim: Path) -> bool:
    """Whether ``claim`` (``<name>.<host>.<pid>.<token>.claimed``) was made on this host by a
    process that no longer runs."""
    parts = claim.name.rsplit(".", 4)
    if len(parts) != 5 or parts[1] != _HOST or not parts[2].isdigit() or claim in _held:
        return False
    pid = int(parts[2])
    if pid == os.getpid():
        return True  # not one this process holds: an earlier process had the same pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
