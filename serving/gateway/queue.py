"""Waiting for a backend's slot: tier priority first, then weighted fair queuing on token cost.

A backend takes `max_concurrency` requests at once. With `queue.max_waiting` above 0, a request
that finds it full waits here instead of getting a 503, in this order:
- a higher tier priority first, whatever waits below it;
- within a priority, weighted fair queuing (start-time fair queuing): each request gets a finish
  tag, max(the queue's virtual time, its tenant's last tag) + cost / its tier's weight, and the
  smallest tag goes first. The cost is the request's token bound (prompt bytes plus max_tokens x
  choices), so a tenant with 50 requests waiting cannot push back one that sent a single request
  after them: each tenant's tags advance only with its own requests.
A tier may keep a share of the slots (`reserved_share`): another tier takes a slot only if as
many stay free as the reserving tiers that are active (something in flight or waiting) still
lack of their shares, so an idle tier's share is lent and an active one's is kept; a slot freed
goes first to a waiting tier that holds less than its share, whatever the priorities.
A slot freed goes straight to the next waiter it may go to (nothing awaits in between, so a
newcomer cannot take it first). A request waits at most its tier's `max_wait_s`, and never past
its own deadline; then, or when `max_waiting` are already waiting, it gets a 503 with
Retry-After. A client that hangs up while waiting leaves the queue at once: its request is never
sent, and a slot handed to it as it left goes on to the next waiter.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from asyncio import FIRST_COMPLETED
from collections import Counter
from collections.abc import Callable
from time import perf_counter
from typing import TYPE_CHECKING, Any

from starlette.types import Receive

from configs.gateway import QueueSpec
from serving.gateway.errors import GatewayError, Unavailable

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange

# routing.Backend, not imported: routing imports this module (for FairQueue)
Backend = Any


Entry = tuple[int, float, int, str, asyncio.Future]  # -priority, tag, arrival, tier, waiter


class FairQueue:
    """The requests waiting for one backend's slot."""

    __slots__ = ("_heap", "_last", "_seq", "_virtual", "live", "tiers")

    def __init__(self) -> None:
        self._heap: list[Entry] = []
        self._last: dict[str, float] = {}  # each tenant's latest finish tag
        self._virtual = 0.0  # the finish tag of the request served last
        self._seq = itertools.count()  # equal tags: first come, first served
        self.live = 0  # waiters still waiting (the heap also holds those whose wait ended)
        self.tiers: Counter[str] = Counter()  # waiters still waiting, by tier

    def __len__(self) -> int:
        return self.live

    def push(
        self, tenant: str, tier: str, priority: int, weight: float, cost: float
    ) -> asyncio.Future:
        tag = max(self._virtual, self._last.get(tenant, 0.0)) + cost / weight
        self._last[tenant] = tag
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (-priority, tag, next(self._seq), tier, waiter))
        self.live += 1
        self.tiers[tier] += 1
        return waiter

    def gave_up(self, tier: str) -> None:
        """A waiter's wait ended without a slot (its entry is dropped when it comes up)."""
        self.live -= 1
        self.tiers[tier] -= 1
        if not self.live:
            self._start_over()

    def pop(
        self, rank: Callable[[str], int | None] | None = None
    ) -> tuple[asyncio.Future, str] | None:
        """The next waiter still waiting and its tier, or None. With `rank`, only a waiter whose
        tier it ranks (not None) may come next, the lowest rank first, then in the usual order."""
        if rank is not None:
            return self._pop_ranked(rank)
        while self._heap:
            entry = heapq.heappop(self._heap)
            if not entry[4].done():
                return self._taken(entry)
        self._start_over()
        return None

    def _pop_ranked(self, rank: Callable[[str], int | None]) -> tuple[asyncio.Future, str] | None:
        # A scan, not the heap's order (only with reserved shares): the entry taken stays in the
        # heap, its waiter done, and is dropped when it comes up.
        ranks = {tier: rank(tier) for tier, n in self.tiers.items() if n}
        best = min(
            (
                (ranks[e[3]], e)
                for e in self._heap
                if not e[4].done() and ranks.get(e[3]) is not None
            ),
            default=None,
        )
        return None if best is None else self._taken(best[1])

    def _taken(self, entry: Entry) -> tuple[asyncio.Future, str]:
        _, tag, _, tier, waiter = entry
        self.live -= 1
        self.tiers[tier] -= 1
        if self.live:
            self._virtual = tag
        else:
            self._start_over()
        return waiter, tier

    def _start_over(self) -> None:
        """No one waits: tags start again from 0, so they stay small."""
        self._heap.clear()
        self._last.clear()
        self._virtual = 0.0


