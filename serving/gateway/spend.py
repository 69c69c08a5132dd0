"""Each tenant's tokens spent per calendar month, and what they cost (nano-dollars at its chargeback
rate), kept in the state store (namespace "spend"), so that a gateway limiting in process (no
Redis) keeps its monthly budgets across a restart.

Charges are counted in memory at once (admission reads them there) and added to the store every
`interval_s` and at shutdown, by compare-and-set, so a kill -9 forgets at most the last interval's
charges and a SIGTERM none. Records: key "<tenant>|<YYYY-MM>", value {"tokens": n, "nanos": m}.
Several instances adding to one store lose nothing of each other's, but each admits against what
it has counted itself: instances that must share one budget exactly share Redis (redis_limits.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

from serving.gateway.state.store import Conflict, StateError, StateStore

log = logging.getLogger("serving.gateway")

SPEND = "spend"
_TRIES = 10


def _key(tenant: str, month: str) -> str:
    return f"{tenant}|{month}"


def _amounts(value: dict) -> tuple[int, int]:
    return int(value["tokens"]), int(value.get("nanos", 0))


class SpendBook:
    def __init__(self, store: StateStore, interval_s: float = 1.0) -> None:
        self.store = store  # opened by the table sync, which shares it
        self._interval = interval_s
        self._stored: dict[str, tuple[int, int]] = {}  # as read at start: tokens, nanos
        # charged here, not yet in the store
        self._pending: Counter[str] = Counter()
        self._pending_nanos: Counter[str] = Counter()
        self._task: asyncio.Task | None = None
        self._closing = asyncio.Event()

    async def open(self) -> None:
        snapshot = await self.store.read(SPEND)
        self._stored = {k: _amounts(r.value) for k, r in snapshot.records.items()}
        self._task = asyncio.create_task(self._flushing(), name="spend-book")

    def spent(self, tenant: str, month: str) -> tuple[int, int]:
        """The tokens and nano-dollars the store held for the tenant's month when this gateway
        started."""
        return self._stored.get(_key(tenant, month), (0, 0))

    def add(self, tenant: str, month: str, tokens: int, nanos: int = 0) -> None:
        key = _key(tenant, month)
        self._pending[key] += tokens
        self._pending_nanos[key] += nanos

    async def _flushing(self) -> None:
        # Stopped by an event, never cancelled: a write cancelled while in flight may still commit,
        # and its batch, still pending here, would be added again by the next flush.
        while not self._closing.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), self._interval)
            await self.flush()

    async def flush(self) -> None:
        """Add what was charged since the last flush to the store; kept for the next on failure."""
        # copies: charges made while writing wait for the next flush
        batch, nanos = +self._pending, +self._pending_nanos
        if not batch:
            return
        try:
            for _ in range(_TRIES):
                snapshot = await self.store.read(SPEND)
                put = {}
                for key, tokens in batch.items():
                    record = snapshot.records.get(key)
                    had_tokens, had_nanos = _amounts(record.value) if record else (0, 0)
                    put[key] = {"tokens": had_tokens + tokens, "nanos": had_nanos + nanos[key]}
                try:
                    await self.store.write(SPEND, snapshot.version, put)
                except Conflict:
                    continue
                self._pending -= batch
                self._pending_nanos -= nanos
                return
            log.error("spend: the store changed %d times while adding charges; retrying", _TRIES)
        except StateError as e:
            log.error(
                "spend: %d tokens of charges not yet stored (kept, retried): %s",
                sum(batch.values()),
                e,
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self._closing.set()
            await task
        for _ in range(_TRIES):  # other instances keep writing: one flush can lose every race
            await self.flush()
            if not self._pending:
                return
