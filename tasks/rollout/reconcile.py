"""Reconcile: a model's registry aliases, version tags and gateway route made to agree, and every
repair said.

The rule: the registry's `champion` alias says what should be served; the gateway's route says
what is routed. So the route is made to serve the champion alone (every other backend drained and
removed, its vLLM stopped), and every move a flow left unsettled ends the way the alias says:

- a rollout whose candidate is champion is `promoted` (the flow died after the alias moved: the
  reconcile finishes the promotion), otherwise `rolled_back` (the canary is withdrawn);
- a revert whose reinstated version is champion is `reverted`, otherwise `undone`.

A move's order makes this always possible: the version coming in joins the route (at weight 0)
before anything else, takes all the traffic in one atomic swap, then the alias moves, and only
then is the old backend drained and removed. Killed anywhere, the stack is one reconcile away from
one of two states: the old champion serving alone, or the new one serving alone as champion.

A rollout and a revert reconcile before they begin and on every way out (as the owner of their
own move); `slipway rollout reconcile MODEL` does it by hand, and `make up` can once its gateway
answers. A move whose flow is alive is never touched: that is `Busy`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from tasks.engines import find_running, stop_version
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.control import now_iso
from tasks.rollout.inflight import InFlight, Kind, Owner, crash_flow_run
from tasks.rollout.plan import RolloutRefused
from tasks.rollout.record import (
    NEEDS_RECONCILE,
    PREVIOUS,
    ROLLOUTS,
    UNSETTLED,
    emit,
    outcome_of,
    tag_outcome,
    write_story,
)
from tasks.rollout.route import add_canary, describe, hand_over, keep_only
from tasks.servable import CHAMPION, ModelVersion, version_of


class Busy(RolloutRefused):
    """Another rollout or revert of the model is running; it settles itself."""


class ReconcileError(RuntimeError):
    """The stack cannot be made consistent from here; the message says what to do."""


class Unsettled(RuntimeError):
    """A flow could not settle the gateway on its way out (its records say `needs_reconcile`);
    `slipway rollout reconcile MODEL` finishes it."""


@dataclass(frozen=True)
class Reconciled:
    """What the reconcile found and did. `outcome`: how the caller's own move ended (None when
    the caller owns none)."""

    model: str
    champion: str | None
    changes: tuple[str, ...]
    outcome: str | None = None

    def lines(self) -> list[str]:
        if self.champion is None:
            return [f"{self.model} has no champion: nothing is served, nothing to reconcile"]
        return list(self.changes) or [
            f"consistent: the gateway serves v{self.champion}, the registry's champion, alone"
        ]


@dataclass(frozen=True)
class Move:
    """A rollout or revert that a flow left unsettled, as its records name it."""

    kind: Kind
    source: str
    target: str
    run_id: str | None
    started_at: str = ""
    owner: Owner | None = None


def reconcile(
    registry: Registry,
    admin: GatewayAdmin,
    home: Home,
    model: str,
    me: Owner | None = None,
    spare: frozenset[str] = frozenset(),
) -> Reconciled:
    """Make `model`'s route, aliases and tags agree (see the module docstring); `me` is the
    owner of the move the caller is settling, if any; the vLLM of a version in `spare` is left
    running (the caller is about to serve it). Raises Busy when another live flow owns a move,
    ReconcileError when the champion cannot be routed."""
    moving = InFlight.read(registry, model)
    mine = moving is not None and moving.owner == me
    if moving is not None and not mine and moving.owner.alive():
        raise Busy(
            f"a {moving.kind} of {model} v{moving.target} is running ({moving.owner}): it "
            f"settles itself; `slipway rollout rollback {model}` withdraws a canary now"
        )
    champion = registry.alias(model, CHAMPION)
    if champion is None:
        return Reconciled(model, None, ())
    changes = [
        *_route(registry, admin, home, model, champion),
        *_engines(registry, home, model, {champion, *spare}),
    ]
    if moving is not None:
        changes += _previous(registry, model, moving, champion)
    if mine:
        outcome = outcome_of(moving.kind, moving.target, champion)
        return Reconciled(model, champion, tuple(changes), outcome)
    dead = None
    if moving is not None:
        dead = Move(**moving.model_dump(exclude={"owner"}), owner=moving.owner)
    repairs = tuple(changes)
    for move in _unsettled(registry, model, dead):
        changes.append(_settle(registry, model, move, champion, repairs))
    if moving is not None:
        why = f"Slipway's reconcile: its process ({moving.owner}) is gone"
        if said := crash_flow_run(moving.owner, why):
            changes.append(said)
        InFlight.clear(registry, model)
    return Reconciled(model, champion, tuple(changes))


def _route(
    registry: Registry, admin: GatewayAdmin, home: Home, model: str, champion: str
) -> list[str]:
    """The champion alone in the route, as stable: joined first if it is missing and its vLLM
    runs, given all the traffic in one swap, then the others drained and removed."""
    backends = admin.route(model)["backends"]
    if [(b["version"], b["role"], b["weight"] > 0) for b in backends] == [
        (champion, "stable", True)
    ]:
        return []
    before = describe(backends)
    if all(b["version"] != champion for b in backends):
        running = find_running(home, version_of(registry, model, champion))
        if running is None:
            raise ReconcileError(
                f"the gateway routes {model} to {before}, but the registry's champion is "
                f"v{champion}, and no recorded server of it answers: `make down && make up` "
                "serves the champion"
            )
        add_canary(admin, model, running)
    hand_over(admin, model, champion)
    removed = keep_only(admin, model, champion)
    gone = f" (v{', v'.join(removed)} drained and removed)" if removed else ""
    return [f"the gateway routed {before}; now v{champion}, the registry's champion, alone{gone}"]


def _engines(registry: Registry, home: Home, model: str, keep: set[str]) -> list[str]:
    """Stop the recorded vLLM of every version but those kept (the champion, and what the caller
    is about to serve): no route serves them now."""
    stopped = [
        v
        for v in registry.versions(model)
        if v not in keep and stop_version(home, ModelVersion(model, v, {}, home).record)
    ]
    return [f"stopped the vLLM of v{v}: no route serves it" for v in stopped]


def _previous(registry: Registry, model: str, moving: InFlight, champion: str) -> list[str]:
    """A move that made its target champion leaves its source as `previous` (the flow may have
    died between the two aliases)."""
    if champion != moving.target or registry.alias(model, PREVIOUS) == moving.source:
        return []
    why = f"reconcile: the {moving.kind} that made v{champion} champion replaced v{moving.source}"
    registry.set_alias(model, PREVIOUS, moving.source, reason=why)
    return [f"alias previous set to v{moving.source} ({why})"]


def _unsettled(registry: Registry, model: str, dead: Move | None) -> list[Move]:
    """Every move left unsettled, once each: the dead owner's, every rollout run of the model
    still open in MLflow, and every version whose tags say a move is still under way."""
    moves = [dead] if dead is not None else []
    for run in registry.open_runs(ROLLOUTS, f"tags.model = '{model}'"):
        tags = run.data.tags
        kind = "revert" if tags.get("kind") == "revert" else "rollout"
        moves.append(Move(kind, tags["stable"], tags["candidate"], run.info.run_id))
    for key, values in UNSETTLED.items():
        for value in values:
            for version in registry.versions(model, **{key: value}):
                tags = registry.tags(model, version)
                if key == "rollout_status":
                    run_id = tags.get("rollout_run_id")
                    moves.append(Move("rollout", tags.get("rollout_against", ""), version, run_id))
                else:
                    run_id = tags.get("revert_run_id")
                    moves.append(Move("revert", version, tags.get("revert_to", ""), run_id))
    return list(_once(moves))


def _once(moves: Iterable[Move]) -> Iterable[Move]:
    seen: set[tuple[str, str | None]] = set()
    for move in moves:
        if (key := (move.target, move.run_id)) not in seen:
            seen.add(key)
            yield move


def _settle(
    registry: Registry, model: str, move: Move, champion: str, repairs: tuple[str, ...]
) -> str:
    """End one unsettled move the way the alias says: its tags, its MLflow run (the story of a
    run still open; a tag on one already ended) and its event."""
    outcome = outcome_of(move.kind, move.target, champion)
    now = now_iso()
    by = f" ({move.owner})" if move.owner else ""
    reason = (
        f"reconciled at {now}: the {move.kind} flow{by} stopped before it settled; the registry's "
        f"champion is v{champion}"
    )
    if repairs:
        reason += "; repaired: " + "; ".join(repairs)
    told = registry.tags(model, move.target if move.kind == "rollout" else move.source)
    if told.get(f"{move.kind}_status") != outcome:  # a rollback by hand already said why
        tag_outcome(registry, model, move.kind, move.source, move.target, outcome, reason)
    if move.run_id is not None:
        if registry.run_status(move.run_id) == "RUNNING":
            lines = [
                f"{move.started_at or 'earlier'}: {move.kind} of {model} v{move.target} against "
                f"v{move.source}{by}",
                *(f"{now}: repaired after the flow stopped: {r}" for r in repairs),
                f"{now}: {outcome.replace('_', ' ')}: {reason}",
            ]
            evidence = {
                "model": model,
                "kind": move.kind,
                "candidate": move.target,
                "stable": move.source,
                "status": outcome,
                "reason": reason,
                "repairs": list(repairs),
                "reconciled": True,
            }
            title = f"{move.kind.capitalize()} of {model} v{move.target}"
            write_story(registry, move.run_id, title, lines, evidence, run_status="KILLED")
        else:
            registry.set_run_tag(move.run_id, "rollout_status", outcome)
        registry.set_run_tag(move.run_id, "reconciled_at", now)
    payload = {"reason": reason, "run_id": move.run_id, "reconciled": True}
    emit(f"slipway.{move.kind}.{outcome}", model, move.target, payload)
    return f"recorded the {move.kind} of v{move.target} (MLflow run {move.run_id}) as {outcome}"


@task(name="reconcile", cache_policy=NO_CACHE)
def reconcile_task(
    home: Home, admin: GatewayAdmin, model: str, spare: frozenset[str] = frozenset()
) -> Reconciled:
    """Before a rollout or revert begins (it owns no move yet)."""
    return reconcile(Registry(home), admin, home, model, spare=spare)


@task(name="settle", cache_policy=NO_CACHE)
def settle_task(
    home: Home,
    admin: GatewayAdmin,
    model: str,
    owner: Owner,
    status: str,
    reason: str,
    say: Callable[[str], None],
) -> tuple[str, str]:
    """A rollout's or revert's way out, whatever happened: the reconcile, as the owner of the
    move, leaves the registry's champion serving alone (what did not come in is withdrawn and its
    vLLM stopped; what the alias decided is finished). Returns the outcome, which follows the
    alias, and why; a gateway that cannot be settled gives `needs_reconcile`, saying what to
    run."""
    try:
        settled = reconcile(Registry(home), admin, home, model, me=owner)
    except Exception as e:
        why = f"settling the gateway failed ({type(e).__name__}: {e})"
        return NEEDS_RECONCILE, f"{reason}; {why}: `slipway rollout reconcile {model}` finishes it"
    for change in settled.changes:
        say(f"{now_iso()}: settled: {change}")
    if settled.outcome != status:
        reason += f"; but the registry's champion is v{settled.champion}: {settled.outcome}"
    return str(settled.outcome), reason
