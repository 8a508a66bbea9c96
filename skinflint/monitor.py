"""The live cost-alert monitor: the rules of :mod:`skinflint.alerts`, judged over the ledger at
each window's end, in the background of every gateway process.

At start, then a little after each window of a rule ends (:func:`grace`: the ledger's
batched writer and requests still running have then recorded that window's spend), the
monitor reads the spend per window and scope from the ledger, which every ``serve --workers``
process and every replica shares, and runs :func:`~skinflint.alerts.advance` over the windows
completed since it last looked (at start, the last ``for_windows``, so a restart at a window's
end misses nothing). What was firing before comes from the alert table, not from memory, so
processes that started at different times agree. Each change is recorded in the alert table
(:mod:`skinflint.storage.alert_store`) by exactly one process, which then notifies: a log line
(a warning when an alert fires, info when it resolves), the ``skinflint_alert_events_total``
counter, and the rule's webhook, if any: a JSON POST retried with backoff in a task of its
own, so nothing waits for it. Nothing here runs on a request's path.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, get_args
from urllib.parse import urlsplit

import aiohttp

from skinflint.alerts import AlertEvent, advance, window_of, window_seconds
from skinflint.config import AlertRule
from skinflint.metrics import Metrics
from skinflint.storage.alert_store import AlertStore

__all__ = ["AlertMonitor", "Webhook", "event_json", "grace", "iso"]

log = logging.getLogger("skinflint.alerts")

#: How long closing waits for webhooks still being delivered.
CLOSE_GRACE = 5.0
#: Every scope a rule may judge per.
_PERS: tuple[str, ...] = get_args(AlertRule.model_fields["per"].annotation)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def grace(rule: AlertRule) -> float:
    """How long after a window's end the monitor judges it: a tenth of the window, at most a
    minute."""
    return min(window_seconds(rule) / 10, 60.0)


def event_json(event: AlertEvent) -> dict[str, Any]:
    """An alert as ``GET /api/alerts`` and the webhooks show it."""
    return {
        "rule": event.rule, "per": event.per, "name": event.name, "state": event.state,
        "start": iso(event.start), "end": None if event.end is None else iso(event.end),
        "spend_usd": round(event.spend_usd, 6), "baseline_usd": round(event.baseline_usd, 6),
    }


def describe(rule: AlertRule, event: AlertEvent) -> str:
    scope = "all spend" if rule.per == "global" else f"{rule.per} {event.name!r}"
    if event.end is not None:
        return f"cost alert {rule.name} resolved for {scope} at {iso(event.end)}"
    return (f"cost alert {rule.name} firing for {scope}: ${event.spend_usd:.4f} in the "
            f"{rule.window} to {iso(event.start)}, against a baseline of "
            f"${event.baseline_usd:.4f} ({rule.for_windows} {rule.window}(s) running)")


@dataclass(frozen=True, slots=True)
class Webhook:
    """How alert webhooks are delivered: each POST may take ``timeout`` seconds; a failed one
    (no answer, 5xx, 429) is tried again after ``backoff``, doubling, ``attempts`` times in
    all."""

    session: aiohttp.ClientSession
    attempts: int = 4
    backoff: float = 1.0
    timeout: float = 10.0

    async def deliver(self, url: str, payload: dict[str, Any]) -> bool:
        """POST ``payload``; True once the receiver accepted it."""
        host = urlsplit(url).hostname  # never log the URL: it often holds a token
        delay = self.backoff
        for attempt in range(1, self.attempts + 1):
            failure = await self._post(url, payload)
            if failure is None:
                return True
            if attempt == self.attempts or failure.startswith("refused"):
                log.warning("alert webhook to %s not delivered: %s", host, failure)
                return False
            await asyncio.sleep(delay)
            delay *= 2
        return False  # attempts is at least 1

    async def _post(self, url: str, payload: dict[str, Any]) -> str | None:
        """None when delivered, else why not (``refused ...`` when trying again is useless)."""
        try:
            timeout = aiohttp.ClientTimeout(total=self.timeout)
            async with self.session.post(url, json=payload, timeout=timeout) as resp:
                if resp.status < 300:
                    return None
                again = resp.status >= 500 or resp.status == 429
                return f"{'' if again else 'refused '}HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            return f"{type(exc).__name__} {exc}".strip()


class AlertMonitor:
    """Judges ``rules`` over the ledger through ``store`` (see the module docstring).
    :meth:`evaluate` does one round at a given time (tests call it with their own clock);
    :meth:`start` runs rounds in the background on ``clock`` until :meth:`close`, the first
    after :meth:`retire`. ``others``: rules whose alerts are recorded in the same table by
    someone else (the shadow guard's), never retired here."""

    def __init__(
        self, rules: Sequence[AlertRule], store: AlertStore, metrics: Metrics,
        webhook: Webhook | None = None, *, clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        others: Sequence[str] = (),
    ) -> None:
        self.rules = tuple(rules)
        self.others = frozenset(others)
        self.store = store
        self.metrics = metrics
        self.webhook = webhook
        self._clock = clock
        self._sleep = sleep
        self._judged: dict[str, int] = {}  # rule -> the last window judged
        self._loop: asyncio.Task[None] | None = None
        self._deliveries: set[asyncio.Task[bool]] = set()
        self._last: dict[str, asyncio.Task[bool]] = {}  # per URL: changes arrive in order

    def start(self) -> None:
        self._loop = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        """Stop judging; give webhooks in flight :data:`CLOSE_GRACE` seconds to finish."""
        if self._loop is not None:
            self._loop.cancel()
            await asyncio.gather(self._loop, return_exceptions=True)
        if self._deliveries:
            await asyncio.wait(set(self._deliveries), timeout=CLOSE_GRACE)
            for task in self._deliveries:
                task.cancel()
            await asyncio.gather(*self._deliveries, return_exceptions=True)

    async def retire(self, now: float) -> list[AlertEvent]:
        """Resolve, at ``now``, the alerts still firing for a rule no longer configured (one
        renamed or removed): nothing would ever judge them again. Returns those it resolved."""
        known = {rule.name for rule in self.rules} | self.others
        resolved: list[AlertEvent] = []
        for name in sorted(set(await self.store.active()) - known):
            for per in _PERS:
                for event in await self.store.open_at(name, per, now):
                    done = await self.store.resolve(dataclasses.replace(event, end=now))
                    if done is not None:
                        log.info("cost alert %s resolved for %s %r: the rule is no longer "
                                 "configured", name, per, done.name)
                        resolved.append(done)
        return resolved

    async def _run(self) -> None:
        try:
            await self.retire(self._clock())
        except Exception:  # the rounds run all the same
            log.exception("cost alerts: could not resolve the alerts of removed rules")
        while True:
            now = self._clock()
            try:
                await self.evaluate(now)
            except Exception:  # a round that failed (database down) must not end the next
                log.exception("cost alerts: could not judge spend")
            await self._sleep(max(self.next_round(now) - self._clock(), 0.0))

    def next_round(self, now: float) -> float:
        """When the next window of a rule ends, plus that rule's :func:`grace`."""
        due = []
        for rule in self.rules:
            seconds = window_seconds(rule)
            due.append((math.floor((now - grace(rule)) / seconds) + 1) * seconds + grace(rule))
        return min(due)

    async def evaluate(self, now: float) -> list[AlertEvent]:
        """Judge every window that ended before ``now`` and was not judged yet; record and
        notify the changes this process is the first to record, and return them."""
        recorded: list[AlertEvent] = []
        for rule in self.rules:
            recorded += await self._evaluate(rule, now)
        active = await self.store.active()
        for rule in self.rules:
            self.metrics.alerts_active.labels(rule.name).set(active.get(rule.name, 0))
        return recorded

    async def _evaluate(self, rule: AlertRule, now: float) -> list[AlertEvent]:
        seconds = window_seconds(rule)
        current = math.floor((now - grace(rule)) / seconds) - 1  # the last window ended
        since = self._judged.get(rule.name, current - rule.for_windows) + 1
        windows = range(max(since, current - rule.baseline_windows), current + 1)
        first_ts = await self.store.first_ts() if windows else None
        if first_ts is None:
            self._judged[rule.name] = current
            return []
        lo = windows.start - rule.baseline_windows - rule.for_windows
        series: dict[str, dict[int, float]] = defaultdict(dict)
        for w, name, usd in await self.store.spend(
                rule.per, seconds, lo * seconds, windows.stop * seconds):
            series[name][w] = usd
        firing = {e.name: e for e in
                  await self.store.open_at(rule.name, rule.per, windows.start * seconds)}
        changes = [change for name in sorted(series.keys() | firing.keys())
                   for change in advance(rule, name, series[name],
                                         first=window_of(rule, first_ts), windows=windows,
                                         open_episode=firing.get(name))]
        changes.sort(key=lambda e: e.start if e.end is None else e.end)
        recorded = [e for e in [await self._record(rule, c) for c in changes] if e is not None]
        self._judged[rule.name] = current
        return recorded

    async def _record(self, rule: AlertRule, change: AlertEvent) -> AlertEvent | None:
        """Record ``change``; notify and return it if this process recorded it."""
        if change.end is None:
            recorded: AlertEvent | None = change if await self.store.fire(change) else None
        else:
            recorded = await self.store.resolve(change)
        if recorded is not None:
            self._notify(rule, recorded)
        return recorded

    def _notify(self, rule: AlertRule, event: AlertEvent) -> None:
        level = logging.WARNING if event.end is None else logging.INFO
        log.log(level, "%s", describe(rule, event))
        self.metrics.child(self.metrics.alert_events, rule.name, event.state).inc()
        if rule.webhook and self.webhook is not None:
            payload = {**event_json(event), "window": rule.window, "text": describe(rule, event)}
            task = asyncio.ensure_future(self._deliver(rule.webhook, payload,
                                                       self._last.get(rule.webhook)))
            self._last[rule.webhook] = task
            self._deliveries.add(task)
            task.add_done_callback(self._deliveries.discard)

    async def _deliver(self, url: str, payload: dict[str, Any],
                       after: asyncio.Task[bool] | None) -> bool:
        assert self.webhook is not None
        if after is not None:
            await asyncio.wait([after])
        return await self.webhook.deliver(url, payload)
