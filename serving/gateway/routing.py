"""The routing table (discovery): which backends serve each public model, with what weight.

The table is immutable and carries the state store's version of the routes it was built from
(serving/gateway/table_sync.py keeps it current). A change builds a new table and swaps one
reference (CurrentTable), so a request sees either the old table or the new one, never a mix;
in-flight requests keep the Backend object they started on. Backend objects carry live state
(in-flight count, breaker, stats) and are reused across tables while their identity (version, URL,
served name, digest, role) is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import accumulate
from types import MappingProxyType

from configs.gateway import Audience, BackendSpec, BreakerSpec, MirrorSpec, RouteSpec
from serving.gateway.breaker import Breaker
from serving.gateway.endpoints import PATHS
from serving.gateway.mirror import Mirroring, PairLog
from serving.gateway.queue import FairQueue
from serving.gateway.stats import BackendStats


class Backend:
    """One upstream server of one model version, and its live state."""

    __slots__ = (
        "breaker",
        "failover_said",
        "failover_stats",
        "inflight",
        "label",
        "max_concurrency",
        "model",
        "pairs",
        "role",
        "served_model",
        "shadow_stats",
        "spec",
        "stats",
        "synthetic_stats",
        "urls",
        "version",
        "waiting",
    )

    def __init__(self, model: str, spec: BackendSpec, breaker: BreakerSpec, samples: int) -> None:
        self.model = model
        self.spec = spec
        self.version = spec.version
        self.role = spec.role
        self.served_model = spec.served_model
        self.urls = {endpoint: spec.url + path for endpoint, path in PATHS.items()}
        self.max_concurrency = spec.max_concurrency
        self.inflight = 0
        self.waiting = FairQueue()  # requests waiting for a slot (queue.py)
        self.breaker = Breaker(breaker.failures, breaker.open_s)
        self.stats = BackendStats(samples)  # organic traffic
        self.synthetic_stats = BackendStats(samples)  # tenants marked `synthetic`
        self.shadow_stats = BackendStats(samples)  # mirrored copies (serving/gateway/mirror.py)
        self.failover_stats = BackendStats(
            samples
        )  # a canary standing in for a stable that is down
        self.failover_said = float("-inf")  # monotonic time of the last failover log line
        self.pairs = PairLog(samples)  # those copies beside stable's answers
        self.label = spec.version.encode()  # the x-slipway-backend response header

    def has_room(self) -> bool:
        """Whether a request may take a slot now: one is free and no one waits for it."""
        return self.inflight < self.max_concurrency and not self.waiting.live

    def reset_stats(self) -> None:
        self.stats.reset()
        self.synthetic_stats.reset()
        self.shadow_stats.reset()
        self.failover_stats.reset()
        self.pairs.reset()

    def same_server(self, spec: BackendSpec) -> bool:
        s = self.spec
        return (s.version, s.url, s.served_model, s.digest, s.role) == (
            spec.version,
            spec.url,
            spec.served_model,
            spec.digest,
            spec.role,
        )


@dataclass(frozen=True, slots=True)
class Pick:
    """Backends with positive weight and their cumulative weights, for bisecting a point."""

    backends: tuple[Backend, ...]
    cumulative: tuple[float, ...]
    total: float

    @classmethod
    def of(cls, weighted: Iterable[tuple[Backend, float]]) -> Pick:
        chosen = [(b, w) for b, w in weighted if w > 0]
        cumulative = tuple(accumulate(w for _, w in chosen))
        return cls(tuple(b for b, _ in chosen), cumulative, cumulative[-1] if cumulative else 0.0)


@dataclass(frozen=True, slots=True)
class Route:
    model: str
    backends: tuple[Backend, ...]
    weights: tuple[float, ...]
    everyone: Pick  # all backends: tenants that take canary traffic
    stable: Pick  # stable backends only: opted-out tenants and retries
    audience: Audience = "everyone"  # "opted_in": only tenants with canary: in reach the canary
    mirror: Mirroring | None = None  # copies of stable's requests to a canary
    failover: bool = False  # a healthy canary serves while no stable backend can (choice.py)

    @classmethod
    def build(
        cls,
        model: str,
        backends: tuple[Backend, ...],
        weights: tuple[float, ...],
        audience: Audience = "everyone",
        mirror: MirrorSpec | None = None,
        failover: bool = False,
    ) -> Route:
        pairs = list(zip(backends, weights, strict=True))
        stable = [(b, w) for b, w in pairs if b.role == "stable"]
        stable_pick = Pick.of(stable)
        if stable_pick.total == 0:
            # All traffic on canaries: opted-out tenants still get a stable backend, evenly.
            stable_pick = Pick.of((b, 1.0) for b, _ in stable)
        mirroring = None
        if mirror is not None:
            canary = next(b for b in backends if b.version == mirror.to)
            mirroring = Mirroring(mirror, canary, tuple(b for b in backends if b.role == "stable"))
        everyone = Pick.of(pairs)
        return cls(model, backends, weights, everyone, stable_pick, audience, mirroring, failover)

    def backend(self, version: str) -> Backend | None:
        return next((b for b in self.backends if b.version == version), None)

    def spec(self) -> RouteSpec:
        """The route as configs and the state store spell it, with the weights in use."""
        return RouteSpec(
            model=self.model,
            backends=tuple(
                b.spec.model_copy(update={"weight": w})
                for b, w in zip(self.backends, self.weights, strict=True)
            ),
            audience=self.audience,
            mirror=self.mirror.spec if self.mirror else None,
            failover=self.failover,
        )

    def describe(self) -> dict:
        return {
            "model": self.model,
            "audience": self.audience,
            "mirror": self.mirror.spec.model_dump() if self.mirror else None,
            "failover": self.failover,
            "backends": [
                {**b.spec.model_dump(), "weight": w}
                for b, w in zip(self.backends, self.weights, strict=True)
            ],
        }


@dataclass(frozen=True, slots=True)
class RoutingTable:
    routes: Mapping[str, Route]
    version: int = 0  # the state store's version of the routes; 0: none stored yet

    @classmethod
    def empty(cls) -> RoutingTable:
        return cls(MappingProxyType({}))

    def get(self, model: str) -> Route | None:
        return self.routes.get(model)

    def with_route(self, route: Route, version: int) -> RoutingTable:
        return RoutingTable(MappingProxyType({**self.routes, route.model: route}), version)

    def build_route(self, spec: RouteSpec, breaker: BreakerSpec, samples: int) -> Route:
        """A route for `spec`, reusing the live Backend of every unchanged server."""
        current = self.routes.get(spec.model)
        backends = []
        for b in spec.backends:
            old = current.backend(b.version) if current else None
            live = old if old and old.same_server(b) else Backend(spec.model, b, breaker, samples)
            backends.append(live)
        weights = tuple(b.weight for b in spec.backends)
        return Route.build(
            spec.model, tuple(backends), weights, spec.audience, spec.mirror, spec.failover
        )

    def rebuilt(
        self, specs: Iterable[RouteSpec], breaker: BreakerSpec, samples: int, version: int
    ) -> RoutingTable:
        """A table of exactly `specs` at `version`, reusing this table's live backends."""
        routes = {s.model: self.build_route(s, breaker, samples) for s in specs}
        return RoutingTable(MappingProxyType(routes), version)


class CurrentTable:
    """The routing table in use: TableSync replaces `table` whole, everyone else reads it.

    One holder is shared by the endpoints, the admin API and the metrics collector; a change is
    one reference swap.
    """

    __slots__ = ("table",)

    def __init__(self, table: RoutingTable) -> None:
        self.table = table
