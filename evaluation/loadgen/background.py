"""Synthetic load for the rollout: Poisson arrivals, at most so many in flight, on a thread of
its own."""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence

import aiohttp

from evaluation.loadgen.client import send
from evaluation.loadgen.report import Prompt, pick_prompts


class BackgroundLoad:
    """Poisson arrivals at `rate` requests/s on a thread of its own until the context ends: the
    rollout's synthetic traffic when organic traffic is too thin to judge a step in time.

    At most `max_in_flight` requests are outstanding: an arrival past it waits for one to finish
    (`held` counts those). Purely open-loop load on engines near their capacity (CPU vLLM) lets
    whichever falls behind queue without end, and its latency then measures the queue, not the
    engine; bounded, the load slows down with the engines.

    Streams chat completions with the API key of a tenant the gateway marks `synthetic`, so its
    samples are kept apart from organic ones. Counts what it sent; never raises for a failure.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str,
        rate: float,
        prompts: Sequence[Prompt],
        max_tokens: int = 16,
        seed: int = 0,
        max_in_flight: int | None = None,
    ) -> None:
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.model = model
        self.headers = {"Authorization": f"Bearer {api_key}"}
        self.rate = rate
        self.prompts = pick_prompts(prompts, len(prompts), seed)
        self.max_tokens = max_tokens
        self.seed = seed
        self.max_in_flight = max_in_flight
        self.held = 0
        self.sent = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="synthetic-load", daemon=True)

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        asyncio.run(self._loop())

    async def _loop(self) -> None:
        rng = random.Random(self.seed)
        pending: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(
            headers=self.headers, timeout=aiohttp.ClientTimeout(total=120)
        ) as session:
            while not self._stop.is_set():
                if self.max_in_flight is not None and len(pending) >= self.max_in_flight:
                    self.held += 1
                    while len(pending) >= self.max_in_flight:
                        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                prompt = self.prompts[self.sent % len(self.prompts)]
                body = {
                    "model": self.model,
                    "messages": [{"role": "user", "content": prompt.prompt}],
                    "max_tokens": min(prompt.max_tokens, self.max_tokens),
                    "temperature": 0,
                    "stream": True,
                }
                task = asyncio.create_task(send(session, self.url, body, prompt.id, 0.0))
                task.add_done_callback(self._count)
                pending.add(task)
                task.add_done_callback(pending.discard)
                self.sent += 1
                await asyncio.sleep(rng.expovariate(self.rate))
            if pending:  # let what is in flight finish, as a client would
                await asyncio.wait(pending, timeout=30)

    def _count(self, task: asyncio.Task) -> None:
        if task.cancelled() or not task.result().ok:
            self.failed += 1
