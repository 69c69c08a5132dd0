"""Engine meter readings: what each backend itself counted, beside what the gateway logged.

Every `usage.meter_interval_s` the gateway reads the token counters of every backend (each
replica of it) in its routing table from the backend's /metrics (vLLM's vllm:prompt_tokens_total and
vllm:generation_tokens_total, summed over their label sets) and appends one reading per backend to
the usage log's engine_meter table, all of one tick at the same time. The reconciliation
(evaluation/monitoring/reconcile.py) sets the usage rows between two readings beside the counters'
increase. A backend that does not answer is skipped for that tick (its next reading spans more);
one whose /metrics has no such counters (not a vLLM) is never read again by this instance.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp

from serving.gateway.background import EnginePoll
from serving.gateway.engine_load import summed
from serving.gateway.routing import CurrentTable
from serving.gateway.usage import METER, Row, UsageLog

log = logging.getLogger("serving.gateway")

COUNTERS = ("vllm:prompt_tokens_total", "vllm:generation_tokens_total")


def token_counters(metrics_text: str) -> tuple[int, int] | None:
    """(prompt, generation) tokens from a Prometheus text exposition, each summed over its label
    sets (one per engine of a data-parallel server); None when either counter is absent."""
    prompt, generation = (summed(metrics_text, name) for name in COUNTERS)
    if prompt is None or generation is None:
        return None
    return int(prompt), int(generation)


class Meter(EnginePoll):
    """The background task that takes the readings and writes them through the usage log."""

    name = "engine-meter"

    def __init__(self, current: CurrentTable, usage: UsageLog, interval_s: float) -> None:
        super().__init__(interval_s, timeout_s=min(interval_s, 10.0))
        self.current = current
        self.usage = usage
        self._not_vllm: set[str] = set()

    async def tick(self) -> list[Row]:
        return await self.read_all()

    async def read_all(self) -> list[Row]:
        """One tick: read every backend once, write and return the readings."""
        backends = {
            (b.version, r.url)
            for route in self.current.table.routes.values()
            for b in route.backends
            for r in b.replicas
            if r.url not in self._not_vllm
        }
        now = time.time()
        read = await asyncio.gather(*(self._read(url) for _, url in backends))
        rows = [
            (now, version, url, *counters)
            for (version, url), counters in zip(backends, read, strict=True)
            if counters is not None
        ]
        if rows:
            await self.usage.write(rows, METER)
        return rows

    async def _read(self, url: str) -> tuple[int, int] | None:
        assert self._session is not None
        try:
            async with self._session.get(f"{url}/metrics") as reply:
                text = await reply.text()
        except (aiohttp.ClientError, TimeoutError):
            return None  # down or slow: the next tick's reading covers this one's span
        counters = token_counters(text) if reply.status == 200 else None
        if counters is None and reply.status in (200, 404):
            log.warning("engine meter: %s/metrics has no vLLM token counters; not read again", url)
            self._not_vllm.add(url)
        return counters
