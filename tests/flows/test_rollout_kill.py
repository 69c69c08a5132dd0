"""The rollout flow SIGKILLed at its stages, then reconciled: `slipway rollout reconcile` or the
next rollout run leaves the stack in one of its two consistent states, and the records say which.

The flow runs as its own process (`slipway rollout run`, the mock upstream as its candidate) against
the real gateway, MLflow registry and the session's Prefect server. The gateway holds the one admin
call that marks the stage, so the kill lands exactly there:

- during a step (canary at 20%): the candidate is rolled back;
- during the promotion, all traffic on the candidate but the alias not moved yet: rolled back;
- during the promotion, the alias moved but the old champion still in the route: promoted;
- during the rollback, the canary at weight 0 but still in the route: rolled back;
- between the two aliases (left as such a kill leaves it): promoted, `previous` set.

The stages that start a real vLLM candidate are in test_rollout_kill_vllm.py (`make stress`).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from evaluation.benchmarks.mock_upstream import Fault
from flows.rollout import rollout
from tasks.engines import RunningVersion
from tasks.gateway_admin import GatewayAdmin
from tasks.rollout.inflight import InFlight, Owner, this_host
from tasks.rollout.reconcile import Unsettled
from tasks.rollout.route import add_canary, hand_over
from tasks.servable import version_of
from tests.flows.killing import (
    Killable,
    assert_settled,
    in_flight,
    kill_when,
    reconcile_by_hand,
    route_call,
    routed,
    staged,
    start_flow,
    story,
    weights_call,
)
from tests.flows.test_rollout import BASE_DELAY_S, Stage, traffic
from tests.serving.conftest import MODEL


@pytest.fixture
def quick(tmp_path) -> Path:
    """One judged step (20%) on 30 canary requests, then promotion."""
    path = tmp_path / "quick.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "steps": [20, 100],
                "min_samples": 30,
                "max_seconds": 60,
                "look_interval_s": 0.1,
                "on_inconclusive": "rollback",
                "slos": {"ttft_p99_s": None, "error_rate": None},
            }
        )
    )
    return path


@pytest.fixture
def killable(home, tmp_path, monkeypatch, prefect_server) -> Iterator[Killable]:
    with staged(home, tmp_path, monkeypatch) as stage:
        yield stage


def start_rollout(stage: Stage, policy: Path, log: Path):
    return start_flow(
        stage.home,
        log,
        "rollout",
        "run",
        MODEL,
        stage.candidate,
        "--policy",
        str(policy),
        "--gateway-url",
        stage.gateway_url,
        "--candidate-url",
        stage.upstream_url,
    )


def assert_serves_alone(stage: Stage, version: str, status: str, killed: InFlight) -> None:
    """One of the two consistent states: `version` serving alone as champion, the candidate's
    tags saying which state it is, and the killed flow's records settled."""
    registry = stage.registry
    assert routed(stage) == [(version, "stable", 100.0)]
    assert registry.alias(MODEL, "champion") == version
    tags = registry.tags(MODEL, stage.candidate)
    assert tags["rollout_status"] == status, tags
    assert "reconciled" in tags["rollout_reason"], tags["rollout_reason"]
    assert registry.client.get_run(killed.run_id).data.tags["rollout_status"] == status
    assert_settled(registry, MODEL, killed)


def test_killed_during_a_step_the_next_rollout_rolls_it_back_first(killable, quick, tmp_path):
    stage, log = killable.stage, tmp_path / "flow.log"
    canary_at_20 = (stage.candidate, "canary", 20.0)
    proc = start_rollout(stage, quick, log)
    kill_when(proc, lambda: canary_at_20 in routed(stage), log)
    killed = in_flight(stage.registry, MODEL)
    assert stage.registry.tags(MODEL, stage.candidate)["rollout_status"] == "in_progress"

    # The next rollout of the same candidate repairs first, then runs to its end.
    with traffic(stage):
        outcome = rollout(MODEL, stage.candidate, str(quick), stage.gateway_url, stage.upstream_url)
    assert outcome == "promoted"
    run = stage.registry.client.get_run(killed.run_id)
    assert run.info.status == "KILLED" and run.data.tags["rollout_status"] == "rolled_back"
    assert "repaired after the flow stopped" in story(stage.registry, killed.run_id)
    tags = stage.registry.tags(MODEL, stage.candidate)
    told = story(stage.registry, tags["rollout_run_id"])
    assert f"before it began, the reconcile repaired: the gateway routed v{stage.stable}" in told
    assert f"recorded the rollout of v{stage.candidate}" in told and "as rolled_back" in told
    assert routed(stage) == [(stage.candidate, "stable", 100.0)]


def test_killed_after_all_traffic_moved_but_before_the_alias_is_rolled_back(
    killable, quick, tmp_path
):
    stage, log = killable.stage, tmp_path / "flow.log"
    everything = {stage.stable: 0.0, stage.candidate: 100.0}
    hold = killable.arm(weights_call(MODEL, everything), "apply")
    with traffic(stage) as statuses:
        kill_when(start_rollout(stage, quick, log), hold.reached.is_set, log)
        killed = in_flight(stage.registry, MODEL)
        assert (stage.candidate, "canary", 100.0) in routed(stage)
        assert stage.registry.alias(MODEL, "champion") == stage.stable
        said = reconcile_by_hand(stage)
    assert f"now v{stage.stable}, the registry's champion, alone" in said
    assert_serves_alone(stage, stage.stable, "rolled_back", killed)
    assert set(statuses) == {200}  # clients saw nothing of the kill or the repair


