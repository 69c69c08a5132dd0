"""The rollout flow: check the candidate, serve it beside the champion as a canary, move traffic
to it step by step while the sequential analysis judges it, then promote it (alias `champion`)
or roll it back, with every step in MLflow, Prefect events and the story as a Prefect artifact.

    python -m flows.rollout run MODEL CANDIDATE [--policy configs/rollout/default.yaml]
    python -m flows.rollout rollback MODEL [--reason TEXT]   # at once, by hand
    python -m flows.rollout approve MODEL                    # let a paused step advance

CANDIDATE is a version number, an alias or a variant label (its newest version). The gateway is
the one `make up` started unless --gateway-url names another.
"""

from __future__ import annotations

import json
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path

import click
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from configs.evaluation import PROMPTS
from configs.home import Home
from configs.rollout import DEFAULT_POLICY, RolloutPolicy, Stage, load_rollout_policy
from evaluation.canary import Analysis
from evaluation.loadgen import BackgroundLoad, load_prompts
from serving.stack import MODEL_CONFIGS, Champion, serving_for, synthetic_key_path
from tasks.registry import Registry
from tasks.rollout import (
    CONTROL,
    AlreadyChampion,
    History,
    Plan,
    RolloutRefused,
    Steering,
    add_canary,
    announce,
    judge_step_task,
    make_stable,
    now_iso,
    preconditions_task,
    withdraw_canary,
)
from tasks.serving_control import (
    GatewayAdmin,
    RunningVersion,
    ServingControlError,
    secret,
    start_version,
    stop_version,
)


@flow(name="rollout", flow_run_name="{model}: {candidate}")
def rollout(
    model: str,
    candidate: str,
    policy: str = str(DEFAULT_POLICY),
    gateway_url: str | None = None,
    candidate_url: str | None = None,
) -> str:
    """Roll `candidate` out against the champion; returns 'promoted', 'rolled_back' or
    'already_champion' (nothing to do).

    candidate_url: serve the canary from this running OpenAI-compatible server (it must answer
    to <model>-v<version>) instead of starting vLLM for it.
    """
    rules = load_rollout_policy(policy)
    home = Home.from_env()
    admin = GatewayAdmin.of(home, gateway_url)
    try:
        plan = preconditions_task(home, admin, model, candidate)  # raises: nothing has moved
    except AlreadyChampion as e:
        get_run_logger().info("%s", e)
        return "already_champion"
    running = serve_candidate_task(plan, home, candidate_url)
    registry = Registry(home)
    say = get_run_logger().info
    history = History.open(registry, plan, policy, rules, tell=say)
    status, reason = "rolled_back", "the rollout stopped before a decision"

    def paused(index: int, stage: Stage, analysis: Analysis | None) -> None:
        history.pause(index, stage, analysis)
        announce("paused", plan, {"step": index + 1, "weight": stage.weight}, _url(rules))

    steer = Steering(
        registry, model, plan.candidate.version, running.url, history.look, paused, say
    )
    load = synthetic_load(rules, admin.url, home, model)
    try:
        add_canary(admin, plan, running)
        announce(
            "started", plan, {"stable": plan.stable.version, "run_id": history.run_id}, _url(rules)
        )
        with load:
            for index, stage in enumerate(rules.stages()):
                step = judge_step_task(admin, plan, index, stage, rules, steer)
                history.step(step)
                announce("step", plan, {"step": index + 1, "weight": stage.weight,
                                        "action": step.action, "reason": step.reason}, _url(rules))  # fmt: skip
                if step.action == "rollback":
                    reason = f"step {index + 1} ({stage.weight}%): {step.reason}"
                    break
            else:
                promote_task(admin, registry, plan, home)
                status, reason = "promoted", "every step judged the canary not worse than stable"
    except BaseException as e:
        reason = f"the rollout itself failed ({type(e).__name__}: {e}); the canary is withdrawn"
        raise
    finally:
        if status != "promoted":
            roll_back_task(admin, plan, running, home)
        with tempfile.TemporaryDirectory() as workdir:
            story = history.close(status, reason, Path(workdir))
        announce(status, plan, {"reason": reason, "run_id": history.run_id}, _url(rules))
        create_markdown_artifact(
            story, key=f"rollout-{_slug(model)}", description=f"{status}: {reason}"[:500]
        )
    return status


def _url(rules: RolloutPolicy) -> str | None:
    return str(rules.webhook_url) if rules.webhook_url else None


def _slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


