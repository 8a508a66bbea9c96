"""The ledger export: one JSON object per line per ledger row, every
:class:`~skinflint.models.LedgerRecord` field by name plus ``"kind": "skinflint.ledger"``, which
``skinflint report --export`` writes and ``skinflint audit`` reads back."""

from __future__ import annotations

import contextlib
import gzip
import sys
from collections.abc import Iterable, Iterator
from dataclasses import fields
from typing import BinaryIO

import orjson

from skinflint.models import LedgerRecord

__all__ = ["EXPORT_KIND", "export_lines", "write_export"]

EXPORT_KIND = "skinflint.ledger"
_NAMES = [f.name for f in fields(LedgerRecord)]


def export_lines(records: Iterable[LedgerRecord]) -> Iterator[bytes]:
    """Each record as one line of JSON, newline included."""
    for r in records:
        row = {name: getattr(r, name) for name in _NAMES}
        row["kind"] = EXPORT_KIND
        yield orjson.dumps(row) + b"\n"


@contextlib.contextmanager
def _target(path: str) -> Iterator[BinaryIO]:
    if path == "-":
        sys.stdout.flush()
        yield sys.stdout.buffer
        sys.stdout.buffer.flush()
    elif path.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            yield f  # type: ignore[misc]  # a GzipFile is a binary file
    else:
        with open(path, "wb") as f:
            yield f


def write_export(records: Iterable[LedgerRecord], path: str) -> int:
    """Write ``records`` to ``path`` (``-``: standard output; a ``.gz`` name: gzip), and
    return how many. Raises OSError when the file cannot be written."""
    written = 0
    with _target(path) as out:
        for line in export_lines(records):
            out.write(line)
            written += 1
    return written
