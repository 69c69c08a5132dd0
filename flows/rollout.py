"""The rollout flow: check the candidate, serve it beside the champion as a canary, move traffic
to it step by step while the sequential analysis judges it, then promote it (alias `champion`)
or roll it back, with every step in MLflow, Prefect events and the story as a Prefect artifact.

CANDIDATE is a version number, an alias or a variant label (its newest version). The gateway is
the one `make up` started unless gateway_url names another. `slipway rollout --help` runs it.
"""

from __future__ import annotations

from contextlib import closing, nullcontext
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
from evaluation.quality.logprob import Engine, Scorer
from tasks.direct_traffic import record_scoring
from tasks.engines import RunningVersion, serve_version
from tasks.environments import record_pass
from tasks.gateway_admin import GatewayAdmin, secret
from tasks.registry import Registry
from tasks.rollout.history import History, announce
from tasks.rollout.k8s_patches import with_patches
from tasks.rollout.plan import AlreadyChampion, Plan, preconditions_task, resolve
from tasks.rollout.promote import promote
from tasks.rollout.reconcile import Unsettled, reconcile_task, settle_task
from tasks.rollout.record import NEEDS_RECONCILE
from tasks.rollout.route import add_canary
from tasks.rollout.steps import Steering, judge_step_task


@flow(name="rollout", flow_run_name="{model}: {candidate}")
def rollout(
    model: str,
    candidate: str,
    policy: str = str(DEFAULT_POLICY),
    gateway_url: str | None = None,
    candidate_url: str | None = None,
    k8s_patches: str | None = None,
    environment: str | None = None,
) -> str:
    """Roll `candidate` out against the champion; returns 'promoted', 'rolled_back' or
    'already_champion' (nothing to do). What an earlier, killed flow left unsettled is repaired
    first (logged, and the first lines of the story).

    candidate_url: serve the canary from this running OpenAI-compatible server (it must answer
    to <model>-v<version>) instead of starting vLLM for it.

    k8s_patches: a folder where every route and weight change is also written as Kubernetes
    objects, for a Kubernetes gateway to carry the weights (tasks/rollout/k8s_patches.py).

    environment: dev, staging or prod (configs/environments/; default SLIPWAY_ENVIRONMENT, else
    none): the rollout then promotes that environment's alias (`staging`; prod: `champion`),
    records a promotion as the version's pass there, and in prod refuses a version that has not
    passed staging (tasks/environments.py).
    """
    rules = load_rollout_policy(policy)
    home = Home.from_env(environment)
    patches = Path(k8s_patches) if k8s_patches else None
    admin = with_patches(GatewayAdmin.of(home, gateway_url), patches)
    registry, say = Registry(home), get_run_logger().info
    # Raises Busy while another rollout runs; the candidate's vLLM, if it runs, is kept for reuse.
    spare = frozenset([resolve(registry, model, candidate)])
    repaired = reconcile_task(home, admin, model, spare=spare).changes
    for line in repaired:
        say("reconciled before the rollout: %s", line)
    try:
        plan = preconditions_task(home, admin, model, candidate)  # raises: nothing has moved
    except AlreadyChampion as e:
        say("%s", e)
        return "already_champion"
    history = History.open(registry, plan, policy, rules, tell=say, repaired=repaired)
    status, reason = "rolled_back", "the rollout stopped before a decision"
    try:
        running = serve_candidate_task(plan, home, candidate_url)
        status, reason = canary_steps(admin, plan, rules, running, history, home)
    except BaseException as e:
        reason = f"the rollout itself failed ({type(e).__name__}: {e})"
        raise
    finally:
        owner = history.claim.owner
        status, reason = settle_task(home, admin, model, owner, status, reason, history.say)
        story = history.close(status, reason)
        announce(status, plan, {"reason": reason, "run_id": history.run_id}, _url(rules))
        create_markdown_artifact(
            story, key=f"rollout-{_slug(model)}", description=f"{status}: {reason}"[:500]
        )
    if status == NEEDS_RECONCILE:
        raise Unsettled(reason)
    return status


def canary_steps(
    admin: GatewayAdmin,
    plan: Plan,
    rules: RolloutPolicy,
    running: RunningVersion,
    history: History,
    home: Home,
) -> tuple[str, str]:
    """The canary joins the route, every step is judged, and a canary not worse at every step is
    promoted; the outcome and why."""

    def paused(index: int, stage: Stage, analysis: Analysis | None) -> None:
        history.pause(index, stage, analysis)
        announce("paused", plan, {"step": index + 1, "weight": stage.weight}, _url(rules))

    registry, model = history.registry, plan.model
    scorer = Scorer(
        {
            b["version"]: Engine(b["url"], b["served_model"], b["version"])
            for b in plan.stable_backends
        },
        Engine(running.url, plan.candidate.served_name, plan.candidate.version),
        rate_rps=rules.analysis.quality.score_rps,
        record=record_scoring(home),
    )
    steer = Steering(
        registry,
        model,
        plan.candidate.version,
        running.url,
        history.look,
        paused,
        history.tell,
        scorer,
    )
    add_canary(admin, model, running)
    started = {"stable": plan.stable.version, "run_id": history.run_id}
    announce("started", plan, started, _url(rules))
    with synthetic_load(rules, admin.url, home, model), closing(scorer):
        for index, stage in enumerate(rules.stages()):
            step = judge_step_task(admin, plan, index, stage, rules, steer)
            history.step(step)
            told = {"step": index + 1, "weight": stage.weight, "action": step.action}
            announce("step", plan, told | {"reason": step.reason}, _url(rules))
            if step.action == "rollback":
                return "rolled_back", f"step {index + 1} ({stage.label}): {step.reason}"
    promote_task(admin, registry, plan, home)
    record_pass(registry, model, plan.candidate.version, f"rollout (MLflow run {history.run_id})")
    return "promoted", "every step judged the canary not worse than stable"


def _url(rules: RolloutPolicy) -> str | None:
    return str(rules.webhook_url) if rules.webhook_url else None


def _slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


@task(name="serve-candidate", cache_policy=NO_CACHE)
def serve_candidate_task(plan: Plan, home: Home, url: str | None) -> RunningVersion:
    if url is not None:
        return RunningVersion(plan.candidate, (url.rstrip("/"),), started_here=False)
    return serve_version(plan.candidate, serving_for(plan.model), home)


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(admin: GatewayAdmin, registry: Registry, plan: Plan, home: Home) -> None:
    """All traffic to the candidate, alias `champion` to it (the old one becomes `previous`),
    the old champion drained from the gateway and its vLLM stopped."""
    reason = "rollout: every step not worse"
    promote(admin, registry, home, plan.model, plan.candidate.version, reason)


def synthetic_load(rules: RolloutPolicy, gateway_url: str, home: Home, model: str):
    """Labelled synthetic traffic for the whole rollout when the policy asks for it."""
    if not rules.synthetic_load:
        return nullcontext()
    what = "key of the synthetic-load tenant"
    key = secret(Settings().synthetic_key, "SLIPWAY_SYNTHETIC_KEY", home.synthetic_key, what)
    prompts = load_prompts(PROMPTS, max_tokens=16)
    return BackgroundLoad(
        gateway_url,
        model,
        key,
        rules.synthetic_rate,
        prompts,
        max_in_flight=rules.synthetic_max_in_flight,
    )
