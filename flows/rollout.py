"""The rollout flow: check the candidate, serve it beside the champion as a canary, move traffic
to it step by step while the sequential analysis judges it, then promote it (alias `champion`)
or roll it back, with every step in MLflow, Prefect events and the story as a Prefect artifact.

CANDIDATE is a version number, an alias or a variant label (its newest version). The gateway is
the one `make up` started unless gateway_url names another. `slipway rollout --help` runs it.
"""

from __future__ import annotations

import tempfile
from contextlib import nullcontext
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from configs.evaluation import PROMPTS
from configs.home import Home
from configs.models import serving_for
from configs.rollout import DEFAULT_POLICY, RolloutPolicy, Stage, load_rollout_policy
from configs.settings import Settings
from evaluation.canary import Analysis
from evaluation.loadgen.background import BackgroundLoad
from evaluation.loadgen.report import load_prompts
from tasks.engines import RunningVersion, start_version, stop_version
from tasks.gateway_admin import GatewayAdmin, secret
from tasks.registry import Registry
from tasks.rollout.history import History, announce
from tasks.rollout.plan import AlreadyChampion, Plan, preconditions_task
from tasks.rollout.route import add_canary, make_stable, withdraw_canary
from tasks.rollout.steps import Steering, judge_step_task


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
                announce(
                    "step",
                    plan,
                    {
                        "step": index + 1,
                        "weight": stage.weight,
                        "action": step.action,
                        "reason": step.reason,
                    },
                    _url(rules),
                )
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
    return start_version(plan.candidate, serving_for(plan.model), home)


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
    what = "key of the synthetic-load tenant"
    key = secret(Settings().synthetic_key, "SLIPWAY_SYNTHETIC_KEY", home.synthetic_key, what)
    prompts = load_prompts(PROMPTS, max_tokens=16)
    return BackgroundLoad(gateway_url, model, key, rules.synthetic_rate, prompts)
