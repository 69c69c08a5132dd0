"""Before any traffic moves: which version is the candidate, is it servable, and does the gateway
serve exactly the champion as stable? A failed precondition changes nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from tasks.environments import refusal
from tasks.gateway_admin import GatewayAdmin, GatewayAdminError
from tasks.registry import Registry
from tasks.servable import CHAMPION, ModelVersion, NotServable, check_servable


class RolloutRefused(RuntimeError):
    """A precondition failed before any traffic moved; nothing was changed."""


class AlreadyChampion(RolloutRefused):
    """Nothing to do: the candidate already serves as champion (e.g. a first release, whose
    registration also triggers the auto-rollout)."""


@dataclass(frozen=True)
class Plan:
    """What the preconditions established: who is stable, who is the candidate, and the route."""

    model: str
    candidate: ModelVersion
    stable: ModelVersion
    stable_backends: tuple[dict[str, Any], ...]  # as the gateway describes them


def resolve(registry: Registry, model: str, candidate: str) -> str:
    """A version number, an alias (e.g. `challenger`) or a variant label (the newest version
    with that `variant` tag, e.g. `gptq-w8a8`) as a version number."""
    if candidate.isdigit():
        if not registry.exists(model, candidate):
            raise RolloutRefused(f"{model} has no version {candidate}")
        return candidate
    if (version := registry.alias(model, candidate)) is not None:
        return version
    if found := registry.versions(model, variant=candidate):
        return found[-1]
    raise RolloutRefused(
        f"'{candidate}' is neither a version, an alias nor a variant of {model}; "
        "see the registered versions in MLflow"
    )


def preconditions(registry: Registry, admin: GatewayAdmin, model: str, candidate: str) -> Plan:
    """Raise RolloutRefused unless the candidate may take traffic: its evaluation passed, its
    signature verifies against its files and their digest is the registry's, it is not already
    champion, the environment's promotion rule holds (prod: it passed staging; tasks/
    environments.py), and the gateway serves exactly the champion as stable with no canary."""
    version = resolve(registry, model, candidate)
    champion = registry.alias(model, CHAMPION)
    if champion is None:
        first = "the release makes the first one"
        if (env := registry.home.environment) is not None:
            first = f"`slipway environments seed {env}` starts it from prod's champion"
        raise RolloutRefused(f"{model} has no {registry.role(CHAMPION)} to canary against: {first}")
    if version == champion:
        raise AlreadyChampion(f"{model} v{version} is already the champion: nothing to roll out")
    home = registry.home
    tags = registry.tags(model, version)
    if tags.get("rollout_status") in ("in_progress", "paused"):
        raise RolloutRefused(
            f"{model} v{version} is already being rolled out (rollout_status="
            f"{tags['rollout_status']}); approve or roll back that one first"
        )
    if (why := refusal(registry, model, version, tags)) is not None:
        raise RolloutRefused(why)
    cand = ModelVersion(model, version, tags, home)
    try:
        check_servable(cand, role="candidate")
    except NotServable as e:
        raise RolloutRefused(str(e)) from e
    try:
        route = admin.route(model)
    except GatewayAdminError as e:
        raise RolloutRefused(f"the gateway cannot serve a canary of {model}: {e}") from e
    if canaries := [b["version"] for b in route["backends"] if b["role"] == "canary"]:
        raise RolloutRefused(
            f"the gateway already routes {model} to canary v{', v'.join(canaries)}: another "
            f"rollout is running or was cut off; `slipway rollout rollback {model}` "
            "withdraws it"
        )
    stable = tuple(b for b in route["backends"] if b["weight"] > 0)
    if {b["version"] for b in stable} != {champion}:
        serving = ", ".join(f"v{b['version']}" for b in stable) or "nothing"
        raise RolloutRefused(
            f"the gateway serves {serving} as {model}'s stable, but the registry's champion is "
            f"v{champion}: restart the stack (`make down && make up`) so they agree"
        )
    stable_champion = ModelVersion(model, champion, registry.tags(model, champion), home)
    return Plan(model, cand, stable_champion, stable)


@task(name="preconditions", cache_policy=NO_CACHE)
def preconditions_task(home: Home, admin: GatewayAdmin, model: str, candidate: str) -> Plan:
    return preconditions(Registry(home), admin, model, candidate)
