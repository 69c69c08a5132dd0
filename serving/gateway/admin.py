"""The admin API the rollout flow drives (admin token only; tenant keys are refused).

  GET  /admin/routes                      every route
  GET  /admin/routes/{model}              one route: its backends and weights
  PUT  /admin/routes/{model}              replace the route:
                                          {"backends": [BackendSpec + expected_digest]}
  POST /admin/routes/{model}/weights      {"weights": {"<version>": 90, "<version>": 10},
                                           "audience": "everyone" | "opted_in" (optional),
                                           "mirror": {"to": "<canary>", "rate_rps": 1} or null
                                           (optional; null stops mirroring)}
  GET  /admin/stats/{model}?samples=true  live statistics per backend since the last reset
                                          (synthetic-load tenants apart, under "synthetic";
                                          mirrored copies under "shadow", their pairs under
                                          "pairs"), of every gateway instance on the state store
                                          (each under "instances"; ?local=true: this one's)
  POST /admin/stats/{model}/reset         start a new statistics window on every instance

A route or weight change is written to the state store first (compare-and-set on the table's
version, serving/gateway/table_sync.py), so every instance on the store serves it and a restart
keeps it; then a new routing table is swapped in here in one step, and requests in flight finish
on the backend they started on. A route or weight change starts a new statistics window for the
model, so the flow compares backends under the weights it set. Statistics stay on the instance
that counted them until asked for: the instance asked then asks the others (peers.py) and adds
their windows to its own (stats_merge.py).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from pydantic import BaseModel, Field, FiniteFloat, ValidationError, model_validator
from starlette.requests import Request
from starlette.responses import Response

from configs.gateway import Audience, BackendSpec, MirrorSpec, RouteSpec
from configs.loader import Strict, describe
from serving.attestation import Refused
from serving.gateway.audit import AuditLog
from serving.gateway.codec import JSONDecodeError, dumps, loads
from serving.gateway.errors import BadRequest, NotFound
from serving.gateway.peers import Peers
from serving.gateway.routing import Route
from serving.gateway.stats_merge import merge
from serving.gateway.table_sync import Edit, TableSync

log = logging.getLogger("serving.gateway")

_DIGEST_MISMATCH = "differs from the registered digest"


class RegisteredBackend(BackendSpec):
    """A backend as the rollout flow adds it, with the digest the registry holds for its version."""

    expected_digest: str = Field(description="the registered digest; must equal `digest`")

    @model_validator(mode="after")
    def _digest_matches(self) -> RegisteredBackend:
        if self.digest != self.expected_digest:
            raise ValueError(
                f"backend '{self.version}': loaded digest {self.digest} {_DIGEST_MISMATCH} "
                f"{self.expected_digest}; refusing to serve it"
            )
        return self


class RouteUpdate(Strict):
    backends: tuple[RegisteredBackend, ...] = Field(min_length=1)
    failover: bool | None = Field(
        None, description="serve from a healthy canary while stable cannot; left out keeps it"
    )


class WeightsUpdate(Strict):
    # Finite: a NaN weight passes every comparison and left a route with nothing to choose.
    weights: dict[str, FiniteFloat] = Field(min_length=1)
    audience: Audience | None = Field(
        None, description="'opted_in': only tenants with canary: in reach canaries; None keeps it"
    )
    mirror: MirrorSpec | None = Field(
        None, description="copies of stable's requests to a canary; left out keeps, null stops"
    )


def json_response(data: Any, status: int = 200) -> Response:
    return Response(dumps(data), status, media_type="application/json")


async def payload(request: Request, schema: type[BaseModel], empty_ok: bool = False) -> Any:
    """The request's body as `schema`; a 400 naming the field where it is not. `empty_ok`: an
    empty body is the schema's defaults."""
    body = await request.body()
    try:
        raw = {} if empty_ok and not body.strip() else loads(body)
    except JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    try:
        return schema.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        raise BadRequest(
            f"invalid {schema.__name__}:\n{describe(e)}",
            param=".".join(str(p) for p in first["loc"]) or None,
            code="digest_mismatch" if _DIGEST_MISMATCH in str(e) else "invalid_request",
        ) from None


def _not_found(model: str) -> NotFound:
    return NotFound(
        f"no route for model '{model}'; create it with PUT /admin/routes/{model}", param="model"
    )


