"""Environments in one registry, through the real rollout flow (real gateway, MLflow and Prefect,
the mock upstream for vLLM; fixtures of test_rollout.py): a rollout in prod is refused before
any traffic moves unless the version passed staging; a rollout in staging promotes `staging`
only, never prod's `champion`, and records the pass; with it, prod's rollout promotes; with no
environment (the demo) the rule does not apply."""

# The fixtures of test_rollout.py are imported by name, and tests take them by that name.
# ruff: noqa: F811

from __future__ import annotations

import json

import pytest

from configs.home import Home
from flows.rollout import rollout
from tasks.environments import passed_tag, record_pass
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.plan import RolloutRefused, preconditions
from tests.flows.test_rollout import (  # noqa: F401  (fixtures)
    Stage,
    breaker,
    failover,
    policy,
    rollout_runs,
    stage,
    traffic,
)
from tests.serving.conftest import MODEL


def run_in(stage: Stage, policy, environment: str | None) -> str:
    return rollout(
        MODEL,
        stage.candidate,
        str(policy),
        stage.gateway_url,
        stage.upstream_url,
        environment=environment,
    )


def routed(stage: Stage) -> list[tuple[str, str, float]]:
    return [(b["version"], b["role"], b["weight"]) for b in stage.route()["backends"]]


def test_a_prod_rollout_without_a_staging_pass_is_refused_and_moves_nothing(stage, policy):
    before = stage.route()
    with pytest.raises(RolloutRefused) as refused:
        run_in(stage, policy, "prod")
    reason = str(refused.value)
    assert f"{MODEL} v{stage.candidate} has no passed staging rollout or soak recorded" in reason
    assert "`passed.staging`" in reason and "--environment staging" in reason
    assert stage.route() == before
    assert stage.registry.alias(MODEL, "champion") == stage.stable
    assert "rollout_status" not in stage.registry.tags(MODEL, stage.candidate)
    assert rollout_runs(stage) == []


def test_a_staging_rollout_promotes_staging_only_and_records_the_pass(stage, policy):
    staging = Registry(Home.from_env("staging"))
    staging.promote(MODEL, stage.stable, reason="staging starts where prod is")
    with traffic(stage):
        outcome = run_in(stage, policy, "staging")
    assert outcome == "promoted", stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    assert routed(stage) == [(stage.candidate, "stable", 100.0)]
    raw = stage.registry  # the Slipway home's registry: the raw aliases
    assert raw.alias(MODEL, "staging") == stage.candidate
    assert raw.alias(MODEL, "staging-previous") == stage.stable
    assert raw.alias(MODEL, "champion") == stage.stable  # prod's is untouched
    assert raw.alias(MODEL, "previous") is None
    passed = json.loads(raw.tags(MODEL, stage.candidate)[passed_tag("staging")])
    [run_] = rollout_runs(stage)
    assert passed["how"] == f"rollout (MLflow run {run_.info.run_id})"


def test_a_prod_rollout_of_a_version_that_passed_staging_is_promoted(stage, policy):
    record_pass(Registry(Home.from_env("staging")), MODEL, stage.candidate, "rollout (test)")
    with traffic(stage):
        outcome = run_in(stage, policy, "prod")
    assert outcome == "promoted", stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    assert stage.registry.alias(MODEL, "champion") == stage.candidate
    assert stage.registry.alias(MODEL, "previous") == stage.stable
    assert passed_tag("prod") in stage.registry.tags(MODEL, stage.candidate)


def test_the_rule_holds_only_where_an_environment_requires_a_pass(stage):
    """The demo's rollout runs with no environment: a version that never saw staging may take
    traffic there, and in dev and staging; in prod it may not until a soak there is recorded."""
    admin = GatewayAdmin.of(stage.home, stage.gateway_url)
    for environment in (None, "dev", "staging"):
        home = Home.from_env(environment)
        Registry(home).promote(MODEL, stage.stable)  # dev and staging: their own alias
        plan = preconditions(Registry(home), admin, MODEL, stage.candidate)
        assert (plan.candidate.version, plan.stable.version) == (stage.candidate, stage.stable)
    prod = Registry(Home.from_env("prod"))
    with pytest.raises(RolloutRefused, match="no passed staging rollout or soak recorded"):
        preconditions(prod, admin, MODEL, stage.candidate)
    record_pass(Registry(Home.from_env("staging")), MODEL, stage.candidate, "soak, by ops: 48 h")
    assert preconditions(prod, admin, MODEL, stage.candidate).candidate.version == stage.candidate
