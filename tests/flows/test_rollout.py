"""The rollout flow against the real gateway, a real MLflow registry and real Prefect, with the
mock upstream standing in for vLLM (faults on demand): a canary that errs, one 30% slower and
one that dies are rolled back; an A/A canary is promoted; a failed precondition moves nothing;
a paused step waits for a person. The real-vLLM rollout is in test_rollout_vllm.py."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import pytest
import yaml

from configs.gateway import RouteSpec
from configs.home import Home
from evaluation.benchmarks.mock_upstream import Fault, MockUpstream, serve
from flows.rollout import rollout
from serving.gateway.app import build_app
from tasks.k8s_export import comparable, parse
from tasks.registry import Registry
from tasks.rollout.control import approve, roll_back_by_hand
from tasks.rollout.history import ROLLOUTS
from tasks.rollout.plan import RolloutRefused
from tasks.servable import version_of
from tasks.store import writable
from tests.releases import attestation_of, release, stand_in_model
from tests.serving.conftest import MODEL, Secrets

BASE_DELAY_S = 0.02  # before the first chunk
CHUNK_DELAY_S = 0.005  # between chunks: TPOT is measurable


@pytest.fixture
def policy(tmp_path) -> Path:
    """Fast steps: a look every 0.1 s, 60 canary requests per step, rollback when inconclusive."""
    path = tmp_path / "policy.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "steps": [20, 50, 100],
                "min_samples": 60,
                "max_seconds": 40,
                "look_interval_s": 0.1,
                "on_inconclusive": "rollback",
                "slos": {"ttft_p99_s": None, "error_rate": None},
            }
        )
    )
    return path


@dataclass
class Stage:
    """Two registered, signed versions (v1 champion, v2 candidate), the gateway serving v1 from
    the mock upstream, and a tenant's key for traffic."""

    home: Home
    registry: Registry
    upstream: MockUpstream
    upstream_url: str
    gateway_url: str
    key: str
    stable: str
    candidate: str

    def route(self) -> dict:
        return httpx.get(f"{self.gateway_url}/admin/routes/{MODEL}", headers=self.admin).json()

    @property
    def admin(self) -> dict:
        return {"Authorization": f"Bearer {self._admin}"}

    _admin: str = ""


def registered(home: Home, tmp_path: Path, content: bytes, variant: str, **tags: str) -> str:
    return release(
        home, MODEL, stand_in_model(tmp_path / f"src-{variant}", content), variant, **tags
    )


@pytest.fixture
def breaker() -> dict:
    """The gateway's breaker settings (defaults); a test may parametrize them."""
    return {}


@pytest.fixture
def failover() -> bool:
    """Whether the route fails over to the canary while stable is down; a test may override."""
    return False


@pytest.fixture
def stage(home, tmp_path, monkeypatch, prefect_server, breaker, failover) -> Iterator[Stage]:
    registry = Registry(home)
    stable = registered(home, tmp_path, b"stable", "bf16")
    registry.promote(MODEL, stable)
    candidate = registered(home, tmp_path, b"candidate", "gptq-w8a8")
    digest = registry.tags(MODEL, stable)["digest"]
    upstream = MockUpstream(chunks=4, chunk_delay_s=CHUNK_DELAY_S)
    upstream.record = False
    upstream.faults[f"{MODEL}-v{stable}"] = Fault(delay_s=BASE_DELAY_S)
    upstream.faults[f"{MODEL}-v{candidate}"] = Fault(delay_s=BASE_DELAY_S)
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    with serve(upstream) as upstream_url:
        backend = {
            "version": stable,
            "url": upstream_url,
            "served_model": f"{MODEL}-v{stable}",
            "digest": digest,
            "attestation": attestation_of(home, MODEL, stable),
            "weight": 100,
            "role": "stable",
        }
        route = {"model": MODEL, "backends": [backend], "failover": failover}
        config = keys.config([], routes=[route], tenants=[keys.tenant("alice")], breaker=breaker)
        with serve(build_app(config, home)) as gateway_url:
            yield Stage(
                home,
                registry,
                upstream,
                upstream_url,
                gateway_url,
                keys.key("alice"),
                stable,
                candidate,
                _admin=keys.admin,
            )


