"""The rollout end to end on the real parts: the flow starts the candidate's vLLM itself (the
launcher), adds it to a real gateway in front of the stable vLLM, drives labelled synthetic load
through the gateway, judges it and promotes it; the candidate's server is left to the stack."""

from __future__ import annotations

import shutil

import pytest
import yaml

from configs.gateway import GatewayConfig
from configs.models import Serving
from evaluation.benchmarks.mock_upstream import serve
from flows.rollout import rollout
from serving.gateway.app import build_app
from serving.gateway.auth import key_hash
from serving.processes import read_state
from serving.vllm import VLLMServer
from tasks.engines import stop_version
from tasks.registry import Registry
from tests.releases import release
from tests.serving.conftest import Secrets


# Two vLLM engines on a 2-core machine: ~3 min quiet, over 10 under load; `make stress` runs it.
@pytest.mark.stress
def test_a_vllm_candidate_is_launched_judged_on_synthetic_load_and_promoted(
    home, tiny_model_source, tmp_path, monkeypatch, prefect_server
):
    registry = Registry(home)
    stable = release(home, "tiny", tiny_model_source, "bf16")
    registry.promote("tiny", stable)
    twin = shutil.copytree(tiny_model_source, tmp_path / "twin")
    (twin / "README.md").write_text("The same weights: an A/A rollout.\n")  # another digest
    candidate = release(home, "tiny", twin, "fp8-dynamic")
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        yaml.safe_dump(
            {
                "steps": [50, 100],
                "min_samples": 20,
                "max_seconds": 240,
                "on_inconclusive": "rollback",
                "look_interval_s": 0.5,
                "synthetic_load": True,
                "synthetic_rate": 4.0,
                "slos": {"ttft_p99_s": None, "error_rate": None},
                # Both engines share one core here: only a gross difference counts as worse.
                "analysis": {"burn_in": 10, "margins": {"ttft": 1.0, "tpot": 1.0, "e2e": 1.0}},
            }
        )
    )
    keys = Secrets()
    monkeypatch.setenv("SLIPWAY_ADMIN_TOKEN", keys.admin)
    monkeypatch.setenv("SLIPWAY_SYNTHETIC_KEY", keys.key("load"))
    weights = home.models / "tiny" / "bf16" / "weights"
    with VLLMServer(weights, "tiny", home, Serving(), aliases=[f"tiny-v{stable}"]) as server:
        backend = {
            "version": stable,
            "url": server.url,
            "served_model": f"tiny-v{stable}",
            "digest": registry.tags("tiny", stable)["digest"],
            "verified": True,
            "weight": 100,
            "role": "stable",
        }
        config = GatewayConfig.model_validate(
            {
                "admin_token_sha256": key_hash(keys.admin),
                "routes": [{"model": "tiny", "backends": [backend]}],
                "tenants": [keys.tenant("load", synthetic=True)],
            }
        )
        with serve(build_app(config, home)) as gateway_url:
            try:
                outcome = rollout("tiny", "fp8-dynamic", str(policy), gateway_url)
            finally:
                launched = [p for p in read_state(home) if p.what == f"vllm tiny-v{candidate}"]
                stop_version(home, f"vllm tiny-v{candidate}")
    reason = registry.tags("tiny", candidate)["rollout_reason"]
    assert outcome == "promoted", reason
    assert registry.alias("tiny", "champion") == candidate
    assert len(launched) == 1  # started by the flow, recorded for `make down`, still serving
    run = registry.client.get_run(registry.tags("tiny", candidate)["rollout_run_id"])
    counts = registry.client.get_metric_history(run.info.run_id, "synthetic.canary_requests")
    assert max(m.value for m in counts) > 0  # the synthetic samples were judged apart
