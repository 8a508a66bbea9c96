"""Cache figures, for ``skinflint cache stats``: what the cache store holds and, from the ledger,
the hit rate and the money hits saved. Read through :mod:`skinflint.storage.opener` from the
storage the settings name, or another one (``db``: a SQLite path, a ``postgresql://`` URL, or a
``redis://`` URL, which has cache figures only: the ledger lives elsewhere). Invalidation is in
:mod:`skinflint.analytics.invalidation`.
"""

from __future__ import annotations

import asyncio
import errno
from typing import Any

from skinflint.config import Settings
from skinflint.models import CacheBypass
from skinflint.storage.opener import LedgerFigures, Storage, open_storage

__all__ = ["bypassed", "stats"]


def stats(settings: Settings, db: str | None = None) -> dict[str, Any]:
    """Entries in the cache store and, from the ledger when there is one, hit rate and money
    saved by cache hits. A SQLite file that does not exist raises FileNotFoundError (it is
    not created)."""
    return asyncio.run(_stats(open_storage(settings, db=db, existing=True)))


async def _stats(storage: Storage) -> dict[str, Any]:
    try:
        try:
            entries: dict[str, Any] = await storage.cache_figures()
        except FileNotFoundError as exc:
            raise FileNotFoundError(errno.ENOENT, "no cache database", exc.filename) from None
        ledger = await storage.ledger_figures()
    finally:
        await storage.close()
    return entries if ledger is None else {**entries, **_hit_figures(ledger)}


def bypassed(counts: dict[str, int]) -> dict[str, int]:
    """Requests the cache did not serve or store, by reason (every reason, most first); those
    recorded before reasons were (an empty reason) count as ``unrecorded``."""
    out = {reason.value: counts.get(reason.value, 0) for reason in CacheBypass}
    if counts.get(""):
        out["unrecorded"] = counts[""]
    return dict(sorted(out.items(), key=lambda item: -item[1]))


def _hit_figures(ledger: LedgerFigures) -> dict[str, Any]:
    return {
        "requests": ledger.requests,
        "hits": ledger.hits,
        "semantic_hits": ledger.semantic_hits,
        "hit_rate": ledger.hits / ledger.requests if ledger.requests else 0.0,
        "saved_usd": ledger.saved_usd,
        "bypassed": bypassed(ledger.bypassed),
    }
