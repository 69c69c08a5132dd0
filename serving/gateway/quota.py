"""What a tenant has left of its per-minute limits once a request is admitted, and the
`x-ratelimit-*` response headers that tell the client, as OpenAI's API does:

  x-ratelimit-limit-requests / -tokens        the tenant's rpm / tpm
  x-ratelimit-remaining-requests / -tokens    what is left in the sliding minute after this
                                              request (its reservation counted as used)
  x-ratelimit-reset-requests / -tokens        until the oldest counted second leaves the minute

A limit the tenant does not have gets no headers.
"""

from __future__ import annotations

from typing import NamedTuple

from starlette.types import Message, Send


class Window(NamedTuple):
    limit: int
    remaining: int
    reset_s: int


# Header names built once: the headers are made for every admitted request.
_NAMES = {
    unit: tuple(b"x-ratelimit-%s-%s" % (what, unit) for what in (b"limit", b"remaining", b"reset"))
    for unit in (b"requests", b"tokens")
}


class Quota(NamedTuple):
    requests: Window | None
    tokens: Window | None

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = []
        for unit, window in ((b"requests", self.requests), (b"tokens", self.tokens)):
            if window is not None:
                limit, remaining, reset = _NAMES[unit]
                out += [
                    (limit, b"%d" % window.limit),
                    (remaining, b"%d" % max(0, window.remaining)),
                    (reset, b"%ds" % max(0, window.reset_s)),
                ]
        return out


def with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """`send` with `headers` added to the response's start."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return sending
