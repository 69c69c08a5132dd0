"""Limits shared by several gateway instances through Redis: the same rules as limits.py's
LocalLimiter, checked and taken by one Lua script and settled by another, atomically and on Redis'
clock (see limits.py for what is counted and when).

While Redis cannot be reached, each limit fails open (admitted, holding and charging nothing) or
closed (503, `limits_unavailable`) as `limits.on_store_down` says: by default the request rate and
tokens per minute fail open, a monthly budget closed. Each decision is counted
(`slipway_gateway_limits_store_down_total{decision}`) and logged at most every 10 s.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from configs.gateway import OutagePolicy, Tenant
from configs.pricing import NANOS_PER_USD
from serving.gateway.errors import Unavailable
from serving.gateway.limits import (
    Hold,
    Usage,
    budget_nanos,
    denied,
    metered,
    month_of,
    seconds_to_next_month,
)
from serving.gateway.quota import Quota, Window

log = logging.getLogger("serving.gateway")

# Buckets are hashes of second -> count: `used` drops those at or before a horizon, sums the rest.
_USED = """
local now = tonumber(redis.call('TIME')[1])
local function used(key, horizon)
  local total, oldest = 0, now
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local s = tonumber(flat[i])
    if s <= horizon then
      redis.call('HDEL', key, flat[i])
    else
      total = total + tonumber(flat[i + 1])
      if s < oldest then oldest = s end
    end
  end
  return total, oldest
end
"""

# KEYS: requests, tokens and held buckets, budget counter, money counter, money held buckets,
# in-flight buckets. ARGV: rpm, tpm, budget (0 = none), reserved, hold ttl, money budget in
# nano-dollars (0 = none), reserved nano-dollars, max in flight (0 = none). Returns the reason and
# a retry-after, or 'ok', the second the reservation is held in, and the requests and tokens left
# in the minute with their resets (-1: no such limit).
_ADMIT = (
    _USED
    + """
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local money, reserved_nanos = tonumber(ARGV[6]), tonumber(ARGV[7])
local most = tonumber(ARGV[8])
if most > 0 and used(KEYS[7], now - ttl) >= most then return {'inflight', 1} end
if money > 0 then
  local spent = tonumber(redis.call('GET', KEYS[5]) or '0')
  if spent + used(KEYS[6], now - ttl) + reserved_nanos > money then return {'money', 0} end
end
local committed = reserved
if tpm > 0 or budget > 0 then committed = committed + used(KEYS[3], now - ttl) end
if budget > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') + committed > budget then
  return {'budget', 0}
end
local tokens_left, tokens_reset, requests_left, requests_reset = -1, 0, -1, 0
if tpm > 0 then
  local total, oldest = used(KEYS[2], now - 60)
  if total + committed > tpm then
    if total == 0 then return {'tpm', 1} end
    return {'tpm', oldest + 60 - now}
  end
  tokens_left = tpm - total - committed
  if total > 0 then tokens_reset = oldest + 60 - now end
end
if rpm > 0 then
  local total, oldest = used(KEYS[1], now - 60)
  if total >= rpm then return {'rpm', oldest + 60 - now} end
  redis.call('HINCRBY', KEYS[1], now, 1)
  redis.call('EXPIRE', KEYS[1], 120)
  requests_left = rpm - total - 1
  requests_reset = (total > 0 and oldest or now) + 60 - now
end
if tpm > 0 or budget > 0 then
  redis.call('HINCRBY', KEYS[3], now, reserved)
  redis.call('EXPIRE', KEYS[3], ttl)
end
if money > 0 then
  redis.call('HINCRBY', KEYS[6], now, reserved_nanos)
  redis.call('EXPIRE', KEYS[6], ttl)
end
if most > 0 then
  redis.call('HINCRBY', KEYS[7], now, 1)
  redis.call('EXPIRE', KEYS[7], ttl)
