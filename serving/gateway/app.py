"""The gateway application: routes, the middleware order, and the state built in lifespan.

Request path, outermost first:
  UsageMiddleware    opens the request's Exchange; logs it when done
  MetricsMiddleware  counts the response by tenant and status
  ErrorMiddleware    renders GatewayError in the OpenAI error shape
  AuthMiddleware     tenant key on /v1, admin token on /admin
  RateLimitMiddleware  admits against the tenant's limits; charges tokens afterwards
  router             completions (raw ASGI) / models / health / ready / metrics / admin
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from configs.gateway import BreakerSpec, GatewayConfig, TenantSpec
from configs.home import Home
from serving.gateway import admin, routes
from serving.gateway.auth import AuthMiddleware
from serving.gateway.errors import ErrorMiddleware, http_exception_handler
from serving.gateway.limits import Limiter, LocalLimiter, RateLimitMiddleware, RedisLimiter
from serving.gateway.metrics import MetricsMiddleware, metrics, registry_for
from serving.gateway.proxy import Upstream
from serving.gateway.routing import RoutingTable, table_from
from serving.gateway.usage import UsageLog, UsageMiddleware, default_url, sink_for


@dataclass(eq=False)
class GatewayState:
    """Everything a request needs, built once per application in lifespan."""

    tenants: dict[str, TenantSpec]  # by key hash
    admin_hash: str
    canary_default: str
    max_body_bytes: int
    breaker: BreakerSpec
    samples: int
    table: RoutingTable  # replaced whole by the admin API, never mutated
    upstream: Upstream
    limiter: Limiter
    usage: UsageLog
    created: int = field(default_factory=lambda: int(time.time()))
    responses: Counter = field(default_factory=Counter)
    registry: CollectorRegistry | None = None


async def open_state(config: GatewayConfig, home: Home | None) -> GatewayState:
    upstream = Upstream(config.timeouts)
    limiter: Limiter = (
        RedisLimiter(config.redis_url, config.redis_prefix) if config.redis_url else LocalLimiter()
    )
    usage = UsageLog(sink_for(config.usage.url or default_url(home)), config.usage)
    state = GatewayState(
        tenants={t.key_sha256: t for t in config.tenants},
        admin_hash=config.admin_token_sha256,
        canary_default=config.canary_default,
        max_body_bytes=config.max_body_bytes,
        breaker=config.breaker,
        samples=config.stats.samples,
        table=table_from(config.routes, config.breaker, config.stats.samples),
        upstream=upstream,
        limiter=limiter,
        usage=usage,
    )
    state.registry = registry_for(state)
    await upstream.open()
    await usage.start()
    return state


async def close_state(state: GatewayState) -> None:
    await state.usage.close()
    await state.upstream.close()
    await state.limiter.close()


def build_app(config: GatewayConfig, home: Home | None = None) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict]:
        state = await open_state(config, home)
        try:
            yield {"gateway": state}
        finally:
            await close_state(state)

    return Starlette(
        routes=[
            Route("/v1/chat/completions", routes.Completions("chat"), methods=["POST"]),
            Route("/v1/completions", routes.Completions("completions"), methods=["POST"]),
            Route("/v1/models", routes.list_models, methods=["GET"]),
            Route("/v1/models/{model:path}", routes.get_model, methods=["GET"]),
            Route("/health", routes.health, methods=["GET"]),
            Route("/ready", routes.ready, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
            Route("/admin/routes", admin.list_routes, methods=["GET"]),
            Route("/admin/routes/{model:path}/weights", admin.set_weights, methods=["POST"]),
            Route("/admin/routes/{model:path}", admin.get_route, methods=["GET"]),
            Route("/admin/routes/{model:path}", admin.put_route, methods=["PUT"]),
            Route("/admin/stats/{model:path}/reset", admin.reset_stats, methods=["POST"]),
            Route("/admin/stats/{model:path}", admin.get_stats, methods=["GET"]),
        ],
        middleware=[
            Middleware(UsageMiddleware),
            Middleware(MetricsMiddleware),
            Middleware(ErrorMiddleware),
            Middleware(AuthMiddleware),
            Middleware(RateLimitMiddleware),
        ],
        exception_handlers={HTTPException: http_exception_handler},
        lifespan=lifespan,
    )
