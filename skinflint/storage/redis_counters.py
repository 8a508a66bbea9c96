"""Budget counters in Redis, shared by every gateway replica.

Each counter is a hash ``{prefix}b:{len(budget)}:{budget}:{window start}:{subject}`` holding
what was spent (``su``, ``sr``, ``st``: USD, requests, tokens) and reserved (``ru``, ``rr``,
``rt``), with the budget, subject and window for listing; it expires a day after its
window ends by the caller's clock (late settlements still land). ``{prefix}budgets`` scores
the counter keys by window end, for listing and sweeping. Admission runs as one Lua script
over every budget the request meets, with the arithmetic of
:func:`skinflint.storage.counters.admit`, so concurrent replicas never both take the last unit
of a budget. Like the cache's scripts, they need a single Redis server (or a primary with
replicas), not Redis Cluster.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from skinflint.errors import ConfigError
from skinflint.interfaces import Admission, Amounts, Claim, CounterRow
from skinflint.storage.counters import persist, unless_abandoned

__all__ = ["RedisBudgetCounters"]

log = logging.getLogger("skinflint.budgets")

_ERRORS = (RedisError, OSError)
_LATE_SECONDS = 86400  # a counter outlives its window by this much, for late settlements

# KEYS: one counter per claim, then the index. ARGV: now, late, then 11 values per claim:
# hard, limit usd/requests/tokens (-1: none), amount usd/requests/tokens, window end,
# budget, subject, window start. Returns {blocked (0: none, else 1-based), ratios before...,
# ratios after...} (ratios as strings: Redis would truncate numbers to integers).
_RESERVE = """
local n = #KEYS - 1
local now = tonumber(ARGV[1])
local function ratio(lim, value)
  if lim < 0 then return 0 end
  if lim == 0 then if value > 0 then return math.huge else return 0 end end
  return value / lim
end
local function used(l, u, r, t)
  return math.max(ratio(l[1], u), ratio(l[2], r), ratio(l[3], t))
end
local before, after, state = {}, {}, {}
for i = 1, n do
  local a = 2 + (i - 1) * 11
  local c = redis.call('HMGET', KEYS[i], 'su', 'sr', 'st', 'ru', 'rr', 'rt')
  for j = 1, 6 do c[j] = tonumber(c[j]) or 0 end
  local l = {tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])}
  local u, r, t = c[1] + c[4], c[2] + c[5], c[3] + c[6]
  before[i] = tostring(used(l, u, r, t))
  u = u + tonumber(ARGV[a + 5]); r = r + tonumber(ARGV[a + 6]); t = t + tonumber(ARGV[a + 7])
  if ARGV[a + 1] == '1' and ((l[1] >= 0 and u > l[1] + 1e-8) or (l[2] >= 0 and r > l[2])
      or (l[3] >= 0 and t > l[3])) then
    return {i}
  end
  after[i] = tostring(used(l, u, r, t))
end
redis.call('ZREMRANGEBYSCORE', KEYS[n + 1], '-inf', '(' .. ARGV[1])
for i = 1, n do
  local a = 2 + (i - 1) * 11
  local key, ends = KEYS[i], tonumber(ARGV[a + 8])
  redis.call('HINCRBYFLOAT', key, 'ru', ARGV[a + 5])
  redis.call('HINCRBY', key, 'rr', ARGV[a + 6])
  redis.call('HINCRBY', key, 'rt', ARGV[a + 7])
  redis.call('HSET', key, 'b', ARGV[a + 9], 's', ARGV[a + 10], 'ws', ARGV[a + 11],
             'we', ARGV[a + 8])
  redis.call('EXPIRE', key, math.ceil(ends - now + tonumber(ARGV[2])))
  redis.call('ZADD', KEYS[n + 1], ends, key)
