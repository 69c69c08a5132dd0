"""The in-process limiter on a hand-stepped clock: the sliding minute, tokens, the monthly
budget."""

from __future__ import annotations

from collections.abc import Coroutine
from datetime import UTC, datetime

import pytest

from configs.gateway import TenantSpec
from serving.gateway.errors import RateLimited
from serving.gateway.limits import LocalLimiter

T0 = 1_750_000_000.0  # a whole second, mid-month


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def tenant(**limits: int) -> TenantSpec:
    return TenantSpec(name="alice", key_sha256="0" * 64, **limits)


def at_once(step: Coroutine) -> None:
    """Run a coroutine that must finish without awaiting: check and take are one atomic step."""
    with pytest.raises(StopIteration):
        step.send(None)


def admit(limiter: LocalLimiter, who: TenantSpec) -> RateLimited | None:
    """None when admitted, else the refusal."""
    try:
        at_once(limiter.admit(who))
    except RateLimited as refusal:
        return refusal
    return None


def charge(limiter: LocalLimiter, who: TenantSpec, tokens: int) -> None:
    at_once(limiter.charge(who, tokens))


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


def test_tokens_count_when_charged_after_the_response_not_at_admission():
    clock, alice = Clock(), tenant(tpm=10)
    limiter = LocalLimiter(clock)
    for _ in range(5):
        assert admit(limiter, alice) is None  # tokens are unknown until a response is complete
    charge(limiter, alice, 6)
    assert admit(limiter, alice) is None  # 6 of 10 used
    clock.now = T0 + 20
    charge(limiter, alice, 6)
    refused = admit(limiter, alice)
    assert refused.type == "tokens" and refused.retry_after == 40
    clock.now = T0 + 60  # the first 6 have left the window
    assert admit(limiter, alice) is None


def test_the_monthly_budget_holds_until_the_month_rolls_over():
    clock, bob = Clock(epoch(2025, 1, 31, 23, 59)), tenant(monthly_token_budget=12)
    limiter = LocalLimiter(clock)
    charge(limiter, bob, 7)
    assert admit(limiter, bob) is None
    charge(limiter, bob, 5)
    refused = admit(limiter, bob)
    assert refused.code == "insufficient_quota" and refused.retry_after == 60
    clock.now = epoch(2025, 2, 1, 0, 0, 1)
    assert admit(limiter, bob) is None  # a new month, a new budget
    charge(limiter, bob, 11)
    assert admit(limiter, bob) is None
    charge(limiter, bob, 1)
    assert admit(limiter, bob).code == "insufficient_quota"


def test_tokens_charged_first_in_a_new_month_count_against_that_month():
    clock, bob = Clock(epoch(2025, 12, 31, 23, 59, 30)), tenant(monthly_token_budget=10)
    limiter = LocalLimiter(clock)
    charge(limiter, bob, 10)
    assert admit(limiter, bob).retry_after == 30  # December rolls over into next year
    clock.now = epoch(2026, 1, 1, 0, 0, 5)
    charge(limiter, bob, 4)  # the charge, not an admission, sees the new month first
    assert admit(limiter, bob) is None
    charge(limiter, bob, 6)
    assert admit(limiter, bob) is not None


@pytest.mark.parametrize("tokens", [0, 100])
def test_a_tenant_without_limits_is_never_refused(tokens):
    limiter, carol = LocalLimiter(Clock()), tenant()
    for _ in range(1000):
        charge(limiter, carol, tokens)
        assert admit(limiter, carol) is None
