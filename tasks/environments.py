"""The path between environments: a version reaches an environment whose `promotion.requires`
names another (prod: staging) only after it passed there, which the registry records on the
version as the tag `passed.<environment>`: set when a rollout in that environment promotes it
(flows/rollout.py) or when a person records a soak there (`slipway environments soak`).

The rollout's preconditions (tasks/rollout/plan.py) ask `refusal`, so a rollout to prod without
a recorded staging pass is refused before any traffic moves. Without an environment (the base:
`make demo`, `make up`) and in dev and staging no rule applies.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException

from configs.environments import load_environment
from tasks.registry import Registry

PASSED = "passed."


def passed_tag(environment: str) -> str:
    return f"{PASSED}{environment}"


def record_pass(registry: Registry, model: str, version: str, how: str) -> str | None:
    """Record on the version that it passed this registry's environment (`how`: a rollout run,
    a soak and who decided); the tag set, or None outside an environment."""
    environment = registry.home.environment
    if environment is None:
        return None
    tag = passed_tag(environment)
    record = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "how": how}
    registry.tag(model, version, {tag: json.dumps(record)})
    return tag


def refusal(registry: Registry, model: str, version: str, tags: dict[str, str]) -> str | None:
    """Why `version` may not be rolled out in this registry's environment, or None when it may:
    the environment requires a pass elsewhere (prod: staging) that the version has not had."""
    environment = registry.home.environment
    if environment is None:
        return None
    required = load_environment(environment).promotion.requires
    if required is None or passed_tag(required) in tags:
        return None
    alias = registry.role("champion")
    return (
        f"{model} v{version} has no passed {required} rollout or soak recorded (no tag "
        f"`{passed_tag(required)}`): in {environment} a version becomes `{alias}` only after "
        f"{required}. Roll it out there first (`slipway rollout run {model} {version} "
        f"--environment {required}`), or record a soak there (`slipway environments soak "
        f"{required} {model} {version} --by NAME --reason WHY`)"
    )


def seed(registry: Registry, source: str = "champion") -> list[str]:
    """Point this environment's alias at what `source` (a raw registry alias; default prod's
    `champion`) names, for each model where it names none yet: a new environment starts as a
    copy of prod, and rollouts there go on from it. Returns what moved."""
    own = registry.role("champion")
    moved = []
    for model in registry.model_names():
        if registry.alias(model, "champion") is not None:
            continue
        try:
            version = str(registry.client.get_model_version_by_alias(model, source).version)
        except MlflowException:  # no such alias
            continue
        registry.set_alias(model, "champion", version, reason=f"seeded from `{source}`")
        moved.append(f"{model}: `{own}` -> v{version} (from `{source}`)")
    return moved
