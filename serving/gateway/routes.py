"""The OpenAI-compatible endpoints: completions (the hot path, raw ASGI; also responses,
embeddings, tokenize and detokenize, which endpoints.py tells apart), models, health, ready.

Each endpoint is built with what it reads (the current routing table, the upstream client); the
request's own record, the Exchange, comes in the scope from UsageMiddleware.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from configs.gateway import LimitsSpec, QueueSpec
from serving.gateway.attempt import Attempt, AttemptFailed
from serving.gateway.cache import HEADER, MISS, ResponseCache
from serving.gateway.choice import choose, failover, fallback, point_for, takes_canary
from serving.gateway.codec import dumps
from serving.gateway.endpoints import MIRRORED, STREAMING, UTILITY
from serving.gateway.errors import (
    BadRequest,
    GatewayError,
    TooLarge,
    Unavailable,
    UpstreamError,
    model_not_found,
)
from serving.gateway.exchange import Exchange
from serving.gateway.limits import Limiter, charge, reservation
from serving.gateway.mirror import start_copy
from serving.gateway.proxy import Upstream
from serving.gateway.quota import with_headers
from serving.gateway.routing import Backend, CurrentTable, Replica, Route
from serving.gateway.shape import apply_tenant_bounds
from serving.gateway.tokens import Asked, ask_for_usage
from serving.gateway.usage import Row, unbilled_row
from serving.gateway.validation import (
    asked_completion,
    parse_request,
    prompt_bytes,
    prompt_count,
    prompt_text,
)

log = logging.getLogger(__name__)

NOT_STREAMED = Asked(final=False, continuous=False)  # a JSON answer's usage is passed on as it is
FAILOVER_LOG_EVERY_S = 10.0  # one line per backend and interval while a failover lasts
TIMEOUT_HEADER = b"x-slipway-timeout-s"  # a client's own deadline, in seconds


def header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def read_body(scope: Scope, receive: Receive, limit: int) -> bytes:
    declared = header(scope, b"content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = b""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise GatewayError(
                "client disconnected while sending the request",
                status=499,
                code="client_disconnected",
            )
        body += message.get("body", b"")
        if len(body) > limit:
            raise _too_large(len(body), limit)
        if not message.get("more_body", False):
            return body


def deadline_of(scope: Scope, started: float, most: float | None) -> float | None:
    """When the request's answer must be complete (perf_counter time): the sooner of the client's
    x-slipway-timeout-s and the gateway's timeouts.request_s; None when neither is set."""
    asked = header(scope, TIMEOUT_HEADER)
    if asked is not None:
        try:
            seconds = float(asked)
        except ValueError:
            seconds = float("nan")
        if not 0 < seconds < float("inf"):
            raise BadRequest(
                f"header x-slipway-timeout-s must be a number of seconds above 0, got "
                f"'{asked.decode('utf-8', 'replace')[:40]}'",
                param="x-slipway-timeout-s",
            )
        most = seconds if most is None else min(most, seconds)
    return None if most is None else started + most


def _too_large(size: int, limit: int) -> TooLarge:
    return TooLarge(f"request body of {size} bytes is over this gateway's limit of {limit} bytes")