def test_killed_after_the_alias_moved_is_promoted(killable, quick, tmp_path):
    stage, log = killable.stage, tmp_path / "flow.log"
    hold = killable.arm(route_call(MODEL, [stage.candidate]), "hold")
    with traffic(stage) as statuses:
        kill_when(start_rollout(stage, quick, log), hold.reached.is_set, log)
        killed = in_flight(stage.registry, MODEL)
        assert stage.registry.alias(MODEL, "champion") == stage.candidate
        assert (stage.stable, "stable", 0.0) in routed(stage)
        said = reconcile_by_hand(stage)
    assert f"v{stage.stable} drained and removed" in said
    assert_serves_alone(stage, stage.candidate, "promoted", killed)
    assert stage.registry.alias(MODEL, "previous") == stage.stable
    assert set(statuses) == {200}


def test_killed_during_the_rollback_is_rolled_back(killable, quick, tmp_path):
    stage, log = killable.stage, tmp_path / "flow.log"
    stage.upstream.faults[f"{MODEL}-v{stage.candidate}"] = Fault(status=500, delay_s=BASE_DELAY_S)
    withdrawing = {stage.stable: 100.0, stage.candidate: 0.0}
    hold = killable.arm(weights_call(MODEL, withdrawing), "apply")
    with traffic(stage):
        kill_when(start_rollout(stage, quick, log), hold.reached.is_set, log)
    killed = in_flight(stage.registry, MODEL)
    assert (stage.candidate, "canary", 0.0) in routed(stage)
    assert stage.registry.tags(MODEL, stage.candidate)["rollout_status"] == "in_progress"
    said = reconcile_by_hand(stage)
    assert f"recorded the rollout of v{stage.candidate}" in said
    assert_serves_alone(stage, stage.stable, "rolled_back", killed)


def test_a_rollback_that_fails_leaves_needs_reconcile_not_in_progress(killable, quick):
    stage = killable.stage
    stage.upstream.faults[f"{MODEL}-v{stage.candidate}"] = Fault(status=500, delay_s=BASE_DELAY_S)
    withdrawing = {stage.stable: 100.0, stage.candidate: 0.0}
    hold = killable.arm(weights_call(MODEL, withdrawing), "refuse")  # the rollback's first move
    with traffic(stage), pytest.raises(Unsettled, match="settling the gateway failed"):
        rollout(MODEL, stage.candidate, str(quick), stage.gateway_url, stage.upstream_url)
    assert hold.reached.is_set()
    tags = stage.registry.tags(MODEL, stage.candidate)
    assert tags["rollout_status"] == "needs_reconcile", tags
    assert f"`slipway rollout reconcile {MODEL}` finishes it" in tags["rollout_reason"]
    assert (stage.candidate, "canary", 20.0) in routed(stage)  # refused: nothing moved

    said = reconcile_by_hand(stage)
    assert f"recorded the rollout of v{stage.candidate}" in said and "as rolled_back" in said
    assert routed(stage) == [(stage.stable, "stable", 100.0)]
    tags = stage.registry.tags(MODEL, stage.candidate)
    assert tags["rollout_status"] == "rolled_back" and "reconciled" in tags["rollout_reason"]
    assert InFlight.read(stage.registry, MODEL) is None


def test_killed_between_the_two_aliases_is_promoted_with_previous_set(killable):
    """The window between `champion` and `previous` moving is too short to hit with a kill, so
    the test leaves what such a kill leaves: a dead owner's claim, champion moved, previous not,
    and the old champion still in the route at weight 0."""
    stage = killable.stage
    registry, admin = stage.registry, GatewayAdmin(stage.gateway_url, stage._admin)
    add_canary(
        admin,
        MODEL,
        RunningVersion(version_of(registry, MODEL, stage.candidate), (stage.upstream_url,), False),
    )
    hand_over(admin, MODEL, stage.candidate)
    registry.set_alias(MODEL, "champion", stage.candidate, reason="rollout: every step not worse")
    dead = Owner(host=this_host(), pid=exited_pid(), created=0.0)
    InFlight(
        kind="rollout",
        source=stage.stable,
        target=stage.candidate,
        run_id=None,
        started_at="t",
        owner=dead,
    ).claim(registry, MODEL)
    registry.tag(MODEL, stage.candidate, {"rollout_status": "in_progress"})
    assert registry.alias(MODEL, "previous") is None

    said = reconcile_by_hand(stage)
    assert f"alias previous set to v{stage.stable}" in said
    assert registry.alias(MODEL, "previous") == stage.stable
    assert routed(stage) == [(stage.candidate, "stable", 100.0)]
    assert registry.tags(MODEL, stage.candidate)["rollout_status"] == "promoted"
    assert InFlight.read(registry, MODEL) is None


def exited_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
