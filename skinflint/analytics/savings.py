"""Tokens and dollars saved, per strategy: the one definition that ``skinflint demo``,
``skinflint replay`` and ``skinflint audit`` share.

Against the baseline (the request as the client sent it, answered by the baseline model):

* **tokens saved** = the tokens the baseline call would have had a provider process (prompt and
  completion, counted apart) less the tokens providers processed for the request;
* **dollars saved** = what the baseline call would have cost less what was paid.

Each strategy changes that in one way (:data:`EFFECTS`, :func:`tokens_saved`):

* a **whole call** not made (``exact_cache``, ``semantic_cache``, ``rule``): every prompt and
  completion token, and the baseline's whole price;
* **tokens removed** from a call still made (``compression``, ``batching`` and ``batch_map``:
  prompt tokens; ``token_budgets``: completion tokens beyond the cap): those tokens, at the
  baseline's rate (a ``batch_map`` row's ``saved_usd`` already prices them: each item asked
  alone, against its share of the packed call);
* **price only** (``route``, ``routing``, ``cascade``): the same tokens to a cheaper model, so no
  token is saved, only the difference in price; the tiers a cascade escalated from processed
  tokens on top, which count against it (tokens saved below zero) as their cost does;
* **price only** also for ``batch`` (and the audit's projection of it, ``batch_api``): the
  same tokens through a provider's batch API, at its discount;
* **extra calls** (``shadow``: the uncompressed call and judge the shadow guard makes;
  ``compress_call``: the cheap model's rewrites and summaries): their tokens and cost count
  against the saving.

Strategies are applied in pipeline order, so the parts add up to the whole: compression
removes prompt tokens from the baseline request (priced at the baseline's prompt rate), then
routing prices what is left (the ledger's ``saved_usd``, measured on the tokens sent).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from skinflint.models import (
    CASCADE_ATTEMPT,
    COMPRESS_CALL,
    SHADOW_CALL,
    LedgerRecord,
    Usage,
    is_attempt,
)
from skinflint.pricing import PriceCatalog

__all__ = ["EFFECTS", "NO_STRATEGY", "Saved", "baseline_prompt_usd", "ledger_savings",
           "savings_json", "token_totals", "tokens_saved"]

#: How the strategy of a plain call to the provider (the ledger's "") is shown.
NO_STRATEGY = "none"
WHOLE_CALL = "whole call not made"
REMOVED = "tokens removed from the call"
PRICE_ONLY = "price only"
EXTRA_CALLS = "extra calls"

#: What each strategy saves; a strategy not named here saves price only.
EFFECTS: dict[str, str] = {
    "exact_cache": WHOLE_CALL,
    "semantic_cache": WHOLE_CALL,
    "rule": WHOLE_CALL,
    "compression": REMOVED,
    "batching": REMOVED,
    "batch_map": REMOVED,
    "token_budgets": REMOVED,
    "batch": PRICE_ONLY,
    "batch_api": PRICE_ONLY,
    "route": PRICE_ONLY,
    "routing": PRICE_ONLY,
    "cascade": PRICE_ONLY,
    NO_STRATEGY: PRICE_ONLY,
    SHADOW_CALL: EXTRA_CALLS,
    COMPRESS_CALL: EXTRA_CALLS,
}

#: Strategies whose ledger rows' ``tokens_saved`` are their own saving, not compression's.
OWN_TOKENS_SAVED = frozenset({"batch_map"})


@dataclass
class Saved:
    """What one strategy saved: over ``requests`` requests (for ``shadow``, calls), ``input``
    prompt and ``output`` completion tokens (below zero: spent on top) and ``usd`` dollars."""

    strategy: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    usd: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.strategy, "requests": self.requests,
                "input_tokens_saved": self.input_tokens,
                "output_tokens_saved": self.output_tokens, "tokens_saved": self.tokens,
                "saved_usd": self.usd, "effect": EFFECTS.get(self.strategy, PRICE_ONLY)}


def tokens_saved(strategy: str, *, input_tokens: int, output_tokens: int,
                 removed_input: int = 0, removed_output: int = 0) -> tuple[int, int]:
    """The (prompt, completion) tokens ``strategy`` saved on one call of ``input_tokens`` and
    ``output_tokens``: all of them when it made the call needless, ``removed_*`` when it took
    tokens out of a call still made, none when it only changed the price."""
    effect = EFFECTS.get(strategy, PRICE_ONLY)
    if effect == WHOLE_CALL:
        return input_tokens, output_tokens
    if effect == REMOVED:
        return removed_input, removed_output
    if effect == EXTRA_CALLS:
        return -input_tokens, -output_tokens
    return 0, 0


def ledger_savings(rows: Iterable[LedgerRecord],
                   prompt_usd: Callable[[LedgerRecord], float] | None = None,
                   name: Callable[[LedgerRecord], str] | None = None) -> list[Saved]:
    """Each strategy's saving over ledger rows, biggest dollar saving first. A client row
    counts under its strategy, with ``saved_usd`` as its dollars; the prompt tokens it was
    compressed by count under ``compression`` at ``prompt_usd`` a token (the baseline's
    prompt rate for that row; None: not priced); a cascade tier or retried call counts its
    tokens against the strategy of its request (its cost is in that request's
    ``saved_usd``); a shadow call counts its tokens and cost against ``shadow``. ``name``
    names a client row's strategy (default: its ledger ``strategy``)."""
    rows = list(rows)
    name_of = name or _ledger_name
    parents = {r.request_id: name_of(r) for r in rows if not is_attempt(r.strategy)}
    out: dict[str, Saved] = {}
    dollars: dict[str, list[float]] = {}  # summed with fsum: the same whatever the rows' order

    def add(key: str, inp: int, outp: int, usd: float, requests: int = 1) -> None:
        s = out.setdefault(key, Saved(key))
        s.requests += requests
        s.input_tokens += inp
        s.output_tokens += outp
        dollars.setdefault(key, []).append(usd)

    for r in rows:
        if EFFECTS.get(r.strategy) == EXTRA_CALLS:
            inp, outp = tokens_saved(r.strategy, input_tokens=r.input_tokens,
                                     output_tokens=r.output_tokens)
            add(r.strategy, inp, outp, -(r.cost_usd or 0.0))
        elif is_attempt(r.strategy):
            fallback = "cascade" if r.strategy == CASCADE_ATTEMPT else NO_STRATEGY
            add(parents.get(r.request_id.split(".")[0], fallback),
                -r.input_tokens, -r.output_tokens, 0.0, requests=0)
        else:
            own = r.tokens_saved if r.strategy in OWN_TOKENS_SAVED else 0
            inp, outp = tokens_saved(name_of(r), input_tokens=r.input_tokens,
                                     output_tokens=r.output_tokens, removed_input=own)
            add(name_of(r), inp, outp, r.saved_usd or 0.0)
            if r.tokens_saved and not own:
                usd = r.tokens_saved * prompt_usd(r) if prompt_usd is not None else 0.0
                add("compression", *tokens_saved("compression", input_tokens=r.input_tokens,
                                                 output_tokens=r.output_tokens,
                                                 removed_input=r.tokens_saved), usd)
    for key, s in out.items():
        s.usd = math.fsum(dollars[key])
    return sorted(out.values(), key=lambda s: (-s.usd, -s.tokens, s.strategy))


