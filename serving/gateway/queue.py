"""Waiting for a backend's slot: tier priority first, then weighted fair queuing on token cost.

A backend takes `max_concurrency` requests at once. With `queue.max_waiting` above 0, a request
that finds it full waits here instead of getting a 503, in this order:
- a higher tier priority first, whatever waits below it;
- within a priority, weighted fair queuing (start-time fair queuing): each request gets a finish
  tag, max(the queue's virtual time, its tenant's last tag) + cost / its tier's weight, and the
  smallest tag goes first. The cost is the request's token bound (prompt bytes plus max_tokens x
  choices), so a tenant with 50 requests waiting cannot push back one that sent a single request
  after them: each tenant's tags advance only with its own requests.
A slot freed goes straight to the next waiter (the in-flight count never drops in between, so a
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
from time import perf_counter
from typing import TYPE_CHECKING, Any

from starlette.types import Receive

from configs.gateway import QueueSpec
from serving.gateway.errors import GatewayError, Unavailable

if TYPE_CHECKING:
    from serving.gateway.exchange import Exchange

# routing.Backend, not imported: routing imports this module (for FairQueue)
Backend = Any


class FairQueue:
    """The requests waiting for one backend's slot."""

    __slots__ = ("_heap", "_last", "_seq", "_virtual", "live")

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, asyncio.Future]] = []
        self._last: dict[str, float] = {}  # each tenant's latest finish tag
        self._virtual = 0.0  # the finish tag of the request served last
        self._seq = itertools.count()  # equal tags: first come, first served
        self.live = 0  # waiters still waiting (the heap also holds those whose wait ended)

    def __len__(self) -> int:
        return self.live

    def push(self, tenant: str, priority: int, weight: float, cost: float) -> asyncio.Future:
        tag = max(self._virtual, self._last.get(tenant, 0.0)) + cost / weight
        self._last[tenant] = tag
        waiter = asyncio.get_running_loop().create_future()
        heapq.heappush(self._heap, (-priority, tag, next(self._seq), waiter))
        self.live += 1
        return waiter

    def gave_up(self) -> None:
        """A waiter's wait ended without a slot (its entry is dropped when it comes up)."""
        self.live -= 1
        if not self.live:
            self._start_over()

    def pop(self) -> asyncio.Future | None:
        """The next waiter still waiting, or None."""
        while self._heap:
            _, tag, _, waiter = heapq.heappop(self._heap)
            if not waiter.done():
                self.live -= 1
                if self.live:
                    self._virtual = tag
                else:
                    self._start_over()
                return waiter
        self._start_over()
        return None

    def _start_over(self) -> None:
        """No one waits: tags start again from 0, so they stay small."""
        self._heap.clear()
        self._last.clear()
        self._virtual = 0.0


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
    if backend.has_room():
        backend.inflight += 1
        return
    if not may_wait or backend.waiting.live >= queue.max_waiting:
        raise Unavailable(
            f"{where} is at its concurrency limit ({backend.max_concurrency} requests in flight"
            + (f", {len(backend.waiting)} waiting" if queue.max_waiting else "")
            + "); retry shortly",
            retry_after=1,
        )
    tenant = exchange.tenant
    tier = queue.tier(tenant.tier)
    wait_s = tier.max_wait_s
    if exchange.deadline is not None:
        wait_s = min(wait_s, exchange.deadline - perf_counter())
    waiter = backend.waiting.push(tenant.name, tier.priority, tier.weight, exchange.cost)
    gone = asyncio.ensure_future(_hung_up(receive))
    try:
        await asyncio.wait((waiter, gone), timeout=max(wait_s, 0.0), return_when=FIRST_COMPLETED)
    except BaseException:  # the request itself was cancelled as it waited
        gone.cancel()
        _leave(backend, waiter)
        raise
    left = gone.done()
    gone.cancel()
    if not left and waiter.done() and not waiter.cancelled():
        return  # the slot is this request's (a slot that came as the wait ended included)
    _leave(backend, waiter)
    if left:
        raise GatewayError(
            "client disconnected while waiting for a slot", status=499, code="client_disconnected"
        )
    raise Unavailable(
        f"{where} stayed at its concurrency limit for the {wait_s:.3g} s this request could "
        f"wait (tier '{tenant.tier}'); retry shortly",
        retry_after=max(1, round(wait_s)),
    )


def _leave(backend: Backend, waiter: asyncio.Future) -> None:
    """A waiter that will not take its slot: out of the queue, or the slot it was handed passed
    on to the next."""
    if waiter.done() and not waiter.cancelled():
        give_slot(backend)
    else:
        waiter.cancel()  # pop() passes over it
        backend.waiting.gave_up()


async def _hung_up(receive: Receive) -> None:
    """Returns once the client disconnects (its body is read: nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def give_slot(backend: Backend) -> None:
    """The request is done with its slot: it passes to the next waiter, or is freed."""
    waiter = backend.waiting.pop() if backend.waiting.live else None
    if waiter is None:
        backend.inflight -= 1
    else:
        waiter.set_result(None)
