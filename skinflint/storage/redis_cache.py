"""A :class:`~skinflint.interfaces.CacheStore` in Redis, shared by every gateway replica.

Layout under a key prefix (``skinflint:`` by default, so environments can share a server):

* ``{prefix}c:{key}``: a hash with the value ``v``, the expiry ``e`` (unix seconds, 0 = never)
  and the tags ``t`` (a JSON list);
* ``{prefix}t:{tag}``: the set of entry keys carrying the tag;
* ``{prefix}written``: entry keys scored by a write counter (``{prefix}seq``), oldest first.

A write, an invalidation and an eviction each run as one Lua script, so replicas never see an
entry without its tags or a tag pointing at a half-written entry. ``max_entries`` is enforced on
every write by dropping the oldest writes, and expiry is checked on read against the caller's
clock (as every store does); expired entries keep their slot until evicted, like the other
stores, so memory stays bounded by ``max_entries``. The scripts touch keys they derive from the
entry's tags, so the store needs a single Redis server (or a primary with replicas), not Redis
Cluster. The server must not evict keys on its own (``maxmemory-policy`` ``noeviction`` or a
``volatile-*`` policy; nothing here has a TTL): an ``allkeys-*`` policy could drop a tag's set
and leave its entries out of reach of invalidation, so :meth:`RedisCacheStore.create` warns.

Reads and writes turn Redis failures into misses (logged): the cache saves money and must not
take the gateway down. After three failures in a row (a hung server costs ``op_timeout``
each) reads and writes skip Redis for a few seconds, then one call probes it and a success
resumes normal service (:class:`~skinflint.storage.breaker.Breaker`). Invalidation and stats
always go to Redis, and raise.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from skinflint.errors import ConfigError
from skinflint.interfaces import CacheEntry
from skinflint.storage.breaker import Breaker

__all__ = ["RedisCacheStore"]

log = logging.getLogger("skinflint.storage")

# drop(entry): forget an entry and its tag memberships; 1 when it existed.
_DROP = """
local function drop(prefix, written, entry)
  local tags = redis.call('HGET', entry, 't')
  if tags then
    for _, tag in ipairs(cjson.decode(tags)) do
      redis.call('SREM', prefix .. 't:' .. tag, entry)
    end
  end
  redis.call('ZREM', written, entry)
  return redis.call('DEL', entry)
end
"""
# KEYS: entry, written, seq. ARGV: prefix, value, expires_at, max_entries, tags...
_SET = _DROP + """
local prefix, entry, written = ARGV[1], KEYS[1], KEYS[2]
drop(prefix, written, entry)
local tags = {}
for i = 5, #ARGV do tags[#tags + 1] = ARGV[i] end
redis.call('HSET', entry, 'v', ARGV[2], 'e', ARGV[3], 't', cjson.encode(tags))
for _, tag in ipairs(tags) do redis.call('SADD', prefix .. 't:' .. tag, entry) end
redis.call('ZADD', written, redis.call('INCR', KEYS[3]), entry)
local evicted = 0
local excess = redis.call('ZCARD', written) - tonumber(ARGV[4])
if excess > 0 then
  local oldest = redis.call('ZRANGE', written, 0, excess - 1)
  for _, victim in ipairs(oldest) do evicted = evicted + drop(prefix, written, victim) end
end
return evicted
"""
# KEYS: written. ARGV: prefix, tags...
_INVALIDATE = _DROP + """
local prefix, written, dropped = ARGV[1], KEYS[1], 0
for i = 2, #ARGV do
  local tag_key = prefix .. 't:' .. ARGV[i]
  for _, entry in ipairs(redis.call('SMEMBERS', tag_key)) do
    dropped = dropped + drop(prefix, written, entry)
  end
  redis.call('DEL', tag_key)
end
return dropped
"""


def _where(url: str) -> str:
    """Host, port and database of a Redis URL, without user or password (in either place)."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.hostname or ''}{port}{parts.path}"


async def _check_eviction_policy(client: aioredis.Redis, url: str) -> None:
    try:
        found = await client.config_get("maxmemory-policy")
    except (RedisError, OSError):  # managed servers may refuse CONFIG
        return
    policy = " ".join(str(v) for v in dict(found).values())  # str or bytes, by client version
    if "allkeys" in policy:
        log.warning(
            "redis at %s evicts any key (maxmemory-policy %s): it may drop the sets that "
            "invalidation reads; use noeviction or a volatile-* policy", _where(url), policy)


class RedisCacheStore:
    """Entries in Redis; see the module docstring. Owns its connection pool."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str = "skinflint:", max_entries: int = 200_000,
        **breaker: Any,
    ) -> None:
        self.max_entries = max_entries
        self._breaker = Breaker("redis", (RedisError, OSError), **breaker)
        self.evictions = 0
        self._client = client
        self._prefix = prefix
        self._written = f"{prefix}written"
        self._seq = f"{prefix}seq"
        self._set = client.register_script(_SET)
        self._invalidate = client.register_script(_INVALIDATE)

    @classmethod
    async def create(
        cls, url: str, *, prefix: str = "skinflint:", max_entries: int = 200_000,
        timeout: float = 5.0, op_timeout: float = 1.0, pool_size: int = 32, **breaker: Any,
    ) -> RedisCacheStore:
        """Connect and check the server answers. Raises ConfigError when it does not.

        At most ``pool_size`` connections are opened; a request that finds them all busy waits
        for one rather than opening another. A command that takes longer than ``op_timeout``
        fails (a read becomes a miss): a hung server must not hold every request for long.
        ``breaker`` passes ``limit``, ``cooldown`` and ``clock`` on to the store's
        :class:`~skinflint.storage.breaker.Breaker`."""
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=pool_size, timeout=op_timeout, socket_timeout=op_timeout,
            socket_connect_timeout=timeout, health_check_interval=30,
        )
        client = aioredis.Redis.from_pool(pool)  # the client owns and closes the pool
        try:
            await client.ping()
        except (RedisError, OSError) as exc:
            await client.aclose()
            raise ConfigError(
                f"storage.redis_url: cannot reach redis at {_where(url)}: {exc}") from exc
        await _check_eviction_policy(client, url)
        return cls(client, prefix=prefix, max_entries=max_entries, **breaker)

    def _key(self, key: str) -> str:
        return f"{self._prefix}c:{key}"

    async def get(self, key: str, now: float) -> bytes | None:
        """The live value under ``key``, or None (also when Redis fails or is skipped)."""
        if not self._breaker.allows():
            return None
        with self._breaker.guard("cache get"):
            value, expires = await self._client.hmget(self._key(key), ["v", "e"])
            if value is None or (expires is not None and 0 < float(expires) <= now):
                return None
            return value.encode() if isinstance(value, str) else bytes(value)
        return None

    async def set(self, entry: CacheEntry) -> None:
        """Store ``entry``, replacing its value and tags; a Redis failure is logged only."""
        if self.max_entries <= 0 or not self._breaker.allows():
            return
        with self._breaker.guard("cache set"):
            args: list[Any] = [
                self._prefix, entry.value, repr(entry.expires_at), self.max_entries, *entry.tags
            ]
            keys = [self._key(entry.key), self._written, self._seq]
            self.evictions += int(await self._set(keys=keys, args=args))

    async def invalidate_tags(self, tags: Sequence[str]) -> int:
        if not tags:
            return 0
        return int(await self._invalidate(keys=[self._written], args=[self._prefix, *tags]))

    async def stats(self) -> dict[str, int]:
        entries = await self._client.zcard(self._written)
        return {"entries": int(entries), "evictions": self.evictions}

    async def close(self) -> None:
        await self._client.aclose()
