"""The in-process limiter on a hand-stepped clock: the sliding minute, token reservations held
until settled, the monthly budget; and the reservation a request holds."""

from __future__ import annotations

import json
from collections.abc import Coroutine
from datetime import UTC, datetime
from typing import Any

import pytest

from configs.gateway import LimitsSpec, TenantSpec
from serving.gateway.errors import BadRequest, RateLimited
from serving.gateway.limits import Hold, LocalLimiter, charge, reservation

T0 = 1_750_000_000.0  # a whole second, mid-month


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant(**limits: int) -> TenantSpec:
    return TenantSpec(name="alice", key_sha256="0" * 64, **limits)


def at_once(step: Coroutine) -> Any:
    """Run a coroutine that must finish without awaiting (check and take are one atomic step);
    its result."""
    with pytest.raises(StopIteration) as done:
        step.send(None)
    return done.value.value


def admit(limiter: LocalLimiter, who: TenantSpec, reserved: int = 0) -> RateLimited | None:
    """None when admitted, else the refusal."""
    try:
        at_once(limiter.admit(who, reserved))
    except RateLimited as refusal:
        return refusal
    return None


def reserve(limiter: LocalLimiter, who: TenantSpec, reserved: int) -> Hold:
    """Admit a request holding `reserved` tokens (it must be admitted)."""
    hold = at_once(limiter.admit(who, reserved))
    assert isinstance(hold, Hold) and hold.tokens == reserved
    return hold


def settle(limiter: LocalLimiter, who: TenantSpec, hold: Hold, tokens: int) -> None:
    at_once(limiter.settle(who, hold, tokens))


def spend(limiter: LocalLimiter, who: TenantSpec, tokens: int) -> None:
    """One request that reserved and used exactly `tokens`."""
    settle(limiter, who, reserve(limiter, who, tokens), tokens)


def epoch(*when: int) -> float:
    return datetime(*when, tzinfo=UTC).timestamp()


def test_exactly_rpm_requests_per_sliding_minute():
    clock, alice = Clock(), tenant(rpm=3)
    limiter = LocalLimiter(clock)
    assert admit(limiter, alice) is None and admit(limiter, alice) is None
    clock.now = T0 + 30.7
    assert admit(limiter, alice) is None
    refused = admit(limiter, alice)
    assert refused.type == "requests" and refused.retry_after == 30  # the T0 bucket leaves first
    assert "limit of 3 requests per minute" in refused.message
    clock.now = T0 + 59.9  # same one-second bucket as T0 + 59: T0's requests still count
    assert admit(limiter, alice).retry_after == 1
    clock.now = T0 + 60  # T0's bucket has left the window, T0 + 30's has not
    assert admit(limiter, alice) is None and admit(limiter, alice) is None
    assert admit(limiter, alice).retry_after == 30
    clock.now = T0 + 90
    assert admit(limiter, alice) is None


def test_refused_requests_take_nothing_from_the_limit():
    clock, alice = Clock(), tenant(rpm=1)
    limiter = LocalLimiter(clock)
    assert admit(limiter, alice) is None
    for _ in range(50):
        assert admit(limiter, alice) is not None
    clock.now = T0 + 60
    assert admit(limiter, alice) is None


def test_a_reservation_is_held_until_settled_and_only_the_tokens_used_stay_charged():
    clock, alice = Clock(), tenant(tpm=10)
    limiter = LocalLimiter(clock)
    first = reserve(limiter, alice, 6)
    refused = admit(limiter, alice, 5)  # 6 held + 5 > 10, though nothing is used yet
    assert refused.type == "tokens" and refused.retry_after == 1
    second = reserve(limiter, alice, 4)  # 6 + 4 = 10: exactly the limit
    assert admit(limiter, alice, 1) is not None
    settle(limiter, alice, first, 2)  # used less than it held: 2 used + 4 held
    assert admit(limiter, alice, 5) is not None
    third = reserve(limiter, alice, 4)  # 2 + 4 + 4 = 10
    settle(limiter, alice, second, 0)  # failed before any token: all of it released
    settle(limiter, alice, third, 4)
    assert admit(limiter, alice, 5) is not None  # 6 used
    reserve(limiter, alice, 4)


def test_a_request_that_uses_more_than_it_held_is_charged_all_it_used():
    clock, alice = Clock(), tenant(tpm=10)
    limiter = LocalLimiter(clock)
    settle(limiter, alice, reserve(limiter, alice, 3), 8)  # a prompt over its bound
    assert admit(limiter, alice, 3) is not None  # 8 used + 3 > 10
    reserve(limiter, alice, 2)


def test_settled_tokens_leave_the_window_a_minute_after_they_were_charged():
    clock, alice = Clock(), tenant(tpm=10)
    limiter = LocalLimiter(clock)
    hold = reserve(limiter, alice, 10)
    clock.now = T0 + 20
    settle(limiter, alice, hold, 6)  # charged at T0 + 20, not at admission
    clock.now = T0 + 30
    refused = admit(limiter, alice, 5)
    assert refused.type == "tokens" and refused.retry_after == 50
    clock.now = T0 + 79.9
    assert admit(limiter, alice, 5) is not None
    clock.now = T0 + 80
    reserve(limiter, alice, 10)