class Completions:
    """POST to one of endpoints.PATHS (/v1/chat/completions, /v1/completions, ...): check, route,
    relay; a request that fails before its answer begins is tried once more on another backend
    (_retry_on)."""

    def __init__(
        self,
        endpoint: str,
        current: CurrentTable,
        upstream: Upstream,
        limiter: Limiter,
        limits: LimitsSpec,
        canary_default: str,
        max_body_bytes: int,
        unbilled: Callable[[Row], None],
        request_s: float | None = None,
        cache: ResponseCache | None = None,
        queue: QueueSpec | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.streams = endpoint in STREAMING
        self.mirrored = endpoint in MIRRORED
        self.utility = endpoint in UTILITY
        self.current = current
        self.upstream = upstream
        self.limiter = limiter
        self.limits = limits
        self.canary_default = canary_default
        self.max_body_bytes = max_body_bytes
        self.unbilled = unbilled  # the usage log's: traffic no tenant pays for
        self.request_s = request_s  # the longest a request may take (timeouts.request_s)
        self.cache = cache
        self.queue = queue or QueueSpec()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = scope["slipway.exchange"]
        exchange.deadline = deadline_of(scope, exchange.started, self.request_s)
        data = parse_request(await read_body(scope, receive, self.max_body_bytes), self.endpoint)
        model = exchange.model = data["model"]
        route = self.current.table.get(model)
        if route is None:
            raise model_not_found(model, param="model")
        tenant = exchange.tenant
        apply_tenant_bounds(tenant, data, self.endpoint, self.limits.default_max_tokens)
        exchange.n, exchange.completion_bound = asked_completion(data, self.endpoint)
        if self.queue.max_waiting:  # its place among waiters is by its token bound (queue.py)
            bound = exchange.completion_bound
            exchange.cost = prompt_bytes(data, self.endpoint) + (
                self.limits.default_max_tokens if bound is None else bound
            )
        # Admitted only now that the request's reservation is known; settled exactly once, when
        # it is done however it ends, with the tokens the relay counted (0 if none were made).
        reserved = reservation(tenant, data, self.endpoint, self.limits)
        admitting = self.limiter.admit(tenant, reserved.tokens, reserved.nanos)
        if exchange.trace is None:
            hold = await admitting
        else:  # tracing on (tracing.py)
            attributes = {"slipway.tenant": tenant.name, "slipway.reserved_tokens": reserved.tokens}
            hold = await exchange.trace.within("gateway.admission", admitting, attributes)
        if hold is not None and hold.quota is not None:
            send = with_headers(send, hold.quota.headers())
        try:
            await self._serve(scope, receive, send, exchange, route, data)
        finally:
            cost = charge(tenant, self.limits, exchange.prompt_tokens, exchange.completion_tokens)
            await self.limiter.settle(tenant, hold, exchange.tokens, cost)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        route: Route,
        data: dict[str, Any],
    ) -> None:
        """Route the admitted request; answer it from the cache where it may, else relay its
        answer (and copy it where the route mirrors)."""
        tenant = exchange.tenant
        if tenant.log_prompts:
            exchange.prompt = prompt_text(data, self.endpoint)
        cache = self.cache
        cached = None  # the request's digest, when the cache may answer it (cache.py)
        if cache is not None and cache.wants(header(scope, HEADER), data, tenant):
            cached = cache.request_digest(data, self.endpoint, tenant)
        asked = NOT_STREAMED
        if data.get("stream") and self.streams:
            exchange.stream = True
            if self.endpoint != "responses":  # its last event has the usage: nothing to ask
                asked = ask_for_usage(data, prompt_count(data, self.endpoint))
        session = header(scope, b"x-session-id")
        exchange.session = (
            session.decode("utf-8", "replace") if session is not None else data.get("user")
        )
        point = point_for(exchange.session)
        canary = not self.utility and takes_canary(route, tenant.canary, self.canary_default)
        try:
            backend = choose(route, point, canary)
        except Unavailable:
            backend = _fail_over(exchange, route, None, point)
        if cached is not None and not exchange.failover:
            entry = await cache.lookup(cached, backend)
            if entry is not None:
                await cache.replay(entry, exchange, backend, send)
                return
            send = with_headers(send, MISS)
            exchange.transcript = []
        else:
            cached = None
        # A request the route mirrors is copied to the other side at the same moment (mirror.py).
        mirror = route.mirror
        if mirror is None or exchange.failover or not self.mirrored:  # no answer to pair
            target = None
        else:
            target = mirror.wants(backend, random.random())
        copy = None
        if target is not None:
            copy = start_copy(self.upstream, mirror, target, exchange, data, asked)
        try:
            await self._relay(receive, send, exchange, route, data, backend, point, asked)
        finally:
            if copy is not None:
                copy.finish(exchange, exchange.transcript or [], self.unbilled)
            answered = exchange.status == 200 and exchange.error_kind is None
            if cached is not None and answered and exchange.backend is backend:
                await cache.keep(cached, exchange, exchange.transcript)

    async def _relay(
        self,
        receive: Receive,
        send: Send,
        exchange: Exchange,
        route: Route,
        data: dict[str, Any],
        backend: Backend,
        point: float,
        asked: Asked,
    ) -> None:
        """Relay `backend`'s answer, or another backend's where it failed before it began."""
        try:
            attempt = self._attempt(exchange, backend, data, asked)
            await self.upstream.forward(attempt, send, receive)
            return
        except AttemptFailed as failure:
            first_failure = failure
        failed_on = exchange.attempt.replica  # None: no replica could take it, nothing was sent
        try:
            other, besides = _retry_on(exchange, route, backend, point, failed_on)
        except Unavailable:
            await _answer_failure(exchange, first_failure, send)
            return
        if failed_on is not None:
            # The failed try reached its backend, which may have worked on it: the reconciliation
            # counts it (tokens 0, at most its completion bound) apart from the answer billed.
            exchange.error_kind = first_failure.kind
            self.unbilled(unbilled_row(exchange, "retry", backend.version))
        exchange.error_kind, exchange.tokens_from = None, None
        exchange.prompt_tokens = exchange.completion_tokens = 0
        try:
            attempt = self._attempt(exchange, other, data, asked, besides)
            await self.upstream.forward(attempt, send, receive)
        except AttemptFailed as failure:
            await _answer_failure(exchange, failure, send)

    def _attempt(
        self,
        exchange: Exchange,
        backend: Backend,
        data: dict[str, Any],
        asked: Asked,
        besides: Replica | None = None,
    ) -> Attempt:
        exchange.backend = backend
        data["model"] = backend.served_model
        if backend.spec.priority_scheduling:  # vLLM serves a lower value first
            data["priority"] = -self.queue.tier(exchange.tenant.tier).priority
        exchange.attempt = Attempt(exchange, backend, dumps(data), asked, besides)
        return exchange.attempt


