"""Per-tenant limits: requests and tokens per sliding minute, a monthly token budget, a
monthly money budget, and requests in flight at once.

Admission checks every limit and takes in the same step: one request, and a reservation of the
most tokens the request can use (`reservation`): its prompt's UTF-8 bytes, plus a chat template's
allowance per message, plus max_tokens x n; and of the most it can cost, those prompt and
completion bounds at the tenant's chargeback rate (its own or its tier's, per million prompt and
completion tokens), counted in whole nano-dollars so that every sum is exact. A request is
admitted only when

    tokens used in the window + tokens held + its reservation <= tpm
    tokens spent this month  + tokens held + its reservation <= monthly_token_budget
    money spent this month   + money held  + its reservation <= monthly_budget_usd

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
- RedisLimiter (redis_limits.py): several gateway instances share limits; one Lua script checks
  and takes, one settles, atomically and on Redis' clock. Holds are kept per admission second and
  stop counting after `limits.hold_ttl_s`, so a gateway that dies mid-request does not hold its
  tokens forever. When Redis cannot be reached, each limit fails open or closed as
  `limits.on_store_down` says (redis_limits.py).

Budgets count per calendar month (UTC). The local limiter keeps its monthly spend in the state
store (spend.py), so a restart keeps the budget; Redis keeps it too.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, NamedTuple, Protocol

from configs.gateway import LimitsSpec, Tenant
from configs.pricing import NANOS_PER_USD
from serving.gateway.errors import BadRequest, RateLimited
from serving.gateway.quota import Quota, Window
from serving.gateway.spend import SpendBook
from serving.gateway.validation import asked_completion, prompt_bytes, prompt_count

log = logging.getLogger("serving.gateway")

WINDOW_S = 60


def month_of(now: float) -> str:
    """The UTC calendar month of a Unix time, YYYY-MM (asked twice per request: cached by day,
    since months begin at a UTC midnight)."""
    return _month_of_day(int(now // 86400))


@lru_cache(maxsize=64)
def _month_of_day(day: int) -> str:
    return datetime.fromtimestamp(day * 86400, UTC).strftime("%Y-%m")


def seconds_to_next_month(now: float) -> int:
    d = datetime.fromtimestamp(now, UTC)
    nxt = datetime(d.year + d.month // 12, d.month % 12 + 1, 1, tzinfo=UTC)
    return max(1, int(nxt.timestamp() - now))


def metered(tenant: Tenant) -> bool:
    """Whether the tenant's tokens are counted: it has a token or money limit."""
    return (
        tenant.tpm is not None
        or tenant.monthly_token_budget is not None
        or tenant.monthly_budget_usd is not None
    )


def budget_nanos(tenant: Tenant) -> int | None:
    usd = tenant.monthly_budget_usd
    return None if usd is None else round(usd * NANOS_PER_USD)


def usd(nanos: int) -> str:
    return f"${nanos / NANOS_PER_USD:.6g}"


class Amount(NamedTuple):
    """Tokens, and nano-dollars at the tenant's chargeback rate (0 without a money budget)."""

    tokens: int
    nanos: int = 0


def charge(tenant: Tenant, limits: LimitsSpec, prompt_tokens: int, completion_tokens: int) -> int:
    """What the tokens cost the tenant, in nano-dollars; 0 for a tenant without a money budget."""
    if tenant.monthly_budget_usd is None:
        return 0
    rate = limits.chargeback.rate(tenant.name, tenant.tier)
    if rate is None:  # refused where tenants are made (configs/gateway.py `unpriced`)
        raise RuntimeError(f"tenant '{tenant.name}' has a money budget and no chargeback rate")
    return rate.nanos(prompt_tokens, completion_tokens)


