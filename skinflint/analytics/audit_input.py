"""Reading a traffic log for the audit: JSON Lines, plain or gzipped, in one of two formats.

* a call: ``{"request": <chat completion request body>, "response": <chat.completion body>,
  "timestamp": <ISO 8601 or epoch seconds>, "feature": ..., "user": ..., "tenant": ...}``;
  everything but ``request`` is optional. The feature and user default to the request's
  ``metadata.feature`` and ``user``, as the gateway reads them; the tenant to ``default``.
* a ledger export line (``"kind": "skinflint.ledger"``): every ledger field by name, no bodies.

A line that is neither is not fatal: it is kept as a :class:`BadLine` with its number and why,
and the audit goes on.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import orjson

from skinflint.cachekey import request_hash
from skinflint.models import CASCADE_ATTEMPT, Usage

__all__ = ["LEDGER_KIND", "AuditLog", "BadLine", "Call", "parse_time", "read_log"]

LEDGER_KIND = "skinflint.ledger"
_GZIP_MAGIC = b"\x1f\x8b"
_LEDGER_COUNTS = ("input_tokens", "output_tokens", "cached_tokens", "cache_write_tokens",
                  "reasoning_tokens", "input_audio_tokens", "output_audio_tokens")
_BAD_LINES_KEPT = 100  # the first ones, with their reason; the rest are only counted

JSON = dict[str, Any]


@dataclass(slots=True)
class Call:
    """One call of the log. ``body`` and ``response`` are None for a ledger line; ``cost`` is
    set once priced (None: the model has no known price)."""

    line: int
    ts: float | None
    tenant: str
    feature: str
    user: str
    model: str  # the model that answered, else the one asked for
    request_hash: str
    body: JSON | None = None
    response: JSON | None = None
    usage: Usage | None = None  # the log's own usage; None until counted
    cost: float | None = None
    is_request: bool = True  # False for a ledger row of a cascade tier not returned
    ledger_cost: float | None = None  # the ledger's recorded cost (ledger lines)


@dataclass(frozen=True, slots=True)
class BadLine:
    line: int
    reason: str


@dataclass
class AuditLog:
    calls: list[Call] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)
    bad_count: int = 0
    filtered_out: int = 0  # outside --since/--until, or without a time when one is given
    ledger_lines: int = 0

    def reject(self, line: int, reason: str) -> None:
        self.bad_count += 1
        if len(self.bad) < _BAD_LINES_KEPT:
            self.bad.append(BadLine(line, reason))


def parse_time(value: Any) -> float:
    """Epoch seconds from a number or an ISO 8601 string (a time without zone is UTC).
    Raises ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError("a timestamp must be ISO 8601 or epoch seconds")
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return float(text)
        except ValueError:
            pass
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"timestamp {text[:40]!r} is not ISO 8601 or epoch seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    raise ValueError("a timestamp must be ISO 8601 or epoch seconds")


def _open(path: Path) -> IO[bytes]:
    with path.open("rb") as probe:
        gzipped = probe.read(2) == _GZIP_MAGIC
    if gzipped:
        return gzip.GzipFile(path, "rb")  # type: ignore[return-value]
    return path.open("rb")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """Non-blank lines with their numbers. Raises ValueError for a damaged gzip file."""
    number = 0
    try:
        with _open(path) as f:
            for number, raw in enumerate(f, 1):
                if raw.strip():
                    yield number, raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as exc:
        raise ValueError(f"{path}: damaged gzip file after line {number}: {exc}") from None


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _from_ledger(number: int, row: JSON) -> Call:
    if not isinstance(row.get("ts"), int | float):
        raise ValueError("a ledger line needs a numeric 'ts'")
    usage = Usage()
    for name in _LEDGER_COUNTS:
        setattr(usage, name, int(row.get(name) or 0))
    cost = row.get("cost_usd")
    return Call(
        line=number,
        ts=float(row["ts"]),
        tenant=_text(row.get("tenant")) or "default",
        feature=_text(row.get("feature")),
        user=_text(row.get("user")),
        model=_text(row.get("model")) or _text(row.get("requested_model")),
        request_hash=_text(row.get("request_hash")),
        usage=usage,
        is_request=row.get("strategy") != CASCADE_ATTEMPT,
        ledger_cost=float(cost) if isinstance(cost, int | float) else None,
    )


def _from_pair(number: int, row: JSON) -> Call:
    body = row["request"]
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise ValueError("'request' must be a chat completion request with 'messages'")
    found = row.get("response")
    response: JSON | None = found if isinstance(found, dict) else None
    model = _text(response.get("model")) if response else ""
    model = model or _text(body.get("model"))
    if not model:
        raise ValueError("no model: neither the request nor the response names one")
    metadata = body.get("metadata")
    meta: JSON = metadata if isinstance(metadata, dict) else {}
    stamp = row.get("timestamp")
    return Call(
        line=number,
        ts=None if stamp is None else parse_time(stamp),
        tenant=_text(row.get("tenant")) or "default",
        feature=_text(row.get("feature")) or _text(meta.get("feature")),
        user=_text(row.get("user")) or _text(body.get("user")),
        model=model,
        request_hash=request_hash("chat", body),
        body=body,
        response=response,
        usage=Usage.from_openai(response.get("usage")) if response else None,
    )


def _parse(number: int, raw: bytes) -> Call:
    try:
        row = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc.msg}") from None
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    if row.get("kind") == LEDGER_KIND:
        return _from_ledger(number, row)
    if "request" in row:
        return _from_pair(number, row)
    raise ValueError(f"neither a call (no 'request') nor a ledger line (kind {LEDGER_KIND!r})")


def read_log(
    path: str | Path,
    *,
    since: float | None = None,
    until: float | None = None,
    on_line: Callable[[int], None] | None = None,
) -> AuditLog:
    """Every call of the log at ``path`` with a time in ``[since, until)`` (with no bound, calls
    without a time are kept too). ``on_line`` is told each line number as it is read."""
    log = AuditLog()
    bounded = since is not None or until is not None
    for number, raw in _lines(Path(path)):
        if on_line is not None:
            on_line(number)
        try:
            call = _parse(number, raw)
        except (ValueError, TypeError, KeyError) as exc:
            log.reject(number, str(exc) or type(exc).__name__)
            continue
        if bounded and not _within(call.ts, since, until):
            log.filtered_out += 1
            continue
        log.ledger_lines += call.body is None
        log.calls.append(call)
    return log


def _within(ts: float | None, since: float | None, until: float | None) -> bool:
    if ts is None:
        return False
    return (since is None or ts >= since) and (until is None or ts < until)
