"""Gateway test helpers: a mock upstream, configs with fresh secrets, a gateway on a real port,
a fresh state store of each kind, streamed events as bytes."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
import pytest
import redis

from configs.gateway import GatewayConfig
from evaluation.benchmarks.attested import Signer
from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.gateway.app import build_app
from serving.gateway.auth import key_hash

MODEL = "tiny-chat"
SIGNER = Signer()  # the evaluation attestations of the made-up backends, and the trust in them
REDIS_URL = "redis://127.0.0.1:6379/0"

# Server-sent events as a backend streams them, for the relay's unit tests.
HEAD = b'data: {"id":"c","object":"chat.completion.chunk","model":"m","choices":['
WORD = HEAD + b'{"index":0,"delta":{"content":"w"},"finish_reason":null}]}\n\n'
NULL_USAGE = HEAD + b'{"index":0,"delta":{"content":"w"}}],"usage":null}\n\n'
USAGE_ONLY = HEAD + b'],"usage":{"prompt_tokens":3,"completion_tokens":5,"total_tokens":8}}\n\n'
USAGE_WITH_CHOICE = (
    HEAD + b'{"index":0,"delta":{},"finish_reason":"length"}],'
    b'"usage":{"prompt_tokens":2,"completion_tokens":4}}\n\n'
)
DONE = b"data: [DONE]\n\n"


def counted(completion: int, prompt: int = 3, index: int = 0) -> bytes:
    """A chunk with vLLM's continuous usage: its choice's cumulative counts (the word, as WORD)."""
    return (
        HEAD + b'{"index":%d,"delta":{"content":"w"},"finish_reason":null}],'
        b'"usage":{"prompt_tokens":%d,"completion_tokens":%d,"total_tokens":%d}}\n\n'
        % (index, prompt, completion, prompt + completion)
    )


def crlf(events: bytes) -> bytes:
    """The same events framed with CRLF line ends, as some OpenAI-compatible servers send them."""
    return events.replace(b"\n", b"\r\n")


def digest(version: str) -> str:
    return "sha256:" + hashlib.sha256(version.encode()).hexdigest()


def backend(
    url: str, version: str, role: str = "stable", weight: float = 100, **extra: Any
) -> dict:
    """A backend with the test signer's passing evaluation attestation of its digest."""
    loaded = extra.pop("digest", digest(version))
    return {
        "version": version,
        "url": url,
        "served_model": f"served-{version}",
        "digest": loaded,
        "attestation": SIGNER.attest(loaded),
        "weight": weight,
        "role": role,
        **extra,
    }


class Secrets:
    """Fresh keys for one test; configs get only their hashes."""

    def __init__(self) -> None:
        self.admin = "adm-" + secrets.token_urlsafe(24)
        self.keys: dict[str, str] = {}

    def key(self, tenant: str) -> str:
        return self.keys.setdefault(tenant, "sk-test-" + secrets.token_urlsafe(24))

    def tenant(self, name: str, **fields: Any) -> dict:
        return {"name": name, "key_sha256": key_hash(self.key(name)), **fields}

    def config(
        self, backends: list[dict], tenants: list[dict] | None = None, **fields: Any
    ) -> GatewayConfig:
        tenants = tenants if tenants is not None else [self.tenant("alice")]
        return GatewayConfig.model_validate(
            {
                "admin_token_sha256": key_hash(self.admin),
                "routes": [{"model": MODEL, "backends": backends}] if backends else [],
                "tenants": tenants,
                "trust": SIGNER.trust(),
                **fields,
            }
        )


@pytest.fixture
def keys() -> Secrets:
    return Secrets()


@pytest.fixture
def mock() -> Iterator[tuple[MockUpstream, str]]:
    upstream = MockUpstream()
    with serve(upstream) as url:
        yield upstream, url


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own on the local Redis, its keys deleted afterwards."""
    prefix = f"slipway-test-{secrets.token_hex(6)}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture(params=["sqlite", "postgresql", "redis"])
def state(request, home) -> dict:
    """The `state` section of a gateway config naming a fresh store of each kind: the default
    (SQLite under `home`), a fresh PostgreSQL database, a fresh Redis key prefix."""
    if request.param == "postgresql":
        return {"url": request.getfixturevalue("pg_url")}
    if request.param == "redis":
        return {"url": REDIS_URL, "redis_prefix": request.getfixturevalue("redis_prefix")}
    return {}


@pytest.fixture
def run_gateway(home) -> Callable:
    """run_gateway(config) -> context manager yielding the gateway's base URL."""

    @contextmanager
    def run(config: GatewayConfig) -> Iterator[str]:
        with serve(build_app(config, home)) as url:
            yield url

    return run


async def post_many(
    url: str,
    key: str,
    bodies: list[dict],
    *,
    headers: dict | None = None,
    concurrency: int = 32,
    path: str = "/v1/chat/completions",
) -> list[tuple[int, dict, bytes]]:
    """POST the bodies to `path`, `concurrency` at a time: (status, headers, body)."""
    gate = asyncio.Semaphore(concurrency)
    sent = {"Authorization": f"Bearer {key}", **(headers or {})}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(body: dict) -> tuple[int, dict, bytes]:
            async with (
                gate,
                session.post(url + path, json=body, headers=sent) as r,
            ):
                return r.status, dict(r.headers), await r.read()

        return await asyncio.gather(*(one(b) for b in bodies))


def chat(content: str = "hello", **fields: Any) -> dict:
    messages = [{"role": "user", "content": content}]
    return {"model": MODEL, "messages": messages, "max_tokens": 2, **fields}