def reservation(tenant: Tenant, data: dict[str, Any], endpoint: str, limits: LimitsSpec) -> Amount:
    """The most tokens the request can use and what they can cost, held at admission; nothing
    for a tenant without token or money limits (nothing is counted for it). The request has a
    max_tokens by now (shape.py gives one to a metered tenant's request that names none). Raises
    BadRequest when the reservation alone is over the tenant's whole tpm or a budget: no wait
    would ever admit it."""
    if not metered(tenant):
        return Amount(0)
    per_message = limits.template_tokens_per_message
    if endpoint == "chat":
        template = per_message * (len(data["messages"]) + 1)
    elif endpoint == "responses":  # its input becomes chat messages, and instructions one more
        given = data["input"]
        template = per_message * ((1 if isinstance(given, str) else len(given)) + 2)
    else:
        template = per_message * prompt_count(data, endpoint)
    completion = asked_completion(data, endpoint)[1] or 0
    prompt = prompt_bytes(data, endpoint) + template
    reserved = Amount(prompt + completion, charge(tenant, limits, prompt, completion))
    for limit, value, amount in (
        ("tpm", tenant.tpm, reserved.tokens),
        ("monthly_token_budget", tenant.monthly_token_budget, reserved.tokens),
        ("monthly_budget_usd", budget_nanos(tenant), reserved.nanos),
    ):
        if value is not None and amount > value:
            raise _never_admitted(tenant, limit, amount, value)
    return reserved


def _never_admitted(tenant: Tenant, limit: str, amount: int, value: int) -> BadRequest:
    if limit == "monthly_budget_usd":
        may, whole = f"cost up to {usd(amount)}", usd(value)
    else:
        may, whole = f"use up to {amount} tokens", str(value)
    return BadRequest(
        f"this request may {may} (prompt bytes, plus the chat template's allowance, plus "
        f"max_tokens x n), over tenant '{tenant.name}'s whole {limit} of {whole}, so it can "
        "never be admitted; lower max_tokens or n, or shorten the prompt",
        param="max_tokens",
        code="reservation_over_limit",
    )


def denied(reason: str, tenant: Tenant, retry_after: int) -> RateLimited:
    if reason == "money":
        return RateLimited(
            f"tenant '{tenant.name}' has too little of its monthly budget "
            f"({usd(budget_nanos(tenant) or 0)}) left for what this request may cost (its prompt "
            "and max_tokens x n at its chargeback rate); a smaller max_tokens may fit, and the "
            "budget renews at the start of next month (UTC)",
            code="insufficient_quota",
            retry_after=retry_after,
        )
    if reason == "budget":
        return RateLimited(
            f"tenant '{tenant.name}' has too little of its monthly token budget "
            f"({tenant.monthly_token_budget}) left for the tokens this request may use (its "
            "prompt and max_tokens x n); a smaller max_tokens may fit, and the budget renews at "
            "the start of next month (UTC)",
            code="insufficient_quota",
            retry_after=retry_after,
        )
    if reason == "inflight":
        error = RateLimited(
            f"tenant '{tenant.name}' has its limit of {tenant.max_inflight} requests in flight; "
            "retry when one of them is done",
            retry_after=retry_after,
        )
        error.type = "requests"
        return error
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

    def reset(self, now_s: int) -> int:
        """Seconds until the oldest counted second leaves the window (0: nothing counted)."""
        return self.buckets[0][0] + WINDOW_S - now_s if self.buckets else 0


class _Account:
    __slots__ = (
        "held",
        "held_nanos",
        "inflight",
        "month",
        "requests",
        "spent",
        "spent_nanos",
        "tokens",
    )

    def __init__(self) -> None:
        self.inflight = 0  # requests admitted and not yet settled
        self.requests = _Minute()
        self.tokens = _Minute()
        self.month = ""
        self.spent = self.spent_nanos = 0
        # the reservations of the requests admitted and not yet settled
        self.held = self.held_nanos = 0

    def spent_in(self, month: str) -> Amount:
        if self.month != month:
            self.month, self.spent, self.spent_nanos = month, 0, 0
        return Amount(self.spent, self.spent_nanos)


class Usage(NamedTuple):
    """What a tenant has used of its limits now (what requests in flight hold apart)."""

    requests_this_minute: int
    tokens_this_minute: int
    tokens_held: int
    month: str  # YYYY-MM, UTC
    tokens_this_month: int
    usd_held: float = 0.0
    usd_this_month: float = 0.0


class Hold(NamedTuple):
    """The tokens (and nano-dollars) held for one admitted request until it settles, the (Redis)
    second they were held in, and what the tenant has left of its per-minute limits."""

    tokens: int
    second: int
    quota: Quota | None = None
    nanos: int = 0
    inflight: bool = False  # it counts against the tenant's max_inflight until it settles


