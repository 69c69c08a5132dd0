"""Each replica's own account of its load, read from its /metrics: the requests its engine holds
waiting (vllm:num_requests_waiting), which the balancing adds to the gateway's in-flight count
(routing.Replica.load), and its prefix cache's queries and hits, for the hit rate per replica.

Every `balance.poll_s` each replica of every route is read once. A replica that does not answer
counts a failure on its circuit breaker, as a failed request would: a replica that died is taken
out of rotation before requests have to find out, and the breaker's half-open probe (a real
request) brings it back. A replica whose /metrics has no vLLM gauge (another OpenAI-compatible
server) is balanced on the gateway's counts alone and not read again by this instance.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiohttp

from serving.gateway.background import EnginePoll
from serving.gateway.routing import CurrentTable, Replica

log = logging.getLogger("serving.gateway")

WAITING = "vllm:num_requests_waiting"
PREFIX_QUERIES = "vllm:prefix_cache_queries_total"
PREFIX_HITS = "vllm:prefix_cache_hits_total"


def summed(metrics_text: str, name: str) -> float | None:
    """The sum of `name`'s samples over its label sets (one per engine of a data-parallel
    server) in a Prometheus text exposition; None when it has none."""
    values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? (\S+)$", metrics_text, re.M)
    return sum(float(v) for v in values) if values else None


def read_into(replica: Replica, metrics_text: str) -> bool:
    """Set `replica`'s engine figures from its /metrics; False when the text is not vLLM's."""
    waiting = summed(metrics_text, WAITING)
    if waiting is None:
        return False
    replica.engine_waiting = int(waiting)
    replica.prefix_queries = int(summed(metrics_text, PREFIX_QUERIES) or 0)
    replica.prefix_hits = int(summed(metrics_text, PREFIX_HITS) or 0)
    return True


class EngineLoad(EnginePoll):
    """The background task that reads every replica; off when `interval_s` is 0."""

    name = "engine-load"

    def __init__(self, current: CurrentTable, interval_s: float) -> None:
        super().__init__(interval_s, timeout_s=max(interval_s, 1.0))
        self.current = current
        self._not_vllm: set[str] = set()

    async def open(self) -> None:
        if self.interval_s:
            await super().open()

    async def tick(self) -> None:
        await self.read_all()

    async def read_all(self) -> None:
        """One tick: read every replica of every route once, at the same time."""
        replicas = {
            id(r): r
            for route in self.current.table.routes.values()
            for b in route.backends
            for r in b.replicas
            if r.url not in self._not_vllm
        }
        await asyncio.gather(*(self._read(r) for r in replicas.values()))

    async def _read(self, replica: Replica) -> None:
        assert self._session is not None
        try:
            async with self._session.get(f"{replica.url}/metrics") as reply:
                text = await reply.text()
        except (aiohttp.ClientError, TimeoutError):
            replica.breaker.failure(time.monotonic())
            return
        if reply.status >= 500:
            replica.breaker.failure(time.monotonic())
        elif reply.status != 200 or not read_into(replica, text):
            log.info("%s/metrics has no vLLM queue gauge: balanced on in-flight", replica.url)
            self._not_vllm.add(replica.url)