@contextmanager
def traffic(stage: Stage, stream: bool = True, workers: int = 4) -> Iterator[list[int]]:
    """Organic requests from `workers` threads until the block ends; yields the status codes."""
    statuses: list[int] = []
    done = threading.Event()

    def worker() -> None:
        with httpx.Client(
            base_url=stage.gateway_url, timeout=30, headers={"Authorization": f"Bearer {stage.key}"}
        ) as client:
            while not done.is_set():
                body = {
                    "model": MODEL,
                    "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 4,
                    "stream": stream,
                }
                if stream:
                    with client.stream("POST", "/v1/chat/completions", json=body) as response:
                        text = "".join(response.iter_text())
                        ok = response.status_code == 200 and '"error"' not in text
                        statuses.append(response.status_code if ok else 599)
                else:
                    statuses.append(client.post("/v1/chat/completions", json=body).status_code)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(workers)]
    for t in threads:
        t.start()
    try:
        yield statuses
    finally:
        done.set()
        for t in threads:
            t.join(30)


def run(stage: Stage, policy: Path, candidate_url: str | None = None) -> str:
    return rollout(
        MODEL, stage.candidate, str(policy), stage.gateway_url, candidate_url or stage.upstream_url
    )


def rollout_runs(stage: Stage) -> list:
    experiment = stage.registry.client.get_experiment_by_name(ROLLOUTS)
    return stage.registry.client.search_runs([experiment.experiment_id]) if experiment else []


def assert_rolled_back(stage: Stage, because: str) -> None:
    route = stage.route()
    assert [(b["version"], b["role"], b["weight"]) for b in route["backends"]] == [
        (stage.stable, "stable", 100.0)
    ]
    assert stage.registry.alias(MODEL, "champion") == stage.stable
    tags = stage.registry.tags(MODEL, stage.candidate)
    assert tags["rollout_status"] == "rolled_back"
    assert because in tags["rollout_reason"], tags["rollout_reason"]
    [run_] = rollout_runs(stage)
    assert run_.data.tags["rollout_status"] == "rolled_back"
    story = Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_.info.run_id, artifact_path="story.md", tracking_uri=stage.registry.uri
        )
    ).read_text()
    assert "rolled back" in story and because in story


@pytest.mark.parametrize(
    ("every", "breaker", "because"),
    [
        (4, {}, "error rate: canary 2"),
        # The circuit opens at the first failure, before the error test could decide (it needs
        # about 4 failures), and then no canary sample comes: the open circuit alone decides.
        (1, {"failures": 1}, "the gateway opened the canary's circuit"),
    ],
    ids=["one-in-four-errors", "all-errors"],
)
def test_a_canary_returning_errors_is_rolled_back(stage, policy, every, because):
    stage.upstream.faults[f"{MODEL}-v{stage.candidate}"] = Fault(
        status=500, delay_s=BASE_DELAY_S, every=every
    )
    with traffic(stage) as statuses:
        assert run(stage, policy) == "rolled_back"
    assert_rolled_back(stage, "step 1 (20%)")
    assert because in stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    # The canary's failures before the first byte were retried on stable: clients saw none.
    assert set(statuses) == {200}


def test_a_canary_30_percent_slower_is_rolled_back(stage, policy):
    stage.upstream.faults[f"{MODEL}-v{stage.candidate}"] = Fault(delay_s=BASE_DELAY_S * 1.3)
    with traffic(stage):
        assert run(stage, policy) == "rolled_back"
    assert_rolled_back(stage, "worse (p=")


