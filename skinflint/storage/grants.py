"""Grants: a small share of what remains of a budget, reserved in the shared counters by one
process ahead of time, from which that process then admits requests without a round trip to
the store.

Exactness is kept because a grant is reserved like a request: the shared counter holds, for
every process, the grants it holds plus what its requests reserved beyond them, so no process
can admit what another one was granted. The cost is the share another process holds unused:
it is bounded by taking grants only far from a limit, and small ones:

* a grant is taken only when what remains, once the request that takes it is admitted, is at
  least :data:`SHARE` ``**-1`` times that request's amount in each limited figure; nearer the
  limit every request goes to the store, so the last requests of a budget are admitted one
  by one, exactly as without grants;
* it is :data:`SHARE` of what remains, and at most :data:`MOST` times the request's amount;
* it lasts :data:`SECONDS`, then what is left of it is given back.

A budget's alert marks are computed from the counter as the grant found it plus what this
process took from the grant since, so two processes may each report crossing the same mark
while they hold grants: alerts are logged and counted, never a decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from skinflint.interfaces import Amounts, Claim, Limits

__all__ = ["MOST", "SECONDS", "SHARE", "Grant", "grant_for", "limited"]

SHARE = 1 / 64  # of what remains
MOST = 256  # the requesting claim's amounts, at the most
SECONDS = 1.0  # how long a grant lasts


@dataclass(slots=True)
class Grant:
    """What one process may still admit from (``left_*``), what its requests took from it so
    far (``taken_*``), and the counter's used amounts (spent + reserved) when it was taken,
    without the grant (``base_*``)."""

    limits: Limits
    expires: float  # time.monotonic()
    base_usd: float
    base_requests: int
    base_tokens: int
    left_usd: float
    left_requests: int
    left_tokens: int
    taken_usd: float = 0.0
    taken_requests: int = 0
    taken_tokens: int = 0
    live: bool = True  # False once given back: what its requests settle is released in full

    def covers(self, a: Amounts, now: float) -> bool:
        return (self.live and now < self.expires and a.usd <= self.left_usd
                and a.requests <= self.left_requests and a.tokens <= self.left_tokens)

    def take(self, a: Amounts) -> tuple[float, float]:
        """Admit ``a`` from the grant; the budget's used fraction before and after."""
        lim = self.limits
        usd = self.base_usd + self.taken_usd
        requests = self.base_requests + self.taken_requests
        tokens = self.base_tokens + self.taken_tokens
        before = lim.ratio(usd, requests, tokens)
        after = lim.ratio(usd + a.usd, requests + a.requests, tokens + a.tokens)
        self.left_usd -= a.usd
        self.left_requests -= a.requests
        self.left_tokens -= a.tokens
        self.taken_usd += a.usd
        self.taken_requests += a.requests
        self.taken_tokens += a.tokens
        return before, after

    def give_back(self, a: Amounts) -> None:
        """What a request took and did not spend returns to the grant."""
        self.left_usd += a.usd
        self.left_requests += a.requests
        self.left_tokens += a.tokens

    def held(self) -> Amounts:
        """What the grant still holds in the shared counter."""
        return limited(self.limits, Amounts(max(self.left_usd, 0.0), max(self.left_requests, 0),
                                            max(self.left_tokens, 0)))


def grant_for(claim: Claim, used: Amounts, now: float) -> Grant | None:
    """The grant to take for ``claim``, whose amount is admitted and counted in ``used`` (spent
    + reserved), or None when its budget is too near a limit (see the module)."""
    lim, a = claim.limits, claim.amount
    left: list[float] = []
    for limit, total, amount in ((lim.usd, used.usd, a.usd),
                                 (lim.requests, used.requests, a.requests),
                                 (lim.tokens, used.tokens, a.tokens)):
        if limit is None:
            left.append(float("inf"))  # not limited: not counted against the grant
            continue
        remaining = limit - total
        if remaining <= 0 or remaining * SHARE < amount:
            return None
        left.append(min(remaining * SHARE, amount * MOST))
    usd, requests, tokens = left
    return Grant(lim, now + SECONDS, used.usd, used.requests, used.tokens,
                 usd, _whole(requests), _whole(tokens))


def _whole(n: float) -> int:
    return 2**62 if n == float("inf") else int(n)


def limited(limits: Limits, a: Amounts) -> Amounts:
    """``a`` in the figures ``limits`` limits, 0 in the others: a grant reserves, and its
    requests consume from it, only what is limited (the rest is counted when spent)."""
    return Amounts(a.usd if limits.usd is not None else 0.0,
                   a.requests if limits.requests is not None else 0,
                   a.tokens if limits.tokens is not None else 0)
