"""Prometheus: response counts per tenant and status, and per-backend series from live stats.

Backend series carry model, version and role labels (role "shadow": a canary's mirrored copies,
served but never billed; role "failover": a canary serving while stable is down). They are read
from the Backend objects at scrape time (a custom collector), so the hot path pays only for plain
attribute increments.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.gateway.cache import MemoryStore, ResponseCache
from serving.gateway.routing import CurrentTable
from serving.gateway.stats import LATENCY_BUCKETS, Histogram
from serving.gateway.usage import UsageLog

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Responses = Counter[tuple[str, int]]  # (tenant name, HTTP status) -> responses; only grows


class MetricsMiddleware:
    """Counts each API response by tenant and status code once it is done."""

    def __init__(self, app: ASGIApp, responses: Responses) -> None:
        self.app = app
        self.responses = responses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        exchange = scope.get("slipway.exchange")
        if exchange is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            tenant = exchange.tenant.name if exchange.tenant else ""
            self.responses[(tenant, exchange.status or 499)] += 1


class GatewayCollector(Collector):
    """Reads the gateway's counts at scrape time: responses, every backend, the usage log."""

    def __init__(
        self,
        current: CurrentTable,
        responses: Responses,
        usage: UsageLog,
        outages: Counter[str],
        cache: ResponseCache | None = None,
    ) -> None:
        self.current = current
        self.responses = responses
        self.usage = usage
        self.outages = outages  # the limiter's
        self.cache = cache

    def collect(self) -> Iterator:
        responses = CounterMetricFamily(
            "slipway_gateway_responses",
            "API responses by tenant and HTTP status",
            labels=["tenant", "code"],
        )
        for (tenant, code), n in sorted(self.responses.items()):
            responses.add_metric([tenant, str(code)], n)
        yield responses

        labels = ["model", "version", "role"]
        requests = CounterMetricFamily(
            "slipway_gateway_backend_requests", "Attempts sent to a backend", labels=labels
        )
        errors = CounterMetricFamily(
            "slipway_gateway_backend_errors",
            "Attempts that failed (5xx, timeout, unreachable, broken stream)",
            labels=labels,
        )
        tokens = CounterMetricFamily(
            "slipway_gateway_backend_tokens",
            "Tokens reported by a backend",
            labels=[*labels, "kind"],
        )
        inflight = GaugeMetricFamily(
            "slipway_gateway_backend_inflight", "Requests in flight", labels=labels
        )
        waiting = GaugeMetricFamily(
            "slipway_gateway_backend_waiting",
            "Requests waiting for a slot in the gateway's queue",
            labels=labels,
        )
        weight = GaugeMetricFamily(
            "slipway_gateway_backend_weight", "Routing weight", labels=labels
        )
        circuit = GaugeMetricFamily(
            "slipway_gateway_backend_circuit_open",
            "1 while the backend's circuit is open",
            labels=labels,
        )
        # Per server of a version: what balancing sees (replica = its base URL).
        replica_labels = ["model", "version", "replica"]
        r_inflight = GaugeMetricFamily(
            "slipway_gateway_replica_inflight", "Requests in flight", labels=replica_labels
        )
        r_waiting = GaugeMetricFamily(
            "slipway_gateway_replica_engine_waiting",
            "Requests the engine reported waiting (vllm:num_requests_waiting) at its last reading",
            labels=replica_labels,
        )
        r_circuit = GaugeMetricFamily(
            "slipway_gateway_replica_circuit_open",
            "1 while the replica's circuit is open",
            labels=replica_labels,
        )
        r_queries = CounterMetricFamily(
            "slipway_gateway_replica_prefix_cache_queries",
            "Prompt tokens the engine looked up in its prefix cache (vLLM's count)",
            labels=replica_labels,
        )
        r_hits = CounterMetricFamily(
            "slipway_gateway_replica_prefix_cache_hits",
            "Prompt tokens the engine found in its prefix cache (vLLM's count)",
            labels=replica_labels,
        )
        hists = {
            name: HistogramMetricFamily(
                f"slipway_gateway_backend_{name}_seconds", help_, labels=labels
            )
            for name, help_ in (
                ("ttft", "Time to first streamed byte, from the attempt's start"),
                ("itl", "Mean interval between streamed events, per request"),
                ("e2e", "Attempt start to last byte"),
            )
        }
        for route in self.current.table.routes.values():
            for backend, w in zip(route.backends, route.weights, strict=True):
                values = [route.model, backend.version, backend.role]
                s = backend.stats
                requests.add_metric(values, s.total_requests)
                errors.add_metric(values, s.total_errors)
                tokens.add_metric([*values, "prompt"], s.total_prompt_tokens)
                tokens.add_metric([*values, "completion"], s.total_completion_tokens)
                inflight.add_metric(values, backend.inflight)
                waiting.add_metric(values, backend.waiting.live)
                weight.add_metric(values, w)
                circuit.add_metric(values, 0 if backend.healthy else 1)
                for r in backend.replicas:
                    at = [route.model, backend.version, r.url]
                    r_inflight.add_metric(at, r.inflight)
                    r_waiting.add_metric(at, r.engine_waiting)
                    r_circuit.add_metric(at, 0 if r.breaker.opened_at is None else 1)
                    r_queries.add_metric(at, r.prefix_queries)
                    r_hits.add_metric(at, r.prefix_hits)
                for name, hist in (("ttft", s.hist_ttft), ("itl", s.hist_itl), ("e2e", s.hist_e2e)):
                    hists[name].add_metric(values, _buckets(hist), hist.sum)
                # Mirrored copies (served by the engine, never billed: mirror.py) and a canary's
                # failover traffic (billed, but no evidence about the canary) as roles of their own.
                for role, s in (
                    ("shadow", backend.shadow_stats),
                    ("failover", backend.failover_stats),
                ):
                    if s.total_requests:
                        values = [route.model, backend.version, role]
                        requests.add_metric(values, s.total_requests)
                        errors.add_metric(values, s.total_errors)
                        tokens.add_metric([*values, "prompt"], s.total_prompt_tokens)
                        tokens.add_metric([*values, "completion"], s.total_completion_tokens)
        yield from (requests, errors, tokens, inflight, waiting, weight, circuit, *hists.values())
        yield from (r_inflight, r_waiting, r_circuit, r_queries, r_hits)
        yield GaugeMetricFamily(
            "slipway_gateway_routes_version",
            "Version of the state store's routes this instance serves (replicas agree once synced)",
            value=self.current.table.version,
        )

        down = CounterMetricFamily(
            "slipway_gateway_limits_store_down",
            "Requests decided while the shared limits store (Redis) could not be reached",
            labels=["decision"],
        )
        for decision in ("admitted", "refused"):
            down.add_metric([decision], self.outages[decision])
        yield down

        if self.cache is not None:
            yield from _cache_series(self.cache)

        usage = self.usage
        yield CounterMetricFamily(
            "slipway_gateway_usage_dropped",
            "Usage records dropped (buffer full)",
            value=usage.dropped,
        )
        yield GaugeMetricFamily(
            "slipway_gateway_usage_pending", "Usage records not yet written", value=usage.depth
        )


