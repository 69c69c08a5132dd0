"""The gateway's side of the reconciliation: each backend's meter readings and every request it
served, billed or not (mirrored copies both ways, a canary's failed tries retried on stable), so
the usage log accounts for each token the backends counted. Two mock upstreams, one per version,
whose /metrics count what they served as vLLM's counters do."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from evaluation.monitoring.reconcile import ABORT_GRACE_S, MARGIN_S, reconcile
from serving.gateway.usage import METER, UNBILLED, USAGE, read_table
from tests.serving.conftest import backend, chat, post_many


def canary_step(keys, stable_url: str, canary_url: str):
    """Stable '1' and canary '2' at 50/50, each request copied to the other side."""
    config = keys.config(
        [backend(stable_url, "1", weight=50), backend(canary_url, "2", role="canary", weight=50)],
        usage={"batch_interval_s": 0.1, "meter_interval_s": 0.2},
    )
    data = config.model_dump()
    data["routes"][0]["mirror"] = {"to": "2", "rate_rps": 1000.0}
    return type(config).model_validate(data)


def tables(since: float) -> tuple:
    return tuple(read_table(t, since, time.time() + 1) for t in (USAGE, UNBILLED, METER))


def after_everything(since: float, requests: int) -> tuple:
    """The three tables once every request and copy is written and a reading follows them all."""
    deadline = time.monotonic() + 20
    while True:
        billed, unbilled, meter = tables(since)
        ends = [(f["time"] + f["latency_ms"] / 1000).max() for f in (billed, unbilled) if len(f)]
        last = max(ends, default=math.inf) + ABORT_GRACE_S + MARGIN_S  # failed tries may go on
        if len(billed) == requests and (meter["time"] > last).any():
            copies_done = len(unbilled[unbilled.source == "shadow"]) == requests
            if copies_done:
                return billed, unbilled, meter
        assert time.monotonic() < deadline, "the usage rows or a last reading never came"
        time.sleep(0.1)


@pytest.mark.parametrize("stream", [False, True])
def test_every_token_the_backends_counted_is_in_the_usage_log_copies_and_retries_included(
    keys, run_gateway, stream
):
    stable, canary = MockUpstream(), MockUpstream()
    canary.faults["served-2"] = Fault(status=500, every=4)  # retried on stable, copies fail too
    since = time.time()
    with (
        serve(stable) as stable_url,
        serve(canary) as canary_url,
        run_gateway(canary_step(keys, stable_url, canary_url)) as base,
    ):
        while len(tables(since)[2]) < 2:  # a reading of each, quiet, before the first request
            time.sleep(0.05)
        time.sleep(MARGIN_S)
        bodies = [chat(f"question {i}", max_tokens=4, stream=stream) for i in range(60)]
        answers = asyncio.run(post_many(base, keys.key("alice"), bodies, concurrency=6))
        billed, unbilled, meter = after_everything(since, 60)
    assert [s for s, _, _ in answers] == [200] * 60
    checks = {c.version: c for c in reconcile(billed, unbilled, meter)}
    assert set(checks) == {"1", "2"}
    for check in checks.values():
        assert check.ok and check.quiet, check.line()
        assert check.generation.counted > 0
    one, two = checks["1"], checks["2"]
    assert one.requests["billed"] + two.requests["billed"] == 60
    assert one.requests["shadow"] + two.requests["shadow"] == 60  # one copy per request
    assert two.requests["retry"] > 0 and "retry" not in one.requests
    # The backends' own counters are what the rows add up to, every source included...
    assert one.generation.metered == stable.generation_tokens_total
    assert two.prompt.metered == canary.prompt_tokens_total
    # ... and the tenant is billed for the answers it got only: without the copies, stable
    # counted more than the billed rows say.
    assert not {c.version: c for c in reconcile(billed, unbilled[:0], meter)}["1"].ok
    assert set(billed.role) == {"stable", "canary"}