def test_an_identical_canary_is_promoted_and_becomes_champion(stage, policy):
    with traffic(stage) as statuses:
        outcome = run(stage, policy)
    assert outcome == "promoted", stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    route = stage.route()
    assert [(b["version"], b["role"], b["weight"]) for b in route["backends"]] == [
        (stage.candidate, "stable", 100.0)
    ]
    assert stage.registry.alias(MODEL, "champion") == stage.candidate
    assert stage.registry.alias(MODEL, "previous") == stage.stable
    assert stage.registry.tags(MODEL, stage.candidate)["rollout_status"] == "promoted"
    [run_] = rollout_runs(stage)
    history = stage.registry.client.get_metric_history(run_.info.run_id, "canary_weight")
    assert {m.value for m in history} == {20.0, 50.0}  # every look of both judged steps
    assert set(statuses) == {200}


def test_k8s_patches_beside_the_gateway_record_every_move_of_the_rollout(stage, policy, tmp_path):
    """`--k8s-patches`: the rollout runs and is judged as always, and each of its route and weight
    changes is also written, in order, as the model's Kubernetes objects (tasks/rollout/
    k8s_patches.py), the last of them the route the gateway ends with."""
    folder = tmp_path / "k8s"
    with traffic(stage):
        outcome = rollout(
            MODEL, stage.candidate, str(policy), stage.gateway_url, stage.upstream_url, str(folder)
        )
    assert outcome == "promoted"
    moves = [parse(yaml.safe_load_all(p.read_text())) for p in sorted(folder.glob("*.yaml"))]
    s, c = stage.stable, stage.candidate
    assert [{b["version"]: b["weight"] for b in m[MODEL]["backends"]} for m in moves] == [
        {s: 100.0, c: 0.0},  # the canary joins at weight 0
        {s: 80.0, c: 20.0},  # the policy's steps
        {s: 50.0, c: 50.0},
        {s: 0.0, c: 100.0},  # the hand-over
        {c: 100.0},  # the canary alone, as stable
    ]
    assert moves[-1][MODEL] == comparable(RouteSpec.model_validate(stage.route()))
    assert len(list(folder.glob("*.httproute.merge-patch.json"))) == len(moves)


def canary_weighted(stage: Stage, flow: threading.Thread) -> None:
    """Wait until the rollout gives its canary traffic."""
    while not any(b["role"] == "canary" and b["weight"] > 0 for b in stage.route()["backends"]):
        assert flow.is_alive()


@pytest.mark.parametrize(("misses", "outcome"), [(2, "promoted"), (3, "rolled_back")])
def test_a_canary_is_down_after_health_failures_checks_in_a_row(stage, policy, misses, outcome):
    # One missed probe is what a busy engine on a contended machine gives; the default policy
    # rolls back at the third in a row.
    canary = MockUpstream(chunks=4, chunk_delay_s=CHUNK_DELAY_S)
    canary.record = False
    canary.faults[f"{MODEL}-v{stage.candidate}"] = Fault(delay_s=BASE_DELAY_S)
    result: list[str] = []
    with traffic(stage), serve(canary) as canary_url:
        flow = threading.Thread(target=lambda: result.append(run(stage, policy, canary_url)))
        flow.start()
        canary_weighted(stage, flow)
        canary.unhealthy = misses
        flow.join(120)
    assert result == [outcome], stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    assert canary.unhealthy == 0  # every failing answer was seen by the step's checks
    if outcome == "rolled_back":
        assert_rolled_back(stage, "stopped answering /health (3 checks in a row)")


def test_a_canary_that_dies_mid_rollout_is_rolled_back_without_failing_clients(stage, policy):
    canary = MockUpstream(chunks=4, chunk_delay_s=CHUNK_DELAY_S)
    canary.record = False
    canary.faults[f"{MODEL}-v{stage.candidate}"] = Fault(delay_s=BASE_DELAY_S)
    result: list[str] = []
    with traffic(stage, stream=False) as statuses:
        with serve(canary) as canary_url:
            flow = threading.Thread(target=lambda: result.append(run(stage, policy, canary_url)))
            flow.start()
            canary_weighted(stage, flow)
        # The canary's server is gone (connections refused) while it holds 20% of the traffic.
        flow.join(60)
    assert result == ["rolled_back"]
    assert_rolled_back(stage, "")
    assert set(statuses) == {200}  # non-streaming requests failed on the canary were retried