def _cache_series(cache: ResponseCache) -> Iterator:
    lookups = CounterMetricFamily(
        "slipway_gateway_cache",
        "Response cache: lookups that hit or missed, answers stored, answers too large to store",
        labels=["result"],
    )
    for result in ("hit", "miss", "stored", "too_large"):
        lookups.add_metric([result], cache.counts[result])
    yield lookups
    store = cache.store
    if isinstance(store, MemoryStore):  # Redis keeps its own account of a shared cache
        yield GaugeMetricFamily(
            "slipway_gateway_cache_bytes", "Answer bytes held", value=store.bytes
        )
        yield GaugeMetricFamily("slipway_gateway_cache_entries", "Answers held", value=len(store))


def _buckets(hist: Histogram) -> list[tuple[str, int]]:
    out, running = [], 0
    for bound, count in zip((*LATENCY_BUCKETS, float("inf")), hist.counts, strict=True):
        running += count
        out.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return out


def registry_for(collector: GatewayCollector) -> CollectorRegistry:
    """A registry of this gateway's own (not the process-global one, so two apps stay apart)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return registry


async def metrics(registry: CollectorRegistry, request: Request) -> Response:
    """GET /metrics (bound to its registry with functools.partial in app.py)."""
    return Response(generate_latest(registry), media_type=CONTENT_TYPE)
