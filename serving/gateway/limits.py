"""Per-tenant limits: requests and tokens per sliding minute, and a monthly token budget.

Admission checks every limit and takes in the same step: one request, and a reservation of the
most tokens the request can use (`reservation`): its prompt's UTF-8 bytes, plus a chat template's
allowance per message, plus max_tokens x n. A request is admitted only when

    tokens used in the window + tokens held + its reservation <= tpm
    tokens spent this month  + tokens held + its reservation <= monthly_token_budget

and its reservation is then held until it settles: once, when it is done (completed, failed,
cancelled or its client gone), the hold is released and the tokens it used are charged, in one
step. So neither token limit is overshot by the requests in flight; only by a request whose prompt
turns out to use more tokens than its bound (a multimodal part, a tool schema: the gateway cannot
count those without the model's files). A request whose reservation alone exceeds the whole tpm or
budget could never be admitted, so it gets a 400 that says what to lower rather than a 429 that
clients would retry in vain.

Both limiters count in one-second buckets over the last 60 seconds, so "exact" means exact:
1000 racing requests on rpm=100 admit 100.
- LocalLimiter: in this process; check and take with no await between them (one event loop).
- RedisLimiter: several gateway instances share limits; one Lua script checks and takes, one
  settles, atomically and on Redis' clock. Holds are kept per admission second and stop counting
  after `limits.hold_ttl_s`, so a gateway that dies mid-request does not hold its tokens forever.
  When Redis cannot be reached requests are admitted (fail open) holding nothing, and an error is
  logged: a limits outage must not become a serving outage.

Budgets count per calendar month (UTC). The local limiter's budget restarts with the process;
use Redis for a budget that survives restarts.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from configs.gateway import LimitsSpec, Tenant
from serving.gateway.errors import BadRequest, RateLimited
from serving.gateway.validation import MAX_TOKENS_FIELDS, prompt_bytes, prompt_count

log = logging.getLogger("serving.gateway")

WINDOW_S = 60


def _month(now: float) -> str:
    return datetime.fromtimestamp(now, UTC).strftime("%Y-%m")


def _seconds_to_next_month(now: float) -> int:
    d = datetime.fromtimestamp(now, UTC)
    nxt = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return max(1, int(nxt.timestamp() - now))


def token_limited(tenant: Tenant) -> bool:
    return tenant.tpm is not None or tenant.monthly_token_budget is not None


def reservation(tenant: Tenant, data: dict[str, Any], endpoint: str, limits: LimitsSpec) -> int:
    """The most tokens the request can use, held at admission; 0 for a tenant without token
    limits (nothing is counted for it). The request has a max_tokens by now (shape.py gives one
    to a token-limited tenant's request that names none). Raises BadRequest when the reservation
    alone is over the tenant's whole tpm or budget: no wait would ever admit it."""
    if not token_limited(tenant):
        return 0
    per_message = limits.template_tokens_per_message
    if endpoint == "chat":
        prompts, template = 1, per_message * (len(data["messages"]) + 1)
    else:
        prompts = prompt_count(data, endpoint)
        template = per_message * prompts
    named = [data[f] for f in MAX_TOKENS_FIELDS if data.get(f) is not None]
    # Clamped: a negative max_tokens or n, refused by vLLM only after admission, must not lower
    # what the tenant holds.
    max_tokens = max([0, *named])
    choices = max(1, data.get("n") or 1) * prompts
    reserved = prompt_bytes(data, endpoint) + template + max_tokens * choices
    for limit, value in (
        ("tpm", tenant.tpm),
        ("monthly_token_budget", tenant.monthly_token_budget),
    ):
        if value is not None and reserved > value:
            raise _never_admitted(tenant, reserved, limit, value)
    return reserved


def _never_admitted(tenant: Tenant, reserved: int, limit: str, value: int) -> BadRequest:
    return BadRequest(
        f"this request may use up to {reserved} tokens (prompt bytes, plus the chat template's "
        f"allowance, plus max_tokens x n), over tenant '{tenant.name}'s whole {limit} of {value}, "
        "so it can never be admitted; lower max_tokens or n, or shorten the prompt",
        param="max_tokens",
        code="reservation_over_limit",
    )


def denied(reason: str, tenant: Tenant, retry_after: int) -> RateLimited:
    if reason == "budget":
        return RateLimited(
            f"tenant '{tenant.name}' has too little of its monthly token budget "
            f"({tenant.monthly_token_budget}) left for the tokens this request may use (its "
            "prompt and max_tokens x n); a smaller max_tokens may fit, and the budget renews at "
            "the start of next month (UTC)",
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
    __slots__ = ("held", "month", "requests", "spent", "tokens")

    def __init__(self) -> None:
        self.requests = _Minute()
        self.tokens = _Minute()
        self.month = ""
        self.spent = 0
        self.held = 0  # the reservations of the requests admitted and not yet settled

    def spent_in(self, month: str) -> int:
        if self.month != month:
            self.month, self.spent = month, 0
        return self.spent


class Hold(NamedTuple):
    """The tokens held for one admitted request until it settles, and the (Redis) second they
    were held in."""

    tokens: int
    second: int


class Limiter(Protocol):
    """Admits requests against tenant limits, holding their reservations; settles each admitted
    request once, when it is done (the completions endpoint calls both)."""

    async def open(self) -> None: ...
    async def admit(self, tenant: Tenant, reserved: int) -> Hold | None: ...
    async def settle(self, tenant: Tenant, hold: Hold | None, tokens: int) -> None: ...
    async def close(self) -> None: ...


class LocalLimiter:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._accounts: dict[str, _Account] = {}
        self._clock = clock  # unix seconds; the tests step it by hand

    def _account(self, tenant: Tenant) -> _Account:
        account = self._accounts.get(tenant.name)
        if account is None:
            account = self._accounts[tenant.name] = _Account()
        return account

    async def open(self) -> None:
        return None

    async def admit(self, tenant: Tenant, reserved: int) -> Hold | None:
        """Take one request and hold `reserved` tokens, or raise RateLimited; None: nothing held
        (a tenant without token limits)."""
        # No await in here: the check and the take are one step on the event loop.
        if tenant.rpm is None and not token_limited(tenant):
            return None
        account = self._account(tenant)
        now = self._clock()
        now_s = int(now)
        committed = account.held + reserved
        budget = tenant.monthly_token_budget
        if budget is not None and account.spent_in(_month(now)) + committed > budget:
            raise denied("budget", tenant, _seconds_to_next_month(now))
        if tenant.tpm is not None and account.tokens.used(now_s) + committed > tenant.tpm:
            raise denied("tpm", tenant, account.tokens.retry_after(now_s))
        if tenant.rpm is not None:
            if account.requests.used(now_s) >= tenant.rpm:
                raise denied("rpm", tenant, account.requests.retry_after(now_s))
            account.requests.add(now_s, 1)
        if not token_limited(tenant):
            return None
        account.held = committed
        return Hold(reserved, now_s)

    async def settle(self, tenant: Tenant, hold: Hold | None, tokens: int) -> None:
        """Release the request's hold and charge the tokens it used, in one step."""
        if not token_limited(tenant):
            return
        account = self._account(tenant)
        if hold is not None:
            account.held -= hold.tokens
        if tokens > 0:
            now = self._clock()
            account.tokens.add(int(now), tokens)
            account.spent = account.spent_in(_month(now)) + tokens

    async def close(self) -> None:
        return None


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

# KEYS: requests, tokens and held buckets, budget counter.
# ARGV: rpm, tpm, budget (0 = none), reserved, hold ttl. Returns the reason and a retry-after, or
# 'ok' and the second the reservation is held in.
_ADMIT = (
    _USED
    + """
local rpm, tpm, budget = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reserved, ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local committed = reserved
if tpm > 0 or budget > 0 then committed = committed + used(KEYS[3], now - ttl) end
if budget > 0 and tonumber(redis.call('GET', KEYS[4]) or '0') + committed > budget then
  return {'budget', 0}
end
if tpm > 0 then
  local total, oldest = used(KEYS[2], now - 60)
  if total + committed > tpm then
    if total == 0 then return {'tpm', 1} end
    return {'tpm', oldest + 60 - now}
  end
end
if rpm > 0 then
  local total, oldest = used(KEYS[1], now - 60)
  if total >= rpm then return {'rpm', oldest + 60 - now} end
  redis.call('HINCRBY', KEYS[1], now, 1)
  redis.call('EXPIRE', KEYS[1], 120)
end
if tpm > 0 or budget > 0 then
  redis.call('HINCRBY', KEYS[3], now, reserved)
  redis.call('EXPIRE', KEYS[3], ttl)
end
return {'ok', now}
"""
)

# KEYS: tokens and held buckets, budget counter.
# ARGV: reserved, the second it is held in, tokens used, charge tpm (0/1), charge budget (0/1).
# A hold already gone (past its ttl) or never taken (Redis was down at admission) releases nothing.
_SETTLE = """
local now = tonumber(redis.call('TIME')[1])
local reserved, n = tonumber(ARGV[1]), tonumber(ARGV[3])
if reserved > 0 then
  local left = tonumber(redis.call('HGET', KEYS[2], ARGV[2]) or '0') - reserved
  if left > 0 then
    redis.call('HSET', KEYS[2], ARGV[2], left)
  else
    redis.call('HDEL', KEYS[2], ARGV[2])
  end
end
if n > 0 and ARGV[4] == '1' then
  redis.call('HINCRBY', KEYS[1], now, n)
  redis.call('EXPIRE', KEYS[1], 120)
end
if n > 0 and ARGV[5] == '1' then
  redis.call('INCRBY', KEYS[3], n)
  redis.call('EXPIRE', KEYS[3], 3024000)
end
return 1
"""


class RedisLimiter:
    def __init__(self, url: str, prefix: str, hold_ttl_s: int) -> None:
        self._url = url
        self._prefix = prefix
        self._hold_ttl_s = hold_ttl_s
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

    def _keys(self, tenant: Tenant, now: float) -> list[str]:
        """Requests, tokens and held buckets, and this month's budget counter."""
        base = f"{self._prefix}{tenant.name}:"
        return [base + "rpm", base + "tpm", base + "held", f"{base}budget:{_month(now)}"]

    async def admit(self, tenant: Tenant, reserved: int) -> Hold | None:
        """Take one request and hold `reserved` tokens, or raise RateLimited; None: nothing held
        (no token limits, or Redis unreachable)."""
        if tenant.rpm is None and not token_limited(tenant):
            return None
        now = time.time()
        args = [
            tenant.rpm or 0,
            tenant.tpm or 0,
            tenant.monthly_token_budget or 0,
            reserved,
            self._hold_ttl_s,
        ]
        try:
            reason, value = await self._admit(keys=self._keys(tenant, now), args=args)
        except RedisError as e:
            log.error("rate-limit store unreachable, admitting tenant '%s': %s", tenant.name, e)
            return None
        if reason != b"ok":
            kind = reason.decode()
            wait = _seconds_to_next_month(now) if kind == "budget" else max(1, int(value))
            raise denied(kind, tenant, wait)
        return Hold(reserved, int(value)) if token_limited(tenant) else None

    async def settle(self, tenant: Tenant, hold: Hold | None, tokens: int) -> None:
        """Release the request's hold and charge the tokens it used, in one script."""
        if not token_limited(tenant) or (hold is None and tokens <= 0):
            return
        _, tpm_key, held_key, budget_key = self._keys(tenant, time.time())
        reserved, second = hold if hold is not None else (0, 0)
        args = [
            reserved,
            second,
            max(0, tokens),
            int(tenant.tpm is not None),
            int(tenant.monthly_token_budget is not None),
        ]
        try:
            await self._settle(keys=[tpm_key, held_key, budget_key], args=args)
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

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            await self._pool.disconnect()
            self._redis = self._pool = None