def _ledger_name(r: LedgerRecord) -> str:
    return r.strategy or NO_STRATEGY


def baseline_prompt_usd(catalog: PriceCatalog, baseline_model: str | None,
                        route_baselines: dict[str, str]) -> Callable[[LedgerRecord], float]:
    """A row's baseline prompt rate in dollars a token, as the account stage picks the
    baseline: the route's, else the configured one, else the model asked for (0.0 when the
    catalog has no price for it)."""
    million = Usage(input_tokens=1_000_000)

    def rate(r: LedgerRecord) -> float:
        model = route_baselines.get(r.requested_model) or baseline_model or r.requested_model
        return (catalog.cost(model, million) or 0.0) / 1_000_000

    return rate


def token_totals(rows: Iterable[LedgerRecord]) -> dict[str, int]:
    """Tokens the baseline would have had processed (every client request's prompt, as sent
    before compression, and answer), those providers processed (cache hits and rules none;
    cascade tiers, retried and shadow calls on top), and the difference: the sum of what
    :func:`ledger_savings` gives each strategy."""
    rows = list(rows)
    baseline = sum(r.input_tokens + r.tokens_saved + r.output_tokens
                   for r in rows if not is_attempt(r.strategy))
    processed = sum(r.input_tokens + r.output_tokens for r in rows
                    if not r.cache_status.startswith("hit") and r.strategy != "rule")
    return {"baseline": baseline, "processed": processed, "saved": baseline - processed}


def savings_json(saved: Iterable[Saved]) -> list[dict[str, Any]]:
    return [s.as_dict() for s in saved]
