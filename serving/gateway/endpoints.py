"""The OpenAI-compatible endpoints the gateway serves, each at the path vLLM serves it at.

Every one passes the same auth, limits, usage log and metrics. They differ in what they generate
and in what their timings may prove: generating endpoints bound their completion with a request
field, stream when asked, and take canary traffic like chat; tokenize and detokenize generate
nothing and answer in microseconds, so they go to stable only and stay out of the backends'
statistics, where their timings would make stable look faster than any canary.
"""

from __future__ import annotations

PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "responses": "/v1/responses",
    "embeddings": "/v1/embeddings",
    "tokenize": "/tokenize",
    "detokenize": "/detokenize",
}
# The request fields that bound an endpoint's completion tokens; none: it generates nothing.
BOUNDS: dict[str, tuple[str, ...]] = {
    "chat": ("max_tokens", "max_completion_tokens"),
    "completions": ("max_tokens", "max_completion_tokens"),
    "responses": ("max_output_tokens",),
}
STREAMING = frozenset(BOUNDS)  # the endpoints that stream when asked to (`stream: true`)
MIRRORED = frozenset({"chat", "completions", "responses"})  # copied when the route mirrors
UTILITY = frozenset({"tokenize", "detokenize"})  # stable only, not in the statistics