@task(name="serve-candidate", cache_policy=NO_CACHE)
def serve_candidate_task(plan: Plan, home: Home, url: str | None) -> RunningVersion:
    if url is not None:
        return RunningVersion(plan.candidate, url.rstrip("/"), started_here=False)
    return start_version(plan.candidate, serving_for(plan.model, MODEL_CONFIGS), home)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(admin: GatewayAdmin, registry: Registry, plan: Plan, home: Home) -> None:
    """All traffic to the candidate, alias `champion` to it (the old one becomes `previous`),
    the old champion drained from the gateway and its vLLM stopped."""
    make_stable(admin, plan)
    registry.promote(plan.model, plan.candidate.version, reason="rollout: every step not worse")
    stop_version(home, plan.stable.record)


@task(name="roll-back", cache_policy=NO_CACHE)
def roll_back_task(admin: GatewayAdmin, plan: Plan, running: RunningVersion, home: Home) -> None:
    """Canary weight 0 at once, its requests drained, the route back to stable alone, and the
    canary's vLLM stopped if this rollout started it."""
    withdrawn = withdraw_canary(admin, plan.model)
    # Not withdrawn means it already serves as stable (a promotion that failed late): keep it.
    if running.started_here and plan.candidate.version in withdrawn:
        stop_version(home, running.version.record)


def synthetic_load(rules: RolloutPolicy, gateway_url: str, home: Home, model: str):
    """Labelled synthetic traffic for the whole rollout when the policy asks for it."""
    if not rules.synthetic_load:
        return nullcontext()
    key = secret(
        "SLIPWAY_SYNTHETIC_KEY", synthetic_key_path(home), "key of the synthetic-load tenant"
    )
    prompts = load_prompts(PROMPTS, max_tokens=16)
    return BackgroundLoad(gateway_url, model, key, rules.synthetic_rate, prompts)


# ---- by hand -------------------------------------------------------------------------------------


def roll_back_by_hand(
    home: Home, model: str, reason: str, gateway_url: str | None = None
) -> list[str]:
    """Withdraw the canary at once and tell a running rollout flow (it records the rollback);
    with no flow running, record it here. Returns the withdrawn versions."""
    registry = Registry(home)
    versions = withdraw_canary(GatewayAdmin.of(home, gateway_url), model)
    for version in versions:
        order = {"action": "rollback", "version": version, "at": now_iso(), "reason": reason}
        registry.client.set_registered_model_tag(model, CONTROL, json.dumps(order))
        registry.tag(model, version, {"rollout_status": "rolled_back", "rollout_ended_at": order["at"],
                                      "rollout_reason": f"by hand: {reason}"})  # fmt: skip
        stop_version(home, Champion(model, version, {}, home).record)
    return versions


def approve(home: Home, model: str) -> str:
    """Let the paused step of `model`'s rollout advance. Returns the version approved."""
    registry = Registry(home)
    paused = registry.client.search_model_versions(
        f"name='{model}' and tags.rollout_status='paused'"
    )
    if not paused:
        raise click.ClickException(f"no rollout of {model} is paused waiting for an approval")
    version = str(max(paused, key=lambda v: int(v.version)).version)
    order = {"action": "approve", "version": version, "at": now_iso(), "reason": "approved"}
    registry.client.set_registered_model_tag(model, CONTROL, json.dumps(order))
    return version


@click.group()
def cli() -> None:
    """Canary rollouts: run one, roll one back by hand, approve a paused step."""


@cli.command("run")
@click.argument("model")
@click.argument("candidate")
@click.option("--policy", default=str(DEFAULT_POLICY), show_default=True)
@click.option("--gateway-url", default=None, help="default: the gateway `make up` started")
@click.option("--candidate-url", default=None, help="serve the canary from this running server")
def run_command(
    model: str, candidate: str, policy: str, gateway_url: str | None, candidate_url: str | None
) -> None:
    """Roll CANDIDATE (version, alias or variant) of MODEL out against its champion."""
    try:
        click.echo(rollout(model, candidate, policy, gateway_url, candidate_url))
    except RolloutRefused as e:
        raise click.ClickException(f"rollout refused, nothing changed: {e}") from None
    except ServingControlError as e:
        raise click.ClickException(str(e)) from None


@cli.command("rollback")
@click.argument("model")
@click.option("--reason", default="rolled back by hand", show_default=True)
@click.option("--gateway-url", default=None)
def rollback_command(model: str, reason: str, gateway_url: str | None) -> None:
    """Withdraw MODEL's canary now."""
    try:
        versions = roll_back_by_hand(Home.from_env(), model, reason, gateway_url)
    except ServingControlError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"withdrew canary v{', v'.join(versions)}" if versions else f"{model} has no canary")


@cli.command("approve")
@click.argument("model")
def approve_command(model: str) -> None:
    """Let MODEL's paused rollout step advance."""
    click.echo(
        f"approved v{approve(Home.from_env(), model)}; the rollout advances at its next look"
    )


if __name__ == "__main__":
    sys.exit(cli())