class Limiter(Protocol):
    """Admits requests against tenant limits, holding their reservations; settles each admitted
    request once, when it is done (the completions endpoint calls both)."""

    outages: Counter[str]  # requests decided while a shared store was down, by decision

    async def open(self) -> None: ...
    async def admit(self, tenant: Tenant, reserved: int, nanos: int = 0) -> Hold | None: ...
    async def settle(
        self, tenant: Tenant, hold: Hold | None, tokens: int, nanos: int = 0
    ) -> None: ...
    async def usage(self, tenant: Tenant) -> Usage: ...
    async def close(self) -> None: ...


class LocalLimiter:
    def __init__(
        self, clock: Callable[[], float] = time.time, book: SpendBook | None = None
    ) -> None:
        self.outages: Counter[str] = Counter()  # none: nothing shared to lose
        self._accounts: dict[str, _Account] = {}
        self._clock = clock  # unix seconds; the tests step it by hand
        self._book = book  # where monthly spend outlives the process; None: memory only

    def _account(self, tenant: Tenant) -> _Account:
        account = self._accounts.get(tenant.name)
        if account is None:
            account = self._accounts[tenant.name] = _Account()
            if self._book is not None:
                account.month = month_of(self._clock())
                account.spent, account.spent_nanos = self._book.spent(tenant.name, account.month)
        return account

    async def open(self) -> None:
        if self._book is not None:
            await self._book.open()

    async def admit(self, tenant: Tenant, reserved: int, nanos: int = 0) -> Hold | None:
        """Take one request and hold `reserved` tokens and `nanos` nano-dollars, or raise
        RateLimited; None: nothing held (a tenant without limits)."""
        # No await in here: the check and the take are one step on the event loop.
        if tenant.rpm is None and tenant.max_inflight is None and not metered(tenant):
            return None
        account = self._account(tenant)
        now = self._clock()
        now_s = int(now)
        most = tenant.max_inflight
        if most is not None and account.inflight >= most:
            raise denied("inflight", tenant, 1)
        committed = account.held + reserved
        spent = account.spent_in(month_of(now))
        money = budget_nanos(tenant)
        if money is not None and spent.nanos + account.held_nanos + nanos > money:
            raise denied("money", tenant, seconds_to_next_month(now))
        budget = tenant.monthly_token_budget
        if budget is not None and spent.tokens + committed > budget:
            raise denied("budget", tenant, seconds_to_next_month(now))
        if tenant.tpm is not None and account.tokens.used(now_s) + committed > tenant.tpm:
            raise denied("tpm", tenant, account.tokens.retry_after(now_s))
        requests = None
        if tenant.rpm is not None:
            used = account.requests.used(now_s)
            if used >= tenant.rpm:
                raise denied("rpm", tenant, account.requests.retry_after(now_s))
            account.requests.add(now_s, 1)
            requests = Window(tenant.rpm, tenant.rpm - used - 1, account.requests.reset(now_s))
        tokens = None
        if tenant.tpm is not None:
            left = tenant.tpm - account.tokens.used(now_s) - committed
            tokens = Window(tenant.tpm, left, account.tokens.reset(now_s))
        account.inflight += most is not None
        if not metered(tenant):
            return Hold(0, now_s, Quota(requests, tokens), inflight=most is not None)
        account.held = committed
        account.held_nanos += nanos
        return Hold(reserved, now_s, Quota(requests, tokens), nanos, most is not None)

    async def settle(self, tenant: Tenant, hold: Hold | None, tokens: int, nanos: int = 0) -> None:
        """Release the request's hold and charge the tokens it used and what they cost, in one
        step."""
        if hold is not None and hold.inflight:
            self._account(tenant).inflight -= 1
        if not metered(tenant):
            return
        account = self._account(tenant)
        if hold is not None:
            account.held -= hold.tokens
            account.held_nanos -= hold.nanos
        if tokens > 0:
            now = self._clock()
            month = month_of(now)
            account.tokens.add(int(now), tokens)
            spent = account.spent_in(month)
            account.spent, account.spent_nanos = spent.tokens + tokens, spent.nanos + nanos
            if self._book is not None:
                self._book.add(tenant.name, month, tokens, nanos)

    async def usage(self, tenant: Tenant) -> Usage:
        account, now = self._account(tenant), self._clock()
        month = month_of(now)
        spent = account.spent_in(month)
        return Usage(
            account.requests.used(int(now)),
            account.tokens.used(int(now)),
            account.held,
            month,
            spent.tokens,
            account.held_nanos / NANOS_PER_USD,
            spent.nanos / NANOS_PER_USD,
        )

    async def close(self) -> None:
        if self._book is not None:
            await self._book.close()
