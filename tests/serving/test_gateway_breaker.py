"""The circuit breaker on a hand-stepped clock: threshold, open time, one probe, recovery."""

from __future__ import annotations

from serving.gateway.breaker import Breaker


def opened(threshold: int = 3, open_s: float = 10, at: float = 0) -> Breaker:
    breaker = Breaker(threshold, open_s)
    for _ in range(threshold):
        breaker.failure(at)
    return breaker


def test_consecutive_failures_up_to_the_threshold_open_it():
    breaker = Breaker(3, 10)
    breaker.failure(0)
    breaker.failure(1)
    assert breaker.state == "closed" and breaker.allows(2)
    breaker.failure(2)
    assert breaker.state == "open" and not breaker.allows(2.5)


def test_a_success_restarts_the_count():
    breaker = Breaker(3, 10)
    for _ in range(5):
        breaker.failure(0)
        breaker.failure(0)
        breaker.success()
    assert breaker.state == "closed" and breaker.failures == 0


def test_it_stays_open_for_open_s_then_lets_one_probe_through():
    breaker = opened(open_s=10, at=100)
    assert not breaker.allows(109.9)
    assert breaker.retry_after(104) == 6
    assert breaker.allows(110)  # the probe
    assert breaker.state == "half-open"
    assert not breaker.allows(110.5)  # one probe at a time
    assert not breaker.allows(119.9)


def test_a_successful_probe_closes_it():
    breaker = opened(at=0)
    assert breaker.allows(10)
    breaker.success()
    assert breaker.state == "closed" and breaker.retry_after(10) == 0
    assert all(breaker.allows(10.1) for _ in range(3))


def test_a_failed_probe_opens_it_again_for_open_s():
    breaker = opened(threshold=5, open_s=10, at=0)
    assert breaker.allows(10)
    breaker.failure(11)  # the probe's one failure, not another `threshold` of them
    assert breaker.state == "open"
    assert not breaker.allows(20.9)
    assert breaker.allows(21)


def test_a_probe_that_never_reports_stops_blocking_after_open_s():
    breaker = opened(open_s=10, at=0)
    assert breaker.allows(10)  # the probe's request is cancelled: no success, no failure
    assert not breaker.allows(19.9)
    assert breaker.allows(20)  # a new probe
    assert not breaker.allows(20.1)