def test_the_monthly_budget_holds_until_the_month_rolls_over():
    clock, bob = Clock(epoch(2025, 1, 31, 23, 59)), tenant(monthly_token_budget=12)
    limiter = LocalLimiter(clock)
    spend(limiter, bob, 7)
    hold = reserve(limiter, bob, 5)
    refused = admit(limiter, bob, 1)  # 7 spent + 5 held
    assert refused.code == "insufficient_quota" and refused.retry_after == 60
    assert "monthly token budget" in refused.message
    settle(limiter, bob, hold, 5)
    assert admit(limiter, bob, 1) is not None
    clock.now = epoch(2025, 2, 1, 0, 0, 1)
    spend(limiter, bob, 11)  # a new month, a new budget
    assert admit(limiter, bob, 2) is not None
    spend(limiter, bob, 1)
    assert admit(limiter, bob, 1).code == "insufficient_quota"


def test_tokens_settled_first_in_a_new_month_count_against_that_month():
    clock, bob = Clock(epoch(2025, 12, 31, 23, 59, 30)), tenant(monthly_token_budget=10)
    limiter = LocalLimiter(clock)
    spend(limiter, bob, 6)
    hold = reserve(limiter, bob, 4)
    assert admit(limiter, bob, 1).retry_after == 30  # December rolls over into next year
    clock.now = epoch(2026, 1, 1, 0, 0, 5)
    settle(limiter, bob, hold, 4)  # the settle, not an admission, sees the new month first
    spend(limiter, bob, 6)
    assert admit(limiter, bob, 1) is not None


@pytest.mark.parametrize("tokens", [0, 100])
def test_a_tenant_without_limits_is_never_refused_and_holds_nothing(tokens):
    limiter, carol = LocalLimiter(Clock()), tenant()
    for _ in range(1000):
        hold = at_once(limiter.admit(carol, 0))
        assert hold is None
        at_once(limiter.settle(carol, hold, tokens))


LIMITS = LimitsSpec(template_tokens_per_message=16)


def test_a_chat_reservation_bounds_prompt_template_and_every_choice():
    messages = [
        {"role": "system", "content": "héllo"},  # 6 bytes
        {"role": "user", "content": [{"type": "text", "text": "abc"}, {"type": "image_url"}]},
    ]
    data = {"model": "m", "messages": messages, "max_tokens": 10, "n": 3}
    # 9 bytes, 16 per message and once more, 10 tokens for each of 3 choices
    assert reservation(tenant(tpm=1000), data, "chat", LIMITS).tokens == 9 + 16 * 3 + 30
    data["max_completion_tokens"] = 20  # both named: the larger bounds the completion
    assert reservation(tenant(tpm=1000), data, "chat", LIMITS).tokens == 9 + 48 + 60


def test_a_completions_reservation_counts_each_prompt():
    texts = {"model": "m", "prompt": ["ab", "cde"], "max_tokens": 4, "n": 2}
    assert reservation(tenant(tpm=1000), texts, "completions", LIMITS).tokens == 5 + 32 + 4 * 2 * 2
    ids = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 4}
    assert reservation(tenant(tpm=1000), ids, "completions", LIMITS).tokens == 3 + 16 + 4


def test_no_reservation_for_a_tenant_without_token_limits_and_none_below_zero():
    data = {"model": "m", "messages": [{"role": "user", "content": "x" * 100}], "max_tokens": 5}
    assert reservation(tenant(rpm=5), data, "chat", LIMITS).tokens == 0
    data.update(max_tokens=-1000, n=-3)  # must not lower what the tenant's other requests hold
    assert reservation(tenant(tpm=1000), data, "chat", LIMITS).tokens == 100 + 32


@pytest.mark.parametrize(
    ("limit", "value"), [("tpm", 50), ("monthly_token_budget", 50)], ids=["tpm", "budget"]
)
def test_a_reservation_over_the_whole_limit_is_refused_as_one_never_admitted(limit, value):
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 16}
    assert reservation(tenant(**{limit: value}), data, "chat", LIMITS).tokens == 2 + 32 + 16  # fits
    data["max_tokens"] = 17
    with pytest.raises(BadRequest) as refused:
        reservation(tenant(**{limit: value}), data, "chat", LIMITS)
    error = refused.value
    assert error.status == 400 and error.param == "max_tokens"
    assert error.code == "reservation_over_limit"
    assert "up to 51 tokens" in error.message and f"whole {limit} of 50" in error.message


# A money budget: 1,000 nano-dollars per prompt token and 3,000 per completion token.
PRICED = LimitsSpec(
    template_tokens_per_message=0,
    chargeback={
        "tiers": {"standard": {"input_per_million": 1.0, "output_per_million": 3.0}},
        "tenants": {"vip": {"input_per_million": 0.5, "output_per_million": 0.5}},
    },
)