end
return {'ok', now, requests_left, requests_reset, tokens_left, tokens_reset}
"""
)

# KEYS: tokens and held buckets, budget counter, money counter, money held buckets, in-flight
# buckets. ARGV: reserved, the second it is held in, tokens used, charge tpm (0/1), charge budget
# (0/1), reserved nano-dollars, nano-dollars charged, release one in flight (0/1). A hold already
# gone (past its ttl) or never taken (Redis was down at admission) releases nothing.
_SETTLE = """
local now = tonumber(redis.call('TIME')[1])
local function release(key, amount)
  if amount <= 0 then return end
  local left = tonumber(redis.call('HGET', key, ARGV[2]) or '0') - amount
  if left > 0 then
    redis.call('HSET', key, ARGV[2], left)
  else
    redis.call('HDEL', key, ARGV[2])
  end
end
local n, nanos = tonumber(ARGV[3]), tonumber(ARGV[7])
release(KEYS[2], tonumber(ARGV[1]))
release(KEYS[5], tonumber(ARGV[6]))
release(KEYS[6], tonumber(ARGV[8]))
if n > 0 and ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], now, n)
  redis.call('EXPIRE', KEYS[1], 120)
end
if n > 0 and ARGV[5] == '1' then
  redis.call('INCRBY', KEYS[3], n)
  redis.call('EXPIRE', KEYS[3], 3024000)
end
if nanos > 0 then
  redis.call('INCRBY', KEYS[4], nanos)
  redis.call('EXPIRE', KEYS[4], 3024000)
end
return 1
"""


_LOG_EVERY_S = 10.0  # while Redis is down, one log line per this long, not one per request


# KEYS: as _ADMIT's. ARGV: hold ttl. What is used now.
_USAGE = (
    _USED
    + """
local horizon = now - tonumber(ARGV[1])
return {used(KEYS[1], now - 60), used(KEYS[2], now - 60), used(KEYS[3], horizon),
        tonumber(redis.call('GET', KEYS[4]) or '0'), used(KEYS[6], horizon),
        tonumber(redis.call('GET', KEYS[5]) or '0')}
