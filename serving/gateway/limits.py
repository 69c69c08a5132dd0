"""Per-tenant limits: requests and tokens per sliding minute, and a monthly token budget.

Admission checks every limit and takes one request in the same step; tokens are charged when the
response is complete (they are unknown before), so a tenant may overshoot its token limits by the
requests already in flight, never its request limit.

Both limiters count in one-second buckets over the last 60 seconds, so "exact" means exact:
1000 racing requests on rpm=100 admit 100.
- LocalLimiter: in this process; check and take with no await between them (one event loop).
- RedisLimiter: several gateway instances share limits; a Lua script checks and takes atomically
  and uses Redis' clock. When Redis cannot be reached requests are admitted (fail open) and an
  error is logged: a limits outage must not become a serving outage.

Budgets count per calendar month (UTC). The local limiter's budget restarts with the process;
use Redis for a budget that survives restarts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from configs.gateway import TenantSpec
from serving.gateway.errors import RateLimited

log = logging.getLogger("serving.gateway")

WINDOW_S = 60


def _month(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def _seconds_to_next_month(now: float) -> int:
    d = datetime.fromtimestamp(now, UTC)
    nxt = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return max(1, int(nxt.timestamp() - now))


def denied(reason: str, tenant: TenantSpec, retry_after: int) -> RateLimited:
    if reason == "budget":
        return RateLimited(
            f"tenant '{tenant.name}' has used its monthly token budget "
            f"({tenant.monthly_token_budget}); it renews at the start of next month (UTC)",
            code="insufficient_quota",
            retry_after=retry_after,
        )
    limit, unit = (tenant.rpm, "requests") if reason == "rpm" else (tenant.tpm, "tokens")
    error = RateLimited(
        f"tenant '{tenant.name}' is over its limit of {limit} {unit} per minute; "
        f"retry after {retry_after} s",
        retry_after=retry_after,
    )
    error.type = "requests" if reason == "rpm" else "tokens"
    return error


class _Minute:
    """Counts in one-second buckets over the last WINDOW_S seconds."""

    __slots__ = ("buckets", "total")

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()
        self.total = 0

    def used(self, now_s: int) -> int:
        buckets, horizon = self.buckets, now_s - WINDOW_S
        while buckets and buckets[0][0] <= horizon:
            self.total -= buckets.popleft()[1]
        return self.total

    def add(self, now_s: int, n: int) -> None:
        if self.buckets and self.buckets[-1][0] == now_s:
            self.buckets[-1][1] += n
        else:
            self.buckets.append([now_s, n])
        self.total += n

    def retry_after(self, now_s: int) -> int:
        return max(1, self.buckets[0][0] + WINDOW_S - now_s) if self.buckets else 1


class _Account:
    __slots__ = ("month", "requests", "spent", "tokens")

    def __init__(self) -> None:
        self.requests = _Minute()
        self.tokens = _Minute()
        self.month = ""
        self.spent = 0


class Limiter(Protocol):
    """Admits requests and charges tokens against tenant limits (RateLimitMiddleware's store)."""

    async def open(self) -> None: ...
    async def admit(self, tenant: TenantSpec) -> None: ...
    async def charge(self, tenant: TenantSpec, tokens: int) -> None: ...
    async def close(self) -> None: ...


class LocalLimiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._accounts: dict[str, _Account] = {}
        self._clock = clock  # unix seconds; the tests step it by hand

    def _account(self, tenant: TenantSpec) -> _Account:
        account = self._accounts.get(tenant.name)
        if account is None:
            account = self._accounts[tenant.name] = _Account()
        return account

    async def open(self) -> None:
        return None

    async def admit(self, tenant: TenantSpec) -> None:
        # No await in here: the check and the take are one step on the event loop.
        if tenant.rpm is None and tenant.tpm is None and tenant.monthly_token_budget is None:
            return
        account = self._account(tenant)
        now = self._clock()
        now_s = int(now)
        if tenant.monthly_token_budget is not None:
            month = _month(now)
            if account.month != month:
                account.month, account.spent = month, 0
            if account.spent >= tenant.monthly_token_budget:
                raise denied("budget", tenant, _seconds_to_next_month(now))
        if tenant.tpm is not None and account.tokens.used(now_s) >= tenant.tpm:
            raise denied("tpm", tenant, account.tokens.retry_after(now_s))
        if tenant.rpm is not None:
            if account.requests.used(now_s) >= tenant.rpm:
                raise denied("rpm", tenant, account.requests.retry_after(now_s))
            account.requests.add(now_s, 1)

    async def charge(self, tenant: TenantSpec, tokens: int) -> None:
        if tokens <= 0 or (tenant.tpm is None and tenant.monthly_token_budget is None):
            return
        account = self._account(tenant)
        now = self._clock()
        account.tokens.add(int(now), tokens)
        month = _month(now)
        if account.month != month:
            account.month, account.spent = month, 0
        account.spent += tokens

    async def close(self) -> None:
        return None


# KEYS: requests hash, tokens hash (second -> count), budget counter.
# ARGV: rpm, tpm, budget (0 = none).
_ADMIT = """
local now = tonumber(redis.call('TIME')[1])
local horizon = now - 60
local function used(key)
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
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if budget > 0 and tonumber(redis.call('GET', KEYS[3]) or '0') >= budget then
  return {'budget', 0}
end
if tpm > 0 then
  local total, oldest = used(KEYS[2])
  if total >= tpm then return {'tpm', oldest + 60 - now} end
end
if rpm > 0 then
  local total, oldest = used(KEYS[1])
  if total >= rpm then return {'rpm', oldest + 60 - now} end
  redis.call('HINCRBY', KEYS[1], now, 1)
  redis.call('EXPIRE', KEYS[1], 120)
end
return {'ok', 0}
"""

# KEYS: tokens hash, budget counter. ARGV: tokens, charge tpm (0/1), charge budget (0/1).
_CHARGE = """
local now = tonumber(redis.call('TIME')[1])
local n = tonumber(ARGV[1])
if ARGV[2] == '1' then
  redis.call('HINCRBY', KEYS[1], now, n)
  redis.call('EXPIRE', KEYS[1], 120)
end
if ARGV[3] == '1' then
  redis.call('INCRBY', KEYS[2], n)
  redis.call('EXPIRE', KEYS[2], 3024000)
end
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = prefix
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
        self._charge = self._redis.register_script(_CHARGE)

    def _keys(self, tenant: TenantSpec, now: float) -> list[str]:
        base = f"{self._prefix}{tenant.name}:"
        return [base + "rpm", base + "tpm", f"{base}budget:{_month(now)}"]

    async def admit(self, tenant: TenantSpec) -> None:
        if tenant.rpm is None and tenant.tpm is None and tenant.monthly_token_budget is None:
            return
        now = time.time()
        args = [tenant.rpm or 0, tenant.tpm or 0, tenant.monthly_token_budget or 0]
        try:
            reason, retry_after = await self._admit(keys=self._keys(tenant, now), args=args)
        except RedisError as e:
            log.error("rate-limit store unreachable, admitting tenant '%s': %s", tenant.name, e)
            return
        if reason != b"ok":
            kind = reason.decode()
            wait = _seconds_to_next_month(now) if kind == "budget" else max(1, int(retry_after))
            raise denied(kind, tenant, wait)

    async def charge(self, tenant: TenantSpec, tokens: int) -> None:
        if tokens <= 0 or (tenant.tpm is None and tenant.monthly_token_budget is None):
            return
        _, tpm_key, budget_key = self._keys(tenant, time.time())
        args = [tokens, int(tenant.tpm is not None), int(tenant.monthly_token_budget is not None)]
        try:
            await self._charge(keys=[tpm_key, budget_key], args=args)
        except RedisError as e:
            log.error(
                "rate-limit store unreachable, %d tokens of '%s' not charged: %s",
                tokens,
                tenant.name,
                e,
            )

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            await self._pool.disconnect()
            self._redis = self._pool = None


class RateLimitMiddleware:
    """Admits an API request against its tenant's limits; charges its tokens when it is done."""

    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = scope.get("slipway.exchange")
        if exchange is None or exchange.tenant is None:
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        tenant = exchange.tenant
        await limiter.admit(tenant)
        try:
            await self.app(scope, receive, send)
        finally:
            if exchange.prompt_tokens or exchange.completion_tokens:
                await limiter.charge(tenant, exchange.prompt_tokens + exchange.completion_tokens)
