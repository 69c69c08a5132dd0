"""Every token vLLM generates for a tenant is in the gateway's usage log: the rows' prompt and
completion tokens equal the increase of vLLM's own counters (vllm:prompt_tokens_total,
vllm:generation_tokens_total) exactly over a JSON answer, a stream, a stream of n=2 (whose prompt
vLLM counts twice) and an error; over a client that hangs up mid-stream, up to the few tokens vLLM
generated after the gateway stopped reading. The reconciliation (evaluation/monitoring/reconcile.py)
over the gateway's own meter readings agrees. Against the shared real vLLM on the tiny model."""

from __future__ import annotations

import re
import time

import httpx

from evaluation.monitoring.reconcile import ABORT_GRACE_S, MARGIN_S, reconcile
from serving.gateway.usage import METER, UNBILLED, USAGE, read_table, read_usage
from tests.evaluation.conftest import KEY

COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")
HANG_UP_N = 16


def counters(url: str) -> tuple[int, int]:
    """vLLM's prompt and generation token counters, summed over their label sets."""
    text = httpx.get(f"{url}/metrics").text
    return tuple(
        int(sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)))
        for name in COUNTERS
    )


def settled(url: str) -> tuple[int, int]:
    """The counters once they stop moving (an aborted request is counted when vLLM drops it)."""
    last, deadline = counters(url), time.monotonic() + 10
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = counters(url)
        if now == last:
            return now
        last = now
    return last


def completion(**fields) -> dict:
    return {
        "model": "tiny-chat",
        "prompt": "The capital of France is",
        "ignore_eos": True,
        **fields,
    }


def test_the_usage_log_equals_vllms_own_token_counters(tiny_server, tiny_gateway):
    gateway = tiny_gateway
    headers = {"Authorization": f"Bearer {KEY}"}
    post = f"{gateway}/v1/completions"
    before, start = settled(tiny_server.url), time.time()
    # A reading of the settled counters (the shared engine may have been finishing an earlier
    # test's requests when the gateway started), quiet before the first request.
    while read_table(METER, start, time.time() + 1).empty:
        time.sleep(0.05)
    time.sleep(MARGIN_S)
    assert httpx.post(post, json=completion(max_tokens=7), headers=headers).status_code == 200
    assert httpx.post(post, json=completion(max_tokens=9, stream=True), headers=headers).is_success
    two = completion(max_tokens=5, n=2, stream=True)
    assert httpx.post(post, json=two, headers=headers).status_code == 200
    too_long = completion(max_tokens=100_000)  # over the 256-token context: vLLM refuses it
    assert httpx.post(post, json=too_long, headers=headers).status_code == 400
    complete_rows = 4
    after_complete = settled(tiny_server.url)
    # Hung up at the first chunk of HANG_UP_N choices of the longest stream the context allows:
    # the client must be gone while the engine still generates (one choice of the tiny model was
    # sometimes done, and relayed whole from the gateway's buffer, before the client, which shares
    # this process and its GIL with the gateway, could leave).
    hang_up = completion(max_tokens=240, n=HANG_UP_N, stream=True)
    with httpx.stream("POST", post, json=hang_up, headers=headers) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # leaving the block hangs up
    after = settled(tiny_server.url)
    deadline = time.monotonic() + 10
    while len(rows := read_usage(start, time.time() + 1)) < complete_rows + 1:
        assert time.monotonic() < deadline, "the usage rows were not written"
        time.sleep(0.1)

    done, left = rows.iloc[:complete_rows], rows.iloc[complete_rows]
    assert list(done.completion_tokens) == [7, 9, 10, 0] and list(done.status) == [
        200,
        200,
        200,
        400,
    ]
    assert done.tokens_from.isna().all()  # every count came from vLLM itself
    # Completed requests: exact, both counters. vLLM runs each of n choices as its own request and
    # counts the prompt once per choice; usage (like OpenAI's) counts it once per request.
    choices = [1, 1, 2, 1]
    assert (done.prompt_tokens * choices).sum() == after_complete[0] - before[0]
    assert done.completion_tokens.sum() == after_complete[1] - before[1]
    # The hang-up: its prompt once for each choice vLLM had started; the tokens it was relayed are
    # charged, and vLLM generated at least those and at most what was asked (the tiny engine can
    # finish all 16 choices before it notices the abort: CI saw 3,840 of 3,840).
    assert left.error_kind == "client_disconnected" and left.completion_tokens >= 1
    started, rest = divmod(after[0] - after_complete[0], left.prompt_tokens)
    assert rest == 0 and 1 <= started <= HANG_UP_N, (started, rest)
    generated = after[1] - after_complete[1]
    assert left.completion_tokens <= generated <= 240 * HANG_UP_N, (
        left.completion_tokens,
        generated,
    )

    # The same, as the cost flow checks it: the gateway's own readings of the counters, from a
    # quiet one before the first request to one after the hang-up's engine had stopped.
    done_at = (rows.time.max().timestamp() + rows.latency_ms.max() / 1000) + ABORT_GRACE_S
    while read_table(METER, done_at + MARGIN_S, time.time() + 1).empty:
        assert time.monotonic() < deadline + 20, "no meter reading after the requests"
        time.sleep(0.1)
    end = time.time() + 1
    billed, unbilled = read_table(USAGE, start, end), read_table(UNBILLED, start, end)
    (check,) = reconcile(billed, unbilled, read_table(METER, start, end))
    assert check.ok and check.quiet, check.line()
    assert check.requests == {"billed": 5}
    assert check.prompt.metered == after[0] - before[0]
    assert check.generation.metered == after[1] - before[1]
    assert check.generation.residual == generated - left.completion_tokens
