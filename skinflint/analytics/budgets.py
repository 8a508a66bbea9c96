"""Budget figures, for ``skinflint budgets``: each configured budget's current window per
subject, read from the counters the gateways share (see :mod:`skinflint.storage.opener`)."""

from __future__ import annotations

import asyncio
from typing import Any

from skinflint.config import Settings
from skinflint.pipeline.budgets import BudgetBook
from skinflint.pricing import PriceCatalog
from skinflint.storage.opener import open_storage

__all__ = ["budget_rows"]


def budget_rows(settings: Settings, db: str | None = None) -> list[dict[str, Any]]:
    """What ``GET /api/budgets`` lists, from the storage the settings name (or the SQLite file
    ``db``). A file that does not exist raises FileNotFoundError (it is not created)."""
    return asyncio.run(_rows(settings, db))


async def _rows(settings: Settings, db: str | None) -> list[dict[str, Any]]:
    if not settings.budgets:
        return []
    storage = open_storage(settings, db=db, existing=True)
    try:
        counters = await storage.budget_counters()
        book = BudgetBook(settings, counters, catalog=PriceCatalog())
        return await book.rows()
    finally:
        await storage.close()