def _retry_on(
    exchange: Exchange, route: Route, failed: Backend, point: float, replica: Replica | None
) -> tuple[Backend, Replica | None]:
    """Where a request that failed before its answer began is tried once more, and the replica
    it must not go to: another replica of the same version that would take it (one server's
    failure says nothing of its siblings'), else another stable backend with a closed circuit,
    else (a route with failover) a healthy canary; raises Unavailable when there is none."""
    now = time.monotonic()
    if replica is not None and failed.may_serve(now, besides=replica):
        return failed, replica
    try:
        return fallback(route, failed, point, now), None
    except Unavailable:
        return _fail_over(exchange, route, failed, point), None


def _fail_over(exchange: Exchange, route: Route, failed: Backend | None, point: float) -> Backend:
    """A healthy canary for a request no stable backend can serve (re-raises Unavailable where
    the route has no failover or no healthy canary); the exchange is marked, so its timings stay
    out of the canary's evidence, and the failover is logged while it lasts."""
    now = time.monotonic()
    spare = failover(route, failed, point, now)
    exchange.failover = True
    if now - spare.failover_said >= FAILOVER_LOG_EVERY_S:
        spare.failover_said = now
        log.warning(
            "model '%s': no stable backend can serve; failing over to canary v%s "
            "(%d requests so far)",
            route.model,
            spare.version,
            spare.failover_stats.total_requests,
        )
    return spare


async def _answer_failure(exchange: Exchange, failure: AttemptFailed, send: Send) -> None:
    """A backend's own error answer passes through unchanged; a missing answer becomes 502/504."""
    if failure.status is None:
        status = 504 if failure.kind == "upstream_timeout" else 502
        raise UpstreamError(failure.message, code=failure.kind, status=status)
    exchange.status = failure.status
    exchange.error_kind = failure.kind
    headers = [
        (b"content-type", failure.content_type),
        (b"content-length", str(len(failure.body or b"")).encode()),
        (b"x-request-id", exchange.request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": failure.status, "headers": headers})
    await send({"type": "http.response.body", "body": failure.body or b""})


def _json(data: object, status: int = 200) -> Response:
    return Response(dumps(data), status, media_type="application/json")


async def health(request: Request) -> Response:
    return _json({"status": "ok"})


class Models:
    """The models the current routing table serves: GET /v1/models, /v1/models/{model}, /ready.

    A tenant with a `models` list sees only those (AuthMiddleware puts the tenant in the scope).
    """

    def __init__(self, current: CurrentTable) -> None:
        self.current = current
        self.created = int(time.time())

    def _entry(self, name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": self.created, "owned_by": "slipway"}

    @staticmethod
    def _allowed(request: Request, name: str) -> bool:
        tenant = request.scope.get("slipway.tenant")
        return tenant is None or tenant.models is None or name in tenant.models

    async def list(self, request: Request) -> Response:
        names = sorted(n for n in self.current.table.routes if self._allowed(request, n))
        return _json({"object": "list", "data": [self._entry(name) for name in names]})

    async def get(self, request: Request) -> Response:
        name = request.path_params["model"]
        if self.current.table.get(name) is None or not self._allowed(request, name):
            raise model_not_found(name)
        return _json(self._entry(name))

    async def ready(self, request: Request) -> Response:
        """Ready when every model has a stable backend whose circuit is closed."""
        routes = self.current.table.routes
        problems = [
            f"model '{name}': no stable backend with a closed circuit"
            for name, route in routes.items()
            if not any(b.healthy for b in route.stable.backends)
        ]
        if not routes:
            problems.append("no routes: add one with PUT /admin/routes/{model}")
        status = 503 if problems else 200
        return _json({"status": "not ready" if problems else "ready", "problems": problems}, status)