class AdminAPI:
    """The admin endpoints, over the routing table they read and, through `sync`, change."""

    def __init__(self, sync: TableSync, audit: AuditLog, peers: Peers, samples: int) -> None:
        self.sync = sync
        self.current = sync.current
        self.audit = audit
        self.peers = peers
        self.samples = samples  # latency values in a merged sample, at most: as in each instance

    def _route(self, request: Request) -> Route:
        model = request.path_params["model"]
        route = self.current.table.get(model)
        if route is None:
            raise _not_found(model)
        return route

    async def _change(self, model: str, edit: Edit) -> Route:
        """The route `edit` makes, served once its backends' attestations are admitted."""
        try:
            return await self.sync.change(model, edit)
        except Refused as e:
            raise BadRequest(
                f"refusing to serve it: {e}", param="backends", code="attestation_refused"
            ) from None

    async def list_routes(self, request: Request) -> Response:
        return json_response({"routes": [r.describe() for r in self.current.table.routes.values()]})

    async def get_route(self, request: Request) -> Response:
        return json_response(self._route(request).describe())

    async def put_route(self, request: Request) -> Response:
        model = request.path_params["model"]
        update = await payload(request, RouteUpdate)
        specs = tuple(
            BackendSpec.model_validate(b.model_dump(exclude={"expected_digest"}))
            for b in update.backends
        )
        before = self.current.table.get(model)
        failover = update.failover
        if failover is None:
            failover = before is not None and before.failover
        try:
            spec = RouteSpec(model=model, backends=specs, failover=failover)
        except ValidationError as e:
            raise BadRequest(
                f"invalid route for '{model}':\n{describe(e)}", param="backends"
            ) from None
        route = await self._change(model, lambda _: spec)
        log.info("route '%s' set: %s", model, _weights_text(route))
        await self.audit.record_for(request, "route.put", model, _spec(before), _spec(route))
        return json_response(route.describe())

    async def set_weights(self, request: Request) -> Response:
        before = self._route(request)  # an unknown model is a 404 before the body is read
        update = await payload(request, WeightsUpdate)
        model = request.path_params["model"]
        route = await self._change(model, lambda route: _reweighted(model, route, update))
        log.info("weights of '%s' set: %s", model, _weights_text(route))
        await self.audit.record_for(request, "route.weights", model, _spec(before), _spec(route))
        return json_response(route.describe())

    async def get_stats(self, request: Request) -> Response:
        route = self._route(request)
        return json_response(await self._everywhere(request, route, "GET", ""))

    async def reset_stats(self, request: Request) -> Response:
        route = self._route(request)
        for backend in route.backends:
            backend.reset_stats()
        return json_response(await self._everywhere(request, route, "POST", "/reset"))

    async def _everywhere(self, request: Request, route: Route, method: str, suffix: str) -> Any:
        """This instance's statistics of `route`, or (unless the call says `local`) every live
        instance's added up, after the same call (`method`, path `suffix`) on each of them."""
        samples = _flag(request, "samples")
        if _flag(request, "local"):
            return self._local(route, samples)
        path = f"/admin/stats/{quote(route.model)}{suffix}?samples=true&local=true"
        answers = await self.peers.ask(method, path, request.headers.get("authorization", ""))
        return merge(self._local(route, True), answers, self.samples, samples)

    def _local(self, route: Route, samples: bool) -> dict[str, Any]:
        return _stats(route, samples) | {
            "instance": self.peers.id,
            "revision": self.sync.revision(route.model),
        }


def _flag(request: Request, name: str) -> bool:
    return request.query_params.get(name, "").lower() in ("1", "true", "yes")


def _reweighted(model: str, route: Route | None, update: WeightsUpdate) -> RouteSpec:
    """`route` with the weights (and audience) of `update`, checked against the route as it is."""
    if route is None:
        raise _not_found(model)
    spec = route.spec()
    known = {b.version for b in spec.backends}
    if unknown := sorted(set(update.weights) - known):
        raise BadRequest(
            f"route '{model}' has no backend {unknown}; its versions are {sorted(known)}",
            param="weights",
        )
    if any(w < 0 for w in update.weights.values()):
        raise BadRequest("weights must be 0 or more", param="weights")
    backends = tuple(
        b.model_copy(update={"weight": update.weights.get(b.version, b.weight)})
        for b in spec.backends
    )
    if sum(b.weight for b in backends) <= 0:
        raise BadRequest("at least one backend needs a weight above 0", param="weights")
    mirror = update.mirror if "mirror" in update.model_fields_set else spec.mirror
    try:
        return RouteSpec(
            model=model,
            backends=backends,
            audience=update.audience or spec.audience,
            mirror=mirror,
            failover=spec.failover,
        )
    except ValidationError as e:
        raise BadRequest(f"invalid route for '{model}':\n{describe(e)}", param="mirror") from None


def _stats(route: Route, samples: bool) -> dict[str, Any]:
    return {
        "model": route.model,
        "audience": route.audience,
        "mirror": route.mirror.spec.model_dump() if route.mirror else None,
        "failover": route.failover,
        "backends": [
            {
                "version": b.version,
                "role": b.role,
                "digest": b.spec.digest,
                "weight": w,
                "inflight": b.inflight,
                "waiting": b.waiting.live,
                "circuit": b.circuit,
                "replicas": [
                    {
                        "url": r.url,
                        "inflight": r.inflight,
                        "engine_waiting": r.engine_waiting,
                        "circuit": r.breaker.state,
                        "prefix_cache_hit_rate": r.prefix_hit_rate,
                    }
                    for r in b.replicas
                ],
                **b.stats.snapshot(samples),
                "failover": b.failover_stats.snapshot(samples),
                "synthetic": b.synthetic_stats.snapshot(samples),
                "shadow": b.shadow_stats.snapshot(samples),
                "pairs": b.pairs.snapshot(samples),
            }
            for b, w in zip(route.backends, route.weights, strict=True)
        ],
    }


def _spec(route: Route | None) -> dict[str, Any] | None:
    return route.spec().model_dump(mode="json") if route else None


def _weights_text(route: Route) -> str:
    pairs = zip(route.backends, route.weights, strict=True)
    return ", ".join(f"{b.version}({b.role})={w:g}" for b, w in pairs)
