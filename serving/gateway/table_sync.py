"""Keeps this instance's routing table equal to the routes in the state store.

Who wins: the registry's aliases say what should be served, and `make up` reconciles the store
with them (serving/stack/stored_routes.py); the store says what is routed, and every instance on
it serves that; the config's `routes` only seed a store that never held routes, so a restart
serves the store's routes, not the file's.

- open: connect (migrating the schema), seed an empty store from the config, load the table.
- poll: every `state.poll_interval_s` one cheap version read; a new version is read whole and a
  table built from it replaces the one in use (live backends reused). Requests never wait on the
  store: they read the table in memory.
- change (the admin API): the new route is computed from the table in use, its backends'
  attestations checked (serving/gateway/trust.py), written with compare-and-set on that table's
  version, then swapped in here. A conflict (another instance wrote first) reloads and computes
  again: no change is lost, none lands on a stale base.
Every route read from the store is checked against the trust too: one with a backend whose
attestation is refused (tampered, for another digest, deny-listed) is left out of the table and the
reason logged, while the others are served; a change to the trust's files re-checks them all.
A route whose record changed starts a new statistics window on every instance. A store that stops
answering leaves the table as it is (requests are served; admin changes get 503) and is logged
once until it answers again.

Records: namespace "routes", key the public model name, value the RouteSpec without its model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import ValidationError

from configs.gateway import BreakerSpec, RouteSpec
from configs.loader import describe
from serving.attestation import Refused
from serving.gateway.background import stop
from serving.gateway.errors import store_busy, store_unavailable
from serving.gateway.routing import CurrentTable, Route
from serving.gateway.state.store import (
    Conflict,
    Record,
    Snapshot,
    StateError,
    StateStore,
    StoreUnavailable,
)
from serving.gateway.trust import Trust

log = logging.getLogger("serving.gateway")

ROUTES = "routes"
_TRIES = 5  # conflicting writes in a row before an admin change gives up

Edit = Callable[[Route | None], RouteSpec]  # the route in use (None: none) -> its replacement


def encode(spec: RouteSpec) -> dict[str, Any]:
    return spec.model_dump(mode="json", exclude={"model"})


def decode_one(model: str, record: Record, where: str) -> RouteSpec:
    """The route of one record; one that is not a valid route is an error naming it."""
    try:
        return RouteSpec.model_validate({**record.value, "model": model})
    except ValidationError as e:
        raise StateError(
            f"route '{model}' in the gateway state store {where} (version {record.version}) "
            f"is not a valid route; set it again with PUT /admin/routes/{model}:\n{describe(e)}"
        ) from None


def decode(snapshot: Snapshot, where: str) -> dict[str, RouteSpec]:
    return {m: decode_one(m, record, where) for m, record in snapshot.records.items()}


class TableSync:
    """The routing table in `current`, loaded from, polled from and written to `store`."""

    def __init__(
        self,
        store: StateStore,
        current: CurrentTable,
        seed: tuple[RouteSpec, ...],
        breaker: BreakerSpec,
        samples: int,
        poll_interval_s: float,
        trust: Trust,
    ) -> None:
        self.store = store
        self.trust = trust
        self.current = current
        self._seed = seed
        self._breaker = breaker  # for the backends a new route brings
        self._samples = samples
        self._interval = poll_interval_s
        self._revisions: Mapping[str, int] = {}  # model -> record version its route was built from
        self._seen = 0  # the store version last read (applied, or refused as invalid)
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None

    async def open(self) -> None:
        """Load the table from the store (seeded first if it never held routes); start polling."""
        self._lock = asyncio.Lock()  # made here: it belongs to the loop that serves
        await self.store.open()
        snapshot = await self.store.read(ROUTES)
        if snapshot.version == 0 and self._seed:
            with contextlib.suppress(Conflict):  # another instance seeded it first
                await self.store.write(ROUTES, 0, {s.model: encode(s) for s in self._seed})
                log.info("state store %s seeded with the config's routes", self.store.where)
            snapshot = await self.store.read(ROUTES)
        self._apply(snapshot)
        log.info(
            "routes: version %d from the state store %s (%d models)",
            snapshot.version,
            self.store.where,
            len(snapshot.records),
        )
        self._warn_if_overridden(decode(snapshot, self.store.where))
        self._task = asyncio.create_task(self._poll(), name="table-sync")

    def _warn_if_overridden(self, stored: Mapping[str, RouteSpec]) -> None:
        seeded = {s.model: s for s in self._seed}
        differ = sorted(m for m in seeded.keys() | stored.keys() if seeded.get(m) != stored.get(m))
        if seeded and differ:
            log.warning(
                "the config's routes differ from the state store's for %s: the store's are "
                "served (the admin API and `make up` write there; the config only seeds an "
                "empty store)",
                ", ".join(differ),
            )

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop(task)
        await self.store.close()

    def _apply(self, snapshot: Snapshot) -> None:
        """Swap in the table of `snapshot`; a route whose record changed starts a new window."""
        self._seen = snapshot.version  # an invalid one is not read again until it changes
        specs = self._admitted(decode(snapshot, self.store.where))
        table = self.current.table.rebuilt(
            specs.values(), self._breaker, self._samples, snapshot.version
        )
        revisions = {model: record.version for model, record in snapshot.records.items()}
        for model, route in table.routes.items():
            if revisions[model] != self._revisions.get(model):
                for backend in route.backends:
                    backend.reset_stats()
        self._revisions = revisions
        self.current.table = table

    def revision(self, model: str) -> int:
        """The store version of `model`'s route record in use: its statistics window."""
        return self._revisions.get(model, 0)

    def check(self, spec: RouteSpec) -> None:
        """Raise Refused unless every backend of `spec` may be served."""
        for backend in spec.backends:
            self.trust.check(spec.model, backend)

    def _admitted(self, specs: Mapping[str, RouteSpec]) -> dict[str, RouteSpec]:
        admitted = {}
        for model, spec in specs.items():
            try:
                self.check(spec)
            except Refused as e:
                log.error("not serving %s: %s", model, e)
                continue
            admitted[model] = spec
        return admitted

    async def _poll(self) -> None:
        down = False
        while True:
            await asyncio.sleep(self._interval)
            try:
                if self.trust.reload() or await self.store.version(ROUTES) != self._seen:
                    assert self._lock is not None
                    async with self._lock:
                        self._apply(await self.store.read(ROUTES))
                        log.info("routes: version %d applied", self.current.table.version)
            except StoreUnavailable as e:
                if not down:
                    log.error("%s; serving routes version %d", e, self.current.table.version)
                down = True
                continue
            except StateError as e:
                log.error("%s; serving routes version %d", e, self.current.table.version)
            except Exception:
                # The poll must outlive a bug too: a dead poll would let replicas drift silently.
                log.exception("routes: polling the state store failed")
            if down:
                log.info("the gateway state store %s answers again", self.store.where)
                down = False

    async def change(self, model: str, edit: Edit) -> Route:
        """Write `edit`'s route for `model` to the store, then serve it here; the new route."""
        assert self._lock is not None, "open() first"
        async with self._lock:
            try:
                for _ in range(_TRIES):
                    table = self.current.table
                    spec = edit(table.get(model))
                    self.check(spec)
                    try:
                        version = await self.store.write(
                            ROUTES, table.version, {model: encode(spec)}
                        )
                    except Conflict:
                        self._apply(await self.store.read(ROUTES))  # edit again on the newer table
                        continue
                    route = table.build_route(spec, self._breaker, self._samples)
                    for backend in route.backends:
                        backend.reset_stats()
                    self.current.table = table.with_route(route, version)
                    self._revisions = {**self._revisions, model: version}
                    self._seen = version
                    return route
            except StateError as e:
                raise store_unavailable(e, "the route") from None
        raise store_busy("routes", _TRIES)
