"""Token counts as a backend reports them, read on the way through to the client.

A JSON answer carries them in its "usage" object. A stream carries them in one usage event near
its end, which the gateway asks for on every stream (stream_options.include_usage) so that streams
are counted too; when the client did not ask for it, UsageFilter drops that usage-only event again
and the client gets the stream it asked for. An event with choices is always passed on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from serving.gateway.codec import loads

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange
    from serving.gateway.sse import EventFramer

USAGE_MARK = b'"usage"'  # bytes without it hold no usage object
_NO_USAGE = b'"usage":null'  # OpenAI puts this in every chunk once usage is asked for
_DATA = b"data:"


def _record(exchange: Exchange, usage: dict[str, Any]) -> None:
    exchange.prompt_tokens = usage.get("prompt_tokens") or 0
    exchange.completion_tokens = usage.get("completion_tokens") or 0


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
    """Reads a stream's usage event into the exchange; drops it if only the gateway asked for it.

    `dropped` counts the events dropped so far.
    """

    __slots__ = ("_exchange", "_split", "_strip", "dropped")

    def __init__(self, exchange: Exchange, framer: EventFramer, strip: bool) -> None:
        self._exchange = exchange
        self._split = framer.split
        self._strip = strip
        self.dropped = 0

    def filter(self, run: bytes) -> bytes:
        """A run of whole events as the client gets it: unchanged unless it holds a usage event."""
        if USAGE_MARK not in run or run.count(USAGE_MARK) == run.count(_NO_USAGE):
            return run
        kept = []
        for event in self._split(run):
            if USAGE_MARK in event and event.startswith(_DATA):
                try:
                    data = loads(event[len(_DATA) :])
                except ValueError:
                    data = None
                usage = data.get("usage") if isinstance(data, dict) else None
                if isinstance(usage, dict):
                    _record(self._exchange, usage)
                    if self._strip and not data.get("choices"):
                        self.dropped += 1
                        continue
            kept.append(event)
        return b"".join(kept)