@pytest.mark.parametrize("failover", [True])
@pytest.mark.parametrize("breaker", [{"failures": 2, "open_s": 0.5}])
def test_stable_down_mid_step_holds_the_step_while_the_canary_stands_in(stage, policy):
    stable = f"{MODEL}-v{stage.stable}"
    result: list[str] = []
    with traffic(stage) as statuses:
        flow = threading.Thread(target=lambda: result.append(run(stage, policy)))
        flow.start()
        canary_weighted(stage, flow)
        stage.upstream.faults[stable] = Fault(status=503)  # stable's engine is down for 3 s
        time.sleep(3)
        stage.upstream.faults[stable] = Fault(delay_s=BASE_DELAY_S)
        flow.join(120)
    # Not rolled back for an outage that was stable's, nor judged on what the canary served in
    # its place: the step waited, and the identical canary went on to be promoted.
    assert result == ["promoted"], stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    assert set(statuses) == {200}  # the failover served every request stable could not
    [run_] = rollout_runs(stage)
    evidence = json.loads(
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_.info.run_id,
                artifact_path="evidence.json",
                tracking_uri=stage.registry.uri,
            )
        ).read_text()
    )
    first = evidence["steps"][0]
    assert 1.0 < first["incident_s"] < 10, first  # held while every stable circuit was open


def test_a_failed_precondition_moves_no_traffic(stage, policy):
    stage.registry.tag(
        MODEL, stage.candidate, {"eval_status": "failed", "eval_reasons": "recovery 0.7"}
    )
    before = stage.route()
    with pytest.raises(RolloutRefused, match="its evaluation did not pass"):
        run(stage, policy)
    assert stage.route() == before
    assert "rollout_status" not in stage.registry.tags(MODEL, stage.candidate)
    assert rollout_runs(stage) == []


def test_rolling_out_the_champion_is_a_no_op(stage, policy):
    before = stage.route()
    assert rollout(MODEL, stage.stable, str(policy), stage.gateway_url) == "already_champion"
    assert stage.route() == before and rollout_runs(stage) == []


def test_tampered_candidate_weights_are_refused(stage, policy):
    weights = version_of(stage.registry, MODEL, stage.candidate).weights
    writable(weights)
    (weights / "model.safetensors").write_bytes(b"tampered")
    before = stage.route()
    with pytest.raises(RolloutRefused, match="signature does not verify"):
        run(stage, policy)
    assert stage.route() == before


def test_a_paused_step_waits_for_approval_and_a_person_can_roll_back(stage, policy, tmp_path):
    # No traffic at all: every step is inconclusive at its time limit and pauses.
    paused = tmp_path / "pause.yaml"
    paused.write_text(
        policy.read_text()
        .replace("on_inconclusive: rollback", "on_inconclusive: pause")
        .replace("max_seconds: 40", "max_seconds: 0.5")
    )
    result: list[str] = []
    flow = threading.Thread(target=lambda: result.append(run(stage, paused)))
    flow.start()

    def status() -> str | None:
        return stage.registry.tags(MODEL, stage.candidate).get("rollout_status")

    def wait_paused() -> None:
        while status() != "paused":
            assert flow.is_alive()

    wait_paused()
    assert approve(stage.home, MODEL) == stage.candidate
    while [b["weight"] for b in stage.route()["backends"] if b["role"] == "canary"] != [50.0]:
        assert flow.is_alive()  # approved: on to the second step
    wait_paused()
    assert roll_back_by_hand(stage.home, MODEL, "looks odd", stage.gateway_url) == [stage.candidate]
    flow.join(60)
    assert result == ["rolled_back"]
    assert_rolled_back(stage, "looks odd")


@pytest.fixture
def shadow_policy(policy) -> Path:
    """The fast policy with a shadow phase first and mirroring at every step."""
    path = policy.with_name("shadow.yaml")
    rules = yaml.safe_load(policy.read_text())
    rules["shadow"] = {"rate_rps": 50, "min_pairs": 40, "max_seconds": 40}
    # The mock answers scoring calls at once: pairs are scored as fast as the copies come.
    rules["analysis"] = {"quality": {"score_rps": 50}}
    path.write_text(yaml.safe_dump(rules))
    return path


