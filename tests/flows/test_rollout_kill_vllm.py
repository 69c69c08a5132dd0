"""The rollout flow SIGKILLed while it serves a real vLLM candidate, then reconciled: killed while
the candidate's vLLM starts, and killed during a step with the candidate at 20%. The detached vLLM
outlives the flow; `slipway rollout reconcile` stops it and records the candidate rolled back.
The stable backend is the mock upstream; the candidate is the tiny model. `make stress` runs it
(two vLLM starts)."""

from __future__ import annotations

import pytest
import yaml

from evaluation.benchmarks.mock_upstream import MockUpstream, serve
from serving.gateway.app import build_app
from serving.processes import members, read_state
from tasks.registry import Registry
from tests.flows.killing import (
    Hold,
    assert_settled,
    in_flight,
    kill_when,
    reconcile_by_hand,
    routed,
    start_flow,
)
from tests.flows.test_rollout import Stage, registered, traffic
from tests.releases import release, stable_backend
from tests.serving.conftest import MODEL, Secrets

pytestmark = pytest.mark.stress


@pytest.mark.timeout(1800)
def test_killed_while_serving_a_vllm_candidate_and_during_its_step(
    home, tiny_model_source, tmp_path, monkeypatch, prefect_server
):
    registry = Registry(home)
    stable = registered(home, tmp_path, b"stable", "bf16")
    registry.promote(MODEL, stable)
    candidate = release(home, MODEL, tiny_model_source, "fp8-dynamic")
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"steps": [20, 100], "max_seconds": 600}))
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    upstream = MockUpstream(chunks=4)
    upstream.record = False
    engine = f"vllm {MODEL}-v{candidate}"
    with serve(upstream) as upstream_url:
        backend = stable_backend(home, MODEL, stable, upstream_url)
        config = keys.config([backend], tenants=[keys.tenant("alice")])
        with serve(Hold(build_app(config, home))) as gateway_url:
            stage = Stage(
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
            args = ("rollout", "run", MODEL, candidate, "--policy", str(policy))
            for reached in (
                lambda: any(p.what == engine for p in read_state(home)),  # vLLM starting
                lambda: (candidate, "canary", 20.0) in routed(stage),  # step 1, 20%
            ):
                log = tmp_path / "flow.log"
                proc = start_flow(home, log, *args, "--gateway-url", gateway_url)
                with traffic(stage):
                    seconds = kill_when(proc, reached, log, timeout_s=900)
                    killed = in_flight(registry, MODEL)
                    [vllm] = [p for p in read_state(home) if p.what == engine]
                    assert members(vllm), "the detached vLLM outlives the flow"
                    said = reconcile_by_hand(stage)
                print(f"killed after {seconds:.0f} s; reconcile said:\n{said}")
                assert f"stopped the vLLM of v{candidate}" in said
                assert not members(vllm) and engine not in {p.what for p in read_state(home)}
                assert routed(stage) == [(stable, "stable", 100.0)]
                tags = registry.tags(MODEL, candidate)
                assert tags["rollout_status"] == "rolled_back", tags
                assert_settled(registry, MODEL, killed)
