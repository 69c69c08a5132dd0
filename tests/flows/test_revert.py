"""The revert flow against the real gateway, MLflow registry and Prefect, with the mock upstream
serving both versions: `previous` is back as champion in one step, with its history in MLflow, the
tags and the events; a previous that fails verification changes nothing; a revert refuses while a
rollout runs; a revert killed after the aliases moved is finished by the reconcile. The cold vLLM
start, timed, is in test_revert_vllm.py (`make stress`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import mlflow
import pytest

from flows.revert import revert
from tasks.rollout.inflight import InFlight, Owner
from tasks.rollout.reconcile import Busy
from tasks.rollout.record import ROLLOUTS
from tasks.rollout.revert import RevertRefused
from tests.flows.conftest import stored_events
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
)
from tests.flows.test_rollout import Stage, traffic
from tests.releases import attestation_of
from tests.serving.conftest import MODEL


@pytest.fixture
def promoted(home, tmp_path, monkeypatch, prefect_server) -> Iterator[Killable]:
    """v2 promoted over v1 (champion v2, previous v1), the gateway serving v2 alone."""
    with staged(home, tmp_path, monkeypatch) as killable:
        stage = killable.stage
        stage.registry.promote(MODEL, stage.candidate, reason="rollout: every step not worse")
        backend = {
            "version": stage.candidate,
            "url": stage.upstream_url,
            "served_model": f"{MODEL}-v{stage.candidate}",
            "digest": stage.registry.tags(MODEL, stage.candidate)["digest"],
            "attestation": attestation_of(home, MODEL, stage.candidate),
            "weight": 100,
            "role": "stable",
        }
        body = {"backends": [backend | {"expected_digest": backend["digest"]}]}
        url = f"{stage.gateway_url}/admin/routes/{MODEL}"
        httpx.put(url, json=body, headers=stage.admin).raise_for_status()
        yield killable


def revert_runs(stage: Stage) -> list:
    experiment = stage.registry.client.get_experiment_by_name(ROLLOUTS)
    if experiment is None:
        return []
    return stage.registry.client.search_runs([experiment.experiment_id], "tags.kind = 'revert'")


def test_a_revert_puts_previous_back_as_champion_in_one_step(promoted):
    stage = promoted.stage
    back, bad = stage.stable, stage.candidate
    with traffic(stage) as statuses:
        outcome = revert(MODEL, "answers look off", stage.gateway_url, stage.upstream_url)
    assert outcome == "reverted"
    assert routed(stage) == [(back, "stable", 100.0)]
    registry = stage.registry
    assert registry.alias(MODEL, "champion") == back
    assert registry.alias(MODEL, "previous") == bad
    assert registry.alias_history(MODEL, "champion")[-1]["reason"] == (
        f"revert from v{bad}: answers look off"
    )
    assert registry.alias_history(MODEL, "previous")[-1]["reason"] == "reverted: answers look off"
    reverted = registry.tags(MODEL, bad)
    assert reverted["rollout_status"] == "reverted" and reverted["revert_status"] == "reverted"
    assert registry.tags(MODEL, back)["reinstated_reason"] == "by hand: answers look off"
    [run] = revert_runs(stage)
    assert run.info.status == "FINISHED" and run.data.tags["rollout_status"] == "reverted"
    assert "reverted: by hand: answers look off" in story(registry, run.info.run_id)
    evidence = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="evidence.json", tracking_uri=registry.uri
    )
    seconds = json.loads(Path(evidence).read_text())["seconds"]
    assert set(seconds) == {"verify", "serve", "swap", "total"}, seconds
    assert InFlight.read(registry, MODEL) is None
    for event in ("slipway.revert.started", "slipway.revert.reverted"):
        [found] = stored_events(event, where=lambda e: e.payload["run_id"] == run.info.run_id)
        assert found.resource["slipway.version"] == back
    assert set(statuses) == {200}  # the swap is one atomic change: no client saw it


def test_a_previous_that_fails_verification_changes_nothing(promoted):
    stage = promoted.stage
    stage.registry.tag(MODEL, stage.stable, {"eval_status": "failed", "eval_reasons": "recall"})
    before = stage.route()
    with pytest.raises(RevertRefused, match=r"refusing to serve the previous .* did not pass"):
        revert(MODEL, "answers look off", stage.gateway_url, stage.upstream_url)
    assert stage.route() == before
    assert stage.registry.alias(MODEL, "champion") == stage.candidate
    assert stage.registry.alias(MODEL, "previous") == stage.stable
    assert "revert_status" not in stage.registry.tags(MODEL, stage.candidate)
    assert revert_runs(stage) == [] and InFlight.read(stage.registry, MODEL) is None


def test_without_a_previous_there_is_nothing_to_revert(home, tmp_path, monkeypatch, prefect_server):
    with staged(home, tmp_path, monkeypatch) as killable:
        stage = killable.stage
        with pytest.raises(RevertRefused, match="no previous champion to go back to"):
            revert(MODEL, "why not", stage.gateway_url, stage.upstream_url)
        assert routed(stage) == [(stage.stable, "stable", 100.0)]


def test_a_revert_refuses_while_a_rollout_runs(promoted):
    stage = promoted.stage
    running = InFlight(
        kind="rollout",
        source=stage.candidate,
        target="7",
        run_id=None,
        started_at="now",
        owner=Owner.me(),  # this process, alive
    )
    running.claim(stage.registry, MODEL)
    before = stage.route()
    with pytest.raises(Busy, match=f"a rollout of {MODEL} v7 is running"):
        revert(MODEL, "answers look off", stage.gateway_url, stage.upstream_url)
    assert stage.route() == before and InFlight.read(stage.registry, MODEL) == running


def test_a_revert_killed_after_the_aliases_moved_is_finished(promoted, tmp_path):
    stage, log = promoted.stage, tmp_path / "revert.log"
    back, bad = stage.stable, stage.candidate
    hold = promoted.arm(route_call(MODEL, [back]), "hold")  # the drained route, never applied
    args = ("revert", MODEL, "--gateway-url", stage.gateway_url, "--previous-url")
    with traffic(stage) as statuses:
        kill_when(start_flow(stage.home, log, *args, stage.upstream_url), hold.reached.is_set, log)
        killed = in_flight(stage.registry, MODEL)
        assert stage.registry.alias(MODEL, "champion") == back
        assert (bad, "stable", 0.0) in routed(stage) and (back, "canary", 100.0) in routed(stage)
        said = reconcile_by_hand(stage)
    assert f"v{bad} drained and removed" in said and f"recorded the revert of v{back}" in said
    assert routed(stage) == [(back, "stable", 100.0)]
    assert stage.registry.alias(MODEL, "previous") == bad
    tags = stage.registry.tags(MODEL, bad)
    assert tags["revert_status"] == "reverted" and tags["rollout_status"] == "reverted"
    assert "reconciled" in tags["revert_reason"]
    assert_settled(stage.registry, MODEL, killed)
    assert set(statuses) == {200}
