"""`make up`'s routes: the gateway's state store is made to route exactly what `up` serves, and
every difference from what it held is reported.

The registry's aliases say what should be served: `up` starts a fresh vLLM for each verified
champion and writes its route (one stable backend at the new URL, all the traffic) into the state
store before the gateway starts, so the gateway and every replica on the store serve it. `up`
starts only when no process of an earlier stack is left, so whatever else the store routed is
served by nothing: a canary left by an interrupted rollout, a stable backend at an old URL, a
model that is no longer a champion. Those are removed, each with a line saying what and why.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from configs.gateway import BackendSpec, GatewayConfig, RouteSpec
from configs.home import Home
from serving.attestation import attestation_digest
from serving.gateway.state import store_for
from serving.gateway.state.store import Conflict, StateError
from serving.gateway.table_sync import ROUTES, decode_one, encode
from serving.stack.services import LEFT, StackError

_TRIES = 3  # a gateway on a shared store may write between our read and our write


def route_changes(
    stored: Mapping[str, RouteSpec | None], wanted: Mapping[str, RouteSpec]
) -> list[str]:
    """What changes, model by model, when the store's routes (None: an invalid record) become
    `wanted`; an unchanged model gets a line too."""
    lines = []
    for model in sorted(stored.keys() | wanted.keys()):
        old, new = stored.get(model), wanted.get(model)
        if new is None:
            held = _backends(old) if old else "an invalid record"
            lines.append(f"{model}: removed, no longer a champion (it routed {held})")
        elif model not in stored:
            lines.append(f"{model}: added, {_backends(new)}")
        elif old is None:
            lines.append(f"{model}: its stored route was invalid; now {_backends(new)}")
        elif old == new:
            lines.append(f"{model}: unchanged, {_backends(new)}")
        else:
            lines += [f"{model}: {change}" for change in _differences(old, new)]
    return lines


def _backends(spec: RouteSpec) -> str:
    return ", ".join(f"{b.role} v{b.version} at {b.url} ({b.weight:g})" for b in spec.backends)


def _differences(old: RouteSpec, new: RouteSpec) -> list[str]:
    before = {b.version: b for b in old.backends}
    after = {b.version: b for b in new.backends}
    lines = []
    for version, b in before.items():
        if version in after:
            continue
        if b.role == "canary":
            lines.append(
                f"canary v{version} at {b.url} dropped: left by an interrupted rollout, and no "
                "vLLM of this stack serves it"
            )
        else:
            champion = ", ".join(f"v{v}" for v in after)
            lines.append(f"stable v{version} at {b.url} dropped: the champion is {champion}")
    for version, b in after.items():
        if (was := before.get(version)) is None:
            lines.append(f"{b.role} v{version} added at {b.url} ({b.weight:g})")
            continue
        for field in BackendSpec.model_fields:
            if (a := getattr(was, field)) != (z := getattr(b, field)):
                if field == "attestation":  # named by digest: the JSON is kilobytes
                    a, z = attestation_digest(a), attestation_digest(z)
                lines.append(f"v{version} {field}: {a} -> {z}")
    if old.audience != new.audience:
        lines.append(f"audience: {old.audience} -> {new.audience}")
    if old.failover != new.failover:
        lines.append(f"failover: {old.failover} -> {new.failover}")
    return lines


async def _reconcile(config: GatewayConfig, home: Home) -> list[str]:
    wanted = {r.model: r for r in config.routes}
    store = store_for(config.state, home)
    await store.open()
    try:
        for _ in range(_TRIES):
            snapshot = await store.read(ROUTES)
            stored: dict[str, RouteSpec | None] = {}
            for model, record in snapshot.records.items():
                try:
                    stored[model] = decode_one(model, record, store.where)
                except StateError:
                    stored[model] = None  # reported and replaced below
            put = {m: encode(s) for m, s in wanted.items() if stored.get(m) != s}
            stale = set(stored) - set(wanted)
            if put or stale:
                try:
                    await store.write(ROUTES, snapshot.version, put, stale)
                except Conflict:
                    continue  # changed meanwhile: compare again with what it holds now
            return route_changes(stored, wanted)
    finally:
        await store.close()
    raise StackError(
        f"the gateway state store {store.where} kept changing while `up` wrote its routes; "
        f"is a gateway of another stack using it? {LEFT}"
    )


def reconcile_routes(config: GatewayConfig, home: Home) -> list[str]:
    """Make the state store of `config` route exactly `config.routes`; one line per model saying
    what changed against what it held."""
    try:
        return asyncio.run(_reconcile(config, home))
    except StateError as e:
        raise StackError(f"{e}\n{LEFT}") from None
