"""The gateway parts' background tasks (table sync, keyring poll, spend writer, engine meter,
engine load, instances): how each is stopped when its part closes, and the loop of those with
an HTTP session of their own (the engines' /metrics, the other instances' statistics)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

log = logging.getLogger("serving.gateway")


async def stop(task: asyncio.Task | None) -> None:
    """Cancel `task` and wait until it has ended; its cancellation is not raised."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


class EnginePoll:
    """Calls `tick` every `interval_s` with its own HTTP session, from `open` (in the serving
    loop) until `close`; a tick that fails is logged and the next one runs as usual."""

    name = "engine-poll"

    def __init__(self, interval_s: float, timeout_s: float) -> None:
        self.interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task | None = None

    async def tick(self) -> object:
        raise NotImplementedError

    async def open(self) -> None:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        self._task = asyncio.create_task(self._run(), name=self.name)

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop(task)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception as e:  # a database hiccup must not end the readings for good
                log.error("%s: a reading failed: %s", self.name, e)
            await asyncio.sleep(self.interval_s)
