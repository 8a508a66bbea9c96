"""The alert state machine (:mod:`skinflint.alerts`): it fires on a sustained rise, ignores a
single spike and a noisy series, respects ``min_usd``, resolves, and reaches the same alerts
window by window (as the gateway runs it) as over a whole log at once (as the audit does)."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from skinflint.alerts import (
    DEFAULT_RULES,
    AlertEvent,
    Level,
    advance,
    judge,
    min_history,
    replay,
)
from skinflint.config import AlertRule, settings_from_dict

MINUTE = 60.0
Point = tuple[float, Mapping[str, str], float]


def rule(**changes: Any) -> AlertRule:
    fields = dict(name="spend", per="feature", window="minute", baseline_windows=6, rise=2.0,
                  for_windows=3, min_usd=0.05, resolve_below=1.3)
    return AlertRule(**{**fields, **changes})


def points(spends: Sequence[float], feature: str = "search", start: int = 1000) -> list[Point]:
    """One point per window (spread over two rows each), windows ``start``, ``start + 1``..."""
    labels = {"tenant": "t", "feature": feature, "model": "gpt-4o", "user": "u"}
    out: list[Point] = []
    for i, usd in enumerate(spends):
        at = (start + i) * MINUTE
        out += [(at + 5, labels, usd / 2), (at + 50, labels, usd / 2)]
    return out


def at(window: int) -> float:
    """When an alert decided at the end of the window ``1000 + window`` is stamped."""
    return (1000 + window + 1) * MINUTE


def test_a_sustained_rise_fires_once_after_for_windows_high_windows() -> None:
    events = replay([rule()], points([1.0] * 10 + [3.0] * 3))
    assert events == [AlertEvent("spend", "feature", "search", at(12), None, 3.0, 1.0)]
    assert events[0].state == "firing"
    assert replay([rule()], points([1.0] * 10 + [3.0] * 2)) == []  # two are not enough


def test_a_single_spike_is_ignored() -> None:
    assert replay([rule()], points([1.0] * 10 + [50.0] + [1.0] * 10)) == []
    assert replay([rule()], points([1.0] * 10 + [50.0, 1.0, 50.0, 1.0, 50.0] + [1.0] * 5)) == []


def test_a_noisy_series_never_fires() -> None:
    noise = random.Random(7)
    spends = [noise.uniform(0.5, 1.5) for _ in range(300)]
    for i in range(20, 300, 7):  # spikes, never three windows in a row
        spends[i] = spends[i + 1] = 5.0
    assert replay([rule()], points(spends)) == []


def test_a_firing_alert_does_not_flap_on_a_noisy_level() -> None:
    # fires, then hovers around 1.5x its baseline: between resolve_below and rise, with a
    # high window now and then, it neither resolves nor fires a second time
    tail = [1.6, 1.45, 1.6, 2.5, 1.6, 1.45, 1.6, 2.5, 1.45]
    spends = [1.0] * 12 + [4.0] * 3 + tail
    events = replay([rule(baseline_windows=24)], points(spends))
    assert [e.end for e in events] == [None]
    # without the band between the two thresholds, the same series resolves on the noise
    no_band = replay([rule(baseline_windows=24, resolve_below=2.0)], points(spends))
    assert [e.end for e in no_band] == [at(17)]


def test_it_resolves_after_for_windows_low_windows() -> None:
    events = replay([rule()], points([1.0] * 10 + [3.0] * 4 + [1.0] * 3))
    assert events == [AlertEvent("spend", "feature", "search", at(12), at(16), 3.0, 1.0)]
    assert events[0].state == "resolved"
    two_low = replay([rule()], points([1.0] * 10 + [3.0] * 4 + [1.0] * 2))
    assert [e.end for e in two_low] == [None]


def test_it_fires_again_only_after_resolving() -> None:
    spends = [1.0] * 10 + [3.0] * 3 + [1.0] * 8 + [4.0] * 3
    events = replay([rule()], points(spends))
    assert [(e.start, e.end) for e in events] == [(at(12), at(15)), (at(23), None)]


def test_min_usd_is_the_least_excess_over_the_baseline() -> None:
    small = [0.01] * 10 + [0.05] * 3  # 5x the baseline, but only $0.04 above it
    assert replay([rule()], points(small)) == []
    enough = [0.01] * 10 + [0.07] * 3
    assert [e.spend_usd for e in replay([rule()], points(enough))] == [pytest.approx(0.07)]


def test_a_lasting_new_level_becomes_the_baseline_and_resolves() -> None:
    events = replay([rule()], points([1.0] * 10 + [3.0] * 12))
    assert len(events) == 1 and events[0].end is not None


def test_nothing_is_judged_before_enough_history() -> None:
    r = rule(baseline_windows=24)
    assert min_history(r) == 6
    assert judge(r, 100.0, [0.0] * 5).level is Level.UNKNOWN
    assert judge(r, 100.0, [0.0] * 6).level is Level.HIGH
    # a ledger whose first windows are busy raises nothing: they are its history
    assert replay([r], points([5.0] * 30)) == []
    # while windows before the first spend are not history at all
    assert replay([r], points([0.0] * 100 + [5.0] * 4)[200:]) == []


def test_judge_decides_every_level() -> None:
    r = rule()
    assert judge(r, 2.1, [1.0, 1.0, 1.0]).level is Level.HIGH
    assert judge(r, 2.0, [1.0, 1.0, 1.0]).level is Level.BETWEEN  # not above rise x
    assert judge(r, 1.3, [1.0, 1.0, 1.0]).level is Level.LOW
    assert judge(r, 0.0, [0.0, 0.0, 0.0]).level is Level.LOW  # idle on an idle baseline
    assert judge(r, 0.06, [0.0, 0.0, 0.0]).level is Level.HIGH  # new spend, over min_usd
    assert judge(r, 5.0, [1.0, 1.0, 9.0, 9.0, 1.0]).baseline_usd == 1.0  # the median


def test_scopes_and_rules_are_separate() -> None:
    mixed = points([1.0] * 10 + [3.0] * 3, feature="search") + points([1.0] * 13, "chat")
    by_feature = replay([rule()], mixed)
    assert [e.name for e in by_feature] == ["search"]
    overall = rule(name="all", per="global")  # 2 -> 4 a window: 2x, not above
    assert replay([overall], mixed) == []
    by_model = replay([rule(name="m", per="model")], mixed)
    assert [(e.per, e.name) for e in by_model] == []
    assert [(e.rule, e.per, e.name) for e in replay([rule(), rule(name="g", per="global",
                                                                    rise=1.4)], mixed)] == [
        ("g", "global", ""), ("spend", "feature", "search")]


def test_points_may_come_in_any_order() -> None:
    spends = [1.0] * 10 + [3.0] * 4 + [1.0] * 3 + [5.0] * 3
    given = points(spends)
    shuffled = given[:]
    random.Random(1).shuffle(shuffled)
    assert replay([rule()], shuffled) == replay([rule()], given) != []


def test_window_by_window_reaches_the_alerts_of_a_whole_replay() -> None:
    noise = random.Random(11)
    spends = [noise.uniform(0.5, 1.5) for _ in range(200)]
    for start in (40, 90, 150):
        spends[start:start + 6] = [6.0] * 6
    r = rule()
    series = {1000 + i: usd for i, usd in enumerate(spends)}
    seen: list[AlertEvent] = []
    open_episode: AlertEvent | None = None
    for w in range(1000, 1200):  # as the gateway does at each window's end
        for change in advance(r, "search", series, first=1000, windows=range(w, w + 1),
                              open_episode=open_episode):
            open_episode = change if change.end is None else None
            seen = [e for e in seen if e.start != change.start] + [change]
    assert len(seen) == 3
    assert seen == replay([r], points(spends))


def test_the_event_and_the_default_rule_are_as_documented() -> None:
    assert [f.name for f in dataclasses.fields(AlertEvent)] == [
        "rule", "per", "name", "start", "end", "spend_usd", "baseline_usd"]
    event = AlertEvent("r", "global", "", 1.0, None, 1.0, 0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        event.end = 2.0  # type: ignore[misc]
    assert settings_from_dict({}, env={}).alerts == DEFAULT_RULES
    assert [(r.per, r.window) for r in DEFAULT_RULES] == [("feature", "hour")]
    assert replay(DEFAULT_RULES, []) == []
