"""What a tenant has left of its per-minute limits once a request is admitted, and the
`x-ratelimit-*` response headers that tell the client, as OpenAI's API does:

  x-ratelimit-limit-requests / -tokens        the tenant's rpm / tpm
  x-ratelimit-remaining-requests / -tokens    what is left in the sliding minute after this
                                              request (its reservation counted as used)
  x-ratelimit-reset-requests / -tokens        until the oldest counted second leaves the minute

A limit the tenant does not have gets no headers.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.types import Message, Send


@dataclass(frozen=True, slots=True)
class Window:
    limit: int
    remaining: int
    reset_s: int


@dataclass(frozen=True, slots=True)
class Quota:
    requests: Window | None
    tokens: Window | None

    def headers(self) -> list[tuple[bytes, bytes]]:
        out = []
        for unit, window in (("requests", self.requests), ("tokens", self.tokens)):
            if window is not None:
                out += [
                    (b"x-ratelimit-limit-" + unit.encode(), b"%d" % window.limit),
                    (b"x-ratelimit-remaining-" + unit.encode(), b"%d" % max(0, window.remaining)),
                    (b"x-ratelimit-reset-" + unit.encode(), b"%ds" % max(0, window.reset_s)),
                ]
        return out


def with_headers(send: Send, headers: list[tuple[bytes, bytes]]) -> Send:
    """`send` with `headers` added to the response's start."""

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *headers]}
        await send(message)

    return sending