def _kept(backend: Backend, queue: QueueSpec, tier: str) -> int:
    """The slots other tiers' reserved shares keep from `tier`: what each active reserving tier
    (something in flight or waiting) still lacks of its share."""
    kept = 0
    for name, share in queue.reserved.items():
        held = backend.by_tier[name]
        if name != tier and (held or backend.waiting.tiers[name]):
            kept += max(0, int(share * backend.max_concurrency) - held)
    return kept


def _rank(backend: Backend, queue: QueueSpec) -> Callable[[str], int | None]:
    """Who may take a freed slot: a tier below its share first (0), then any tier the other
    shares leave room for (1)."""
    free = backend.max_concurrency - backend.inflight

    def rank(tier: str) -> int | None:
        share = queue.reserved.get(tier, 0.0)
        if backend.by_tier[tier] < int(share * backend.max_concurrency):
            return 0
        return 1 if free > _kept(backend, queue, tier) else None

    return rank


def take_now(backend: Backend, queue: QueueSpec, tier: str) -> bool:
    """Count the request in `backend`'s in-flight requests if it may take a slot now: one is
    free, no one waits for it, and the reserved shares of other active tiers leave room."""
    if backend.waiting.live or backend.inflight >= backend.max_concurrency:
        return False
    if queue.reserved and backend.max_concurrency - backend.inflight <= _kept(backend, queue, tier):
        return False
    backend.inflight += 1
    backend.by_tier[tier] += 1
    return True


async def take_slot(
    backend: Backend,
    exchange: Exchange,
    queue: QueueSpec,
    where: str,
    receive: Receive,
    may_wait: bool = True,
) -> None:
    """Count the request in `backend`'s in-flight requests, waiting for a slot if it is full;
    raises Unavailable (503) when it cannot wait or waited its longest, and a 499 when its client
    hangs up while it waits. Pair with `give_slot`."""
    tenant = exchange.tenant
    if take_now(backend, queue, tenant.tier):
        return
    if not may_wait or backend.waiting.live >= queue.max_waiting:
        raise Unavailable(
            f"{where} is at its concurrency limit ({backend.max_concurrency} requests in flight"
            + (f", {len(backend.waiting)} waiting" if queue.max_waiting else "")
            + "); retry shortly",
            retry_after=1,
        )
    tier = queue.tier(tenant.tier)
    wait_s = tier.max_wait_s
    if exchange.deadline is not None:
        wait_s = min(wait_s, exchange.deadline - perf_counter())
    waiter = backend.waiting.push(
        tenant.name, tenant.tier, tier.priority, tier.weight, exchange.cost
    )
    if backend.inflight < backend.max_concurrency:
        # a slot free beside waiters is kept for a reserved share: this request's, maybe
        _hand_out(backend, queue)
    gone = asyncio.ensure_future(_hung_up(receive))
    try:
        await asyncio.wait((waiter, gone), timeout=max(wait_s, 0.0), return_when=FIRST_COMPLETED)
    except BaseException:  # the request itself was cancelled as it waited
        gone.cancel()
        _leave(backend, queue, waiter, tenant.tier)
        raise
    left = gone.done()
    gone.cancel()
    if not left and waiter.done() and not waiter.cancelled():
        return  # the slot is this request's (a slot that came as the wait ended included)
    _leave(backend, queue, waiter, tenant.tier)
    if left:
        raise GatewayError(
            "client disconnected while waiting for a slot", status=499, code="client_disconnected"
        )
    raise Unavailable(
        f"{where} stayed at its concurrency limit for the {wait_s:.3g} s this request could "
        f"wait (tier '{tenant.tier}'); retry shortly",
        retry_after=max(1, round(wait_s)),
    )


def _leave(backend: Backend, queue: QueueSpec, waiter: asyncio.Future, tier: str) -> None:
    """A waiter that will not take its slot: out of the queue, or the slot it was handed passed
    on to the next."""
    if waiter.done() and not waiter.cancelled():
        give_slot(backend, queue, tier)
    else:
        waiter.cancel()  # pop() passes over it
        backend.waiting.gave_up(tier)
        if queue.reserved:  # its tier may have stopped keeping slots from the others
            _hand_out(backend, queue)


async def _hung_up(receive: Receive) -> None:
    """Returns once the client disconnects (its body is read: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def give_slot(backend: Backend, queue: QueueSpec, tier: str) -> None:
    """The request (of `tier`) is done with its slot: it passes to the next waiter it may go to,
    or is freed."""
    backend.inflight -= 1
    backend.by_tier[tier] -= 1
    if backend.waiting.live:
        _hand_out(backend, queue)


def _hand_out(backend: Backend, queue: QueueSpec) -> None:
    """Free slots to waiters, in their order, as far as the reserved shares allow."""
    while backend.waiting.live and backend.inflight < backend.max_concurrency:
        chosen = backend.waiting.pop(_rank(backend, queue) if queue.reserved else None)
        if chosen is None:
            return
        waiter, tier = chosen
        backend.inflight += 1
        backend.by_tier[tier] += 1
        waiter.set_result(None)
