"""Token counts as a backend reports them, read on the way through to the client.

A JSON answer carries them in its "usage" object. For a stream the gateway asks the backend for
usage on every chunk as well as at the end (stream_options.continuous_usage_stats and
include_usage, as vLLM's OpenAI server takes them): each chunk then carries its choice's cumulative
counts, so a stream the client leaves half-way is charged the tokens generated until then, not 0.

Reading stays cheap on the hot path: with one choice, the last "completion_tokens" in a run (a
bytes search) is the count so far; only a stream of several choices (n > 1, or several prompts)
reads each event, to add up its choices. The client still gets the stream it asked for: the
per-chunk usage is cut out of each run (one regex pass in C) unless it asked for
continuous_usage_stats, and the usage-only event at the end is dropped unless it asked for
include_usage. An event with choices is always passed on.

A backend that sends no usage at all (an OpenAI-compatible server that ignores stream_options) is
counted from what it relayed instead: one completion token per non-empty content or text delta.
That is a lower bound, as a server may put several tokens in one delta; the relay flags it.
"""

from __future__ import annotations

import re
from time import perf_counter
from typing import TYPE_CHECKING, Any, NamedTuple

from serving.gateway.codec import loads

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange
    from serving.gateway.sse import EventFramer

USAGE_MARK = b'"usage"'  # bytes without it hold no usage object
_DATA = b"data:"
_COMPLETION = b'"completion_tokens":'
_PROMPT = b'"prompt_tokens":'
_INDEX = b'"index":'
_NO_CHOICES = (b'"choices":[]', b'"choices": []')  # the usage-only event, compact or not
_INT = re.compile(rb"\s*(\d+)")
# A chunk's usage object (one level of nesting: prompt_tokens_details), with the comma before it.
_CHUNK_USAGE = re.compile(rb',\s*"usage"\s*:\s*\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}')
_DELTA = re.compile(rb'"(?:content|text)"\s*:\s*"(?!")')  # a non-empty content or text string


class Asked(NamedTuple):
    """What a client asked of a stream's usage, and how the stream's choices group by prompt."""

    final: bool  # include_usage: one usage-only event at the end
    continuous: bool  # continuous_usage_stats (only with include_usage, as in vLLM): every chunk
    n: int = 1  # choices per prompt
    choices: int = 1  # choices in all: n x prompts


def ask_for_usage(data: dict[str, Any], prompts: int) -> Asked:
    """Ask the stream for usage on every chunk and at its end; return what the client asked for."""
    options = data.get("stream_options") or {}
    final = options.get("include_usage") is True
    continuous = final and options.get("continuous_usage_stats") is True
    data["stream_options"] = {**options, "include_usage": True, "continuous_usage_stats": True}
    n = max(data.get("n") or 1, 1)
    return Asked(final, continuous, n, n * prompts)


def _record(exchange: Exchange, usage: dict[str, Any]) -> None:
    """Chat, completions and embeddings name their counts prompt_ and completion_tokens; the
    Responses API names them input_ and output_tokens."""
    exchange.prompt_tokens = usage.get("prompt_tokens") or usage.get("input_tokens") or 0
    exchange.completion_tokens = usage.get("completion_tokens") or usage.get("output_tokens") or 0
    details = usage.get("prompt_tokens_details") or usage.get("input_tokens_details")
    if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
        exchange.cached_tokens = details["cached_tokens"]  # vLLM: --enable-prompt-tokens-details


def _int_at(data: bytes, at: int) -> int | None:
    match = _INT.match(data, at)
    return int(match[1]) if match else None


def read_answer_usage(exchange: Exchange, body: bytes) -> None:
    """Record the token counts of a JSON answer, if it has a usage object."""
    if USAGE_MARK not in body:
        return
    try:
        usage = loads(body).get("usage")
    except (ValueError, AttributeError):
        return
    if isinstance(usage, dict) and usage:
        _record(exchange, usage)


