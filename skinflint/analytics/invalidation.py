"""``skinflint cache invalidate``: drop cache entries by tag where the gateways keep them, and
say what was done, and which running gateways are known to have dropped their copies.

The response cache does the work, on the store the storage layer opens:

* SQLite: it deletes the rows and logs the invalidation in the same file
  (:mod:`skinflint.storage.invalidations`); every gateway using the file (each
  ``serve --workers`` process too) reads the log within a quarter of a second, drops the tags
  from memory and records that it has. The command waits a few seconds for those records.
* PostgreSQL, Redis: gateways keep no copies in memory, so deleting from the store is enough.
* ``--url``: a running gateway invalidates through its admin API instead (it logs the
  invalidation for the gateways sharing its storage); when it does not answer, the command
  edits the storage itself.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from skinflint.analytics.admin_call import GatewayRefused, post_admin
from skinflint.config import Settings
from skinflint.metrics import Metrics
from skinflint.pipeline.cache import ResponseCache
from skinflint.storage import invalidations
from skinflint.storage.cache import TieredCacheStore
from skinflint.storage.opener import NotStoredError, Storage, kind, open_storage

__all__ = ["CONFIRM_SECONDS", "Invalidation", "describe", "invalidate"]

#: How long the command waits for the running gateways to confirm.
CONFIRM_SECONDS = 3.0


@dataclass
class Invalidation:
    """What ``skinflint cache invalidate`` did. ``where``: the SQLite path, ``postgres``,
    ``redis`` or ``gateway at URL``. ``running``: the gateways found using the SQLite file
    (None for stores that gateways do not copy into memory); ``unconfirmed`` describes those
    that did not confirm in time."""

    invalidated: int
    tags: list[str]
    where: str
    running: int | None = None
    unconfirmed: list[str] = field(default_factory=list)
    gateway_error: str = ""  # why the gateway given with --url did not do it

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tell_gateway(url: str, tags: list[str], admin_key: str | None) -> int | str:
    """Ask the gateway at ``url`` to invalidate; the count it dropped, else why it did not."""
    try:
        answer = post_admin(url, "/api/cache/invalidate", {"tags": tags}, admin_key, timeout=3)
        return int(answer["invalidated"])
    except GatewayRefused as exc:
        return str(exc)
    except (KeyError, TypeError, ValueError):
        return "its answer was not a skinflint gateway's"


def invalidate(
    settings: Settings, tags: list[str], *, db: str | None = None, url: str | None = None,
    admin_key: str | None = None, confirm_seconds: float = CONFIRM_SECONDS,
) -> Invalidation:
    """Drop the entries tagged with any of ``tags`` from the cache store the settings name (or
    ``db``: a SQLite file, a ``postgresql://`` or ``redis://`` URL), or through the gateway at
    ``url`` when given and answering. Raises ValueError when there is no SQLite file."""
    gateway_error = ""
    if url:
        answer = _tell_gateway(url, tags, admin_key)
        if isinstance(answer, int):
            return Invalidation(answer, tags, f"gateway at {url}")
        gateway_error = f"the gateway at {url}: {answer}"
    storage = open_storage(settings, db=db, existing=True)
    found = asyncio.run(_invalidate(storage, tags, confirm_seconds))
    found.gateway_error = gateway_error
    return found


async def _invalidate(storage: Storage, tags: list[str], confirm_seconds: float) -> Invalidation:
    where = storage.location.cache
    try:
        store = await storage.cache()
        # the same service the gateway's admin API invalidates through
        cache = ResponseCache(storage.settings.cache, store, Metrics())
        dropped = await cache.invalidate_tags(tags)
        if not isinstance(store, TieredCacheStore):  # no gateway copies it into memory
            return Invalidation(dropped, tags, kind(where))
        running, late = await _confirmations(store, confirm_seconds)
        return Invalidation(dropped, tags, where, running, [g.describe() for g in late])
    except FileNotFoundError:
        raise ValueError(
            f"no database at {where}: give --db, or the --config the gateway runs with"
        ) from None
    except NotStoredError:  # no gateway has cached anything in this file
        return Invalidation(0, tags, where, running=0)
    finally:
        await storage.close()


async def _confirmations(
    store: TieredCacheStore, seconds: float
) -> tuple[int, list[invalidations.GatewayRow]]:
    """Wait up to ``seconds`` for every running gateway to apply the invalidation ``store``
    logged; returns how many run and those that have not applied it."""
    deadline = time.monotonic() + seconds
    while True:
        live = await store.gateways()
        late = [g for g in live if g.applied < store.logged]
        if not late or time.monotonic() >= deadline:
            return len(live), late
        await asyncio.sleep(0.05)


_STORES = {"postgres": "PostgreSQL", "redis": "Redis"}


def _entries(n: int) -> str:
    return f"{n} entr{'y' if n == 1 else 'ies'}"


def _gateways(n: int) -> str:
    return f"{n} running gateway{'' if n == 1 else 's'}"


def describe(result: Invalidation, confirm_seconds: float = CONFIRM_SECONDS) -> str:
    """One line for people: what was dropped where, and what the running gateways did."""
    head = f"invalidated {_entries(result.invalidated)} tagged {', '.join(result.tags)}"
    prefix = f"{result.gateway_error}; " if result.gateway_error else ""
    if result.where.startswith("gateway at"):
        return (f"{head} through the {result.where}; gateways sharing its storage drop "
                f"their copies within {invalidations.POLL_SECONDS:g} s")
    if result.running is None:
        store = _STORES.get(result.where, result.where)
        return (f"{prefix}{head} in {store}; gateways read {store} directly "
                "and keep no copies in memory")
    where = f"{prefix}{head} in {result.where}"
    if result.running == 0:
        return f"{where}; no running gateway uses this file"
    confirmed = result.running - len(result.unconfirmed)
    if not result.unconfirmed:
        return f"{where}; {_gateways(confirmed)} dropped them from memory"
    return (f"{where}; {confirmed} of {_gateways(result.running)} dropped them from memory; "
            f"{', '.join(result.unconfirmed)} did not confirm within {confirm_seconds:g} s "
            "(stopped, or too busy to read the file: it drops them when it next does)")
