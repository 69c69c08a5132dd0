"""The revert flow: `previous` back as champion in one step, after verifying it, when a promoted
model misbehaves (tasks/rollout/revert.py). `slipway revert --help` runs it.

previous_url: serve `previous` from this running OpenAI-compatible server (it must answer to
<model>-v<version>) instead of reusing or starting its vLLM.
"""

from __future__ import annotations

import time

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from configs.home import Home
from configs.models import serving_for
from serving.processes import answers
from tasks.engines import EngineError, RunningVersion, serve_version
from tasks.gateway_admin import GatewayAdmin
from tasks.registry import Registry
from tasks.rollout.promote import promote
from tasks.rollout.reconcile import Unsettled, reconcile_task, settle_task
from tasks.rollout.record import NEEDS_RECONCILE, PREVIOUS
from tasks.rollout.revert import RevertPlan, RevertRecord, revert_plan_task
from tasks.rollout.route import add_canary


@flow(name="revert", flow_run_name="{model}: back to previous")
def revert(
    model: str,
    reason: str = "reverted by hand",
    gateway_url: str | None = None,
    previous_url: str | None = None,
) -> str:
    """Put `previous` back as champion; returns 'reverted'. A failed verification changes
    nothing; a failure before the aliases moved is undone (recorded `undone`) and raised."""
    home = Home.from_env()
    admin = GatewayAdmin.of(home, gateway_url)
    registry, say = Registry(home), get_run_logger().info
    previous = frozenset(filter(None, [registry.alias(model, PREVIOUS)]))
    # Raises Busy while a rollout runs; previous's vLLM, if it still runs, is kept for reuse.
    repaired = reconcile_task(home, admin, model, spare=previous).changes
    for line in repaired:
        say("reconciled before the revert: %s", line)
    plan = revert_plan_task(home, admin, model)  # raises RevertRefused: nothing has moved
    record = RevertRecord.open(registry, plan, reason, tell=say, repaired=repaired)
    record.announce("started", {"reason": reason, "from": plan.current.version})
    status, why = "undone", "the revert stopped before the aliases moved"
    try:
        running = serve_previous_task(plan, home, previous_url, record)
        swap_task(admin, record, running, home)
        status, why = "reverted", f"by hand: {reason}"
    except BaseException as e:
        why = f"the revert itself failed ({type(e).__name__}: {e})"
        raise
    finally:
        owner = record.claim.owner
        status, why = settle_task(home, admin, model, owner, status, why, record.say)
        story = record.close(status, why)
        record.announce(status, {"reason": why, "seconds": record.seconds})
        create_markdown_artifact(
            story, key=f"revert-{_slug(model)}", description=f"{status}: {why}"[:500]
        )
    if status == NEEDS_RECONCILE:
        raise Unsettled(why)
    return status


def _slug(name: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "".join(c if c.isalnum() else "-" for c in name.lower())


@task(name="serve-previous", cache_policy=NO_CACHE)
def serve_previous_task(
    plan: RevertPlan, home: Home, url: str | None, record: RevertRecord
) -> RunningVersion:
    """previous's vLLM, reused if it still runs, else started (cold); health-checked either way."""
    start = time.monotonic()
    if url is None:
        running = serve_version(plan.previous, serving_for(plan.model), home)
    elif answers(url.rstrip("/") + "/health"):
        running = RunningVersion(plan.previous, (url.rstrip("/"),), started_here=False)
    else:
        raise EngineError(f"{plan.previous} at {url} does not answer /health")
    how = "started" if running.started_here else "reused"
    record.say(f"{plan.previous}: {how} at {running.url}, healthy")
    record.timed("serve", time.monotonic() - start)
    return running


@task(name="swap", cache_policy=NO_CACHE)
def swap_task(
    admin: GatewayAdmin, record: RevertRecord, running: RunningVersion, home: Home
) -> None:
    """previous joins the route at weight 0, takes all the traffic in one atomic swap, the aliases
    move (champion := previous, previous := the one reverted from), the reverted-from backend is
    drained and removed and its vLLM stopped."""
    start = time.monotonic()
    model, current = record.plan.model, record.plan.current.version
    add_canary(admin, model, running)
    removed = promote(
        admin,
        record.registry,
        home,
        model,
        running.version.version,
        reason=f"revert from v{current}: {record.reason}",
        replaced_reason=f"reverted: {record.reason}",
    )
    record.say(
        f"the gateway serves {running.version} alone; v{', v'.join(removed)} drained, removed "
        "and stopped; aliases moved"
    )
    record.timed("swap", time.monotonic() - start)
