"""How much less likely the canary finds stable's answer than stable itself does: the mean
log-probability per token of stable's answer to a mirrored request, under each engine, and the
drop from stable's to the canary's (nats per token).

A quantized model rarely repeats its base's greedy answer word for word (SmolLM2-135M W8A8
against bf16: 22% identical at 16 tokens), yet finds the base's answer nearly as likely (a
median drop of 0.07 nats per token); a model with a broken template or wrong weights does not.
vLLM returns each prompt token's log-probability (`prompt_logprobs`); the answer is sent as the
assistant's turn to continue (chat) or appended to the prompt (completions), with max_tokens 1,
and its last `tokens` prompt tokens are read. An engine that returns none scores None, and the
pair is then judged by its text (evaluation/quality/agreement.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import httpx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Engine:
    url: str  # base URL, no /v1
    served_model: str
    version: str  # the model version it serves, as the gateway's routes name it


@dataclass(frozen=True)
class Call:
    """One scoring request as the engine served it: traffic no tenant pays for, which the usage
    log's reconciliation must still count."""

    version: str
    start: float  # unix seconds
    latency_s: float
    prompt_tokens: int
    completion_tokens: int
    status: int


class Scored(NamedTuple):
    value: float | None  # mean log-probability per token
    call: Call | None  # None when nothing was sent


def _chat(request: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's conversation as chat messages: its own, or a Responses API request's
    instructions and input (a string, or items with a role and text content)."""
    if "messages" in request:
        return request["messages"]
    messages = []
    if request.get("instructions"):
        messages.append({"role": "system", "content": request["instructions"]})
    given = request["input"]
    for item in [{"role": "user", "content": given}] if isinstance(given, str) else given:
        content = item.get("content") if isinstance(item, dict) else None
        if isinstance(content, list):  # input_text parts
            content = "".join(p.get("text") or "" for p in content if isinstance(p, dict))
        if isinstance(content, str) and item.get("role"):
            messages.append({"role": item["role"], "content": content})
    return messages


def answer_logprob(
    client: httpx.Client, engine: Engine, request: dict[str, Any], answer: str, tokens: int
) -> Scored:
    """Mean log-probability per token of `answer` after the request's prompt (None if the
    engine gives no prompt log-probabilities), and the call that asked it."""
    if tokens < 1 or not answer:
        return Scored(None, None)
    body: dict[str, Any] = {
        "model": engine.served_model,
        "max_tokens": 1,
        "temperature": 0,
        "prompt_logprobs": 0,
    }
    if "messages" in request or "input" in request:
        messages = [*_chat(request), {"role": "assistant", "content": answer}]
        body |= {"messages": messages, "add_generation_prompt": False}
        body["continue_final_message"] = True
        url = f"{engine.url}/v1/chat/completions"
    elif isinstance(request.get("prompt"), str):
        body["prompt"] = request["prompt"] + answer
        url = f"{engine.url}/v1/completions"
    else:
        return Scored(None, None)
    start, began = time.time(), time.perf_counter()
    response = client.post(url, json=body)
    data = response.json() if response.status_code == 200 else {}
    usage = data.get("usage") or {}
    call = Call(
        engine.version,
        start,
        time.perf_counter() - began,
        usage.get("prompt_tokens") or 0,
        usage.get("completion_tokens") or 0,
        response.status_code,
    )
    scored = data.get("prompt_logprobs")
    if scored is None:
        scored = (data.get("choices") or [{}])[0].get("prompt_logprobs")
    values = [_logprob(entry) for entry in (scored or [])[-tokens:] if entry]
    values = [v for v in values if v is not None]
    return Scored(sum(values) / len(values) if values else None, call)


def _logprob(entry: dict[str, Any]) -> float | None:
    """The prompt token's own log-probability: with prompt_logprobs 0 vLLM lists it alone."""
    first = next(iter(entry.values()), None)
    value = first.get("logprob") if isinstance(first, dict) else None
    return value if isinstance(value, int | float) and math.isfinite(value) else None


class Scorer:
    """Scores mirrored pairs by the canary's drop in log-probability of stable's answer, each pair
    once, at most `rate_rps` new pairs per second on average (two prefill-only requests each,
    straight to the engines, never billed). The cap is what keeps the analysis from crowding the
    traffic it measures: scoring every pair of a 2-requests/s shadow phase doubled each CPU
    engine's prefill work, and both engines fell behind. Each call is handed to `record`, so that
    what the engines served can be reconciled with what was logged."""

    def __init__(
        self,
        stable: dict[str, Engine],
        canary: Engine,
        rate_rps: float = 0.25,
        timeout_s: float = 30.0,
        record: Callable[[list[Call]], None] = lambda calls: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stable = stable  # by version
        self.canary = canary
        self.rate_rps = rate_rps
        self.record = record
        self.drops: dict[str, float | None] = {}
        self._client = httpx.Client(timeout=timeout_s)
        self._calls: list[Call] = []
        self._clock = clock
        self._last = clock()
        self._tokens = 1.0  # a bucket of one pair, filled at rate_rps: no burst after idle time

    def close(self) -> None:
        self._client.close()

    def score(self, pairs: Sequence[dict[str, Any]]) -> None:
        """Give each pair its `logprob_drop` (None: the engines gave no log-probabilities, or a
        call failed); pairs left for a later call have none yet."""
        now = self._clock()
        self._tokens = min(1.0, self._tokens + (now - self._last) * self.rate_rps)
        self._last = now
        for pair in pairs:
            key = pair.get("id")
            if key is None or not (pair["stable"]["ok"] and pair["canary"]["ok"]):
                continue
            if key not in self.drops:
                if self._tokens < 1.0:
                    continue
                self._tokens -= 1.0
                self.drops[key] = self._drop(pair)
            pair["logprob_drop"] = self.drops[key]
        if self._calls:
            calls, self._calls = self._calls, []
            self.record(calls)

    def annotate(self, pairs: Sequence[dict[str, Any]]) -> None:
        """Give the pairs scored already their drop, scoring none."""
        for pair in pairs:
            if pair.get("id") in self.drops:
                pair["logprob_drop"] = self.drops[pair["id"]]

    def _drop(self, pair: dict[str, Any]) -> float | None:
        stable = self.stable.get(pair.get("stable_version", ""))
        if stable is None:
            return None
        answer, tokens = pair["stable"]["text"], pair["stable"]["completion_tokens"]
        try:
            own = self._ask(stable, pair["request"], answer, tokens)
            theirs = self._ask(self.canary, pair["request"], answer, tokens)
        except (httpx.HTTPError, ValueError) as e:
            log.warning("scoring a mirrored pair failed (judged by its text): %s", e)
            return None
        if own is None or theirs is None:
            return None
        return own - theirs

    def _ask(
        self, engine: Engine, request: dict[str, Any], answer: str, tokens: int
    ) -> float | None:
        value, call = answer_logprob(self._client, engine, request, answer, tokens)
        if call is not None:
            self._calls.append(call)
        return value
