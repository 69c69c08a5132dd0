"""The gateway application: its parts, what each layer is given, and the order requests pass in.

Request path, outermost first:
  UsageMiddleware      opens the request's Exchange; hands it to the usage log when done
  TracingMiddleware    only with tracing on: the request's spans (tracing.py)
  MetricsMiddleware    counts the response by tenant and status
  ErrorMiddleware      renders GatewayError in the OpenAI error shape
  AuthMiddleware       tenant key on /v1 (the keyring), admin token and role on /admin
  router               completions (raw ASGI) / models / usage / health / ready / metrics / admin
                       (routes and statistics; tenants, keys and the audit log)

The completions endpoints admit a request against its tenant's limits themselves, once the body is
parsed: the tokens held for it at admission are bounded by its prompt and max_tokens (limits.py).

Beside the requests, the meter reads every backend's own token counters into the usage log, for
the reconciliation of what was logged with what the engines did (meter.py), and each replica's
/metrics is read for the requests its engine holds waiting, which the balancing weighs
(engine_load.py). Each instance announces itself in the state store, where /admin/stats finds the
others to add their statistics up (peers.py).

build_app makes every part without I/O and gives each middleware and endpoint the parts it uses,
as Starlette's own middleware takes its options. Lifespan only opens them (connections and tasks
belong to the event loop that serves the requests) and closes them again. The routing table starts
empty and is loaded from the state store when the table sync opens, before the first request.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.routing import Route

from configs.gateway import GatewayConfig
from configs.home import Home
from serving.gateway.account import OwnUsage
from serving.gateway.admin import AdminAPI
from serving.gateway.audit import AuditLog
from serving.gateway.auth import AuthMiddleware, admins_of
from serving.gateway.cache import cache_for
from serving.gateway.dispatch import ApiDispatch
from serving.gateway.endpoints import PATHS
from serving.gateway.engine_load import EngineLoad
from serving.gateway.errors import ErrorMiddleware, http_exception_handler
from serving.gateway.keyring import Keyring
from serving.gateway.limits import Limiter, LocalLimiter
from serving.gateway.meter import Meter
from serving.gateway.metrics import (
    GatewayCollector,
    MetricsMiddleware,
    Responses,
    metrics,
    registry_for,
)
from serving.gateway.oidc import OIDCVerifier
from serving.gateway.peers import Peers
from serving.gateway.proxy import Upstream
from serving.gateway.redis_limits import RedisLimiter
from serving.gateway.routes import Completions, Models, health
from serving.gateway.routing import CurrentTable, RoutingTable
from serving.gateway.spend import SpendBook
from serving.gateway.state import store_for
from serving.gateway.table_sync import TableSync
from serving.gateway.tenants_api import TenantsAPI
from serving.gateway.tracing import Tracing, TracingMiddleware
from serving.gateway.trust import Trust
from serving.gateway.usage import UsageLog, UsageMiddleware, default_url, sink_for


def build_app(
    config: GatewayConfig, home: Home | None = None, peer_url: str | None = None
) -> Starlette:
    """The gateway for `config`; its state store and usage log default to SQLite under `home`.
    `peer_url`: where the other instances reach this one (server.py); None announces nothing."""
    current = CurrentTable(RoutingTable.empty())
    store = store_for(config.state, home)  # opened and closed by the table sync
    sync = TableSync(
        store,
        current,
        config.routes,
        config.breaker,
        config.stats.samples,
        config.state.poll_interval_s,
        Trust(config.trust, (home or Home.from_env()).keys),
    )
    peers = Peers(store, peer_url, config.instances.heartbeat_s)
    upstream = Upstream(config.timeouts, config.queue, config.balance)
    cache = cache_for(config.cache, config.redis_url, config.redis_prefix)
    limiter: Limiter = (
        RedisLimiter(
            config.redis_url,
            config.redis_prefix,
            config.limits.hold_ttl_s,
            config.limits.on_store_down,
        )
        if config.redis_url
        else LocalLimiter(book=SpendBook(store))
    )
    usage = UsageLog(sink_for(config.usage.url or default_url(home)), config.usage)
    meter = Meter(current, usage, config.usage.meter_interval_s)
    engine_load = EngineLoad(current, config.balance.poll_s)
    responses: Responses = Counter()
    registry = registry_for(GatewayCollector(current, responses, usage, limiter.outages, cache))
    keyring = Keyring(store, config.tenants, config.state.poll_interval_s)
    oidc = OIDCVerifier(config.oidc) if config.oidc else None
    audit = AuditLog(store)
    tracing = Tracing(config.tracing) if config.tracing.endpoint else None  # None: off, free

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncExitStack() as opened:  # what opened is closed, in reverse, whatever fails
            if tracing is not None:  # closed last: it sends the spans of the last requests
                await tracing.open()
                opened.push_async_callback(tracing.close)
            await sync.open()  # first: a gateway that cannot load its routes does not start
            opened.push_async_callback(sync.close)
            await peers.open()  # on the store the sync opened, closed before it
            opened.push_async_callback(peers.close)
            await keyring.open()
            opened.push_async_callback(keyring.close)
            if oidc is not None:
                await oidc.open()  # a key set that cannot be read stops the start
            await upstream.open()
            opened.push_async_callback(upstream.close)
            if cache is not None:
                await cache.store.open()
                opened.push_async_callback(cache.store.close)
            await limiter.open()
            opened.push_async_callback(limiter.close)
            await usage.start()
            opened.push_async_callback(usage.close)
            await meter.open()  # after the usage log, which it writes through
            opened.push_async_callback(meter.close)
            await engine_load.open()
            opened.push_async_callback(engine_load.close)
            yield

    def completions(endpoint: str) -> Completions:
        return Completions(
            endpoint,
            current,
            upstream,
            limiter,
            config.limits,
            config.canary_default,
            config.max_body_bytes,
            usage.put_unbilled,
            config.timeouts.request_s,
            cache,
            config.queue,
        )

    models = Models(current)
    admin = AdminAPI(sync, audit, peers, config.stats.samples)
    tenants = TenantsAPI(keyring, audit, config.limits.chargeback)
    api = {path: completions(name) for name, path in PATHS.items()}
    return Starlette(
        routes=[
            *(Route(path, endpoint, methods=["POST"]) for path, endpoint in api.items()),
            Route("/v1/models", models.list, methods=["GET"]),
            Route("/v1/usage", OwnUsage(limiter, config.limits.chargeback).get, methods=["GET"]),
            Route("/v1/models/{model:path}", models.get, methods=["GET"]),
            Route("/health", health, methods=["GET"]),
            Route("/ready", models.ready, methods=["GET"]),
            Route("/metrics", partial(metrics, registry), methods=["GET"]),
            Route("/admin/routes", admin.list_routes, methods=["GET"]),
            Route("/admin/routes/{model:path}/weights", admin.set_weights, methods=["POST"]),
            Route("/admin/routes/{model:path}", admin.get_route, methods=["GET"]),
            Route("/admin/routes/{model:path}", admin.put_route, methods=["PUT"]),
            Route("/admin/stats/{model:path}/reset", admin.reset_stats, methods=["POST"]),
            Route("/admin/stats/{model:path}", admin.get_stats, methods=["GET"]),
            Route("/admin/tenants", tenants.list_tenants, methods=["GET"]),
            Route("/admin/tenants/{name}", tenants.put_tenant, methods=["PUT"]),
            Route("/admin/tenants/{name}/keys", tenants.issue_key, methods=["POST"]),
            Route("/admin/keys", tenants.list_keys, methods=["GET"]),
            Route("/admin/keys/{key}/revoke", tenants.revoke_key, methods=["POST"]),
            Route("/admin/keys/{key}/rotate", tenants.rotate_key, methods=["POST"]),
            Route("/admin/keys/{key}/expire", tenants.expire_key, methods=["POST"]),
            Route("/admin/tiers", tenants.list_sheds, methods=["GET"]),
            Route("/admin/tiers/{tier}/shed", tenants.shed_tier, methods=["POST"]),
            Route("/admin/tiers/{tier}/restore", tenants.restore_tier, methods=["POST"]),
            Route("/admin/audit", tenants.read_audit, methods=["GET"]),
        ],
        middleware=[
            Middleware(UsageMiddleware, usage=usage),
            *([Middleware(TracingMiddleware, tracing=tracing)] if tracing is not None else []),
            Middleware(MetricsMiddleware, responses=responses),
            Middleware(ErrorMiddleware),
            Middleware(
                AuthMiddleware,
                tenants=keyring,
                admins=admins_of(config.admin_token_sha256, config.admins),
                oidc=oidc,
            ),
            Middleware(ApiDispatch, endpoints=api),
        ],
        exception_handlers={HTTPException: http_exception_handler},
        lifespan=lifespan,
    )