"""
)


class RedisLimiter:
    def __init__(
        self, url: str, prefix: str, hold_ttl_s: int, on_down: OutagePolicy | None = None
    ) -> None:
        self._url = url
        self._prefix = prefix
        self._hold_ttl_s = hold_ttl_s
        self._on_down = on_down or OutagePolicy()
        self.outages: Counter[str] = Counter()  # requests decided while Redis was down, by decision
        self._logged_at = -_LOG_EVERY_S
        self._pool: aioredis.BlockingConnectionPool | None = None
        self._redis: aioredis.Redis | None = None

    async def open(self) -> None:
        # Connections belong to the event loop that serves requests, so they are made in it.
        # A bounded pool makes callers wait for a free connection instead of failing.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            self._url, max_connections=64, timeout=5
        )
        self._redis = aioredis.Redis(connection_pool=self._pool)
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._usage = self._redis.register_script(_USAGE)

    def _keys(self, tenant: Tenant, now: float) -> list[str]:
        """Requests, tokens and held buckets, this month's budget and money counters, and the
        money held buckets."""
        base, month = f"{self._prefix}{tenant.name}:", month_of(now)
        return [
            base + "rpm",
            base + "tpm",
            base + "held",
            f"{base}budget:{month}",
            f"{base}money:{month}",
            base + "money-held",
            base + "inflight",
        ]

    async def admit(self, tenant: Tenant, reserved: int, nanos: int = 0) -> Hold | None:
        """Take one request and hold `reserved` tokens and `nanos` nano-dollars, or raise
        RateLimited; None: nothing held (no limits, or Redis unreachable)."""
        if tenant.rpm is None and tenant.max_inflight is None and not metered(tenant):
            return None
        now = time.time()
        money = budget_nanos(tenant)
        args = [
            tenant.rpm or 0,
            tenant.tpm or 0,
            tenant.monthly_token_budget or 0,
            reserved,
            self._hold_ttl_s,
            money or 0,
            nanos if money else 0,
            tenant.max_inflight or 0,
        ]
        try:
            reason, value, *left = await self._admit(keys=self._keys(tenant, now), args=args)
        except RedisError as e:
            return self._store_down(tenant, e)
        if reason != b"ok":
            kind = reason.decode()
            monthly = kind in ("budget", "money")  # "inflight": retry after 1 s
            wait = seconds_to_next_month(now) if monthly else max(1, int(value))
            raise denied(kind, tenant, wait)
        requests_left, requests_reset, tokens_left, tokens_reset = (int(v) for v in left)
        quota = Quota(
            Window(tenant.rpm, requests_left, requests_reset) if tenant.rpm else None,
            Window(tenant.tpm, tokens_left, tokens_reset) if tenant.tpm else None,
        )
        holds_tokens = tenant.tpm is not None or tenant.monthly_token_budget is not None
        return Hold(
            reserved if holds_tokens else 0,
            int(value),
            quota,
            nanos if money else 0,
            tenant.max_inflight is not None,
        )

    def _store_down(self, tenant: Tenant, error: RedisError) -> None:
        """Admit holding nothing, unless a limit of the tenant fails closed (503)."""
        on_down = self._on_down
        closed = [
            limit
            for limit in ("rpm", "tpm", "monthly_token_budget", "monthly_budget_usd")
            if getattr(tenant, limit) is not None and getattr(on_down, limit) == "closed"
        ]
        decision = "refused" if closed else "admitted"
        self.outages[decision] += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.error(
                "rate-limit store unreachable (%s): limits fail as limits.on_store_down says "
                "(so far %d requests admitted, %d refused); tenant '%s' %s",
                error,
                self.outages["admitted"],
                self.outages["refused"],
                tenant.name,
                decision,
            )
        if closed:
            raise Unavailable(
                f"the limits store cannot be reached, and tenant '{tenant.name}'s "
                f"{' and '.join(closed)} fails closed until it answers; retry shortly",
                code="limits_unavailable",
                retry_after=1,
            )

    async def settle(self, tenant: Tenant, hold: Hold | None, tokens: int, nanos: int = 0) -> None:
        """Release the request's hold and charge the tokens it used and what they cost, in one
        script."""
        inflight = hold is not None and hold.inflight
        tokens = tokens if metered(tenant) else 0
        if not inflight and (not metered(tenant) or (hold is None and tokens <= 0)):
            return
        _, *keys = self._keys(tenant, time.time())  # all but the requests' buckets
        reserved, second, held_nanos = (
            (hold.tokens, hold.second, hold.nanos) if hold is not None else (0, 0, 0)
        )
        args = [
            reserved,
            second,
            max(0, tokens),
            int(tenant.tpm is not None),
            int(tenant.monthly_token_budget is not None),
            held_nanos,
            max(0, nanos),  # 0 without a money budget (limits.charge)
            int(inflight),
        ]
        try:
            await self._settle(keys=keys, args=args)
        except RedisError as e:
            log.error(
                "rate-limit store unreachable, %d tokens of '%s' not charged (its hold of %d "
                "lapses after %d s): %s",
                tokens,
                tenant.name,
                reserved,
                self._hold_ttl_s,
                e,
            )

    async def usage(self, tenant: Tenant) -> Usage:
        """What the tenant has used; a 503 while Redis cannot be reached."""
        now = time.time()
        try:
            counts = await self._usage(keys=self._keys(tenant, now), args=[self._hold_ttl_s])
        except RedisError as e:
            raise Unavailable(
                f"the limits store cannot be reached ({e}); retry shortly",
                code="limits_unavailable",
                retry_after=1,
            ) from None
        requests, tokens, held, spent, nanos_held, nanos_spent = (int(c) for c in counts)
        return Usage(
            requests,
            tokens,
            held,
            month_of(now),
            spent,
            nanos_held / NANOS_PER_USD,
            nanos_spent / NANOS_PER_USD,
        )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            await self._pool.disconnect()
            self._redis = self._pool = None
