"""The response cache: a request asked again gets the answer it got before, without a backend.

What is cached: a request deterministic by rule (temperature 0, or a seed), unless its client
sends `x-slipway-cache: no`, and any request whose client sends `x-slipway-cache: yes`; never for
a tenant whose `cache` is off. What is promised: a hit replays, byte for byte, the answer the
backend gave the first time (a stream event for event, in one write). vLLM is not bit-exact at
temperature 0 (batching changes the floating-point order), so a fresh answer may differ from the
cached one: the cache makes repeated requests consistent; it does not make the engine exact.

The key is the digest of: the request body (every field but `user`, as canonical JSON, so any
field that may change the answer is in it), the endpoint, the digest of the weights of the
backend the request was routed to (a promotion starts from an empty cache, and a canary's answers
never serve stable's users), and the tenant (scope "tenant", the default). Only a whole 200
answer is stored: nothing cut short, failed, retried on another backend, or served by failover.

A hit reaches no backend: it is no canary evidence and in no backend statistics; it is billed as
`cache.billing` says and logged with tokens_from 'cache', which the reconciliation with the
engines' counters leaves out.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from starlette.types import Send

from configs.gateway import CacheSpec, Tenant
from serving.gateway.codec import dumps, loads

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange
    from serving.gateway.routing import Backend

log = logging.getLogger("serving.gateway")

HEADER = b"x-slipway-cache"
MISS = [(HEADER, b"miss")]
_LOG_EVERY_S = 10.0
_IGNORED = frozenset({"user"})  # fields that never change an answer


@dataclass(frozen=True, slots=True)
class Entry:
    """An answer as its client got it, and the tokens it cost."""

    stream: bool
    content_type: bytes
    body: bytes
    prompt_tokens: int
    completion_tokens: int

    def pack(self) -> bytes:
        head = [self.stream, self.content_type.decode(), self.prompt_tokens, self.completion_tokens]
        return dumps(head) + b"\n" + self.body

    @classmethod
    def unpack(cls, data: bytes) -> Entry:
        head, body = data.split(b"\n", 1)
        stream, content_type, prompt, completion = loads(head)
        return cls(stream, content_type.encode(), body, prompt, completion)


class Store(Protocol):
    async def open(self) -> None: ...
    async def get(self, key: bytes) -> Entry | None: ...
    async def put(self, key: bytes, entry: Entry) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """This gateway's own LRU, bounded in entries and bytes; an entry lives `ttl_s`."""

    def __init__(self, spec: CacheSpec, clock: Callable[[], float] = time.monotonic) -> None:
        self._spec = spec
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Entry]] = OrderedDict()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        self._entries.clear()
        self.bytes = 0

    async def get(self, key: bytes) -> Entry | None:
        found = self._entries.get(key)
        if found is None:
            return None
        expires, entry = found
        if expires <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: bytes, entry: Entry) -> None:
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + self._spec.ttl_s, entry)
        self.bytes += len(entry.body)
        spec = self._spec
        while len(self._entries) > spec.max_entries or self.bytes > spec.max_bytes:
            self._drop(next(iter(self._entries)))  # the least recently used

    def _drop(self, key: bytes) -> None:
        _, entry = self._entries.pop(key)
        self.bytes -= len(entry.body)


class RedisStore:
    """Shared by every gateway on the same Redis; Redis expires each entry after `ttl_s`. While
    Redis cannot be reached, every lookup is a miss and nothing is stored (logged every 10 s)."""

    def __init__(self, url: str, prefix: str, ttl_s: float) -> None:
        self._url = url
        self._prefix = prefix.encode()
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._redis: aioredis.Redis | None = None
        self._logged_at = -_LOG_EVERY_S
        self.errors = 0

    async def open(self) -> None:
        self._redis = aioredis.Redis.from_url(self._url, socket_timeout=1)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def get(self, key: bytes) -> Entry | None:
        try:
            data = await self._redis.get(self._prefix + key)
        except RedisError as e:
            self._down(e)
            return None
        return None if data is None else Entry.unpack(data)

    async def put(self, key: bytes, entry: Entry) -> None:
        try:
            await self._redis.set(self._prefix + key, entry.pack(), px=self._ttl_ms)
        except RedisError as e:
            self._down(e)

    def _down(self, error: RedisError) -> None:
        self.errors += 1
        now = time.monotonic()
        if now - self._logged_at >= _LOG_EVERY_S:
            self._logged_at = now
            log.error("response cache: Redis unreachable (%s); serving without the cache", error)


