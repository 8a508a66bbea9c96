"""``GET /api/spend`` and ``GET /api/requests``: their query parameters, checked, and their
answers as JSON. The figures come from the storage layer (the ledger's rollups and its newest
rows); this module only reads parameters and shapes answers."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs

from skinflint.errors import RequestError
from skinflint.storage.rollup import BUCKETS, DIMENSIONS
from skinflint.storage.spend import Spend

__all__ = ["MAX_LIMIT", "SpendQuery", "iso", "recent_json", "requests_limit", "spend_json",
           "spend_query"]

DEFAULT_SINCE = "7d"
DEFAULT_LIMIT = 50
MAX_LIMIT = 500
#: Up to this window, the default bucket is an hour; past it, a day.
HOURLY_UP_TO = 2 * 86400
_UNITS = {"m": 60, "h": 3600, "d": 86400}
_SINCE = re.compile(r"([1-9][0-9]{0,5})([mhd])")


def iso(ts: float) -> str:
    """A unix timestamp as ISO 8601 in UTC with a ``Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _params(query_string: bytes) -> dict[str, str]:
    """The query's parameters; of a repeated one, the last."""
    parsed = parse_qs(query_string.decode("latin-1"), keep_blank_values=True)
    return {k: v[-1] for k, v in parsed.items()}


def _bad(param: str, expected: str, value: str) -> RequestError:
    shown = value if len(value) <= 40 and value.isprintable() else value[:40].encode(
        "unicode_escape").decode("ascii")
    return RequestError(f"{param} must be {expected}, not {shown!r}",
                        code=f"invalid_{param}")


@dataclass(frozen=True, slots=True)
class SpendQuery:
    """The checked parameters of ``GET /api/spend``."""

    by: str
    seconds: int
    bucket: str


def spend_query(query_string: bytes) -> SpendQuery:
    """``by`` (default ``feature``), ``since`` (``30m``, ``12h``, ``7d``; default 7d) and
    ``bucket`` (default ``hour`` up to 2 days, else ``day``); RequestError naming the
    parameter that is wrong."""
    params = _params(query_string)
    by = params.get("by", "feature")
    if by not in DIMENSIONS:
        raise _bad("by", "one of " + ", ".join(DIMENSIONS), by)
    since = params.get("since", DEFAULT_SINCE)
    m = _SINCE.fullmatch(since)
    if m is None:
        raise _bad("since", "a duration like 30m, 12h or 7d", since)
    seconds = int(m.group(1)) * _UNITS[m.group(2)]
    bucket = params.get("bucket", "hour" if seconds <= HOURLY_UP_TO else "day")
    if bucket not in BUCKETS:
        raise _bad("bucket", "hour or day", bucket)
    return SpendQuery(by, seconds, bucket)


def requests_limit(query_string: bytes) -> int:
    """``limit`` of ``GET /api/requests``: 1 to :data:`MAX_LIMIT`, default 50."""
    raw = _params(query_string).get("limit", str(DEFAULT_LIMIT))
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise _bad("limit", f"a whole number from 1 to {MAX_LIMIT}", raw)
    return int(raw)


def spend_json(spend: Spend) -> dict[str, Any]:
    starts: dict[float, str] = {}  # a few buckets, many names each
    series = []
    for s in spend.series:
        start = starts.get(s["start"])
        if start is None:
            start = starts[s["start"]] = iso(s["start"])
        series.append({**s, "start": start})
    return {
        "by": spend.by,
        "bucket": spend.bucket,
        "since": iso(spend.since),
        "until": iso(spend.until),
        "totals": spend.totals,
        "groups": spend.groups,
        "series": series,
    }


def recent_json(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {"data": [{**r, "ts": iso(r["ts"])} for r in rows]}
