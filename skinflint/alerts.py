"""Cost alerts with hysteresis: the rules' state machine, pure (no I/O, no clock).

The gateway runs it live over its ledger (:mod:`skinflint.monitor`), ``skinflint audit`` runs it
offline over a traffic log (:func:`replay`); both reach the same decisions through
:func:`advance`, so an alert found offline is the alert the gateway would have raised.

How a rule (:class:`~skinflint.config.AlertRule`) reads spend:

* Time is cut into UTC windows of the rule's ``window`` (a minute, an hour, a day), counted
  from the Unix epoch. Each scope (the value of ``per`` in a ledger row: a feature, a model,
  a user, a tenant; "" for ``global``) has a spend per window; a window without spend counts 0.
* History begins at the first window holding any spend at all (the first ledger row, the first
  point of a log). A window's **baseline** is the median spend of the ``baseline_windows``
  windows before it, only those since history began. A window is judged only once
  :func:`min_history` windows of history precede it; before that it is neither high nor low.
* A window is **high** when its spend is above ``rise`` x baseline *and* exceeds the baseline
  by at least ``min_usd``; **low** when its spend is at most ``resolve_below`` x baseline (so an
  idle window on an idle baseline is low); otherwise neither. :func:`judge` decides it, alone.
* An alert **fires** at the end of the ``for_windows``-th high window in a row, and
  **resolves** at the end of the ``for_windows``-th low window in a row while it fires. A
  single spike, or a noisy series that is high one window and not the next, never fires; a
  series hovering between low and high keeps the state it is in.
* The baseline rolls on while an alert fires: a lasting new level of spend becomes the
  baseline after about ``baseline_windows / 2`` windows, and the alert then resolves.

An alert is one :class:`AlertEvent`: when it fired (``start``, the end of the window that made
it fire), when it resolved (``end``, or None while it fires), and the spend and baseline of the
window it fired on.
"""

from __future__ import annotations

import bisect
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum

from skinflint.config import DEFAULT_ALERT_RULES, AlertRule

__all__ = [
    "DEFAULT_RULES",
    "WINDOW_SECONDS",
    "AlertEvent",
    "Judgement",
    "Level",
    "advance",
    "judge",
    "min_history",
    "replay",
    "scope_name",
    "window_of",
    "window_seconds",
]

#: The rules that apply when the configuration has no ``alerts`` section.
DEFAULT_RULES: tuple[AlertRule, ...] = DEFAULT_ALERT_RULES

WINDOW_SECONDS = {"minute": 60, "hour": 3600, "day": 86400}


class Level(Enum):
    UNKNOWN = "unknown"  # not enough history yet
    HIGH = "high"
    LOW = "low"
    BETWEEN = "between"


@dataclass(frozen=True, slots=True)
class Judgement:
    """One window of one scope: its level, its spend and its baseline (USD)."""

    level: Level
    spend_usd: float
    baseline_usd: float


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One alert of one rule for one scope (``per`` the rule's, ``name`` the scope's value,
    "" for global). ``start`` is when it fired and ``end`` when it resolved (None: firing),
    both Unix seconds at a window's end; the amounts are those of the window it fired on."""

    rule: str
    per: str
    name: str
    start: float
    end: float | None
    spend_usd: float
    baseline_usd: float

    @property
    def state(self) -> str:
        return "firing" if self.end is None else "resolved"


def window_seconds(rule: AlertRule) -> int:
    return WINDOW_SECONDS[rule.window]


def window_of(rule: AlertRule, ts: float) -> int:
    """The index of the window holding ``ts`` (as the ledger queries compute it)."""
    return math.floor(ts / window_seconds(rule))


