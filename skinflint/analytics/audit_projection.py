"""What each strategy would have saved on the log, projected to a month, with its assumptions
in words, and their compound.

The compound applies the strategies in pipeline order (exact cache, semantic cache,
compression, routing, token budgets, in-prompt batching, then the batch API: a price change on
whatever is still sent), each taking its share of what the ones before it left:
``1 - prod(1 - share)`` of the spend, never more than the spend. That assumes the strategies'
savings are independent of each other, which the words say.

Two strategies batch, differently:

* ``batching`` (in-prompt): calls of one feature, model and system prompt within a minute
  send their instructions once, so the prompt tokens of all but the first are saved;
* ``batch_api``: calls no one waits on go through the provider's batch API, the same tokens at
  the batch price. A log cannot say what may wait, so a stated heuristic picks them
  (:func:`background_calls`): calls with no end user, not streamed, arriving in a burst of at
  least :data:`BURST_CALLS` calls of the same tenant, feature and model within a minute.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from skinflint.analytics.audit_figures import system_prompt
from skinflint.analytics.audit_input import Call
from skinflint.analytics.report import percentile
from skinflint.analytics.savings import EFFECTS, PRICE_ONLY, Saved, tokens_saved
from skinflint.pricing import PriceCatalog

__all__ = ["BURST_CALLS", "MONTH_SECONDS", "Strategy", "background_calls", "compound",
           "monthly_factor", "output_caps", "precision_at", "saving_by_batch_api",
           "saving_by_batching", "saving_by_budgets", "saving_by_compression",
           "saving_by_marked", "saving_by_routing", "saving_of_marked"]

MONTH_SECONDS = 30 * 86400
BATCH_WINDOW_SECONDS = 60
#: Calls of one tenant, feature and model within a minute, with no end user, that make a burst
#: of background work a batch API could take (a person at a keyboard rarely sends ten a minute).
BURST_CALLS = 10


@dataclass
class Strategy:
    """A strategy's projection: what it saves on the log (see
    :mod:`skinflint.analytics.savings` for what counts as a token or a dollar saved)."""

    saved: Saved
    assumptions: str

    @property
    def name(self) -> str:
        return self.saved.strategy

    @property
    def saving_usd(self) -> float:
        return self.saved.usd

    def as_dict(self, total: float, factor: float | None) -> dict[str, Any]:
        share = min(self.saving_usd / total, 1.0) if total > 0 else 0.0
        scale = factor if factor is not None else 1.0
        s = self.saved
        return {"name": self.name, "saving_usd": round(self.saving_usd * scale, 6),
                "log_saving_usd": round(self.saving_usd, 9), "saving_share": share,
                "input_tokens_saved": round(s.input_tokens * scale),
                "output_tokens_saved": round(s.output_tokens * scale),
                "log_requests": s.requests, "log_input_tokens_saved": s.input_tokens,
                "log_output_tokens_saved": s.output_tokens,
                "effect": EFFECTS.get(self.name, PRICE_ONLY), "assumptions": self.assumptions}


def monthly_factor(calls: Sequence[Call]) -> tuple[float | None, float]:
    """(30 days / the log's span, the span in seconds); None when calls lack a time or the
    span is zero, and then nothing is scaled."""
    times = [c.ts for c in calls if c.ts is not None]
    if not times or len(times) < len(calls):
        return None, 0.0
    span = max(times) - min(times)
    return (MONTH_SECONDS / span if span > 0 else None), span


def compound(shares: Sequence[float]) -> float:
    """The share of the spend left after every strategy took its share in turn."""
    remaining = 1.0
    for share in shares:
        remaining *= 1.0 - min(max(share, 0.0), 1.0)
    return 1.0 - remaining


def precision_at(defaults: dict[str, Any], threshold: float) -> float:
    """The calibrated precision at ``threshold``: the held-out curve's point at the highest
    threshold not above it (the calibration's own figure at the shipped threshold)."""
    if threshold == defaults["threshold"]:
        return float(defaults["precision"])
    points = [p for p in defaults["held_out_curve"] if p["threshold"] <= threshold]
    if not points:
        return min(float(p["precision"]) for p in defaults["held_out_curve"])
    return float(max(points, key=lambda p: p["threshold"])["precision"])


def saving_of_marked(calls: Sequence[Call], marks: Sequence[bool], factor: float = 1.0) -> float:
    return factor * sum(c.cost or 0.0 for c, m in zip(calls, marks, strict=True) if m)


def _add(saved: Saved, name: str, call: Call, usd: float, less_in: int = 0,
         less_out: int = 0) -> None:
    """Count one call ``name`` saved on: ``usd``, and its tokens as :func:`tokens_saved`
    defines them (none when the call's usage is unknown)."""
    saved.requests += 1
    saved.usd += usd
    if call.usage is not None:
        inp, out = tokens_saved(name, input_tokens=call.usage.input_tokens,
                                output_tokens=call.usage.output_tokens,
                                removed_input=min(less_in, call.usage.input_tokens),
                                removed_output=min(less_out, call.usage.output_tokens))
        saved.input_tokens += inp
        saved.output_tokens += out


def saving_by_marked(name: str, calls: Sequence[Call], marks: Sequence[bool],
                     factor: float = 1.0) -> Saved:
    """Marked calls served without a call: their whole cost and tokens, times ``factor``
    (the share of them counted)."""
    saved = Saved(name)
    for call, marked in zip(calls, marks, strict=True):
        if marked:
            _add(saved, name, call, call.cost or 0.0)
    saved.usd *= factor
    saved.input_tokens = round(saved.input_tokens * factor)
    saved.output_tokens = round(saved.output_tokens * factor)
    return saved


def _cheaper(catalog: PriceCatalog, call: Call, less_in: int = 0, less_out: int = 0) -> float:
    """What ``call`` costs minus what it would with fewer input or output tokens."""
    if call.cost is None or call.usage is None or (less_in <= 0 and less_out <= 0):
        return 0.0
    u = call.usage
    inp, out = max(u.input_tokens - less_in, 0), max(u.output_tokens - less_out, 0)
    fewer = dataclasses.replace(u, input_tokens=inp, output_tokens=out,
                                cached_tokens=min(u.cached_tokens, inp),
                                reasoning_tokens=min(u.reasoning_tokens, out))
    cost = catalog.cost(call.model, fewer)
    return 0.0 if cost is None else max(call.cost - cost, 0.0)


def _fewer(name: str, calls: Sequence[Call], less: dict[int, int], catalog: PriceCatalog, *,
           output: bool = False) -> Saved:
    """Calls that send ``less[i]`` fewer prompt (or, ``output``, completion) tokens."""
    saved = Saved(name)
    for i, n in less.items():
        if n > 0:
            kind = {"less_out" if output else "less_in": n}
            _add(saved, name, calls[i], _cheaper(catalog, calls[i], **kind), **kind)
    return saved


def saving_by_compression(calls: Sequence[Call], trimmable: dict[int, int],
                          catalog: PriceCatalog) -> Saved:
    return _fewer("compression", calls, trimmable, catalog)


def saving_by_routing(saving: dict[int, float]) -> Saved:
    """Calls moved to a cheaper model: the same tokens, a lower price."""
    return Saved("routing", requests=len(saving), usd=sum(saving.values()))


def output_caps(calls: Sequence[Call]) -> dict[str, float]:
    """Each feature's p95 output tokens, over calls with an answer."""
    lengths: dict[str, list[float]] = defaultdict(list)
    for c in calls:
        if c.body is not None and c.response is not None and c.usage is not None:
            lengths[c.feature].append(c.usage.output_tokens)
    return {f: percentile(v, 0.95) for f, v in lengths.items()}


def saving_by_budgets(calls: Sequence[Call], catalog: PriceCatalog) -> Saved:
    caps = output_caps(calls)
    beyond = {
        i: int(c.usage.output_tokens - caps[c.feature])
        for i, c in enumerate(calls)
        if c.body is not None and c.response is not None and c.usage is not None
    }
    return _fewer("token_budgets", calls, beyond, catalog, output=True)


def saving_by_batching(calls: Sequence[Call], system_tokens: dict[int, int],
                       catalog: PriceCatalog) -> Saved:
    """Calls of one feature, model and system prompt within the same minute: all but the first
    send their system prompt for nothing."""
    firsts: set[tuple[str, str, str, int]] = set()
    repeats: dict[int, int] = {}
    for i, c in enumerate(calls):
        if c.ts is None or i not in system_tokens:
            continue
        key = (c.feature, c.model, system_prompt(c), int(c.ts // BATCH_WINDOW_SECONDS))
        if key in firsts:
            repeats[i] = system_tokens[i]
        else:
            firsts.add(key)
    return _fewer("batching", calls, repeats, catalog)


def _streamed(call: Call) -> bool:
    return call.body is not None and call.body.get("stream") is True


def background_calls(calls: Sequence[Call]) -> list[int]:
    """The calls the batch API could take (see the module docstring): requests with a time, no
    end user and no stream, in a minute where their tenant, feature and model made at least
    :data:`BURST_CALLS` such calls."""
    minutes: dict[tuple[str, str, str, int], list[int]] = defaultdict(list)
    for i, c in enumerate(calls):
        if c.ts is None or c.user or not c.is_request or _streamed(c):
            continue
        minutes[(c.tenant, c.feature, c.model, int(c.ts // BATCH_WINDOW_SECONDS))].append(i)
    return sorted(i for members in minutes.values() if len(members) >= BURST_CALLS
                  for i in members)


def saving_by_batch_api(calls: Sequence[Call], catalog: PriceCatalog) -> Saved:
    """Background calls at the batch price (the catalog's, else the provider's
    ``batch_discount``): their cost less that, no token saved."""
    saved = Saved("batch_api")
    for i in background_calls(calls):
        call = calls[i]
        if call.cost is None or call.usage is None:
            continue
        batch = catalog.cost(call.model, call.usage, batch=True)
        if batch is not None and call.cost > batch:  # a ledger line paid at it saves nothing
            _add(saved, "batch_api", call, call.cost - batch)
    return saved