def money(usd: float, name: str = "alice", **limits) -> TenantSpec:
    return TenantSpec(name=name, key_sha256="0" * 64, monthly_budget_usd=usd, **limits)


def test_a_money_reservation_prices_the_prompt_and_completion_bounds_at_the_tenants_rate():
    data = {"model": "m", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 10}
    # 5 prompt bytes at the tier's 1,000 n$, 10 completion tokens at 3,000 n$
    assert reservation(money(1.0), data, "chat", PRICED) == (15, 5 * 1000 + 10 * 3000)
    # the tenant's own rate before its tier's
    assert reservation(money(1.0, "vip"), data, "chat", PRICED).nanos == 15 * 500
    assert charge(money(1.0), PRICED, 7, 2) == 7 * 1000 + 2 * 3000
    assert charge(tenant(tpm=10), PRICED, 7, 2) == 0  # no money budget, nothing priced


def test_the_money_budget_holds_reservations_and_charges_what_was_used():
    clock, alice = Clock(epoch(2025, 3, 31, 23, 59)), money(0.0001)  # 100,000 n$
    limiter = LocalLimiter(clock)
    first = at_once(limiter.admit(alice, 15, 60_000))
    assert first.nanos == 60_000
    refused = admit_priced(limiter, alice, 40_001)  # 60,000 held + 40,001 > 100,000
    assert refused.code == "insufficient_quota" and refused.retry_after == 60
    assert "too little of its monthly budget ($0.0001) left" in refused.message
    at_once(limiter.settle(alice, first, 10, 25_000))  # it cost less than it held
    assert admit_priced(limiter, alice, 75_000) is None  # 25,000 spent + 75,000 = the budget
    usage = at_once(limiter.usage(alice))
    assert usage.usd_this_month == pytest.approx(25e-6) and usage.usd_held == pytest.approx(75e-6)
    clock.now = epoch(2025, 4, 1, 0, 0, 1)  # a new month, a new budget: only what is held counts
    assert admit_priced(limiter, alice, 25_000) is None
    assert admit_priced(limiter, alice, 1) is not None


def admit_priced(limiter: LocalLimiter, who: TenantSpec, nanos: int) -> RateLimited | None:
    try:
        at_once(limiter.admit(who, 1, nanos))
    except RateLimited as refusal:
        return refusal
    return None


def test_a_reservation_over_the_whole_money_budget_is_never_admitted():
    data = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}
    with pytest.raises(BadRequest) as refused:
        reservation(money(0.001), data, "chat", PRICED)  # 2,000 + 3,000,000 n$ over 1,000,000
    error = refused.value
    assert error.code == "reservation_over_limit" and error.param == "max_tokens"
    assert "cost up to $0.003002" in error.message
    assert "whole monthly_budget_usd of $0.001," in error.message


def test_a_money_budget_without_a_rate_is_refused_where_the_tenant_is_made():
    from configs.gateway import GatewayConfig

    with pytest.raises(ValueError, match="tenant 'alice' has a monthly_budget_usd but no "):
        GatewayConfig.model_validate(
            {
                "admin_token_sha256": "1" * 64,
                "tenants": [money(5.0, tier="gold").model_dump()],
                "limits": {
                    "chargeback": {
                        "tiers": {"standard": PRICED.chargeback.tiers["standard"].model_dump()}
                    }
                },
            }
        )


def test_prices_finer_than_a_nano_dollar_per_token_are_refused_with_the_field():
    from configs.pricing import TokenPrices

    assert TokenPrices(input_per_million=0.075, output_per_million=0.3).nanos(2, 1) == 150 + 300
    with pytest.raises(
        ValueError, match=r"input_per_million: 0\.0375 has more than three decimals"
    ):
        TokenPrices(input_per_million=0.0375, output_per_million=0.3)


def test_tools_and_tool_calls_are_reserved_as_the_json_the_template_writes():
    tools = [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
    ]
    call = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": call},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    data = {"model": "m", "messages": messages, "tools": tools, "max_tokens": 4}
    # "hi" and "sunny", the two JSON documents, 16 per message and once more, 4
    structured = len(json.dumps(tools, separators=(",", ":"))) + len(
        json.dumps(call, separators=(",", ":"))
    )
    assert reservation(tenant(tpm=10_000), data, "chat", LIMITS).tokens == 7 + structured + 64 + 4
    items = [
        {"type": "message", "role": "user", "content": "hi"},
        {"type": "function_call", "call_id": "c1", "name": "weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny" * 20},
    ]
    asked = {"model": "m", "input": items, "max_output_tokens": 4}
    structured = sum(len(json.dumps(i, separators=(",", ":"))) for i in items[1:])
    # "hi", the two items without content as JSON, 16 per item and two more, 4
    assert reservation(tenant(tpm=10_000), asked, "responses", LIMITS).tokens == (
        2 + structured + 16 * 5 + 4
    )