end
local out = {0}
for i = 1, n do out[#out + 1] = before[i] end
for i = 1, n do out[#out + 1] = after[i] end
return out
"""
# KEYS: counters. ARGV: 6 values per counter: reserved usd/requests/tokens, spent the same.
_SETTLE = """
for i = 1, #KEYS do
  local key, a = KEYS[i], (i - 1) * 6
  if redis.call('EXISTS', key) == 1 then
    local c = redis.call('HMGET', key, 'ru', 'rr', 'rt')
    redis.call('HSET', key,
      'ru', tostring(math.max((tonumber(c[1]) or 0) - tonumber(ARGV[a + 1]), 0)),
      'rr', math.max((tonumber(c[2]) or 0) - tonumber(ARGV[a + 2]), 0),
      'rt', math.max((tonumber(c[3]) or 0) - tonumber(ARGV[a + 3]), 0))
    redis.call('HINCRBYFLOAT', key, 'su', ARGV[a + 4])
    redis.call('HINCRBY', key, 'sr', ARGV[a + 5])
    redis.call('HINCRBY', key, 'st', ARGV[a + 6])
  end
end
return 0
"""


def _limit(value: float | None) -> float:
    return -1 if value is None else value


class RedisBudgetCounters:
    """Counters in Redis; see the module docstring. Owns its connection pool."""

    def __init__(self, client: aioredis.Redis, *, prefix: str = "skinflint:") -> None:
        self._client = client
        self._prefix = prefix
        self._index = f"{prefix}budgets"
        self._reserve = client.register_script(_RESERVE)
        self._settle = client.register_script(_SETTLE)
        self._pending: set[asyncio.Task[Any]] = set()

    @classmethod
    async def create(cls, url: str, *, prefix: str = "skinflint:",
                     timeout: float = 5.0) -> RedisBudgetCounters:
        """Connect and check the server answers. Raises ConfigError when it does not."""
        client = aioredis.Redis.from_url(url, socket_timeout=timeout,
                                         socket_connect_timeout=timeout)
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise ConfigError(f"storage.redis_url: cannot reach redis: {exc}") from exc
        return cls(client, prefix=prefix)

    def _key(self, claim: Claim) -> str:
        b = claim.budget
        return f"{self._prefix}b:{len(b)}:{b}:{claim.window_start!r}:{claim.subject}"

    async def reserve(self, claims: Sequence[Claim], now: float) -> Admission:
        return await unless_abandoned(self._admit(claims, now),
                                      lambda: self.settle(claims, Amounts()), _ERRORS)

    async def _admit(self, claims: Sequence[Claim], now: float) -> Admission:
        args: list[Any] = [repr(now), _LATE_SECONDS]
        for c in claims:
            lim, a = c.limits, c.amount
            args += ["1" if c.hard else "0", _limit(lim.usd), _limit(lim.requests),
                     _limit(lim.tokens), repr(a.usd), a.requests, a.tokens, repr(c.window_end),
                     c.budget, c.subject, repr(c.window_start)]
        keys = [*map(self._key, claims), self._index]
        found = await self._reserve(keys=keys, args=args)
        blocked = int(found[0])
        if blocked:
            return Admission(blocked - 1, (), ())
        ratios = tuple(float(v) for v in found[1:])
        return Admission(None, ratios[:len(claims)], ratios[len(claims):])

    def settle(self, claims: Sequence[Claim], actual: Amounts) -> None:
        args: list[Any] = []
        for c in claims:
            args += [repr(c.amount.usd), c.amount.requests, c.amount.tokens,
                     repr(actual.usd), actual.requests, actual.tokens]
        task = asyncio.ensure_future(self._apply(list(map(self._key, claims)), args))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _apply(self, keys: list[str], args: list[Any]) -> None:
        async def write() -> None:
            await self._settle(keys=keys, args=args)

        await persist(write, _ERRORS)

    async def snapshot(self, now: float) -> list[CounterRow]:
        if self._pending:  # this process's settlements first
            await asyncio.gather(*self._pending, return_exceptions=True)
        keys = [k for k in await self._client.zrangebyscore(self._index, f"({now!r}", "+inf")
                if isinstance(k, bytes | str)]
        if not keys:
            return []
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            found = await pipe.execute()
        return [_row(h) for h in found if h]

    async def close(self) -> None:
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        await self._client.aclose()


def _row(h: dict[Any, Any]) -> CounterRow:
    v = {(k.decode() if isinstance(k, bytes) else k): (x.decode() if isinstance(x, bytes) else x)
         for k, x in h.items()}

    def num(name: str) -> float:
        return float(v.get(name) or 0)

    return CounterRow(v["b"], v["s"], num("ws"), num("we"),
                      Amounts(num("su"), int(num("sr")), int(num("st"))),
                      Amounts(num("ru"), int(num("rr")), int(num("rt"))))