def deterministic(data: dict[str, Any]) -> bool:
    """Whether the request asks for the same answer every time: temperature 0, or a seed."""
    return data.get("temperature") == 0 or data.get("seed") is not None


class ResponseCache:
    """Decides what is cached, keys it, and counts hits, misses and answers stored."""

    def __init__(self, spec: CacheSpec, store: Store) -> None:
        self.spec = spec
        self.store = store
        self.counts: Counter[str] = Counter()  # hit, miss, stored, too_large

    def wants(self, asked: bytes | None, data: dict[str, Any], tenant: Tenant) -> bool:
        if not tenant.cache or asked == b"no":
            return False
        return asked == b"yes" or deterministic(data)

    def request_digest(self, data: dict[str, Any], endpoint: str, tenant: Tenant) -> bytes:
        """The key's part that the route does not decide: taken before the gateway adds to the
        body (the usage it asks a stream for), so it is the client's request."""
        kept = {k: v for k, v in data.items() if k not in _IGNORED}
        who = tenant.name if self.spec.scope == "tenant" else ""
        return hashlib.sha256(dumps([endpoint, who, _canonical(kept)])).digest()

    @staticmethod
    def key(request_digest: bytes, backend: Backend) -> bytes:
        return hashlib.sha256(request_digest + backend.spec.digest.encode()).hexdigest().encode()

    async def lookup(self, request_digest: bytes, backend: Backend) -> Entry | None:
        entry = await self.store.get(self.key(request_digest, backend))
        self.counts["hit" if entry is not None else "miss"] += 1
        return entry

    async def keep(self, request_digest: bytes, exchange: Exchange, answer: list[bytes]) -> None:
        """Store a whole 200 answer the backend the request was routed to gave."""
        body = b"".join(answer)
        if len(body) > self.spec.max_entry_bytes:
            self.counts["too_large"] += 1
            return
        content_type = b"text/event-stream" if exchange.stream else b"application/json"
        entry = Entry(
            exchange.stream,
            content_type,
            body,
            exchange.prompt_tokens,
            exchange.completion_tokens,
        )
        await self.store.put(self.key(request_digest, exchange.backend), entry)
        self.counts["stored"] += 1

    async def replay(self, entry: Entry, exchange: Exchange, backend: Backend, send: Send) -> None:
        """Answer from the cache: the stored answer, billed as `billing` says."""
        exchange.backend = backend
        exchange.status = 200
        exchange.stream = entry.stream
        exchange.tokens_from = "cache"
        if self.spec.billing == "full":
            exchange.prompt_tokens = entry.prompt_tokens
            exchange.completion_tokens = entry.completion_tokens
        headers = [
            (b"content-type", entry.content_type),
            (b"content-length", str(len(entry.body)).encode()),
            (b"x-request-id", exchange.request_id.encode()),
            (b"x-slipway-backend", backend.label),
            (HEADER, b"hit"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": entry.body})
        if entry.stream:
            exchange.ttft_s = time.perf_counter() - exchange.started


def _canonical(value: Any) -> Any:
    """`value` with every object's keys sorted, so the same request always digests the same."""
    if isinstance(value, dict):
        return {k: _canonical(value[k]) for k in sorted(value)}
    if isinstance(value, list):
        return [_canonical(v) for v in value]
    return value


def cache_for(spec: CacheSpec, redis_url: str | None, redis_prefix: str) -> ResponseCache | None:
    """The configured cache, or None when it is off."""
    if not spec.enabled:
        return None
    if spec.store == "redis":
        return ResponseCache(spec, RedisStore(redis_url or "", redis_prefix + "cache:", spec.ttl_s))
    return ResponseCache(spec, MemoryStore(spec))
