"""The other gateway instances on this state store, so that /admin/stats covers them all.

`slipway gateway` listens on a private address of its own besides the shared one (server.py) and
announces it in the state store: namespace "instances", key the instance's id, value its URL and
when it last said so, renewed every `instances.heartbeat_s`. The admin API asks every instance
heard from within three heartbeats for its own share (`?local=true`) when asked for statistics,
and adds them up (stats_merge.py). So the rollout sees every instance's traffic at the moment it
looks, whichever instance it asks, and the request path does nothing more than before: the
statistics stay where they are counted until someone asks. An instance that does not answer is
named in the answer and left out. A gateway run in-process (tests) has no URL: it announces
nothing, and still adds up the instances that do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from serving.gateway.background import EnginePoll
from serving.gateway.codec import loads
from serving.gateway.state.store import Conflict, StateError, StateStore

log = logging.getLogger("serving.gateway")

INSTANCES = "instances"
_SILENT = 3  # heartbeats missed before an instance counts as gone
_FORGOTTEN = 30  # heartbeats missed before its announcement is deleted
_TRIES = 5  # conflicting writes in a row (other instances' heartbeats) before a beat gives up


@dataclass(frozen=True, slots=True)
class Peer:
    id: str
    url: str


@dataclass(frozen=True, slots=True)
class Answer:
    """One peer's answer: its JSON body, or why there is none."""

    peer: Peer
    body: dict[str, Any] | None
    error: str | None = None


class Peers(EnginePoll):
    """This instance's announcement (renewed on the poll loop) and its calls to the others."""

    name = "instances"

    def __init__(
        self, store: StateStore, url: str | None, heartbeat_s: float, timeout_s: float = 5.0
    ) -> None:
        super().__init__(heartbeat_s, timeout_s)
        self.store = store  # opened and closed by the table sync
        self.id = uuid.uuid4().hex[:12]
        self.url = url

    async def tick(self) -> None:
        if self.url is not None:
            now = time.time()
            snapshot = await self.store.read(INSTANCES)
            gone = [
                key
                for key, record in snapshot.records.items()
                if now - record.value["seen"] > _FORGOTTEN * self.interval_s
            ]
            await self._write({self.id: {"url": self.url, "seen": now}}, gone)

    async def close(self) -> None:
        await super().close()
        if self.url is not None:  # gone at once, not three heartbeats later
            with contextlib.suppress(StateError):
                await self._write({}, [self.id])

    async def _write(self, put: Mapping[str, dict[str, Any]], delete: Collection[str]) -> None:
        for _ in range(_TRIES):
            try:
                await self.store.write(INSTANCES, await self.store.version(INSTANCES), put, delete)
                return
            except Conflict:
                continue
        log.warning("instances: %d conflicting writes in a row; announcing later", _TRIES)

    async def others(self) -> list[Peer]:
        """The other instances heard from within three heartbeats."""
        snapshot = await self.store.read(INSTANCES)
        fresh = time.time() - _SILENT * self.interval_s
        return [
            Peer(key, record.value["url"])
            for key, record in sorted(snapshot.records.items())
            if key != self.id and record.value["seen"] >= fresh
        ]

    async def ask(self, method: str, path: str, authorization: str) -> list[Answer]:
        """`method path` of every other live instance, with the caller's credentials (the
        same admin is an admin there); none when the store cannot say who they are."""
        try:
            peers = await self.others()
        except StateError as e:
            log.error("instances: %s; answering for this instance alone", e)
            return []
        calls = (self._call(p, method, path, authorization) for p in peers)
        return list(await asyncio.gather(*calls))

    async def _call(self, peer: Peer, method: str, path: str, authorization: str) -> Answer:
        assert self._session is not None, "open() first"
        try:
            async with self._session.request(
                method, peer.url + path, headers={"Authorization": authorization}
            ) as response:
                body = await response.read()
                if response.status != 200:
                    return Answer(peer, None, f"HTTP {response.status}: {body[:200]!r}")
                answer = loads(body)
        except (aiohttp.ClientError, TimeoutError, ValueError) as e:
            return Answer(peer, None, f"{type(e).__name__}: {e}")
        # Another process at its address (restarted on the same port, perhaps this one): adding
        # it would count that one twice.
        if answer.get("instance") != peer.id:
            return Answer(peer, None, f"{peer.url} is instance {answer.get('instance')} now")
        return Answer(peer, answer)
