"""``skinflint shadow enable``: switch a strategy the shadow-evaluation guard switched off back
on for a feature.

With ``--url`` a running gateway does it through its admin API (``POST /api/shadow/enable``),
at once. Otherwise the command closes the switch's alert in the storage the gateways share;
a gateway reads the switches back when it starts, so one running now keeps the strategy off
until it restarts (or is told through ``--url``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict, dataclass
from typing import Any

from skinflint.alerts import AlertEvent
from skinflint.analytics.admin_call import GatewayRefused, post_admin
from skinflint.config import Settings
from skinflint.pipeline.shadow import ALERT_RULE
from skinflint.storage.opener import NotStoredError, Storage, open_storage

__all__ = ["Switch", "describe", "enable"]


@dataclass(frozen=True)
class Switch:
    """What ``skinflint shadow enable`` did: ``switched_on`` False when it was on already."""

    feature: str
    strategy: str
    switched_on: bool
    where: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def enable(settings: Settings, feature: str, strategy: str, *, db: str | None = None,
           url: str | None = None, admin_key: str | None = None) -> Switch:
    """Switch ``strategy`` back on for ``feature``, through the gateway at ``url`` or in the
    storage the settings (or ``db``) name. Raises ValueError when neither can do it."""
    if url:
        return Switch(feature, strategy, _tell_gateway(url, feature, strategy, admin_key),
                      f"gateway at {url}")
    storage = open_storage(settings, db=db, existing=True)
    return asyncio.run(_close_alert(storage, feature, strategy))


async def _close_alert(storage: Storage, feature: str, strategy: str) -> Switch:
    where = storage.location.ledger or ""
    try:
        store = await storage.alert_store()
        now = time.time()
        closed = await store.resolve(
            AlertEvent(ALERT_RULE, "feature", f"{feature}/{strategy}", now, now, 0.0, 0.0))
        return Switch(feature, strategy, closed is not None, where)
    except (FileNotFoundError, NotStoredError):
        raise ValueError(f"no shared ledger at {where or 'the configured storage'}: give --db,"
                         " --url, or the --config the gateway runs with") from None
    finally:
        await storage.close()


def _tell_gateway(url: str, feature: str, strategy: str, admin_key: str | None) -> bool:
    try:
        answer = post_admin(url, "/api/shadow/enable", {"feature": feature, "strategy": strategy},
                            admin_key, timeout=5)
        return bool(answer["switched_on"])
    except GatewayRefused as exc:
        raise ValueError(f"the gateway at {url} did not do it: {exc}") from None
    except KeyError:
        raise ValueError(f"the answer of {url} was not a skinflint gateway's") from None


def describe(switch: Switch) -> str:
    """One line for people."""
    what = f"{switch.strategy} for feature {switch.feature!r}"
    if not switch.switched_on:
        return f"{what} was not switched off ({switch.where})"
    if switch.where.startswith("gateway at"):
        return f"{what} is back on in the {switch.where}"
    return (f"{what} is back on in {switch.where}; running gateways keep it off until they "
            "restart (or use --url to tell one now)")