class UsageFilter:
    """Reads a stream's token counts into the exchange as they pass; gives the client the usage it
    asked for and no other.

    `reported`: the backend has sent counts. `counted`: the non-empty deltas of the runs that had
    none, for `settle`. `dropped`: the events dropped so far.
    """

    __slots__ = ("_asked", "_choices", "_exchange", "_split", "counted", "dropped", "reported")

    def __init__(self, exchange: Exchange, framer: EventFramer, asked: Asked) -> None:
        self._exchange = exchange
        self._split = framer.split
        self._asked = asked
        # index -> (prompt, completion) tokens so far, for streams of several choices only
        self._choices: dict[int, tuple[int, int]] | None = {} if asked.choices > 1 else None
        self.reported = False
        self.counted = 0
        self.dropped = 0

    def filter(self, run: bytes) -> bytes:
        """A run of whole events as the client gets it: unchanged unless it holds usage the client
        did not ask for."""
        at = run.rfind(_COMPLETION)
        if at < 0:
            if not self.reported:
                self.counted += len(_DELTA.findall(run))
            return run
        self.reported = True
        if self._choices is None:
            self._read_last(run, at)
        else:
            self._read_choices(run)
        if _NO_CHOICES[0] in run or _NO_CHOICES[1] in run:
            return self._final(run)
        return run if self._asked.continuous else _CHUNK_USAGE.sub(b"", run)

    def timings(self, first: float, last: float, events: int) -> tuple[float, float | None]:
        """When the first token came and the mean interval between tokens, from the times of the
        first and last runs relayed and the events the client got (each one step of the engine).
        Events that arrived in one read carry no inter-token timing: unmeasured, not zero."""
        events -= self.dropped
        return first, ((last - first) / (events - 1) if events > 1 and last > first else None)

    def settle(self) -> bool:
        """When the stream stops: True if the backend sent no counts, the completion tokens then
        being the non-empty deltas relayed (a lower bound; the prompt's are unknown, 0)."""
        if self.reported:
            return False
        self._exchange.completion_tokens = self.counted
        return True

    def _read_last(self, run: bytes, at: int) -> None:
        exchange = self._exchange
        completion = _int_at(run, at + len(_COMPLETION))
        if completion is not None:
            exchange.completion_tokens = completion
        at = run.rfind(_PROMPT)
        prompt = _int_at(run, at + len(_PROMPT)) if at >= 0 else None
        if prompt is not None:
            exchange.prompt_tokens = prompt

    def _read_choices(self, run: bytes) -> None:
        """Each choice's latest counts: completions add up; a prompt's count, repeated by each of
        its n choices, is taken once."""
        seen = self._choices
        for event in self._split(run):
            at, i = event.rfind(_COMPLETION), event.find(_INDEX)
            if at < 0 or i < 0:  # the usage-only event has no choice: _final reads it
                continue
            index, completion = (
                _int_at(event, i + len(_INDEX)),
                _int_at(event, at + len(_COMPLETION)),
            )
            if index is not None and completion is not None:
                at = event.rfind(_PROMPT)
                seen[index] = (
                    (_int_at(event, at + len(_PROMPT)) or 0) if at >= 0 else 0,
                    completion,
                )
        n, prompts = self._asked.n, {}
        for index, (prompt, _) in seen.items():
            prompts[index // n] = max(prompts.get(index // n, 0), prompt)
        self._exchange.prompt_tokens = sum(prompts.values())
        self._exchange.completion_tokens = sum(completion for _, completion in seen.values())

    def _final(self, run: bytes) -> bytes:
        """A run holding the usage-only event (once a stream): its counts are the backend's own
        totals; it goes on only if the client asked for it."""
        asked, kept = self._asked, []
        for event in self._split(run):
            if _NO_CHOICES[0] in event or _NO_CHOICES[1] in event:
                usage = _usage_of(event)
                if usage is not None:
                    _record(self._exchange, usage)
                    if not asked.final:
                        self.dropped += 1
                        continue
                kept.append(event)
            else:
                kept.append(_CHUNK_USAGE.sub(b"", event))
        return run if asked.continuous else b"".join(kept)  # it asked for all: nothing is cut


def _usage_of(event: bytes) -> dict[str, Any] | None:
    if not event.startswith(_DATA):
        return None
    try:
        data = loads(event[len(_DATA) :])
    except ValueError:
        return None
    usage = data.get("usage") if isinstance(data, dict) else None
    return usage if isinstance(usage, dict) and not data.get("choices") else None


_RESPONSE_DELTA = re.compile(rb'"type"\s*:\s*"response\.output_text\.delta"')
_RESPONSE_DONE = re.compile(rb'"type"\s*:\s*"response\.(?:completed|incomplete|failed)"')


class ResponsesUsage:
    """The token counts of a Responses API stream (/v1/responses), which has no per-chunk usage:
    its last event (response.completed, .incomplete or .failed) carries the whole response with
    its usage. Until then each output_text delta is counted, so a stream the client leaves is
    charged what it relayed, flagged like a backend without usage (a lower bound: vLLM may put
    several tokens in one delta). Nothing is cut: the client asked for nothing else.

    `first_token_at` (perf_counter) is when the first delta came: the stream's first events
    announce the response before any token is made.
    """

    __slots__ = ("_exchange", "_split", "counted", "dropped", "first_token_at", "reported")

    def __init__(self, exchange: Exchange, framer: EventFramer, asked: Asked) -> None:
        self._exchange = exchange
        self._split = framer.split
        self.reported = False
        self.counted = 0
        self.dropped = 0
        self.first_token_at: float | None = None

    def filter(self, run: bytes) -> bytes:
        if not self.reported:
            deltas = len(_RESPONSE_DELTA.findall(run))
            if deltas and self.first_token_at is None:
                self.first_token_at = perf_counter()
            self.counted += deltas
        if USAGE_MARK in run and _RESPONSE_DONE.search(run):
            for event in self._split(run):
                if _RESPONSE_DONE.search(event) and (usage := _response_usage(event)):
                    _record(self._exchange, usage)
                    self.reported = True
        return run

    def timings(self, first: float, last: float, events: int) -> tuple[float, float | None]:
        """The first delta's time; no interval between tokens, since most of a Responses
        stream's events carry none."""
        return self.first_token_at or first, None

    def settle(self) -> bool:
        """When the stream stops: True if it ended before its usage, the completion tokens then
        being the deltas relayed."""
        if self.reported:
            return False
        self._exchange.completion_tokens = self.counted
        return True


def _response_usage(event: bytes) -> dict[str, Any] | None:
    at = event.find(_DATA)
    if at < 0:  # a Responses event has an `event:` line before its data
        return None
    try:
        data = loads(event[at + len(_DATA) :])
    except ValueError:
        return None
    response = data.get("response") if isinstance(data, dict) else None
    usage = response.get("usage") if isinstance(response, dict) else None
    return usage if isinstance(usage, dict) and usage else None
