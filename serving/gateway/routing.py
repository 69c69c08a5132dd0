"""The routing table (discovery): which backends serve each public model, with what weight.

The table is immutable and carries the state store's version of the routes it was built from
(serving/gateway/table_sync.py keeps it current). A change builds a new table and swaps one
reference (CurrentTable), so a request sees either the old table or the new one, never a mix;
in-flight requests keep the Backend object they started on. Backend objects carry live state
(in-flight count, stats, queue) and are reused across tables while their identity (version,
served name, digest, role) is unchanged; so are their replicas (servers) while their URL stays.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from hashlib import blake2b
from itertools import accumulate
from types import MappingProxyType

from configs.gateway import Audience, BackendSpec, BreakerSpec, MirrorSpec, RouteSpec
from serving.gateway.breaker import Breaker
from serving.gateway.endpoints import PATHS
from serving.gateway.mirror import Mirroring, PairLog
from serving.gateway.queue import FairQueue
from serving.gateway.stats import BackendStats


class Replica:
    """One server of a version (a vLLM process): the gateway's requests in flight to it, what its
    engine last reported (engine_load.py), and its own circuit breaker."""

    __slots__ = (
        "breaker",
        "engine_waiting",
        "inflight",
        "prefix_hits",
        "prefix_queries",
        "url",
        "urls",
    )

    def __init__(self, url: str, breaker: BreakerSpec) -> None:
        self.url = url
        self.urls = {endpoint: url + path for endpoint, path in PATHS.items()}
        self.inflight = 0
        self.engine_waiting = 0  # vllm:num_requests_waiting at the last reading
        self.prefix_queries = 0  # vllm:prefix_cache_queries_total (tokens looked up)
        self.prefix_hits = 0  # vllm:prefix_cache_hits_total (tokens found cached)
        self.breaker = Breaker(breaker.failures, breaker.open_s)

    @property
    def load(self) -> int:
        """Outstanding requests: sent by this gateway and not done, plus those the engine holds
        waiting (other gateways' too)."""
        return self.inflight + self.engine_waiting

    @property
    def prefix_hit_rate(self) -> float | None:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else None


def _least_loaded(replicas: list[Replica]) -> list[Replica]:
    return sorted(replicas, key=lambda r: r.load)


def _affine(replicas: list[Replica], session: str, bound: float) -> list[Replica]:
    """The replicas in a session's own order (rendezvous hashing: adding or removing a replica
    moves only the sessions that ranked it first), those loaded beyond `bound` x the mean load
    (this request counted) put last: consistent hashing with bounded loads, so hot sessions
    cannot pile up on one replica. One request of slack above the bound keeps a conversation
    home at low load, where a single request in flight would otherwise exceed it."""
    ranked = sorted(
        replicas,
        key=lambda r: blake2b(f"{session}\0{r.url}".encode(), digest_size=8).digest(),
        reverse=True,
    )
    cap = math.ceil(bound * (sum(r.load for r in replicas) + 1) / len(replicas)) + 1
    return [r for r in ranked if r.load < cap] + [r for r in ranked if r.load >= cap]


class Backend:
    """One model version behind a route: one or more replicas (servers of the same weights),
    and the version's live state (its queue, statistics, paired answers)."""

    __slots__ = (
        "by_tier",
        "copies",
        "failover_said",
        "failover_stats",
        "inflight",
        "label",
        "max_concurrency",
        "model",
        "pairs",
        "replicas",
        "role",
        "served_model",
        "shadow_stats",
        "spec",
        "stats",
        "synthetic_stats",
        "version",
        "waiting",
    )

    def __init__(self, model: str, spec: BackendSpec, breaker: BreakerSpec, samples: int) -> None:
        self.model = model
        self.version = spec.version
        self.role = spec.role
        self.served_model = spec.served_model
        self.inflight = 0  # over all replicas: the version's slots (queue.py)
        self.copies = 0  # mirrored copies sent to it and not yet done (mirror.py)
        self.by_tier: Counter[str] = Counter()  # those slots by the tier of their request
        self.waiting = FairQueue()  # requests waiting for a slot (queue.py)
        self.replicas: tuple[Replica, ...] = ()
        self.serve(spec, breaker)
        self.stats = BackendStats(samples)  # organic traffic
        self.synthetic_stats = BackendStats(samples)  # tenants marked `synthetic`
        self.shadow_stats = BackendStats(samples)  # mirrored copies (serving/gateway/mirror.py)
        self.failover_stats = BackendStats(
            samples
        )  # a canary standing in for a stable that is down
        self.failover_said = float("-inf")  # monotonic time of the last failover log line
        self.pairs = PairLog(samples)  # those copies beside stable's answers
        self.label = spec.version.encode()  # the x-slipway-backend response header

    def serve(self, spec: BackendSpec, breaker: BreakerSpec) -> None:
        """Take `spec`'s servers and settings; a replica that stays keeps its live state (its
        in-flight count, breaker, readings), so scaling a version does not disturb the others."""
        kept = {r.url: r for r in self.replicas}
        self.spec = spec
        self.replicas = tuple(kept.get(url) or Replica(url, breaker) for url in spec.urls)
        self.max_concurrency = spec.max_concurrency * len(self.replicas)

    def has_room(self) -> bool:
        """Whether a request may take a slot now: one is free and no one waits for it."""
        return self.inflight < self.max_concurrency and not self.waiting.live

    @property
    def healthy(self) -> bool:
        """Whether a replica's circuit is closed."""
        return any(r.breaker.opened_at is None for r in self.replicas)

    def may_serve(self, now: float, besides: Replica | None = None) -> bool:
        """Whether a replica (other than `besides`) would take a request now: its circuit is
        closed, or due for its half-open probe."""
        return any(r is not besides and r.breaker.due(now) for r in self.replicas)

    def retry_after(self, now: float) -> float:
        return min(r.breaker.retry_after(now) for r in self.replicas)

    @property
    def circuit(self) -> str:
        """The best of its replicas' circuits: "closed" while any replica can serve."""
        states = {r.breaker.state for r in self.replicas}
        return next(s for s in ("closed", "half-open", "open") if s in states)

    def replica_for(
        self, session: str | None, now: float, bound: float, besides: Replica | None = None
    ) -> Replica | None:
        """The replica a request goes to: the least loaded one whose breaker lets it through;
        for a session, its own replica while that one's load is within `bound` x the mean (so
        the engine's prefix cache holds its conversation). None when every circuit is open."""
        replicas = self.replicas
        if len(replicas) == 1:
            only = replicas[0]
            return only if only is not besides and only.breaker.allows(now) else None
        others = [r for r in replicas if r is not besides]
        ordered = _least_loaded(others) if session is None else _affine(others, session, bound)
        return next((r for r in ordered if r.breaker.allows(now)), None)

    def reset_stats(self) -> None:
        self.stats.reset()
        self.synthetic_stats.reset()
        self.shadow_stats.reset()
        self.failover_stats.reset()
        self.pairs.reset()

    def same_version(self, spec: BackendSpec) -> bool:
        """Whether `spec` is this version as it was: the same weights, name and role (its
        servers may differ: serve() takes them)."""
        s = self.spec
        return (s.version, s.served_model, s.digest, s.role) == (
            spec.version,
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
            if old is not None and old.same_version(b):
                old.serve(b, breaker)
                backends.append(old)
            else:
                backends.append(Backend(spec.model, b, breaker, samples))
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