def story_and_evidence(stage: Stage) -> tuple[str, dict]:
    [run_] = rollout_runs(stage)
    files = [
        Path(
            mlflow.artifacts.download_artifacts(
                run_id=run_.info.run_id, artifact_path=name, tracking_uri=stage.registry.uri
            )
        )
        for name in ("story.md", "evidence.json")
    ]
    return files[0].read_text(), json.loads(files[1].read_text())


def test_a_canary_answering_wrongly_at_normal_speed_is_rolled_back_in_the_shadow_phase(
    stage, shadow_policy
):
    stage.upstream.faults[f"{MODEL}-v{stage.candidate}"] = Fault(delay_s=BASE_DELAY_S, word="z")
    with traffic(stage) as statuses:
        assert run(stage, shadow_policy) == "rolled_back"
    assert_rolled_back(stage, "step 1 (shadow (mirrored copies only))")
    assert "quality: 100.0% of" in stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    [run_] = rollout_runs(stage)
    weights = stage.registry.client.get_metric_history(run_.info.run_id, "canary_weight")
    assert {m.value for m in weights} == {0.0}  # no user reached the canary
    assert set(statuses) == {200}
    story, evidence = story_and_evidence(stage)
    assert "0% identical answers" in story
    [shadow] = evidence["steps"]
    assert shadow["mirrored_pairs"][0]["canary"].startswith("z0")
    assert all(p["degraded"] for p in shadow["mirrored_pairs"])


def test_the_warm_up_copies_are_not_judged(stage, shadow_policy):
    """A canary whose first 20 answers are wrong (standing for a new engine's slow first sight of
    each prompt) passes a shadow phase that warms it up on 30 copies: judging starts after them;
    without the warm-up the same canary is rolled back (the test above)."""
    stage.upstream.faults[f"{MODEL}-v{stage.candidate}"] = Fault(
        delay_s=BASE_DELAY_S, word="z", times=20
    )
    rules = yaml.safe_load(shadow_policy.read_text())
    rules["shadow"]["warmup_copies"] = 30
    shadow_policy.write_text(yaml.safe_dump(rules))
    with traffic(stage):
        outcome = run(stage, shadow_policy)
    assert outcome == "promoted", stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    _, evidence = story_and_evidence(stage)
    shadow = evidence["steps"][0]["mirrored_pairs"]
    assert shadow and not any(p["canary"].startswith("z0") for p in shadow)


def test_an_identical_canary_passes_the_shadow_phase_and_is_promoted_on_pairs(stage, shadow_policy):
    with traffic(stage) as statuses:
        outcome = run(stage, shadow_policy)
    assert outcome == "promoted", stage.registry.tags(MODEL, stage.candidate)["rollout_reason"]
    [run_] = rollout_runs(stage)
    weights = stage.registry.client.get_metric_history(run_.info.run_id, "canary_weight")
    assert {m.value for m in weights} == {0.0, 20.0, 50.0}
    paired = stage.registry.client.get_metric_history(run_.info.run_id, "ttft_paired.p_not_worse")
    assert min(m.value for m in paired) < 0.05  # latency was decided on pairs
    assert set(statuses) == {200}
    story, evidence = story_and_evidence(stage)
    assert "100% identical answers" in story
    assert [len(s["mirrored_pairs"]) >= 1 for s in evidence["steps"]] == [True] * 3
    # every step's pairs' timings, the scored ones and the rest: what its latency verdict
    # rests on (each step its own, the live steps with pairs copied both ways)
    for step in evidence["steps"]:
        timed = step["latency_pairs"]
        assert len(timed) >= len(step["mirrored_pairs"])
        assert all(p["stable_ttft_ms"] > 0 and p["canary_ttft_ms"] > 0 for p in timed)
    assert {p["copied_to"] for p in evidence["steps"][1]["latency_pairs"]} == {"canary", "stable"}
    assert stage.route()["mirror"] is None  # promotion stopped the copies
