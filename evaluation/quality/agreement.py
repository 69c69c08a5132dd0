"""How far a canary's answer is from stable's answer to the same request (a mirrored pair).

Cheap measures, no model needed: exact agreement, token agreement (F1 over words, so one early
divergence of a greedy quantized model does not zero it), the length ratio, a refusal where stable
answered, and format validity (JSON parses, when the request asked for JSON); and, where the
engines give them, the canary's drop in log-probability of stable's answer (logprob.py), which
stands in for the words' agreement. A quantized model never matches its base token for token, so
an answer counts as degraded only when it falls beyond the policy's bounds; the rollout tests the
share of degraded answers, not identity.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

from configs.rollout import QualityPolicy

# Openings of a refusal in English instruction-tuned models' answers.
_REFUSAL = re.compile(
    r"^\W*(?:i(?:'m| am) (?:sorry|unable|not able)|i can(?:not|'t)|as an ai\b|"
    r"i (?:won't|will not|must decline))",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class Agreement:
    exact: bool
    tokens: float  # F1 of the two answers' words, 1.0 when both are empty
    length_ratio: float  # the longer answer's tokens over the shorter's (>= 1)
    refusal: bool  # the canary refused where stable answered
    format_ok: bool  # the canary's answer parses as JSON where stable's did, when JSON was asked
    degraded: bool


def token_f1(reference: str, answer: str) -> float:
    """F1 of the two texts' words as multisets."""
    ref, got = Counter(reference.split()), Counter(answer.split())
    if not ref and not got:
        return 1.0
    common = sum((ref & got).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def refuses(text: str) -> bool:
    return bool(_REFUSAL.match(text))


def asks_json(request: dict[str, Any]) -> bool:
    """Whether the request asks for JSON: chat's `response_format`, or the Responses API's
    `text.format`."""
    fmt = request.get("response_format")
    if fmt is None and isinstance(request.get("text"), dict):
        fmt = request["text"].get("format")
    return isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema")


def parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def length_ratio(stable_tokens: int, canary_tokens: int) -> float:
    low, high = sorted((max(stable_tokens, 0), max(canary_tokens, 0)))
    if high == 0:
        return 1.0
    return high / low if low else float("inf")


def score(
    request: dict[str, Any],
    stable: dict[str, Any],
    canary: dict[str, Any],
    policy: QualityPolicy,
    logprob_drop: float | None = None,
) -> Agreement:
    """Compare the two answers of one pair (each a side as the gateway records it: text and
    completion_tokens); with the canary's drop in log-probability of stable's answer
    (logprob.py), that decides in place of the words' agreement."""
    s_text, c_text = stable["text"], canary["text"]
    exact = s_text == c_text
    tokens = 1.0 if exact else token_f1(s_text, c_text)
    ratio = length_ratio(stable["completion_tokens"], canary["completion_tokens"])
    refusal = refuses(c_text) and not refuses(s_text)
    format_ok = not (asks_json(request) and parses(s_text) and not parses(c_text))
    unlike = (
        logprob_drop > policy.max_logprob_drop
        if logprob_drop is not None
        else tokens < policy.min_agreement
    )
    degraded = not exact and (unlike or ratio > policy.max_length_ratio or refusal or not format_ok)
    return Agreement(exact, tokens, ratio, refusal, format_ok, degraded)
