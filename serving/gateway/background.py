"""The gateway parts' background tasks (table sync, keyring poll, spend writer, engine meter):
how each is stopped when its part closes."""

from __future__ import annotations

import asyncio


async def stop(task: asyncio.Task | None) -> None:
    """Cancel `task` and wait until it has ended; its cancellation is not raised."""
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