def min_history(rule: AlertRule) -> int:
    """Windows of history a window needs before it is judged: a quarter of
    ``baseline_windows``, at least 3, at most ``baseline_windows``."""
    return min(rule.baseline_windows, max(3, rule.baseline_windows // 4))


def scope_name(per: str, labels: Mapping[str, str]) -> str:
    """The scope a ledger row or log point belongs to under ``per``."""
    return "" if per == "global" else str(labels.get(per) or "")


def judge(rule: AlertRule, spend: float, history: Sequence[float]) -> Judgement:
    """The level of a window that spent ``spend``, after the windows of ``history`` (oldest
    first, only those since history began; the last ``baseline_windows`` are used)."""
    recent = history[-rule.baseline_windows:]
    if len(recent) < min_history(rule):
        return Judgement(Level.UNKNOWN, spend, 0.0)
    baseline = statistics.median(recent)
    if spend > rule.rise * baseline and spend - baseline >= rule.min_usd:
        level = Level.HIGH
    elif spend <= rule.resolve_below * baseline:
        level = Level.LOW
    else:
        level = Level.BETWEEN
    return Judgement(level, spend, baseline)


def _judge_window(rule: AlertRule, series: Mapping[int, float], w: int, first: int) -> Judgement:
    history = [series.get(k, 0.0) for k in range(max(first, w - rule.baseline_windows), w)]
    return judge(rule, series.get(w, 0.0), history)


def _change(
    rule: AlertRule, series: Mapping[int, float], w: int, first: int, firing: bool
) -> Judgement | None:
    """The judgement of window ``w`` when the alert changes state at its end: it fires after
    ``for_windows`` high windows in a row, resolves after as many low ones; else None."""
    want = Level.LOW if firing else Level.HIGH
    last: Judgement | None = None
    for k in range(w, w - rule.for_windows, -1):  # newest first: most windows fail fast
        judged = _judge_window(rule, series, k, first)
        if judged.level is not want:
            return None
        if last is None:
            last = judged
    return last


def advance(
    rule: AlertRule, name: str, series: Mapping[int, float], *, first: int,
    windows: range, open_episode: AlertEvent | None = None,
) -> list[AlertEvent]:
    """Run one scope's alert over ``windows`` (window indexes, in order) and return what
    changed: each alert fired (``end`` None) or resolved (``end`` set) there. ``series`` maps
    window index to spend and must hold every window from ``windows.start - baseline_windows
    - for_windows`` on that spent anything; ``first`` is where history began; ``open_episode``
    is the alert firing before ``windows.start``, if any."""
    seconds = window_seconds(rule)
    spent = sorted(w for w, usd in series.items() if usd > 0)
    changes: list[AlertEvent] = []
    firing, w = open_episode, windows.start - 1
    while True:
        # A window that spent nothing cannot be high: while quiet, visit only those that spent.
        w = w + 1 if firing is not None else _next_spent(spent, w)
        if w >= windows.stop:
            return changes
        judged = _change(rule, series, w, first, firing is not None)
        if judged is None:
            continue
        end = float((w + 1) * seconds)
        if firing is None:
            firing = AlertEvent(rule.name, rule.per, name, end, None, judged.spend_usd,
                                judged.baseline_usd)
            changes.append(firing)
        else:
            changes.append(replace(firing, end=end))
            firing = None


def _next_spent(spent: Sequence[int], after: int) -> int:
    i = bisect.bisect_right(spent, after)
    return spent[i] if i < len(spent) else sys.maxsize


def replay(
    rules: Sequence[AlertRule], points: Iterable[tuple[float, Mapping[str, str], float]]
) -> list[AlertEvent]:
    """Every alert ``rules`` raise over ``points`` ``(ts, labels, cost_usd)``, given in any
    order; ``labels`` holds ``tenant``, ``feature``, ``model`` and ``user``. Windows are judged
    up to the last one holding a point; alerts still firing there have ``end`` None. Ordered
    by ``start``, then rule and name."""
    kept = [(ts, labels, cost or 0.0) for ts, labels, cost in points]
    if not kept:
        return []
    events = [e for rule in rules for e in _replay_rule(rule, kept)]
    events.sort(key=lambda e: (e.start, e.rule, e.name))
    return _episodes(events)


def _replay_rule(
    rule: AlertRule, points: Sequence[tuple[float, Mapping[str, str], float]]
) -> list[AlertEvent]:
    by_scope: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    windows = [window_of(rule, ts) for ts, _, _ in points]
    for w, (_, labels, cost) in zip(windows, points, strict=True):
        by_scope[scope_name(rule.per, labels)][w] += cost
    span = range(min(windows), max(windows) + 1)
    return [change for name, series in by_scope.items()
            for change in advance(rule, name, series, first=span.start, windows=span)]


def _episodes(changes: list[AlertEvent]) -> list[AlertEvent]:
    """One event per alert: a resolution replaces the firing it ends."""
    out: dict[tuple[str, str, float], AlertEvent] = {}
    for change in changes:
        out[(change.rule, change.name, change.start)] = change
    return list(out.values())
